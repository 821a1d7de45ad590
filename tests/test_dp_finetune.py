"""Data-parallel fine-tuning (sparsellm/adapt/parallel.py): two CPU processes (gloo) fine-tune the same tiny
model on the same global micro-batches, each running its share of every micro-batch's rows (and, for the
re-prune, of the calibration windows). Both must hold the same weights, equal to a single-process run up
to the order of float sums, and every merged model keeps exactly its sparse mask."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

from conftest import _build_tokenizer, make_model, sentences
from sparsellm import distributed
from sparsellm.adapt import FinetuneConfig
from sparsellm.adapt.parallel import row_share

# name: (method, prune method, settings); batch 3 of 7 or 10 examples split 2 + 1 and its last micro-batch of
# 1 leaves rank 1 without rows; batch 1 never gives rank 1 a row (its gradients are zeros, summed)
CASES = {
    "losa-wanda": ("losa", "wanda", dict(ft_batch_size=3, grad_accum=2)),
    "masked-lora-sparsegpt": ("masked-lora", "sparsegpt", dict(ft_batch_size=1, grad_accum=3)),
    "lora-wanda": ("lora", "wanda", dict(ft_batch_size=2, grad_accum=1)),
}
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _cfg(corpus, method, prune_method, **kw):
    base = dict(method=method, sparsity_ratio=0.5, prune_method=prune_method, nsamples=4, seqlen=32,
                calib_dataset=str(corpus), lora_r=4, lora_alpha=8.0, lora_dropout=0.0, lr=2e-2,
                warmup_ratio=0.0, max_grad_norm=1.0, step_eval_windows=0)
    if method == "losa":
        base.update(steps=2, rmi_nsamples=4, rank_nsamples=3, r_max=8, rank_start=2, rank_end=6)
    return FinetuneConfig.from_flat(**{**base, **kw})


def _examples(n=10, seed=3):
    """Instruction-like examples of different lengths: the prompt's labels are -100 (token counts differ)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        T = int(torch.randint(6, 20, (1,), generator=g))
        x = torch.randint(2, 128, (T,), generator=g)
        y = x.clone()
        y[:int(torch.randint(1, T - 2, (1,), generator=g))] = -100
        out.append((x, y))
    return out


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _train_case():
    """`train` itself: 7 examples, batches of 3 (2 + 1 rows; the last one row: rank 1 has none), 2 epochs."""
    from sparsellm.adapt.masked_lora import add_masked_lora, lora_layers
    from sparsellm.adapt.train import train
    from sparsellm.engine import prune_blocks

    model = make_model("llama", seed=0)
    prune_blocks(model, torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1)), "wanda",
                 [0.5] * 2, progress=False)
    torch.manual_seed(0)
    add_masked_lora(model, r=4, alpha=8, dropout=0.0)
    res = train(model, _examples(7), lr=2e-2, batch_size=3, grad_accum=2, epochs=2, warmup_ratio=0.0,
                max_grad_norm=1.0, progress=False)
    adapters = {f"{i}.{n}": t.detach().clone() for i, m in enumerate(lora_layers(model))
                for n, t in (("A", m.lora_A), ("B", m.lora_B))}
    return {"adapters": adapters, "losses": res["losses"], "tokens": res["tokens"], "steps": res["steps"]}


def _driver_case(corpus, method, prune_method, settings, ckpt=None):
    from sparsellm.adapt import finetune

    model = make_model("llama", seed=0)
    rep = finetune(model, _build_tokenizer(), _cfg(corpus, method, prune_method, **settings), _examples(),
                   checkpoint_dir=ckpt, model_id="m", progress=False)
    steps = [{k: s[k] for k in ("errors", "ranks", "measured") if k in s} | {"losses": s["train"]["losses"]}
             for s in rep["steps"] if "train" in s]
    return {"state": _state(model), "steps": steps, "measured": rep["measured"]["sparsity"],
            "train": (rep.get("train") or {}).get("losses")}


def _resumed_losa(corpus, ckpt):
    """LoSA interrupted in its second step's training, then resumed from the checkpoint the main process wrote."""
    from sparsellm.adapt import driver, finetune

    real, calls = driver.train, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    settings = CASES["losa-wanda"][2]
    driver.train = interrupted
    try:
        finetune(make_model("llama", seed=0), _build_tokenizer(), _cfg(corpus, "losa", "wanda", **settings),
                 _examples(), checkpoint_dir=ckpt, model_id="m", progress=False)
    except KeyboardInterrupt:
        pass
    finally:
        driver.train = real
    distributed.barrier()
    step = json.loads((ckpt / "state.json").read_text())["step"]
    model = make_model("llama", seed=0)  # the input model: its dense outputs are recomputed
    finetune(model, _build_tokenizer(), _cfg(corpus, "losa", "wanda", **settings), _examples(),
             checkpoint_dir=ckpt, resume=True, model_id="m", progress=False)
    return {"state": _state(model), "interrupted_after": step}


def _worker(rank, world, port, out_dir, corpus):
    from pathlib import Path

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    distributed.init_from_env("cpu")
    try:
        out = {"world": distributed.world(), "train": _train_case()}
        out["cases"] = {name: _driver_case(corpus, *case) for name, case in CASES.items()}
        out["resumed"] = _resumed_losa(corpus, Path(out_dir) / "ckpt")
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    p = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    p.write_text("\n".join(sentences(300)), encoding="utf-8")
    return p


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, corpus):
    """Both processes' results (a deadlock fails after 600 s instead of hanging the suite)."""
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("dp")
    ctx = mp.spawn(_worker, args=(2, _free_port(), str(out), str(corpus)), nprocs=2, join=False)
    deadline = time.monotonic() + 600
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the two processes did not finish within 600 s")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.fixture(scope="module")
def single(corpus):
    """The same runs in this process, without a process group."""
    assert distributed.world() == (0, 1)
    return {"train": _train_case(), "cases": {name: _driver_case(str(corpus), *c) for name, c in CASES.items()}}


