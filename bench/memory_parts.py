"""What makes up the resident memory of a prune, part by part (issue 2's memory budget: model + 2 × calibration
activations + 1 GiB). One process, RSS read from /proc/self/status after each step, and the peak of each step
from VmHWM (reset between steps by writing 5 to /proc/self/clear_refs):

    1. import torch and transformers          5. draw the calibration windows (tokenizes the C4 sample)
    2. load the tokenizer                     6. capture the block-0 inputs of all windows
    3. load the model (weights memory-mapped) 7. prune the first --blocks blocks with the engine, as `prune` does
    4. touch and rewrite every weight (as pruning does: the mapped pages become private copies)

Before step 6 the model is cut to its first --blocks decoder blocks, so that a large --nsamples stays cheap (the
capture runs its first window through the kept blocks only). Step 7's expected rise is 2 × activations (X and Y)
plus 2 × the diagnostic's windows (its dense-path inputs and outputs).

    python bench/memory_parts.py --nsamples 128 --seqlen 2048 --blocks 2 --out bench/results/memory_parts_128x2048.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from memory_probe import status  # Linux VmRSS / VmHWM in MiB; imports nothing heavy (bench/ is on sys.path)




def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--method", default="wanda")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--blocks", type=int, default=2, help="decoder blocks kept for step 7")
    ap.add_argument("--diag_nsamples", type=int, default=8, help="the diagnostic's windows (prune's default: 8)")
    ap.add_argument("--batch_size", type=int, default=None, help="windows per block forward (default: the engine's)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    steps = []

    def step(name, fn):
        Path("/proc/self/clear_refs").write_text("5")
        before, t0 = status("VmRSS"), time.perf_counter()
        out = fn()
        rss = status("VmRSS")
        steps.append({"step": name, "rss_mib": round(rss, 1), "rise_mib": round(rss - before, 1),
                      "peak_rise_mib": round(status("VmHWM") - before, 1),
                      "seconds": round(time.perf_counter() - t0, 1)})
        print(steps[-1], flush=True)
        return out

    steps.append({"step": "python started", "rss_mib": round(status("VmRSS"), 1)})
    step("import torch, transformers", lambda: __import__("transformers") and __import__("torch"))
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sparsellm.data import calibration_windows
    from sparsellm.engine import auto_batch_size, capture_inputs, prune_blocks
    from sparsellm.models import _gguf_to_hf_dir, get_blocks, resolve_model

    if args.blocks < 1 or args.nsamples < 1 or args.seqlen < 2 or args.diag_nsamples < 0:
        ap.error("need --blocks >= 1, --nsamples >= 1, --seqlen >= 2 and --diag_nsamples >= 0")
    kind, path = resolve_model(args.model)
    source = str(_gguf_to_hf_dir(path) if kind in ("preset", "gguf") else (path or args.model))
    tok = step("load tokenizer", lambda: AutoTokenizer.from_pretrained(source))
    model = step("load model", lambda: AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval())
    weights_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    if args.blocks > len(get_blocks(model)):
        ap.error(f"--blocks {args.blocks}: the model has {len(get_blocks(model))} decoder blocks")

    def touch():
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.0)

    step("touch and rewrite every weight", touch)
    calib = step("calibration windows", lambda: calibration_windows(tok, "c4", args.nsamples, args.seqlen, 0))
    blocks = get_blocks(model)
    del blocks[args.blocks:]  # nn.ModuleList: keep the first --blocks blocks
    model.config.num_hidden_layers = args.blocks
    act_mib = args.nsamples * args.seqlen * model.config.hidden_size * 4 / 2**20
    diag = min(args.diag_nsamples, args.nsamples)
    diag_mib = diag * args.seqlen * model.config.hidden_size * 4 / 2**20
    captured = step("capture block-0 inputs", lambda: capture_inputs(model, calib))
    del captured
    step(f"prune {args.blocks} blocks", lambda: prune_blocks(model, calib, args.method, [args.sparsity] * args.blocks,
                                                             progress=False, diag_nsamples=diag,
                                                             batch_size=args.batch_size))
    res = {"settings": vars(args), "batch_size": args.batch_size or auto_batch_size(args.seqlen),
           "threads": torch.get_num_threads(), "weights_mib": weights_mib,
           "activations_mib": act_mib, "diag_mib": diag_mib,
           "expected_prune_rise_mib": 2 * act_mib + 2 * diag_mib,
           "budget_mib": weights_mib + 2 * act_mib + 1024, "steps": steps}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(res, indent=1) + "\n")
    os.replace(tmp, out)


if __name__ == "__main__":
    main()
