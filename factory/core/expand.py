"""Expansion: learngene -> descendant timm ``VisionTransformer`` of any depth, width and heads.

``expand_tensors`` is the differentiable core (the learngene expanding phase trains through it);
``expand`` builds a plain timm model from it, so the descendant's forward pass needs no PEG code.

Steps, for a :class:`~factory.core.shapes.DescendantShape` ``s``:

1. Depth. Every gene tensor stack ``(L_b, *S)`` goes through the learngene's
   :class:`~factory.core.mixing.DepthMap` for ``s.depth`` (trained if the learngene has one, else the
   interpolating initialisation) to give ``(s.depth, *S)``.
2. Heads, width, hidden, grid and classifier by :func:`factory.core.head_selection.descend`.
3. The classifier is inherited when ``s.num_classes`` equals the ancestry's; otherwise it keeps
   timm's fresh initialisation, drawn from ``seed``.
"""

from __future__ import annotations

import torch
from torch import nn

from factory.core.head_selection import descend
from factory.core.learngene import Learngene
from factory.core.mixing import DepthMap
from factory.core.shapes import ArchConfig, DescendantShape
from factory.core.timm_vit import empty_vit, join_state_dict
from factory.errors import FactoryError


def expand_tensors(
    learngene: Learngene,
    shape: DescendantShape,
    *,
    depth_map: DepthMap | None = None,
    selection: str = "even",
    head_proj_scale: str = "preserve",
) -> dict[str, torch.Tensor]:
    """Descendant state dict as a differentiable function of the learngene and depth map."""
    dm = depth_map if depth_map is not None else learngene.depth_map(shape.depth)
    if dm.l_in != learngene.num_layers or dm.l_out != shape.depth:
        raise FactoryError(
            f"depth map maps {dm.l_in} -> {dm.l_out} layers, need {learngene.num_layers} -> {shape.depth}"
        )
    blocks = {name: dm(t) for name, t in learngene.genes.items()}
    stem, blocks = descend(
        learngene.arch,
        learngene.stem,
        blocks,
        learngene.num_heads,
        shape,
        selection=selection,
        head_proj_scale=head_proj_scale,
    )
    return join_state_dict(stem, blocks)


def model_from_state(
    arch: ArchConfig, shape: DescendantShape, state: dict[str, torch.Tensor], *, seed: int = 0
) -> nn.Module:
    """Build a timm ViT for ``shape`` and load ``state`` into it.

    The model is built on the meta device (no wasted random init of a large model) and
    materialised from ``state``. Only the classifier may be absent from ``state`` (the class
    count changed): it gets timm's own ViT initialisation (``init_weights_vit_timm``: truncated
    normal, std 0.02, zero bias) drawn from ``seed``. Any other missing or extra key is a bug.
    """
    from timm.models.vision_transformer import init_weights_vit_timm

    model = empty_vit(arch, shape)
    own = model.state_dict()
    missing = set(own) - set(state)
    extra = set(state) - set(own)
    if extra or missing - {"head.weight", "head.bias"}:
        raise RuntimeError(f"descendant state mismatch: missing {sorted(missing)} extra {sorted(extra)}")
    model.load_state_dict({k: v.detach().to(own[k].dtype) for k, v in state.items()}, strict=False)
    if missing:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            init_weights_vit_timm(model.head)
    return model.eval()


def expand(
    learngene: Learngene,
    shape: DescendantShape,
    *,
    selection: str = "even",
    head_proj_scale: str = "preserve",
    seed: int = 0,
) -> nn.Module:
    """A timm ``VisionTransformer`` of ``shape`` initialised from ``learngene`` (eval mode)."""
    with torch.no_grad():
        state = expand_tensors(learngene, shape, selection=selection, head_proj_scale=head_proj_scale)
    return model_from_state(learngene.arch, shape, state, seed=seed)
