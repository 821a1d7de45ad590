"""Evaluation: perplexity by the papers' protocol (zero-shot and speed come in later issues)."""

from .perplexity import perplexity

__all__ = ["perplexity"]
