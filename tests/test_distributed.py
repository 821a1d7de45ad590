"""Pruning with several processes (sparsellm/distributed.py): two CPU processes (gloo) prune the same tiny
model, each running half of the calibration windows; both must hold the same weights and report, equal to a
single-process run on all windows up to the order of float sums."""

from __future__ import annotations

import os
import socket
import time

import pytest
import torch

from conftest import make_model
from sparsellm import distributed
from sparsellm.engine import dense_walk, prune_blocks
from sparsellm.errors import UsageError
from sparsellm.prune import LayerStats, parse_pattern

SEQLEN = 16
# name: (family, method, sparsity type, windows, diag_nsamples). Over 2 processes: 4 windows split 2 + 2, 5
# split 3 + 2; diag 3 of 4 puts 2 diagnostic windows on rank 0 and 1 on rank 1, diag 1 none on rank 1.
CASES = {
    "llama-wanda-50": ("llama", "wanda", "unstructured", 4, 3),
    "llama-wanda-2:4": ("llama", "wanda", "2:4", 4, 4),
    "llama-sparsegpt-50": ("llama", "sparsegpt", "unstructured", 4, 1),
    "llama-sparsegpt-2:4": ("llama", "sparsegpt", "2:4", 4, 2),
    "opt-sparsegpt-50-odd": ("opt", "sparsegpt", "unstructured", 5, 3),
    "opt-wanda-2:4-odd": ("opt", "wanda", "2:4", 5, 5),
    "llama-magnitude-50": ("llama", "magnitude", "unstructured", 4, 2),  # not sharded: no statistics
    "llama-sparsegpt-50-single": ("llama", "sparsegpt", "unstructured", 5, 3, "single"),  # the single-pass engine
    "opt-wanda-2:4-single": ("opt", "wanda", "2:4", 4, 1, "single"),
}


def _ids(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 128, (n, SEQLEN), generator=g)


def _run_case(family, method, sparsity_type, n, diag, engine="block"):
    model = make_model(family, seed=0)
    nm = parse_pattern(sparsity_type)
    L = model.config.num_hidden_layers
    held = []  # the windows this process ran: (pruned stream, dense diagnostic stream) after each block
    report = prune_blocks(model, _ids(n), method, [0.5] * L, nm, progress=False, diag_nsamples=diag, engine=engine,
                          on_block_end=lambda i, X, D, res: held.append((X.shape[0], D.shape[0])))
    weights = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("proj.weight") or "fc" in k}
    return {"weights": weights, "held": held,
            "report": [{k: r[k] for k in ("rel_error", "cum_error", "measured")} for r in report]}


def _walks():
    """The other statistics walks: OWL's rates (norms) and structured pruning's moments (fp64, with total)."""
    from sparsellm.allocate.owl import OWLConfig, rates_for_model
    from sparsellm.structured.importance import collect_stats

    model = make_model("llama", seed=0)
    rates, info = rates_for_model(model, _ids(4), 0.5, OWLConfig(owl_m=3.0), progress=False)
    moments = [{n: (s.ntokens, s.sq_norm, s.total) for n, s in b.items()} for b in collect_stats(model, _ids(4),
                                                                                                progress=False)]
    return {"owl_rates": rates, "outlier_ratio": info["outlier_ratio"], "moments": moments}


def _collectives(rank):
    """all_reduce_stats over aliased stats, all_reduce_sums, and the refusals (every rank raises)."""
    a = LayerStats(ntokens=rank + 1, sq_norm=torch.full((3,), rank + 1.0), hessian=torch.full((3, 3), rank + 1.0))
    b = LayerStats(ntokens=10 * (rank + 1), sq_norm=torch.full((2,), rank + 1.0, dtype=torch.float64),
                   total=torch.full((2,), 2.0 * rank, dtype=torch.float64))
    stats = distributed.all_reduce_stats({"q": a, "k": a, "v": a, "down": b})
    out = {"stats": stats, "sums": distributed.all_reduce_sums(1.5, rank, 7)}
    walk = lambda ids: next(dense_walk(make_model("llama"), ids, need="norm", progress=False))  # noqa: E731
    for name, fn in (("different windows", lambda: prune_blocks(make_model("llama"), _ids(4, seed=rank), "wanda",
                                                                [0.5] * 2, progress=False)),
                     ("different windows, walk", lambda: walk(_ids(4, seed=rank))),
                     ("one window", lambda: prune_blocks(make_model("llama"), _ids(1), "wanda", [0.5] * 2,
                                                         progress=False))):
        try:
            fn()
            out[name] = None
        except UsageError as e:
            out[name] = str(e)
    return out


