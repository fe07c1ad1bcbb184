"""PEG's expanding phase, the math: which shapes it trains, its loss, its parameters, its sandwich rule.

The loop that runs it (data, optimiser, checkpoints, progress) is
:func:`factory.training.expanding_loop.train_learngene`; its docstring states the objective:

    sum_shapes  T^2 * KL(softmax(ancestry(x) / T) || softmax(descendant(x) / T))

over the gene tensors, the stem (unless frozen) and one :class:`~factory.core.mixing.DepthMap`
per trained depth (:class:`GeneParameters`), summed over the shapes :func:`picks_at` draws at
each step from :func:`default_shapes`.
"""

from __future__ import annotations

import copy
import dataclasses
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from factory.core.learngene import Learngene
from factory.core.mixing import DepthMap
from factory.core.shapes import DescendantShape
from factory.errors import FactoryError


@dataclass(frozen=True)
class ExpandingConfig:
    """Recipe of the expanding phase (defaults chosen by ``bench/learngene_study.py``)."""

    steps: int = 1500
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 20
    temperature: float = 2.0
    random_per_step: int = 1
    #: the largest shape (by FLOPs) is one of the step's shapes every ``largest_every``-th step (1: every step,
    #: the sandwich rule, the default; 0: only when a random draw picks it). The largest shape (twice the
    #: ancestry's depth) is about two thirds of a step's FLOPs, so 3 does 1.78x fewer FLOPs a step -- but a
    #: learngene of k=3 needs about that many more steps for the same quality: at equal phase *time* every step
    #: measured at least as good (bench/learngene_study.py, RESULTS "Equal phase time": -1.1 against -3.2 points
    #: over weight selection at ~200 s, +3.0 against +2.6 at ~400 s), so 1 is the default and k > 1 is a finer
    #: grain of the same trade, not a speed-up. :func:`full_sandwich_steps` counts its phase in steps of k = 1.
    largest_every: int = 1
    train_stem: bool = True
    shift: int = 1
    extra_hidden: int = 0  # extra ReLU units per depth map beyond the 2*L_b that make it linear at init
    seed: int = 0
    #: distil at this input size (None: the ancestry's): teacher and descendants see the batch resized to it and
    #: the position embedding bicubically resampled to its grid, differentiably, so the full-size embedding is
    #: what trains (:func:`distill_pos_embed`); a multiple of the patch size. Attention cost falls with the
    #: square of the token count: 224 -> 112 px is 4x fewer tokens.
    distill_img_size: int | None = None
    amp: str = (
        "auto"  # the steps' precision (factory.training.precision.precision_for); a speed setting, see SPEED_FIELDS
    )
    device: str = "auto"  # where the steps run (auto: CUDA when available); a speed setting too
    #: MB of saved activations one forward/backward may hold: each shape's batch runs in micro-batches that fit
    #: (factory.training.micro_batch; the gradient is the whole batch's); <= 0: the whole batch at once; None: 512
    #: on the CPU, half the GPU's free memory on CUDA (micro_batch.resolve_memory_mb). Speed.
    memory_mb: float | None = None

    def __post_init__(self) -> None:
        if (
            self.steps < 0
            or self.batch_size < 1
            or not self.lr > 0
            or self.extra_hidden < 0
            or self.random_per_step < 0
            or self.largest_every < 0
        ):
            raise FactoryError(
                "expanding phase needs steps >= 0, batch_size >= 1, lr > 0, extra_hidden >= 0, random_per_step >= 0, "
                "largest_every >= 0"
            )
        if self.distill_img_size is not None and self.distill_img_size < 1:
            raise FactoryError(f"expanding-phase distillation size must be >= 1 pixel, got {self.distill_img_size}")
        if self.amp not in ("auto", "bf16", "fp16", "off"):
            raise FactoryError(f"expanding-phase amp must be auto, bf16, fp16 or off, got {self.amp!r}")


#: ExpandingConfig fields that change how fast the phase runs, not what it trains towards: a learngene's recipe
#: (and the build's cache key for it) leaves them out, the way it leaves out the thread count, so the shipped
#: fp32-trained learngene serves a bf16 machine and a learngene made on a GPU serves a CPU build. The precision a
#: learngene was trained in is recorded in its metadata (``expanding_phase.precision``).
SPEED_FIELDS = ("amp", "device", "memory_mb")
#: Fields added after learngenes were shipped, with the value that reproduces what older ones were made with.
LATER_FIELDS = {"distill_img_size": None, "largest_every": 1}


