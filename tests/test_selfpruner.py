"""Self-Pruner (`sparsellm.selfpruner`, issue 6): repair always yields feasible vectors, the loop finds a
known optimum, resume continues exactly, the LLM operators validate replies and fall back to the GA
(counted, logged), the openai backend speaks the protocol to a loopback stub and names an unreachable URL,
the backends are registered with their own configs (another backend's setting is refused, `--backend llm`
resolves), and `sparsellm search` runs end to end and rejects bad input."""

from __future__ import annotations

import json
import random
import re
from http.server import BaseHTTPRequestHandler

import pytest
from conftest import loopback_server, reply

from sparsellm.cli import main
from sparsellm.errors import UsageError
from sparsellm.selfpruner import GAOperators, LLMOperators, SearchConfig, evolve, feasible, openai_chat, repair


@pytest.mark.parametrize("seed", range(20))
def test_repair_always_feasible(seed):
    rng = random.Random(seed)
    L = rng.randint(1, 40)
    target = rng.choice([0.0, rng.uniform(0, 0.9)])
    max_rate = rng.uniform(target, 0.99)
    v = [rng.choice([rng.uniform(-2, 2), float("nan"), float("inf"), -float("inf"), rng.uniform(0, 1)]) for _ in range(L)]
    x = repair(v, target, max_rate)
    assert len(x) == L and feasible(x, target, max_rate, tol=1e-9)
    assert repair([max_rate] * L, max_rate, max_rate) == pytest.approx([max_rate] * L)


def test_repair_keeps_a_feasible_vector_and_shifts_others():
    v = [0.1, 0.3, 0.5]
    assert repair(v, 0.3, 0.8) == pytest.approx(v, abs=1e-12)
    assert repair([0.2, 0.4, 0.6], 0.3, 0.8) == pytest.approx([0.1, 0.3, 0.5], abs=1e-12)  # shifted by −0.1
    assert repair([0.0, 0.0, 0.9], 0.3, 0.5) == pytest.approx([0.2, 0.2, 0.5], abs=1e-12)  # clipped, then shifted


@pytest.mark.parametrize("kw,match", [(dict(target_rate=1.0), "target_rate"), (dict(target_rate=-0.1), "target_rate"),
                                      (dict(target_rate=0.5, max_rate=0.4), "max_rate"),
                                      (dict(target_rate=0.3, population=1), "population")])
def test_search_config_bad_input(kw, match):
    with pytest.raises(UsageError, match=match):
        SearchConfig(**kw).validate()


def _quadratic(opt):
    calls = []

    def f(rates):
        calls.append(list(rates))
        return sum((r - o) ** 2 for r, o in zip(rates, opt))
    return f, calls


def test_ga_search_approaches_a_known_optimum_and_caches():
    opt = [0.1, 0.2, 0.3, 0.4, 0.5]  # mean 0.3: feasible
    f, calls = _quadratic(opt)
    cfg = SearchConfig(target_rate=0.3, max_rate=0.8, population=8, generations=15, crossover=4, mutation=4, seed=1)
    state = evolve(f, 5, cfg, GAOperators())
    best = state["population"][0]
    assert feasible(best["rates"], 0.3, 0.8)
    assert best["fitness"] < 0.2 * state["history"][0]["best"]  # far better than the best initial vector
    assert [h["best"] for h in state["history"]] == sorted((h["best"] for h in state["history"]), reverse=True)
    assert len(calls) == state["evals"] == len({",".join(f"{r:.3f}" for r in c) for c in calls})
    assert state["proposed"] == 8 + 15 * (4 + 4)
    assert len(state["population"]) == 8


class _Interrupt(Exception):
    pass


def _scripted_chat(log=None, bad_every=0):
    """A test double of a chat model: reads the request out of the prompt and answers valid JSON, or
    garbage for about one seed in `bad_every`; like a sampled model at a fixed seed, a function of its input."""

    def chat(messages, seed, max_tokens, prefix="", reply=None):
        text = messages[-1]["content"]
        if log is not None:
            log.append(text)
        if bad_every and random.Random(seed * 7 + 1).randrange(bad_every) == 0:
            return "Sure! Here are some rates: 0.1, 0.2 ..."
        rng = random.Random(seed)
        L = int(re.search(r"exactly (\d+) numbers", text).group(1))
        vec = lambda: [round(rng.uniform(0, 0.6), 3) for _ in range(L)]  # noqa: E731
        if m := re.search(r"Propose (\d+)", text):
            return "```json\n" + json.dumps({"population": [vec() for _ in range(int(m.group(1)))]}) + "\n```"
        if m := re.search(r"Select (\d+) pairs", text):
            n_pop = len(re.findall(r"^\d+\. fitness", text, re.M))
            return json.dumps({"pairs": [[rng.randrange(n_pop), rng.randrange(n_pop)] for _ in range(int(m.group(1)))]})
        n = int(re.search(r"\((\d+) children", text).group(1))
        return json.dumps({"children": [vec() for _ in range(n)]})
    return chat


