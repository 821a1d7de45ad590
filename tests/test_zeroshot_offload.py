"""Zero-shot of a model larger than the device (issue 19 item 4): the whole model on accelerate's device map
(`sparsellm.evaluate.offload`). On a CPU-only machine a small `max_memory={"cpu": ...}` forces part of a tiny
model to disk; its per-request loglikelihoods must equal those computed directly from the in-memory model's
logits (no lm-eval), and its accuracies those of the in-memory model."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import make_model, require

pytestmark = pytest.mark.zeroshot
require("lm_eval")

from sparsellm.cli import main  # noqa: E402
from sparsellm.config import Evaluation  # noqa: E402
from sparsellm.evaluate.offload import dispatched  # noqa: E402
from sparsellm.evaluate.zeroshot import zeroshot  # noqa: E402
from sparsellm.models import get_blocks  # noqa: E402
from sparsellm.models.load import load_lazy, load_model  # noqa: E402
from sparsellm.onload import attach  # noqa: E402
from sparsellm.runs.record import zeroshot_any  # noqa: E402

LAYERS = 4
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
REQUESTS = [("the cat sat on", " the mat ."), ("a dog ran", " to the house"), ("we saw", " a bird")]


def _bytes(model):
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _split(model):
    """A CPU budget that keeps the embeddings and a block in memory and sends the other blocks to disk."""
    return {"cpu": int(0.7 * _bytes(model))}


def _direct_loglikelihoods(model, tok, requests):
    """sum log p(continuation | context) from the model's own logits, float64, one request per forward."""
    out = []
    with torch.no_grad():
        for ctx, cont in requests:
            c, w = tok(ctx, add_special_tokens=False).input_ids, tok(cont, add_special_tokens=False).input_ids
            ids = torch.tensor([c + w])
            logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
            out.append(sum(float(logp[len(c) - 1 + j, t]) for j, t in enumerate(w)))
    return out


def _hflm_loglikelihoods(model, tok, requests, device):
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=2)
    lm._device = torch.device(device)
    reqs = [Instance("loglikelihood", {}, args, i) for i, args in enumerate(requests)]
    return [ll for ll, _ in lm.loglikelihood(reqs, disable_tqdm=True)]


@pytest.fixture
def recorded(monkeypatch):
    """Every loglikelihood lm-eval's HFLM returns, in order, per run (a list of lists)."""
    from lm_eval.models.huggingface import HFLM

    runs, original = [], HFLM.loglikelihood

    def loglikelihood(self, requests, disable_tqdm=False):
        out = original(self, requests, disable_tqdm=True)
        runs.append([(r.args, ll) for r, (ll, _) in zip(requests, out)])
        return out

    monkeypatch.setattr(HFLM, "loglikelihood", loglikelihood)
    return runs


def _saved(tmp_path, tokenizer, family="llama"):
    d = tmp_path / "model"
    make_model(family, num_hidden_layers=LAYERS).save_pretrained(d, max_shard_size="20KB")
    tokenizer.save_pretrained(d)
    return d


