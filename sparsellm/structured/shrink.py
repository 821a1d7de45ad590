"""Physically remove attention heads and MLP channels from decoder blocks (structured pruning; the operator
behind Self-Pruner's per-layer rates, algorithms.md §9.3).

Block i at rate r loses round(r · I) (half up) of its I MLP intermediate channels (rows of gate/up, columns of down)
and about r of its query heads (rows of q, columns of o). GQA is respected in one of two ways:

    gqa="query"   the same number of query heads, round(r · G), leaves every KV group of G heads, so
                  every KV head is kept and still serves G' = G − k query heads (the default);
    gqa="group"   round(r · n_kv) whole KV groups go: their K/V heads and all their query heads.

Without GQA (n_kv = n_q) both remove single heads with their K/V. At least one head and one channel always
stay. The lowest-scoring heads, groups and channels go (scores from `importance`). With FLAP's bias
compensation, a removed input channel j of o_proj / down_proj adds W[:, j] · mean(x_j) to that layer's
bias (An et al., AAAI 2024, §3.3), creating the bias if the layer has none.

Which projections play which role, and which families are supported at all, comes from the architecture
table (`sparsellm.models.arch`: `struct_spec`, from each family's roles and its `structured` flag).
"""

from __future__ import annotations

import math


from ..errors import UsageError
from ..lazy import lazy_import, no_grad
from ..models.arch import Spec, struct_spec  # noqa: F401  (the table's view for structured pruning; re-exported)

torch = lazy_import("torch")
nn = lazy_import("torch.nn")

GQA_MODES = ("query", "group")


def geometry(model, block) -> tuple[int, int, int]:
    """(query heads, KV heads, head_dim) of one block, read from its current weights."""
    spec = struct_spec(model)
    hd = block.get_submodule(spec.attn).head_dim
    return block.get_submodule(spec.q).out_features // hd, block.get_submodule(spec.k).out_features // hd, hd


def _round(x: float) -> int:
    """Round half up (Python's round() sends 0.5 to 0)."""
    return int(math.floor(x + 0.5))


def plan_block(scores: dict, n_q: int, n_kv: int, rate: float, gqa: str = "query") -> dict:
    """Which query heads, KV heads and MLP channels block keeps at `rate`: sorted index lists
    {"q": [...], "kv": [...], "channels": [...]}. scores: {"heads": (n_q,), "channels": (I,)}."""
    if gqa not in GQA_MODES:
        raise UsageError(f"--gqa must be one of {', '.join(GQA_MODES)}, got {gqa!r}")
    G = n_q // n_kv
    h = scores["heads"]
    if G > 1 and gqa == "query":
        k = min(_round(rate * G), G - 1)
        q = []
        for g in range(n_kv):
            local = h[g * G:(g + 1) * G]
            q += sorted(g * G + int(j) for j in torch.argsort(local, descending=True)[:G - k])
        kv = list(range(n_kv))
    else:
        group = h.reshape(n_kv, G).sum(1)
        m = min(_round(rate * n_kv), n_kv - 1)
        kv = sorted(int(j) for j in torch.argsort(group, descending=True)[:n_kv - m])
        q = [g * G + j for g in kv for j in range(G)]
    c = scores["channels"]
    n_c = c.numel() - min(_round(rate * c.numel()), c.numel() - 1)
    channels = sorted(int(j) for j in torch.argsort(c, descending=True)[:n_c])
    return {"q": sorted(q), "kv": kv, "channels": channels}


def _rows(lin: nn.Linear, idx: torch.Tensor) -> nn.Linear:
    new = nn.Linear(lin.in_features, len(idx), bias=lin.bias is not None, dtype=lin.weight.dtype,
                    device=lin.weight.device)
    new.weight.data.copy_(lin.weight.data[idx])
    if lin.bias is not None:
        new.bias.data.copy_(lin.bias.data[idx])
    return new


def _cols(lin: nn.Linear, idx: torch.Tensor, comp: torch.Tensor | None) -> nn.Linear:
    """Keep input columns `idx`; `comp` (C_out,) is added to the bias (FLAP's compensation)."""
    bias = lin.bias is not None or comp is not None
    new = nn.Linear(len(idx), lin.out_features, bias=bias, dtype=lin.weight.dtype, device=lin.weight.device)
    new.weight.data.copy_(lin.weight.data[:, idx])
    if bias:
        b = lin.bias.data.clone() if lin.bias is not None else torch.zeros_like(new.bias.data)
        new.bias.data.copy_(b + (comp.to(b.dtype) if comp is not None else 0))
    return new


def _compensation(lin: nn.Linear, keep: torch.Tensor, stats) -> torch.Tensor | None:
    """W[:, removed] @ mean(x[removed]) in float64; None when nothing is removed (no bias is created then)."""
    removed = torch.ones(lin.in_features, dtype=torch.bool, device=lin.weight.device)
    removed[keep.to(removed.device)] = False
    if not removed.any():
        return None
    mean = (stats.total / stats.ntokens).to(device=lin.weight.device, dtype=torch.float64)
    return lin.weight.data.double()[:, removed] @ mean[removed]


def _set(block, name, module):
    parent, _, attr = name.rpartition(".")
    setattr(block.get_submodule(parent) if parent else block, attr, module)


@no_grad
def shrink_block(model, block, keep: dict, stats: dict | None = None, bias_compensation: bool = False) -> None:
    """Remove everything not in `keep` (from `plan_block`) from one block, in place. With
    `bias_compensation`, `stats` ({"o": LayerStats, "down": LayerStats} from `collect_stats`) are required."""
    spec = struct_spec(model)
    _, _, hd = geometry(model, block)
    attn = block.get_submodule(spec.attn)
    dev = block.get_submodule(spec.q).weight.device  # indices where the weights are (a model on a GPU)
    qi = torch.tensor([h * hd + d for h in keep["q"] for d in range(hd)], dtype=torch.long, device=dev)
    kvi = torch.tensor([h * hd + d for h in keep["kv"] for d in range(hd)], dtype=torch.long, device=dev)
    ci = torch.tensor(keep["channels"], dtype=torch.long, device=dev)
    o, down = block.get_submodule(spec.o), block.get_submodule(spec.down)
    comp_o = _compensation(o, qi, stats["o"]) if bias_compensation else None
    comp_d = _compensation(down, ci, stats["down"]) if bias_compensation else None
    _set(block, spec.q, _rows(block.get_submodule(spec.q), qi))
    _set(block, spec.k, _rows(block.get_submodule(spec.k), kvi))
    _set(block, spec.v, _rows(block.get_submodule(spec.v), kvi))
    _set(block, spec.o, _cols(o, qi, comp_o))
    for name in spec.up:
        _set(block, name, _rows(block.get_submodule(name), ci))
    _set(block, spec.down, _cols(down, ci, comp_d))
    attn.num_key_value_groups = len(keep["q"]) // len(keep["kv"])


def block_structure(model, block) -> dict:
    """Per-block widths as stored in structure.json."""
    spec = struct_spec(model)
    n_q, n_kv, hd = geometry(model, block)
    return {"num_attention_heads": n_q, "num_key_value_heads": n_kv, "head_dim": hd,
            "intermediate_size": block.get_submodule(spec.down).in_features}


def count_params(model) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
