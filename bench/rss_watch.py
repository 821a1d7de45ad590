"""Sample the resident memory of a command and of its child processes over time, to locate a peak.

    python bench/rss_watch.py --out bench/results/X_rss.json -- python bench/prune_bench.py ...

Runs the command, samples the RSS of every process in its tree every --interval seconds (psutil) and writes
{"command", "interval", "returncode", "peak": [t, MiB, cmdline], "samples": [[t, {pid: MiB}], ...],
"cmdlines": {pid: cmdline}} atomically, then exits with the command's status (128 + N if signal N killed it).
On Ctrl-C or SIGTERM the command is stopped too, and the samples taken so far are still written.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--interval", type=float, default=0.5)
    ap.add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        ap.error("give the command to watch after --")
    if not args.interval > 0:
        ap.error(f"--interval must be > 0, got {args.interval}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))  # unwinds through the finally below
    t0 = time.perf_counter()
    try:
        proc = subprocess.Popen(cmd)
    except OSError as e:
        print(f"rss_watch: cannot run {cmd[0]!r}: {e.strerror or e}", file=sys.stderr)
        sys.exit(127)
    samples, cmdlines, peak, interrupted = [], {}, [0.0, 0.0, ""], False
    try:
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            t = round(time.perf_counter() - t0, 2)
            row = {}
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            for p in procs:
                try:
                    mib = p.memory_info().rss / 2**20
                    cmdlines.setdefault(p.pid, " ".join(p.cmdline())[:160])
                except psutil.Error:
                    continue
                row[p.pid] = round(mib, 1)
                if mib > peak[1]:
                    peak = [t, round(mib, 1), cmdlines[p.pid]]
            samples.append([t, row])
            time.sleep(args.interval)
        proc.wait()
    except KeyboardInterrupt:  # Ctrl-C: the finally below stops the command and writes what was sampled
        interrupted = True
    finally:
        if proc.poll() is None:  # interrupted: stop the command as well, never leave it running
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps({"command": shlex.join(cmd), "interval": args.interval,
                                   "returncode": proc.returncode, "peak": peak, "cmdlines": cmdlines,
                                   "samples": samples}) + "\n")
        os.replace(tmp, out)
        print(f"peak {peak[1]:.0f} MiB at {peak[0]:.0f} s in {peak[2]}", file=sys.stderr)
    rc = proc.returncode
    sys.exit(130 if interrupted else 128 - rc if rc < 0 else rc)


if __name__ == "__main__":
    main()
