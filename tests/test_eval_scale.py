"""Evaluation at scale: perplexity with several windows per forward, block by block for a model whose blocks
are not all resident (a lazy model read from its shards, or an onloader on another device), `eval ppl` with
--load and --device, and the CUDA paths where a GPU exists."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import FAMILIES, make_model, require
from sparsellm.cli import main
from sparsellm.config import Evaluation
from sparsellm.errors import UsageError
from sparsellm.evaluate import perplexity
from sparsellm.evaluate.blockwise import blockwise_logits
from sparsellm.models import get_blocks
from sparsellm.models.load import load_lazy
from sparsellm.onload import attach, onloader
from test_cli import _assert_one_line_error

SEQLEN = 16
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _ids(windows=5, seed=0):
    """A token stream of `windows` windows and a few tokens more, (1, T) int64."""
    return torch.randint(0, 128, (1, windows * SEQLEN + 7), generator=torch.Generator().manual_seed(seed))


# variants whose tail has more than a norm and a head: OPT projecting out of a narrower embedding, and Gemma 3
# with its final logit soft-capping
VARIANTS = {"opt_project_out": ("opt", {"word_embed_proj_dim": 16}),
            "gemma3_softcap": ("gemma3", {"final_logit_softcapping": 2.0})}


def _sharded(tmp_path, family, tokenizer, name="model"):
    """A tiny `family` model (or one of VARIANTS) saved in shards of at most 20 KB (several per block), with
    the tokenizer."""
    d = tmp_path / name
    family, overrides = VARIANTS.get(family, (family, {}))
    model = make_model(family, **overrides)
    model.save_pretrained(d, max_shard_size="20KB")
    tokenizer.save_pretrained(d)
    assert len(list(d.glob("*.safetensors"))) > len(get_blocks(model))
    return d


def _vanilla(d, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(d, dtype=dtype).eval()


def _manual_window_nll(model, ids, windows):
    """Each window's mean NLL, one window per forward, float64 log-softmax and an explicit gather."""
    out = []
    with torch.no_grad():
        for w in range(windows):
            x = ids[:, w * SEQLEN : (w + 1) * SEQLEN]
            logp = torch.log_softmax(model(x).logits[0].double(), dim=-1)
            out.append(-sum(float(logp[t, x[0, t + 1]]) for t in range(SEQLEN - 1)) / (SEQLEN - 1))
    return out


def _lazy(d, device="cpu", dtype=torch.float32):
    model = load_lazy(str(d), dtype)[0]
    attach(model, device)
    return model


# ------------------------------------------------------------------ batching


@pytest.mark.parametrize("batch_size", [2, 3, 5, 8])
def test_batched_perplexity_equals_one_window_per_forward(batch_size, tokenizer):
    model = make_model("gemma3")
    ids = _ids()
    one = perplexity(model, tokenizer, "wikitext2", SEQLEN, progress=False, ids=ids)
    many = perplexity(model, tokenizer, "wikitext2", SEQLEN, progress=False, ids=ids, batch_size=batch_size)
    manual = _manual_window_nll(model, ids, 5)
    assert many["window_nll"] == pytest.approx(manual, rel=1e-5)
    assert one["window_nll"] == pytest.approx(manual, rel=1e-5)
    assert many["ppl"] == pytest.approx(math.exp(sum(manual) / 5), rel=1e-5)
    assert many["windows"] == 5 and many["tokens"] == 5 * (SEQLEN - 1) and many["batch_size"] == batch_size
    assert not many["blockwise"] and (many["device"], many["dtype"]) == ("cpu", "float32")


def test_batch_forwards_take_batch_size_windows(tokenizer):
    model = make_model("llama")
    shapes = []
    model.register_forward_pre_hook(lambda m, args, kw: shapes.append(tuple(args[0].shape)), with_kwargs=True)
    perplexity(model, tokenizer, "wikitext2", SEQLEN, progress=False, ids=_ids(), batch_size=2)
    assert shapes == [(2, SEQLEN), (2, SEQLEN), (1, SEQLEN)]


