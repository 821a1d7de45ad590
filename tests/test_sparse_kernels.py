"""sparsellm.kernels: the bitmap format, the compiled CPU kernels and the PyTorch fallback against F.linear on
the dense weights, the in-place swap of a tiny llama (same greedy text, logits within the value dtype's
tolerance, weights back bitwise), 2:4 on CUDA, and `sparsellm generate`."""

from __future__ import annotations

import copy

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import make_model
from sparsellm.cli import main
from sparsellm.errors import UsageError
from sparsellm.kernels import BitmapWeight, SparseLinear, densify, reference_mm, sparsify
from sparsellm.kernels import build
from sparsellm.kernels.linear import compiled_mm



@pytest.fixture
def ext():
    """The compiled extension, built on first use inside a test (so pytest-timeout bounds the build), or a skip."""
    m = build.load()
    if m is None:
        pytest.skip("compiled sparse kernels unavailable here (see the warning)")
    return m

SHAPES = [(1, 1), (7, 33), (65, 50), (130, 257), (48, 64), (450, 290)]  # the last: 2 kernel threads
TOKENS = [1, 2, 3, 8, 9, 70]


def _weight(out, n_in, sparsity, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, n_in, generator=g)
    w[torch.rand(out, n_in, generator=g) < sparsity] = 0
    if out > 2:
        w[0] = 0  # a row with no non-zeros
        w[-1, :-1] = 0  # a row whose only non-zero is the last column
    return w


def _check(y, w_stored, w_orig, x, dtype):
    """y against F.linear on the weights as stored (fp32 summation-order tolerance) and on the original
    weights (the value dtype's rounding tolerance)."""
    scale = (x.abs() @ w_orig.abs().t()) + 1e-6
    assert ((y - F.linear(x, w_stored)).abs() <= 1e-5 * scale + 1e-6).all()
    eps = {torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7, torch.float32: 1e-6}[dtype]
    assert ((y - F.linear(x, w_orig)).abs() <= eps * scale + 1e-6).all()


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.99])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_compiled_kernel_matches_f_linear(ext, sparsity, dtype):
    for i, (out, n_in) in enumerate(SHAPES):
        w = _weight(out, n_in, sparsity, seed=i)
        bw = BitmapWeight.pack(w, dtype)
        stored = w.to(dtype).float()
        assert torch.equal(bw.to_dense(torch.float32), stored)
        for T in TOKENS:
            x = torch.randn(T, n_in)
            _check(compiled_mm(ext, bw, x, threads=2), stored, w, x, dtype)


@pytest.mark.parametrize("sparsity", [0.0, 0.7, 0.99])
def test_fallback_matches_f_linear(sparsity):
    w = _weight(65, 50, sparsity)
    bw = BitmapWeight.pack(w, torch.float16)
    x = torch.randn(9, 50)
    _check(reference_mm(bw, x), w.half().float(), w, x, torch.float16)


def test_compiled_kernel_equals_fallback(ext):
    for sparsity in (0.0, 0.5, 0.9):
        w = _weight(130, 257, sparsity)
        bw = BitmapWeight.pack(w, torch.bfloat16)
        for T in (1, 8, 70):
            x = torch.randn(T, 257)
            scale = x.abs() @ bw.to_dense(torch.float32).abs().t()  # fp32 summation-order tolerance
            assert ((compiled_mm(ext, bw, x) - reference_mm(bw, x)).abs() <= 1e-5 * scale + 1e-6).all()


def test_avx2_build_equals_the_native_build(ext):
    avx2 = build.load("avx2")
    if avx2 is None:
        pytest.skip("the AVX2 build is unavailable here")
    assert avx2.isa() == "avx2"
    w = _weight(130, 257, 0.7)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        bw = BitmapWeight.pack(w, dtype)
        for T in (1, 5, 70):
            x = torch.randn(T, 257)
            _check(compiled_mm(avx2, bw, x), w.to(dtype).float(), w, x, dtype)


def _load_in_child(ext_dir, timeout, **env):
    """build.load() in a fresh interpreter with the cache at `ext_dir`: (its isa() or None, its stderr)."""
    import os
    import subprocess
    import sys

    code = ("import logging; logging.basicConfig(); from sparsellm.kernels import build; m = build.load(); "
            "print('ISA', m.isa() if m is not None else None)")
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(ext_dir), **env}
    env.pop("SPARSELLM_KERNEL_ISA", None)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    return r.stdout.split("ISA ")[-1].strip(), r.stderr


