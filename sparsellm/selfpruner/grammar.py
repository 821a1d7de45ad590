"""Replies valid by construction: each LLM operator's reply format as a regular expression, and a
transformers `LogitsProcessor` that masks every token leaving it (llguidance, Microsoft's structured
generation engine: https://github.com/guidance-ai/llguidance; the `selfpruner` extra).

The regex is the operator's JSON schema made exact, so a reply that matches it always validates:

    init / crossover / mutation   {"population": [[r, ..., r], ...]}   exactly n vectors of exactly L rates
    select                        {"pairs": [[i, j], ...]}              exactly n pairs, 0 <= i, j < P

A rate is `0`, or `0.` and one to three digits, at most max_rate rounded down to three decimals
(`rate_regex`): every rate lies in [0, max_rate] by construction, no clamping. Whitespace is fixed (one
space after a comma and a colon), so the longest reply has `max_chars` characters, and a reply budget of
that many tokens can never cut a reply short (a token holds at least one character).

Why llguidance (1.9.1) over xgrammar (0.2.9): `bench/grammar_speed.py 30 1 2` (SmolLM2-135M, one
30-rate vector, sampling, 1 thread on the shared 2-core machine, medians of 2) measured 5.4 tokens/s
unconstrained, 4.7 under llguidance (5 ms to build the constraint), 3.2 under xgrammar's transformers
LogitsProcessor; every constrained reply matched, no unconstrained one did. llguidance also has no
dependencies (xgrammar pulls triton and tvm-ffi). Its own torch bitmask apply took ~1 s per step here, so
the mask is applied with numpy. Errors: `require()` raises UsageError with the install
command when llguidance is missing.
"""

from __future__ import annotations

import math
import re

from ..errors import UsageError

INSTALL = "pip install 'sparsellm[selfpruner]'  (or: pip install 'llguidance>=1.0')"
DECIMALS = 3


def require():
    """The llguidance module, or UsageError naming the install command."""
    try:
        import llguidance
        import llguidance.hf  # noqa: F401
        import llguidance.torch  # noqa: F401
    except ImportError:
        raise UsageError(f"constrained decoding (--llm_grammar on) needs llguidance: {INSTALL}") from None
    return llguidance


def _upto(digits: str) -> str:
    """Regex of the digit strings s, 1 <= len(s) <= len(digits), with 0.s <= 0.digits."""
    d, rest = int(digits[0]), digits[1:]
    alts = []
    if d > 0:
        alts.append(f"[0-{d - 1}]" + (f"[0-9]{{0,{len(rest)}}}" if rest else ""))
    alts.append(f"{d}" + (f"({_upto(rest)})?" if rest else ""))
    return alts[0] if len(alts) == 1 else "(" + "|".join(alts) + ")"


def rate_regex(max_rate: float, decimals: int = DECIMALS) -> str:
    """A decimal number in [0, max_rate] with at most `decimals` decimals: `0` or `0.` digits. max_rate in
    [0, 1) (SearchConfig's bound); it is rounded down to `decimals` decimals."""
    if not 0 <= max_rate < 1:
        raise ValueError(f"max_rate must be in [0, 1), got {max_rate}")
    digits = f"{math.floor(max_rate * 10**decimals + 1e-9):0{decimals}d}"
    return rf"0(\.{_upto(digits)})?"


def index_regex(n: int) -> str:
    """A JSON integer in [0, n): the alternatives written out (populations are small)."""
    if n < 1:
        raise ValueError(f"need n >= 1, got {n}")
    return "(" + "|".join(str(i) for i in range(n)) + ")" if n > 1 else "0"


def _list(item: str, n: int) -> str:
    """A JSON list of exactly n items, ", " between them."""
    return rf"\[{item}" + (f"(, {item}){{{n - 1}}}" if n > 1 else "") + r"\]"


def vectors_regex(key: str, n: int, L: int, max_rate: float) -> str:
    """{"key": [[r, ..., r], ...]}: n vectors of L rates in [0, max_rate]."""
    return rf'\{{"{key}": ' + _list(_list(rate_regex(max_rate), L), n) + r"\}"


