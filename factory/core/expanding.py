"""PEG's learngene expanding phase: train gene tensors and depth maps by distillation.

At every step a few descendant shapes are drawn from ``shapes`` with the sandwich rule (the
smallest and the largest by FLOPs, plus ``random_per_step`` drawn at random), each is expanded
*differentiably* from the learngene (:func:`factory.core.expand.expand_tensors`) and run with
``torch.func.functional_call`` on a meta-device timm skeleton, and the summed distillation loss

    sum_shapes  T^2 * KL(softmax(ancestry(x) / T) || softmax(descendant(x) / T))

is minimised over the gene tensors, the stem (unless frozen) and one
:class:`~factory.core.mixing.DepthMap` per depth in ``shapes``. Every shape keeps the ancestry's
classifier (same classes, same input size) so the ancestry's logits are a valid target; widths,
head counts and MLP ratios may differ from the ancestry's (they are reached by the same index
selection as at expansion time), so one learngene is trained for every shape the searcher may
pick, OFA-style. The result is a learngene whose expansions start near the ancestry's function;
its trained depth maps are saved with it and used by :func:`factory.core.expand.expand` for those depths.

Determinism and resume. The batch of step ``s`` is :func:`factory.training.train.step_batch` (a pure
function of ``(seed, s)``) and the random shapes of step ``s`` come from
``random.Random(seed * 1_000_003 + s)``; the learning rate is a pure function of ``s``. A
checkpoint (``out_dir/checkpoint``, :func:`factory.training.train.save_checkpoint`) therefore holds only the
trainable tensors and AdamW's state, and a resumed run is bit-identical to an uninterrupted one.
``steps = 0`` returns the learngene unchanged (same tensors, same hash).
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from factory.core.ancestry import Ancestry
from factory.training.data import ImageTensors
from factory.errors import FactoryError
from factory.core.expand import expand, expand_tensors
from factory.core.learngene import Learngene
from factory.core.mixing import DepthMap
from factory.core.shapes import DescendantShape, vit_flops
from factory.core.timm_vit import build_vit
from factory.training.train import TrainConfig, distill_loss, evaluate, lr_at, open_checkpoint, save_checkpoint, step_batch


@dataclass(frozen=True)
class ExpandingConfig:
    """Recipe of the expanding phase (defaults chosen by ``bench/learngene_study.py``)."""

    steps: int = 1500
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 20
    temperature: float = 2.0
    random_per_step: int = 1
    train_stem: bool = True
    shift: int = 1
    extra_hidden: int = 0  # extra ReLU units per depth map beyond the 2*L_b that make it linear at init
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 1 or not self.lr > 0 or self.extra_hidden < 0 or self.random_per_step < 0:
            raise FactoryError("expanding phase needs steps >= 0, batch_size >= 1, lr > 0, extra_hidden >= 0, random_per_step >= 0")


def default_depths(lg: Learngene) -> list[int]:
    """Every depth from 1 to twice the ancestry's: the searcher may pick any of them."""
    return list(range(1, 2 * lg.arch.depth + 1))


