"""The single-pass engine (`--engine single`): one forward per block, each group of linears pruned from the
inputs it actually sees (the groups before it already pruned)."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from conftest import FAMILIES, make_model
from test_engine import _blocks, _engine_outputs, _reference_block_outputs
from sparsellm import single_pass
from sparsellm.engine import capture_inputs, prune_blocks
from sparsellm.errors import UsageError
from sparsellm.models import arch

NSAMPLES, SEQLEN = 5, 24


def _magnitude_half(lin):
    """Zero the smaller half of |W| of one linear (the test's own pruning rule)."""
    W = lin.weight.data
    k = W.numel() // 2
    idx = W.abs().flatten().argsort()[:k]
    W.view(-1)[idx] = 0


@pytest.mark.parametrize("mode", ["single", "recompute"])
@pytest.mark.parametrize("family", FAMILIES)
def test_group_statistics_are_those_of_its_actual_inputs(family, mode):
    """Each group's statistics equal a direct computation on the inputs that group sees in the pruned
    block (the pruning of the groups before it included), and the outputs equal a plain forward of the
    pruned block."""
    torch.manual_seed(0)
    model = make_model(family)
    ids = torch.randint(0, model.config.vocab_size, (NSAMPLES, SEQLEN))
    X, kwargs = capture_inputs(model, ids)
    block = _blocks(model)[0]
    lin = dict(block.named_modules())
    got, order = {}, []

    def on_group(names, st):
        order.append(names)
        got[names] = (st.ntokens, st.sq_norm.clone(), st.hessian.clone())
        for n in names:
            _magnitude_half(lin[n])

    Y = torch.empty_like(X)
    with torch.no_grad():
        single_pass.forward_in_stages(model, block, X, kwargs[0], Y, 2, "hessian", on_group, mode)
    groups = [g for g in arch.get_arch(model).groups]
    assert order == groups  # forward order: q/k/v, o, (gate/)up, down

    # reference: the pruned block's plain forward, the inputs of each group's first linear recorded
    seen = {g: [] for g in groups}
    handles = [lin[g[0]].register_forward_pre_hook(lambda m, a, g=g: seen[g].append(a[0].detach().double()))
               for g in groups]
    kw = dict(kwargs[0])
    args = kw.pop("_args", ())
    with torch.no_grad():
        out = block(X, *args, **kw)
    for h in handles:
        h.remove()
    out = out[0] if isinstance(out, (tuple, list)) else out
    torch.testing.assert_close(Y, out, atol=1e-5, rtol=1e-5)
    for g in groups:
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in seen[g]])
        n, sq, H = got[g]
        assert n == x.shape[0] == NSAMPLES * SEQLEN
        torch.testing.assert_close(sq.double(), (x * x).sum(0), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(H.double(), x.t() @ x, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_sparsity_zero_reproduces_the_dense_blocks(family):
    model = make_model(family)
    torch.manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (NSAMPLES, SEQLEN))
    ref = _reference_block_outputs(model, ids)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    L = len(_blocks(model))
    got, results = _engine_outputs(model, ids, "wanda", [0.0] * L, engine="single", batch_size=2, diag_nsamples=2)
    for i in range(L):
        torch.testing.assert_close(got[i], ref[i], atol=1e-5, rtol=1e-5, msg=f"block {i}")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(r["rel_error"] == 0.0 for r in results)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_next_block_inputs_come_from_the_pruned_model(method):
    model = make_model("llama")
    ids = torch.randint(0, 128, (NSAMPLES, SEQLEN))
    got, results = _engine_outputs(model, ids, method, [0.5, 0.5], options={"blocksize": 16}, engine="single",
                                   batch_size=2, diag_nsamples=3)
    ref = _reference_block_outputs(model, ids)
    for i in range(2):
        torch.testing.assert_close(got[i], ref[i], atol=1e-5, rtol=1e-5)
    assert all(r["rel_error"] > 0 and r["cum_error"] > 0 for r in results)
    assert all(abs(r["measured"] - 0.5) < 1e-3 for r in results)


def test_local_error_on_the_diagnostic_windows():
    """rel_error = ‖dense block(X) − pruned block(X)‖ / ‖dense block(X)‖ over the diagnostic windows,
    recomputed here from a copy of the dense model and the pruned model's own block inputs."""
    model = make_model("qwen2")
    dense = make_model("qwen2")
    dense.load_state_dict(model.state_dict())
    ids = torch.randint(0, 128, (NSAMPLES, SEQLEN))
    inputs = {}
    results = prune_blocks(model, ids, "wanda", [0.6, 0.6], progress=False, engine="single", diag_nsamples=2,
                           on_block_end=lambda i, X, *_: inputs.__setitem__(i, X[:2].clone()))
    X0, kwargs = capture_inputs(dense, ids[:2])
    for i, X in enumerate([X0, inputs[0]]):
        kw = dict(kwargs[i])
        with torch.no_grad():
            ref = _blocks(dense)[i](X, **kw)
            new = _blocks(model)[i](X, **kw)
        ref, new = (t[0] if isinstance(t, (tuple, list)) else t for t in (ref, new))
        expected = float((ref - new).norm() / ref.norm())
        assert results[i]["rel_error"] == pytest.approx(expected, rel=1e-4)


def test_without_the_diagnostic_the_local_error_is_not_measured():
    model = make_model("llama")
    results = prune_blocks(model, torch.randint(0, 128, (3, SEQLEN)), "wanda", [0.5, 0.5], progress=False,
                           engine="single", diag_nsamples=0)
    assert [r["rel_error"] for r in results] == [None, None]


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_recompute_mode_gives_the_same_weights(method, monkeypatch):
    ids = torch.randint(0, 128, (NSAMPLES, SEQLEN))
    a, b = make_model("mistral"), make_model("mistral")
    b.load_state_dict(a.state_dict())
    prune_blocks(a, ids, method, [0.5, 0.7], progress=False, engine="single", batch_size=2)
    monkeypatch.setattr(single_pass, "choose_mode", lambda *_: "recompute")
    prune_blocks(b, ids, method, [0.5, 0.7], progress=False, engine="single", batch_size=2)
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(v, w), k


def test_memory_short_falls_back_to_recompute(monkeypatch):
    import sparsellm.models.load as load

    model = make_model("llama")
    X, _ = capture_inputs(model, torch.randint(0, 128, (2, SEQLEN)))
    block = _blocks(model)[0]
    need = single_pass.live_bytes(model, block, 2 * SEQLEN, X.dtype)
    monkeypatch.setattr(load, "free_memory", lambda: 2 * need)
    assert single_pass.choose_mode(model, block, X) == "single"
    monkeypatch.setattr(load, "free_memory", lambda: 2 * need - 1)
    assert single_pass.choose_mode(model, block, X) == "recompute"


def test_groups_that_do_not_read_one_tensor_are_refused(monkeypatch):
    bad = (("self_attn.q_proj", "self_attn.o_proj"), ("self_attn.k_proj", "self_attn.v_proj"),
           ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))
    monkeypatch.setattr(arch.Arch, "groups", property(lambda self: bad))
    model = make_model("llama")
    with pytest.raises(UsageError, match="o_proj does not read the same tensor as self_attn.q_proj"):
        prune_blocks(model, torch.randint(0, 128, (3, SEQLEN)), "wanda", [0.5, 0.5], progress=False,
                     engine="single")


