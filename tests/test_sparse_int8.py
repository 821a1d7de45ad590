"""int8 values with per-row scales in the bitmap format (sparsellm.kernels, sparsity and quantization together):
the packers, the compiled decode / prefill kernels (native and AVX2 builds) and the pure-PyTorch path against
an independent reference (the dense weight quantized here, then F.linear), and the swap of a tiny llama."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import make_model
from test_sparse_kernels import _weight as float_weight
from sparsellm.cli import main
from sparsellm.kernels import BitmapWeight, SparseLinear, build, densify, reference_mm, sparsify
from sparsellm.kernels.linear import compiled_mm

SHAPES = [(1, 1), (7, 33), (65, 50), (130, 257), (48, 64)]
TOKENS = [1, 3, 8, 9, 70]  # decode kernel up to 8 tokens, prefill beyond


def _quantize(w):
    """The reference: per-row scale max|w_r| / 127 (0 for a zero row), codes round(w / scale) in [-127, 127];
    returns (scales (out,), codes (out, in) float, dequantized (out, in) = scale * code)."""
    scales = torch.stack([row.abs().max() / 127 if row.numel() else torch.tensor(0.0) for row in w.float()])
    codes = torch.zeros_like(w, dtype=torch.float32)
    for r, s in enumerate(scales):
        if s > 0:
            codes[r] = torch.clamp(torch.round(w[r].float() / s), -127, 127)
    return scales, codes, scales[:, None] * codes


def _weight(out, n_in, sparsity, seed=0):
    w = float_weight(out, n_in, sparsity, seed)  # with an all-zero row and a row with only its last column
    if out > 3 and n_in > 2:
        w[1, :2] = torch.tensor([50.0, 1e-3])  # 1e-3 / (50 / 127) rounds to code 0: its bit must stay set
    return w


def _check(y, w, x):
    """y against F.linear on the reference's dequantized weight (fp32 summation order) and on w itself
    (each weight is off by at most half its row's scale)."""
    scales, _, dq = _quantize(w)
    mag = x.abs() @ w.abs().t() + 1e-6
    assert ((y - F.linear(x, dq)).abs() <= 1e-5 * mag + 1e-6).all()
    bound = x.abs().sum(1, keepdim=True) * scales[None, :] / 2  # sum_j |x_j| * scale_r / 2
    assert ((y - F.linear(x, w)).abs() <= bound * (1 + 1e-5) + 1e-5 * mag + 1e-6).all()


@pytest.fixture(params=["native", "avx2"])
def ext(request):
    """The compiled extension in each build (built on first use inside a test), or a skip."""
    m = build.load(None if request.param == "native" else "avx2")
    if m is None:
        pytest.skip(f"the {request.param} build of the sparse kernels is unavailable here")
    return m


@pytest.mark.parametrize("compiled", [True, False])
def test_int8_pack_is_the_reference_quantization(compiled):
    if compiled and build.load() is None:
        pytest.skip("compiled sparse kernels unavailable here")
    for i, (out, n_in) in enumerate(SHAPES + [(3, 16), (2, 0)]):
        w = _weight(out, n_in, 0.6, seed=i)
        bw = BitmapWeight.pack(w, torch.int8, compiled=compiled)
        scales, codes, dq = _quantize(w)
        assert bw.values.dtype == torch.int8 and bw.scales.dtype == torch.float32
        assert torch.equal(bw.scales, scales)
        assert torch.equal(bw.mask(), w != 0)  # the bitmap is the pruning mask, codes of 0 included
        assert bw.nnz == int((w != 0).sum())
        assert torch.equal(bw.values[: bw.nnz].float(), codes[w != 0])
        assert torch.equal(bw.values[bw.nnz:], torch.zeros(32, dtype=torch.int8))
        assert torch.equal(bw.to_dense(), dq)  # exactly scale * int8
        assert bw.nbytes == bw.bits.numel() * 2 + bw.nnz + (out + 1) * 8 + out * 4
    w = _weight(65, 50, 0.5)
    bw = BitmapWeight.pack(w, torch.int8, compiled=compiled)
    assert bw.values[bw.row_ptr[1]:bw.row_ptr[2]][:2].tolist() == [127, 0]  # 1e-3 kept as a stored 0


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.99])
def test_int8_compiled_kernel_matches_reference(ext, sparsity):
    for i, (out, n_in) in enumerate(SHAPES):
        w = _weight(out, n_in, sparsity, seed=i)
        bw = BitmapWeight.pack(w, torch.int8)
        for T in TOKENS:
            x = torch.randn(T, n_in)
            _check(compiled_mm(ext, bw, x, threads=2), w, x)