def test_in_memory_model_offloaded_to_disk_scores_like_its_own_logits(tokenizer):
    model = make_model("llama", num_hidden_layers=LAYERS)
    ref = _direct_loglikelihoods(model, tokenizer, REQUESTS)
    before = {n: (p, p.detach().clone()) for n, p in model.named_parameters(remove_duplicate=False)}
    with dispatched(model, "cpu", max_memory=_split(model)) as (m, info):
        assert m is model and info["source"] == "memory" and info["device"] == torch.device("cpu")
        assert info["device_map"].get("disk", 0) >= 1 and info["device_map"].get("cpu", 0) >= 1, info
        assert any(p.device.type == "meta" for p in model.parameters())  # really offloaded
        got = _hflm_loglikelihoods(m, tokenizer, REQUESTS, info["device"])
    assert got == pytest.approx(ref, rel=1e-5, abs=1e-5)
    # put back as it was: the same parameter objects, values, devices and ties; no hooks left
    after = dict(model.named_parameters(remove_duplicate=False))
    for n, (p, value) in before.items():
        assert after[n] is p and p.device.type == "cpu" and torch.equal(p.detach(), value), n
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not hasattr(model, "hf_device_map") and not any(hasattr(mod, "_hf_hook") for mod in model.modules())
    assert not any("forward" in mod.__dict__ for mod in model.modules())  # no instance attribute left behind
    assert _direct_loglikelihoods(model, tokenizer, REQUESTS) == pytest.approx(ref, rel=1e-6)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_lazy_model_runs_from_its_checkpoint_on_a_device_map(family, tmp_path, tokenizer, recorded):
    """A lazy skeleton (blocks never in memory) is loaded again with device_map="auto" and disk offload; every
    request's loglikelihood equals the in-memory model's and the model's own logits."""
    d = _saved(tmp_path, tokenizer, family)
    ev = Evaluation(eval="zeroshot", tasks="rte,piqa", limit=3, zeroshot_batch_size=2)
    vanilla = load_model(str(d))[0]
    plain = zeroshot(vanilla, tokenizer, ["rte", "piqa"], limit=3, batch_size=2)
    lazy = load_lazy(str(d))[0]
    attach(lazy, "cpu")
    got = zeroshot_any(lazy, tokenizer, ev, max_memory=_split(vanilla))
    assert got["settings"]["device_map"].get("disk", 0) >= 1, got["settings"]
    assert all(p.device.type == "meta" for p in get_blocks(lazy).parameters())  # the skeleton stays weightless
    (a, b) = recorded
    assert [args for args, _ in a] == [args for args, _ in b] and len(a) >= 6
    assert [ll for _, ll in b] == pytest.approx([ll for _, ll in a], rel=1e-5, abs=1e-5)
    direct = _direct_loglikelihoods(vanilla, tokenizer, [args for args, _ in a[:4]])
    assert [ll for _, ll in b[:4]] == pytest.approx(direct, rel=1e-4, abs=1e-4)
    for t in ("rte", "piqa"):
        assert got["tasks"][t]["acc"] == plain["tasks"][t]["acc"], t


def test_cli_eval_zeroshot_of_a_lazy_model(tmp_path, tokenizer, monkeypatch, capsys):
    """`eval zeroshot --load lazy` (refused before) equals `--load memory`, with disk offload forced."""
    import sparsellm.evaluate.offload as offload

    d = _saved(tmp_path, tokenizer)
    small = int(0.7 * _bytes(make_model("llama", num_hidden_layers=LAYERS)))
    monkeypatch.setattr(offload, "auto_max_memory", lambda device, cpu_bytes=None, reserve=0: {"cpu": small})
    argv = ["--quiet", "eval", "zeroshot", "--model", str(d), "--tasks", "rte", "--limit", "4", "--batch_size", "2"]
    assert main([*argv, "--load", "lazy", "--save", str(tmp_path / "lazy")]) == 0
    assert main([*argv, "--load", "memory", "--save", str(tmp_path / "mem")]) == 0
    lazy, mem = (json.loads((tmp_path / k / "report.json").read_text()) for k in ("lazy", "mem"))
    assert lazy["placement"] == "device_map" and mem["placement"] == "resident"
    assert lazy["eval"]["zeroshot"]["settings"]["device_map"].get("disk", 0) >= 1
    assert lazy["eval"]["zeroshot"]["tasks"] == mem["eval"]["zeroshot"]["tasks"]
    assert lazy["evaluated"]["measured"] == mem["evaluated"]["measured"]  # the blocks were read and counted


def test_cli_eval_zeroshot_lazy_checks_every_block_first(tmp_path, tokenizer, capsys):
    """lm-eval reads the blocks through accelerate: a NaN in a lazy model's shard is found before it, one line."""
    from safetensors.torch import load_file, save_file

    from test_cli import _assert_one_line_error

    d = _saved(tmp_path, tokenizer)
    index = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    key = "model.layers.2.mlp.down_proj.weight"
    tensors = load_file(str(d / index[key]))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(d / index[key]), metadata={"format": "pt"})
    code = main(["--quiet", "eval", "zeroshot", "--model", str(d), "--load", "lazy", "--tasks", "rte", "--limit", "2",
                 "--save", str(tmp_path / "s")])
    err = capsys.readouterr().err
    _assert_one_line_error(code, err)
    assert "model.layers.2.mlp.down_proj" in err and not (tmp_path / "s").exists()


