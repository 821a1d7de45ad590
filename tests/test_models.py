"""The architecture table's accessors, model resolution, and no import of `structured` from `models`."""

from __future__ import annotations

import pytest
import torch

from conftest import MODEL_TYPES, make_model
from sparsellm.errors import UsageError
from sparsellm.models import (ARCHITECTURES, block_linears, context_length, get_arch, get_blocks,
                              resolve_model)

LLAMA_LIKE = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
OPT = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"}


def test_get_blocks_and_linears(family):
    model = make_model(family)
    assert model.config.model_type == MODEL_TYPES[family]
    blocks = get_blocks(model)
    expected = model.model.decoder.layers if family == "opt" else model.model.layers
    assert blocks is expected
    assert len(blocks) == model.config.num_hidden_layers
    for block in blocks:
        lin = block_linears(model, block)
        assert set(lin) == (OPT if family == "opt" else LLAMA_LIKE)
        for name, mod in lin.items():
            assert mod is block.get_submodule(name) and isinstance(mod, torch.nn.Linear)
        # every nn.Linear of the block is covered, nothing else
        all_linears = {n for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
        assert all_linears == set(lin)
    # GQA shapes survive: k_proj is narrower than q_proj except for OPT
    q, k = lin["self_attn.q_proj"], lin["self_attn.k_proj"]
    assert (k.out_features < q.out_features) == (family != "opt")


def test_table_covers_exactly_the_families():
    assert set(ARCHITECTURES) == {"llama", "mistral", "qwen2", "gemma3_text", "opt"}


def test_unsupported_model_type_raises():
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(0)
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=128, n_positions=64))
    with pytest.raises(UsageError, match="gpt2"):
        get_arch(gpt2)
    with pytest.raises(UsageError):
        get_blocks(gpt2)


def test_block_without_expected_linear_raises():
    model = make_model("llama")
    block = model.model.layers[0]
    block.mlp.gate_proj = torch.nn.Identity()
    with pytest.raises(UsageError, match="gate_proj"):
        block_linears(model, block)


def test_context_length():
    assert context_length(make_model("llama")) == 128
    assert context_length(make_model("opt", max_position_embeddings=64)) == 64


def test_resolve_model(tmp_path, saved_model_dir):
    assert resolve_model(str(saved_model_dir)) == ("dir", saved_model_dir.resolve())
    assert resolve_model("HuggingFaceTB/SmolLM2-135M") == ("hub", None)
    with pytest.raises(UsageError):
        resolve_model(str(tmp_path / "missing"))
    with pytest.raises(UsageError):
        resolve_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(UsageError):
        resolve_model("no-such-model")
    with pytest.raises(UsageError):
        resolve_model(str(tmp_path))  # a directory without config.json




def _import_graph() -> dict[str, set[str]]:
    """{module: sparsellm modules it imports}, from every import statement in sparsellm's source (module level
    and inside functions), relative imports resolved."""
    import ast
    from pathlib import Path

    import sparsellm

    root = Path(sparsellm.__file__).parent
    files = {}
    for f in root.rglob("*.py"):
        parts = ("sparsellm",) + f.relative_to(root).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    graph = {}
    for mod, f in files.items():
        package = mod if f.name == "__init__.py" else mod.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                edges.add(target)
                edges |= {f"{target}.{a.name}" for a in node.names}  # `from . import shrink`
        graph[mod] = {e for e in edges if e in files}
    return graph


def test_models_never_imports_structured():
    graph = _import_graph()
    assert "sparsellm.models.arch" in graph["sparsellm.structured.io"]  # the walk sees real imports
    assert "sparsellm.errors" in graph["sparsellm.structured"]  # ... function-level ones too (prune_structured)
    starts = [m for m in graph if m == "sparsellm.models" or m.startswith("sparsellm.models.")]
    assert starts
    path = {m: [m] for m in starts}  # breadth-first over everything models reaches
    todo = list(starts)
    while todo:
        mod = todo.pop(0)
        for dep in sorted(graph[mod]):
            if dep not in path:
                path[dep] = path[mod] + [dep]
                todo.append(dep)
    bad = [" -> ".join(p) for m, p in path.items()
           if m == "sparsellm.structured" or m.startswith("sparsellm.structured.")]
    assert not bad, bad
