"""Self-Pruner (Huang et al., 2025): an evolutionary search of layer-wise structured pruning rates whose
operators are performed by a language model or by classical genetic operators.

    evolution  the loop (`evolve`), its settings (`SearchConfig`), constraint repair, fitness cache, resume
    ga, llm    the operators: `GAOperators`; `LLMOperators` with the `openai_chat` / `local_chat` models
    evopress   EvoPress's (1+λ) search with level-switch mutation and multi-step selection (its own loop)
    backends   the registered search backends (ga, openai, local, uniform) and their configs
    driver     one search on a loaded model (`self_prune`, with `Structure` and `Fitness` settings)

The whole run (`sparsellm search`) is `sparsellm.runs.search.run_search`.
"""

from .evolution import SearchConfig, evolve, feasible, repair
from .ga import GAOperators
from .llm import LLMOperators, local_chat, openai_chat
from . import backends  # noqa: E402, I001  (registers the search backends)
from . import evopress  # noqa: E402, I001  (registers the evopress backend)
from .backends import LLMConfig, LocalConfig, OpenAIConfig
from .driver import Fitness, Structure, self_prune

__all__ = ["SearchConfig", "evolve", "repair", "feasible", "GAOperators", "LLMOperators", "openai_chat",
           "local_chat", "backends", "LLMConfig", "OpenAIConfig", "LocalConfig", "Structure", "Fitness", "self_prune"]