def _hold_lock(ext_dir):
    """A process that holds the build lock of this machine's native build (and leaves torch's own lock file in
    the build folder and a temporary build folder, as a build killed half-way does), started and holding when
    this returns."""
    import subprocess
    import sys

    code = ("import fcntl, sys, time; from sparsellm.kernels import build; "
            "import os; os.environ['TORCH_EXTENSIONS_DIR'] = sys.argv[1]; d = build.cached_so('native').parent; "
            "d.mkdir(parents=True); (d / 'lock').touch(); "
            "(d.parent / f'{d.name}.tmp_killed').mkdir(); "
            "f = open(d.parent / f'{d.name}.lock', 'a'); fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); "
            "time.sleep(600)")
    p = subprocess.Popen([sys.executable, "-c", code, str(ext_dir)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_build_killed_half_way_does_not_block_the_next_load(ext, tmp_path):
    holder = _hold_lock(tmp_path)
    holder.kill()
    holder.wait()
    isa, err = _load_in_child(tmp_path, timeout=400)  # torch's lock file alone made this wait forever
    assert isa == ext.isa(), err
    assert not list(tmp_path.glob("*.tmp*"))


def test_a_build_held_by_a_live_process_past_the_time_limit_falls_back(tmp_path):
    holder = _hold_lock(tmp_path)
    try:
        isa, err = _load_in_child(tmp_path, timeout=60, SPARSELLM_KERNEL_BUILD_TIMEOUT="2")
    finally:
        holder.kill()
        holder.wait()
    assert isa == "None"
    assert "TimeoutError" in err and "pure-PyTorch" in err


def test_a_build_past_the_time_limit_falls_back_and_leaves_nothing(tmp_path):
    isa, err = _load_in_child(tmp_path, timeout=60, SPARSELLM_KERNEL_BUILD_TIMEOUT="1")
    assert isa == "None"
    assert "TimeoutError" in err and "pure-PyTorch" in err
    assert not list(tmp_path.rglob("*.so")) and not list(tmp_path.glob("*.tmp*"))


def _compilers_building_in(folder):
    """Pids of processes (ninja, g++, cc1plus, ...) whose working directory is under `folder`."""
    import os

    pids = []
    for d in os.listdir("/proc"):
        try:
            cwd = os.readlink(f"/proc/{d}/cwd")
        except OSError:
            continue
        if d.isdigit() and cwd.startswith(str(folder)):
            pids.append(int(d))
    return pids


def test_a_build_stopped_at_its_time_limit_leaves_no_compiler_running(tmp_path):
    """ninja runs each command in its own process group, so killing the child's group alone left g++ running."""
    import time

    isa, err = _load_in_child(tmp_path, timeout=60, SPARSELLM_KERNEL_BUILD_TIMEOUT="6")  # cc1plus is running by then
    assert isa == "None" and "TimeoutError" in err
    time.sleep(1)
    assert _compilers_building_in(tmp_path) == []


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_compiled_pack_equals_torch_pack(ext, dtype):
    for i, (out, n_in) in enumerate(SHAPES + [(3, 16), (2, 0)]):
        w = _weight(out, n_in, 0.6, seed=i) * 300
        if w.numel() > 4:  # -0.0 (dropped), an fp16 underflow to 0 (kept: its bit is set), a bf16 rounding tie
            w.view(-1)[1:4] = torch.tensor([-0.0, 1e-30, 1 + 2 ** -8])
        a, b = BitmapWeight.pack(w, dtype), BitmapWeight.pack(w, dtype, compiled=False)
        assert a.shape == b.shape and a.values.dtype == b.values.dtype == dtype
        assert torch.equal(a.bits, b.bits) and torch.equal(a.row_ptr, b.row_ptr)
        assert torch.equal(a.values.view(torch.uint8), b.values.view(torch.uint8))  # bit for bit
    for compiled in (True, False):
        with pytest.raises(UsageError, match="NaN/inf"):
            BitmapWeight.pack(torch.tensor([[0.0, float("nan")]]), dtype, compiled=compiled)
        with pytest.raises(UsageError, match="NaN/inf"):
            BitmapWeight.pack(torch.tensor([[float("-inf"), 1.0]]), dtype, compiled=compiled)
    if dtype == torch.float16:
        with pytest.raises(UsageError, match="float16 range"):
            BitmapWeight.pack(torch.tensor([[0.0, -7e4]]), dtype)


def test_format_bytes_and_errors():
    w = _weight(64, 64, 0.0)
    w[:, ::2] = 0  # exactly 50% (rows 0 and 63 have fewer)
    bw = BitmapWeight.pack(w, torch.float16)
    assert bw.nbytes == 64 * 4 * 2 + bw.nnz * 2 + 65 * 8
    with pytest.raises(UsageError):
        BitmapWeight.pack(w, torch.int16)  # int8 is a value dtype (tests/test_sparse_int8.py), int16 is not
    with pytest.raises(UsageError):
        BitmapWeight.pack(torch.full((2, 2), 1e6), torch.float16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.int8])
def test_values_end_with_32_zeros_and_the_kernel_refuses_less(ext, dtype):
    """The decode kernels load 32 values at a time from each row's start: the packers (both) must leave 32
    zeros after the last non-zero, and a multiply of values with less padding is refused, not over-read."""
    w = _weight(9, 40, 0.5)
    nnz = int(torch.count_nonzero(w))
    for compiled in (True, False):
        bw = BitmapWeight.pack(w, dtype, compiled=compiled)
        assert bw.values.numel() == nnz + 32 and not bw.values[nnz:].any()
    x = torch.randn(1, 48)
    short = bw.values[:nnz + 16].clone()
    with pytest.raises(RuntimeError, match="32 values of padding"):
        ext.spmm_expand(bw.row_ptr, bw.bits, short, x, 1, bw.scales)


def test_sparse_linear_3d_bias_and_bf16_activations():
    lin = torch.nn.Linear(50, 33)
    with torch.no_grad():
        lin.weight[torch.rand(33, 50) < 0.7] = 0
    sl = SparseLinear.from_linear(lin, torch.float32)
    x = torch.randn(2, 5, 50)
    torch.testing.assert_close(sl(x), lin(x), rtol=1e-5, atol=1e-5)
    xb = x.bfloat16()
    y = sl(xb)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 5, 33)
    torch.testing.assert_close(y.float(), lin(xb.float()), rtol=1e-2, atol=1e-2)


