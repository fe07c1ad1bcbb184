"""The one step loop the fine-tune (:func:`factory.training.train.train`) and the expanding phase
(:func:`factory.training.expanding_loop.train_learngene`) share: schedule, progress bar, ``metrics.jsonl``,
checkpoints, Ctrl-C and timing. What a step computes is the caller's ``step_fn``.

For ``step`` in ``start..steps-1``: poll ``should_stop`` (a checkpoint of the steps done so far, then
:class:`~factory.errors.Interrupted`); set every parameter group's learning rate to
``lr_at(step, schedule)``; ``metrics = step_fn(step, batch, last)``; append the record ``{"step": step+1,
**metrics, "seconds": wall time of the step}`` to the history and to ``metrics.jsonl`` (rank 0); checkpoint
every ``ckpt_every`` steps and at the last one (rank 0). The batch iterator is closed however the loop ends
(a streamed split's decoding workers stop with it).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from factory.errors import FactoryError, Interrupted
from factory.io import ensure_parent, release_freed_memory


def lr_at(step: int, cfg) -> float:
    """Linear warm-up over ``warmup_steps`` then cosine from ``lr`` to ``min_lr`` at ``steps``."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


#: ``peg-factory train``'s warm-up where none is asked for (at most half the run: :func:`warmup_for`)
DEFAULT_WARMUP_STEPS = 20


def warmup_for(steps: int, asked: int | None) -> int:
    """The warm-up of a run of ``steps``: ``asked``, or :data:`DEFAULT_WARMUP_STEPS` capped at half the run where
    none is asked for (a 10-step run warms up over 5 and then decays, instead of ending at 11/20 of its rate).
    A warm-up asked for that is longer than the run is refused: :func:`lr_at` would never reach the peak rate."""
    if asked is None:
        return min(DEFAULT_WARMUP_STEPS, steps // 2)
    if asked > steps:
        raise FactoryError(
            f"a warm-up of {asked} steps is longer than the run of {steps}: the learning rate would never reach its "
            f"peak; pass at most {steps} warm-up steps, or more steps",
            param="warmup_steps",
        )
    return asked


#: after a step at least this long, freed memory goes back to the OS (factory.io.memory): steps of different
#: shapes (the expanding phase's sandwich) otherwise fragment the heap and RSS climbs step after step
TRIM_AFTER_S = 1.0


@dataclass
class StepLoop:
    steps: int
    schedule: Any  # a TrainConfig: lr_at(step, schedule) sets the learning rate
    save: Callable[[int], None] | None = None  # writes a checkpoint at a step count (None: no checkpoints)
    ckpt_every: int = 0
    metrics_path: Path | None = None  # metrics.jsonl (rank 0 only), appended on resume
    append: bool = False
    rank: int = 0
    progress: bool = True
    desc: str = "train"
    should_stop: Callable[[], bool] | None = None
    postfix: Callable[[dict[str, Any]], dict[str, str]] = lambda record: {"loss": f"{record['loss']:.3f}"}
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def run(
        self,
        start: int,
        batches: Iterator,
        opt: torch.optim.Optimizer,
        step_fn: Callable[[int, Any, bool], dict[str, Any]],
    ) -> list[dict[str, Any]]:
        """Run steps ``start..steps-1`` (module docstring); the records of this run."""
        from tqdm.auto import tqdm

        main = self.rank == 0
        log = None
        if self.metrics_path is not None and main:
            ensure_parent(self.metrics_path)
            log = open(self.metrics_path, "a" if self.append else "w")
        bar = tqdm(
            range(start, self.steps),
            initial=start,
            total=self.steps,
            disable=not self.progress or not main,
            desc=self.desc,
            unit="step",
            dynamic_ncols=True,
        )
        t0 = step_start = time.perf_counter()
        try:
            for step in bar:
                if self.should_stop is not None and self.should_stop():
                    if self.save is not None and main and step > start:
                        self.save(step)
                    raise Interrupted(f"training stopped at step {step} of {self.steps}")
                batch = next(batches)
                for group in opt.param_groups:
                    group["lr"] = lr_at(step, self.schedule)
                last = step + 1 == self.steps
                metrics = step_fn(step, batch, last)
                now = time.perf_counter()
                if now - step_start >= TRIM_AFTER_S:  # a long step: milliseconds of trim are noise beside it
                    release_freed_memory()
                    now = time.perf_counter()
                record = {"step": step + 1, **metrics, "seconds": round(now - step_start, 4)}
                if torch.cuda.is_initialized():  # this process's peak so far, what a GPU's budget is about
                    record["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
                step_start = now
                self.history.append(record)
                if log is not None:
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                bar.set_postfix(**self.postfix(record))
                if self.save is not None and main and ((self.ckpt_every and (step + 1) % self.ckpt_every == 0) or last):
                    self.save(step + 1)
        finally:
            bar.close()
            close = getattr(batches, "close", None)
            if close is not None:
                close()
            if log is not None:
                log.close()
            self.seconds = time.perf_counter() - t0
            if self.seconds >= TRIM_AFTER_S:  # the run's activations, so the next stage does not grow on top of them
                release_freed_memory()
        return self.history
