"""LLM-driven evolutionary operators (Self-Pruner, Huang et al., 2025, §3; algorithms.md §9.2): a language
model creates the population, selects parents, and does crossover and mutation.

Each operator sends one prompt (our own wording) with the model description, the constraint, the
population with its fitness, and the exact JSON it must reply with. Every reply is parsed (the first JSON
object in it) and validated against a JSON schema (vector lengths, number types, index ranges). A bad
reply is retried `retries` times; then the GA operator does that step instead, and the fallback is
counted. Every prompt and reply goes to a JSON-lines log, so a search can be audited.

Backends (a `chat(messages, seed, max_tokens, prefix, reply) -> str` callable; `prefix` is the start of the
JSON answer, which a backend may pre-fill in the assistant turn to steer a small model, and then includes
in the returned text; `reply` is the operator's `Reply`: JSON schema, exact regex, longest length):
    openai_chat  any OpenAI-compatible HTTP endpoint (vLLM, Ollama, llama.cpp server, hosted APIs); asks
                 for response_format with the schema, falls back to prompt-only parsing if refused
    local_chat   a chat model run in-process with transformers (e.g. the bundled SmolLM2-135M-Instruct),
                 decoding under the reply's regex (grammar.py), so every reply validates by construction
A backend may carry `counts` (a dict of ints, saved with the search state) and `context` (its context
length in tokens) with `count_tokens(messages)`: the population shown is then cut to fit the context.

The report counts every operator step as valid at the first try, valid after retries, or fell back to the
GA; rates outside [0, max_rate] in a valid reply are counted as `clamped` (repair clips them).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError
from . import grammar
from .ga import GAOperators

log = logging.getLogger("sparsellm")

OPS = ("init", "select", "crossover", "mutation")
SYSTEM = ("You are an expert in compressing large language models by structured pruning. You design "
          "per-layer pruning rates: the fraction of attention heads and MLP channels removed from each decoder "
          "layer. Early and late layers are usually more sensitive than middle ones. You answer with JSON only.")


def _vec_schema(L: int, max_rate: float | None = None) -> dict:
    """L numbers; with max_rate (the schema sent to a server), each in [0, max_rate]."""
    item = {"type": "number"} if max_rate is None else {"type": "number", "minimum": 0, "maximum": max_rate}
    return {"type": "array", "minItems": L, "maxItems": L, "items": item}


@dataclass
class Reply:
    """What an operator's reply must be. name: the operator; schema: its JSON schema (with the bounds);
    regex: the exact form (`grammar.py`), all of whose matches validate; chars: the longest match's length."""

    name: str
    schema: dict
    regex: str
    chars: int


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
        self.counts = {"calls": 0, "invalid_replies": 0, "clamped": 0,
                       "steps": {"first_try": 0, "retried": 0, "fell_back": 0},
                       "fallbacks": {"init": 0, "select": 0, "crossover": 0, "mutation": 0}}

    def stats(self) -> dict:
        """The counts, with the backend's own (`backend`: e.g. requests per response_format mode)."""
        out = json.loads(json.dumps(self.counts))
        if getattr(self.chat, "counts", None) is not None:
            out["backend"] = json.loads(json.dumps(self.chat.counts))
        return out

    def load_stats(self, s: dict) -> None:
        if s:
            s = json.loads(json.dumps(s))
            backend = s.pop("backend", None)
            self.counts.update(s)
            if backend is not None and getattr(self.chat, "counts", None) is not None:
                self.chat.counts.clear()
                self.chat.counts.update(backend)

    # ------------------------------------------------------------------ prompting, validation, fallback
    def _constraint(self, ctx) -> str:
        return (f"Constraint: a rate vector has exactly {ctx.n_blocks} numbers (one per layer, layer 0 first), "
                f"each between 0 and {ctx.max_rate:g}, and their mean must be {ctx.target:g}.")

    def _population(self, pop, rows: int | None = None) -> str:
        """The population as evaluated (rates after repair, with their fitness), best first; `rows` cuts
        the listing to the best rows (a prompt that must fit the chat model's context)."""
        lines = ["Current population, as evaluated (rates after repair to the constraint; fitness = perplexity "
                 "on held-out text, lower is better):"]
        lines += [f"{i}. fitness={p['fitness']:.4f} rates={_fmt(p['rates'])}" for i, p in enumerate(pop[:rows])]
        return "\n".join(lines)

    def _messages(self, ctx, task: str, example: str) -> list:
        return [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": f"{self.describe}\n\n{self._constraint(ctx)}\n\n{task}\n\n"
                                            f"Reply with one JSON object and nothing else, in this form: {example}"}]

    def _fits(self, messages, max_tokens: int) -> bool:
        """Whether prompt + reply budget fit the backend's context (always, when it does not say)."""
        context, count = getattr(self.chat, "context", None), getattr(self.chat, "count_tokens", None)
        return context is None or count is None or count(messages) + max_tokens <= context

    def _rows(self, ctx, task, example: str, n_rows: int, max_tokens: int) -> int:
        """How many of the best population rows the prompt `task(rows)` can show within the context."""
        while n_rows > 2 and not self._fits(self._messages(ctx, task(n_rows), example), max_tokens):
            n_rows -= max(1, n_rows // 4)
        return n_rows

    @staticmethod
    def _budget(reply: Reply) -> int:
        return reply.chars + 64  # the longest valid reply, and slack for an end marker or an unconstrained fence

    def _ask(self, op: str, ctx, task: str, schema: dict, example: str, check, n_numbers: int, prefix: str = "",
             reply: Reply | None = None):
        """One operator step: ask, validate, retry, count; None when it falls back."""
        import jsonschema

        max_tokens = self._budget(reply) if reply is not None else 64 + 7 * n_numbers
        messages = self._messages(ctx, task, example)
        for attempt in range(self.retries + 1):
            seed = (ctx.seed * 1_000_003 + ctx.generation * 1009 + attempt * 31 + OPS.index(op)) % 2**31
            t0 = time.perf_counter()
            text = self.chat(messages, seed, max_tokens, prefix, reply)
            self.counts["calls"] += 1
            err = None
            try:
                obj = extract_json(text)
                jsonschema.validate(obj, schema)
                result = check(obj)
            except (ValueError, jsonschema.ValidationError) as e:
                err = str(e).splitlines()[0][:300]
                result = None
            self._log({"op": op, "generation": ctx.generation, "attempt": attempt, "seed": seed, "messages": messages,
                       "reply": text, "ok": err is None, "error": err, "seconds": time.perf_counter() - t0})
            if err is None:
                if op != "select":
                    self.counts["clamped"] += sum(not 0 <= x <= ctx.max_rate for v in result for x in v)
                self.counts["steps"]["first_try" if attempt == 0 else "retried"] += 1
                return result
            self.counts["invalid_replies"] += 1
        self.counts["fallbacks"][op] += 1
        self.counts["steps"]["fell_back"] += 1
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
        schema, reply = self._vectors("population", n, ctx)
        got = self._ask("init", ctx, task, schema, '{"population": [[r_0, ..., r_%d], ...]}' % (L - 1),
                        lambda o: o["population"][:n], n * L, '{"population": [[', reply)
        return got if got is not None else self.fallback.init(n, ctx)

    def select(self, pop, n, ctx):
        def task(rows):
            return (f"{self._population(pop, rows)}\n\nSelect {n} pairs of parents (by their index in the list above) "
                    f"for crossover and mutation. Prefer fit parents but keep some diversity.")
        example = '{"pairs": [[i, j], ...]}'
        upper = Reply("select", {}, "", grammar.max_chars("pairs", n, 2, len(str(len(pop) - 1))))
        rows = self._rows(ctx, task, example, len(pop), self._budget(upper))  # the population shown: best rows
        item = {"type": "array", "minItems": 2, "maxItems": 2,
                "items": {"type": "integer", "minimum": 0, "maximum": rows - 1}}  # 1.0 passes: int() below
        schema = {"type": "object", "required": ["pairs"],
                  "properties": {"pairs": {"type": "array", "minItems": n, "items": item}}}
        sent = {**schema, "properties": {"pairs": {"type": "array", "minItems": n, "maxItems": n, "items": item}}}
        reply = Reply("select", sent, grammar.pairs_regex(n, rows), grammar.max_chars("pairs", n, 2, len(str(rows - 1))))
        got = self._ask("select", ctx, task(rows), schema, example,
                        lambda o: [(int(a), int(b)) for a, b in o["pairs"][:n]], 2 * n, '{"pairs": [[', reply)
        return got if got is not None else self.fallback.select(pop, n, ctx)

    @staticmethod
    def _vectors(key: str, n: int, ctx) -> tuple:
        """(schema that validates, Reply) of a reply with n rate vectors under `key`. Validation does not
        bound the rates (out of range: counted as clamped, repair clips); the schema sent does."""
        L = ctx.n_blocks
        schema = {"type": "object", "required": [key],
                  "properties": {key: {"type": "array", "minItems": n, "items": _vec_schema(L)}}}
        sent = {"type": "object", "required": [key], "properties": {key: {
            "type": "array", "minItems": n, "maxItems": n, "items": _vec_schema(L, ctx.max_rate)}}}
        return schema, Reply(key, sent, grammar.vectors_regex(key, n, L, ctx.max_rate),
                             grammar.max_chars(key, n, L, 2 + grammar.DECIMALS))

    def _children(self, op, ctx, task, n):
        L = ctx.n_blocks
        schema, reply = self._vectors("children", n, ctx)
        return self._ask(op, ctx, task, schema, '{"children": [[r_0, ..., r_%d], ...]}' % (L - 1),
                         lambda o: o["children"][:n], n * L, '{"children": [[', reply)

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


MODES = ("json_schema", "grammar", "json_object", "prompt")  # what openai_chat asks for, best first


def openai_chat(base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", temperature: float = 0.7,
                timeout: float = 300.0):
    """A chat function for an OpenAI-compatible endpoint (`base_url`, e.g. http://localhost:8000/v1). The
    key is read from the environment variable `api_key_env` (a local server usually needs none).

    With a `reply`, the request asks for the reply's JSON schema: response_format {"type": "json_schema"}
    (OpenAI, vLLM, llama.cpp's llama-server); then the reply's exact regex as a GBNF `grammar` field (the
    llama.cpp servers' extension; llama-cpp-python's server answers HTTP 500 to json_schema, and its schema
    grammar ignores numeric bounds and digit counts); then response_format {"type": "json_object",
    "schema": ...}; then none (prompt-only parsing). A mode the server
    refuses with an error status is not asked for again; the mode in use is logged once, and
    `chat.counts` counts the requests of each mode. A connection failure, or an error status without
    response_format, raises UsageError naming the URL; a body that is not a chat completion is an invalid
    reply (counted, then retried or the GA fallback)."""
    import openai

    client = openai.OpenAI(base_url=base_url, api_key=os.environ.get(api_key_env) or "none", timeout=timeout,
                           max_retries=1)
    said: set = set()

    def fmt(mode, reply):
        if mode == "json_schema":
            return {"type": "json_schema", "json_schema": {"name": reply.name, "schema": reply.schema}}
        return {"type": "json_object", "schema": reply.schema}

    def chat(messages, seed, max_tokens, prefix="", reply=None):  # no pre-fill: not every server supports it
        while True:  # a refused mode is in chat.counts (saved with the search state), so a resumed search skips it too
            mode = next(m for m in MODES if m not in chat.counts["refused"]) if reply is not None else "prompt"
            extra = ({} if mode == "prompt" else {"extra_body": {"grammar": grammar.to_gbnf(reply.regex)}}
                     if mode == "grammar" else {"response_format": fmt(mode, reply)})
            try:
                r = client.chat.completions.create(model=model, messages=messages, temperature=temperature,
                                                   seed=seed, max_tokens=max_tokens, **extra)
            except openai.APIConnectionError as e:
                raise UsageError(f"cannot reach the LLM endpoint {base_url}: {e}") from None
            except openai.APIStatusError as e:
                if mode == "prompt":
                    raise UsageError(f"the LLM endpoint {base_url} answered HTTP {e.status_code}: {e.message}") from None
                log.warning("the LLM endpoint %s refused response_format %s (HTTP %d: %s)", base_url, mode,
                            e.status_code, str(e.message).splitlines()[0][:200])
                chat.counts["refused"][mode] = 1
                continue
            break
        if mode not in said:
            said.add(mode)
            log.info("the LLM endpoint %s: %s", base_url, "prompt-only parsing (no response_format)" if mode == "prompt"
                     else "replies constrained by the operator's grammar (GBNF `grammar` field)" if mode == "grammar"
                     else f"replies constrained by response_format {mode} with the operator's JSON schema")
        chat.counts["requests"][mode] = chat.counts["requests"].get(mode, 0) + 1
        if not hasattr(r, "choices"):
            return ""  # e.g. a body that is not a chat completion: an invalid reply, counted, then the fallback
        return (r.choices[0].message.content or "") if r.choices else ""

    chat.counts = {"requests": {}, "refused": {}}
    return chat


def local_chat(spec: str = "smollm2-135m", temperature: float = 0.7, constrained: bool = True):
    """A chat function running the chat model `spec` (any `--model` form: preset, .gguf, directory, hub id)
    in this process with transformers, with the chat template of its tokenizer. `constrained`: decode
    every reply under its regex (`grammar.GrammarProcessor`; llguidance), else free sampling with the
    JSON prefix pre-filled. Raises UsageError for a model without a chat template, or for constrained
    decoding without llguidance (with the install command). The reply budget is the operator's (longest
    valid reply), capped by what the context leaves after the prompt."""
    import torch

    from ..models import context_length, load_model

    if constrained:
        grammar.require()
    model, tok, _ = load_model(spec)
    if not getattr(tok, "chat_template", None):
        raise UsageError(f"{spec} has no chat template: use a chat (instruct) model for --backend local")
    vocab = model.get_output_embeddings().weight.shape[0]

    def render(messages):
        return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def chat(messages, seed, max_tokens, prefix="", reply=None):
        use = constrained and reply is not None
        prefix = "" if use else prefix  # the grammar writes the whole object
        enc = tok(render(messages) + prefix, return_tensors="pt", add_special_tokens=False)
        n_prompt = enc["input_ids"].shape[1]
        procs = [grammar.GrammarProcessor(tok, reply.regex, vocab)] if use else None
        torch.manual_seed(seed)
        with torch.no_grad():
            out = model.generate(**enc, do_sample=temperature > 0, temperature=temperature or None,
                                 top_p=0.95 if temperature > 0 else None, logits_processor=procs,
                                 max_new_tokens=max(1, min(max_tokens, chat.context - n_prompt)),
                                 pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        chat.counts["constrained" if use else "free"] += 1
        return prefix + tok.decode(out[0, n_prompt:], skip_special_tokens=True)

    chat.context = context_length(model)
    chat.count_tokens = lambda messages: len(tok(render(messages), add_special_tokens=False)["input_ids"])
    chat.counts = {"constrained": 0, "free": 0}
    return chat
