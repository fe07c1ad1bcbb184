"""A budgeted fine-tune keeps to its time (``--time-budget``): it re-times itself as it runs and sets its own
step count to what fits the seconds the plan allotted it.

The budget's second plan gives every shape ``N`` steps from a step time ``s`` measured over a few seconds
(:func:`~factory.pipeline.finetune_facts.step_seconds`), so the shape's fine-tune is allotted ``A = N * s``
seconds. A window that short read 0.85-1.14x of the sustained pace on a quiet machine (bench/RESULTS.md, Run
15: two builds of the same shapes ran 1.10x and 0.89x of their budget), a machine that gets busier or quieter
later is not seen at all, and a fine-tune's steps got ~30% faster over its first few hundred on this machine
(a 28-px demo shape: 0.063 s a step over the first 100, 0.043-0.047 s after 600). So the fine-tune stops at
*checks* (:func:`check_step`: at :data:`CHECK_FRACTIONS` of its step count as it stands, each at least
:data:`MIN_CHECK_STEPS` after the last), measures its pace ``p`` over the steps since the last check (the first
step of each run, with its loader's start, left out) and goes on to::

    N' = clip(k + floor((A - T_k) / p),  max(k, ceil(N / MAX_STRETCH)),  ceil(N * MAX_STRETCH))

``k``: the check's step; ``T_k``: the seconds its first ``k`` steps took, every first step included
(:func:`paced_steps`). The latest pace, not the mean since the start: it is the one the remaining steps will
run at. The clip keeps a timing mishap from halving or doubling a model's training beyond :data:`MAX_STRETCH`.

Each check's checkpoint is resumed with ``N'`` steps: batch ``s`` is a pure function of ``(seed, s)``, so the
batches are the ones a plain run sees. The learning rate stays continuous (:func:`schedule`): past the warm-up,
a changed count restarts the cosine at ``k`` from the rate step ``k`` had, down to ``min_lr`` at ``N'``. The
checks are written to ``pace.json`` in the stage's work folder (a resumed fine-tune goes on with them) and
recorded in the manifest (``finetune.pace``: ``planned_steps``, ``allotted_s``, ``checks``, ``steps``).

Only a fine-tune with an allotment is paced (a build under ``--time-budget`` whose second plan measured the
shape's step); ``--steps N`` alone trains exactly ``N`` steps, and a fine-tune of fewer than
``2 * MIN_CHECK_STEPS`` steps is too short to re-time.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

#: The fine-tune re-times itself at these fractions of its step count (as it stands at each check) ...
CHECK_FRACTIONS = (0.1, 0.4, 0.7)
#: ... each after at least this many steps since the last (the first of each run of steps is left out of the pace).
MIN_CHECK_STEPS = 10
#: ``N'`` stays within ``[N / MAX_STRETCH, N * MAX_STRETCH]``.
MAX_STRETCH = 2.0
PACE_FILE = "pace.json"


def check_step(index: int, steps: int, done: int = 0) -> int | None:
    """The step of check ``index`` (0-based) of a fine-tune now planned at ``steps`` with ``done`` steps behind
    it: ``ceil(CHECK_FRACTIONS[index] * steps)``, at least :data:`MIN_CHECK_STEPS` after ``done`` (the pace needs
    steps); None when there is no such check or fewer than :data:`MIN_CHECK_STEPS` steps would follow it."""
    if index >= len(CHECK_FRACTIONS):
        return None
    k = max(math.ceil(CHECK_FRACTIONS[index] * steps), done + MIN_CHECK_STEPS)
    return k if k + MIN_CHECK_STEPS <= steps else None


def paced_steps(planned: int, allotted_s: float, done: int, spent_s: float, pace_s: float) -> int:
    """``N'`` of the module docstring: ``planned`` steps (``N``) allotted ``allotted_s`` seconds (``A``), of
    which ``done`` steps (``k``) took ``spent_s`` (``T_k``) at ``pace_s`` seconds a step (``p``)."""
    fits = done + math.floor(max(0.0, allotted_s - spent_s) / max(pace_s, 1e-9))
    return int(min(math.ceil(planned * MAX_STRETCH), max(done, math.ceil(planned / MAX_STRETCH), fits)))


def schedule(recipe, checks: list[dict[str, Any]]):
    """The recipe the steps after the last of ``checks`` run with: ``recipe`` with each check's step count,
    the learning rate kept continuous: past the warm-up, a check at step ``k`` that changes the count restarts
    the cosine at ``k`` from the rate step ``k`` had (``warmup_steps = k``, ``lr = lr_at(k, before)``), so it
    decays from there to ``min_lr`` at the new count; within the warm-up only the count changes (the cosine
    starts after it)."""
    from factory.training.loop import lr_at

    seg = recipe
    for check in checks:
        k, steps = int(check["step"]), int(check["steps"])
        if steps == seg.steps:
            continue
        if k <= seg.warmup_steps:
            seg = replace(seg, steps=steps)
        else:
            seg = replace(seg, steps=steps, warmup_steps=k, lr=lr_at(k, seg))
    return seg


class _PauseAt:
    """A ``should_stop`` for :func:`factory.training.train.train` that stops it before step ``step`` (and
    whenever ``inner`` -- Ctrl-C -- says so); it times every step on the way."""

    def __init__(self, step: int, first: int, inner: Callable[[], bool] | None) -> None:
        self.step, self.first, self.inner = step, first, inner
        self.polls: list[float] = []  # the time of each poll: a poll comes before every step
        self.fired = False

    def __call__(self) -> bool:
        if self.inner is not None and self.inner():
            return True
        self.polls.append(time.perf_counter())
        self.fired = self.first + len(self.polls) - 1 >= self.step
        return self.fired

    @property
    def wall_s(self) -> float:
        """Seconds of the steps this run did (its first included)."""
        return self.polls[-1] - self.polls[0] if len(self.polls) > 1 else 0.0

    @property
    def pace_s(self) -> float | None:
        """Mean seconds of this run's steps after its first; None when fewer than two were timed."""
        done = len(self.polls) - 1
        return (self.polls[-1] - self.polls[1]) / (done - 1) if done >= 3 else None


