"""Zero-shot accuracy of a model larger than the device: accelerate's device map (several GPUs, CPU and disk
offload), for lm-eval, which runs the whole model at once (perplexity goes block by block instead:
`blockwise.py`).

    with dispatched(model, "cuda") as (m, info):     # m: the model lm-eval runs; info: where its modules are
        zeroshot(m, tok, ["rte"], device=info["device"])

A lazy model (`models.sharded.lazy_model`, blocks on "meta") is loaded again from its checkpoint directory with
`from_pretrained(dir, device_map="auto", max_memory=..., offload_folder=...)`: what does not fit on the GPUs
stays in CPU memory, what does not fit there either is read from disk at each forward (the checkpoint's own
safetensors when no cast is needed, else a temporary offload folder). An in-memory model is dispatched in
place (`infer_auto_device_map` + `dispatch_model`: the GPUs take what fits, the rest stays in CPU memory and
visits the GPU per forward) and put back as it was on exit: the same parameter objects, tensors and devices.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from collections import Counter

from ..errors import UsageError
from ..lazy import lazy_import

torch = lazy_import("torch")

log = logging.getLogger("sparsellm")

FIT = 0.8  # the share of a device's free memory (and of the free CPU memory) the weights may take


def _gpus(device) -> list[int]:
    """The GPU indices `device` names: all visible ones for "cuda", one for "cuda:k", none for the CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return []
    return [device.index] if device.index is not None else list(range(torch.cuda.device_count()))


def auto_max_memory(device, cpu_bytes: int | None = None, reserve: int = 0) -> dict:
    """accelerate's `max_memory` for `device`: {GPU index: bytes} for each GPU it names (FIT of the free
    memory, less `reserve` bytes, the logits of a batch, on the first; a GPU without room gets 0 and then no
    module), and {"cpu": cpu_bytes} (default FIT of the available memory); what does not fit goes to disk."""
    from ..devices import free_bytes
    from ..models.load import free_memory

    out = {}
    for k, i in enumerate(_gpus(device)):
        out[i] = max(int(FIT * free_bytes(torch.device("cuda", i))) - (reserve if k == 0 else 0), 0)
    out["cpu"] = int(FIT * free_memory()) if cpu_bytes is None else int(cpu_bytes)
    return out


def summary(device_map: dict) -> dict:
    """{device: number of top-level entries of `device_map` placed there} ("disk" for offloaded ones), e.g.
    {"cuda:0": 20, "cpu": 13}."""
    def name(d):
        return f"cuda:{d}" if isinstance(d, int) else str(d)

    return dict(Counter(name(d) for d in device_map.values()))


def _log(device_map: dict, how: str) -> dict:
    counts = summary(device_map)
    log.info("zero-shot on a device map (%s): %s", how, ", ".join(f"{n} module{'s' * (n != 1)} on {d}"
                                                                   for d, n in counts.items()))
    if "disk" in counts:
        log.info("modules offloaded to disk are read again at every forward: zero-shot is I/O bound")
    return counts


def _execution_device(device, device_map: dict):
    """Where lm-eval puts the inputs: the first GPU of the map, else `device`, else the CPU."""
    gpus = [d for d in device_map.values() if isinstance(d, int) or str(d).startswith("cuda")]
    if gpus:
        d = gpus[0]
        return torch.device("cuda", d) if isinstance(d, int) else torch.device(d)
    return torch.device(device) if torch.device(device).type != "cuda" else torch.device("cpu")


