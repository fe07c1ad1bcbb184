"""Where, on how many threads and in which precision training steps run: the device, intra-op threads, and autocast
(bf16 / fp16 / fp32).

``amp="auto"`` is bf16 autocast on CUDA (fp16 with a GradScaler where bf16 is unsupported) and on
CPUs with native bf16 dot products (AVX512-BF16 or AMX), fp32 elsewhere; weights and optimizer
state stay fp32 either way (``bench/precision.py`` measures the accuracy and speed against fp32).
"""

from __future__ import annotations

import contextlib

import torch

from factory.errors import FactoryError


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise FactoryError(f"{name!r} requested but CUDA is not available; use cpu", param="device")
    return torch.device(name)


def cpu_bf16_supported() -> bool:
    """Whether this CPU has native bf16 dot products (AVX512-BF16 or AMX tiles): there bf16 autocast
    is faster than fp32; elsewhere it is emulated and slower, so ``amp="auto"`` stays fp32."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(bool(check()) for check in checks if callable(check))


def precision_for(device: torch.device, amp: str) -> str:
    """The compute precision ``amp`` means on ``device``: ``"bf16"``, ``"fp16"`` or ``"fp32"`` (see module docstring)."""
    if amp == "off":
        return "fp32"
    if device.type == "cuda":
        return "fp16" if amp == "fp16" or (amp == "auto" and not torch.cuda.is_bf16_supported()) else "bf16"
    if amp == "fp16":
        raise FactoryError("fp16 autocast needs a CUDA device; on the CPU use bf16, auto or off", param="amp")
    return "bf16" if amp == "bf16" or cpu_bf16_supported() else "fp32"


def autocast_for(device: torch.device, amp: str):
    """The autocast context for ``device`` and ``amp`` (:func:`precision_for`) and whether fp16 needs a GradScaler."""
    precision = precision_for(device, amp)
    if precision == "fp32":
        return contextlib.nullcontext(), False
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype), precision == "fp16"


@contextlib.contextmanager
def intra_op_threads(n: int | None):
    """Run the body with ``n`` intra-op threads in *this* thread (OpenMP's thread count is a
    per-thread setting), restoring the previous count after.

    CPU results depend on the thread count (reductions are split by it), so executors pin it per
    job: the same job on the same count gives the same bytes, whether a thread here or a Ray task
    ran it. ``None`` leaves torch's setting alone.
    """
    if n is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        torch.set_num_threads(previous)
