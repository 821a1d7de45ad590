"""`sparsellm search`: Self-Pruner's structured pruning at searched layer-wise rates."""

from __future__ import annotations

from . import _legacy
from .common import add_quiet


def add_parser(sub) -> None:
    se = sub.add_parser("search", help="Self-Pruner: structured pruning (heads and MLP channels) at layer-wise rates "
                        "found by an evolutionary search with LLM (openai, local) or GA operators")
    _legacy._add_search_args(se)
    add_quiet(se)
    se.set_defaults(run=_legacy.cmd_search)
