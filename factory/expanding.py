"""PEG's learngene expanding phase: train gene tensors and depth maps by distillation.

At every step a few descendant shapes are drawn from ``shapes`` with the sandwich rule (the
smallest and the largest by FLOPs, plus ``random_per_step`` drawn at random), each is expanded
*differentiably* from the learngene (:func:`factory.expand.expand_tensors`) and run with
``torch.func.functional_call`` on a meta-device timm skeleton, and the summed distillation loss

    sum_shapes  T^2 * KL(softmax(ancestry(x) / T) || softmax(descendant(x) / T))

is minimised over the gene tensors, the stem (unless frozen) and one
:class:`~factory.mixing.DepthMap` per depth in ``shapes``. Every shape keeps the ancestry's
classifier (same classes, same input size) so the ancestry's logits are a valid target. The
result is a learngene whose expansions start near the ancestry's function; its trained depth maps
are saved with it and used by :func:`factory.expand.expand` for those depths.
"""

from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .ancestry import Ancestry
from .data import ImageTensors
from .errors import FactoryError
from .expand import expand, expand_tensors
from .learngene import Learngene
from .mixing import DepthMap
from .shapes import DescendantShape, vit_flops
from .timm_vit import build_vit
from .train import TrainConfig, distill_loss, evaluate, lr_at, step_batch


@dataclass(frozen=True)
class ExpandingConfig:
    steps: int = 200
    batch_size: int = 64
    lr: float = 5e-4
    warmup_steps: int = 10
    temperature: float = 2.0
    random_per_step: int = 1
    train_stem: bool = True
    shift: int = 1
    seed: int = 0


def default_shapes(lg: Learngene, depths: list[int] | None = None) -> list[DescendantShape]:
    """Ancestry-width descendants at ``depths`` (default: 1, L_b, L_a, 2*L_a and between)."""
    arch = lg.arch
    if depths is None:
        depths = sorted({1, max(1, lg.num_layers // 2), lg.num_layers, arch.depth, (arch.depth * 3) // 2, 2 * arch.depth})
    return [dataclasses.replace(arch.shape(), depth=d) for d in depths]


def zero_shot(lg: Learngene, shapes: list[DescendantShape], data: ImageTensors) -> dict[str, float]:
    """Accuracy of each expanded shape on ``data`` without any fine-tuning."""
    return {s.label(): round(evaluate(expand(lg, s), data), 4) for s in shapes}


def train_learngene(
    lg: Learngene,
    ancestry: Ancestry,
    data: ImageTensors,
    shapes: list[DescendantShape],
    cfg: ExpandingConfig,
    *,
    eval_data: ImageTensors | None = None,
    progress: bool = True,
) -> tuple[Learngene, dict[str, Any]]:
    """Run the expanding phase; returns the trained learngene and a report (before/after)."""
    from tqdm.auto import tqdm

    arch = lg.arch
    for s in shapes:
        if s.num_classes != arch.num_classes or s.img_size != arch.img_size or s.patch_size != arch.patch_size:
            raise FactoryError(
                f"expanding-phase shape {s.label()} must keep the ancestry's classes, input and patch size "
                "(the ancestry's logits are the target)"
            )
    if not shapes:
        raise FactoryError("the expanding phase needs at least one descendant shape")
    by_cost = sorted(shapes, key=vit_flops)
    report: dict[str, Any] = {"config": dataclasses.asdict(cfg), "shapes": [s.label() for s in shapes]}
    if eval_data is not None:
        report["zero_shot_before"] = zero_shot(lg, shapes, eval_data)

    genes = {k: v.detach().clone().requires_grad_(True) for k, v in lg.genes.items()}
    stem = {k: v.detach().clone().requires_grad_(cfg.train_stem) for k, v in lg.stem.items()}
    maps = {d: (lg.depth_maps[d] if d in lg.depth_maps else DepthMap(lg.num_layers, d, seed=cfg.seed)) for d in {s.depth for s in shapes}}
    work = dataclasses.replace(lg, genes=genes, stem=stem, depth_maps=maps)
    params = list(genes.values()) + [p for m in maps.values() for p in m.parameters()]
    if cfg.train_stem:
        params += list(stem.values())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    schedule = TrainConfig(steps=max(1, cfg.steps), lr=cfg.lr, warmup_steps=cfg.warmup_steps, min_lr=cfg.lr * 0.01)
    with torch.device("meta"):
        skeletons = {s: build_vit(arch, s).eval() for s in shapes}
    teacher = ancestry.model.eval()
    rng = random.Random(cfg.seed)
    history = []
    t0 = time.perf_counter()
    for step in tqdm(range(cfg.steps), desc="expanding phase", disable=not progress, dynamic_ncols=True):
        x, _ = step_batch(data, cfg.batch_size, step, cfg.seed, cfg.shift)
        with torch.no_grad():
            target = teacher(x)
        picks = [by_cost[0], by_cost[-1]] + [rng.choice(shapes) for _ in range(cfg.random_per_step)]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, schedule)
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for shape in dict.fromkeys(picks):
            state = expand_tensors(work, shape)
            logits = torch.func.functional_call(skeletons[shape], state, (x,))
            loss = distill_loss(logits, target, cfg.temperature)
            loss.backward()
            total += float(loss.detach())
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        history.append({"step": step + 1, "loss": round(total, 5)})
    trained = Learngene(
        arch,
        {k: v.detach() for k, v in stem.items()},
        {k: v.detach() for k, v in genes.items()},
        lg.num_heads,
        lg.layer_mixing,
        lg.head_mixing,
        dict(lg.meta),
        {d: m.requires_grad_(False) for d, m in maps.items()},
    )
    report["loss_first"] = history[0]["loss"] if history else None
    report["loss_last"] = history[-1]["loss"] if history else None
    report["seconds"] = round(time.perf_counter() - t0, 1)
    report["history"] = history
    if eval_data is not None:
        report["zero_shot_after"] = zero_shot(trained, shapes, eval_data)
    trained.meta["expanding_phase"] = {k: v for k, v in report.items() if k != "history"}
    return trained, report
