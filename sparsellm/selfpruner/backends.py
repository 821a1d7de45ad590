"""Self-Pruner's search backends: who performs the evolutionary operators (Huang et al., 2025, §3). Each
registers under kind "search_backend" with a config holding only its own settings, and one function

    ops = fn(config, describe=..., log_path=...)     # operators for `evolution.evolve`, or None: no search

    ga       classical genetic operators (`ga.GAOperators`), no settings
    openai   an OpenAI-compatible endpoint (`OpenAIConfig`: llm_base_url, llm_api_key_env, llm)
    local    a chat model run in-process (`LocalConfig`: llm_grammar, llm)
    uniform  no search: the target rate everywhere

The two LLM backends compose the shared settings `LLMConfig` (llm_model, llm_temperature, llm_retries):
llm_model is the name the endpoint serves (openai), or the chat model in any `--model` form (local).
"llm" is not a backend but an alias the command line resolves (`resolve_alias`): openai when
llm_base_url is given, else local. `backend_config` builds the chosen backend's config from flat settings
and refuses a setting of another backend given a non-default value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..config import build, flat_defaults, setting
from ..errors import UsageError
from ..registry import NoConfig, get, names, register
from .ga import GAOperators
from .llm import LLMOperators, local_chat, openai_chat

ALIAS = "llm"


LOCAL_DEFAULT = "smollm2-135m"


@dataclass
class LLMConfig:
    """Settings shared by the LLM backends: the model, the temperature, and how often a reply that does
    not validate is asked for again before the GA operator does that step."""

    llm_model: str | None = setting(None, "the search LLM: openai, the model name the endpoint serves; local, "
                                          f"a chat model in any --model form (default {LOCAL_DEFAULT})")
    llm_temperature: float = setting(0.7, "sampling temperature of the search LLM")
    llm_retries: int = setting(2, "retries of a bad reply before the GA fallback")

    def validate(self) -> "LLMConfig":
        if self.llm_retries < 0:
            raise UsageError(f"--llm_retries must be >= 0, got {self.llm_retries}")
        if not (self.llm_temperature >= 0 and math.isfinite(self.llm_temperature)):
            raise UsageError(f"--llm_temperature must be a finite number >= 0, got {self.llm_temperature}")
        return self


@dataclass
class OpenAIConfig:
    """An OpenAI-compatible endpoint (vLLM, Ollama, llama.cpp server, hosted APIs), the model it serves,
    and the environment variable holding its key (a local server usually needs none)."""

    llm_base_url: str | None = setting(None, "openai backend: e.g. http://localhost:8000/v1")
    llm_api_key_env: str = setting("OPENAI_API_KEY", "openai backend: env variable with the key")
    llm: LLMConfig = field(default_factory=LLMConfig)

    def validate(self) -> "OpenAIConfig":
        if not (self.llm_base_url and self.llm.llm_model):
            raise UsageError("--backend openai needs --llm_base_url and --llm_model")
        self.llm.validate()
        return self


@dataclass
class LocalConfig:
    """A chat (instruct) model run in this process with transformers (llm.llm_model; None: the default
    preset), decoding under each operator's grammar unless llm_grammar is "off"."""

    llm_grammar: str = setting("on", "local backend: decode every reply under its grammar (needs the selfpruner "
                                     "extra: llguidance)", choices=("on", "off"))
    llm: LLMConfig = field(default_factory=LLMConfig)

    def validate(self) -> "LocalConfig":
        if self.llm_grammar not in ("on", "off"):
            raise UsageError(f"--llm_grammar must be on or off, got {self.llm_grammar}")
        self.llm.validate()
        return self

    @property
    def model(self) -> str:
        return self.llm.llm_model or LOCAL_DEFAULT


@register("search_backend", "ga", NoConfig)
def ga(config, *, describe: str, log_path=None):
    """classical genetic operators"""
    return GAOperators()


@register("search_backend", "openai", OpenAIConfig)
def openai(config: OpenAIConfig, *, describe: str, log_path=None):
    """operators by a chat model behind an OpenAI-compatible endpoint, GA fallback"""
    chat = openai_chat(config.llm_base_url, config.llm.llm_model, config.llm_api_key_env, config.llm.llm_temperature)
    return LLMOperators(chat, describe, log_path, config.llm.llm_retries)


@register("search_backend", "local", LocalConfig)
def local(config: LocalConfig, *, describe: str, log_path=None):
    """operators by a chat model run in-process, GA fallback"""
    return LLMOperators(local_chat(config.model, config.llm.llm_temperature, config.llm_grammar == "on"), describe,
                        log_path, config.llm.llm_retries)


@register("search_backend", "uniform", NoConfig)
def uniform(config, *, describe: str, log_path=None):
    """no search: the target rate in every block"""
    return None


# ------------------------------------------------------------------------------------- flat settings


def all_settings() -> dict:
    """{setting name: (default, [backends that have it])} over every registered backend."""
    out: dict = {}
    for name in names("search_backend"):
        for key, default in flat_defaults(get("search_backend", name).config).items():
            out.setdefault(key, (default, []))[1].append(name)
    return out


def resolve_alias(backend: str, llm_base_url: str | None) -> str:
    """`--backend llm`: openai when an endpoint is given, else local; other names unchanged."""
    if backend != ALIAS:
        return backend
    return "openai" if llm_base_url else "local"


def backend_config(backend: str, settings: dict):
    """The config of `backend` from flat `settings` (keys of any backend; the alias "llm" is resolved
    first). Raises UsageError, in one line, for a setting that only other backends have, given a value
    other than its default (e.g. --llm_model with --backend ga), or a setting no backend has."""
    backend = resolve_alias(backend, settings.get("llm_base_url"))
    method = get("search_backend", backend)
    own, known = flat_defaults(method.config), all_settings()
    foreign = {k: v for k, v in settings.items() if k not in own and (k not in known or v != known[k][0])}
    unknown = sorted(k for k in foreign if k not in known)
    if unknown:
        raise UsageError(f"unknown search backend settings: {', '.join(unknown)}")
    if foreign:
        groups: dict = {}
        for k in sorted(foreign):
            groups.setdefault(tuple(known[k][1]), []).append(f"--{k}")
        raise UsageError("; ".join(f"{', '.join(ks)} {'applies' if len(ks) == 1 else 'apply'} only to --backend "
                                   f"{' or '.join(bs)}" for bs, ks in groups.items()))
    return build(method.config, {k: v for k, v in settings.items() if k in own})