def _recording_windows(monkeypatch):
    made = []

    class Recorded(single_pass._Window):
        def __init__(self, run=None):
            super().__init__(run)
            made.append(self)

    monkeypatch.setattr(single_pass, "_Window", Recorded)
    return made


def test_an_error_while_pruning_leaves_no_suspended_forward_and_no_hook(monkeypatch):
    model = make_model("llama")
    X, kwargs = capture_inputs(model, torch.randint(0, 128, (4, SEQLEN)))
    block = _blocks(model)[0]
    threads = threading.active_count()
    made = _recording_windows(monkeypatch)

    def on_group(names, st):
        if names[0].endswith("o_proj"):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"), torch.no_grad():
        single_pass.forward_in_stages(model, block, X, kwargs[0], torch.empty_like(X), 1, "norm", on_group)
    assert threading.active_count() == threads
    assert len(made) == 4 and all(w._g.dead for w in made)  # every started forward was unwound
    assert all(not m._forward_pre_hooks for m in block.modules())


def test_an_error_while_unwinding_keeps_the_first_error_and_unwinds_every_forward(monkeypatch):
    model = make_model("llama")
    X, kwargs = capture_inputs(model, torch.randint(0, 128, (4, SEQLEN)))
    block = _blocks(model)[0]
    made = _recording_windows(monkeypatch)
    mlp_forward = block.mlp.forward

    def forward(*a, **k):
        try:
            return mlp_forward(*a, **k)
        finally:
            if single_pass._tls.window.abort:
                raise ValueError("raised while unwinding")

    monkeypatch.setattr(block.mlp, "forward", forward)

    def on_group(names, st):
        if names[0].endswith("down_proj"):
            raise RuntimeError("the real pruning error")

    with pytest.raises(RuntimeError, match="the real pruning error"), torch.no_grad():
        single_pass.forward_in_stages(model, block, X, kwargs[0], torch.empty_like(X), 1, "norm", on_group)
    assert len(made) == 4 and all(w._g.dead for w in made)


