"""Model families and model loading.

`arch`: the architecture table (`ARCHITECTURES`: where each family keeps its decoder blocks, the role of
every linear, its attention layout, and whether structured pruning and ONNX export support it) and its
accessors. `load`: presets, resolving `--model`, loading (GGUF conversion, structurally pruned directories).
`save`: writing weights and config.json in the saved dtype, refusing keys plain transformers would not load.
Everything is re-exported here, so `from sparsellm.models import X` works for both.
"""

from __future__ import annotations

from .arch import (ARCHITECTURES, ROLES, Arch, Attention, Spec, block_linears, check_supported, context_length,
                   families, get_arch, get_blocks, struct_spec)
from .load import (DEFAULT_MODEL, PRESETS, STRUCTURE, _gguf_to_hf_dir, cache_dir, load_model, load_structured,
                   preset_gguf, resolve_model)
from .save import check_fits, check_loadable, resolve_save_dtype, save_model

__all__ = ["ARCHITECTURES", "ROLES", "Arch", "Attention", "Spec", "block_linears", "check_supported",
           "context_length", "families", "get_arch", "get_blocks", "struct_spec", "DEFAULT_MODEL", "PRESETS",
           "STRUCTURE", "cache_dir", "load_model", "load_structured", "preset_gguf", "resolve_model", "check_loadable",
           "resolve_save_dtype", "save_model", "check_fits"]
