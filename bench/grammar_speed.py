"""Tokens/s of the default chat model (SmolLM2-135M-Instruct) generating one Self-Pruner reply, unconstrained
vs under the operator's regex with llguidance and with xgrammar (issue 22 part 1: choose the library).
Usage: python bench/grammar_speed.py [n_blocks] [n_vectors] [repeats]. Prints one line per engine:
grammar build seconds, tokens generated, tokens/s (median of repeats), and whether the reply matched."""
import statistics
import sys
import time

import torch

from sparsellm.models import load_model
from sparsellm.selfpruner import grammar as g

L, n, reps = (int(a) for a in (sys.argv[1:] + ["30", "1", "3"][len(sys.argv) - 1:])[:3])
torch.set_num_threads(1)
model, tok, _ = load_model("smollm2-135m")
V = model.config.vocab_size
regex = g.vectors_regex("population", n, L, 0.8)
budget = g.max_chars("population", n, L, 2 + g.DECIMALS)
msgs = [{"role": "user", "content": f"Propose {n} vectors of {L} pruning rates as JSON."}]
enc = tok(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False), return_tensors="pt")


def xgr_proc():
    import xgrammar as xgr
    from xgrammar.contrib.hf import LogitsProcessor
    info = xgr_proc.info = getattr(xgr_proc, "info", None) or xgr.TokenizerInfo.from_huggingface(tok, vocab_size=V)
    comp = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    return LogitsProcessor(comp.compile_regex(regex))


engines = {"none": lambda: None, "llguidance": lambda: g.GrammarProcessor(tok, regex, V), "xgrammar": xgr_proc}
for name, make in engines.items():
    rates, builds, ok = [], [], []
    for r in range(reps + 1):  # the first run warms up (tokenizer tables)
        t0 = time.perf_counter()
        proc = make()
        tb = time.perf_counter() - t0
        torch.manual_seed(r)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**enc, do_sample=True, temperature=0.7, max_new_tokens=budget,
                                 logits_processor=[proc] if proc else None, pad_token_id=tok.eos_token_id)
        dt = time.perf_counter() - t0
        new = out.shape[1] - enc["input_ids"].shape[1]
        if r:
            rates.append(new / dt); builds.append(tb)
            ok.append(g.matches(regex, tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)))
    print(f"{name:10s} L={L} n={n}: build {statistics.median(builds):.3f} s, {new} tokens, "
          f"{statistics.median(rates):.1f} tokens/s, valid {sum(ok)}/{len(ok)}", flush=True)
