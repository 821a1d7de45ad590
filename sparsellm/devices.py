"""The compute device and the forward precision of a run: `--device` and `--dtype`.

    --device auto | cpu | cuda | cuda:N     auto: the first CUDA device when torch sees one, else the CPU
    --dtype  auto | float32 | bfloat16 | float16
             auto: bfloat16 on a GPU (float16 for a checkpoint stored in float16, or a GPU without bf16),
                   float32 on a CPU (this kind of CPU has no fast bf16: bf16 matrix work ran ~7x slower)

Statistics (input norms, Hessians, Gram matrices) are always accumulated in float32 on the compute device
(`prune.LayerStats`), whatever the forward dtype. Errors are one-line `UsageError`s raised before any work:
a malformed device, CUDA where torch sees none, `cuda:N` past the last device, a dtype the device cannot run.
"""

from __future__ import annotations

import re

from .errors import UsageError
from .lazy import lazy_import

torch = lazy_import("torch")

DEVICE_HELP = "compute device: auto (CUDA when available, else cpu), cpu, cuda or cuda:N"
DTYPES = ("auto", "float32", "bfloat16", "float16")
DTYPE_HELP = ("dtype of the model's forwards: auto (bfloat16 on a GPU, float16 for a float16 checkpoint; float32 on "
              "a CPU), float32, bfloat16 or float16; statistics always accumulate in float32")
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_device_spec(spec: str) -> None:
    """UsageError unless `spec` is auto, cpu, cuda or cuda:N (syntax only: torch is not imported)."""
    if not isinstance(spec, str) or not _DEVICE.fullmatch(spec):
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N; got {spec!r}")


def check_dtype_spec(spec: str) -> None:
    """UsageError unless `spec` is one of DTYPES."""
    if spec not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}; got {spec!r}")


def resolve_device(spec: str = "auto") -> torch.device:
    """The torch.device for `--device`. Raises UsageError for a malformed spec, CUDA when torch sees no CUDA
    device (a CPU-only build, or no GPU visible), or `cuda:N` with N not below the number of devices."""
    check_device_spec(spec)
    if spec == "cpu":
        return torch.device("cpu")
    available = torch.cuda.is_available()
    if spec == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if available else torch.device("cpu")
    if not available:
        why = "this torch is built without CUDA" if torch.version.cuda is None else "torch sees no CUDA device"
        raise UsageError(f"--device {spec}: no CUDA device is available ({why}); use --device cpu")
    index = int(spec.split(":")[1]) if ":" in spec else torch.cuda.current_device()
    count = torch.cuda.device_count()
    if index >= count:
        raise UsageError(f"--device {spec}: there {'is' if count == 1 else 'are'} only {count} CUDA device"
                         f"{'s' * (count != 1)} (cuda:0{f' to cuda:{count - 1}' if count > 1 else ''})")
    return torch.device("cuda", index)


def resolve_dtype(spec: str, device: torch.device, stored: str | None = None) -> torch.dtype:
    """The forward dtype for `--dtype` on `device`. `stored`: the dtype the checkpoint declares ("float16",
    "bfloat16", ...; None when unknown). Raises UsageError for an unknown spec or a dtype the device cannot
    run (bfloat16 on a GPU without bf16 support; any dtype whose matrix product fails on the device)."""
    check_dtype_spec(spec)
    cuda = torch.device(device).type == "cuda"
    if spec == "auto":
        if not cuda:
            return torch.float32
        if stored == "float16" or not torch.cuda.is_bf16_supported():
            return torch.float16
        return torch.bfloat16
    dtype = getattr(torch, spec)
    if cuda and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise UsageError(f"--dtype bfloat16: {torch.cuda.get_device_name(device)} cannot run bfloat16; use "
                         "float16 or float32")
    try:  # what the forwards and the pruners need: a matrix product and a cast back to float32
        a = torch.ones(4, 4, dtype=dtype, device=device)
        (a @ a).float()
    except RuntimeError as e:
        raise UsageError(f"--dtype {spec} cannot run on {device}: {str(e).splitlines()[0]}") from None
    return dtype


def describe(device: torch.device) -> str:
    """"cpu", or "cuda:0 (NVIDIA H200, 139.8 GiB)" for the log and the run record."""
    device = torch.device(device)
    if device.type != "cuda":
        return str(device)
    props = torch.cuda.get_device_properties(device)
    return f"{device} ({props.name}, {props.total_memory / 2**30:.1f} GiB)"


def free_bytes(device: torch.device) -> int | None:
    """Free memory on a CUDA device in bytes (None for the CPU)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return int(torch.cuda.mem_get_info(device)[0])


def model_bytes(model) -> int:
    """Bytes of `model`'s parameters and buffers (each tensor once)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen and t.device.type != "meta":
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total
