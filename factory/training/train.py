"""The trainer: fine-tuning and distillation of a ViT on in-memory image tensors or streamed image files.

Recipe (DeiT-style, scaled down): AdamW, linear warm-up then cosine decay to ``min_lr``,
label smoothing, gradient-norm clipping, optional knowledge distillation

    loss = (1 - alpha) * CE_smooth(student, y) + alpha * T^2 * KL(softmax(t / T) || softmax(s / T)),

Precision (``amp``, :func:`factory.training.precision.precision_for`): ``auto`` is bf16 autocast on CUDA (fp16
with a GradScaler where bf16 is unsupported) and on CPUs with native bf16 dot products (AVX512-BF16 or AMX;
measured in ``bench/precision.py`` and ``bench/real_scale.py``), fp32 elsewhere. Weights, optimizer state,
logits, loss and evaluation stay fp32.

Determinism and resume. Batch ``s`` is a pure function of ``(seed, s)``: epoch ``e = s*B // N``
is a seeded permutation of the data and the batch its next slice, and the augmentation
(random shifts of up to ``shift`` pixels) draws from a generator seeded with ``(seed, s)``. The
learning rate is a pure function of ``s``. A checkpoint therefore needs only the weights, the
AdamW state and torch's RNG state (for drop-path), and ``resume`` continues bit-exactly.

Distributed. Under ``torchrun`` (``WORLD_SIZE > 1``) the process group is initialised (NCCL on
CUDA, gloo on CPU), the model is wrapped in ``DistributedDataParallel`` and each rank trains on
its slice of every global batch (``batch_size`` is global); rank 0 writes checkpoints and logs, and the
run equals one process at the same batch (:mod:`factory.training.distributed`).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from factory.core.expanding_phase import distill_loss
from factory.core.shapes import ArchConfig
from factory.data import ImageTensors
from factory.errors import FactoryError
from factory.training.batches import check_batch_fits, eval_batches, training_batches
from factory.training.best_weights import BestWeights
from factory.training.checkpoints import open_checkpoint, save_checkpoint
from factory.training.distributed import average_gradients, dist_info, global_mean, start  # noqa: F401  # dist_info re-exported
from factory.training.loop import StepLoop, lr_at
from factory.training.micro_batch import micro_batch_size, model_activation_mb, resolve_memory_mb, spans
from factory.training.precision import autocast_for, pick_device, precision_for


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 200
    batch_size: int = 64
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_steps: int = 20
    label_smoothing: float = 0.1
    clip_grad: float = 1.0
    distill_alpha: float = 0.0
    distill_temperature: float = 2.0
    shift: int = 2
    # a streamed folder's training view (factory.data.stream.TrainView): not timm's ImageNet 0.08 crop and 0.5 flip,
    # which cost a fine-tune 25.7 points on digits, 7.0 on photo crops (bench/RESULTS.md, "The training view ...")
    hflip: float = 0.0
    crop_scale: float = 0.5
    amp: str = "auto"  # auto | bf16 | fp16 | off
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0
    eval_every: int = 0  # 0: only at the end
    #: return the weights of the evaluation with the best validation accuracy, not the last step's
    #: (factory.training.best_weights; needs val_data, evaluated every eval_every steps and at the end)
    keep_best: bool = False
    ckpt_every: int = 0  # 0: only at the end (when out_dir is given)
    #: MB of saved activations one forward/backward may hold: the batch runs in micro-batches that fit, their
    #: gradients accumulated (factory.training.micro_batch); <= 0: the whole batch at once; None: 512 on the CPU,
    #: half the GPU's free memory on CUDA (micro_batch.resolve_memory_mb)
    memory_mb: float | None = None

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise FactoryError(f"steps must be >= 0, got {self.steps}", param="steps")
        if self.batch_size < 1:
            raise FactoryError(f"batch size must be >= 1, got {self.batch_size}", param="batch_size")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise FactoryError(f"learning rate must be a finite number > 0 (e.g. 1e-3), got {self.lr}", param="lr")
        if not 0.0 <= self.distill_alpha <= 1.0:
            raise FactoryError(f"distill_alpha must be in [0, 1], got {self.distill_alpha}")
        if self.amp not in ("auto", "bf16", "fp16", "off"):
            raise FactoryError(f"amp must be auto, bf16, fp16 or off, got {self.amp!r}")
        self.view()  # hflip and crop_scale refused here, in one line

    def view(self):
        """The streamed training view this recipe draws (:class:`factory.data.stream.TrainView`)."""
        from factory.data.stream import TrainView

        return TrainView(self.hflip, self.crop_scale)


def evaluate(
    model: nn.Module, data: ImageTensors, *, batch_size: int = 512, device: torch.device | None = None
) -> float:
    """Top-1 accuracy of ``model`` on ``data``."""
    return evaluate_nll(model, data, batch_size=batch_size, device=device)[0]


@torch.no_grad()
def predict_logits(
    model: nn.Module, data: ImageTensors, *, batch_size: int = 512, device: torch.device | None = None, amp: str = "off"
) -> torch.Tensor:
    """``model``'s float32 logits ``(N, classes)`` on ``data`` in eval mode, on the CPU (computed in ``amp``'s
    precision: fp32 by default, so reported accuracies do not depend on the machine's bf16 support)."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    with autocast_for(device, amp)[0]:
        out = [model(x.to(device)).float().cpu() for x in eval_batches(data, batch_size)]
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, 0)


