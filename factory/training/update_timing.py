"""An optimizer update's time without holding the optimizer's state: what the expanding phase's timing steps use.

The dry run and the budget planner time the expanding phase on a learngene sampled for that alone
(:mod:`factory.training.step_estimate`, :func:`factory.training.expanding_loop.measure_step_seconds`). Those steps
update with :func:`stateless_optimizer` -- AdamW's two moment buffers are twice the trained tensors, held at the
steps' peak, and the time of a step does not depend on them -- and add :func:`adamw_extra_seconds`, AdamW's update
beyond SGD's, timed on its own on the same device.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def phase_optimizer(params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """The expanding phase's optimizer (:func:`factory.training.expanding_loop.train_learngene`'s default): AdamW
    without weight decay. :func:`adamw_extra_seconds` times this one, so the two cannot drift apart."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


def stateless_optimizer(params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """What a timing probe updates with: plain SGD, which holds no state (AdamW's two moment buffers are twice the
    trained tensors: 91 MB for a DeiT-Small learngene of 6 layers); :func:`adamw_extra_seconds` adds back
    the time AdamW's update takes beyond it."""
    return torch.optim.SGD(params, lr=lr)


def _update_seconds(make: Callable, numel: int, repeats: int, device: torch.device) -> float:
    # constant values: the update's work does not depend on them, and torch's global generator is left as it was
    param = torch.nn.Parameter(torch.full((numel,), 0.5, device=device))
    param.grad = torch.full((numel,), 1e-3, device=device)
    opt = make([param], 1e-3)
    times = []
    for _ in range(repeats + 1):  # the first (state allocation) left out
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def adamw_extra_seconds(
    numel: int, *, device: str | torch.device = "cpu", chunk: int = 1 << 22, repeats: int = 3
) -> float:
    """Seconds :func:`phase_optimizer`'s update of ``numel`` fp32 parameters on ``device`` (where
    the probe ran: its report's ``device``) takes beyond :func:`stateless_optimizer`'s: both timed on one tensor of
    at most ``chunk`` elements (16 MB, past a CPU's caches: the per-element rate of the whole) and scaled by
    ``numel / chunk``, medians of ``repeats`` updates; never negative. A learngene's few dozen tensors add
    microseconds of Python loop, not modelled."""
    n, where = max(1, min(numel, chunk)), torch.device(device)
    adamw = _update_seconds(phase_optimizer, n, repeats, where)
    sgd = _update_seconds(stateless_optimizer, n, repeats, where)
    return max(0.0, adamw - sgd) * numel / n
