"""One registry of methods: every pruner, allocator, fine-tuning method and Self-Pruner search backend
registers under a name with a config dataclass that holds only that method's fields.

    @register("allocator", "owl", OWLConfig, needs="data")
    def allocate(model, calib_ids, target, config, *, prune_method, batch_size, progress): ...

    method = get("allocator", "owl")      # Method(kind, name, config, fn, needs, help)
    method.config()                       # its default settings

The kinds' packages register their methods when imported; `get` and `names` import them on first use,
so adding a method is one new file plus one import line in its package's `__init__.py`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, fields
from typing import Callable

from .errors import UsageError

PACKAGES = {"pruner": "sparsellm.prune", "allocator": "sparsellm.allocate", "finetune": "sparsellm.adapt",
            "search_backend": "sparsellm.selfpruner"}
_METHODS: dict[str, dict[str, "Method"]] = {kind: {} for kind in PACKAGES}


@dataclass(frozen=True)
class NoConfig:
    """The config of a method without settings of its own."""

    def validate(self, *_, **__) -> "NoConfig":
        return self


@dataclass(frozen=True)
class Method:
    """A registered method. `needs` says what it reads besides the weights: for pruners the calibration
    statistics ("none", "norm" or "hessian"); for allocators "none" (cheap: also run as an early check before
    calibrating), "weights" (reads only the weights, but costly: AlphaPruning's spectra) or "data" (a dense pre-pass). `group`:
    optionally, a pruner's form for several weights that read the same input and share one LayerStats,
    group(weights, stats, sparsities, nm, **config) -> list of new weights, equal to `fn` on each."""

    kind: str
    name: str
    config: type
    fn: Callable
    needs: str = "none"
    help: str = ""
    group: Callable | None = None

    def field_names(self) -> list[str]:
        return [f.name for f in fields(self.config)]


def register(kind: str, name: str, config: type = NoConfig, needs: str = "none", help: str = "",
             group: Callable | None = None):
    """Decorator: register `fn` as method `name` of `kind` (`group`: see `Method`). Raises ValueError for a
    duplicate name."""
    if kind not in PACKAGES:
        raise ValueError(f"unknown method kind {kind!r}; kinds: {', '.join(PACKAGES)}")

    def deco(fn):
        if name in _METHODS[kind] and _METHODS[kind][name].fn is not fn:
            raise ValueError(f"{kind} {name!r} is registered twice")
        _METHODS[kind][name] = Method(kind, name, config, fn, needs, help or (fn.__doc__ or "").split("\n")[0],
                                    group)
        return fn

    return deco


def _load(kind: str) -> dict[str, Method]:
    importlib.import_module(PACKAGES[kind])
    return _METHODS[kind]


def names(kind: str) -> list[str]:
    """Registered names of `kind`, in registration order."""
    return list(_load(kind))


def get(kind: str, name: str) -> Method:
    """The method `name` of `kind`. Raises UsageError for an unknown name, listing the known ones."""
    methods = _load(kind)
    if name not in methods:
        label = {"pruner": "prune method", "allocator": "allocation", "finetune": "fine-tuning method",
                 "search_backend": "search backend"}[kind]
        raise UsageError(f"unknown {label} {name!r}; choose from {', '.join(methods)}")
    return methods[name]
