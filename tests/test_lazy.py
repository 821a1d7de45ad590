"""Models larger than memory: the lazy (block-by-block, from the shards) path prunes exactly like the
in-memory path, streams a sharded output that vanilla transformers loads, never holds more than two blocks,
resumes byte-identically after a kill, and refuses bad input before any work."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from conftest import make_model
from transformers import AutoModelForCausalLM

from sparsellm.errors import UsageError
from sparsellm.models import block_linears, get_blocks
from sparsellm.models.sharded import INDEX, LazyCheckpoint, ShardWriter, lazy_model
from sparsellm.onload import onloader
from sparsellm.pipeline import PruneConfig, prune


def _save(model, d, shard="20KB"):
    model.save_pretrained(d, max_shard_size=shard)
    return d


def _in_memory(d, ids, **settings):
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    report = prune(model, None, PruneConfig.from_flat(**settings), calib_ids=ids, progress=False)
    return model, report


def _lazy(d, out, ids, **settings):
    model = lazy_model(d, torch.float32)
    writer = ShardWriter(out, model, torch.float32)
    onloader(model).lazy.writer = writer
    report = prune(model, None, PruneConfig.from_flat(**settings), calib_ids=ids, progress=False)
    writer.write_rest(model)
    writer.finish(model)
    return model, report


def _assert_same(mem_model, out):
    """The streamed output, loaded by vanilla transformers, equals the in-memory pruned model exactly."""
    loaded, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    a, b = mem_model.state_dict(), loaded.state_dict()
    assert set(a) == set(b)
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert diff == []


CASES = [  # (family, settings): every pruner, allocator and N:M pattern, and every family
    ("llama", dict(prune_method="magnitude", sparsity_ratio=0.6)),
    ("llama", dict(prune_method="wanda", sparsity_ratio=0.5)),
    ("llama", dict(prune_method="sparsegpt", sparsity_ratio=0.5)),
    ("llama", dict(prune_method="wanda", sparsity_type="2:4")),
    ("llama", dict(prune_method="sparsegpt", sparsity_type="4:8")),
    ("llama", dict(prune_method="magnitude", sparsity_type="2:4")),
    ("llama", dict(prune_method="wanda", sparsity_ratio=0.6, allocation="atp", atp_beta=0.05)),
    ("llama", dict(prune_method="wanda", sparsity_ratio=0.6, allocation="owl")),
    ("llama", dict(prune_method="sparsegpt", sparsity_ratio=0.6, allocation="owl", owl_granularity="layer")),
    ("llama", dict(prune_method="wanda", sparsity_ratio=0.6, allocation="rmi", rmi_nsamples=4)),
    ("llama_untied", dict(prune_method="sparsegpt", sparsity_ratio=0.5)),
    ("qwen2", dict(prune_method="sparsegpt", sparsity_ratio=0.5)),
    ("mistral", dict(prune_method="wanda", sparsity_ratio=0.5)),
    ("gemma3", dict(prune_method="sparsegpt", sparsity_ratio=0.5)),
    ("opt", dict(prune_method="sparsegpt", sparsity_ratio=0.5)),
    ("opt", dict(prune_method="wanda", sparsity_type="2:4")),
]


@pytest.mark.parametrize("family,settings", CASES, ids=[f"{f}-{'-'.join(map(str, s.values()))}" for f, s in CASES])
def test_lazy_path_prunes_exactly_like_the_in_memory_path(tmp_path, family, settings):
    d = _save(make_model(family, seed=1, attn="sdpa"), tmp_path / "in")
    ids = torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    settings = dict(nsamples=4, seqlen=16, **settings)
    mem, r1 = _in_memory(d, ids, **settings)
    _, r2 = _lazy(d, tmp_path / "out", ids, **settings)
    _assert_same(mem, tmp_path / "out")
    assert r2["measured"] == r1["measured"] and r2["input"]["zeros"] == r1["input"]["zeros"]
    assert [b["rel_error"] for b in r2["blocks"]] == [b["rel_error"] for b in r1["blocks"]]
    assert r2["allocation"]["rates"] == r1["allocation"]["rates"]


def test_at_most_two_blocks_are_materialised(tmp_path, monkeypatch):
    """Counted independently of the onloader: every read of the checkpoint records how many blocks hold real
    (non-meta) weights at that moment, and which block it reads."""
    model_src = make_model("llama", seed=2, num_hidden_layers=5)
    d = _save(model_src, tmp_path / "in")
    model = lazy_model(d, torch.float32)
    blocks = get_blocks(model)
    reads, resident = [], []
    real = LazyCheckpoint.read

    def spy(self, names, dtype=None, device="cpu"):
        out = real(self, names, dtype, device)
        layers = {n.split(".")[2] for n in names if n.startswith("model.layers.")}
        reads.append(layers)
        resident.append(sum(any(p.device.type != "meta" for p in b.parameters()) for b in blocks) + len(layers))
        return out

    monkeypatch.setattr(LazyCheckpoint, "read", spy)
    writer = ShardWriter(tmp_path / "out", model, torch.float32)
    onloader(model).lazy.writer = writer
    ids = torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    prune(model, None, PruneConfig.from_flat(prune_method="sparsegpt", nsamples=4, seqlen=16), calib_ids=ids,
          progress=False)
    block_reads = [r for r in reads if r]
    assert block_reads == [{str(i)} for i in range(5)]  # each block read once, in order
    assert max(resident) <= 2
    assert all(p.device.type == "meta" for b in blocks for p in b.parameters())  # all dropped afterwards


# ------------------------------------------------------------------ the prune run: streamed output, resume


def _model_dir(tmp_path, tokenizer, family="llama", layers=4, dtype=torch.float32, **kw):
    d = tmp_path / "model"
    _save(make_model(family, seed=3, num_hidden_layers=layers, **kw).to(dtype), d, shard="30KB")
    tokenizer.save_pretrained(d)
    return d


def _argv(d, out, calib, *extra):
    return ["prune", "--model", str(d), "--load", "lazy", "--prune_method", "sparsegpt", "--nsamples", "4",
            "--seqlen", "16", "--calib_dataset", str(calib), "--eval", "none", "--out", str(out), "--quiet", *extra]


def _shards(out):
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(out.glob("*.safetensors"))}


@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16])
def test_cli_streamed_output_equals_the_in_memory_save(tmp_path, tokenizer, calib_txt, stored):
    """Forwards in float32 either way; the output is saved in the checkpoint's own dtype, like --load memory's."""
    from sparsellm.cli import main

    d = _model_dir(tmp_path, tokenizer, dtype=stored)
    assert main(_argv(d, tmp_path / "lazy", calib_txt)) == 0
    assert main(_argv(d, tmp_path / "mem", calib_txt)[:4] + ["memory"] + _argv(d, tmp_path / "mem", calib_txt)[5:]) == 0
    lazy, mem = tmp_path / "lazy", tmp_path / "mem"
    index = json.loads((lazy / INDEX).read_text())
    assert sorted(set(index["weight_map"].values())) == sorted(_shards(lazy))  # one shard per block + the rest
    assert len(_shards(lazy)) == 4 + 1
    a = AutoModelForCausalLM.from_pretrained(lazy, dtype="auto").state_dict()
    b = AutoModelForCausalLM.from_pretrained(mem, dtype="auto").state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((lazy / "config.json").read_text())["dtype"] == str(stored).removeprefix("torch.")
    assert json.loads((mem / "config.json").read_text())["dtype"] == str(stored).removeprefix("torch.")
    assert all(t.dtype == stored for t in a.values())
    ra, rb = (json.loads((p / "report.json").read_text()) for p in (lazy, mem))
    assert ra["prune"]["measured"] == rb["prune"]["measured"]
    assert json.loads((lazy / "sparsity_config.json").read_text())["modules"] == \
        json.loads((mem / "sparsity_config.json").read_text())["modules"]
    assert not (tmp_path / "lazy.partial").exists()


class _Killed(BaseException):
    pass


@pytest.mark.parametrize("where", ["after_block", "mid_shard"])
def test_cli_resume_after_a_kill_gives_byte_identical_shards(tmp_path, tokenizer, calib_txt, monkeypatch, where):
    from sparsellm.cli import main
    from sparsellm.runs import stream

    d = _model_dir(tmp_path, tokenizer)
    assert main(_argv(d, tmp_path / "ref", calib_txt)) == 0
    want = _shards(tmp_path / "ref")
    out = tmp_path / "out"
    if where == "after_block":  # killed after block 1's shard and state were written
        real = stream.Partial.block_done

        def block_done(self, i, X, D, result):
            real(self, i, X, D, result)
            if i == 1:
                raise _Killed

        monkeypatch.setattr(stream.Partial, "block_done", block_done)
    else:  # killed while block 2's shard was being written
        real = ShardWriter.write_block

        def write_block(self, model, i, block):
            if i == 2:
                (self.dir / f".{self.shard(i)}.tmp").write_bytes(b"half a shard")
                raise _Killed
            real(self, model, i, block)

        monkeypatch.setattr(ShardWriter, "write_block", write_block)
    with pytest.raises(_Killed):
        main(_argv(d, out, calib_txt))
    monkeypatch.undo()
    assert not out.exists()  # a half-finished run never looks like a model
    partial = tmp_path / "out.partial"
    assert json.loads((partial / "resume.json").read_text())["block"] == 2
    assert main(_argv(d, out, calib_txt)) == 2  # not without --resume: nothing is lost
    assert main(_argv(d, out, calib_txt, "--resume")) == 0
    assert _shards(out) == want
    assert json.loads((out / "report.json").read_text())["resumed_at_block"] == 2
    assert not partial.exists()


def _interrupted(tmp_path, d, calib):
    """Leave OUT.partial from a run killed after block 0."""
    from sparsellm.cli import main
    from sparsellm.runs import stream

    real = stream.Partial.block_done

    def block_done(self, i, X, D, result):
        real(self, i, X, D, result)
        raise _Killed

    stream.Partial.block_done = block_done
    try:
        with pytest.raises(_Killed):
            main(_argv(d, tmp_path / "out", calib))
    finally:
        stream.Partial.block_done = real


def _one_line_error(capsys, argv, *expect):
    from sparsellm.cli import main

    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for e in expect:
        assert e in err, err
    return err


def test_cli_resume_refuses_other_settings_and_another_model(tmp_path, tokenizer, calib_txt, capsys):
    d = _model_dir(tmp_path, tokenizer)
    _interrupted(tmp_path, d, calib_txt)
    before = _shards(tmp_path / "out.partial")
    _one_line_error(capsys, _argv(d, tmp_path / "out", calib_txt, "--resume", "--sparsity_ratio", "0.6"),
                    "sparsity_ratio")
    _one_line_error(capsys, _argv(d, tmp_path / "out", calib_txt, "--resume", "--seed", "1"), "seed = 0")
    other_calib = tmp_path / "other.txt"
    other_calib.write_text(calib_txt.read_text().replace(" the ", " a "))
    _one_line_error(capsys, _argv(d, tmp_path / "out", other_calib, "--resume"), "calib")
    other = tmp_path / "other"
    _save(make_model("llama", seed=9, num_hidden_layers=4), other, shard="30KB")
    tokenizer.save_pretrained(other)
    err = _one_line_error(capsys, _argv(other, tmp_path / "out", calib_txt, "--resume"), "input.path")
    assert len(err) < 600
    assert _shards(tmp_path / "out.partial") == before  # nothing lost


def test_cli_bad_checkpoints_and_devices_are_refused_before_any_work(tmp_path, tokenizer, calib_txt, capsys):
    d = _model_dir(tmp_path, tokenizer)
    files = sorted(d.glob("*.safetensors"))
    _one_line_error(capsys, _argv(d, tmp_path / "o1", calib_txt, "--device", "cuda"), "--device cuda")
    _one_line_error(capsys, _argv(d, tmp_path / "o1", calib_txt, "--device", "cuda:x"), "--device")
    original = (d / INDEX).read_text()
    index = json.loads(original)
    moved = next(k for k, v in index["weight_map"].items() if v == files[0].name)
    index["weight_map"][moved] = files[1].name
    (d / INDEX).write_text(json.dumps(index))
    _one_line_error(capsys, _argv(d, tmp_path / "o2", calib_txt), "disagrees with")
    (d / INDEX).write_text(original)
    files[1].unlink()
    _one_line_error(capsys, _argv(d, tmp_path / "o3", calib_txt), "missing")
    assert not any((tmp_path / o).exists() for o in ("o1", "o2", "o3", "o1.partial", "o2.partial", "o3.partial"))


def test_cli_a_disk_without_room_is_refused(tmp_path, tokenizer, calib_txt, capsys, monkeypatch):
    import shutil
    from collections import namedtuple

    d = _model_dir(tmp_path, tokenizer)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 1000, 1000))
    _one_line_error(capsys, _argv(d, tmp_path / "o", calib_txt), "GiB free")
    args = _argv(d, tmp_path / "m", calib_txt)
    args[args.index("lazy")] = "memory"
    _one_line_error(capsys, args, "GiB free")
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists() and not (tmp_path / "m").exists()


def test_lazy_checkpoint_refuses_a_wrong_shape(tmp_path):
    from safetensors.torch import load_file, save_file

    d = _save(make_model("llama", seed=1), tmp_path / "in")
    index = json.loads((d / INDEX).read_text())
    key = "model.layers.0.mlp.down_proj.weight"
    f = d / index["weight_map"][key]
    state = load_file(str(f))
    state[key] = state[key][:, :-1].contiguous()
    save_file(state, str(f), metadata={"format": "pt"})
    with pytest.raises(UsageError, match="shape"):
        lazy_model(d)


def test_block_linears_of_a_lazy_model_are_meta_until_onloaded(tmp_path):
    d = _save(make_model("llama", seed=1), tmp_path / "in")
    model = lazy_model(d)
    on = onloader(model)
    block = on.block(1)
    assert all(lin.weight.device.type == "cpu" for lin in block_linears(model, block).values())
    on.release(1)
    assert all(lin.weight.device.type == "meta" for lin in block_linears(model, block).values())
    emb = model.get_input_embeddings()
    assert emb.weight.device.type == "meta"  # read only while the block-0 inputs are captured
    with on.embeddings():
        assert emb.weight.device.type == "cpu"
        assert torch.equal(emb.weight, AutoModelForCausalLM.from_pretrained(d).get_input_embeddings().weight)
    assert emb.weight.device.type == "meta"


def test_cli_lazy_prune_evaluates_the_pruned_shards_like_the_in_memory_run(tmp_path, tokenizer, calib_txt):
    """The perplexity a streamed prune reports is that of its output, evaluated block by block from the
    written shards: the in-memory run's own number on the same windows."""
    from sparsellm.cli import main

    d = _model_dir(tmp_path, tokenizer)
    ev = ["--eval", "wikitext2", "--eval_seqlen", "16", "--max_windows", "3", "--eval_dense"]
    lazy = _argv(d, tmp_path / "lazy", calib_txt)
    mem = list(lazy)
    mem[mem.index("lazy")] = "memory"
    mem[mem.index(str(tmp_path / "lazy"))] = str(tmp_path / "mem")
    assert main(lazy[:-3] + ev + lazy[-3:]) == 0
    assert main(mem[:-3] + ev + mem[-3:]) == 0
    a, b = (json.loads((tmp_path / n / "report.json").read_text()) for n in ("lazy", "mem"))
    for key in ("metrics", "metrics_dense"):
        pa, pb = a["eval" if key == "metrics" else "eval_dense"], b["eval" if key == "metrics" else "eval_dense"]
        assert pa.keys() == pb.keys()
        for metric in pa:
            assert pa[metric]["ppl"] == pytest.approx(pb[metric]["ppl"], rel=1e-5)
    assert a["eval"] != a["eval_dense"]