def _worker(rank, world, port, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    device = distributed.init_from_env("cpu")
    try:
        out = {"world": distributed.world(), "main": distributed.is_main(), "device": str(device),
               "backend": torch.distributed.get_backend()}
        out["cases"] = {name: _run_case(*case) for name, case in CASES.items()}
        out["walks"] = _walks()
        out["collectives"] = _collectives(rank)
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The two processes take ~15 s of wall time on an idle 2-core machine (each imports torch and transformers
# and runs every case; twice that under load): the tests that read their results are marked slow.
slow = pytest.mark.slow


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Both processes' results (a deadlock fails after 300 s instead of hanging the suite)."""
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("dist")
    ctx = mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=False)
    deadline = time.monotonic() + 300
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the two processes did not finish within 300 s")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.fixture(scope="module")
def single():
    """The same cases in this process, without a process group: all windows, plain sums."""
    assert distributed.world() == (0, 1)
    return {name: _run_case(*case) for name, case in CASES.items()}, _walks()


@slow
def test_processes_join_one_group(ranks):
    assert [r["world"] for r in ranks] == [(0, 2), (1, 2)]
    assert [r["main"] for r in ranks] == [True, False]
    assert all(r["device"] == "cpu" and r["backend"] == "gloo" for r in ranks)


@slow
@pytest.mark.parametrize("case", CASES)
def test_ranks_prune_identical_weights_equal_to_one_process(ranks, single, case):
    one, two = ranks[0]["cases"][case], ranks[1]["cases"][case]
    ref = single[0][case]
    _, method, _, n, diag = CASES[case][:5]
    assert one["weights"].keys() == ref["weights"].keys() and len(ref["weights"]) >= 7
    for name, w in ref["weights"].items():
        # every rank prunes from the same all-reduced statistics: bit-identical weights
        assert torch.equal(one["weights"][name], two["weights"][name]), name
        # one process sums the statistics in another order than two: Wanda's masks (no weight update)
        # are the same (a flip needs two scores within ~1e-7 relative of each other: none in these models)
        assert torch.equal(one["weights"][name] == 0, w == 0), name
        if method != "sparsegpt":
            assert torch.equal(one["weights"][name], w), name
        else:
            # SparseGPT's updates go through the inverse Cholesky factor of H + λI: the ~1e-7 relative
            # change of H from the summation order is amplified by its condition number (≲1e3 here with 1%
            # damping); the largest difference measured is ~2e-6 against weights of ~0.02-0.1
            torch.testing.assert_close(one["weights"][name], w, rtol=1e-4, atol=1e-5, msg=name)
    if method == "magnitude":  # every process runs the diagnostic windows (no statistics to share)
        assert one["held"] == two["held"] == ref["held"] == [(diag, diag)] * 2
    else:  # 4 windows: 2 + 2; 5: 3 + 2; the diagnostic windows are the first `diag` of all
        shares = [len(range(n)[distributed.shard_windows(n, r, 2)]) for r in range(2)]
        diags = [min(diag, shares[0]), max(diag - shares[0], 0)]
        assert [one["held"], two["held"]] == [[(shares[r], diags[r])] * 2 for r in range(2)]
        assert ref["held"] == [(n, diag)] * 2
    assert one["report"] == two["report"]  # the all-reduced error sums: the same numbers on both ranks
    for got, want in zip(one["report"], ref["report"]):
        assert got["measured"] == want["measured"]
        for key in ("rel_error", "cum_error"):
            if want[key] is None:
                assert got[key] is None
            else:
                assert got[key] == pytest.approx(want[key], rel=1e-4), key


@slow
def test_owl_and_structured_walks_are_summed(ranks, single):
    ref = single[1]
    for r in ranks:
        walks = r["walks"]
        assert walks["owl_rates"] == pytest.approx(ref["owl_rates"], rel=1e-5)
        assert walks["outlier_ratio"] == pytest.approx(ref["outlier_ratio"], rel=1e-5)
        for got, want in zip(walks["moments"], ref["moments"]):
            for name in want:
                assert got[name][0] == want[name][0] == 4 * SEQLEN
                torch.testing.assert_close(got[name][1], want[name][1], rtol=1e-9, atol=0)
                torch.testing.assert_close(got[name][2], want[name][2], rtol=1e-9, atol=1e-12)


@slow
def test_all_reduce_stats_reduces_an_aliased_entry_once(ranks):
    for r in ranks:
        c = r["collectives"]
        s = c["stats"]
        assert s["q"] is s["k"] is s["v"]
        assert s["q"].ntokens == 1 + 2 and s["down"].ntokens == 10 + 20
        assert torch.equal(s["q"].sq_norm, torch.full((3,), 3.0))  # twice reduced would be 6
        assert torch.equal(s["q"].hessian, torch.full((3, 3), 3.0))
        assert s["down"].sq_norm.dtype == s["down"].total.dtype == torch.float64
        assert torch.equal(s["down"].sq_norm, torch.full((2,), 3.0, dtype=torch.float64))
        assert torch.equal(s["down"].total, torch.full((2,), 2.0, dtype=torch.float64))
        assert c["sums"] == (3.0, 1.0, 14.0)


@slow
def test_every_rank_refuses_what_cannot_be_sharded(ranks):
    for r in ranks:
        c = r["collectives"]
        assert "different calibration windows" in c["different windows"]
        assert "different calibration windows" in c["different windows, walk"]
        assert "1 calibration windows for 2 processes" in c["one window"]


# ------------------------------------------------------------------ without a process group


def test_shard_windows_is_contiguous_and_balanced():
    for size in range(1, 7):
        for n in range(size, 23):
            parts = [distributed.shard_windows(n, r, size) for r in range(size)]
            covered = [i for p in parts for i in range(n)[p]]
            assert covered == list(range(n))
            lengths = [len(range(n)[p]) for p in parts]
            assert max(lengths) - min(lengths) <= 1 and min(lengths) >= 1
        with pytest.raises(UsageError, match="every process needs at least one"):
            distributed.shard_windows(size - 1, 0, size)
    assert distributed.shard_windows(5, 0, 2) == slice(0, 3) and distributed.shard_windows(5, 1, 2) == slice(3, 5)
    assert distributed.shard_windows(7) == slice(0, 7)  # no process group: everything
    assert [distributed.local_prefix(5, 3, distributed.shard_windows(5, r, 2)) for r in range(2)] == [3, 0]
    assert [distributed.local_prefix(4, 3, distributed.shard_windows(4, r, 2)) for r in range(2)] == [2, 1]


def test_one_process_makes_no_collective_call(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a torch.distributed collective without a process group")

    for name in ("all_reduce", "init_process_group", "get_backend"):
        monkeypatch.setattr(torch.distributed, name, refuse)
    for var in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert distributed.world() == (0, 1) and distributed.is_main()
    assert distributed.init_from_env("cpu") == torch.device("cpu")
    s = LayerStats(ntokens=2, sq_norm=torch.ones(3))
    assert distributed.all_reduce_stats({"a": s})["a"].ntokens == 2 and distributed.all_reduce_sums(1.0, 2) == (1.0, 2)
    distributed.check_same_windows(_ids(3))
    report = prune_blocks(make_model("llama"), _ids(3), "sparsegpt", [0.5] * 2, progress=False, diag_nsamples=2)
    assert all(r["cum_error"] is not None for r in report)


def test_init_from_env_refuses_a_partial_launch_and_a_foreign_gpu(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_PORT", "29500")
    with pytest.raises(UsageError, match="MASTER_ADDR not set"):
        distributed.init_from_env("cpu")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    with pytest.raises(UsageError, match="each uses cuda:LOCAL_RANK"):
        distributed.init_from_env("cuda:1")
    assert distributed.world() == (0, 1)


@pytest.mark.slow
@pytest.mark.parametrize("load", ["memory", "lazy"])
def test_cli_torchrun_prune_equals_the_single_process_run(tmp_path, tokenizer, calib_txt, load):
    """`torchrun --nproc_per_node 2 -m sparsellm prune` (gloo on this CPU): one output, written by the main
    process, equal to a single-process run's up to float summation order."""
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM

    d = tmp_path / "model"
    make_model("llama", seed=4, num_hidden_layers=3).save_pretrained(d, max_shard_size="30KB")
    tokenizer.save_pretrained(d)
    common = ["prune", "--model", str(d), "--load", load, "--prune_method", "sparsegpt", "--nsamples", "4",
              "--seqlen", "16", "--calib_dataset", str(calib_txt), "--eval", "none", "--device", "cpu", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "sparsellm", *common, "--out", str(tmp_path / "one")], env=env,
                         capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(_free_port()), "-m", "sparsellm", *common, "--out", str(tmp_path / "two")], env=env,
                         capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-2000:]
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "one").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "two").state_dict()
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k] == 0, b[k] == 0), k  # the same masks
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt", "model", "one", "two"]
    import json

    assert json.loads((tmp_path / "two" / "report.json").read_text())["processes"] == 2