def default_widths(lg: Learngene) -> list[int]:
    """The ancestry's width and its 3/4 and 1/2 (multiples of 8), the range edge devices pick."""
    d = lg.arch.embed_dim
    return sorted({d, max(8, (3 * d // 4) // 8 * 8), max(8, (d // 2) // 8 * 8)})


def _head_options(width: int, arch, max_heads: int) -> list[int]:
    """The fewest and the most heads a searcher would give ``width``: head dim a multiple of 8 in
    ``[16, ancestry head dim]`` (the searcher's rule), at most ``max_heads``; else the ancestry's rule."""
    valid = [h for h in range(1, max_heads + 1) if width % h == 0 and (width // h) % 8 == 0 and 16 <= width // h <= arch.head_dim]
    if not valid:
        heads = width // arch.head_dim if width % arch.head_dim == 0 else arch.num_heads
        return [heads if width % heads == 0 else 1]
    return sorted({valid[0], valid[-1]})


def default_shapes(lg: Learngene, depths: list[int] | None = None, widths: list[int] | None = None, *,
                   vary: bool = False) -> list[DescendantShape]:
    """Descendants at ``depths`` x ``widths`` (defaults :func:`default_depths`, :func:`default_widths`).

    By default one shape per (depth, width): the ancestry's head dim where it divides the width
    (else its head count) and its MLP ratio -- the sandwich the shipped demo learngene was trained
    with. With ``vary``, each width also comes with the fewest and the most heads a searcher would
    give it (:func:`_head_options`) and MLP ratios 1, 2, 3 and the ancestry's, so the sub-networks
    that index selection cuts for other head counts and ratios are trained too (``learngene train
    --vary-shapes``; not yet measured against the default, see bench/RESULTS.md).
    """
    arch = lg.arch
    depths = default_depths(lg) if depths is None else depths
    widths = default_widths(lg) if widths is None else widths
    full_ratio = arch.mlp_hidden / arch.embed_dim
    out = []
    for w in widths:
        if w > arch.embed_dim or w < 1:
            raise FactoryError(f"expanding-phase width {w} must be in 1..{arch.embed_dim} (the ancestry's width)")
        if vary:
            heads_list = _head_options(w, arch, 2 * lg.num_heads)
            ratios = sorted({r for r in (1.0, 2.0, 3.0, full_ratio) if int(w * r) <= arch.mlp_hidden})
        else:
            heads = w // arch.head_dim if w % arch.head_dim == 0 else arch.num_heads
            heads_list, ratios = [min(heads if w % heads == 0 else 1, lg.num_heads)], [full_ratio]
        for d in depths:
            if d < 1:
                raise FactoryError(f"expanding-phase depth must be >= 1, got {d}")
            for h in heads_list:
                for r in ratios:
                    out.append(dataclasses.replace(arch.shape(), depth=d, embed_dim=w, num_heads=h, mlp_ratio=r))
    return out


def zero_shot(lg: Learngene, shapes: list[DescendantShape], data: ImageTensors) -> dict[str, float]:
    """Accuracy of each expanded shape on ``data`` without any fine-tuning."""
    return {s.label(): round(evaluate(expand(lg, s), data), 4) for s in shapes}


class _Trainable(nn.Module):
    """The expanding phase's parameters as one module (so the trainer's checkpoints apply)."""

    def __init__(self, lg: Learngene, depths: set[int], cfg: ExpandingConfig):
        super().__init__()
        self.genes = nn.ParameterDict({k.replace(".", "__"): nn.Parameter(v.detach().clone()) for k, v in lg.genes.items()})
        self.stem = nn.ParameterDict({k.replace(".", "__"): nn.Parameter(v.detach().clone(), requires_grad=cfg.train_stem)
                                      for k, v in lg.stem.items()})
        self.maps = nn.ModuleDict({
            str(d): (lg.depth_maps[d] if d in lg.depth_maps else DepthMap(lg.num_layers, d, extra_hidden=cfg.extra_hidden, seed=cfg.seed))
            for d in sorted(depths)
        })

    def learngene(self, lg: Learngene, detach: bool = False) -> Learngene:
        def plain(params: nn.ParameterDict) -> dict[str, torch.Tensor]:
            return {k.replace("__", "."): (v.detach() if detach else v) for k, v in params.items()}

        maps = {int(d): m for d, m in self.maps.items()}
        return dataclasses.replace(lg, genes=plain(self.genes), stem=plain(self.stem), depth_maps=maps)


def picks_at(step: int, by_cost: list[DescendantShape], cfg: ExpandingConfig) -> list[DescendantShape]:
    """Shapes trained at ``step``: smallest, largest, and ``random_per_step`` seeded draws."""
    rng = random.Random(cfg.seed * 1_000_003 + step)
    picks = [by_cost[0], by_cost[-1]] + [rng.choice(by_cost) for _ in range(cfg.random_per_step)]
    return list(dict.fromkeys(picks))


def train_learngene(
    lg: Learngene,
    ancestry: Ancestry,
    data: ImageTensors,
    shapes: list[DescendantShape],
    cfg: ExpandingConfig,
    *,
    eval_data: ImageTensors | None = None,
    eval_shapes: list[DescendantShape] | None = None,
    out_dir: str | Path | None = None,
    resume: bool = False,
    ckpt_every: int = 100,
    progress: bool = True,
) -> tuple[Learngene, dict[str, Any]]:
    """Run the expanding phase; returns the trained learngene and a report (before/after).

    With ``out_dir`` a checkpoint is written every ``ckpt_every`` steps (and at the end) to
    ``out_dir/checkpoint`` and the loss log to ``out_dir/metrics.jsonl``; ``resume`` continues
    from that checkpoint (see the module docstring).
    """
    from tqdm.auto import tqdm

    arch = lg.arch
    if not shapes:
        raise FactoryError("the expanding phase needs at least one descendant shape")
    for s in shapes:
        if s.num_classes != arch.num_classes or s.img_size != arch.img_size or s.patch_size != arch.patch_size:
            raise FactoryError(
                f"expanding-phase shape {s.label()} must keep the ancestry's classes, input and patch size "
                "(the ancestry's logits are the target)"
            )
    report: dict[str, Any] = {"config": dataclasses.asdict(cfg), "shapes": [s.label() for s in shapes]}
    if cfg.steps == 0:
        report.update(loss_first=None, loss_last=None, seconds=0.0, history=[])
        return lg, report
    by_cost = sorted(shapes, key=lambda s: (vit_flops(s), s.label()))
    if eval_data is not None:
        report["zero_shot_before"] = zero_shot(lg, eval_shapes or shapes, eval_data)

    work = _Trainable(lg, {s.depth for s in shapes}, cfg)
    params = [p for p in work.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    schedule = TrainConfig(steps=max(1, cfg.steps), lr=cfg.lr, warmup_steps=cfg.warmup_steps, min_lr=cfg.lr * 0.01)
    out = Path(out_dir) if out_dir is not None else None
    ckpt, start = open_checkpoint(out, resume, work, opt, "the expanding phase")
    log = None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        log = open(out / "metrics.jsonl", "a" if resume else "w")
    with torch.device("meta"):
        skeletons = {s: build_vit(arch, s).eval() for s in shapes}
    teacher = ancestry.model.eval()
    history = []
    t0 = time.perf_counter()
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="expanding phase", unit="step",
               disable=not progress, dynamic_ncols=True)
    try:
        for step in bar:
            x, _ = step_batch(data, cfg.batch_size, step, cfg.seed, cfg.shift)
            with torch.no_grad():
                target = teacher(x)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, schedule)
            opt.zero_grad(set_to_none=True)
            current = work.learngene(lg)
            total = 0.0
            for shape in picks_at(step, by_cost, cfg):
                state = expand_tensors(current, shape)
                logits = torch.func.functional_call(skeletons[shape], state, (x,))
                loss = distill_loss(logits, target, cfg.temperature)
                loss.backward()
                total += float(loss.detach())
            nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            record = {"step": step + 1, "loss": round(total, 5)}
            history.append(record)
            if log is not None:
                log.write(json.dumps(record) + "\n")
                log.flush()
            bar.set_postfix(loss=f"{total:.3f}")
            last = step + 1 == cfg.steps
            if ckpt is not None and ((ckpt_every and (step + 1) % ckpt_every == 0) or last):
                save_checkpoint(ckpt, work, opt, step + 1, cfg)
    finally:
        bar.close()
        if log is not None:
            log.close()
    trained = work.requires_grad_(False).learngene(lg, detach=True)
    trained.meta = dict(lg.meta)
    report["loss_first"] = history[0]["loss"] if history else None
    report["loss_last"] = history[-1]["loss"] if history else None
    report["seconds"] = round(time.perf_counter() - t0, 1)
    report["history"] = history
    if eval_data is not None:
        report["zero_shot_after"] = zero_shot(trained, eval_shapes or shapes, eval_data)
    trained.meta["expanding_phase"] = {k: v for k, v in report.items() if k not in ("history", "zero_shot_before", "zero_shot_after")}
    return trained, report
