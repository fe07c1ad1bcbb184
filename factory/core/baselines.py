"""Descendant initialisations PEG is compared with, behind one entry point.

``init_descendant(method, shape, ...)`` with ``method`` in:

- ``peg``: :func:`factory.core.expand.expand` from a learngene.
- ``scratch``: timm's own random initialisation, seeded.
- ``tleg``: TLEG-style linear expansion (Xia et al., 2024), ``theta_l = theta_A + (l / L_d) *
  theta_B`` for ``l = 1..L_d``. TLEG trains ``theta_A, theta_B`` as a two-layer learngene; without
  that training we fit them to the ancestry by least squares over its layers,
  ``theta_i ~ theta_A + (i / L_a) * theta_B`` (``i = 1..L_a``), the best linear-in-depth summary
  of the ancestry. Heads and width are then selected as for PEG.
- ``weight_selection``: Xu et al.'s weight selection from the ancestry: layers ``0..L_d-1``
  ("first layers") when ``L_d <= L_a``; deeper descendants take ancestry layer
  ``round(j * (L_a-1) / (L_d-1))`` for layer ``j`` (evenly spaced, repeating). Heads, width and
  hidden by evenly spaced indices (``selection="even"``).

Every method returns an eval-mode timm ``VisionTransformer`` of exactly ``shape``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from factory.core.ancestry import DEMO_ARCH, Ancestry, load_ancestry
from factory.core.expand import expand, model_from_state
from factory.core.head_selection import descend
from factory.core.learngene import Learngene
from factory.core.mixing import evenly_spaced
from factory.core.shapes import DescendantShape
from factory.core.timm_vit import build_vit, join_state_dict
from factory.errors import FactoryError

# The largest descendant allocated (ViT-H is 0.63 B): anything bigger is a typo, refused before torch tries to allocate it.
MAX_PARAMS = 2_000_000_000


def check_allocatable(shape: DescendantShape, arch=None) -> None:
    """One-line :class:`FactoryError` when ``shape`` has more than :data:`MAX_PARAMS` parameters."""
    from factory.core.shapes import STANDARD_ARCH, vit_params

    n = vit_params(shape, arch or STANDARD_ARCH)
    if n > MAX_PARAMS:
        raise FactoryError(
            f"shape {shape.label()} has {n / 1e9:.3g} B parameters ({n * 4 / 2**30:.3g} GiB in fp32), over the "
            f"{MAX_PARAMS / 1e9:g} B this factory allocates; check the depth and width"
        )


def tleg_fit(stack: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares ``(theta_A, theta_B)`` with ``stack[i] ~ theta_A + ((i+1)/L) * theta_B``."""
    n = stack.shape[0]
    x = torch.arange(1, n + 1, dtype=stack.dtype) / n
    shape = (n,) + (1,) * (stack.dim() - 1)
    xc = (x - x.mean()).reshape(shape)
    mean = stack.mean(dim=0)
    denom = float((xc**2).sum())
    theta_b = (xc * (stack - mean)).sum(dim=0) / denom if denom > 0 else torch.zeros_like(mean)
    theta_a = mean - x.mean() * theta_b
    return theta_a, theta_b


def tleg_expand(theta_a: torch.Tensor, theta_b: torch.Tensor, depth: int) -> torch.Tensor:
    """``theta_l = theta_A + (l / depth) * theta_B`` for ``l = 1..depth``, stacked."""
    coef = torch.arange(1, depth + 1, dtype=theta_a.dtype) / depth
    return theta_a[None] + coef.reshape((depth,) + (1,) * theta_a.dim()) * theta_b[None]


def weight_selection_layers(depth: int, ancestry_depth: int) -> torch.Tensor:
    """Ancestry layer indices for each descendant layer (see module docstring)."""
    if depth <= ancestry_depth:
        return torch.arange(depth)
    return evenly_spaced(depth, ancestry_depth)


def _peg(shape, ancestry, learngene, seed, selection) -> nn.Module:
    if learngene is None:
        raise FactoryError("method 'peg' needs a learngene (peg-factory learngene --out DIR)")
    return expand(learngene, shape, selection=selection, seed=seed)


def _scratch(shape, ancestry, learngene, seed, selection) -> nn.Module:
    arch = learngene.arch if learngene is not None else None
    if arch is None:
        arch = load_ancestry(ancestry).arch if ancestry is not None else DEMO_ARCH
    return build_vit(arch, shape, seed=seed).eval()


def _from_ancestry(method: str):
    """TLEG's linear expansion or weight selection: both cut the ancestry's layers, then select heads and width."""

    def init(shape, ancestry, learngene, seed, selection) -> nn.Module:
        if ancestry is None:
            raise FactoryError(f"method {method!r} needs an ancestry (e.g. --ancestry demo)")
        anc = load_ancestry(ancestry)
        with torch.no_grad():
            stem, blocks = anc.layers()
            if method == "tleg":
                blocks = {k: tleg_expand(*tleg_fit(t), shape.depth) for k, t in blocks.items()}
                sel = selection
            else:
                idx = weight_selection_layers(shape.depth, anc.arch.depth)
                blocks = {k: t.index_select(0, idx) for k, t in blocks.items()}
                sel = "even"
            stem, blocks = descend(anc.arch, stem, blocks, anc.arch.num_heads, shape, selection=sel)
        return model_from_state(anc.arch, shape, join_state_dict(stem, blocks), seed=seed)

    return init


#: The initialisations, registered once: ``name -> fn(shape, ancestry, learngene, seed, selection)``. The CLI's
#: ``--init`` choices, the manifest schema's enum, the transfer probe's candidates and the benches read it; a new
#: initialisation is one function and one entry here.
INITIALISATIONS: dict[str, Callable[..., nn.Module]] = {
    "peg": _peg,
    "tleg": _from_ancestry("tleg"),
    "weight_selection": _from_ancestry("weight_selection"),
    "scratch": _scratch,
}
METHODS: tuple[str, ...] = tuple(INITIALISATIONS)


def init_descendant(
    method: str,
    shape: DescendantShape,
    *,
    ancestry: Ancestry | nn.Module | str | None = None,
    learngene: Learngene | None = None,
    seed: int = 0,
    selection: str = "even",
) -> nn.Module:
    """Initialise a descendant of ``shape`` with ``method`` (a :data:`INITIALISATIONS` name; module docstring)."""
    if method not in INITIALISATIONS:
        raise FactoryError(f"unknown init method {method!r}; choose one of {', '.join(METHODS)}")
    check_allocatable(shape)
    return INITIALISATIONS[method](shape, ancestry, learngene, seed, selection)