def test_fallback_forward_equals_compiled(monkeypatch):
    lin = torch.nn.Linear(50, 33)
    with torch.no_grad():
        lin.weight[torch.rand(33, 50) < 0.5] = 0
    sl = SparseLinear.from_linear(lin, torch.float16)
    x = torch.randn(3, 9, 50)
    y = sl(x)
    monkeypatch.setattr(build, "load", lambda *a: None)
    torch.testing.assert_close(sl(x), y, rtol=1e-5, atol=1e-5)


def _pruned_llama(sparsity=0.5):
    model = make_model("llama", hidden_size=192, intermediate_size=384, num_attention_heads=4,
                       num_key_value_heads=2, num_hidden_layers=2)
    with torch.no_grad():
        for name, mod in model.model.layers.named_modules():
            if isinstance(mod, torch.nn.Linear):  # per-row magnitude pruning, as Wanda's comparison group
                k = int(mod.weight.shape[1] * sparsity)
                idx = mod.weight.abs().argsort(1)[:, :k]
                mod.weight.scatter_(1, idx, 0.0)
    return model


def _greedy(model, ids, n=12):
    return model.generate(ids, max_new_tokens=n, do_sample=False, min_new_tokens=n)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_swapped_tiny_llama_generates_like_dense(dtype):
    model = _pruned_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rounded = copy.deepcopy(model)  # the dense model with the stored (rounded) weights
    with torch.no_grad():
        for mod in rounded.model.layers.modules():
            if isinstance(mod, torch.nn.Linear):
                mod.weight.copy_(mod.weight.to(dtype).float())
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    dense_logits = model(ids).logits
    ref_text = _greedy(rounded, ids)
    rec = sparsify(model, min_sparsity=0.3, dtype=dtype)
    assert len(rec["swapped"]) == 14 and "lm_head" in rec["skipped"]
    mlp = model.model.layers[0].mlp
    assert all(isinstance(m, SparseLinear) for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    assert rec["sparse_bytes"] < rec["dense_bytes"] / 3
    torch.testing.assert_close(model(ids).logits, rounded(ids).logits, rtol=1e-4, atol=1e-4)
    tol = {torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    torch.testing.assert_close(model(ids).logits, dense_logits, rtol=tol, atol=tol)
    assert torch.equal(_greedy(model, ids), ref_text)
    for m in (model, rounded):  # one KV-cache decode step (2 tokens: the decode kernel), logits compared
        out = m(ids, use_cache=True)
        m.step = m(ids[:, :1], past_key_values=out.past_key_values, use_cache=True).logits
    torch.testing.assert_close(model.step, rounded.step, rtol=1e-4, atol=1e-4)
    del model.step, rounded.step
    assert densify(model) == 14
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert not any(isinstance(m, SparseLinear) for m in model.modules())


def _token_nll(model, ids):
    """(batch * (seq - 1),) fp32: each next token's NLL from the logits of one forward (the prefill kernel)."""
    logits = model(ids).logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_perplexity_through_kernels_equals_dense_with_zeros(ext, dtype, monkeypatch):
    model = _pruned_llama(0.7)
    with torch.no_grad():  # sharper logits than the random init's near-uniform ones, so errors show in the NLL
        model.lm_head.weight.mul_(8)
    rounded = copy.deepcopy(model)  # dense with zeros, weights rounded to the value dtype
    with torch.no_grad():
        for mod in rounded.model.layers.modules():
            if isinstance(mod, torch.nn.Linear):
                mod.weight.copy_(mod.weight.to(dtype).float())
    ids = torch.randint(3, model.config.vocab_size, (2, 96), generator=torch.Generator().manual_seed(1))
    nll_dense, nll_rounded = _token_nll(model, ids), _token_nll(rounded, ids)
    sparsify(model, min_sparsity=0.3, dtype=dtype)
    nll = _token_nll(model, ids)
    ppl, ppl_rounded, ppl_dense = (float(n.double().mean().exp()) for n in (nll, nll_rounded, nll_dense))
    assert nll_dense.std() > 0.5  # the check below can see an error
    torch.testing.assert_close(nll, nll_rounded, rtol=1e-4, atol=1e-4)  # fp32 summation order only
    assert abs(ppl - ppl_rounded) <= 1e-4 * ppl_rounded
    assert abs(ppl - ppl_dense) <= {torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype] * ppl_dense
    monkeypatch.setattr(build, "load", lambda *a: None)  # the pure-PyTorch path: the same perplexity
    assert abs(float(_token_nll(model, ids).double().mean().exp()) - ppl) <= 1e-4 * ppl


def test_swap_without_the_originals_rebuilds_the_stored_weights():
    model = _pruned_llama(0.7)
    w = model.model.layers[1].mlp.down_proj.weight.detach().clone()
    rec = sparsify(model, min_sparsity=0.8, keep_original=False)
    assert rec["swapped"] == {}  # 70% < 80%: everything stays dense
    sparsify(model, min_sparsity=0.5, keep_original=False, dtype=torch.float32)
    densify(model)
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight, w)  # fp32 values: exact


def test_semi24_refused_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this checks the refusal where CUDA is absent")
    with pytest.raises(UsageError, match="CUDA"):
        sparsify(_pruned_llama(), kernels="semi24")
    with pytest.raises(UsageError):
        sparsify(_pruned_llama(), kernels="bogus")


def _prune_24(model):
    with torch.no_grad():
        for mod in model.model.layers.modules():
            if isinstance(mod, torch.nn.Linear):
                w = mod.weight.view(mod.weight.shape[0], -1, 4)
                idx = w.abs().argsort(-1)[..., :2]
                w.scatter_(-1, idx, 0.0)
    return model


@pytest.mark.skipif(not torch.cuda.is_available(), reason="2:4 semi-structured kernels need CUDA")
@pytest.mark.parametrize("backend", ["cutlass", "cusparselt", "auto"])
def test_semi24_swap_on_cuda(backend):
    model = _prune_24(make_model("llama", hidden_size=256, intermediate_size=512, num_hidden_layers=2))
    model = model.half().cuda()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(3, 128, (1, 64), device="cuda")
    ref = model(ids).logits
    if backend == "cutlass" and torch.cuda.get_device_capability()[0] != 8:  # sm80 kernels only (seen on an H200)
        with pytest.raises(UsageError, match="compute capability 8.x"):
            sparsify(model, min_sparsity=0.3, kernels="semi24", backend=backend)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
        return
    rec = sparsify(model, min_sparsity=0.3, kernels="semi24", backend=backend)
    assert len(rec["swapped"]) == 14 and rec["isa"] == (backend if backend != "auto" else "cusparselt")
    torch.testing.assert_close(model(ids).logits, ref, rtol=2e-2, atol=2e-2)
    densify(model)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="2:4 semi-structured kernels need CUDA")
