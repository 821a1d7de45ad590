"""Self-Pruner's LLM backends made reliable (issue 22 parts 1-3): a tiny random chat model decodes
schema-valid replies for every operator only under the grammar; the openai backend asks for
response_format and falls back (logged, counted) when a server refuses it; a server answering non-JSON
is a counted fallback; bad input (no grammar library, no chat template) is a one-line UsageError; a
resumed search continues exactly with each backend."""

from __future__ import annotations

import json
import logging
import random
import re
from http.server import BaseHTTPRequestHandler

import jsonschema
import pytest
from conftest import loopback_server, make_model, reply, require

from sparsellm.errors import UsageError
from sparsellm.selfpruner import LLMOperators, SearchConfig, evolve, feasible, grammar, openai_chat
from sparsellm.selfpruner.evolution import Context
from sparsellm.selfpruner.llm import local_chat

TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _chat_model_dir(tmp_path, template=True):
    """A tiny random llama (vocab 320) with a byte-level BPE tokenizer trained on operator-like text, saved
    as a `--model` directory; with `template`, a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    rng = random.Random(0)
    texts = [json.dumps({"children": [[round(rng.random(), 3) for _ in range(4)]], "pairs": [[1, 2]]})
             + " rate vector layers population fitness perplexity constraint mean" for _ in range(50)]
    tk.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                      special_tokens=["</s>", "<|im_start|>", "<|im_end|>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="</s>", pad_token="</s>")
    if template:
        tok.chat_template = TEMPLATE
    d = tmp_path / ("chat" if template else "plain")
    make_model("llama", vocab_size=320, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
               max_position_embeddings=4096).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    return _chat_model_dir(tmp_path_factory.mktemp("m"))


def _pop(rng, n, L):
    return [{"rates": [rng.uniform(0, 0.5) for _ in range(L)], "fitness": rng.uniform(10, 20)} for _ in range(n)]


def _one_step_each(ops, seed, L=3):
    """Run every operator once on a tiny population; returns the operators' stats."""
    rng = random.Random(seed)
    ctx = Context(L, 0.3, 0.6, 1, rng, seed)
    pop = _pop(rng, 4, L)
    ops.init(3, ctx)
    ops.select(pop, 2, ctx)
    ops.crossover([(pop[0], pop[1]), (pop[2], pop[3])], ctx)
    ops.mutate([pop[0]], ctx)
    return ops.stats()


def test_rate_regex_is_exactly_the_bounded_numbers():
    for max_rate in (0.0, 0.05, 0.3, 0.8, 0.999, 0.5555):
        rx = grammar.rate_regex(max_rate)
        for k in range(1000):
            for text in (f"0.{k:03d}", f"0.{k:03d}".rstrip("0"), f"0.{k // 10:02d}", f"0.{k // 100}"):
                if text.endswith("."):
                    continue
                assert grammar.matches(rx, text) == (float(text) <= max_rate + 1e-12), (max_rate, text)
        assert grammar.matches(rx, "0") and not grammar.matches(rx, "1") and not grammar.matches(rx, "0.1234")
        assert not grammar.matches(rx, "-0.1") and not grammar.matches(rx, ".5")
    assert grammar.matches(grammar.index_regex(12), "11") and not grammar.matches(grammar.index_regex(12), "12")
    rx = grammar.vectors_regex("children", 2, 3, 0.6)
    longest = '{"children": [[0.599, 0.599, 0.599], [0.599, 0.599, 0.599]]}'
    assert grammar.matches(rx, longest) and len(longest) == grammar.max_chars("children", 2, 3, 5)
    assert not grammar.matches(rx, '{"children": [[0.1, 0.2], [0.1, 0.2, 0.3]]}')


@pytest.mark.parametrize("seed", range(4))
def test_constrained_decoding_gives_schema_valid_replies_for_every_operator(chat_dir, tmp_path, seed):
    require("llguidance")
    log = tmp_path / "log.jsonl"
    ops = LLMOperators(local_chat(str(chat_dir), temperature=1.0), "a tiny model", log, retries=0)
    st = _one_step_each(ops, seed)
    assert st["calls"] == 4 and st["invalid_replies"] == 0 and st["steps"] == {"first_try": 4, "retried": 0,
                                                                               "fell_back": 0}
    assert st["clamped"] == 0 and st["backend"] == {"constrained": 4, "free": 0}
    recs = [json.loads(line) for line in log.read_text().splitlines()]
    for r in recs:  # the reply itself is the JSON object, rates within [0, 0.6], indices within the population
        obj = json.loads(r["reply"])
        if r["op"] == "select":
            assert len(obj["pairs"]) == 2 and all(0 <= i < 4 for p in obj["pairs"] for i in p)
        else:
            vecs = next(iter(obj.values()))
            assert all(len(v) == 3 and all(0 <= x <= 0.6 for x in v) for v in vecs)