@pytest.mark.parametrize("backend", ["ga", "llm"])
def test_resume_continues_exactly(tmp_path, backend):
    opt = [0.5, 0.1, 0.3, 0.3]
    cfg = SearchConfig(target_rate=0.3, max_rate=0.8, population=6, generations=5, crossover=3, mutation=3, seed=3)

    def ops():
        return GAOperators() if backend == "ga" else LLMOperators(_scripted_chat(bad_every=4), "a model", None, 1)

    f, _ = _quadratic(opt)
    full = evolve(f, 4, cfg, ops(), tmp_path / "a.json")
    n = [0]

    def dying(rates):
        n[0] += 1
        if n[0] == 20:
            raise _Interrupt
        return f(rates)

    with pytest.raises(_Interrupt):
        evolve(dying, 4, cfg, ops(), tmp_path / "b.json")
    stopped = json.loads((tmp_path / "b.json").read_text())
    assert 0 <= stopped["generation"] < 5
    with pytest.raises(UsageError, match=r"other settings \(mutation\)"):
        evolve(f, 4, SearchConfig(**{**vars(cfg), "mutation": 2}), ops(), tmp_path / "b.json", resume=True)
    resumed = evolve(f, 4, cfg, ops(), tmp_path / "b.json", resume=True)
    assert resumed["population"] == full["population"]
    assert [h["best"] for h in resumed["history"]] == [h["best"] for h in full["history"]]
    assert resumed["operators"] == full["operators"]
    assert resumed["proposed"] == full["proposed"] == 6 + 5 * (3 + 3)  # every proposal, across the interruption
    legacy = {k: v for k, v in stopped.items() if k != "proposed"}  # a state saved before the count existed
    (tmp_path / "b.json").write_text(json.dumps(legacy))
    assert "proposed" not in evolve(f, 4, cfg, ops(), tmp_path / "b.json", resume=True)  # not a partial count


def test_llm_operators_validate_fall_back_count_and_log(tmp_path):
    prompts = []
    ops = LLMOperators(_scripted_chat(prompts, bad_every=2), "The model is tiny.", tmp_path / "log.jsonl", retries=0)
    f, _ = _quadratic([0.3] * 6)
    cfg = SearchConfig(target_rate=0.3, max_rate=0.8, population=5, generations=3, crossover=2, mutation=2)
    state = evolve(f, 6, cfg, ops)
    st = ops.stats()
    assert st["calls"] == 1 + 3 * 3 and st["invalid_replies"] == sum(st["fallbacks"].values()) >= 1
    recs = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(recs) == st["calls"] and sum(not r["ok"] for r in recs) == st["invalid_replies"]
    assert all(r["reply"].startswith("Sure!") != r["ok"] for r in recs)
    assert all(r["messages"][-1]["content"] == p for r, p in zip(recs, prompts))
    assert "mean must be 0.3" in prompts[0] and "The model is tiny." in prompts[0]
    assert all(feasible(p["rates"], 0.3, 0.8) for p in state["population"])

    def never(messages, seed, max_tokens, prefix="", reply=None):
        return "no json here"

    def zeros(messages, seed, max_tokens, prefix="", reply=None):  # valid JSON, always the all-zero vectors
        text = messages[-1]["content"]
        L = int(re.search(r"exactly (\d+) numbers", text).group(1))
        if m := re.search(r"Propose (\d+)", text):
            return json.dumps({"population": [[0] * L] * int(m.group(1))})
        if m := re.search(r"Select (\d+) pairs", text):
            return json.dumps({"pairs": [[0, 0]] * int(m.group(1))})
        return json.dumps({"children": [[0] * L] * int(re.search(r"\((\d+) children", text).group(1))})

    state = evolve(f, 6, cfg, LLMOperators(zeros, "m", None, retries=0))  # what SmolLM2-135M answered (§12)
    assert state["evals"] == 1 and state["population"][0]["rates"] == [0.3] * 6  # repaired: uniform
    assert state["proposed"] == 5 + 3 * (2 + 2)  # the initial population, then crossover and mutation children

    ops = LLMOperators(never, "m", None, retries=1)
    evolve(f, 6, cfg, ops)  # a reply that never parses: GA fallback, no crash
    assert ops.stats()["fallbacks"] == {"init": 1, "select": 3, "crossover": 3, "mutation": 3}
    assert ops.stats()["calls"] == 2 * 10