def test_semi24_refuses_weights_that_are_not_24():
    model = _pruned_llama(0.5).half().cuda()  # 50% unstructured: not 2:4
    with pytest.raises(UsageError, match="not 2:4"):
        sparsify(model, kernels="semi24")


@pytest.mark.parametrize("cap,has_lt,backend,expect", [
    ((9, 0), True, "auto", "cusparselt"), ((8, 0), False, "auto", "cutlass"), ((8, 6), True, "cutlass", "cutlass"),
    ((9, 0), True, "cutlass", "compute capability 8.x"), ((9, 0), False, "auto", "no cuSPARSELt either"),
    ((7, 5), True, "auto", "8.0 or newer"), ((9, 0), False, "cusparselt", "no cuSPARSELt"),
    ((9, 0), True, "bogus", "must be one of")])
def test_semi24_backend_choice_by_compute_capability(monkeypatch, cap, has_lt, backend, expect):
    """The rule of semi24.check_available, with the GPU faked: CUTLASS's 2:4 kernels in PyTorch are sm80-only
    (they failed on an H200, compute capability 9.0), cuSPARSELt wherever torch has it, nothing below 8.0."""
    from sparsellm.kernels import semi24

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap)
    monkeypatch.setattr(torch.backends.cusparselt, "is_available", lambda: has_lt)
    if expect in semi24.BACKENDS:
        assert semi24.check_available(backend) == expect
    else:
        with pytest.raises(UsageError, match=expect):
            semi24.check_available(backend)