@contextlib.contextmanager
def dispatched(model, device, max_memory: dict | None = None, reserve: int = 0, offload_dir=None):
    """The whole of `model` runnable on `device` (a torch.device or name) with accelerate's device map, for
    lm-eval. Yields (runnable model, info): info = {"device": the torch.device to put inputs on, "device_map":
    {device: modules} (`summary`), "source": "checkpoint" (a lazy model read again from its directory) or
    "memory" (an in-memory model dispatched in place)}.

    max_memory: accelerate's {GPU index or "cpu": bytes} (default `auto_max_memory(device, ...)`: for an
    in-memory model the CPU budget is all of it, which is already in memory, so nothing goes to disk).
    reserve: bytes to leave free on the first GPU (lm-eval's logits). offload_dir: where weights that fit
    nowhere are written (default a temporary directory under $TMPDIR, removed on exit).
    On exit an in-memory model is restored exactly (same parameter objects and tensors); a model loaded
    from the checkpoint is dropped. Raises UsageError when the checkpoint cannot be loaded this way."""
    from ..devices import model_bytes

    lazy = getattr(model, "sparsellm_lazy", None)
    own_tmp = offload_dir is None
    offload_dir = tempfile.mkdtemp(prefix="sparsellm-offload-") if own_tmp else str(offload_dir)
    try:
        if lazy is not None:
            budget = auto_max_memory(device, reserve=reserve) if max_memory is None else max_memory
            m = _from_checkpoint(model, budget, offload_dir)
            dmap = getattr(m, "hf_device_map", None) or {"": str(next(m.parameters()).device)}
            counts = _log(dmap, f"{lazy.path} loaded again")
            try:
                yield m, {"device": _execution_device(device, dmap), "device_map": counts, "source": "checkpoint"}
            finally:
                del m
        else:
            budget = auto_max_memory(device, model_bytes(model), reserve) if max_memory is None else max_memory
            with _in_place(model, device, budget, offload_dir) as dmap:
                counts = _log(dmap, "the in-memory model, dispatched in place")
                yield model, {"device": _execution_device(device, dmap), "device_map": counts, "source": "memory"}
    finally:
        if own_tmp:
            shutil.rmtree(offload_dir, ignore_errors=True)


def _from_checkpoint(model, max_memory: dict, offload_dir):
    """The lazy `model`'s checkpoint loaded with `device_map="auto"` in its forward dtype."""
    from transformers import AutoModelForCausalLM

    from ..models.load import _one_line

    path, dtype = model.sparsellm_lazy.path, model.sparsellm_blocks.dtype
    try:
        with _quiet_accelerate():
            m = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map="auto", max_memory=max_memory,
                                                     offload_folder=str(offload_dir))
    except Exception as e:  # unreadable shards, a map that cannot place a block
        raise UsageError(f"could not load {path} with an accelerate device map for zero-shot: {_one_line(e)}") from None
    return m.eval()


@contextlib.contextmanager
def _in_place(model, device, max_memory: dict, offload_dir):
    """Dispatch the in-memory `model` with an auto device map within `max_memory`; yields the map; restores
    every parameter and buffer (object, tensor, device) and removes the hooks on exit."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.hooks import remove_hook_from_submodules

    saved = [(mod, table, k, t, t.data) for mod in model.modules() for table in (mod._parameters, mod._buffers)
             for k, t in table.items() if t is not None]
    own_forward = {id(mod) for mod in model.modules() if "forward" in mod.__dict__}
    no_split = sorted(getattr(model, "_no_split_modules", None) or [])
    dmap = dict(infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split))
    if set(dmap.values()) == {"disk"}:  # accelerate cannot offload the root module itself
        raise UsageError("no module of the model fits in the memory given: raise max_memory")
    main = _execution_device(device, dmap)
    try:
        with _quiet_accelerate():
            dispatch_model(model, dmap, main_device=main, offload_dir=str(offload_dir))
        yield dmap
    finally:
        remove_hook_from_submodules(model)
        for mod, table, k, t, data in saved:
            t.data = data
            table[k] = t
        model.__dict__.pop("hf_device_map", None)
        for mod in model.modules():  # accelerate leaves the original forward bound on the instance
            if id(mod) not in own_forward:
                mod.__dict__.pop("forward", None)


@contextlib.contextmanager
def _quiet_accelerate():
    """accelerate's "Some parameters are on the meta device because they were offloaded" warning, which
    our own log line replaces, kept off stderr."""
    names = ("accelerate", "accelerate.big_modeling", "accelerate.utils.modeling")
    levels = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        yield
    finally:
        for n, level in levels.items():
            logging.getLogger(n).setLevel(level)