def recipe_fields(cfg: ExpandingConfig) -> dict:
    """``asdict(cfg)`` without :data:`SPEED_FIELDS`: what the learngene recipe hashes."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in SPEED_FIELDS}


def check_distill_size(size: int, arch) -> None:
    """Refuse (one line) a distillation size that is not a positive multiple of ``arch``'s patch size, or larger
    than the ancestry's own input (the phase distils at the ancestry's size or a lower one: a larger one only
    interpolates the position embedding up and costs its square -- 65534 px asked for 67 GB)."""
    if size % arch.patch_size or size < arch.patch_size:
        raise FactoryError(
            f"{size} must be a multiple of the ancestry's patch size {arch.patch_size} "
            f"(e.g. {max(1, arch.img_size // arch.patch_size // 2) * arch.patch_size})",
            param="distill_img_size",
        )
    if size > arch.img_size:
        raise FactoryError(
            f"{size} is larger than the ancestry's input size {arch.img_size}; distil at {arch.img_size} or lower",
            param="distill_img_size",
        )


def default_depths(lg: Learngene) -> list[int]:
    """Every depth from 1 to twice the ancestry's: the searcher may pick any of them."""
    return _depths(lg.arch)


def default_widths(lg: Learngene) -> list[int]:
    """The ancestry's width and its 3/4 and 1/2 (multiples of 8), the range edge devices pick."""
    return _widths(lg.arch)


def _depths(arch) -> list[int]:
    return list(range(1, 2 * arch.depth + 1))