def _saved_24(tmp_path, tokenizer):
    d = tmp_path / "model24"
    _prune_24(make_model("llama", hidden_size=256, intermediate_size=512, num_hidden_layers=2)).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


@pytest.mark.parametrize("extra,match", [([], "add --device cuda"), (["--device", "cuda"], "CUDA"),
                                         (["--device", "gpu"], "--device"), (["--backend", "x"], "backend"),
                                         (["--device", "cuda", "--no_bf16"],
                                          "do not apply" if torch.cuda.is_available() else "CUDA")])
def test_bench_semi24_refused_before_any_work(tmp_path, tokenizer, capsys, extra, match):
    if torch.cuda.is_available() and extra == ["--device", "cuda"]:
        pytest.skip("CUDA is available here")
    d = _saved_24(tmp_path, tokenizer)
    capsys.readouterr()
    code = main(["--quiet", "bench", "--model", str(d), "--baseline", str(d), "--kernels", "semi24",
                 "--save", str(tmp_path / "s"), *extra])
    err = capsys.readouterr().err
    assert code == 2 and match in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "s").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="2:4 semi-structured kernels need CUDA")
@pytest.mark.parametrize("backend,graphs", [("cusparselt", []), ("auto", []), ("auto", ["--cuda_graphs"])])
def test_bench_semi24_on_cuda(tmp_path, tokenizer, capsys, backend, graphs):
    d = _saved_24(tmp_path, tokenizer)
    assert main(["--quiet", "bench", "--model", str(d), "--baseline", str(d), "--kernels", "semi24", "--device",
                 "cuda", "--backend", backend, "--prefill", "64", "--decode_batches", "1,2", "--decode_prompt", "8",
                 "--new_tokens", "4", "--repeats", "2", "--save", str(tmp_path / "s"), *graphs]) == 0
    res = json.loads((tmp_path / "s" / "speed.json").read_text())
    assert res["settings"]["cuda_graphs"] == bool(graphs)
    assert list(res["results"]) == ["dense bf16", "model bf16", "model 2:4 cusparselt"]
    assert res["device"].startswith("cuda") and len(res["sparse_kernels"]["swapped"]) == 14
    assert all(v > 0 for r in res["results"].values() for v in r.values())
    assert "model 2:4 cusparselt" in capsys.readouterr().out


