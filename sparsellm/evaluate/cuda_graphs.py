"""Prefill and KV-cache decode replayed from CUDA graphs (issue 24): what a serving engine does, so that the
host-side cost of each kernel launch and dispatch leaves the timing. PyTorch's 2:4 kernels pay about 0.9 ms
of host time per eager cuSPARSELt call on an H200 (BENCHMARKS.md §13d); a captured graph replays the
kernels alone.

- `GraphedPrefill(model, ids)`: one forward over `ids` (batch, length), logits of the last position only,
  captured once; each call replays it and returns its seconds.
- `GraphedDecode(model, ids, new_tokens)`: an eager prefill of `ids` into a `transformers.StaticCache`
  (fixed addresses, so the step can be captured), then one greedy decode step captured; each call rewinds
  the cache to the prompt and replays the step `new_tokens` times, and returns its seconds. `tokens` holds
  the last run's greedy tokens, (batch, new_tokens).

With `graph=False` both run the same code eagerly (any device): the CPU tests check the static-cache
stepping against a plain decode that way. Capture itself needs CUDA. Sliding-window attention layers
(Mistral, Gemma 3, Qwen2 with a window) are refused under capture: their cache keeps its length in a
Python int, which a captured step would freeze.
"""

from __future__ import annotations

import inspect
import time

import torch

from ..errors import UsageError
from .speed import _device, _sync, cache_kwarg


def _warm_and_capture(fn, graph: bool, reset=None):
    """Run fn twice on a side stream (cuBLAS workspaces, lazy allocations), then capture it in a CUDA graph;
    `reset()` (if given) runs after each warm-up, so state that fn advances starts again from the same point.
    Returns the graph's replay, or fn itself when `graph` is False."""
    if not graph:
        return fn
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
            if reset is not None:
                reset()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def _check(model, graph: bool) -> torch.device:
    dev = _device(model)
    if graph and dev.type != "cuda":
        raise UsageError(f"CUDA graphs need the model on a CUDA device, not {dev}")
    return dev


class GraphedPrefill:
    """One captured forward over a fixed (batch, length) prompt. Raises UsageError off CUDA with graph=True."""

    @torch.no_grad()
    def __init__(self, model, ids: torch.Tensor, graph: bool = True):
        dev = _check(model, graph)
        self.model, self.ids, self.dev = model, ids.to(dev).clone(), dev  # model: the graph reads its weights

        def forward():
            self.logits = model(self.ids, use_cache=False, logits_to_keep=1).logits

        self.run = _warm_and_capture(forward, graph)

    @torch.no_grad()
    def __call__(self) -> float:
        _sync(self.dev)
        t0 = time.perf_counter()
        self.run()
        _sync(self.dev)
        return time.perf_counter() - t0


class GraphedDecode:
    """Greedy KV-cache decode from a StaticCache, one captured step replayed `new_tokens` times per call.
    Works with transformers that take `cache_position` (≤ 5.2x) and with those whose static cache counts its
    own length (`cumulative_length`); both are rewound to the prompt before each run (and after each warm-up
    step before the capture). Raises UsageError for new_tokens < 1, a prompt + new tokens past the model's
    context, a model off CUDA with graph=True, any sliding-window layer with graph=True (its mask sizes come
    from Python-side state that a capture would freeze), and with graph=False a window shorter than the
    prompt + new tokens (a full window rolls its cache)."""

    @torch.no_grad()
    def __init__(self, model, ids: torch.Tensor, new_tokens: int, graph: bool = True):
        from transformers import StaticCache

        if new_tokens < 1:
            raise UsageError(f"new_tokens must be >= 1, got {new_tokens}")
        batch, self.prompt = ids.shape
        total = self.prompt + new_tokens  # the last step writes position prompt + new_tokens - 1
        ctx = getattr(model.config, "max_position_embeddings", None)
        if ctx is not None and total > ctx:
            raise UsageError(f"the prompt + new tokens ({self.prompt} + {new_tokens}) exceed the model's context ({ctx})")
        self.cache = StaticCache(config=model.config, max_cache_len=total)
        sliding = [getattr(layer, "max_cache_len", 0) for layer in getattr(self.cache, "layers", [])
                   if getattr(layer, "is_sliding", False)]
        if sliding and graph:  # its mask sizes come from a Python int that a captured step would freeze
            raise UsageError("sliding-window attention layers cannot be replayed from a CUDA graph (their cache "
                             "length is Python-side state): measure this model without --cuda_graphs")
        if sliding and min(sliding) < total:  # a full window rolls its cache: a rewind cannot undo that
            raise UsageError(f"sliding-window attention (window {min(sliding)}) is shorter than the prompt + new "
                             f"tokens ({self.prompt} + {new_tokens}): use a shorter run")
        dev = _check(model, graph)
        self.model, self.dev, self.new_tokens = model, dev, new_tokens  # model: the graph reads its weights
        ids = ids.to(dev)
        kw = cache_kwarg(model)
        takes_cache_position = "cache_position" in inspect.signature(model.forward).parameters
        pos = torch.arange(self.prompt, device=dev)
        extra = {"cache_position": pos} if takes_cache_position else {}
        out = model(ids, use_cache=True, position_ids=pos.unsqueeze(0), logits_to_keep=1, **{kw: self.cache}, **extra)
        self.first = out.logits[:, -1:].argmax(-1)  # (batch, 1): the prompt's greedy next token
        self.nxt = self.first.clone()
        self.pos = torch.full((1,), self.prompt, dtype=torch.long, device=dev)
        self.tokens = torch.zeros(batch, new_tokens, dtype=torch.long, device=dev)

        def step():
            self.tokens.index_copy_(1, self.pos - self.prompt, self.nxt)
            extra = {"cache_position": self.pos} if takes_cache_position else {}
            o = model(self.nxt, use_cache=True, position_ids=self.pos.view(1, 1), **{kw: self.cache}, **extra)
            self.nxt.copy_(o.logits[:, -1:].argmax(-1))
            self.pos.add_(1)

        self.rewind()
        self.step = _warm_and_capture(step, graph, reset=self.rewind)
        self.rewind()

    def rewind(self) -> None:
        """Back to the state right after the prompt: position, next token, and the cache's own length."""
        self.pos.fill_(self.prompt)
        self.nxt.copy_(self.first)
        for layer in getattr(self.cache, "layers", []):
            n = getattr(layer, "cumulative_length", None)
            if isinstance(n, torch.Tensor):
                n.fill_(self.prompt)
            if isinstance(getattr(layer, "cumulative_length_int", None), int):  # sliding layers (window not full)
                layer.cumulative_length_int = self.prompt

    @torch.no_grad()
    def __call__(self) -> float:
        self.rewind()
        _sync(self.dev)
        t0 = time.perf_counter()
        for _ in range(self.new_tokens):
            self.step()
        _sync(self.dev)
        return time.perf_counter() - t0