def test_eval_batch_size_is_validated(capsys, saved_model_dir, tokenizer):
    with pytest.raises(UsageError, match="eval_batch_size"):
        Evaluation(eval_batch_size=0).validate()
    with pytest.raises(UsageError, match="eval_batch_size"):
        perplexity(make_model("llama"), tokenizer, "wikitext2", SEQLEN, progress=False, ids=_ids(), batch_size=0)
    code = main(["--quiet", "eval", "ppl", "--model", str(saved_model_dir), "--eval_batch_size", "0"])
    _assert_one_line_error(code, capsys.readouterr().err)


# ------------------------------------------------------------------ block by block


@pytest.mark.parametrize("family", ["llama", "llama_untied", "opt", "gemma3", "gemma3_softcap"])
@pytest.mark.parametrize("batch_size", [1, 2])
def test_lazy_blockwise_perplexity_equals_the_in_memory_model(family, batch_size, tmp_path, tokenizer):
    d = _sharded(tmp_path, family, tokenizer)
    ids = _ids()
    lazy = _lazy(d)
    got = perplexity(lazy, tokenizer, "wikitext2", SEQLEN, progress=False, ids=ids, batch_size=batch_size)
    ref = perplexity(_vanilla(d), tokenizer, "wikitext2", SEQLEN, progress=False, ids=ids)
    assert got["blockwise"] and not ref["blockwise"]
    assert got["ppl"] == pytest.approx(ref["ppl"], rel=1e-5)
    assert got["window_nll"] == pytest.approx(ref["window_nll"], rel=1e-5)
    assert got["tokens_sha256"] == ref["tokens_sha256"] and got["windows"] == ref["windows"] == 5
    # the model is back to its skeleton: every block and an untied head on meta again
    assert all(p.device.type == "meta" for p in get_blocks(lazy).parameters())
    assert lazy.get_output_embeddings().weight.device.type == "meta"  # embeddings and head: read only when used


def test_blockwise_reads_each_block_once_and_holds_at_most_two(tmp_path, tokenizer, monkeypatch):
    import sparsellm.engine as engine

    d = _sharded(tmp_path, "gemma3", tokenizer)
    lazy = _lazy(d)
    on = onloader(lazy)
    n = len(get_blocks(lazy))
    calls, heads = [], []
    real_run_block = engine.run_block

    def spy(block, X, kwargs, out, batch_size=1, compare=False):
        calls.append((X.data_ptr(), out.data_ptr(), len(on.resident)))
        return real_run_block(block, X, kwargs, out, batch_size, compare)

    monkeypatch.setattr(engine, "run_block", spy)
    lazy.get_output_embeddings().register_forward_hook(lambda m, i, o: heads.append(tuple(o.shape)))
    perplexity(lazy, tokenizer, "wikitext2", SEQLEN, progress=False, ids=_ids(), batch_size=2)
    assert on.loads == n and 1 <= on.peak_resident <= 2 and not on.resident
    assert len(calls) == n and all(r == 1 for _, _, r in calls)
    # two activation buffers, swapped: block i writes what block i + 1 reads
    assert len({p for c in calls for p in c[:2]}) == 2
    assert all(calls[i][1] == calls[i + 1][0] for i in range(n - 1))
    # the head runs per micro-batch: never the logits of all windows at once
    assert heads == [(2, SEQLEN, 128), (2, SEQLEN, 128), (1, SEQLEN, 128)]
    perplexity(lazy, tokenizer, "c4", SEQLEN, progress=False, ids=_ids(seed=1), batch_size=2)
    assert on.loads == 2 * n  # once more per evaluation


