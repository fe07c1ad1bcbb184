"""Micro-batches: a step's batch cut into pieces whose saved activations fit a memory budget.

The activations a ViT keeps for its backward pass grow with the batch, the depth, the token count and
the width; at 224 px a d24-w192 descendant keeps about 41 MB per image in bf16 (64 in fp32), so the
expanding phase's batch of 64 alone held 2.7 GB. A step instead runs its batch as ``len(chunks)``
forward/backward passes of at most :func:`micro_batch_size` images each, and each piece's loss is
weighted by its share of the batch, so the accumulated gradient is the full batch's mean-loss gradient
(exactly, up to the order of floating-point sums: a ViT has no batch statistics). Memory then stays
bounded whatever the batch size; the update and the learning curve do not change.

The estimate (pure, :func:`activation_mb_per_image`)::

    MB per image = depth * tokens * (c_w * width + c_h * mlp_hidden) * bytes / 2**20

where ``c_w = 8`` and ``c_h = 2`` count the tensors of a timm block that autograd keeps (the block
input, the two LayerNorm outputs, qkv (3), attention output, projection; fc1 and GELU outputs at the
MLP's width) and ``bytes`` is 4.4 in fp32 and 2.9 under bf16 autocast (which keeps bf16 copies of the
matmul inputs beside some fp32 tensors); these factors were measured on this repository's expanding
phase, d24-w192-r4 at 224 px (marginal 63 and 41.5 MB per image, fp32 and bf16), and round up.

The budget (:func:`resolve_memory_mb`): a number given is used wherever the step runs. ``None`` (the default,
``--train-memory-mb auto``) is :data:`CPU_MEMORY_MB` on the CPU, where activations are the process's RSS and
the budget keeps a 224-px build's memory bounded (bench/real_scale.py), and :data:`CUDA_MEMORY_SHARE` of the
GPU's free memory on CUDA, where 512 MB cut an H200's DeiT-Tiny batch of 64 into 3-6 passes and the step ran
2.1x (fine-tune, bf16) and 2.7x (expanding phase) longer than the whole batch (bench/RESULTS.md, GPU check).
"""

from __future__ import annotations

import math

import torch
from torch import nn

#: the activation budget on the CPU when none is given: MB of saved activations a forward/backward may hold
CPU_MEMORY_MB = 512
#: the activation budget on CUDA when none is given: this share of the device's free memory when the run starts
#: (the rest for weights, optimizer state, the allocator's slack and, on a Jetson's shared memory, the host)
CUDA_MEMORY_SHARE = 0.5

#: the most MB of activations a *dry run's* measured steps hold on the CPU, where activations are the process's RSS:
#: three eighths of :data:`CPU_MEMORY_MB`, so a 224-px dry run that times the expanding phase's d24 step stays under
#: 1.5 GB (at 256 MB it peaked at 1.43-1.50 GB). Smaller micro-batches run a step slower (bench/RESULTS.md,
#: "The expanding-phase step taken apart"), so a dry run's estimates of steps at larger budgets are that much high.
DRY_RUN_CPU_MEMORY_MB = 192

#: bytes per kept element, by precision (see the module docstring for how they were measured)
BYTES_PER_ELEMENT = {"fp32": 4.4, "bf16": 2.9, "fp16": 2.9}


def activation_mb_per_image(depth: int, tokens: int, width: int, mlp_hidden: int, precision: str) -> float:
    """Saved activations of one image's forward pass in MB (formula in the module docstring)."""
    per = BYTES_PER_ELEMENT.get(precision, BYTES_PER_ELEMENT["fp32"])
    return depth * tokens * (8 * width + 2 * mlp_hidden) * per / 2**20


def model_activation_mb(model: nn.Module, precision: str) -> float:
    """:func:`activation_mb_per_image` of a timm VisionTransformer at its current input size; 0.0 (no
    estimate: the whole batch at once) for any other module."""
    blocks = getattr(model, "blocks", None)
    embed = getattr(model, "patch_embed", None)
    if blocks is None or embed is None or not hasattr(model, "embed_dim"):
        return 0.0
    blocks = list(blocks)
    tokens = int(embed.num_patches) + int(getattr(model, "num_prefix_tokens", 1))
    fc1 = getattr(getattr(blocks[0], "mlp", None), "fc1", None) if blocks else None
    hidden = int(getattr(fc1, "out_features", model.embed_dim))
    return activation_mb_per_image(len(blocks), tokens, int(model.embed_dim), hidden, precision)


def auto_memory_mb(device_type: str, free_mb: float | None) -> float:
    """The budget when none is given: :data:`CUDA_MEMORY_SHARE` of ``free_mb`` on CUDA (where it is known),
    else :data:`CPU_MEMORY_MB`."""
    if device_type == "cuda" and free_mb is not None and free_mb > 0:
        return max(float(CPU_MEMORY_MB), CUDA_MEMORY_SHARE * free_mb)
    return float(CPU_MEMORY_MB)


def resolve_memory_mb(memory_mb: float | None, device: torch.device) -> float:
    """``memory_mb`` when given (``<= 0``: no limit), else :func:`auto_memory_mb` for ``device``, reading a CUDA
    device's free memory (``torch.cuda.mem_get_info``)."""
    if memory_mb is not None:
        return float(memory_mb)
    free = torch.cuda.mem_get_info(device)[0] / 2**20 if device.type == "cuda" else None
    return auto_memory_mb(device.type, free)


def dry_run_memory_mb(memory_mb: float | None, device_type: str) -> float | None:
    """The activation budget of a dry run's measured steps: on the CPU the build's (``None``: its default
    :data:`CPU_MEMORY_MB`; ``<= 0``, no limit) capped at :data:`DRY_RUN_CPU_MEMORY_MB`; elsewhere the build's own
    (a GPU's activations are not the dry run's RSS, and a small budget there runs a step 2-3x slower)."""
    if device_type != "cpu":
        return memory_mb
    budget = float(CPU_MEMORY_MB if memory_mb is None else memory_mb)
    return float(DRY_RUN_CPU_MEMORY_MB) if budget <= 0 else min(budget, float(DRY_RUN_CPU_MEMORY_MB))


def micro_batch_size(batch: int, per_image_mb: float, memory_mb: float) -> int:
    """The most images (at least 1, at most ``batch``) whose activations fit ``memory_mb``; ``memory_mb <= 0``
    means no limit (the whole batch at once)."""
    if memory_mb <= 0 or per_image_mb <= 0:
        return batch
    return max(1, min(batch, int(memory_mb // per_image_mb)))


def spans(batch: int, micro: int) -> list[slice]:
    """:func:`chunks` as consecutive slices of the batch: ``spans(5, 2) == [slice(0, 2), slice(2, 4), slice(4, 5)]``
    (``chunks(5, 2) == [2, 2, 1]``)."""
    out, at = [], 0
    for n in chunks(batch, micro):
        out.append(slice(at, at + n))
        at += n
    return out


def chunks(batch: int, micro: int) -> list[int]:
    """``batch`` cut into ``ceil(batch / micro)`` pieces of near-equal size (they differ by at most one),
    largest first: ``chunks(64, 24) == [22, 21, 21]``."""
    if batch < 1 or micro < 1:
        raise ValueError(f"batch and micro-batch must be >= 1, got {batch} and {micro}")
    n = math.ceil(batch / micro)
    base, extra = divmod(batch, n)
    return [base + (1 if i < extra else 0) for i in range(n)]