def _widths(arch) -> list[int]:
    d = arch.embed_dim
    return sorted({d, max(8, (3 * d // 4) // 8 * 8), max(8, (d // 2) // 8 * 8)})


def head_options(width: int, arch, max_heads: int) -> list[int]:
    """The fewest and the most heads a searcher would give ``width``: head dim a multiple of 8 in
    ``[16, ancestry head dim]`` (the searcher's rule), at most ``max_heads``; else the ancestry's rule."""
    valid = [
        h
        for h in range(1, max_heads + 1)
        if width % h == 0 and (width // h) % 8 == 0 and 16 <= width // h <= arch.head_dim
    ]
    if not valid:
        heads = width // arch.head_dim if width % arch.head_dim == 0 else arch.num_heads
        return [heads if width % heads == 0 else 1]
    return sorted({valid[0], valid[-1]})


def default_shapes(
    lg: Learngene, depths: list[int] | None = None, widths: list[int] | None = None, *, vary: bool = False
) -> list[DescendantShape]:
    """Descendants at ``depths`` x ``widths`` (defaults :func:`default_depths`, :func:`default_widths`).

    By default one shape per (depth, width): the ancestry's head dim where it divides the width
    (else its head count) and its MLP ratio -- the sandwich the shipped demo learngene was trained
    with. With ``vary``, each width also comes with the fewest and the most heads a searcher would
    give it (:func:`head_options`) and MLP ratios 1, 2, 3 and the ancestry's, so the sub-networks
    that index selection cuts for other head counts and ratios are trained too (``learngene train
    --vary-shapes``; measured against the default in bench/RESULTS.md: with the same 1500 steps it is
    behind the default on every shape, the narrow re-headed one included, so it stays opt-in).
    """
    return sandwich_grid(lg.arch, lg.num_heads, depths, widths, vary=vary)


def sandwich_grid(
    arch, max_heads: int, depths: list[int] | None = None, widths: list[int] | None = None, *, vary: bool = False
) -> list[DescendantShape]:
    """:func:`default_shapes` for an ancestry's ``arch`` and a learngene of ``max_heads`` heads (what it needs of
    the learngene), so a build can price its sandwich before any learngene exists."""
    depths = _depths(arch) if depths is None else depths
    widths = _widths(arch) if widths is None else widths
    full_ratio = arch.mlp_hidden / arch.embed_dim
    out = []
    for w in widths:
        if w > arch.embed_dim or w < 1:
            raise FactoryError(f"expanding-phase width {w} must be in 1..{arch.embed_dim} (the ancestry's width)")
        if vary:
            heads_list = head_options(w, arch, 2 * max_heads)
            ratios = sorted({r for r in (1.0, 2.0, 3.0, full_ratio) if int(w * r) <= arch.mlp_hidden})
        else:
            heads = w // arch.head_dim if w % arch.head_dim == 0 else arch.num_heads
            heads_list, ratios = [min(heads if w % heads == 0 else 1, max_heads)], [full_ratio]
        for d in depths:
            if d < 1:
                raise FactoryError(f"expanding-phase depth must be >= 1, got {d}")
            for h in heads_list:
                for r in ratios:
                    out.append(dataclasses.replace(arch.shape(), depth=d, embed_dim=w, num_heads=h, mlp_ratio=r))
    return out


def distill_pos_embed(
    pos_embed: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int], prefix_tokens: int
) -> torch.Tensor:
    """``pos_embed`` ``(1, prefix + H*W, D)`` resampled to a ``new_grid`` of patches by timm's bicubic
    :func:`timm.layers.resample_abs_pos_embed` (the prefix tokens kept as they are); differentiable, so the
    gradient of a distillation at the new size reaches the full-size embedding."""
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    from timm.layers import resample_abs_pos_embed

    return resample_abs_pos_embed(
        pos_embed, list(new_grid), list(old_grid), num_prefix_tokens=prefix_tokens, verbose=False
    )


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, batch mean (Hinton et al.)."""
    t = temperature
    return F.kl_div(
        F.log_softmax(student / t, dim=-1), F.log_softmax(teacher / t, dim=-1), reduction="batchmean", log_target=True
    ) * (t * t)


class GeneParameters(nn.Module):
    """The expanding phase's parameters as one module (so the trainer's checkpoints apply): copies of ``lg``'s
    genes, stem and depth maps; with ``copy_genes=False`` the genes are ``lg``'s own tensors, trained in place (the
    stem is always copied: a sampled learngene's stem tensors are the ancestry's own)."""

    def __init__(self, lg: Learngene, depths: set[int], cfg: ExpandingConfig, *, copy_genes: bool = True):
        super().__init__()
        self.genes = nn.ParameterDict(
            {
                k.replace(".", "__"): nn.Parameter(v.detach().clone() if copy_genes else v.detach())
                for k, v in lg.genes.items()
            }
        )
        self.stem = nn.ParameterDict(
            {
                k.replace(".", "__"): nn.Parameter(v.detach().clone(), requires_grad=cfg.train_stem)
                for k, v in lg.stem.items()
            }
        )
        self.maps = nn.ModuleDict(
            {
                str(d): (
                    copy.deepcopy(lg.depth_maps[d])
                    if d in lg.depth_maps
                    else DepthMap(lg.num_layers, d, extra_hidden=cfg.extra_hidden, seed=cfg.seed)
                )
                for d in sorted(depths)
            }
        )

    def learngene(self, lg: Learngene, detach: bool = False) -> Learngene:
        def plain(params: nn.ParameterDict) -> dict[str, torch.Tensor]:
            return {k.replace("__", "."): (v.detach() if detach else v) for k, v in params.items()}

        maps = {int(d): m for d, m in self.maps.items()}
        return dataclasses.replace(lg, genes=plain(self.genes), stem=plain(self.stem), depth_maps=maps)


def picks_at(step: int, by_cost: list[DescendantShape], cfg: ExpandingConfig) -> list[DescendantShape]:
    """Shapes trained at ``step``: the smallest, the largest (every ``largest_every``-th step, from step 0) and
    ``random_per_step`` seeded draws, without repeats. The draws are the same whatever ``largest_every`` is."""
    rng = random.Random(cfg.seed * 1_000_003 + step)
    largest = [by_cost[-1]] if cfg.largest_every and step % cfg.largest_every == 0 else []
    picks = [by_cost[0], *largest] + [rng.choice(by_cost) for _ in range(cfg.random_per_step)]
    return list(dict.fromkeys(picks))


def sandwich_step_macs(
    shapes: list[DescendantShape], teacher: DescendantShape, largest_every: int, random_per_step: int
) -> tuple[float, float]:
    """``(teacher, students)``: multiply-adds per image of one step's teacher forward and of its students' forwards
    in the long run (:func:`factory.core.shapes.vit_flops`), the step costing ``teacher + 3 * students`` (a backward
    is two forwards' worth)::

        students = s + [k > 0] l / k + r m

    with ``s`` and ``l`` the smallest and the largest shape's forward, ``m`` the mean over ``shapes``, ``k`` =
    ``largest_every`` (0: the largest only when drawn) and ``r`` = ``random_per_step`` (repeats that
    :func:`picks_at` drops are ignored: a few shapes in dozens)."""
    from factory.core.shapes import vit_flops

    costs = sorted(vit_flops(s) for s in shapes)
    largest = costs[-1] / largest_every if largest_every else 0.0
    return float(vit_flops(teacher)), costs[0] + largest + random_per_step * sum(costs) / len(costs)


def full_sandwich_share(
    shapes: list[DescendantShape], teacher: DescendantShape, largest_every: int, random_per_step: int
) -> float:
    """One step of a sandwich that trains the largest shape every ``largest_every``-th step with
    ``random_per_step`` draws, against one step of the full sandwich (the largest every step, one draw), in
    :func:`sandwich_step_macs`::

        share = (t + 3 (s + [k > 0] l / k + r m)) / (t + 3 (s + l + m))

    Measured (bench/RESULTS.md, "Equal phase time"): learngenes of equal phase time score alike whatever ``k`` is
    (every step slightly ahead), so a phase's steps times this share is what it is worth in steps of the full
    sandwich (:func:`full_sandwich_steps`)."""
    t, thin = sandwich_step_macs(shapes, teacher, largest_every, random_per_step)
    _, full = sandwich_step_macs(shapes, teacher, 1, 1)
    return (t + 3 * thin) / (t + 3 * full)


def full_sandwich_steps(
    steps: int, shapes: list[DescendantShape], teacher: DescendantShape, largest_every: int, random_per_step: int
) -> int:
    """``steps`` of a phase counted in steps of the full sandwich (:func:`full_sandwich_share`): the steps
    themselves for the default recipe (``largest_every = random_per_step = 1``), without computing anything."""
    if (largest_every, random_per_step) == (1, 1) or steps <= 0 or not shapes:
        return steps
    return round(steps * full_sandwich_share(shapes, teacher, largest_every, random_per_step))