@pytest.mark.parametrize("family", [*FAMILIES, "llama_untied", *VARIANTS])
def test_blockwise_logits_equal_the_vanilla_model(family, tmp_path, tokenizer):
    d = _sharded(tmp_path, family, tokenizer)
    ids = _ids()[:, : 3 * SEQLEN].reshape(3, SEQLEN)
    got = blockwise_logits(_lazy(d), ids, batch_size=2)
    with torch.no_grad():
        ref = _vanilla(d)(ids).logits
    assert got.shape == (3, SEQLEN, 128)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_a_non_finite_block_weight_is_named(tmp_path, tokenizer, capsys):
    from safetensors.torch import load_file, save_file

    d = _sharded(tmp_path, "llama", tokenizer)
    index = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    key = "model.layers.1.mlp.down_proj.weight"
    tensors = load_file(str(d / index[key]))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(d / index[key]), metadata={"format": "pt"})
    code = main(["--quiet", "eval", "ppl", "--model", str(d), "--load", "lazy", "--seqlen", "32", "--max_windows", "1"])
    err = capsys.readouterr().err
    _assert_one_line_error(code, err)
    assert "model.layers.1.mlp.down_proj" in err


# ------------------------------------------------------------------ the command line


def _report(d):
    return json.loads((d / "report.json").read_text())


