"""Descendant shapes, ancestry architecture facts, and closed-form cost of a timm ViT.

:class:`DescendantShape` is what the searcher varies and :func:`factory.core.expand.expand` builds.
:class:`ArchConfig` is everything else a timm ``VisionTransformer`` needs (token layout, pooling,
norms, layer scale), read off the ancestry so descendants keep its style.

FLOPs follow fvcore's convention: one multiply-add counts as one FLOP ("MACs"). For batch 1 and
``N = (img/patch)^2 + prefix`` tokens, width ``D``, hidden ``M``, ``C`` input channels::

    patch_embed = (img/patch)^2 * D * C * patch^2
    block       = N*D*3D (qkv) + 2*N^2*D (q@k^T, attn@v) + N*D*D (proj) + 2*N*D*M (fc1, fc2)
                  + 2 * 5*N*D (two LayerNorms; fvcore counts 5 per element for affine norms)
    total       = patch_embed + depth*block + final_norm + pre_norm + D*num_classes

``final_norm`` is ``5*N*D`` for token pooling and ``5*D`` when timm uses ``fc_norm`` (avg pooling);
``pre_norm`` is ``5*N*D`` when the ancestry has one. Biases, GELU, softmax, residual adds and
pooling are not counted, as in fvcore. :func:`factory.core.flops.count_flops` checks this formula.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from factory.errors import FactoryError


@dataclass(frozen=True)
class DescendantShape:
    """The size of one descendant ViT.

    ``mlp_hidden`` is ``int(embed_dim * mlp_ratio)``, exactly as timm computes it.
    """

    depth: int
    embed_dim: int
    num_heads: int
    mlp_ratio: float = 4.0
    img_size: int = 224
    patch_size: int = 16
    num_classes: int = 1000

    def __post_init__(self) -> None:
        for name in ("depth", "embed_dim", "num_heads", "img_size", "patch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise FactoryError(f"shape.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise FactoryError(f"shape.num_classes must be an integer >= 0, got {self.num_classes!r}")
        if not self.mlp_ratio > 0:
            raise FactoryError(f"shape.mlp_ratio must be > 0, got {self.mlp_ratio!r}")
        if self.mlp_hidden < 1:  # timm's int(width * ratio): an MLP of no hidden units
            raise FactoryError(
                f"shape.mlp_ratio {self.mlp_ratio:g} gives no MLP hidden units at width {self.embed_dim} "
                f"(int({self.embed_dim} * {self.mlp_ratio:g}) = 0); give at least {1 / self.embed_dim:.3g}"
            )
        if self.embed_dim % self.num_heads:
            raise FactoryError(
                f"shape.embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}; "
                "pick heads that divide the width"
            )
        if self.img_size % self.patch_size:
            raise FactoryError(f"shape.img_size={self.img_size} is not a multiple of patch_size={self.patch_size}")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DescendantShape:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - fields
        if unknown:
            raise FactoryError(f"unknown shape field(s) {sorted(unknown)}; known: {sorted(fields)}")
        return cls(**data)

    def label(self) -> str:
        return (
            f"d{self.depth}-w{self.embed_dim}-h{self.num_heads}-r{self.mlp_ratio:g}-i{self.img_size}-p{self.patch_size}"
        )

    @classmethod
    def from_label(cls, label: str, num_classes: int = 1000) -> DescendantShape:
        """The shape :meth:`label` names (the label omits the classes: ``num_classes``); a one-line error otherwise."""
        import re

        m = re.fullmatch(r"d(\d+)-w(\d+)-h(\d+)-r([\d.]+)-i(\d+)-p(\d+)", label)
        if m is None:
            raise FactoryError(f"{label!r} is not a shape label (like d12-w192-h3-r4-i224-p16)")
        d, w, h, r, i, p = m.groups()
        return cls(int(d), int(w), int(h), float(r), int(i), int(p), num_classes)


@dataclass(frozen=True)
class ArchConfig:
    """timm ``VisionTransformer`` constructor facts of an ancestry (and its descendants).

    The shape fields (depth, width, heads, hidden, image, patch, classes) describe the ancestry;
    :meth:`timm_kwargs` overrides them with a :class:`DescendantShape`.
    """

    embed_dim: int
    depth: int
    num_heads: int
    mlp_hidden: int
    img_size: int
    patch_size: int
    num_classes: int
    in_chans: int = 3
    class_token: bool = True
    reg_tokens: int = 0
    no_embed_class: bool = False
    global_pool: str = "token"
    qkv_bias: bool = True
    pre_norm: bool = False
    fc_norm: bool = False
    init_values: float | None = None
    norm_eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token) + self.reg_tokens

    @property
    def mlp_ratio(self) -> float:
        return self.mlp_hidden / self.embed_dim

    def shape(self) -> DescendantShape:
        """The ancestry's own shape (expanding to it with identity mixing is exact)."""
        return DescendantShape(
            depth=self.depth,
            embed_dim=self.embed_dim,
            num_heads=self.num_heads,
            mlp_ratio=self.mlp_ratio,
            img_size=self.img_size,
            patch_size=self.patch_size,
            num_classes=self.num_classes,
        )

    def with_shape(self, shape: DescendantShape) -> ArchConfig:
        """This style at ``shape``'s size (the arch of a descendant)."""
        return dataclasses.replace(
            self,
            embed_dim=shape.embed_dim,
            depth=shape.depth,
            num_heads=shape.num_heads,
            mlp_hidden=shape.mlp_hidden,
            img_size=shape.img_size,
            patch_size=shape.patch_size,
            num_classes=shape.num_classes,
        )

    def timm_kwargs(self, shape: DescendantShape | None = None) -> dict[str, Any]:
        """Keyword arguments for ``timm.models.vision_transformer.VisionTransformer``.

        ``norm_layer`` is not included (it is a callable); see :func:`factory.core.timm_vit.build_vit`.
        """
        s = shape or self.shape()
        return dict(
            img_size=s.img_size,
            patch_size=s.patch_size,
            in_chans=self.in_chans,
            num_classes=s.num_classes,
            global_pool=self.global_pool,
            embed_dim=s.embed_dim,
            depth=s.depth,
            num_heads=s.num_heads,
            mlp_ratio=s.mlp_ratio,
            qkv_bias=self.qkv_bias,
            init_values=self.init_values,
            class_token=self.class_token,
            no_embed_class=self.no_embed_class,
            reg_tokens=self.reg_tokens,
            pre_norm=self.pre_norm,
            fc_norm=self.fc_norm,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ArchConfig:
        return cls(**data)


STANDARD_ARCH = ArchConfig(
    embed_dim=192,
    depth=12,
    num_heads=3,
    mlp_hidden=768,
    img_size=224,
    patch_size=16,
    num_classes=1000,
)
"""DeiT/ViT style (class token, token pooling, qkv bias): the default for closed-form costs."""


def num_tokens(shape: DescendantShape, arch: ArchConfig = STANDARD_ARCH) -> int:
    return shape.grid**2 + arch.num_prefix_tokens


def vit_flops(shape: DescendantShape, arch: ArchConfig = STANDARD_ARCH) -> int:
    """Closed-form multiply-adds of one forward pass at batch 1 (formula in the module doc)."""
    n, d, m = num_tokens(shape, arch), shape.embed_dim, shape.mlp_hidden
    patch = shape.grid**2 * d * arch.in_chans * shape.patch_size**2
    block = n * d * 3 * d + 2 * n * n * d + n * d * d + 2 * n * d * m + 2 * 5 * n * d
    final = 5 * d if arch.fc_norm else 5 * n * d
    pre = 5 * n * d if arch.pre_norm else 0
    return patch + shape.depth * block + final + pre + d * shape.num_classes


def vit_params(shape: DescendantShape, arch: ArchConfig = STANDARD_ARCH) -> int:
    """Closed-form parameter count of the timm ViT for ``shape`` (matches ``numel`` sums)."""
    d, m = shape.embed_dim, shape.mlp_hidden
    patch = d * arch.in_chans * shape.patch_size**2 + (0 if arch.pre_norm else d)  # timm: no bias with pre_norm
    pos_tokens = shape.grid**2 + (0 if arch.no_embed_class else arch.num_prefix_tokens)
    tokens = arch.num_prefix_tokens * d + pos_tokens * d
    qkv = 3 * d * d + (3 * d if arch.qkv_bias else 0)
    block = 2 * 2 * d + qkv + d * d + d + d * m + m + m * d + d
    if arch.init_values is not None:
        block += 2 * d
    norms = 2 * d + (2 * d if arch.pre_norm else 0)
    head = shape.num_classes * d + shape.num_classes if shape.num_classes else 0
    return patch + tokens + shape.depth * block + norms + head
