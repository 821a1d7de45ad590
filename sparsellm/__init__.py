"""sparsellm: post-training sparsification of decoder LLMs (magnitude, Wanda, SparseGPT; N:M; allocations).

Public API:
    model, tok, _ = load_model("smollm2-135m")
    report = prune(model, tok, PruneConfig(prune_method="wanda", sparsity_ratio=0.5))
    perplexity(model, tok, "wikitext2", seqlen=2048)
    save_pruned(model, tok, "out/", report)
    rates, info = resolve_allocation(model, PruneConfig(allocation="owl", sparsity_ratio=0.7), calib_ids)
    zeroshot(model, tok, ["boolq", "rte"], limit=100)      # needs the [zeroshot] extra (lm-eval)
"""

__version__ = "0.1.0"

from .allocate import resolve_allocation  # noqa: E402
from .pipeline import PruneConfig, prune  # noqa: E402
from .runs.rundir import save_pruned  # noqa: E402
from .errors import UsageError  # noqa: E402
from .evaluate import perplexity  # noqa: E402
from .models import load_model  # noqa: E402



def zeroshot(*args, **kwargs):
    """Zero-shot accuracy through lm-evaluation-harness; see sparsellm.evaluate.zeroshot.zeroshot."""
    from .evaluate.zeroshot import zeroshot as _zeroshot

    return _zeroshot(*args, **kwargs)


__all__ = ["PruneConfig", "prune", "resolve_allocation", "save_pruned", "perplexity", "zeroshot", "load_model",
           "UsageError", "__version__"]
