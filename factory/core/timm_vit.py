"""The bridge to timm: read an ancestry's architecture, split its weights, build descendants.

Supported ancestries are timm ``VisionTransformer`` models with the standard pre-norm ``Block``
(LayerNorm, ``Attention`` with fused qkv, ``Mlp`` with GELU), optional layer scale, class and
register tokens, token or average pooling -- ViT, DeiT, AugReg, and models fine-tuned from them.
Anything else (qk-norm, SwiGLU, parallel blocks, DeiT distillation tokens) is rejected with a
one-line reason rather than expanded wrongly.
"""

from __future__ import annotations

import functools
import re

import torch
from torch import nn

from factory.core.shapes import ArchConfig, DescendantShape
from factory.errors import FactoryError

#: Per-block tensors PEG mixes, with the role of each axis (used by head/width selection).
#: ``D`` embed dim, ``QKV`` the 3*heads*head_dim rows of qkv, ``A`` heads*head_dim, ``M`` hidden.
BLOCK_TENSORS: dict[str, tuple[str, ...]] = {
    "norm1.weight": ("D",),
    "norm1.bias": ("D",),
    "attn.qkv.weight": ("QKV", "D"),
    "attn.qkv.bias": ("QKV",),
    "attn.proj.weight": ("D", "A"),
    "attn.proj.bias": ("D",),
    "ls1.gamma": ("D",),
    "norm2.weight": ("D",),
    "norm2.bias": ("D",),
    "mlp.fc1.weight": ("M", "D"),
    "mlp.fc1.bias": ("M",),
    "mlp.fc2.weight": ("D", "M"),
    "mlp.fc2.bias": ("D",),
    "ls2.gamma": ("D",),
}

#: Non-block tensors (the learngene's "stem"), with the role of each axis. ``T`` tokens,
#: ``C`` classes, ``I`` input channels, ``P`` patch pixels. Leading singleton axes are ``1``.
STEM_TENSORS: dict[str, tuple[str, ...]] = {
    "cls_token": ("1", "1", "D"),
    "reg_token": ("1", "T", "D"),
    "pos_embed": ("1", "T", "D"),
    "patch_embed.proj.weight": ("D", "I", "P", "P"),
    "patch_embed.proj.bias": ("D",),
    "norm_pre.weight": ("D",),
    "norm_pre.bias": ("D",),
    "norm.weight": ("D",),
    "norm.bias": ("D",),
    "fc_norm.weight": ("D",),
    "fc_norm.bias": ("D",),
    "head.weight": ("C", "D"),
    "head.bias": ("C",),
}

_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")


def _is_vit(model: nn.Module) -> bool:
    from timm.models.vision_transformer import VisionTransformer

    return isinstance(model, VisionTransformer)


def arch_of(model: nn.Module) -> ArchConfig:
    """Read the :class:`ArchConfig` of a timm ViT, rejecting variants PEG cannot expand."""
    from timm.layers import Mlp
    from timm.models.vision_transformer import Attention, Block, LayerScale

    if not _is_vit(model):
        raise FactoryError(
            f"ancestry is a {type(model).__name__}, not a timm VisionTransformer; "
            "PEG expands ViT/DeiT models (e.g. vit_small_patch16_224, deit_tiny_patch16_224)"
        )
    if getattr(model, "dist_token", None) is not None or type(model).__name__ != "VisionTransformer":
        raise FactoryError(
            f"ancestry class {type(model).__name__} is a ViT variant peg-factory does not expand; "
            "use a plain VisionTransformer (ViT/DeiT without distillation token)"
        )
    blocks = list(model.blocks)
    if not blocks:
        raise FactoryError("ancestry has no transformer blocks")
    b0 = blocks[0]
    parts = (type(b0), type(getattr(b0, "attn", None)), type(getattr(b0, "mlp", None)))
    if parts != (Block, Attention, Mlp):
        raise FactoryError(
            f"ancestry blocks are {'/'.join(p.__name__ for p in parts)}; peg-factory does not "
            "expand them (only timm's standard Block/Attention/Mlp)"
        )
    if not isinstance(b0.attn.q_norm, nn.Identity) or not isinstance(b0.attn.norm, nn.Identity):
        raise FactoryError("ancestry uses qk-norm or attention scale-norm, which PEG does not expand")
    if not isinstance(b0.mlp.norm, nn.Identity) or not isinstance(b0.mlp.act, nn.GELU):
        raise FactoryError("ancestry MLP is not Linear-GELU-Linear, which PEG expects")
    if b0.attn.proj.bias is None or b0.mlp.fc1.bias is None:
        raise FactoryError("ancestry has bias-free projections, which peg-factory does not support")
    if not isinstance(b0.norm1, nn.LayerNorm):
        raise FactoryError(f"ancestry norm is {type(b0.norm1).__name__}; LayerNorm is required")
    pe = model.patch_embed
    if getattr(pe, "backbone", None) is not None:  # timm's HybridEmbed: a CNN stem before the patches
        raise FactoryError(
            f"ancestry is a hybrid ViT (its patch embedding, {type(pe).__name__}, runs a CNN backbone first), "
            "which peg-factory does not expand; use a plain ViT/DeiT (e.g. vit_small_patch16_224)"
        )
    if pe.img_size is None or pe.img_size[0] != pe.img_size[1] or pe.patch_size[0] != pe.patch_size[1]:
        raise FactoryError("ancestry must use square images and square patches")
    init_values = None
    if isinstance(b0.ls1, LayerScale):
        init_values = 1.0  # value irrelevant: gamma is inherited, only its presence matters
    return ArchConfig(
        embed_dim=model.embed_dim,
        depth=len(blocks),
        num_heads=b0.attn.num_heads,
        mlp_hidden=b0.mlp.fc1.out_features,
        img_size=pe.img_size[0],
        patch_size=pe.patch_size[0],
        num_classes=model.num_classes,
        in_chans=pe.proj.in_channels,
        class_token=model.cls_token is not None,
        reg_tokens=model.num_reg_tokens,
        no_embed_class=model.no_embed_class,
        global_pool=model.global_pool,
        qkv_bias=b0.attn.qkv.bias is not None,
        pre_norm=not isinstance(model.norm_pre, nn.Identity),
        fc_norm=not isinstance(model.fc_norm, nn.Identity),
        init_values=init_values,
        norm_eps=b0.norm1.eps,
    )