def test_cli_eval_ppl_lazy_equals_in_memory(tmp_path, tokenizer, capsys):
    d = _sharded(tmp_path, "llama", tokenizer)
    argv = ["--quiet", "eval", "ppl", "--model", str(d), "--seqlen", "32", "--max_windows", "3", "--eval_batch_size", "2"]
    assert main([*argv, "--load", "lazy", "--device", "cpu", "--save", str(tmp_path / "lazy")]) == 0
    out = capsys.readouterr().out
    assert main([*argv, "--load", "memory", "--device", "cpu", "--save", str(tmp_path / "mem")]) == 0
    lazy, mem = _report(tmp_path / "lazy"), _report(tmp_path / "mem")
    a, b = lazy["eval"]["wikitext2_ppl@32"], mem["eval"]["wikitext2_ppl@32"]
    assert a["blockwise"] and not b["blockwise"] and a["batch_size"] == 2 and a["windows"] == 3
    assert a["ppl"] == pytest.approx(b["ppl"], rel=1e-5) and f"{a['ppl']:.3f}" in out
    # the resolved device and dtype, not "auto"
    assert {k: lazy["config"][k] for k in ("device", "dtype", "load")} == {"device": "cpu", "dtype": "float32",
                                                                            "load": "lazy"}
    assert {k: mem["config"][k] for k in ("device", "dtype", "load")} == {"device": "cpu", "dtype": "float32",
                                                                          "load": "memory"}
    assert lazy["placement"] == "blockwise" and mem["placement"] == "resident"
    # the sparsity of the evaluated model, counted while its blocks were read
    assert lazy["evaluated"]["measured"] == mem["evaluated"]["measured"]
    assert lazy["evaluated"]["measured"]["params"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device exists here")
@pytest.mark.parametrize("kind", ["ppl", "zeroshot"])
def test_cli_cuda_without_cuda_is_a_one_line_error(kind, capsys, saved_model_dir, tmp_path):
    if kind == "zeroshot":
        require("lm_eval")
    code = main(["--quiet", "eval", kind, "--model", str(saved_model_dir), "--device", "cuda",
                 "--save", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert code == 2
    _assert_one_line_error(code, err, allow_progress_bars=False)
    assert "--device cuda" in err and not (tmp_path / "s").exists()


# ------------------------------------------------------------------ CUDA (wherever a GPU exists)


@CUDA
def test_cuda_in_memory_model_moves_whole_and_matches_the_cpu(tokenizer):
    from sparsellm.runs.record import place_for_eval

    model = make_model("llama")
    ids = _ids()
    cpu = perplexity(model, tokenizer, "wikitext2", SEQLEN, progress=False, ids=ids)
    assert place_for_eval(model, torch.device("cuda")) == "resident"
    assert all(p.device.type == "cuda" for p in model.parameters())
    gpu = perplexity(model, tokenizer, "wikitext2", SEQLEN, progress=False, ids=ids, batch_size=4)
    assert gpu["device"].startswith("cuda") and not gpu["blockwise"]
    assert gpu["ppl"] == pytest.approx(cpu["ppl"], rel=1e-4)


@CUDA
def test_cuda_onloader_for_an_in_memory_model_runs_block_by_block(tokenizer):
    model = make_model("gemma3")
    ids = _ids()
    cpu = perplexity(model, tokenizer, "wikitext2", SEQLEN, progress=False, ids=ids)
    on = attach(model, "cuda")
    gpu = perplexity(model, tokenizer, "wikitext2", SEQLEN, progress=False, ids=ids, batch_size=2)
    assert gpu["blockwise"] and gpu["device"].startswith("cuda")
    assert on.loads == len(get_blocks(model)) and on.peak_resident <= 2
    assert all(p.device.type == "cpu" for p in model.parameters())  # every weight back home
    assert gpu["ppl"] == pytest.approx(cpu["ppl"], rel=1e-4)


@CUDA
@pytest.mark.parametrize("family", ["llama_untied", "gemma3"])
def test_cuda_bf16_lazy_matches_the_vanilla_bf16_model(family, tmp_path, tokenizer):
    d = _sharded(tmp_path, family, tokenizer)
    ids = _ids()
    lazy = _lazy(d, "cuda", torch.bfloat16)
    got = perplexity(lazy, tokenizer, "wikitext2", SEQLEN, progress=False, ids=ids, batch_size=2)
    ref = perplexity(_vanilla(d, torch.bfloat16).to("cuda"), tokenizer, "wikitext2", SEQLEN, progress=False, ids=ids)
    assert got["dtype"] == "bfloat16" and got["blockwise"]
    assert got["ppl"] == pytest.approx(ref["ppl"], rel=2e-2)
    logits = blockwise_logits(lazy, ids[:, : 2 * SEQLEN].reshape(2, SEQLEN))
    with torch.no_grad():
        vanilla = _vanilla(d, torch.bfloat16).to("cuda")(ids[:, : 2 * SEQLEN].reshape(2, SEQLEN).cuda()).logits
    torch.testing.assert_close(logits, vanilla.float().cpu(), rtol=5e-2, atol=5e-2)


@CUDA
def test_cuda_cli_records_the_resolved_device_and_dtype(tmp_path, tokenizer):
    d = _sharded(tmp_path, "llama", tokenizer)
    for load in ("lazy", "memory"):
        assert main(["--quiet", "eval", "ppl", "--model", str(d), "--device", "cuda", "--load", load, "--seqlen", "32",
                     "--max_windows", "2", "--save", str(tmp_path / load)]) == 0
        rep = _report(tmp_path / load)
        assert rep["config"]["device"].startswith("cuda") and rep["config"]["dtype"] in ("bfloat16", "float16")
        assert rep["eval"]["wikitext2_ppl@32"]["device"].startswith("cuda")
    assert _report(tmp_path / "lazy")["eval"]["wikitext2_ppl@32"]["ppl"] == pytest.approx(
        _report(tmp_path / "memory")["eval"]["wikitext2_ppl@32"]["ppl"], rel=2e-2)


@CUDA
def test_cuda_a_model_too_large_for_the_device_is_scored_block_by_block(tokenizer, monkeypatch):
    import sparsellm.onload as onload
    from sparsellm.runs.record import place_for_eval

    model = make_model("opt")
    ids = _ids()
    cpu = perplexity(model, tokenizer, "wikitext2", SEQLEN, progress=False, ids=ids)
    monkeypatch.setattr(onload, "fits_on_device", lambda device, nbytes, reserve: False)
    assert place_for_eval(model, torch.device("cuda"), whole=True) == "device_map"  # zero-shot: accelerate's map
    assert place_for_eval(model, torch.device("cuda")) == "blockwise"
    assert all(p.device.type == "cpu" for p in model.parameters())
    gpu = perplexity(model, tokenizer, "wikitext2", SEQLEN, progress=False, ids=ids, batch_size=3)
    assert gpu["blockwise"] and gpu["ppl"] == pytest.approx(cpu["ppl"], rel=1e-4)