def test_cli_a_kill_between_the_next_inputs_and_the_state_resumes_byte_identically(tmp_path, tokenizer, calib_txt,
                                                                                  monkeypatch):
    """Killed after block 2's inputs were saved but before the state said so: the run resumes at block 1
    from block 1's own inputs (found by a breaker: a single inputs file was then already block 2's)."""
    from sparsellm.cli import main
    from sparsellm.runs import stream

    d = _model_dir(tmp_path, tokenizer)
    assert main(_argv(d, tmp_path / "ref", calib_txt)) == 0
    real = stream.write_json_atomic

    def write_json_atomic(path, obj):
        if path.name == "resume.json" and obj.get("block") == 2:
            raise _Killed
        return real(path, obj)

    monkeypatch.setattr(stream, "write_json_atomic", write_json_atomic)
    with pytest.raises(_Killed):
        main(_argv(d, tmp_path / "out", calib_txt))
    monkeypatch.undo()
    assert main(_argv(d, tmp_path / "out", calib_txt, "--resume")) == 0
    assert _shards(tmp_path / "out") == _shards(tmp_path / "ref")


def test_cli_resume_refuses_a_changed_config_and_a_damaged_partial(tmp_path, tokenizer, calib_txt, capsys):
    d = _model_dir(tmp_path, tokenizer)
    _interrupted(tmp_path, d, calib_txt)
    partial = tmp_path / "out.partial"
    original = (d / "config.json").read_text()
    (d / "config.json").write_text(json.dumps({**json.loads(original), "rms_norm_eps": 0.5}))
    _one_line_error(capsys, _argv(d, tmp_path / "out", calib_txt, "--resume"), "input.files.config.json")
    (d / "config.json").write_text(original)
    for f in partial.glob("inputs-*.pt"):
        f.write_bytes(b"garbage")
    _one_line_error(capsys, _argv(d, tmp_path / "out", calib_txt, "--resume"), "damaged")
    next(partial.glob("model-*.safetensors")).unlink()
    _one_line_error(capsys, _argv(d, tmp_path / "out", calib_txt, "--resume"), "lacks the shard")
    assert not (tmp_path / "out").exists()


def test_cli_a_refused_run_leaves_no_partial_and_an_input_named_like_it_is_not_touched(tmp_path, tokenizer,
                                                                                        calib_txt, capsys):
    d = _model_dir(tmp_path, tokenizer)
    _one_line_error(capsys, _argv(d, tmp_path / "o", calib_txt, "--sparsity_ratio", "0.5", "--allocation", "file:x.json"),
                    "x.json")
    assert not (tmp_path / "o.partial").exists()
    named = tmp_path / "m.partial"
    d.rename(named)
    _one_line_error(capsys, _argv(named, tmp_path / "m", calib_txt), "is the input")
    assert (named / "config.json").is_file()
