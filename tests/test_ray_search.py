"""Self-Pruner's fitness on a Ray cluster (`sparsellm.selfpruner.parallel`, issue 22 part 6): a local cluster
with 2 workers gives the serial search's state bit for bit (population, fitness values, evaluations, history),
its fitness values match an independent perplexity computation, a search interrupted with one worker count
continues exactly with another, `sparsellm search --workers 2` writes the serial run's result, and bad input
(--workers 0, an unreachable --ray_address, Ray not installed) is a one-line error. One local cluster (2 CPUs)
serves the whole file: Ray's start-up costs seconds."""

from __future__ import annotations

import copy
import json
import math
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from conftest import make_model, require
from sparsellm.cli import main
from sparsellm.errors import UsageError
from sparsellm.selfpruner import GAOperators, SearchConfig, evolve

require("ray")

from sparsellm.selfpruner.driver import fitness_of  # noqa: E402
from sparsellm.selfpruner.parallel import Cluster  # noqa: E402

SEQLEN, WINDOWS, GQA = 32, 2, "query"
CFG = SearchConfig(target_rate=0.3, max_rate=0.6, population=6, generations=3, crossover=3, mutation=3, seed=5)


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster with 2 workers for the whole file (started once, shut down at the end)."""
    c = Cluster(workers=2)
    assert c.owned and c.workers == 2 and c.threads >= 1
    yield c
    c.close()


@pytest.fixture(scope="module")
def setup():
    """A tiny random llama (4 blocks), its wanda-sp importance and the fitness ids (2 C4 windows of 32 tokens)."""
    from conftest import _build_tokenizer
    from sparsellm.data import calibration_windows
    from sparsellm.evaluate.perplexity import eval_tokens
    from sparsellm.structured import importance

    tok = _build_tokenizer()
    model = make_model("llama", num_hidden_layers=4)
    imp = importance(model, calibration_windows(tok, "c4", 4, SEQLEN, 0), "wanda-sp", progress=False)
    ids = eval_tokens(tok, "c4", SEQLEN)[:, :WINDOWS * SEQLEN]
    return model, tok, imp, ids


def _serial(model, imp, ids):
    return lambda rates: fitness_of(model, imp, rates, ids, SEQLEN, WINDOWS, GQA)


def _same_state(a: dict, b: dict) -> None:
    assert a["population"] == b["population"]  # rates, keys, origins and fitness values, exactly
    assert a["cache"] == b["cache"] and a["evals"] == b["evals"] and a["generation"] == b["generation"]
    assert [{k: h[k] for k in ("generation", "best", "mean", "evals", "children")} for h in a["history"]] == \
           [{k: h[k] for k in ("generation", "best", "mean", "evals", "children")} for h in b["history"]]
    assert a["rng"] == b["rng"] and a["operators"] == b["operators"]


def _no_seconds(history: list) -> list:
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


def _by_hand(model, imp, rates, ids) -> float:
    """The perplexity of the shrunk model, written out independently of `perplexity`."""
    from sparsellm.structured import prune_structured

    m = copy.deepcopy(model)
    prune_structured(m, rates, imp, gqa=GQA)
    nll = 0.0
    with torch.no_grad():
        for w in range(WINDOWS):
            x = ids[:, w * SEQLEN:(w + 1) * SEQLEN]
            nll += F.cross_entropy(m(x).logits[0, :-1].float(), x[0, 1:], reduction="sum").item()
    return math.exp(nll / (WINDOWS * (SEQLEN - 1)))


@pytest.fixture(scope="module")
def many(cluster, setup):
    """fitness_many on the cluster's 2 workers, loaded once with `setup`'s model, importance and ids."""
    model, _, imp, ids = setup
    yield cluster.fitness(model, imp, ids, SEQLEN, WINDOWS, GQA)
    cluster.release()


def test_worker_fitness_is_an_independent_perplexity_in_order(many, setup):
    model, _, imp, ids = setup
    vectors = [[0.3, 0.3, 0.3, 0.3], [0.0, 0.6, 0.0, 0.6], [0.6, 0.0, 0.6, 0.0], [0.1, 0.2, 0.4, 0.5],
               [0.5, 0.4, 0.2, 0.1]]
    got = many(vectors)
    want = [_by_hand(model, imp, v, ids) for v in vectors]
    assert got == pytest.approx(want, rel=1e-5)
    assert got == [_serial(model, imp, ids)(v) for v in vectors]  # and bit for bit the serial function's
    assert len(set(got)) == len(got)  # distinct values: an order mix-up cannot pass


def test_two_workers_give_the_serial_search_and_resume_across_worker_counts(many, setup, tmp_path):
    model, _, imp, ids = setup
    f = _serial(model, imp, ids)
    full = evolve(f, 4, CFG, GAOperators(), tmp_path / "full.json")
    assert full["evals"] > CFG.population  # the generations proposed new candidates
    _same_state(evolve(f, 4, CFG, GAOperators(), fitness_many=many), full)

    class Stop(Exception):
        pass

    def dying(score_many, at):
        calls = [0]

        def g(vectors):
            calls[0] += 1
            if calls[0] == at:
                raise Stop
            return score_many(vectors)
        return g

    # serial, stopped in generation 2 -> resumed on 2 workers
    with pytest.raises(Stop):
        evolve(f, 4, CFG, GAOperators(), tmp_path / "a.json", fitness_many=dying(lambda vs: [f(v) for v in vs], 3))
    assert json.loads((tmp_path / "a.json").read_text())["generation"] == 1
    _same_state(evolve(f, 4, CFG, GAOperators(), tmp_path / "a.json", resume=True, fitness_many=many), full)
    # 2 workers, stopped in generation 1 -> resumed serially
    with pytest.raises(Stop):
        evolve(f, 4, CFG, GAOperators(), tmp_path / "b.json", fitness_many=dying(many, 2))
    assert json.loads((tmp_path / "b.json").read_text())["generation"] == 0
    _same_state(evolve(f, 4, CFG, GAOperators(), tmp_path / "b.json", resume=True), full)


# ------------------------------------------------------------------------------------------------------ CLI


def _search(model_dir, out, *extra):
    return main(["--quiet", "search", "--model", str(model_dir), "--target_rate", "0.3", "--max_rate", "0.6",
                 "--population", "4", "--generations", "2", "--crossover", "2", "--mutation", "2",
                 "--nsamples", "2", "--seqlen", "32", "--fitness_windows", "2", "--fitness_seqlen", "32",
                 "--final_k", "2", "--eval", "wikitext2", "--eval_seqlen", "32", "--max_windows", "2", "--out", str(out),
                 *extra])


def test_cli_search_workers_writes_the_serial_result(cluster, tmp_path, saved_model_dir):
    """run_search on the open Ray session (a Cluster that did not start Ray uses it and leaves it open);
    the `many` fixture's workers are released first: they hold the cluster's 2 CPUs."""
    cluster.release()
    assert _search(saved_model_dir, tmp_path / "serial") == 0
    assert _search(saved_model_dir, tmp_path / "ray", "--workers", "2") == 0
    serial, ray = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("serial", "ray"))
    _same_state(*(json.loads((tmp_path / d / "search_state.json").read_text()) for d in ("serial", "ray")))
    for k in ("best_rates", "best_fitness", "evals", "final"):
        assert ray["search"][k] == serial["search"][k], k
    assert _no_seconds(ray["search"]["history"]) == _no_seconds(serial["search"]["history"])
    assert ray["config"]["workers"] == 2 and ray["ray"]["workers"] == 2 and ray["ray"]["threads"] == 1
    assert "ray" not in serial and serial["config"]["workers"] is None
    assert cluster.ray.is_initialized()


@pytest.mark.parametrize("extra,match", [
    (["--workers", "0"], "--workers must be >= 1, got 0"),
    (["--workers", "-2"], "--workers must be >= 1"),
    (["--ray_address", "127.0.0.1:9"], "--ray_address 127.0.0.1:9: no Ray cluster answers"),
    (["--ray_address", "nonsense"], "--ray_address must be host:port"),
    (["--workers", "2", "--backend", "uniform"], "--backend uniform does not search"),
])
def test_cli_search_parallel_bad_input(tmp_path, saved_model_dir, capsys, extra, match):
    t0 = time.perf_counter()
    assert _search(saved_model_dir, tmp_path / "s", *extra) == 2
    err = capsys.readouterr().err
    assert match in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "s").exists() and not (tmp_path / "s.search").exists()
    assert time.perf_counter() - t0 < 15  # an unreachable address fails fast (no minutes of ray.init retries)


def test_ray_missing_names_the_install_command(tmp_path, saved_model_dir, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(UsageError, match=r"pip install 'sparsellm\[ray\]'"):
        Cluster(workers=2)
    assert _search(saved_model_dir, tmp_path / "s", "--workers", "2") == 2
    assert "pip install 'sparsellm[ray]'" in capsys.readouterr().err and not (tmp_path / "s").exists()


def test_serial_search_does_not_import_ray(tmp_path):
    import subprocess

    code = ("import sys, sparsellm.cli, sparsellm.runs.search, sparsellm.selfpruner.driver; "
            "assert 'ray' not in sys.modules, 'ray imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
