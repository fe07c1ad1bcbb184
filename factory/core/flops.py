"""Measured FLOPs (fvcore) and parameter counts of a model.

fvcore counts one multiply-add as one FLOP and has no handle for
``aten::scaled_dot_product_attention``, the fused attention timm uses: it would silently count
attention as zero. :func:`count_flops` registers :func:`sdpa_flop_jit`, which counts
``B * H * N_q * N_k * (d_qk + d_v)`` (the ``q @ k^T`` and ``attn @ v`` products), so the measured
total equals :func:`factory.core.shapes.vit_flops`'s closed form.
"""

from __future__ import annotations

import warnings
from collections import Counter
from typing import Any

import torch
from torch import nn


def _shape(value: Any) -> list[int]:
    return list(value.type().sizes())


def sdpa_flop_jit(inputs: list[Any], outputs: list[Any]) -> Counter:
    """fvcore handle for ``aten::scaled_dot_product_attention(q, k, v, ...)``."""
    q, k, v = (_shape(x) for x in inputs[:3])
    batch = 1
    for dim in q[:-2]:
        batch *= dim
    n_q, d_qk = q[-2], q[-1]
    n_k, d_v = k[-2], v[-1]
    return Counter({"scaled_dot_product_attention": batch * n_q * n_k * (d_qk + d_v)})


def flop_analysis(model: nn.Module, inputs: torch.Tensor):
    """A configured fvcore ``FlopCountAnalysis`` (attention counted, warnings off)."""
    from fvcore.nn import FlopCountAnalysis

    analysis = FlopCountAnalysis(model, inputs)
    analysis.set_op_handle("aten::scaled_dot_product_attention", sdpa_flop_jit)
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    return analysis


def count_flops(model: nn.Module, img_size: int | None = None, *, in_chans: int | None = None) -> int:
    """fvcore multiply-adds of one forward pass at batch 1 (``img_size`` from the model if omitted)."""
    pe = getattr(model, "patch_embed", None)
    if img_size is None:
        img_size = pe.img_size[0] if pe is not None else 224
    if in_chans is None:
        in_chans = pe.proj.in_channels if pe is not None else 3
    param = next(model.parameters())
    x = torch.zeros(1, in_chans, img_size, img_size, dtype=param.dtype, device=param.device)
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            return int(flop_analysis(model, x).total())
    finally:
        model.train(was_training)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