def test_without_the_grammar_the_tiny_model_fails(chat_dir):
    require("llguidance")  # the same model, free sampling: its replies never validate (so the test above can fail)
    ops = LLMOperators(local_chat(str(chat_dir), temperature=1.0, constrained=False), "a tiny model", None, retries=0)
    st = _one_step_each(ops, 0)
    assert st["steps"]["fell_back"] == 4 and st["backend"] == {"constrained": 0, "free": 4}


def test_missing_grammar_library_and_missing_chat_template_are_one_line_errors(tmp_path, monkeypatch):
    import sys

    plain = _chat_model_dir(tmp_path, template=False)
    with pytest.raises(UsageError, match=r"^\S+ has no chat template: use a chat \(instruct\) model") as e:
        local_chat(str(plain), constrained=False)
    assert "\n" not in str(e.value)
    monkeypatch.setitem(sys.modules, "llguidance", None)  # import fails
    with pytest.raises(UsageError) as e:
        local_chat(str(plain))
    assert "needs llguidance" in str(e.value) and "pip install 'sparsellm[selfpruner]'" in str(e.value)
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------------------- openai backend


def _answer(body):
    """A valid reply for the request in `body` (the prompt says what is asked), at its seed."""
    text, rng = body["messages"][-1]["content"], random.Random(body.get("seed", 0))
    L = int(re.search(r"exactly (\d+) numbers", text).group(1))
    if m := re.search(r"Propose (\d+)", text):
        return {"population": [[round(rng.uniform(0, 0.6), 3) for _ in range(L)] for _ in range(int(m.group(1)))]}
    if m := re.search(r"Select (\d+) pairs", text):
        n_pop = len(re.findall(r"^\d+\. fitness", text, re.M))
        return {"pairs": [[rng.randrange(n_pop), rng.randrange(n_pop)] for _ in range(int(m.group(1)))]}
    n = int(re.search(r"\((\d+) children", text).group(1))
    return {"children": [[round(rng.uniform(0, 0.6), 3) for _ in range(L)] for _ in range(n)]}


class _Server(BaseHTTPRequestHandler):
    """An OpenAI-compatible stub. mode: "schema" (enforces response_format json_schema: valid JSON, else
    prose), "reject" (HTTP 500 to any response_format or grammar, like llama-cpp-python's server to
    json_schema; prose otherwise), "gbnf" (refuses json_schema, decodes under a `grammar` field: valid
    JSON), "nonjson" (a body that is not JSON)."""

    mode = "schema"
    requests: list = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Server.requests.append(body)
        rf = body.get("response_format")
        if self.mode == "nonjson":
            return reply(self, 200, b"<html>not json</html>", "text/html")
        if (self.mode == "reject" and (rf is not None or "grammar" in body)) or (self.mode == "gbnf" and rf is not None):
            return reply(self, 500, json.dumps({"error": {"message": "Input should be 'text' or 'json_object'"}}).encode())
        if "grammar" in body:
            assert body["grammar"].startswith("root ::= ")
            content = json.dumps(_answer(body), separators=(", ", ": "))
        elif rf is not None:
            obj = _answer(body)
            jsonschema.validate(obj, rf["json_schema"]["schema"])  # what the request asked for
            content = json.dumps(obj)
        else:
            content = "Sure! Here are good rates: 0.1, 0.2 ..."  # a small model without constraints
        reply(self, 200, json.dumps({"id": "c", "object": "chat.completion", "created": 0, "model": body["model"],
                                    "choices": [{"index": 0, "finish_reason": "stop",
                                                 "message": {"role": "assistant", "content": content}}]}).encode())

    def log_message(self, *a):
        pass


@pytest.fixture
def server():
    _Server.requests, _Server.mode = [], "schema"
    with loopback_server(_Server) as srv:
        yield f"http://127.0.0.1:{srv.server_address[1]}/v1"


def _quadratic(rates):
    return sum((r - o) ** 2 for r, o in zip(rates, [0.5, 0.1, 0.3, 0.3]))


CFG = SearchConfig(target_rate=0.3, max_rate=0.6, population=4, generations=2, crossover=2, mutation=2, seed=1)


def test_openai_asks_for_the_json_schema(server):
    ops = LLMOperators(openai_chat(server, "m"), "m", None, retries=0)
    evolve(_quadratic, 4, CFG, ops)
    st = ops.stats()
    assert st["steps"] == {"first_try": 7, "retried": 0, "fell_back": 0} and st["invalid_replies"] == 0
    assert st["backend"] == {"requests": {"json_schema": 7}, "refused": {}}
    rf = _Server.requests[0]["response_format"]
    assert rf["type"] == "json_schema" and rf["json_schema"]["name"] == "population"
    vec = rf["json_schema"]["schema"]["properties"]["population"]
    assert vec["minItems"] == vec["maxItems"] == 4 and vec["items"]["items"] == {"type": "number", "minimum": 0,
                                                                                   "maximum": 0.6}


