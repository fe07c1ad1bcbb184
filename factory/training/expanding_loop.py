"""The expanding phase's training loop: train gene tensors and depth maps by distillation.

At every step a few descendant shapes are drawn from ``shapes`` with the sandwich rule (the
smallest and -- every ``largest_every``-th step, by default every step -- the largest by FLOPs, plus
``random_per_step`` drawn at random), each is expanded
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

Speed at real input sizes (``ExpandingConfig``): the steps run on ``device`` (CUDA when available: the
gene tensors, the depth maps and a copy of the teacher move there; the trained learngene comes back to
the CPU) under bf16 autocast where
:func:`factory.training.precision.precision_for` says so (``amp``; gene tensors, AdamW state and the loss stay
fp32); with ``distill_img_size`` the batch is resized (bilinear, antialiased) to that size, the teacher is a
copy of the ancestry with its position embedding resampled to the smaller grid (timm's ``set_input_size``)
and each descendant's expanded position embedding is resampled differentiably
(:func:`factory.core.expanding_phase.distill_pos_embed`), so the learngene's full-size embedding is what trains.
The teacher's outputs are *not* cached: each step's batch is freshly augmented (``shift``), so no two
steps see the same input, and the teacher's forward pass is a small part of a step (about 1 of
``1 + 3 * sum(student depth) / teacher depth`` forward-equivalents: 9-15% of a DeiT-Tiny step at 224 px
in two runs of ``bench/real_scale.py``), so a cache would save at most that.

Determinism and resume. The batch of step ``s`` is :func:`factory.training.batches.step_batch` (a pure
function of ``(seed, s)``) and the random shapes of step ``s`` come from
``random.Random(seed * 1_000_003 + s)``; the learning rate is a pure function of ``s``. A
checkpoint (``out_dir/checkpoint``, :func:`factory.training.checkpoints.save_checkpoint`) therefore holds only the
trainable tensors and AdamW's state, and a resumed run is bit-identical to an uninterrupted one.
``steps = 0`` returns the learngene unchanged (same tensors, same hash).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from factory.core.ancestry import Ancestry
from factory.core.expand import expand, expand_tensors
from factory.core.expanding_phase import (
    ExpandingConfig,
    GeneParameters,
    check_distill_size,
    distill_loss,
    distill_pos_embed,
    picks_at,
)
from factory.core.learngene import Learngene
from factory.core.shapes import DescendantShape, vit_flops
from factory.core.timm_vit import skeleton_vit
from factory.data import spread
from factory.errors import FactoryError
from factory.io import release_freed_memory
from factory.training.batches import check_batch_fits, training_batches
from factory.training.checkpoints import open_checkpoint, resume_or_restart, save_checkpoint
from factory.training.distributed import average_gradients, global_mean, start
from factory.training.loop import TRIM_AFTER_S, StepLoop
from factory.training.micro_batch import activation_mb_per_image, micro_batch_size, resolve_memory_mb, spans
from factory.training.precision import autocast_for, pick_device, precision_for
from factory.training.train import TrainConfig, evaluate
from factory.training.update_timing import adamw_extra_seconds, phase_optimizer, stateless_optimizer


def zero_shot(lg: Learngene, shapes: list[DescendantShape], data) -> dict[str, float]:
    """Accuracy of each expanded shape on ``data`` without any fine-tuning."""
    return {s.label(): round(evaluate(expand(lg, s), data), 4) for s in shapes}


def is_long_pass(
    seconds: float, shape: DescendantShape, sized_as: dict[DescendantShape, DescendantShape] | None = None
) -> bool:
    """True where a pass of ``shape`` that took ``seconds`` is long enough to return the freed heap after it:
    ``seconds * D / d >= TRIM_AFTER_S``, with ``d`` the shape's depth and ``D`` that of the shape it stands for in
    ``sized_as`` (itself if absent): a shallow timing probe trims where the deep pass it stands for would."""
    return seconds * (sized_as or {}).get(shape, shape).depth / shape.depth >= TRIM_AFTER_S


def train_learngene(
    lg: Learngene,
    ancestry: Ancestry,
    data,
    shapes: list[DescendantShape],
    cfg: ExpandingConfig,
    *,
    eval_data=None,
    eval_shapes: list[DescendantShape] | None = None,
    out_dir: str | Path | None = None,
    resume: bool = False,
    ckpt_every: int = 100,
    progress: bool = True,
    should_stop=None,
    picks: Callable[[int], list[DescendantShape]] | None = None,
    sized_as: dict[DescendantShape, DescendantShape] | None = None,
    own: bool = False,
    optimizer: Callable[[list[nn.Parameter], float], torch.optim.Optimizer] | None = None,
) -> tuple[Learngene, dict[str, Any]]:
    """Run the expanding phase; returns the trained learngene and a report (before/after).

    With ``out_dir`` a checkpoint is written every ``ckpt_every`` steps (and at the end) to
    ``out_dir/checkpoint`` and the loss log to ``out_dir/metrics.jsonl``; ``resume`` continues
    from that checkpoint (see the module docstring).
    ``should_stop`` is polled before every step, as in :func:`factory.training.train.train`
    (:class:`factory.training.loop.StepLoop`).

    For timing (:mod:`factory.training.step_estimate`): ``picks(step)`` replaces the sandwich rule's shapes of a
    step (:func:`factory.core.expanding_phase.picks_at`), each step's record then carries ``shape_seconds`` (each
    shape's pass: its expansion, forward and backward), a shape in ``sized_as`` is cut into the micro-batches of
    the shape it maps to. The freed heap goes back to the OS after every long pass (:data:`TRIM_AFTER_S` or more),
    so that the next pass faults its pages in again; a shape in ``sized_as`` counts as long where its pass scaled
    to the mapped shape's depth would be (a shallow probe of a deep shape trims as the deep shape's pass does).
    With ``own`` the trained genes are ``lg``'s own tensors, not copies (``lg`` is changed: for a caller that drops
    it, as the timing probes do; the stem is copied either way); ``optimizer(params, lr)`` replaces AdamW
    (:func:`~factory.training.update_timing.phase_optimizer`; the probes time with a stateless one and add AdamW's
    update separately: :func:`factory.training.update_timing.adamw_extra_seconds`). The report's
    ``trainable_numel`` counts the trained parameters' elements.
    """
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

    check_batch_fits(cfg.batch_size, len(data))  # before any process waits for its peers
    rank, world, device = start(pick_device(cfg.device), cfg.batch_size)  # factory.training.distributed
    work = GeneParameters(lg, {s.depth for s in shapes}, cfg, copy_genes=not own).to(device)
    params = [p for p in work.parameters() if p.requires_grad]
    opt = (optimizer or phase_optimizer)(params, cfg.lr)
    report["trainable_numel"] = sum(p.numel() for p in params)
    schedule = TrainConfig(steps=max(1, cfg.steps), lr=cfg.lr, warmup_steps=cfg.warmup_steps, min_lr=cfg.lr * 0.01)
    out = Path(out_dir) if out_dir is not None else None
    ckpt, first = open_checkpoint(out, resume, work, opt, "the expanding phase", world=world)
    size = cfg.distill_img_size or arch.img_size
    if size != arch.img_size:
        check_distill_size(size, arch)
    skeletons: dict[DescendantShape, nn.Module] = {}  # built when a shape is first drawn (most runs draw few)

    def skeleton(shape: DescendantShape) -> nn.Module:
        if shape not in skeletons:
            skeletons[shape] = skeleton_vit(arch, dataclasses.replace(shape, img_size=size)).eval()
        return skeletons[shape]

    teacher = ancestry.model.eval()
    if size != arch.img_size or device.type != "cpu":  # a copy: the ancestry object is shared (and cached) by the build
        teacher = copy.deepcopy(teacher).to(device)
        if size != arch.img_size:
            teacher.set_input_size(img_size=size)
    grid, small = (arch.img_size // arch.patch_size,) * 2, (size // arch.patch_size,) * 2
    prefix = 0 if getattr(teacher, "no_embed_class", False) else int(getattr(teacher, "num_prefix_tokens", 1))
    # no GradScaler here: fp16 (asked for, or "auto" on a CUDA GPU without bf16) runs as fp32
    precision = precision_for(device, "off" if cfg.amp == "fp16" else cfg.amp)
    precision = "fp32" if precision == "fp16" else precision
    autocast, _ = autocast_for(device, "bf16" if precision == "bf16" else "off")
    report["precision"], report["device"] = precision, str(device)
    report["distill_img_size"] = size
    tokens = (size // arch.patch_size) ** 2 + prefix

    memory_mb = resolve_memory_mb(cfg.memory_mb, device)  # after the genes and the teacher moved there
    report["memory_mb"] = round(memory_mb)

    def pieces(shape: DescendantShape, batch: int) -> list[slice]:
        """The micro-batches of ``shape``'s forward/backward passes (factory.training.micro_batch)."""
        depth = (sized_as or {}).get(shape, shape).depth
        per = activation_mb_per_image(depth, tokens, shape.embed_dim, shape.mlp_hidden, precision)
        return spans(batch, micro_batch_size(batch, per, memory_mb))

    report["micro_batches"] = {s.label(): len(pieces(s, cfg.batch_size // world)) for s in (by_cost[0], by_cost[-1])}

    def step_fn(step: int, batch, last: bool) -> dict[str, Any]:
        x = batch[0].to(device, non_blocking=True)
        if size != arch.img_size:
            x = torch.nn.functional.interpolate(
                x, size=(size, size), mode="bilinear", antialias=True, align_corners=False
            )
        with torch.no_grad(), autocast:
            # in the largest shape's micro-batches: tensors the size the students' passes reuse after it, where the
            # whole batch's left the heap fragmented (an isolated 224-px step at 192 MB peaked at 1.27-1.33 GB against
            # 1.31-1.40 GB, three runs each; no slower); a ViT has no batch statistics, so the logits are the same
            target = torch.cat([teacher(x[part]).float() for part in pieces(by_cost[-1], len(x))])
        opt.zero_grad(set_to_none=True)
        current = work.learngene(lg)
        total, passes = 0.0, {}
        for shape in picks(step) if picks is not None else picks_at(step, by_cost, cfg):
            shape_start = time.perf_counter()
            state = expand_tensors(current, shape)
            if "pos_embed" in state:
                state["pos_embed"] = distill_pos_embed(state["pos_embed"], grid, small, prefix)
            # the shape's weights as leaves: each micro-batch's backward stops there, and one backward through the
            # expansion carries their summed gradient to the genes and depth maps
            leaves = {k: v.detach().requires_grad_(v.requires_grad) for k, v in state.items()}
            for part in pieces(shape, len(x)):
                with autocast:
                    logits = torch.func.functional_call(skeleton(shape), leaves, (x[part],))
                loss = distill_loss(logits.float(), target[part], cfg.temperature) * (len(logits) / len(x))
                loss.backward()
                total += float(loss.detach())
            grads = [(state[k], v.grad) for k, v in leaves.items() if v.grad is not None and state[k].requires_grad]
            torch.autograd.backward([t for t, _ in grads], [g for _, g in grads])
            del state, leaves, grads  # this shape's weights and gradients, before the next shape's
            passes[shape.label()] = time.perf_counter() - shape_start
            if is_long_pass(passes[shape.label()], shape, sized_as):
                # the next shape's tensors have other sizes: without this the heap fragments and a 224-px step
                # peaked ~250 MB higher (1.85-1.93 GB against 1.61 GB in one scratch trace, d24 at 512 MB)
                release_freed_memory()
        average_gradients(params, world)  # the sandwich changes the graph every step: all-reduced by hand, not DDP
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        record: dict[str, Any] = {"loss": round(global_mean([total], world)[0], 5)}
        if world > 1:
            record.update(world_size=world, global_batch=cfg.batch_size)
        if picks is not None:
            record["shape_seconds"] = passes
        return record

    t0 = time.perf_counter()
    loop = StepLoop(
        cfg.steps,
        schedule,
        save=(lambda at: save_checkpoint(ckpt, work, opt, at, cfg, world=world)) if ckpt is not None else None,
        ckpt_every=ckpt_every,
        metrics_path=out / "metrics.jsonl" if out is not None else None,
        append=resume,
        rank=rank,
        progress=progress,
        desc="expanding phase",
        should_stop=should_stop,
    )
    batches = training_batches(
        data, cfg.batch_size, range(first, cfg.steps), cfg.seed, cfg.shift, rank=rank, world=world
    )
    history = loop.run(first, batches, opt, step_fn)
    trained = work.requires_grad_(False).cpu().learngene(lg, detach=True)
    trained.meta = dict(lg.meta)
    report["loss_first"] = history[0]["loss"] if history else None
    report["loss_last"] = history[-1]["loss"] if history else None
    report["seconds"] = round(time.perf_counter() - t0, 1)
    report["history"] = history
    report["world_size"] = world
    if eval_data is not None:
        report["zero_shot_after"] = zero_shot(trained, eval_shapes or shapes, eval_data)
    trained.meta["expanding_phase"] = {
        k: v for k, v in report.items() if k not in ("history", "zero_shot_before", "zero_shot_after")
    }
    return trained, report


def random_batch(arch, batch: int):
    """``batch`` random images of ``arch``'s input size and channels, one class: what a step is timed on. One
    image seen ``batch`` times (an expanded view, no memory of its own: a step's batch is a copy drawn from it
    either way, and a ViT's work does not depend on the pixels): 38.5 MB less at 224 px and batch 64."""
    from factory.data import ImageTensors

    images = torch.randn(1, arch.in_chans, arch.img_size, arch.img_size).expand(batch, -1, -1, -1)
    return ImageTensors(images, torch.zeros(batch, dtype=torch.int64), ["x"])


def measure_step_seconds(
    lg: Learngene,
    ancestry: Ancestry,
    shapes: list[DescendantShape],
    cfg: ExpandingConfig,
    *,
    steps: int = 3,
    first: bool = False,
    own: bool = False,
) -> float | tuple[float, float]:
    """Seconds per expanding-phase step of ``cfg`` on this machine, measured: ``steps`` real steps on random
    images of the ancestry's size (the first one, with its one-off costs, left out; the median of the rest,
    over the sandwich's changing random shape). Where the largest shape comes every few steps
    (``largest_every > 1``), at least one whole cycle of ``largest_every`` steps is run and the *mean* of steps
    ``1..largest_every`` taken: a median would skip the step that carries it (with ``0`` it is only drawn, like any
    shape: the median). With ``first``, ``(first step's
    seconds, per step)``: the dry run estimates ``first + (steps - 1) * per step`` (a sandwich too large to hold is
    estimated from shallow passes instead: :mod:`factory.training.step_estimate`). The steps update with a
    stateless optimizer, AdamW's extra time added (:func:`~factory.training.update_timing.adamw_extra_seconds`);
    with ``own`` they train ``lg``'s own tensors (for a caller that drops ``lg``)."""
    import statistics

    data = random_batch(lg.arch, cfg.batch_size)
    cycle = cfg.largest_every if cfg.largest_every > 1 else 0
    probe = dataclasses.replace(cfg, steps=max(2, steps, cycle + 1))
    _, report = train_learngene(
        lg, ancestry, data, shapes, probe, progress=False, own=own, optimizer=stateless_optimizer
    )
    seconds = [h["seconds"] for h in report["history"][1:]]
    extra = adamw_extra_seconds(report["trainable_numel"], device=report["device"])
    per_step = (statistics.mean(seconds[:cycle]) if cycle else statistics.median(seconds)) + extra
    return (report["history"][0]["seconds"] + extra, per_step) if first else per_step


def run_expanding_phase(
    lg: Learngene,
    ancestry: Ancestry,
    data,
    shapes: list[DescendantShape],
    cfg: ExpandingConfig,
    *,
    work: Path,
    log: Callable[[str], None],
    ckpt_every: int | None = None,
    eval_shapes: list[DescendantShape] | None = None,
    eval_images: int = 0,
    progress: bool = True,
    what: str = "the expanding phase",
) -> tuple[Learngene, dict[str, Any]]:
    """The expanding phase as the build's learngene stage and ``peg-factory learngene train`` both run it:
    resume from ``work`` when it holds an intact checkpoint (:func:`factory.training.checkpoints.resume_or_restart`),
    train on ``data.train`` (a :class:`factory.data.Dataset`), checkpoint every ``ckpt_every`` steps
    (default a tenth of the run), score zero-shot accuracy on ``eval_images`` validation images
    (0: not at all; spread over the split, :func:`factory.data.spread`), and record the data's identity in the learngene's metadata."""
    resume = resume_or_restart(work, what, log)
    eval_data = spread(data.val, eval_images) if eval_images else None
    trained, report = train_learngene(
        lg,
        ancestry,
        data.train,
        shapes,
        cfg,
        eval_data=eval_data,
        eval_shapes=eval_shapes,
        out_dir=work,
        resume=resume,
        ckpt_every=ckpt_every or max(1, cfg.steps // 10),
        progress=progress,
    )
    if "expanding_phase" in trained.meta:
        trained.meta["expanding_phase"]["data"] = data.identity
    return trained, report