def test_single_engine_without_greenlet_is_a_usage_error_before_any_work(monkeypatch):
    import sys

    from sparsellm.pipeline import PruneConfig

    monkeypatch.setitem(sys.modules, "greenlet", None)
    with pytest.raises(UsageError, match="greenlet"):
        PruneConfig.from_flat(prune_method="wanda", sparsity_ratio=0.5, engine="single").validate()
    PruneConfig.from_flat(prune_method="wanda", sparsity_ratio=0.5, engine="block").validate()


def test_the_forwards_run_in_the_calling_thread_without_autograd(monkeypatch):
    """Torch ops run several times slower in a second OS thread (its own OpenMP team and CUDA state): every
    micro-batch's forward runs in the caller's thread, in no_grad, and the caller's grad mode is kept."""
    model = make_model("llama")
    X, kwargs = capture_inputs(model, torch.randint(0, 128, (4, SEQLEN)))
    block = _blocks(model)[0]
    seen = []
    h = block.mlp.down_proj.register_forward_pre_hook(
        lambda mod, args: seen.append((threading.get_ident(), torch.is_grad_enabled())))
    Y = torch.empty_like(X)
    try:
        with torch.enable_grad():
            single_pass.forward_in_stages(model, block, X, kwargs[0], Y, 1, "norm", lambda names, st: None)
            assert torch.is_grad_enabled()
    finally:
        h.remove()
    assert seen == [(threading.get_ident(), False)] * 4
    assert Y.grad_fn is None and not Y.requires_grad


@pytest.mark.parametrize("settings", [dict(prune_method="sparsegpt", sparsity_ratio=0.5),
                                      dict(prune_method="wanda", sparsity_type="2:4"),
                                      dict(prune_method="wanda", sparsity_ratio=0.6, allocation="owl",
                                           owl_granularity="layer")])
def test_lazy_path_with_the_single_engine_equals_the_in_memory_path(tmp_path, settings):
    from test_lazy import _assert_same, _in_memory, _lazy, _save

    d = _save(make_model("llama", seed=1, attn="sdpa"), tmp_path / "in")
    ids = torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    settings = dict(nsamples=4, seqlen=16, engine="single", **settings)
    mem, r1 = _in_memory(d, ids, **settings)
    _, r2 = _lazy(d, tmp_path / "out", ids, **settings)
    _assert_same(mem, tmp_path / "out")
    assert r1["options"]["engine"] == r2["options"]["engine"] == "single"
    assert [b["cum_error"] for b in r2["blocks"]] == [b["cum_error"] for b in r1["blocks"]]