class _Stub(BaseHTTPRequestHandler):
    requests: list = []
    die_after: int | None = None  # answer this many requests, then drop every connection

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if _Stub.die_after is not None and len(_Stub.requests) >= _Stub.die_after:
            self.close_connection = True
            return
        _Stub.requests.append((self.path, body))
        content = _scripted_chat()(body["messages"], body.get("seed", 0), body.get("max_tokens"))  # no prefix sent
        payload = {"id": "c1", "object": "chat.completion", "created": 0, "model": body["model"],
                   "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                "finish_reason": "stop"}],
                   "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
        reply(self, 200, json.dumps(payload).encode())

    def log_message(self, *a):
        pass


@pytest.fixture
def stub_url():
    _Stub.requests, _Stub.die_after = [], None
    with loopback_server(_Stub) as server:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", server


def test_openai_backend_against_a_loopback_stub(stub_url, tmp_path, monkeypatch):
    url, server = stub_url
    monkeypatch.setenv("MY_KEY", "secret")
    chat = openai_chat(url, "stub-model", "MY_KEY", temperature=0.5)
    ops = LLMOperators(chat, "m", tmp_path / "log.jsonl", retries=0)
    f, _ = _quadratic([0.2] * 4)
    cfg = SearchConfig(target_rate=0.2, max_rate=0.6, population=4, generations=2, crossover=2, mutation=2)
    evolve(f, 4, cfg, ops, tmp_path / "state.json")
    assert ops.stats()["invalid_replies"] == 0 and ops.stats()["calls"] == 1 + 2 * 3
    path, body = _Stub.requests[0]
    assert path == "/v1/chat/completions" and body["model"] == "stub-model" and body["temperature"] == 0.5
    assert body["messages"][0]["role"] == "system" and "Propose 4" in body["messages"][1]["content"]
    # the endpoint goes away mid-search: the error names the URL, and the finished generations are kept
    _Stub.requests, _Stub.die_after = [], 4  # init + generation 1 (3 calls), then nothing
    cfg2 = SearchConfig(**{**vars(cfg), "generations": 3})
    with pytest.raises(UsageError, match=re.escape(url)):
        evolve(f, 4, cfg2, LLMOperators(chat, "m", None, 0), tmp_path / "s2.json")
    assert json.loads((tmp_path / "s2.json").read_text())["generation"] == 1
    _Stub.die_after = None
    state = evolve(f, 4, cfg2, LLMOperators(chat, "m", None, 0), tmp_path / "s2.json", resume=True)
    assert state["generation"] == 3


# ------------------------------------------------------------------------------------------------------ CLI


def _search(model_dir, out, *extra):
    return main(["--quiet", "search", "--model", str(model_dir), "--target_rate", "0.3", "--max_rate", "0.6",
                 "--population", "4", "--generations", "2", "--crossover", "2", "--mutation", "2",
                 "--nsamples", "2", "--seqlen", "32", "--fitness_windows", "2", "--fitness_seqlen", "32",
                 "--final_k", "2", "--eval", "wikitext2", "--eval_seqlen", "32", "--max_windows", "2", "--out", str(out),
                 *extra])


def test_cli_search_end_to_end(tmp_path, saved_model_dir):
    from sparsellm.models import load_model

    out = tmp_path / "s"
    assert _search(saved_model_dir, out, "--backend", "ga") == 0
    for f in ("structure.json", "report.json", "report.md", "fitness.png", "rates.png", "search_state.json",
              "tokenizer.json", "model.safetensors"):
        assert (out / f).is_file(), f
    rep = json.loads((out / "report.json").read_text())["search"]
    assert feasible(rep["best_rates"], 0.3, 0.6) and rep["params_pruned"] < rep["params_dense"]
    assert rep["weights_mib"] == pytest.approx((out / "model.safetensors").stat().st_size / 2**20)
    assert len(rep["final"]) == 2 and all("wikitext2_ppl@32" in c["eval"] for c in rep["final"])
    model, _, _ = load_model(str(out))
    assert sum(p.numel() for p in model.parameters()) <= rep["params_pruned"] + model.lm_head.weight.numel()
    assert not (tmp_path / "s.search").exists()
    config = json.loads((out / "report.json").read_text())["config"]  # the flat settings, the chosen backend's only
    assert config["backend"] == "ga" and config["nsamples"] == 2 and config["fitness_seqlen"] == 32
    assert "llm_temperature" not in config and "quiet" not in config
    assert _search(saved_model_dir, tmp_path / "u", "--backend", "uniform") == 0
    assert json.loads((tmp_path / "u" / "report.json").read_text())["search"]["best_rates"] == pytest.approx([0.3, 0.3])


@pytest.mark.parametrize("extra,match", [
    (["--target_rate", "1.0"], "target_rate"), (["--max_rate", "0.2"], "max_rate"), (["--population", "1"], "population"),
    (["--backend", "openai"], "llm_base_url"), (["--resume"], "no search state"),
    (["--backend", "local", "--llm_retries", "-1"], "--llm_retries must be >= 0"),
    (["--eval_seqlen", "0"], "eval_seqlen"),
    (["--backend", "local", "--llm_temperature", "nan"], "--llm_temperature: must be a finite number"),
    (["--fitness_seqlen", "1"], "--fitness_seqlen must be >= 2"), (["--resume", "--backend", "uniform"], "uniform"),
])
def test_cli_search_bad_input(tmp_path, saved_model_dir, capsys, extra, match):
    assert _search(saved_model_dir, tmp_path / "s", *extra) == 2
    assert match in capsys.readouterr().err and not (tmp_path / "s").exists()


def test_cli_search_unreachable_endpoint(tmp_path, saved_model_dir, capsys):
    url = "http://127.0.0.1:9/v1"  # discard port: nothing listens
    assert _search(saved_model_dir, tmp_path / "s", "--backend", "openai", "--llm_base_url", url,
                   "--llm_model", "x") == 2
    assert url in capsys.readouterr().err and not (tmp_path / "s").exists()
    assert not (tmp_path / "s.search").exists()  # it failed before any generation: nothing to resume


# ------------------------------------------------------------------------- backends and their configs


def test_each_backend_is_registered_with_its_own_config():
    import dataclasses

    from sparsellm import registry
    from sparsellm.selfpruner import LLMConfig, LocalConfig, OpenAIConfig
    from sparsellm.config import flat_defaults

    assert registry.names("search_backend") == ["ga", "openai", "local", "uniform", "evopress"]
    configs = {n: registry.get("search_backend", n).config for n in registry.names("search_backend")}
    from sparsellm.selfpruner.evopress import EvoPressConfig

    assert configs == {"ga": registry.NoConfig, "openai": OpenAIConfig, "local": LocalConfig,
                       "uniform": registry.NoConfig, "evopress": EvoPressConfig}
    assert flat_defaults(OpenAIConfig) == {"llm_base_url": None, "llm_model": None, "llm_api_key_env": "OPENAI_API_KEY",
                                           "llm_temperature": 0.7, "llm_retries": 2}
    assert flat_defaults(LocalConfig) == {"llm_grammar": "on", "llm_model": None, "llm_temperature": 0.7,
                                          "llm_retries": 2}
    assert LocalConfig().model == "smollm2-135m"
    # the shared settings are declared once, in LLMConfig, which both LLM backends compose
    for cls in (OpenAIConfig, LocalConfig):
        assert {f.name for f in dataclasses.fields(cls)} & {"llm_model", "llm_temperature", "llm_retries"} == set()
        assert cls().llm == LLMConfig()
    ops = registry.get("search_backend", "ga").fn(registry.NoConfig(), describe="m")
    assert isinstance(ops, GAOperators)
    assert registry.get("search_backend", "uniform").fn(registry.NoConfig(), describe="m") is None


@pytest.mark.parametrize("backend,flags,message", [
    ("ga", {"llm_model": "x"}, "--llm_model applies only to --backend openai or local"),
    ("uniform", {"llm_temperature": 0.5}, "--llm_temperature applies only to --backend openai or local"),
    ("openai", {"llm_base_url": "u", "llm_model": "m", "llm_grammar": "off"},
     "--llm_grammar applies only to --backend local"),
    ("local", {"llm_base_url": None, "llm_api_key_env": "K", "llm_model": "m"},
     "--llm_api_key_env applies only to --backend openai"),
])
def test_a_setting_of_an_unchosen_backend_is_refused(backend, flags, message):
    from sparsellm.selfpruner.backends import backend_config

    with pytest.raises(UsageError) as e:
        backend_config(backend, flags)
    assert type(e.value) is UsageError and str(e.value) == message
    # at its default the same setting is no error (the command line passes every backend's flags)
    assert backend_config("ga", {"llm_retries": 2, "llm_grammar": "on", "llm_base_url": None})


def test_cli_unchosen_backend_setting_is_one_line_exit_2(tmp_path, saved_model_dir, capsys):
    from test_cli import _assert_one_line_error

    capsys.readouterr()
    code = _search(saved_model_dir, tmp_path / "s", "--backend", "ga", "--llm_retries", "0")
    err = capsys.readouterr().err
    _assert_one_line_error(code, err, allow_progress_bars=False)
    assert code == 2 and err.strip() == "sparsellm: error: --llm_retries applies only to --backend openai or local"
    assert not (tmp_path / "s").exists() and not (tmp_path / "s.search").exists()


def test_cli_search_help_shows_the_groups(capsys):
    assert main(["search", "--help"]) == 0
    text = capsys.readouterr().out
    titles = [line[:-1] for line in text.splitlines() if line.endswith(":") and not line.startswith(" ")]
    assert titles == ["options", "model", "calibration", "search", "backend", "fitness", "parallel fitness", "evaluation",
                      "output"]
    sections = dict(zip(titles, re.split(r"^\w[\w ]*:$", text, flags=re.M)[1:]))
    expected = {"calibration": ["--nsamples", "--seqlen", "--calib_dataset", "--seed"],
                "search": ["--target_rate", "--max_rate", "--population", "--generations", "--crossover",
                           "--mutation", "--metric", "--gqa"],
                "backend": ["--backend", "--llm_base_url", "--llm_model", "--llm_api_key_env", "--llm_temperature",
                            "--llm_retries", "--llm_grammar"],
                "fitness": ["--fitness_windows", "--fitness_seqlen", "--final_k"],
                "parallel fitness": ["--workers", "--ray_address"],
                "evaluation": ["--eval", "--eval_seqlen", "--max_windows", "--tasks", "--bench"],
                "output": ["--out", "--overwrite", "--resume", "--keep_state"]}
    for group, flags in expected.items():
        for flag in flags:
            assert re.search(rf"^  {flag}\b", sections[group], re.M), (group, flag)
            assert len(re.findall(rf"^  {flag}\b", text, re.M)) == 1, flag  # declared once, in one group
    assert "(default: 32)" in sections["calibration"] and "(default: 512)" in sections["calibration"]


@pytest.mark.parametrize("extra,backend", [([], "local"), (["--llm_base_url", "http://h/v1", "--llm_model", "m"],
                                                            "openai"), (["--llm_model", "m"], "local")])
def test_backend_llm_resolves_to_openai_with_a_url_else_local(extra, backend, tmp_path):
    from sparsellm.cli import build_parser
    from sparsellm.cli.search import search_run
    from sparsellm.runs.search import SearchRun
    from sparsellm.selfpruner import LocalConfig, OpenAIConfig

    args = build_parser().parse_args(["search", "--model", "m", "--backend", "llm", "--out", str(tmp_path / "o"), *extra])
    cfg = search_run(args)
    if extra == ["--llm_model", "m"]:  # local: --llm_model names the chat model, in any --model form
        assert cfg.backend_config.model == "m"
    assert cfg.backend == backend
    assert type(cfg.backend_config) is {"local": LocalConfig, "openai": OpenAIConfig}[backend]
    assert cfg.validate().to_dict()["backend"] == backend
    # the library resolves the alias the same way, from the config it is given
    from sparsellm.selfpruner import LLMConfig

    run = SearchRun(backend="llm", backend_config=OpenAIConfig("http://h/v1", llm=LLMConfig("m")))
    run.output.out = str(tmp_path / "o")
    assert run.validate().backend == "openai"
