"""Where does a prune's peak resident memory come from? (issue 2's memory budget: model + 2 × calibration
activations + 1 GiB.) One process: load the model, draw the calibration windows, prune, each phase with its own
peak (Linux VmHWM, reset between phases by writing 5 to /proc/self/clear_refs), plus an RSS timeline sampled
every 20 ms and labelled with the phase and the decoder block running at the time. With several
`--batch_sizes` (calibration windows per block forward), the model is reloaded and pruned once per batch size,
one after another in the same process, to weigh peak memory against prune time.

    python bench/memory_probe.py --method wanda --sparsity 0.5 --nsamples 64 --seqlen 512 \
        --out bench/results/memory_probe_wanda50.json
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

state = {"phase": "start", "block": None}


def status(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024  # kB → MiB
    raise KeyError(key)


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def main():
    import torch  # here, not at the top: memory_parts.py imports status() before torch is loaded

    from sparsellm import pipeline as api
    from sparsellm.data import calibration_windows
    from sparsellm.engine import get_blocks
    from sparsellm.models import load_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--method", default="wanda")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--batch_sizes", default="auto", help="comma list of windows per forward; auto = ~2048 tokens")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    timeline, stop = [], threading.Event()

    def sample():
        t0 = time.perf_counter()
        while not stop.is_set():
            timeline.append((round(time.perf_counter() - t0, 3), round(status("VmRSS"), 1), state["phase"],
                             state["block"]))
            time.sleep(0.02)

    threading.Thread(target=sample, daemon=True).start()
    phases = {"python + torch + transformers imported": {"rss_mib": status("VmRSS"), "peak_mib": status("VmHWM")}}

    def phase(name, fn):
        reset_peak()
        state["phase"] = name
        out = fn()
        phases[name] = {"rss_mib": status("VmRSS"), "peak_mib": status("VmHWM")}
        print(f"{name}: rss {phases[name]['rss_mib']:.0f} MiB, phase peak {phases[name]['peak_mib']:.0f} MiB",
              flush=True)
        return out

    runs = {}
    for bs in args.batch_sizes.split(","):
        batch = None if bs == "auto" else int(bs)
        state["block"] = None
        model, tok, _ = phase(f"load model (fp32), batch {bs}", lambda: load_model(args.model, torch.float32))
        params_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
        hidden = model.config.hidden_size
        calib = phase(f"calibration windows, batch {bs}",
                      lambda: calibration_windows(tok, "c4", args.nsamples, args.seqlen, 0))
        for i, b in enumerate(get_blocks(model)):
            b.register_forward_pre_hook(lambda m, a, i=i: state.__setitem__("block", i))
        cfg = api.PruneConfig.from_flat(prune_method=args.method, sparsity_ratio=args.sparsity, nsamples=args.nsamples,
                                        seqlen=args.seqlen, batch_size=batch)
        rep = phase(f"prune, batch {bs}", lambda: api.prune(model, tok, cfg, calib, progress=False))
        runs[bs] = {"batch_size": rep["options"]["batch_size"], "prune_seconds": rep["prune_seconds"],
                    "peak_mib": phases[f"prune, batch {bs}"]["peak_mib"], "measured": rep["measured"]["sparsity"]}
        print(runs[bs], flush=True)
        del model, rep
    stop.set()
    act_mib = args.nsamples * args.seqlen * hidden * 4 / 2**20
    top = max(timeline, key=lambda r: r[1])
    res = {"settings": vars(args), "params_mib": params_mib, "activations_mib": act_mib,
           "budget_mib": params_mib + 2 * act_mib + 1024, "phases": phases, "timeline_peak": top,
           "ru_maxrss_mib": api.peak_rss_mib(), "runs": runs,
           "timeline": timeline[::5]}
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k != "timeline"}, indent=1))


if __name__ == "__main__":
    main()
