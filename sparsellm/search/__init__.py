"""Self-Pruner: an evolutionary search of layer-wise structured pruning rates whose operators are
performed by a language model (`llm`) or classical genetic operators (`ga`); the loop, constraint repair,
fitness cache and resume are in `evolution`."""

from .evolution import SearchConfig, feasible, repair, run_search
from .ga import GAOperators
from .llm import LLMOperators, local_chat, openai_chat

__all__ = ["SearchConfig", "run_search", "repair", "feasible", "GAOperators", "LLMOperators", "openai_chat",
           "local_chat"]
