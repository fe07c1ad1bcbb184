"""Heads and width: turn stacked block tensors and a stem into a descendant's state dict.

This is the "weight selection" rule shared by PEG expansion and the baselines. Given blocks with
``H`` heads of ``hd`` dims, width ``D`` and hidden ``M`` (already at the descendant's depth), it
produces tensors for ``H_d`` heads of ``hd_d = D_d / H_d`` dims, width ``D_d`` and hidden ``M_d``:

1. Heads. ``H_d <= H``: keep ``H_d`` heads (one-hot mixing). ``H_d > H``: new heads are linear
   interpolations of neighbouring heads (:func:`factory.core.mixing.interpolation_matrix`), and the
   proj columns are scaled by ``H / H_d`` so the attention branch keeps its output scale
   (``head_proj_scale="preserve"``; ``"none"`` leaves them as they are).
2. Head dim, width and hidden: keep ``hd_d`` of the ``hd`` dims of every head, ``D_d`` of the
   ``D`` residual channels and ``M_d`` of the ``M`` hidden units. The same residual indices are
   used for every tensor that shares the residual stream (all blocks and the stem), so the
   descendant computes a consistent sub-network.
3. Stem. Position embeddings are resampled (bicubic, timm's ``resample_abs_pos_embed``) when the
   token grid changes, the patch embedding is resampled (FlexiViT's pseudo-inverse,
   ``resample_patch_embed``) when the patch size changes, and the classifier is inherited only
   when the class count matches (otherwise the caller keeps timm's fresh head).

Index choice (``selection``): ``"even"`` takes :func:`factory.core.mixing.evenly_spaced` indices
(Xu et al.'s uniform weight selection); ``"importance"`` takes the units with the largest L1
weight mass (per layer for heads, head dims and hidden units; globally for the residual
stream), kept in their original order. Growing ``D``, ``M`` or the head dim is not supported:
there is no function-preserving way to add residual channels under LayerNorm.
"""

from __future__ import annotations

from typing import Literal

import torch

from factory.core.mixing import evenly_spaced, interpolation_matrix, mix_heads
from factory.core.shapes import ArchConfig, DescendantShape
from factory.core.timm_vit import BLOCK_TENSORS, STEM_TENSORS
from factory.errors import FactoryError

Selection = Literal["even", "importance"]
SELECTIONS: tuple[str, ...] = ("even", "importance")