def test_streamed_prune_with_zeroshot_eval(tmp_path, tokenizer, calib_txt):
    """A --load lazy prune evaluates zero-shot (refused before): dense and pruned, as --load memory does."""
    d = _saved(tmp_path, tokenizer)
    argv = ["--quiet", "prune", "--model", str(d), "--calib_dataset", str(calib_txt), "--nsamples", "2", "--seqlen",
            "16", "--eval", "zeroshot", "--tasks", "rte", "--limit", "4", "--eval_dense", "--save_dtype", "float32"]
    assert main([*argv, "--load", "lazy", "--out", str(tmp_path / "lazy")]) == 0
    assert main([*argv, "--load", "memory", "--out", str(tmp_path / "mem")]) == 0
    lazy, mem = (json.loads((tmp_path / k / "report.json").read_text()) for k in ("lazy", "mem"))
    for key in ("eval", "eval_dense"):
        assert lazy[key]["zeroshot"]["tasks"] == mem[key]["zeroshot"]["tasks"], key
        assert "device_map" in lazy[key]["zeroshot"]["settings"], key
        assert "device_map" not in mem[key]["zeroshot"]["settings"], key


def test_auto_max_memory_budgets(monkeypatch):
    """FIT of each named GPU's free memory (the logits' reserve on the first only, never below 0), then the CPU."""
    import sparsellm.devices as devices
    import sparsellm.evaluate.offload as offload

    free = {0: 10 << 30, 1: 4 << 30}
    monkeypatch.setattr(devices, "free_bytes", lambda d: free[torch.device(d).index])
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    got = offload.auto_max_memory("cuda", cpu_bytes=123, reserve=1 << 30)
    assert got == {0: int(0.8 * (10 << 30)) - (1 << 30), 1: int(0.8 * (4 << 30)), "cpu": 123}
    assert offload.auto_max_memory("cuda:1", cpu_bytes=5, reserve=8 << 30) == {1: 0, "cpu": 5}
    assert set(offload.auto_max_memory("cpu")) == {"cpu"}


# ------------------------------------------------------------------ CUDA (wherever a GPU exists)


@CUDA
def test_cuda_split_between_the_gpu_and_cpu_memory(tokenizer):
    model = make_model("llama", num_hidden_layers=LAYERS)
    ref = _direct_loglikelihoods(model, tokenizer, REQUESTS)
    with dispatched(model, "cuda:0", max_memory={0: int(0.6 * _bytes(model)), "cpu": _bytes(model)}) as (m, info):
        assert info["device"] == torch.device("cuda", 0)
        assert info["device_map"].get("cuda:0", 0) >= 1 and info["device_map"].get("cpu", 0) >= 1, info
        got = _hflm_loglikelihoods(m, tokenizer, REQUESTS, info["device"])
    assert got == pytest.approx(ref, rel=1e-4, abs=1e-4)
    assert all(p.device.type == "cpu" for p in model.parameters())


@CUDA
def test_cuda_an_onloaded_model_runs_zeroshot_on_the_gpu(tokenizer):
    """An in-memory model with an onloader for the GPU (what `prune --device cuda` holds) is no longer refused."""
    model = make_model("llama", num_hidden_layers=LAYERS)
    ev = Evaluation(eval="zeroshot", tasks="rte", limit=4, zeroshot_batch_size=2)
    plain = zeroshot(model, tokenizer, ["rte"], limit=4, batch_size=2)
    attach(model, "cuda")
    got = zeroshot_any(model, tokenizer, ev)
    assert got["settings"]["device"].startswith("cuda") and got["tasks"]["rte"]["acc"] == plain["tasks"]["rte"]["acc"]
    assert all(p.device.type == "cpu" for p in model.parameters())
