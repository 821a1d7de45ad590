"""The architecture table: everything sparsellm knows about a model family, in one place.

`ARCHITECTURES` maps a `config.model_type` to an `Arch`: where the decoder blocks live, the role of every
linear inside a block (q, k, v, o, gate, up, down), the attention layout, and which features support the
family (`structured` pruning, `onnx` export). Every other module reads this table rather than keeping its
own list, so adding a family is one entry here. This module imports nothing from the rest of sparsellm but
`errors`, so every part of the package can use it without an import cycle.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping


from ..errors import UsageError
from ..lazy import lazy_import

nn = lazy_import("torch.nn")

ROLES = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass(frozen=True)
class Attention:
    """The attention layout of a family: `path` of the attention module inside a block, whether the config
    has separate key/value heads (`kv_heads`, grouped-query attention), how positions are encoded
    (`positions`: "rotary" or "learned"), and whether the family can use a sliding window."""

    path: str
    kv_heads: bool
    positions: str
    sliding_window: bool


@dataclass(frozen=True)
class Spec:
    """Where the attention and MLP projections of one decoder block are (the view structured pruning uses):
    the attention module, q/k/v/o, the projections that read the block's input with one row per MLP
    intermediate channel (`up`: gate and up, in that order), and `down`."""

    attn: str
    q: str
    k: str
    v: str
    o: str
    up: tuple[str, ...]
    down: str


@dataclass(frozen=True)
class Arch:
    """One model family. `blocks`: dotted attribute path of the decoder blocks from the `*ForCausalLM` model.
    `roles`: role -> name of that linear inside a block, in the order `block_linears` returns them (report
    JSON follows it). `attention`: the layout. `structured` / `onnx`: whether structured pruning / the ONNX
    export for sparse runtimes support the family."""

    blocks: str
    roles: Mapping[str, str]
    attention: Attention
    structured: bool
    onnx: bool

    def __post_init__(self):
        unknown = set(self.roles) - set(ROLES)
        if unknown:
            raise ValueError(f"unknown linear roles {sorted(unknown)}; roles are {', '.join(ROLES)}")
        object.__setattr__(self, "roles", MappingProxyType(dict(self.roles)))  # read-only, order kept

    @property
    def linears(self) -> tuple[str, ...]:
        """The names of a block's prunable linears, in `roles` order."""
        return tuple(self.roles.values())

    @property
    def groups(self) -> tuple[tuple[str, ...], ...]:
        """The block's linears grouped by the tensor they read, in forward order: q/k/v (the attention
        input), o, gate/up (the MLP input), down; a group without linears in this family is left out. The
        single-pass engine prunes one group at a time."""
        r = self.roles
        out = (tuple(r[x] for x in roles if x in r) for roles in (("q", "k", "v"), ("o",), ("gate", "up"), ("down",)))
        return tuple(g for g in out if g)

    @property
    def spec(self) -> Spec:
        """The roles as structured pruning sees them (see `Spec`)."""
        r = self.roles
        up = tuple(r[x] for x in ("gate", "up") if x in r)
        return Spec(self.attention.path, r["q"], r["k"], r["v"], r["o"], up, r["down"])


def _llama_like(sliding_window: bool, onnx: bool) -> Arch:
    """The LLaMA block layout shared by LLaMA, Mistral, Qwen2 and Gemma 3."""
    return Arch(
        blocks="model.layers",
        roles={"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
               "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"},
        attention=Attention("self_attn", kv_heads=True, positions="rotary", sliding_window=sliding_window),
        structured=True,
        onnx=onnx,
    )


# ONNX export needs full causal attention over rotary positions: Gemma 3 interleaves sliding-window layers
# and OPT learns its positions. Structured pruning needs a head size independent of the width: not OPT.
ARCHITECTURES: dict[str, Arch] = {
    "llama": _llama_like(sliding_window=False, onnx=True),
    "mistral": _llama_like(sliding_window=True, onnx=True),
    "qwen2": _llama_like(sliding_window=True, onnx=True),
    "gemma3_text": _llama_like(sliding_window=True, onnx=False),
    "opt": Arch(
        blocks="model.decoder.layers",
        roles={"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.out_proj",
               "up": "fc1", "down": "fc2"},
        attention=Attention("self_attn", kv_heads=False, positions="learned", sliding_window=False),
        structured=False,
        onnx=False,
    ),
}


def families(capability: str) -> list[str]:
    """The model types whose `Arch` has the flag `capability` ("structured" or "onnx") set, sorted."""
    return sorted(mt for mt, arch in ARCHITECTURES.items() if getattr(arch, capability))


def check_supported(model_type) -> None:
    """Raises UsageError for a `model_type` that is not in `ARCHITECTURES`."""
    if model_type not in ARCHITECTURES:
        raise UsageError(
            f"unsupported architecture {model_type!r}; supported: {', '.join(sorted(ARCHITECTURES))}"
        )


def get_arch(model: nn.Module) -> Arch:
    """The `Arch` entry for `model`. Raises UsageError for a family that is not in `ARCHITECTURES`."""
    model_type = getattr(model.config, "model_type", None)
    check_supported(model_type)
    return ARCHITECTURES[model_type]


def get_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of `model`, in order."""
    obj = model
    for part in get_arch(model).blocks.split("."):
        obj = getattr(obj, part)
    return obj


def block_linears(model: nn.Module, block: nn.Module) -> dict[str, nn.Linear]:
    """The prunable linear sublayers of one decoder block, by their name inside the block, in `roles` order.
    Raises UsageError if the block does not have the linears its architecture entry names."""
    out = {}
    for name in get_arch(model).linears:
        try:
            mod = block.get_submodule(name)
        except AttributeError:
            mod = None
        if not isinstance(mod, nn.Linear):
            raise UsageError(f"decoder block has no linear {name!r} (model_type {model.config.model_type!r})")
        out[name] = mod
    return out


def context_length(model: nn.Module) -> int:
    """The longest sequence the model was trained for, from its config (never used as a default seqlen)."""
    cfg = model.config
    return int(getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", 2048))


def struct_spec(model) -> Spec:
    """Where structured pruning finds `model`'s projections. Raises UsageError for a family whose `structured`
    flag is off (OPT: its head size is tied to the width) or that is not in the table."""
    mt = getattr(model.config, "model_type", None)
    arch = ARCHITECTURES.get(mt)
    if arch is None or not arch.structured:
        raise UsageError(f"structured pruning supports {', '.join(families('structured'))}; not {mt!r}")
    return arch.spec
