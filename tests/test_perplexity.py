"""Perplexity against a manual NLL loop written here, on a fixed token stream."""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from conftest import FAMILIES, make_model
from sparsellm.errors import UsageError
from sparsellm.evaluate import perplexity

# the package re-exports the function under the module's name, so fetch the module itself
ppl_mod = importlib.import_module("sparsellm.evaluate.perplexity")
SEQLEN = 16


def _stream(n_tokens, seed=0):
    return torch.randint(0, 128, (1, n_tokens), generator=torch.Generator().manual_seed(seed))


def _manual(model, ids, seqlen, windows):
    """exp(mean NLL) over non-overlapping windows, with float64 log-softmax and an explicit gather."""
    total, count = 0.0, 0
    with torch.no_grad():
        for w in range(windows):
            x = ids[:, w * seqlen : (w + 1) * seqlen]
            logp = torch.log_softmax(model(x).logits[0].double(), dim=-1)
            for t in range(seqlen - 1):
                total -= float(logp[t, x[0, t + 1]])
                count += 1
    return math.exp(total / count), total / count, count


@pytest.fixture
def stream(monkeypatch):
    ids = _stream(5 * SEQLEN + 7)
    calls = []

    def fake_eval_tokens(tokenizer, dataset, seqlen):
        calls.append((dataset, seqlen))
        return ids

    monkeypatch.setattr(ppl_mod, "eval_tokens", fake_eval_tokens)
    return ids, calls


@pytest.mark.parametrize("family", FAMILIES)
def test_perplexity_matches_manual_loop(family, stream, tokenizer):
    ids, calls = stream
    model = make_model(family)
    r = perplexity(model, tokenizer, "wikitext2", SEQLEN, progress=False)
    ppl, nll, count = _manual(model, ids, SEQLEN, 5)
    assert calls == [("wikitext2", SEQLEN)]
    assert r["windows"] == 5 and r["total_windows"] == 5
    assert r["tokens"] == count == 5 * (SEQLEN - 1)
    assert r["ppl"] == pytest.approx(ppl, rel=1e-5)
    assert r["nll"] == pytest.approx(nll, rel=1e-5)
    assert r["metric"] == f"wikitext2_ppl@{SEQLEN}" and r["seqlen"] == SEQLEN
    # each window's NLL against the manual loop on that window alone
    assert len(r["window_nll"]) == 5
    for w in range(5):
        assert r["window_nll"][w] == pytest.approx(_manual(model, ids[:, w * SEQLEN:], SEQLEN, 1)[1], rel=1e-5)
    # a random model over 128 tokens is close to uniform
    assert 64 < r["ppl"] < 256


@pytest.mark.parametrize("max_windows,expected", [(1, 1), (2, 2), (5, 5), (50, 5)])
def test_max_windows(max_windows, expected, stream, tokenizer):
    ids, _ = stream
    model = make_model("llama")
    r = perplexity(model, tokenizer, "c4", SEQLEN, max_windows=max_windows, progress=False)
    ppl, _, count = _manual(model, ids, SEQLEN, expected)
    assert r["windows"] == expected and r["tokens"] == count and r["max_windows"] == max_windows
    assert len(r["window_nll"]) == expected
    assert r["total_windows"] == 5
    assert r["ppl"] == pytest.approx(ppl, rel=1e-5)
    assert r["metric"] == f"c4_ppl@{SEQLEN}"


def test_perplexity_changes_with_weights(stream, tokenizer):
    model = make_model("qwen2")
    a = perplexity(model, tokenizer, "wikitext2", SEQLEN, progress=False)["ppl"]
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(50)
    b = perplexity(model, tokenizer, "wikitext2", SEQLEN, progress=False)["ppl"]
    assert a != pytest.approx(b, rel=1e-3)


def test_too_few_tokens_and_bad_max_windows(stream, tokenizer):
    model = make_model("llama")
    with pytest.raises(UsageError):
        perplexity(model, tokenizer, "wikitext2", 6 * SEQLEN, progress=False)
    with pytest.raises(UsageError):
        perplexity(model, tokenizer, "wikitext2", SEQLEN, max_windows=0, progress=False)


def test_diverged_model_gives_infinite_perplexity(stream, tokenizer):
    """A mean NLL above ~709 nats overflows math.exp; a diverged model scores inf instead of raising."""
    ids, _ = stream
    model = make_model("llama")
    with torch.no_grad():
        model.lm_head.weight.mul_(1e6)  # logits of order 1e6: the NLL of a wrong token is of the same order
    r = perplexity(model, tokenizer, "wikitext2", SEQLEN, progress=False)
    assert r["nll"] > 1000 and r["ppl"] == float("inf")
