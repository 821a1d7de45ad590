"""Structured pruning keeps the best admissible heads and channels: `plan_block` against a brute force over
every admissible kept set, and end to end on a tiny llama, where the importance (Wanda-sp) is recomputed
here from the o_proj / down_proj inputs captured by our own hooks, the best kept sets are found by brute
force, and the pruned weights must be exactly the original rows / columns of those heads and channels.

The rules (sparsellm/structured/shrink.py), at rate r, with round = round half up:
  * channels: I − min(round(r·I), I − 1) of the I MLP channels stay;
  * no GQA (n_kv = n_q): min(round(r·n_q), n_q − 1) single heads go, each with its K/V head;
  * gqa="query", G = n_q / n_kv > 1: every KV group of G query heads loses min(round(r·G), G − 1) heads,
    all KV heads stay;
  * gqa="group", G > 1: min(round(r·n_kv), n_kv − 1) whole KV groups go, with all their query heads.
Among the admissible kept sets of that size, the one with the largest total score is kept.
"""

from __future__ import annotations

import copy
import itertools
from decimal import ROUND_HALF_UP, Decimal

import pytest
import torch

from conftest import make_model
from sparsellm.structured import importance, plan_block, prune_structured


def _round_half_up(rate: float, n: int) -> int:
    return int((Decimal(repr(rate)) * n).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def _best(candidates, score):
    """The candidate index set (a tuple) with the largest total score, and its margin over the runner-up
    relative to the largest single score (so near-ties can be ruled out before comparing)."""
    cands = list(candidates)
    assert cands and cands[0], "no admissible kept set"
    totals = score[torch.tensor(cands)].sum(1)  # (candidates, kept) -> total score of each
    order = torch.argsort(totals, descending=True)
    margin = float("inf")
    if len(cands) > 1:
        margin = float(totals[order[0]] - totals[order[1]]) / float(score.abs().max())
    return sorted(cands[int(order[0])]), margin


def brute_force(scores: dict, n_q: int, n_kv: int, rate: float, gqa: str):
    """(kept query heads, kept KV heads, kept channels, smallest margin), by enumeration."""
    h, c = scores["heads"], scores["channels"]
    G = n_q // n_kv
    group = [j // G for j in range(n_q)]
    if G == 1:
        keep_n = n_q - min(_round_half_up(rate, n_q), n_q - 1)
        cands = itertools.combinations(range(n_q), keep_n)
    elif gqa == "query":
        k = min(_round_half_up(rate, G), G - 1)
        cands = (s for s in itertools.combinations(range(n_q), n_kv * (G - k))
                 if all(sum(group[j] == g for j in s) == G - k for g in range(n_kv)))
    else:
        m = min(_round_half_up(rate, n_kv), n_kv - 1)
        cands = (s for s in itertools.combinations(range(n_q), (n_kv - m) * G)
                 if all(sum(group[j] == group[i] for j in s) == G for i in s))  # whole groups only
    q, m_h = _best(cands, h)
    kv = q if G == 1 else sorted({group[j] for j in q})
    I = c.numel()
    ch, m_c = _best(itertools.combinations(range(I), I - min(_round_half_up(rate, I), I - 1)), c)
    return q, kv, ch, min(m_h, m_c)


PLANS = [
    # n_q, n_kv, I, rate, gqa
    (8, 2, 10, 0.5, "query"),    # G = 4: 2 heads per group
    (8, 2, 10, 0.3, "query"),    # round(1.2) = 1 per group; 3 channels
    (8, 2, 10, 0.9, "query"),    # round(3.6) = 4, capped at G − 1 = 3; 9 channels
    (6, 2, 10, 0.5, "query"),    # G = 3: round(1.5) = 2 (half up); 5 channels
    (6, 3, 10, 0.25, "query"),   # G = 2: round(0.5) = 1 (half up); round(2.5) = 3 channels (half up)
    (8, 2, 9, 0.1, "query"),     # round(0.4) = 0 heads; 1 channel
    (8, 4, 10, 0.5, "group"),    # 2 of 4 groups
    (8, 4, 10, 0.375, "group"),  # round(1.5) = 2 groups (half up)
    (8, 2, 10, 0.9, "group"),    # round(1.8) = 2, capped at n_kv − 1 = 1 group
    (6, 3, 12, 0.2, "group"),    # round(0.6) = 1 group
    (6, 6, 10, 0.5, "query"),    # no GQA: 3 single heads
    (6, 6, 10, 0.5, "group"),
    (5, 5, 10, 0.3, "query"),    # round(1.5) = 2 heads
    (4, 4, 8, 0.99, "group"),    # at least one head and one channel stay
    (4, 4, 8, 0.99, "query"),
    (8, 2, 10, 0.0, "query"),    # nothing goes
    (8, 4, 10, 0.0, "group"),
]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n_q,n_kv,I,rate,gqa", PLANS)
def test_plan_block_matches_brute_force(n_q, n_kv, I, rate, gqa, seed):
    g = torch.Generator().manual_seed(seed)
    scores = {"heads": torch.rand(n_q, generator=g, dtype=torch.float64) + 0.1,
              "channels": torch.rand(I, generator=g, dtype=torch.float64) + 0.1}
    q, kv, ch, margin = brute_force(scores, n_q, n_kv, rate, gqa)
    assert margin > 1e-9  # distinct optimum
    plan = plan_block(scores, n_q, n_kv, rate, gqa)
    assert plan == {"q": q, "kv": kv, "channels": ch}


# ------------------------------------------------------------------ end to end on a tiny llama

HD = 8  # head_dim of conftest's llama: hidden 32 / 4 heads


def _wanda_sp(model, ids):
    """Per block: head scores (n_q,) and channel scores (I,) = mean_i |W_ij| · ‖X_j‖₂ of o_proj / down_proj,
    X captured by forward pre-hooks on the dense model over all windows, in float64."""
    sq = {}

    def hook(key):
        def pre(mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sq[key] = sq.get(key, 0) + (x * x).sum(0)
        return pre

    layers = model.model.layers
    handles = [m.register_forward_pre_hook(hook((i, name)))
               for i, layer in enumerate(layers)
               for name, m in (("o", layer.self_attn.o_proj), ("down", layer.mlp.down_proj))]
    try:
        with torch.no_grad():
            for w in ids:
                model(w.unsqueeze(0))
    finally:
        for hd in handles:
            hd.remove()
    out = []
    for i, layer in enumerate(layers):
        o = layer.self_attn.o_proj.weight.detach().double().abs().mean(0) * sq[(i, "o")].sqrt()
        d = layer.mlp.down_proj.weight.detach().double().abs().mean(0) * sq[(i, "down")].sqrt()
        out.append({"heads": o.reshape(-1, HD).sum(1), "channels": d})
    return out


def _rows(idx_heads):
    return [h * HD + d for h in idx_heads for d in range(HD)]


@pytest.mark.parametrize("kv_heads", [2, 4])  # GQA (G = 2) and no GQA
@pytest.mark.parametrize("gqa", ["query", "group"])
@pytest.mark.parametrize("rates", [[0.95, 0.04], [0.04, 0.97]])
def test_end_to_end_keeps_the_brute_force_best(gqa, kv_heads, rates):
    """Rates keep few channels or remove few (64 channels: at most C(64, 3) kept sets to enumerate)."""
    model = make_model("llama", num_key_value_heads=kv_heads)
    ids = torch.randint(3, 128, (4, 24), generator=torch.Generator().manual_seed(0))
    dense = copy.deepcopy(model)
    ours = _wanda_sp(dense, ids)
    best = []
    for sc, r in zip(ours, rates):
        q, kv, ch, margin = brute_force(sc, 4, kv_heads, r, gqa)
        assert margin > 1e-4, "near-tie between two kept sets: pick another seed"
        best.append((q, kv, ch))

    imp = importance(model, ids, "wanda-sp", progress=False)
    prune_structured(model, rates, imp, gqa=gqa)
    for layer, old, (q, kv, ch) in zip(model.model.layers, dense.model.layers, best):
        a, oa = layer.self_attn, old.self_attn
        assert torch.equal(a.q_proj.weight, oa.q_proj.weight[_rows(q)])
        assert torch.equal(a.k_proj.weight, oa.k_proj.weight[_rows(kv)])
        assert torch.equal(a.v_proj.weight, oa.v_proj.weight[_rows(kv)])
        assert torch.equal(a.o_proj.weight, oa.o_proj.weight[:, _rows(q)])
        assert torch.equal(layer.mlp.gate_proj.weight, old.mlp.gate_proj.weight[ch])
        assert torch.equal(layer.mlp.up_proj.weight, old.mlp.up_proj.weight[ch])
        assert torch.equal(layer.mlp.down_proj.weight, old.mlp.down_proj.weight[:, ch])
