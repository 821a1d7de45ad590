"""Prefill and KV-cache decode throughput of exported models (onnx_export.py) in DeepSparse or onnxruntime.

A standalone script, run by path with the runtime's own Python (DeepSparse 1.8 needs Python <= 3.11, onnx
1.14 and numpy < 2, so it lives in its own environment: `make deepsparse-env`). It imports only the standard
library, numpy and the runtime, never torch or sparsellm.

    python onnx_runner.py SPEC.json OUT.json

SPEC: {"engine": "deepsparse" | "onnxruntime", "threads": int, "models": {name: export_dir},
"prefill_lengths": [...], "decode_batches": [...], "decode_prompt": P, "new_tokens": N, "repeats": R,
"warmup": W, "vocab": V, "kv_shapes": {name: [1, layers, kv_heads, capacity, head_dim]}, "check_ids": [[...]]}.
Every export_dir holds prefill/prefill.onnx and decode/decode.onnx (onnx_export.export) with capacity = P + N;
the models may differ in their KV shapes (e.g. a structurally pruned model against its dense baseline).

OUT: {"results": {name: {"prefill@L": tokens/s, "decode_b{B}": tokens/s}}, "check_logits": {name: last-position
logits of check_ids, and with "return_step_logits" in SPEC, "NAME steps": every decode step's logits},
"greedy": {name: the tokens decoded from the check prompt}, "compile_seconds": {...},
"versions": {...}}. Like the PyTorch harness, the models take turns within each repeat, and the median is
reported.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import numpy as np


class Engine:
    """One compiled graph at fixed input shapes: `run(list of arrays) -> list of arrays`."""

    def __init__(self, kind: str, path: str, shapes: list[list[int]], threads: int):
        t0 = time.perf_counter()
        self.kind = kind
        if kind == "deepsparse":
            from deepsparse import Engine as DSEngine

            self.engine = DSEngine(model=path, batch_size=shapes[0][0], num_cores=threads, input_shapes=shapes)
        elif kind == "onnxruntime":
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
            self.engine = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
            self.names = [i.name for i in self.engine.get_inputs()]
        else:
            raise ValueError(f"unknown engine {kind!r}")
        self.compile_seconds = time.perf_counter() - t0

    def run(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        if self.kind == "deepsparse":
            return self.engine.run(arrays)
        return self.engine.run(None, dict(zip(self.names, arrays)))


def prefill(eng: Engine, ids: np.ndarray):
    return eng.run([ids.astype(np.int64)])


def generate(pre: Engine, dec: Engine, ids: np.ndarray, new_tokens: int, kv_shape, steps: list | None = None):
    """Greedy decode of `new_tokens` tokens after the prompt `ids` (batch, P): the prompt's keys and values come
    from one prefill, then each step runs decode.onnx over the fixed-capacity cache. Returns the greedy
    continuation (batch, new_tokens): the prefill's next token, then each step's but the last, as
    transformers' generate(max_new_tokens=new_tokens) would, and the wall time of the decode steps alone (the prefill is not timed). With a list
    `steps`, each decode step's logits of sequence 0 are appended to it."""
    b, p = ids.shape
    _, layers, kvh, cap, hd = kv_shape
    keys = np.zeros((b, layers, kvh, cap, hd), np.float32)
    values = np.zeros_like(keys)
    mask = np.zeros((b, cap + 1), np.int64)
    logits, k, v = prefill(pre, ids)
    keys[:, :, :, :p], values[:, :, :, :p], mask[:, :p], mask[:, cap] = k, v, 1, 1
    nxt = logits[:, -1].argmax(-1).astype(np.int64)
    out = [nxt]  # the greedy continuation: the prefill's token, then one per decode step
    t0 = time.perf_counter()
    for i in range(new_tokens):
        t = p + i
        pos = np.full((b, 1), t, np.int64)
        logits, k, v = dec.run([nxt[:, None], pos, mask, keys, values])
        if t < cap:
            keys[:, :, :, t:t + 1], values[:, :, :, t:t + 1], mask[:, t] = k, v, 1
        nxt = logits[:, -1].argmax(-1).astype(np.int64)
        out.append(nxt)
        if steps is not None:
            steps.append(logits[0, -1].tolist())
    seconds = time.perf_counter() - t0
    return np.stack(out[:new_tokens], 1), seconds


