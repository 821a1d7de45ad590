"""Why the per-block error curves of `errors.png` drop at block 11 on SmolLM2-135M: the relative errors split by
token. Prunes SmolLM2-135M at 50% (16 C4 windows × 512 tokens, seed 0, uniform), then on the first 4 windows
compares, per block, the dense and pruned outputs: over all tokens (what `errors.png` shows), and over the
"ordinary" tokens only, leaving out those whose dense hidden-state norm is over 10× the median ("massive
activations"). Writes one JSON row per block.

    python bench/error_norms.py wanda bench/results/error_norms_wanda50.json
    python bench/error_norms.py sparsegpt bench/results/error_norms_sparsegpt50.json
"""

import copy
import json
import sys

import torch

from sparsellm import PruneConfig, load_model, prune
from sparsellm.data import calibration_windows
from sparsellm.engine import capture_inputs, run_block
from sparsellm.models import get_blocks

torch.set_num_threads(2)
method, out = sys.argv[1], sys.argv[2]
model, tok, _ = load_model("smollm2-135m")
dense = copy.deepcopy(model)
calib = calibration_windows(tok, "c4", 16, 512, 0)
diag = calib[:4]
cfg = PruneConfig.from_flat(prune_method=method, sparsity_ratio=0.5, nsamples=16, seqlen=512, diag_nsamples=4)
rep = prune(model, tok, cfg, calib_ids=calib, progress=False)


@torch.no_grad()
def streams(m):
    """[(X_i, Y_i)] of every block of `m` on the diagnostic windows, and the blocks' keyword arguments."""
    X, kw = capture_inputs(m, diag)
    out = []
    for i, b in enumerate(get_blocks(m)):
        Y = torch.empty_like(X)
        run_block(b, X, kw[i], Y, 4)
        out.append((X.clone(), Y.clone()))
        X = Y
    return out, kw


def rel(ref, y, sel=None):
    """‖ref − y‖_F / ‖ref‖_F over the tokens in `sel` (all tokens when None)."""
    d, r = (ref - y).norm(dim=-1) ** 2, ref.norm(dim=-1) ** 2
    if sel is not None:
        d, r = d[sel], r[sel]
    return float(d.sum() / r.sum()) ** 0.5


D, kw = streams(dense)
P, _ = streams(model)
rows = []
for i in range(len(D)):
    Yd, Yp = D[i][1].float(), P[i][1].float()
    tn = Yd.norm(dim=-1)  # (windows, seqlen): each token's hidden-state norm in the dense model
    massive = tn > 10 * tn.median()
    with torch.no_grad():  # local: the dense block i on the pruned model's inputs, against the pruned block i
        Yl = torch.empty_like(P[i][0])
        run_block(get_blocks(dense)[i], P[i][0], kw[i], Yl, 4)
    Yl = Yl.float()
    ln = Yl.norm(dim=-1)
    r = {"block": i, "rel_error": rep["blocks"][i]["rel_error"], "cum_error": rep["blocks"][i]["cum_error"],
         "token_norm_median": float(tn.median()), "token_norm_max": float(tn.max()),
         "massive_tokens": int(massive.sum()), "massive_positions": sorted(set(massive.nonzero()[:, 1].tolist())),
         "massive_share_of_sq_norm": float((tn[massive] ** 2).sum() / (tn ** 2).sum()),
         "largest_dim": int(Yd.abs().amax(dim=(0, 1)).argmax()), "largest_abs": float(Yd.abs().max()),
         "cum_all": rel(Yd, Yp), "cum_ordinary": rel(Yd, Yp, ~massive),
         "local_all": rel(Yl, Yp), "local_ordinary": rel(Yl, Yp, ~(ln > 10 * ln.median()))}
    rows.append(r)
    print(f"{i:2d} local {r['local_all']:.3f} (ordinary {r['local_ordinary']:.3f})  cumulative {r['cum_all']:.3f} "
          f"(ordinary {r['cum_ordinary']:.3f})  token norm median {r['token_norm_median']:.0f} max "
          f"{r['token_norm_max']:.0f}, {r['massive_tokens']} massive at {r['massive_positions']} holding "
          f"{r['massive_share_of_sq_norm']:.0%} of ‖Y‖², largest |y| {r['largest_abs']:.0f} in dim {r['largest_dim']}",
          flush=True)
with open(out, "w") as f:
    json.dump({"model": "smollm2-135m", "method": method, "sparsity": 0.5, "calibration": "c4, 16 x 512, seed 0",
               "diag_windows": 4, "threshold": "token norm > 10 x median", "blocks": rows}, f, indent=1)