def top_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest entries along the last axis, in increasing index order."""
    idx = torch.topk(scores, k, dim=-1, sorted=False).indices
    return torch.sort(idx, dim=-1).values


def _pick(n_out: int, n_in: int, selection: str, scores: torch.Tensor | None) -> torch.Tensor:
    if selection == "even" or scores is None:
        return evenly_spaced(n_out, n_in)
    if selection == "importance":
        return top_indices(scores.detach(), n_out)
    raise FactoryError(f"unknown selection {selection!r}; choose one of {', '.join(SELECTIONS)}")


def _take(t: torch.Tensor, axis: int, idx: torch.Tensor, stacked: bool) -> torch.Tensor:
    """Select ``idx`` along ``axis``. ``idx`` is ``(k,)`` or, for stacked tensors, ``(L, k)``."""
    if idx.dim() == 1:
        return t.index_select(axis, idx.to(t.device))
    assert stacked and axis > 0
    shape = [1] * t.dim()
    shape[0], shape[axis] = idx.shape
    return torch.take_along_dim(t, idx.reshape(shape).to(t.device), dim=axis)


def _apply_role(
    tensors: dict[str, torch.Tensor],
    roles: dict[str, tuple[str, ...]],
    role: str,
    idx: torch.Tensor,
    stacked: bool,
) -> dict[str, torch.Tensor]:
    out = {}
    off = 1 if stacked else 0
    for name, t in tensors.items():
        for axis, r in enumerate(roles[name]):
            if r == role:
                t = _take(t, axis + off, idx, stacked)
        out[name] = t
    return out


def _head_view_take(blocks: dict[str, torch.Tensor], heads: int, head_dim: int, idx: torch.Tensor):
    """Keep dims ``idx`` (``(k,)`` or ``(L, k)``) inside every head of q, k, v and proj."""
    out = dict(blocks)
    n = blocks["attn.qkv.weight"].shape[0]
    w = blocks["attn.qkv.weight"]
    idx = idx.to(w.device)  # chosen on the CPU (evenly_spaced), applied where the genes are (CUDA in a GPU phase)
    w = w.reshape(n, 3, heads, head_dim, w.shape[-1])
    b = blocks.get("attn.qkv.bias")
    p = blocks["attn.proj.weight"]
    p = p.reshape(n, p.shape[1], heads, head_dim)
    if idx.dim() == 1:
        w, p = w.index_select(3, idx), p.index_select(3, idx)
        if b is not None:
            b = b.reshape(n, 3, heads, head_dim).index_select(3, idx)
    else:
        w = torch.take_along_dim(w, idx[:, None, None, :, None], dim=3)
        p = torch.take_along_dim(p, idx[:, None, None, :], dim=3)
        if b is not None:
            b = torch.take_along_dim(b.reshape(n, 3, heads, head_dim), idx[:, None, None, :], dim=3)
    out["attn.qkv.weight"] = w.reshape(n, -1, w.shape[-1])
    out["attn.proj.weight"] = p.reshape(n, p.shape[1], -1)
    if b is not None:
        out["attn.qkv.bias"] = b.reshape(n, -1)
    return out


def head_scores(blocks: dict[str, torch.Tensor], heads: int, head_dim: int) -> torch.Tensor:
    """L1 mass of each head's q/k/v rows and proj columns: ``(L, heads)``."""
    n = blocks["attn.qkv.weight"].shape[0]
    w = blocks["attn.qkv.weight"].reshape(n, 3, heads, head_dim, -1).abs().sum(dim=(1, 3, 4))
    p = blocks["attn.proj.weight"].reshape(n, -1, heads, head_dim).abs().sum(dim=(1, 3))
    return w + p


def residual_scores(blocks: dict[str, torch.Tensor]) -> torch.Tensor:
    """L1 mass of each residual channel over every block tensor that reads or writes it: ``(D,)``."""
    total: torch.Tensor | int = 0
    for name, t in blocks.items():
        roles = BLOCK_TENSORS[name]
        if "D" not in roles:
            continue
        axis = roles.index("D") + 1
        total = total + t.detach().abs().movedim(axis, -1).reshape(-1, t.shape[axis]).sum(0)
    assert isinstance(total, torch.Tensor)
    return total


