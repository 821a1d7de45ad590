"""Heavy libraries imported on first use, so that building the command line (its flags come from the config
dataclasses, which live next to the methods) and answering `--help` or a flag error never import torch,
numpy or scipy (about 2 s on a small machine).

    torch = lazy_import("torch")     # instead of `import torch`: the real import happens at the first
    nn = lazy_import("torch.nn")     # attribute read (torch.float32, nn.Linear, ...), inside a function

    @no_grad                         # instead of `@torch.no_grad()`, which would import torch at definition
    def forward_pass(...): ...

The stand-in is never put in `sys.modules`, so `"torch" in sys.modules` still says whether torch was loaded.
A module that subclasses `nn.Module` at top level needs the real torch and is imported only where used.
"""

from __future__ import annotations

import functools
import importlib
import sys
import types


class LazyModule(types.ModuleType):
    """Stands in for module `name`; reading any attribute imports the module and returns its attribute."""

    def __getattr__(self, attr: str):  # called only for names not yet in this stand-in's namespace
        module = importlib.import_module(self.__name__)
        self.__dict__.update(module.__dict__)  # later reads are plain attribute reads (~30 ns, not ~2 µs)
        return getattr(module, attr)

    def __repr__(self) -> str:
        return f"<lazy module {self.__name__!r}>"


def lazy_import(name: str) -> types.ModuleType:
    """The module `name` if it is already imported, else a `LazyModule` that imports it on first use."""
    return sys.modules.get(name) or LazyModule(name)


def no_grad(fn):
    """`torch.no_grad()` as a decorator, applied on the first call (generator functions included)."""
    wrapped = None

    @functools.wraps(fn)
    def call(*args, **kwargs):
        nonlocal wrapped
        if wrapped is None:
            import torch

            wrapped = torch.no_grad()(fn)
        return wrapped(*args, **kwargs)

    return call
