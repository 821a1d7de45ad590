"""LLM-driven evolutionary operators (Self-Pruner, Huang et al., 2025, §3; algorithms.md §9.2): a language
model creates the population, selects parents, and does crossover and mutation.

Each operator sends one prompt (our own wording) with the model description, the constraint, the
population with its fitness, and the exact JSON it must reply with. Every reply is parsed (the first JSON
object in it) and validated against a JSON schema (vector lengths, number types, index ranges). A bad
reply is retried `retries` times; then the GA operator does that step instead, and the fallback is
counted. Every prompt and reply goes to a JSON-lines log, so a search can be audited.

Backends (a `chat(messages, seed, max_tokens, prefix) -> str` callable; `prefix` is the start of the JSON
answer, which a backend may pre-fill in the assistant turn to steer a small model, and then includes in
the returned text):
    openai_chat  any OpenAI-compatible HTTP endpoint (vLLM, Ollama, llama.cpp server, hosted APIs)
    local_chat   a chat model run in-process with transformers (e.g. the bundled SmolLM2-135M-Instruct)
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from ..errors import UsageError
from .ga import GAOperators

OPS = ("init", "select", "crossover", "mutation")
SYSTEM = ("You are an expert in compressing large language models by structured pruning. You design "
          "per-layer pruning rates: the fraction of attention heads and MLP channels removed from each decoder "
          "layer. Early and late layers are usually more sensitive than middle ones. You answer with JSON only.")


def _vec_schema(L: int) -> dict:
    return {"type": "array", "minItems": L, "maxItems": L, "items": {"type": "number"}}


def extract_json(text: str):
    """The first JSON object in `text` (replies often wrap it in prose or ``` fences). Raises ValueError."""
    dec = json.JSONDecoder()
    i = text.find("{")
    while i != -1:
        try:
            obj, _ = dec.raw_decode(text[i:])
            if isinstance(obj, dict):
                return obj
        except ValueError:
            pass
        i = text.find("{", i + 1)
    raise ValueError("no JSON object in the reply")


def _fmt(v) -> str:
    return "[" + ", ".join(f"{x:.3f}" for x in v) + "]"


class LLMOperators:
    """Evolutionary operators performed by a chat model, with the GA as the fallback for a step whose
    replies never validate. `describe`: one paragraph about the model being pruned."""

    name = "llm"

    def __init__(self, chat, describe: str, log_path=None, retries: int = 2, fallback=None):
        if retries < 0:
            raise UsageError(f"--llm_retries must be >= 0, got {retries}")
        self.chat, self.describe, self.retries = chat, describe, retries
        self.fallback = fallback or GAOperators()
        self.log_path = Path(log_path) if log_path is not None else None
        self.counts = {"calls": 0, "invalid_replies": 0,
                       "fallbacks": {"init": 0, "select": 0, "crossover": 0, "mutation": 0}}

    def stats(self) -> dict:
        return json.loads(json.dumps(self.counts))

    def load_stats(self, s: dict) -> None:
        if s:
            self.counts = json.loads(json.dumps(s))

    # ------------------------------------------------------------------ prompting, validation, fallback
    def _constraint(self, ctx) -> str:
        return (f"Constraint: a rate vector has exactly {ctx.n_blocks} numbers (one per layer, layer 0 first), "
                f"each between 0 and {ctx.max_rate:g}, and their mean must be {ctx.target:g}.")

    def _population(self, pop) -> str:
        lines = ["Current population (fitness = perplexity on held-out text, lower is better):"]
        lines += [f"{i}. fitness={p['fitness']:.4f} rates={_fmt(p['rates'])}" for i, p in enumerate(pop)]
        return "\n".join(lines)

    def _ask(self, op: str, ctx, task: str, schema: dict, example: str, check, n_numbers: int, prefix: str = ""):
        import jsonschema

        messages = [{"role": "system", "content": SYSTEM},
                    {"role": "user", "content": f"{self.describe}\n\n{self._constraint(ctx)}\n\n{task}\n\n"
                                                f"Reply with one JSON object and nothing else, in this form: {example}"}]
        max_tokens = 64 + 7 * n_numbers
        for attempt in range(self.retries + 1):
            seed = (ctx.seed * 1_000_003 + ctx.generation * 1009 + attempt * 31 + OPS.index(op)) % 2**31
            t0 = time.perf_counter()
            reply = self.chat(messages, seed, max_tokens, prefix)
            self.counts["calls"] += 1
            err = None
            try:
                obj = extract_json(reply)
                jsonschema.validate(obj, schema)
                result = check(obj)
            except (ValueError, jsonschema.ValidationError) as e:
                err = str(e).splitlines()[0][:300]
                result = None
            self._log({"op": op, "generation": ctx.generation, "attempt": attempt, "seed": seed, "messages": messages,
                       "reply": reply, "ok": err is None, "error": err, "seconds": time.perf_counter() - t0})
            if err is None:
                return result
            self.counts["invalid_replies"] += 1
        self.counts["fallbacks"][op] += 1
        return None

    def _log(self, rec: dict) -> None:
        if self.log_path is not None:
            with open(self.log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")

    # ------------------------------------------------------------------------------------ the operators
    def init(self, n, ctx):
        L = ctx.n_blocks
        task = (f"Propose {n} diverse rate vectors for the initial population of an evolutionary search that "
                f"minimises perplexity. Use your knowledge of which layers matter most.")
        schema = {"type": "object", "required": ["population"],
                  "properties": {"population": {"type": "array", "minItems": n, "items": _vec_schema(L)}}}
        got = self._ask("init", ctx, task, schema, '{"population": [[r_0, ..., r_%d], ...]}' % (L - 1),
                        lambda o: o["population"][:n], n * L, '{"population": [[')
        return got if got is not None else self.fallback.init(n, ctx)

    def select(self, pop, n, ctx):
        task = (f"{self._population(pop)}\n\nSelect {n} pairs of parents (by their index in the list above) "
                f"for crossover and mutation. Prefer fit parents but keep some diversity.")
        item = {"type": "array", "minItems": 2, "maxItems": 2,
                "items": {"type": "integer", "minimum": 0, "maximum": len(pop) - 1}}  # 1.0 passes: int() below
        schema = {"type": "object", "required": ["pairs"],
                  "properties": {"pairs": {"type": "array", "minItems": n, "items": item}}}
        got = self._ask("select", ctx, task, schema, '{"pairs": [[i, j], ...]}', lambda o: [(int(a), int(b)) for a, b in o["pairs"][:n]],
                        2 * n, '{"pairs": [[')
        return got if got is not None else self.fallback.select(pop, n, ctx)

    def _children(self, op, ctx, task, n):
        L = ctx.n_blocks
        schema = {"type": "object", "required": ["children"],
                  "properties": {"children": {"type": "array", "minItems": n, "items": _vec_schema(L)}}}
        return self._ask(op, ctx, task, schema, '{"children": [[r_0, ..., r_%d], ...]}' % (L - 1),
                         lambda o: o["children"][:n], n * L, '{"children": [[')

    def crossover(self, pairs, ctx):
        if not pairs:
            return []
        lines = [f"pair {k}: A (fitness {a['fitness']:.4f}) = {_fmt(a['rates'])}; B (fitness {b['fitness']:.4f}) = "
                 f"{_fmt(b['rates'])}" for k, (a, b) in enumerate(pairs)]
        task = ("Cross over each pair of parents below into one child that combines their strengths "
                f"({len(pairs)} children, in order):\n" + "\n".join(lines))
        got = self._children("crossover", ctx, task, len(pairs))
        return got if got is not None else self.fallback.crossover(pairs, ctx)

    def mutate(self, parents, ctx):
        if not parents:
            return []
        lines = [f"parent {k} (fitness {p['fitness']:.4f}) = {_fmt(p['rates'])}" for k, p in enumerate(parents)]
        task = ("Mutate each parent below into one child: change a few layers' rates in a direction you "
                f"expect to lower perplexity ({len(parents)} children, in order):\n" + "\n".join(lines))
        got = self._children("mutation", ctx, task, len(parents))
        return got if got is not None else self.fallback.mutate(parents, ctx)


# ------------------------------------------------------------------------------------------------ backends


def openai_chat(base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", temperature: float = 0.7,
                timeout: float = 300.0):
    """A chat function for an OpenAI-compatible endpoint (`base_url`, e.g. http://localhost:8000/v1). The
    key is read from the environment variable `api_key_env` (a local server usually needs none). A
    connection failure or an error status raises UsageError naming the URL."""
    import openai

    client = openai.OpenAI(base_url=base_url, api_key=os.environ.get(api_key_env) or "none", timeout=timeout,
                           max_retries=1)

    def chat(messages, seed, max_tokens, prefix=""):  # no pre-fill: not every server supports it
        try:
            r = client.chat.completions.create(model=model, messages=messages, temperature=temperature, seed=seed,
                                               max_tokens=max_tokens)
        except openai.APIConnectionError as e:
            raise UsageError(f"cannot reach the LLM endpoint {base_url}: {e}") from None
        except openai.APIStatusError as e:
            raise UsageError(f"the LLM endpoint {base_url} answered HTTP {e.status_code}: {e.message}") from None
        if not hasattr(r, "choices"):
            raise UsageError(f"the LLM endpoint {base_url} did not answer with a chat completion")
        return (r.choices[0].message.content or "") if r.choices else ""

    return chat


def local_chat(spec: str = "smollm2-135m", temperature: float = 0.7, max_new_tokens: int = 4096):
    """A chat function running the chat model `spec` (any `--model` form) in this process with transformers."""
    import torch

    from ..models import load_model

    model, tok, _ = load_model(spec)
    if not getattr(tok, "chat_template", None):
        raise UsageError(f"{spec} has no chat template: use a chat (instruct) model for --backend local")

    def chat(messages, seed, max_tokens, prefix=""):
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) + prefix
        enc = tok(text, return_tensors="pt", add_special_tokens=False)
        torch.manual_seed(seed)
        with torch.no_grad():
            out = model.generate(**enc, do_sample=True, temperature=temperature, top_p=0.95,
                                 max_new_tokens=min(max_tokens, max_new_tokens), pad_token_id=tok.eos_token_id)
        return prefix + tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)

    return chat
