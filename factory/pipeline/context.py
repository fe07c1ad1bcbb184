"""What the stages of one build share (:class:`BuildContext`) and the items the shape- and device-scoped
stages run on; the stage table itself is :data:`factory.pipeline.stages.STAGES`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from factory.core.learngene import Learngene
from factory.core.shapes import DescendantShape
from factory.pipeline.cache import Cache
from factory.pipeline.config import BuildConfig


@dataclass
class BuildContext:
    """What the stages of one build share: where, with what settings, and what is loaded."""

    out: Path
    cfg: BuildConfig
    cache: Cache
    log: Callable[[str], None]
    ancestry: Any  # factory.core.ancestry.Ancestry
    data: Any  # factory.data.Dataset
    learngene: Learngene | None = None  # set once the learngene stage has run
    should_stop: Callable[[], bool] | None = None  # polled by fine-tunes between steps (Ctrl-C)
    inits: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # shape label -> --init auto's decision
    transfer_check: Any = None  # the expanding-phase check (factory.core.transfer.TransferCheck), when one ran
    # the plan's measurements on this host, made once per context: (shape label, batch) -> seconds per fine-tune
    # step; shape label -> seconds of the measure stage's reference round (factory.pipeline.finetune_facts)
    step_times: dict[tuple[str, int], float] = dataclasses.field(default_factory=dict)
    round_times: dict[str, float] = dataclasses.field(default_factory=dict)
    # (sampling, first step, each further step) seconds of the learngene's expanding phase, measured once per context
    # (factory.pipeline.learngene_stage.expanding_costs): a budget's first plan and the dry run's estimate share it
    expanding_times: tuple[float, float, float] | None = None
    # shape label -> the seconds a time budget's second plan allotted its fine-tune (factory.pipeline.pacing)
    finetune_s: dict[str, float] = dataclasses.field(default_factory=dict)
    # capacity-choice shape label -> a time budget's first plan's fine-tuning time for it over N of its steps
    # (BudgetPlan.time_share): the accuracy probes of its device compare shapes at that time (factory.device.accuracy)
    time_shares: dict[str, float] = dataclasses.field(default_factory=dict)
    # a dry run: its measured steps hold at most micro_batch.DRY_RUN_CPU_MEMORY_MB of activations on the CPU
    # (:func:`measured_memory_mb`), so planning costs less memory than the build it plans
    dry_run: bool = False
    # (spec, dataset) the expanding phase distils on where it is not ``data``, loaded once per context
    # (factory.pipeline.learngene_stage.expanding_dataset: the batch check and the phase share it)
    expanding_data: tuple[str, Any] | None = None


@dataclass(frozen=True)
class ModelItem:
    """A fine-tuned model: the measure stage's item."""

    shape: DescendantShape
    path: Path


@dataclass(frozen=True)
class ExportItem:
    """A model exported for one device: the export stage's item."""

    name: str
    profile: Any  # factory.device.profile.Profile
    profile_sha256: str
    model: Path
    facts: Mapping[str, int] | None = None  # the measure stage's FLOPs and params (not recounted by export)
    shape: DescendantShape | None = None  # the model's shape, for the dry run's estimate (not part of the key)


def measured_memory_mb(ctx: BuildContext, memory_mb: float | None, device: str) -> float | None:
    """The activation budget of the plan's measured steps: the build's ``memory_mb``, and in a dry run on the CPU
    at most :data:`factory.training.micro_batch.DRY_RUN_CPU_MEMORY_MB`: its estimates of the build's larger micro-batches are
    then high (~12% for a 224-px expanding step on the build VM, bench/RESULTS.md). A budgeted dry run plans with them."""
    from factory.training.micro_batch import dry_run_memory_mb
    from factory.training.precision import pick_device

    return dry_run_memory_mb(memory_mb, pick_device(device).type) if ctx.dry_run else memory_mb