def evaluate_nll(
    model: nn.Module, data: ImageTensors, *, batch_size: int = 512, device: torch.device | None = None
) -> tuple[float, torch.Tensor]:
    """``(top-1 accuracy, per-image negative log-likelihood (N,))`` of ``model`` on ``data`` (no label
    smoothing); the NLL's mean is the usual validation loss, its per-image values allow paired tests."""
    return score_logits(predict_logits(model, data, batch_size=batch_size, device=device), data.labels)


def score_logits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, torch.Tensor]:
    """``(top-1 accuracy, per-image NLL (N,))`` of ``logits`` against ``labels``; ``(0.0, empty)`` for none."""
    if not len(labels):
        return 0.0, torch.zeros(0)
    return int((logits.argmax(-1) == labels).sum()) / len(labels), F.cross_entropy(logits, labels, reduction="none")


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    val_accuracy: float | None
    history: list[dict[str, Any]]
    seconds: float
    precision: str = "fp32"  # what the steps computed in (:func:`precision_for`)
    world_size: int = 1  # processes that trained it (torchrun); the batch is global either way
    kept_step: int | None = None  # keep_best: the step whose weights were returned (None: keep_best off)


def check_teacher(teacher: ArchConfig, student: ArchConfig) -> None:
    """Refuse, in one line, a distillation teacher whose logits cannot be the student's targets: it must take the
    student's input (size and channels) and predict its classes (the KL term compares the two logit vectors)."""
    wrong = [
        f"{what} {t} (the student's {s})"
        for what, t, s in (
            ("input size", teacher.img_size, student.img_size),
            ("input channels", teacher.in_chans, student.in_chans),
            ("classes", teacher.num_classes, student.num_classes),
        )
        if t != s
    ]
    if wrong:
        raise FactoryError(
            f"the teacher has {', '.join(wrong)}: it must take the student's images and predict the task's classes; "
            "distil from a model fine-tuned on this task (e.g. a `train` run of the ancestry)",
            param="distill_from",
        )