def pairs_regex(n: int, pop_size: int) -> str:
    """{"pairs": [[i, j], ...]}: n pairs of indices in [0, pop_size)."""
    i = index_regex(pop_size)
    return r'\{"pairs": ' + _list(rf"\[{i}, {i}\]", n) + r"\}"


def max_chars(key: str, n: int, per_item: int, item_chars: int) -> int:
    """The longest reply of `vectors_regex` (item_chars = 2 + DECIMALS) or `pairs_regex` (per_item 2,
    item_chars = digits of the largest index): the reply budget in tokens."""
    inner = per_item * item_chars + 2 * (per_item - 1) + 2  # "[a, b, c]"
    return len(key) + 6 + n * inner + 2 * (n - 1) + 2


def matches(regex: str, text: str) -> bool:
    return re.fullmatch(regex, text) is not None


class GrammarProcessor:
    """A transformers LogitsProcessor: tokens that would leave `regex` get -inf (batch of one; sampling or
    greedy). After the regex is complete only EOS is allowed, so `generate` stops there.

    tok: the model's tokenizer (a fast one: llguidance reads its tokenizer.json); vocab_size: the logits'
    width (>= the tokenizer's, padded rows are masked)."""

    _cache: dict = {}  # id(hf tokenizer) -> llguidance tokenizer (building it walks the whole vocabulary)

    def __init__(self, tok, regex: str, vocab_size: int):
        llg = require()
        key = id(tok)
        if key not in self._cache:
            self._cache[key] = (tok, llg.hf.from_tokenizer(tok, n_vocab=vocab_size))
        self.ll_tok = self._cache[key][1]
        grammar = llg.LLMatcher.grammar_from_regex(regex)
        self.matcher = llg.LLMatcher(self.ll_tok, grammar)
        if self.matcher.is_error():
            raise ValueError(f"bad grammar: {self.matcher.get_error()}")
        self.mask = llg.torch.allocate_token_bitmask(1, self.ll_tok.vocab_size)
        self.prompt_len = None

    def __call__(self, input_ids, scores):
        import llguidance.torch as lt
        import numpy as np
        import torch

        if self.prompt_len is None:
            self.prompt_len = input_ids.shape[1]
        elif input_ids.shape[1] > self.prompt_len:
            self.matcher.consume_token(int(input_ids[0, -1]))
        lt.fill_next_token_bitmask(self.matcher, self.mask, 0)
        # bit t of the int32 words = token t allowed; unpacked with numpy (llguidance's torch version takes
        # ~1 s per step on a 49k vocabulary on this CPU, numpy ~0.1 ms)
        bits = np.unpackbits(self.mask[0].numpy().view(np.uint8), bitorder="little")[:scores.shape[-1]]
        allowed = torch.zeros(scores.shape[-1], dtype=torch.bool)
        allowed[:len(bits)] = torch.from_numpy(bits.astype(bool))
        scores[:, ~allowed.to(scores.device)] = -torch.inf
        return scores


def to_gbnf(regex: str) -> str:
    """The GBNF grammar (llama.cpp's grammar format) of a regex of this module's subset: literals (`\\X`
    escapes one), character classes, groups, `|`, `?` and `{m}` / `{m,n}`. Sent as the `grammar` field to a
    llama.cpp server (llama-server, llama-cpp-python), which then decodes under it."""
    out, i = [], 0
    while i < len(regex):
        c = regex[i]
        if c == "\\":
            c, i = regex[i + 1], i + 1
            out.append(json_lit(c))
        elif c == "[":
            j = regex.index("]", i)
            out.append(regex[i:j + 1])
            i = j
        elif c == "{":
            j = regex.index("}", i)
            out.append(regex[i:j + 1])
            i = j
        elif c in "()|?":
            out.append(c)
        else:
            out.append(json_lit(c))
        i += 1
    return "root ::= " + " ".join(out)


def json_lit(c: str) -> str:
    return '"' + c.replace("\\", "\\\\").replace('"', '\\"') + '"'