def test_int8_compiled_kernel_column_blocks_and_tiles(ext):
    """The prefill kernel with more column blocks than one (in > 12 groups) and several token tiles: the
    scale is applied once, after the last block."""
    w = _weight(33, 1000, 0.7)
    bw = BitmapWeight.pack(w, torch.int8)
    x = torch.randn(150, 1000)
    _check(compiled_mm(ext, bw, x, threads=2), w, x)


@pytest.mark.parametrize("sparsity", [0.0, 0.7, 0.99])
def test_int8_reference_mm_matches_reference_and_compiled(sparsity):
    for i, (out, n_in) in enumerate(SHAPES):
        w = _weight(out, n_in, sparsity, seed=i)
        bw = BitmapWeight.pack(w, torch.int8, compiled=False)
        for T in (1, 9):
            x = torch.randn(T, n_in)
            y = reference_mm(bw, x)
            _check(y, w, x)
            ext = build.load()
            if ext is not None:
                mag = x.abs() @ bw.to_dense().abs().t()
                assert ((compiled_mm(ext, bw, x) - y).abs() <= 1e-5 * mag + 1e-6).all()


def test_compiled_int8_pack_equals_torch_pack():
    if build.load() is None:
        pytest.skip("compiled sparse kernels unavailable here")
    w = _weight(130, 257, 0.6) * 300
    w[2] = 0
    w[2, :8] = torch.tensor([127.0, 2.5, 3.5, -0.5, 0.5, -1.5, -0.0, 1e-30])  # scale 1: ties round to even
    for shape_w in (w, w[:7, :33], torch.zeros(3, 16), torch.zeros(2, 0)):
        a, b = BitmapWeight.pack(shape_w, torch.int8), BitmapWeight.pack(shape_w, torch.int8, compiled=False)
        assert torch.equal(a.bits, b.bits) and torch.equal(a.row_ptr, b.row_ptr)
        assert torch.equal(a.values, b.values) and torch.equal(a.scales.view(torch.int32), b.scales.view(torch.int32))
    a = BitmapWeight.pack(w, torch.int8)
    assert a.scales[2] == 1.0
    assert a.values[a.row_ptr[2]:a.row_ptr[2] + 7].tolist() == [127, 2, 4, 0, 0, -2, 0]  # -0.0 dropped


def test_int8_kernel_refuses_missing_or_misplaced_scales():
    ext = build.load()
    if ext is None:
        pytest.skip("compiled sparse kernels unavailable here")
    bw = BitmapWeight.pack(_weight(7, 33, 0.5), torch.int8)
    x = torch.randn(1, 48)
    with pytest.raises(RuntimeError, match="scales"):
        ext.spmm_expand(bw.row_ptr, bw.bits, bw.values, x, 1)
    with pytest.raises(RuntimeError, match="scales"):
        ext.spmm_expand(bw.row_ptr, bw.bits, bw.values, x, 1, bw.scales[:3])
    bf = BitmapWeight.pack(_weight(7, 33, 0.5), torch.float16)
    with pytest.raises(RuntimeError, match="int8 values only"):
        ext.spmm_expand(bf.row_ptr, bf.bits, bf.values, x, 1, bw.scales)