def train(
    model: nn.Module,
    train_data: ImageTensors,
    cfg: TrainConfig,
    *,
    val_data: ImageTensors | None = None,
    teacher: nn.Module | None = None,
    out_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    should_stop: Callable[[], bool] | None = None,
    carry: dict[str, Any] | None = None,
    desc: str = "train",
) -> TrainResult:
    """Train ``model`` in place for ``cfg.steps`` steps (see module docstring).

    ``carry`` continues training in memory, without checkpoint files: pass the same dict (and the
    same ``model``) to successive calls with growing ``cfg.steps``; each call starts at the step the
    previous one reached, with its optimizer state (the accuracy estimator's probes use it).

    ``should_stop`` is polled before every step (the way a worker thread learns that the user
    pressed Ctrl-C in the main thread): when it returns true, a checkpoint of the steps done so
    far is written (if ``out_dir`` is given) and :class:`~factory.errors.Interrupted` is raised,
    so a rerun with ``resume`` continues from there.
    """
    check_batch_fits(cfg.batch_size, len(train_data))  # before any process waits for its peers
    rank, world, device = start(pick_device(cfg.device), cfg.batch_size)  # factory.training.distributed
    if cfg.distill_alpha > 0 and teacher is None:
        raise FactoryError("distillation (distill_alpha > 0) needs a teacher model")
    model.to(device).train()
    net: nn.Module = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if teacher is not None:
        teacher.to(device).eval()
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and "pos_embed" not in n and "token" not in n]
    no_decay = [
        p for n, p in model.named_parameters() if not (p.ndim > 1 and "pos_embed" not in n and "token" not in n)
    ]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr
    )
    out = Path(out_dir) if out_dir is not None else None
    ckpt, first = open_checkpoint(out, resume, model, opt, "training (--resume)", world=world)
    keep = cfg.keep_best and val_data is not None and carry is None
    best = BestWeights.open(out, first if resume else None, write=rank == 0) if keep else None
    if carry and "optimizer" in carry:
        opt.load_state_dict(carry["optimizer"])
        first = int(carry["step"])
    autocast, needs_scaler = autocast_for(device, cfg.amp)
    scaler = torch.amp.GradScaler("cuda") if needs_scaler else None
    seen, state = 0, {"loss": float("nan"), "acc": None}
    t0 = time.perf_counter()

    per_image = model_activation_mb(model, precision_for(device, cfg.amp))
    memory_mb = resolve_memory_mb(cfg.memory_mb, device)

    def piece_loss(x: torch.Tensor, y: torch.Tensor, weight: float) -> tuple[torch.Tensor, torch.Tensor]:
        """One micro-batch's forward and backward: its loss (times its share of the batch) and its logits."""
        with autocast:
            logits = net(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
            if teacher is not None and cfg.distill_alpha > 0:
                with torch.no_grad():
                    t_logits = teacher(x).float()
                loss = (1 - cfg.distill_alpha) * loss + cfg.distill_alpha * distill_loss(
                    logits.float(), t_logits, cfg.distill_temperature
                )
            loss = loss * weight
        (scaler.scale(loss) if scaler is not None else loss).backward()
        return loss.detach(), logits.detach()

    def step_fn(step: int, batch, last: bool) -> dict[str, Any]:
        nonlocal seen
        x, y = batch[0].to(device), batch[1].to(device)
        opt.zero_grad(set_to_none=True)
        parts = spans(len(y), micro_batch_size(len(y), per_image, memory_mb))
        loss, hits = torch.zeros((), device=device), torch.zeros((), device=device)
        for k, part in enumerate(parts):  # DDP all-reduces once, after the last micro-batch's backward
            sync = contextlib.nullcontext() if world == 1 or k == len(parts) - 1 else net.no_sync()
            with sync:
                piece, logits = piece_loss(x[part], y[part], len(y[part]) / len(y))
            loss += piece
            hits += (logits.argmax(-1) == y[part]).sum()
        if scaler is not None:
            scaler.unscale_(opt)
        if cfg.clip_grad > 0:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        seen += len(y) * world
        # the global batch's loss and accuracy (each rank's slice mean, averaged: one process's figures)
        loss_value, batch_acc = global_mean([float(loss), float(hits) / len(y)], world)
        state["loss"] = loss_value
        if not math.isfinite(loss_value) and scaler is None:  # fp16 AMP skips such steps itself
            raise FactoryError(
                f"training diverged: the loss is {loss_value} at step {step + 1}; lower the learning "
                f"rate (now {cfg.lr:g}) or check the data"
            )
        record: dict[str, Any] = {"loss": round(loss_value, 5), "acc": round(batch_acc, 4), "lr": lr_at(step, cfg)}
        if world > 1:
            record.update(world_size=world, global_batch=cfg.batch_size)
        if val_data is not None and ((cfg.eval_every and (step + 1) % cfg.eval_every == 0) or last):
            state["acc"] = evaluate(model, val_data, device=device)
            record["val_acc"] = round(state["acc"], 4)
            if best is not None and best.offer(step + 1, state["acc"], model):
                record["best"] = True
        return record

    def postfix(record: dict[str, Any]) -> dict[str, str]:
        rate = seen / max(1e-9, time.perf_counter() - t0)
        return {"loss": f"{record['loss']:.3f}", "acc": f"{record['acc']:.2f}", "img_s": f"{rate:.0f}"}

    loop = StepLoop(
        cfg.steps,
        cfg,
        save=(lambda at: save_checkpoint(ckpt, model, opt, at, cfg, world=world)) if ckpt is not None else None,
        ckpt_every=cfg.ckpt_every,
        metrics_path=out / "metrics.jsonl" if out is not None else None,
        append=resume,
        rank=rank,
        progress=progress,
        desc=desc,
        should_stop=should_stop,
        postfix=postfix,
    )
    history = loop.run(
        first,
        training_batches(
            train_data,
            cfg.batch_size,
            range(first, cfg.steps),
            cfg.seed,
            cfg.shift,
            rank=rank,
            world=world,
            view=cfg.view(),
        ),
        opt,
        step_fn,
    )
    loss_value, acc, kept = state["loss"], state["acc"], None
    if carry is not None:
        carry.update(optimizer=opt.state_dict(), step=cfg.steps)
    if best is not None:  # the best evaluation's weights (ties: the later), this run's or an earlier run's
        kept = best.restore(model, cfg.steps)
        acc = best.accuracy if kept != cfg.steps else acc
    model.eval()
    precision = precision_for(device, cfg.amp)
    return TrainResult(cfg.steps, loss_value, acc, history, loop.seconds, precision, world, kept)