def descend(
    arch: ArchConfig,
    stem: dict[str, torch.Tensor],
    blocks: dict[str, torch.Tensor],
    heads: int,
    shape: DescendantShape,
    *,
    selection: str = "even",
    head_proj_scale: str = "preserve",
) -> dict[str, torch.Tensor]:
    """Descendant state dict (without ``blocks.i.`` expansion: see ``join_state_dict``).

    ``blocks`` are stacked at the descendant's depth with ``heads`` heads of ``arch.head_dim``
    dims and ``arch``'s width and hidden size; ``stem`` holds the ancestry's stem tensors.
    Returns ``(stem, blocks)`` for the descendant; differentiable in the input tensors.
    """
    if selection not in SELECTIONS:
        raise FactoryError(f"unknown selection {selection!r}; choose one of {', '.join(SELECTIONS)}")
    if head_proj_scale not in ("preserve", "none"):
        raise FactoryError(f"head_proj_scale must be 'preserve' or 'none', got {head_proj_scale!r}")
    hd = arch.head_dim
    if shape.embed_dim > arch.embed_dim:
        raise FactoryError(
            f"embed_dim {shape.embed_dim} exceeds the ancestry's {arch.embed_dim}: expansion selects width from the "
            f"ancestry's channels, so descendants are at most {arch.embed_dim} wide (any depth, heads with a head dim <= "
            f"{arch.head_dim}, MLP hidden <= {arch.mlp_hidden}); use a width <= {arch.embed_dim} or a wider ancestry",
            param="embed_dim",
        )
    if shape.head_dim > hd:
        raise FactoryError(
            f"head dim {shape.embed_dim}//{shape.num_heads}={shape.head_dim} exceeds the "
            f"ancestry's {hd}; use at least {-(-shape.embed_dim // hd)} heads"
        )
    if shape.mlp_hidden > arch.mlp_hidden:
        raise FactoryError(
            f"MLP hidden {shape.mlp_hidden} (embed_dim x mlp_ratio) exceeds the ancestry's "
            f"{arch.mlp_hidden}; lower mlp_ratio"
        )
    n_layers = next(iter(blocks.values())).shape[0]

    # 1. heads
    if shape.num_heads != heads:
        if shape.num_heads <= heads:
            scores = head_scores(blocks, heads, hd) if selection == "importance" else None
            if scores is None:
                idx = evenly_spaced(shape.num_heads, heads).expand(n_layers, -1)
            else:
                idx = top_indices(scores.detach(), shape.num_heads)
            mixing = torch.zeros(n_layers, shape.num_heads, heads)
            mixing.scatter_(2, idx[:, :, None], 1.0)
            scale = 1.0
        else:
            mixing = interpolation_matrix(shape.num_heads, heads).expand(n_layers, -1, -1)
            scale = heads / shape.num_heads if head_proj_scale == "preserve" else 1.0
        blocks = mix_heads(blocks, mixing, hd, proj_scale=scale)

    # 2a. dims inside each head
    if shape.head_dim < hd:
        scores = None
        if selection == "importance":
            n = n_layers
            w = blocks["attn.qkv.weight"].reshape(n, 3, shape.num_heads, hd, -1)
            p = blocks["attn.proj.weight"].reshape(n, -1, shape.num_heads, hd)
            scores = w.abs().sum(dim=(1, 2, 4)) + p.abs().sum(dim=(1, 2))
        idx = _pick(shape.head_dim, hd, selection, scores)
        blocks = _head_view_take(blocks, shape.num_heads, hd, idx)

    # 2b. residual stream (global indices, shared by stem and blocks)
    if shape.embed_dim < arch.embed_dim:
        scores = None
        if selection == "importance":
            scores = residual_scores(blocks)
        idx = _pick(shape.embed_dim, arch.embed_dim, selection, scores)
        blocks = _apply_role(blocks, BLOCK_TENSORS, "D", idx, stacked=True)
        stem = _apply_role(stem, STEM_TENSORS, "D", idx, stacked=False)

    # 2c. MLP hidden units (per layer)
    if shape.mlp_hidden < arch.mlp_hidden:
        scores = None
        if selection == "importance":
            scores = blocks["mlp.fc1.weight"].abs().sum(-1) + blocks["mlp.fc2.weight"].abs().sum(1)
        idx = _pick(shape.mlp_hidden, arch.mlp_hidden, selection, scores)
        blocks = _apply_role(blocks, BLOCK_TENSORS, "M", idx, stacked=True)

    return adapt_stem(arch, stem, shape), blocks


def adapt_stem(arch: ArchConfig, stem: dict[str, torch.Tensor], shape: DescendantShape) -> dict[str, torch.Tensor]:
    """Resample position and patch embeddings to ``shape``'s grid; drop a mismatched head."""
    from timm.layers import resample_abs_pos_embed, resample_patch_embed

    stem = dict(stem)
    if shape.patch_size != arch.patch_size:
        stem["patch_embed.proj.weight"] = resample_patch_embed(
            stem["patch_embed.proj.weight"], [shape.patch_size, shape.patch_size]
        )
    old_grid = arch.img_size // arch.patch_size
    if shape.grid != old_grid and "pos_embed" in stem:
        prefix = 0 if arch.no_embed_class else arch.num_prefix_tokens
        stem["pos_embed"] = resample_abs_pos_embed(
            stem["pos_embed"],
            new_size=[shape.grid, shape.grid],
            old_size=[old_grid, old_grid],
            num_prefix_tokens=prefix,
            verbose=False,
        )
    if shape.num_classes != arch.num_classes or shape.num_classes == 0:
        stem.pop("head.weight", None)
        stem.pop("head.bias", None)
    return stem
