"""Prune SmolLM2-135M with SparseGPT 50% (16 C4 windows × 512 tokens, 2 threads) using the sparsellm checkout at
CHECKOUT, and print the SHA-256 of every parameter: the same hash from two checkouts means the same weights.

    python bench/weights_hash.py /path/to/old/checkout      # e.g. a `git worktree add` of an older commit
    python bench/weights_hash.py .
"""

import hashlib
import sys

import torch

torch.set_num_threads(2)
sys.path.insert(0, sys.argv[1])
import sparsellm  # noqa: E402
from sparsellm.models import load_model  # noqa: E402

print(sparsellm.__file__)
model, tok, _ = load_model("smollm2-135m")
try:  # the redesigned API
    from sparsellm.pipeline import PruneConfig, prune
    cfg = PruneConfig.from_flat(prune_method="sparsegpt", sparsity_ratio=0.5, nsamples=16, seqlen=512)
except ImportError:  # before it (sparsellm.api)
    from sparsellm.api import PruneConfig, prune
    cfg = PruneConfig(prune_method="sparsegpt", sparsity_ratio=0.5, nsamples=16, seqlen=512)
rep = prune(model, tok, cfg, progress=False)
h = hashlib.sha256()
for _, p in model.named_parameters():
    h.update(p.detach().numpy().tobytes())
print("calibration", rep["calibration"]["tokens_sha256"][:16], "weights", h.hexdigest()[:16],
      "measured", rep["measured"]["sparsity"])