def _close(got, want, what):
    # the gradients of two halves are added in another order than one process's sums: ~1e-7 relative,
    # which a few AdamW steps (lr 2e-2, normalised updates) carry into the weights
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=what)


# Two processes import torch and transformers and run four fine-tunings each (~40 s on an idle 2-core machine,
# more under load): slow.
slow = pytest.mark.slow


@slow
def test_train_equals_one_process_on_the_same_global_batches(ranks, single):
    assert [r["world"] for r in ranks] == [(0, 2), (1, 2)]
    ref = single["train"]
    for r in ranks:
        got = r["train"]
        assert got["steps"] == ref["steps"] == 4 and got["tokens"] == ref["tokens"]
        assert got["losses"] == pytest.approx(ref["losses"], rel=1e-5)  # the same token-weighted objective
        for name, t in ref["adapters"].items():
            _close(got["adapters"][name], t, name)
    for name, t in ranks[0]["train"]["adapters"].items():
        assert torch.equal(ranks[1]["train"]["adapters"][name], t), name  # the same steps on both ranks
    assert any(float(t.abs().max()) > 0 for n, t in ref["adapters"].items() if n.endswith("B"))  # it trained


@slow
@pytest.mark.parametrize("case", CASES)
def test_methods_equal_one_process_and_keep_the_mask(ranks, single, case):
    ref = single["cases"][case]
    a, b = ranks[0]["cases"][case], ranks[1]["cases"][case]
    for name, w in ref["state"].items():
        assert torch.equal(a["state"][name], b["state"][name]), name  # both ranks hold the same model
        _close(a["state"][name], w, name)
        if case != "lora-wanda" and name.endswith("proj.weight") and name.split(".")[-2] in LINEARS:
            assert torch.equal(a["state"][name] == 0, w == 0), name  # the same masks
    assert a["measured"] == ref["measured"]
    if case != "lora-wanda":  # the masked merges are exact: every pruned weight is still zero
        assert a["measured"] == pytest.approx(0.5, abs=0.01)
    assert a["steps"] == b["steps"]
    for got, want in zip(a["steps"], ref["steps"]):
        assert got["losses"] == pytest.approx(want["losses"], rel=1e-5)
        if "errors" in want:  # LoSA's re-prune: errors from each rank's share of the first 3 windows, summed
            assert got["errors"] == pytest.approx(want["errors"], rel=1e-4)
            assert got["ranks"] == want["ranks"] and got["measured"] == want["measured"]


@slow
def test_losa_resumes_from_the_checkpoint_the_main_process_wrote(ranks):
    full = ranks[0]["cases"]["losa-wanda"]["state"]
    for r in ranks:
        assert r["resumed"]["interrupted_after"] == 1
        for name, w in full.items():
            _close(r["resumed"]["state"][name], w, name)


def test_row_share_splits_every_batch():
    for size in range(1, 5):
        for n in range(0, 9):
            parts = [row_share(n, r, size) for r in range(size)]
            assert [i for p in parts for i in range(n)[p]] == list(range(n))
            lengths = [len(range(n)[p]) for p in parts]
            assert max(lengths) - min(lengths) <= 1
    assert row_share(1, 1, 2) == slice(1, 1) and row_share(5) == slice(0, 5)


@pytest.mark.slow
def test_cli_accelerate_launch_equals_the_single_process_run(tmp_path, tokenizer, corpus):
    """`accelerate launch --multi_gpu --num_processes 2 -m sparsellm finetune ... --device cpu` (gloo on this
    CPU; accelerate's --cpu would start one process): one output per method, written by the main process,
    equal to a single-process run's up to float summation order, with the same masks."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    accelerate = Path(sys.executable).with_name("accelerate")
    if not accelerate.is_file():
        accelerate = shutil.which("accelerate")
    if accelerate is None:
        pytest.skip("accelerate's launcher is not installed")
    d = tmp_path / "model"
    make_model("llama", seed=0).save_pretrained(d)
    tokenizer.save_pretrained(d)
    common = ["finetune", "--model", str(d), "--method", "losa,masked-lora", "--sparsity_ratio", "0.5",
              "--nsamples", "4", "--seqlen", "32", "--calib_dataset", str(corpus), "--data", str(corpus),
              "--ft_nsamples", "8", "--ft_seqlen", "32", "--ft_batch_size", "3", "--grad_accum", "2", "--lora_r", "4",
              "--lora_dropout", "0", "--r_max", "8", "--steps", "2", "--rank_nsamples", "2", "--rank_start", "2",
              "--rank_end", "4", "--rmi_nsamples", "4", "--step_eval_windows", "0", "--eval", "none",
              "--device", "cpu", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    one = subprocess.run([sys.executable, "-m", "sparsellm", *common, "--out", str(tmp_path / "one")], env=env,
                         capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                          "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
                          str(_free_port()), "-m", "sparsellm", *common, "--out", str(tmp_path / "two")], env=env,
                         capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("| losa |") == 1  # one summary
    for m in ("losa", "masked-lora"):
        assert json.loads((tmp_path / "two" / m / "report.json").read_text())["processes"] == 2
        a = AutoModelForCausalLM.from_pretrained(tmp_path / "one" / m).state_dict()
        b = AutoModelForCausalLM.from_pretrained(tmp_path / "two" / m).state_dict()
        assert set(a) == set(b)
        for k in a:
            assert torch.equal(a[k] == 0, b[k] == 0), k  # the same masks
            torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["comparison.json", "comparison.md", "losa",
                                                                    "masked-lora"]  # no checkpoint left