def _pruned_llama(sparsity=0.6):
    model = make_model("llama", hidden_size=192, intermediate_size=384, num_attention_heads=4,
                       num_key_value_heads=2, num_hidden_layers=2)
    with torch.no_grad():
        for mod in model.model.layers.modules():
            if isinstance(mod, torch.nn.Linear):
                k = int(mod.weight.shape[1] * sparsity)
                mod.weight.scatter_(1, mod.weight.abs().argsort(1)[:, :k], 0.0)
        model.lm_head.weight.mul_(8)  # sharper logits, so an error shows
    return model


def test_int8_swapped_tiny_llama_is_dense_within_int8_tolerance():
    model = _pruned_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dequant = copy.deepcopy(model)  # the dense model with the reference's dequantized weights
    with torch.no_grad():
        for mod in dequant.model.layers.modules():
            if isinstance(mod, torch.nn.Linear):
                mod.weight.copy_(_quantize(mod.weight)[2])
    ids = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    dense_logits, dequant_logits = model(ids).logits, dequant(ids).logits
    rec = sparsify(model, min_sparsity=0.3, dtype=torch.int8)
    assert rec["dtype"] == "int8" and len(rec["swapped"]) == 14
    assert rec["sparse_bytes"] < rec["dense_bytes"] / 6  # 40% of 1 byte + 1/8 bit per weight vs 4 bytes
    logits = model(ids).logits  # 24 tokens: the prefill kernel
    torch.testing.assert_close(logits, dequant_logits, rtol=1e-4, atol=1e-4)
    err = (logits - dense_logits).abs().max() / dense_logits.abs().max()
    assert 0 < err < 4e-3, err  # int8 rounding: visible, small (7.7e-4 here)
    out = model(ids, use_cache=True)  # one KV-cache step of 2 rows: the decode kernel
    step = model(ids[:, :1], past_key_values=out.past_key_values, use_cache=True).logits
    out = dequant(ids, use_cache=True)
    torch.testing.assert_close(step, dequant(ids[:, :1], past_key_values=out.past_key_values, use_cache=True).logits,
                               rtol=1e-4, atol=1e-4)
    assert densify(model) == 14  # the originals were kept: back bitwise
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_int8_densify_without_originals_gives_scale_times_int8():
    model = _pruned_llama()
    weights = {n: m.weight.detach().clone() for n, m in model.model.layers.named_modules()
               if isinstance(m, torch.nn.Linear)}
    sparsify(model, min_sparsity=0.3, dtype=torch.int8, keep_original=False)
    mod = model.model.layers[0].mlp.down_proj
    assert isinstance(mod, SparseLinear) and "values=int8" in repr(mod)
    assert torch.equal(mod.weight_packed.mask(), weights["0.mlp.down_proj"] != 0)  # the mask, whatever the codes
    assert densify(model) == 14
    for n, m in model.model.layers.named_modules():
        if isinstance(m, torch.nn.Linear):
            assert m.weight.dtype == torch.float32
            assert torch.equal(m.weight, _quantize(weights[n])[2]), n  # exactly scale * int8, not the original


def test_int8_fallback_forward_equals_compiled(monkeypatch):
    model = _pruned_llama()
    sparsify(model, min_sparsity=0.3, dtype=torch.int8)
    ids = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(2))
    y = model(ids).logits
    monkeypatch.setattr(build, "load", lambda *a: None)
    torch.testing.assert_close(model(ids).logits, y, rtol=1e-4, atol=1e-4)


def test_generate_cli_int8_values(tmp_path, tokenizer, capsys):
    d = tmp_path / "model"
    model = _pruned_llama(0.7)
    model.save_pretrained(d)
    tokenizer.save_pretrained(d)
    capsys.readouterr()
    code = main(["--quiet", "generate", "--model", str(d), "--prompt", "the film was", "--max_new_tokens", "3",
                 "--values", "int8", "--threads", "1"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "int8 values" in err
    code = main(["--quiet", "generate", "--model", str(d), "--prompt", "the", "--values", "int4"])
    err = capsys.readouterr().err
    assert code != 0 and "--values" in err