def _vision_transformer(arch: ArchConfig, shape: DescendantShape | None, **extra) -> nn.Module:
    """timm's ``VisionTransformer`` in ``arch``'s style at ``shape`` (``extra``: more of its arguments)."""
    from timm.models.vision_transformer import VisionTransformer

    norm_layer = functools.partial(nn.LayerNorm, eps=arch.norm_eps)
    return VisionTransformer(norm_layer=norm_layer, **arch.timm_kwargs(shape), **extra)


def build_vit(arch: ArchConfig, shape: DescendantShape | None = None, *, seed: int | None = None) -> nn.Module:
    """A randomly initialised timm ``VisionTransformer`` in ``arch``'s style at ``shape``.

    With ``seed``, the initialisation is drawn from a forked RNG seeded with it (deterministic,
    and torch's global RNG is left untouched); without, from torch's global RNG as timm does.
    """
    if seed is None:
        return _vision_transformer(arch, shape)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _vision_transformer(arch, shape)


def skeleton_vit(arch: ArchConfig, shape: DescendantShape | None = None) -> nn.Module:
    """:func:`build_vit`'s module tree on the meta device, its initialisation skipped (timm's
    ``weight_init="skip"``): no memory, and ~35 ms instead of ~230 ms for a DeiT-Tiny-sized tree, whose
    truncated-normal draws run through Python decompositions on meta tensors. For
    ``torch.func.functional_call`` with given tensors, or :meth:`~torch.nn.Module.to_empty`."""
    with torch.device("meta"):
        return _vision_transformer(arch, shape, weight_init="skip")


def empty_vit(arch: ArchConfig, shape: DescendantShape | None = None) -> nn.Module:
    """Like :func:`build_vit` but with uninitialised weights (:func:`skeleton_vit` materialised on the
    CPU): for models about to be overwritten by a checkpoint."""
    return skeleton_vit(arch, shape).to_empty(device="cpu")


def split_state_dict(
    state: dict[str, torch.Tensor], depth: int
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split a ViT state dict into ``(stem, stacked_blocks)``.

    ``stacked_blocks[name]`` has shape ``(depth, *tensor_shape)``: layer ``i`` is
    ``blocks.i.<name>``. Unknown keys raise (they would be silently dropped otherwise).
    """
    stem: dict[str, torch.Tensor] = {}
    per_layer: dict[str, list[torch.Tensor | None]] = {}
    for key, value in state.items():
        match = _BLOCK_KEY.match(key)
        if match:
            idx, name = int(match.group(1)), match.group(2)
            if name not in BLOCK_TENSORS:
                raise FactoryError(f"unsupported block tensor {key!r} in ancestry")
            per_layer.setdefault(name, [None] * depth)[idx] = value
        elif key in STEM_TENSORS:
            stem[key] = value
        else:
            raise FactoryError(f"unsupported tensor {key!r} in ancestry")
    blocks = {}
    for name, layers in per_layer.items():
        if any(t is None for t in layers):
            raise FactoryError(f"block tensor {name!r} is missing in some ancestry layers")
        blocks[name] = torch.stack(layers)  # type: ignore[arg-type]
    return stem, blocks


def join_state_dict(stem: dict[str, torch.Tensor], blocks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`split_state_dict`."""
    state = dict(stem)
    for name, stack in blocks.items():
        for i in range(stack.shape[0]):
            state[f"blocks.{i}.{name}"] = stack[i]
    return state