def test_cli_single_engine_resumes_byte_identically_and_refuses_another_engine(tmp_path, tokenizer, calib_txt,
                                                                               capsys):
    from sparsellm.cli import main
    from test_lazy import _Killed, _argv, _interrupted, _model_dir, _one_line_error, _shards

    d = _model_dir(tmp_path, tokenizer)
    assert main(_argv(d, tmp_path / "ref", calib_txt, "--engine", "single")) == 0
    _interrupted(tmp_path, d, calib_txt)  # a block-engine run killed after block 0
    _one_line_error(capsys, _argv(d, tmp_path / "out", calib_txt, "--resume", "--engine", "single"), "engine")
    import shutil

    shutil.rmtree(tmp_path / "out.partial")
    from sparsellm.runs import stream

    real = stream.Partial.block_done

    def block_done(self, i, X, D, result):
        real(self, i, X, D, result)
        if i == 1:
            raise _Killed

    stream.Partial.block_done = block_done
    try:
        with pytest.raises(_Killed):
            main(_argv(d, tmp_path / "out", calib_txt, "--engine", "single"))
    finally:
        stream.Partial.block_done = real
    assert main(_argv(d, tmp_path / "out", calib_txt, "--engine", "single", "--resume")) == 0
    assert _shards(tmp_path / "out") == _shards(tmp_path / "ref")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["prune"]["options"]["engine"] == "single"
    assert "engine single" in (tmp_path / "out" / "report.md").read_text()


def test_atp_search_trials_and_losa_prunes_use_the_chosen_engine(tmp_path, tokenizer, monkeypatch):
    """`--engine` reaches every prune: the β search's trials, and LoSA's re-prunes (each spied on)."""
    from sparsellm.adapt import losa
    from sparsellm.allocate import atp_search
    from sparsellm.engine import prune_blocks as real

    seen = []

    def spy(*args, **kw):
        seen.append(kw.get("engine", "block"))
        return real(*args, **kw)

    monkeypatch.setattr(atp_search, "prune_blocks", spy)
    model = make_model("llama", num_hidden_layers=3, max_position_embeddings=64)
    ids = torch.randint(3, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    rep = atp_search.search(model, tokenizer, ids, "wanda", 0.5, step=0.1, objective_seqlen=16, objective_windows=1,
                            progress=False, strategy="grid", engine="single")
    assert len(seen) == len(rep["trials"]) >= 2 and set(seen) == {"single"}
    seen.clear()
    monkeypatch.setattr(losa, "prune_blocks", spy)
    from conftest import sentences
    from sparsellm.adapt import finetune
    from sparsellm.adapt.train import text_examples
    from test_losa import cfg

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(sentences(300)), encoding="utf-8")
    ex = text_examples(tokenizer, str(corpus), 8, 32, seed=1)
    rep = finetune(make_model("llama"), tokenizer, cfg(corpus, engine="single", steps=2), ex, progress=False)
    assert len(seen) == 2 and set(seen) == {"single"}
    assert abs(rep["measured"]["sparsity"] - 0.5) < 0.02


def test_resume_of_a_run_started_before_the_engine_setting(tmp_path, tokenizer, calib_txt):
    """An OUT.partial whose resume.json predates `engine` resumes as the block engine it ran with."""
    from sparsellm.cli import main
    from test_lazy import _argv, _interrupted, _model_dir, _shards

    d = _model_dir(tmp_path, tokenizer)
    assert main(_argv(d, tmp_path / "ref", calib_txt)) == 0
    _interrupted(tmp_path, d, calib_txt)
    state_file = tmp_path / "out.partial" / "resume.json"
    state = json.loads(state_file.read_text())
    assert state["settings"].pop("engine") == "block"
    state_file.write_text(json.dumps(state))
    assert main(_argv(d, tmp_path / "out", calib_txt, "--resume", "--engine", "single")) == 2
    assert main(_argv(d, tmp_path / "out", calib_txt, "--resume")) == 0
    assert _shards(tmp_path / "out") == _shards(tmp_path / "ref")