def train_paced(
    model,
    data,
    recipe,
    *,
    allotted_s: float | None,
    work: Path,
    resume: bool,
    log: Callable[[str], None],
    should_stop: Callable[[], bool] | None = None,
    **train_kwargs: Any,
):
    """Fine-tune ``model`` as :func:`factory.training.train.train` does with ``recipe``, paced to
    ``allotted_s`` seconds (module docstring; None: not paced, ``recipe.steps`` steps as ``train`` runs them).
    ``(result, recipe with the steps that ran, the pace record or None)``; ``train_kwargs`` (``val_data``,
    ``desc``, ...) go to every ``train`` call. The record (``pace.json`` in ``work``, rewritten at each check) is
    what a resumed fine-tune goes on with."""
    from factory.errors import Interrupted
    from factory.io import atomic_write_bytes
    from factory.training.checkpoints import checkpoint_step
    from factory.training.train import train

    work = Path(work)
    if allotted_s is None or check_step(0, recipe.steps) is None:  # no time budget, or too short to re-time
        run = train(model, data, recipe, out_dir=work, resume=resume, should_stop=should_stop, **train_kwargs)
        return run, recipe, None
    path, planned_pace = work / PACE_FILE, allotted_s / recipe.steps
    record = (_read(path) if resume else None) or {  # without an intact checkpoint, an old record is stale
        "planned_steps": recipe.steps,
        "allotted_s": round(allotted_s, 2),
        "checks": [],
    }
    allotted_s = float(record["allotted_s"])  # a resumed fine-tune keeps the time it was given
    first, wall = (checkpoint_step(work) if resume else 0), 0.0
    while True:
        seg = schedule(recipe, record["checks"])  # the steps and learning rates as they stand now
        k = check_step(len(record["checks"]), seg.steps, first)
        if k is None:
            break
        pause = _PauseAt(k, first, should_stop)
        try:
            train(model, data, seg, out_dir=work, resume=resume, should_stop=pause, **train_kwargs)
        except Interrupted:
            if not pause.fired:  # Ctrl-C
                raise
        last = record["checks"][-1] if record["checks"] else {"step": 0, "elapsed_s": 0.0, "pace_s": planned_pace}
        pace = pause.pace_s or float(last["pace_s"])
        done = len(pause.polls) - 1  # steps of this run; any between the last check and ``first`` at ``pace``
        elapsed = float(last["elapsed_s"]) + (k - int(last["step"]) - done) * pace + pause.wall_s
        steps = paced_steps(recipe.steps, allotted_s, k, elapsed, pace)
        check = {"step": k, "elapsed_s": round(elapsed, 3), "pace_s": round(pace, 6), "steps": steps}
        record["checks"].append(check)
        atomic_write_bytes(path, (json.dumps(record, indent=2) + "\n").encode())
        log(
            f"{train_kwargs.get('desc', 'finetune')}: paced to its {allotted_s:.0f}s: {k} steps in {elapsed:.1f}s, "
            f"lately {pace:.4f}s a step (planned {planned_pace:.4f}s): {steps} steps (planned {recipe.steps})"
        )
        first, resume, wall = k, True, wall + pause.wall_s
    seg = schedule(recipe, record["checks"])
    run = train(model, data, seg, out_dir=work, resume=resume, should_stop=should_stop, **train_kwargs)
    record["steps"] = seg.steps
    return replace(run, seconds=run.seconds + wall), replace(recipe, steps=seg.steps), record


def _read(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text())
        ok = isinstance(record, dict) and isinstance(record["checks"], list) and float(record["allotted_s"]) > 0
        return record if ok else None
    except (OSError, ValueError, KeyError, TypeError):
        return None
