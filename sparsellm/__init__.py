"""sparsellm: post-training sparsification of decoder LLMs (magnitude, Wanda, SparseGPT; N:M; allocations).

Public API:
    model, tok, _ = load_model("smollm2-135m")
    report = prune(model, tok, PruneConfig(prune_method="wanda", sparsity_ratio=0.5))
    perplexity(model, tok, "wikitext2", seqlen=2048)
    save_pruned(model, tok, "out/", report)
"""

__version__ = "0.1.0"

from .api import PruneConfig, prune, save_pruned  # noqa: E402
from .errors import UsageError  # noqa: E402
from .evaluate import perplexity  # noqa: E402
from .models import load_model  # noqa: E402

__all__ = ["PruneConfig", "prune", "save_pruned", "perplexity", "load_model", "UsageError", "__version__"]