def test_openai_falls_back_to_prompt_only_when_response_format_is_refused(server, caplog):
    _Server.mode = "reject"
    ops = LLMOperators(openai_chat(server, "m"), "m", None, retries=1)
    with caplog.at_level(logging.INFO, logger="sparsellm"):
        state = evolve(_quadratic, 4, CFG, ops)
    st = ops.stats()
    assert st["backend"]["refused"] == {"json_schema": 1, "grammar": 1, "json_object": 1}  # asked once, not again
    assert st["backend"]["requests"] == {"prompt": 14}
    assert st["steps"] == {"first_try": 0, "retried": 0, "fell_back": 7} and st["calls"] == 14
    types = ["grammar" if "grammar" in r else r.get("response_format", {}).get("type") for r in _Server.requests]
    assert list(dict.fromkeys(types)) == ["json_schema", "grammar", "json_object", None]  # the client retries a 500
    assert types[-14:] == [None] * 14
    msgs = [r.getMessage() for r in caplog.records]
    assert sum("refused response_format json_schema" in m for m in msgs) == 1
    assert sum("prompt-only parsing" in m for m in msgs) == 1  # which was used: logged once
    assert all(feasible(p["rates"], 0.3, 0.6) for p in state["population"])


def test_openai_uses_a_gbnf_grammar_where_json_schema_is_refused(server):
    _Server.mode = "gbnf"  # llama-cpp-python's server: json_schema refused, `grammar` honoured
    ops = LLMOperators(openai_chat(server, "m"), "m", None, retries=0)
    evolve(_quadratic, 4, CFG, ops)
    st = ops.stats()
    assert st["backend"] == {"requests": {"grammar": 7}, "refused": {"json_schema": 1}}
    assert st["steps"] == {"first_try": 7, "retried": 0, "fell_back": 0}
    g = _Server.requests[-1]["grammar"]
    assert '"p" "a" "i" "r" "s"' in g or '"c" "h" "i" "l" "d"' in g


def test_a_server_answering_non_json_is_a_counted_fallback(server):
    _Server.mode = "nonjson"
    ops = LLMOperators(openai_chat(server, "m"), "m", None, retries=0)
    state = evolve(_quadratic, 4, CFG, ops)
    assert ops.stats()["steps"]["fell_back"] == 7 and ops.stats()["invalid_replies"] == 7
    assert len(state["population"]) == 4


@pytest.mark.parametrize("backend", ["openai", "openai-gbnf", "openai-refused", "local"])
def test_resume_continues_exactly(tmp_path, server, chat_dir, backend):
    if backend == "local":
        require("llguidance")
    _Server.mode = {"openai-refused": "reject", "openai-gbnf": "gbnf"}.get(backend, "schema")
    cfg = SearchConfig(**{**vars(CFG), "generations": 3})

    def ops():
        chat = local_chat(str(chat_dir), temperature=1.0) if backend == "local" else openai_chat(server, "m")
        return LLMOperators(chat, "m", None, 1)

    full = evolve(_quadratic, 4, cfg, ops(), tmp_path / "a.json")
    n = [0]

    def dying(rates):
        n[0] += 1
        if n[0] == 6:
            raise KeyboardInterrupt
        return _quadratic(rates)

    with pytest.raises(KeyboardInterrupt):
        evolve(dying, 4, cfg, ops(), tmp_path / "b.json")
    assert 0 <= json.loads((tmp_path / "b.json").read_text())["generation"] < 3
    resumed = evolve(_quadratic, 4, cfg, ops(), tmp_path / "b.json", resume=True)
    assert resumed["population"] == full["population"] and resumed["operators"] == full["operators"]
    assert [h["best"] for h in resumed["history"]] == [h["best"] for h in full["history"]]



def test_prompt_and_reply_budget_scale_with_the_blocks_and_fit_the_context():
    seen = []

    def chat(messages, seed, max_tokens, prefix="", reply=None):
        seen.append((messages[-1]["content"], max_tokens, reply))
        return "no"

    chat.context, chat.count_tokens = 2000, lambda messages: sum(len(m["content"]) for m in messages)
    ops = LLMOperators(chat, "m", None, retries=0)
    rng = random.Random(0)
    for L in (4, 16):
        ops.mutate([_pop(rng, 1, L)[0]], Context(L, 0.3, 0.6, 1, rng, 0))
    (_, b4, r4), (_, b16, r16) = seen[-2:]
    assert r16.chars - r4.chars == 12 * 7 and b16 - b4 == 12 * 7  # 7 characters per more rate: "0.ddd, "
    pop = _pop(rng, 30, 16)
    ops.select(pop, 2, Context(16, 0.3, 0.6, 1, rng, 0))
    text, budget, reply = seen[-1]
    rows = len(re.findall(r"^\d+\. fitness", text, re.M))
    assert 2 <= rows < 30 and len(text) + budget <= 2000  # the best rows that fit
    assert grammar.matches(reply.regex, f'{{"pairs": [[0, {rows - 1}], [1, 1]]}}')  # only the rows shown
    assert not grammar.matches(reply.regex, f'{{"pairs": [[0, {rows}], [1, 1]]}}')
    assert "0. fitness" in text and "fitness=" in text