def versions(kind: str) -> dict:
    v = {"python": sys.version.split()[0], "numpy": np.__version__}
    if kind == "deepsparse":
        import deepsparse

        v["deepsparse"] = deepsparse.__version__
    else:
        import onnxruntime

        v["onnxruntime"] = onnxruntime.__version__
    return v


def _keys(job, P: int, kv) -> list[tuple]:
    """The (graph, input shapes) engines a job needs; equal keys share one compiled engine."""
    what, B, L = job
    if what == "prefill":
        return [("prefill", ((B, L),))]
    kvb = (B, *kv[1:])
    return [("prefill", ((B, L),)), ("decode", ((B, 1), (B, 1), (B, kv[3] + 1), kvb, kvb))]


def main(spec_path: str, out_path: str) -> int:
    spec = json.loads(open(spec_path).read())
    kind, threads, models = spec["engine"], spec["threads"], spec["models"]
    rng = np.random.default_rng(spec.get("seed", 0))
    vocab, kvs = spec["vocab"], spec["kv_shapes"]
    P, N = spec["decode_prompt"], spec["new_tokens"]
    check = np.asarray(spec["check_ids"], np.int64)
    # the check first, then the timed jobs; engines are compiled once per (graph, shapes) and freed after
    # their last use, so a check prompt of P tokens shares the prefill@P and decode_b1 engines
    jobs = [("check", 1, check.shape[1])] + [("prefill", 1, L) for L in spec["prefill_lengths"]]
    jobs += [("decode", B, P) for B in spec["decode_batches"]]
    last = {n: {} for n in models}
    for i, job in enumerate(jobs):
        for n in models:
            for k in _keys(job, P, kvs[n]):
                last[n][k] = i
    cache = {n: {} for n in models}
    compile_s = {n: 0.0 for n in models}
    res = {n: {} for n in models}
    check_logits, greedy = {}, {}

    def engine(n, key):
        if key not in cache[n]:
            graph, shapes = key
            cache[n][key] = Engine(kind, f"{models[n]}/{graph}/{graph}.onnx", [list(x) for x in shapes], threads)
            compile_s[n] += cache[n][key].compile_seconds
        return cache[n][key]

    for i, job in enumerate(jobs):
        what, B, L = job
        built = {n: [engine(n, k) for k in _keys(job, P, kvs[n])] for n in models}
        if what == "check":
            for n, (pre, dec) in built.items():
                check_logits[n] = prefill(pre, check)[0][0, -1].tolist()
                steps = [] if spec.get("return_step_logits") else None
                greedy[n] = generate(pre, dec, check, N, kvs[n], steps)[0][0].tolist()
                if steps is not None:
                    check_logits[n + " steps"] = steps
        else:
            ids = rng.integers(10, max(11, vocab - 1), (B, L))
            name = f"prefill@{L}" if what == "prefill" else f"decode_b{B}"
            times = {n: [] for n in models}
            for r in range(spec["warmup"] + spec["repeats"]):
                for n, engs in built.items():  # alternate, so drifts in machine load hit every model alike
                    if what == "prefill":
                        t0 = time.perf_counter()
                        prefill(engs[0], ids)
                        sec = time.perf_counter() - t0
                    else:
                        sec = generate(engs[0], engs[1], ids, N, (B, *kvs[n][1:]))[1]
                    if r >= spec["warmup"]:
                        times[n].append(sec)
            for n in models:
                res[n][name] = ids.size / statistics.median(times[n]) if what == "prefill" \
                    else B * N / statistics.median(times[n])
            print(f"{name}: " + "  ".join(f"{n} {res[n][name]:.1f} tok/s" for n in models), flush=True)
        del built
        for n in models:
            for k in [k for k in cache[n] if last[n][k] == i]:
                del cache[n][k]
    out = {"results": res, "check_logits": check_logits, "greedy": greedy, "compile_seconds": compile_s,
           "versions": versions(kind)}
    with open(out_path, "w") as f:
        json.dump(out, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