def test_generate_cli(tmp_path, tokenizer, capsys):
    d = tmp_path / "model"
    model = _pruned_llama(0.7)
    model.save_pretrained(d)
    tokenizer.save_pretrained(d)
    for kernels in ("sparse", "dense"):
        code = main(["--quiet", "generate", "--model", str(d), "--prompt", "the film was", "--max_new_tokens", "5",
                     "--kernels", kernels, "--threads", "1"])
        out, err = capsys.readouterr()
        assert code == 0, err
        assert "prefill: 3 tokens" in err and "decode: 5 tokens" in err and "tok/s" in err
        assert ("sparse kernels" in err) == (kernels == "sparse")
        text = out
    assert text.strip()


@pytest.mark.parametrize("extra", [["--model", "/nonexistent/model"], ["--kernels", "csr"], ["--threads", "0"],
                                   ["--max_new_tokens", "129"]])  # 1 prompt token + 128 fed back > the tiny llama's 128
def test_generate_cli_bad_input(tmp_path, tokenizer, capsys, extra):
    d = tmp_path / "model"
    make_model("llama").save_pretrained(d)
    tokenizer.save_pretrained(d)
    capsys.readouterr()  # save_pretrained's progress bar
    code = main(["--quiet", "generate", "--model", str(d), "--prompt", "the", *extra])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code != 0 and len(lines) == 1 and lines[0].startswith("sparsellm: error:"), err


def test_generate_cli_names_an_empty_model(capsys):
    assert main(["--quiet", "generate", "--model", ""]) != 0
    assert "--model is empty" in capsys.readouterr().err



def test_a_wrong_input_width_is_refused_like_nn_linear():
    lin = torch.nn.Linear(40, 8)
    sl = SparseLinear.from_linear(lin)
    for width in (39, 100):  # the compiled path used to pad or crop x to the weight's width silently
        with pytest.raises((ValueError, RuntimeError)):
            sl(torch.randn(2, width))


def test_sparsify_that_fails_swaps_nothing_and_names_the_linear():
    model = make_model("llama")
    for lin in (m for m in model.modules() if isinstance(m, torch.nn.Linear)):
        lin.weight.data[lin.weight.abs() < 0.02] = 0
    bad = "model.layers.1.mlp.down_proj"
    model.get_submodule(bad).weight.data[0, 0] = 1e5  # out of float16's range
    with pytest.raises(UsageError, match=bad.replace(".", r"\.")):
        sparsify(model, min_sparsity=0.0, dtype=torch.float16)
    assert not any(isinstance(m, SparseLinear) for m in model.modules())


def test_bf16_values_refuse_weights_that_round_to_inf():
    with pytest.raises(UsageError, match="bfloat16 range"):
        BitmapWeight.pack(torch.tensor([[0.0, 3.4028235e38]]), torch.bfloat16)
    assert BitmapWeight.pack(torch.tensor([[0.0, 3.0e38]]), torch.bfloat16).values[0].isfinite()


def test_torch_compile_traces_a_swapped_model_in_one_graph(ext):
    """SparseLinear is a torch custom op under torch.compile: fullgraph=True (any graph break raises) gives the
    eager swapped model's logits. Dynamo's "eager" backend: the tracing is what is tested, not inductor."""
    model = make_model("llama").eval()
    for lin in (m for m in model.modules() if isinstance(m, torch.nn.Linear)):
        lin.weight.data[lin.weight.abs() < 0.02] = 0
    sparsify(model, min_sparsity=0.0)
    ids = torch.randint(0, 100, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eager = model(ids, use_cache=False).logits
        torch._dynamo.reset()
        compiled = torch.compile(model.forward, fullgraph=True, backend="eager")(ids, use_cache=False).logits
    torch._dynamo.reset()
    assert torch.allclose(compiled, eager, atol=1e-5, rtol=1e-5)


def test_inductor_compiles_a_sparse_linear_with_grad_mode_on(ext):
    """With grad mode on and an input that requires grad, AOTAutograd traces the custom op's backward: it
    must see a detached input (eager SparseLinear passes no gradient back either), not fail to compile."""
    lin = torch.nn.Linear(40, 8)
    lin.weight.data[lin.weight.abs() < 0.05] = 0
    sl = SparseLinear.from_linear(lin, torch.float32)
    x = torch.randn(3, 40, requires_grad=True)
    torch._dynamo.reset()
    y = torch.compile(sl)(x)
    torch._dynamo.reset()
    assert torch.allclose(y, F.linear(x, lin.weight, lin.bias), atol=1e-5)
