"""``peg-factory build``: profiles -> searched, expanded, fine-tuned, measured, exported models.

For a fleet of profiles sharing one ancestry, learngene and data set:

1. decide "nothing to do" from fingerprints alone (:func:`factory.pipeline.manifest.build_key`),
   before torch, models or data are loaded;
2. search each profile's budgets (:func:`factory.pipeline.device_choice.search_devices`); ``--dry-run``
   stops here with the plan (:mod:`factory.pipeline.plan`);
3. the ``learngene`` stage, once for the fleet (:mod:`factory.pipeline.stages`);
4. with the accuracy objective, probe each device's candidates (``auto``, the default, resolves to
   it or to capacity by the initialisation: :func:`factory.pipeline.config.objective_for`);
5. one :class:`~factory.pipeline.shape_task.ShapeTask` per *distinct* chosen shape, run by the
   executor (threads here, or Ray): fine-tune once, then measure, export and assemble each device
   that chose it;
6. the manifest (:mod:`factory.pipeline.manifest`), the report and one model card per device.

Every stage's result is a sealed cache entry in ``OUT/.cache`` (:mod:`factory.pipeline.cache`): a
rerun reuses everything, a killed build resumes at the first unfinished stage and a killed
fine-tune from its last checkpoint. A profile that fails (nothing fits, an export error) is
recorded with its reason; the others finish. Multi-GPU fine-tuning of one model uses ``torchrun``
(:mod:`factory.training.train`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from factory.core.assets import ancestry_fingerprint
from factory.data import dataset_identity
from factory.device.profile import Profile
from factory.errors import FactoryError
from factory.io import claim, directory_lock
from factory.pipeline import manifest
from factory.pipeline.cache import Cache
from factory.pipeline.config import BuildConfig, expanding_config, learngene_steps, objective_for
from factory.pipeline.executor import LocalExecutor
from factory.pipeline.shape_task import DeviceTask, ShapeTask, ancestry_and_data, run_shape_task
from factory.pipeline.stages import BuildContext, make_learngene

#: The files a build writes straight into ``--out`` (besides its device folders and ``.cache``).
OUTPUT_FILES = ("manifest.json", "manifest.schema.json", "report.md", "report.html")
OUTPUT_NAMES = [*OUTPUT_FILES, "report_files/"]  # ... and the folder of the report's figures, replaced whole


def build(
    profiles: list[Profile],
    out: str | Path,
    cfg: BuildConfig = BuildConfig(),
    *,
    dry_run: bool = False,
    log: Callable[[str], None] = print,
    wait_lock: bool = False,
    executor=None,
) -> dict[str, Any]:
    """Run (or, with ``dry_run``, plan) the build; returns the manifest dict.

    ``executor`` runs the per-shape tasks (:mod:`factory.pipeline.executor`): ``None`` means
    ``LocalExecutor(cfg.jobs)``; a ``RayExecutor`` spreads them over a Ray cluster. It is not part of
    the build's identity: the manifest is the same whichever ran it.

    A build holds an exclusive lock on ``out`` (:func:`factory.io.directory_lock`): a second build
    into the same directory fails at once with a one-line error, or waits with ``wait_lock``.
    """
    claim(Path(out), OUTPUT_NAMES, writer="build", record=False)  # the user's files: refused before any work or lock
    if dry_run:  # (checked above as the build would: a dry run that passes is one the build can write)
        return _build(profiles, Path(out), cfg, dry_run=True, log=log)
    refuse_torchrun()
    executor = executor or LocalExecutor(cfg.jobs)
    with executor.session(log), directory_lock(out, wait=wait_lock, log=log):  # Ray is checked before --out is touched
        return _build(profiles, Path(out), cfg, dry_run=False, log=log, executor=executor)


def _data_key(previous: dict[str, Any], cfg: BuildConfig) -> str | None:
    """The data fingerprint now, at the input size/channels of the previous build's ancestry."""
    arch = previous.get("ancestry_arch") or {}
    try:
        return dataset_identity(cfg.data, arch.get("img_size", 28), arch.get("in_chans", 1))
    except FactoryError:
        return None


def _build(
    profiles: list[Profile], out: Path, cfg: BuildConfig, *, dry_run: bool, log: Callable[[str], None], executor=None
) -> dict[str, Any]:
    from factory.device.search import SearchSpace
    from factory.pipeline.device_choice import finetune_key, search_devices, shape_groups
    from factory.pipeline.joint_choice import choose_pairs, expanding_phase_check, joint_decision
    from factory.pipeline.learngene_stage import fit_expanding_batch, learngene_source
    from factory.pipeline.plan import plan
    from factory.pipeline.report import write_reports
    from factory.pipeline.view_choice import decide_hflip, mirror_part
    from factory.training.batches import fit_batch

    if not profiles:
        raise FactoryError("no profile given: pass at least one profile (or a fleet file)", param="profiles")
    names = [p.name for p in profiles]
    if len(set(names)) != len(names):
        raise FactoryError(f"profile names must be unique in a fleet, got {names}")
    t_start = time.perf_counter()
    fingerprint = ancestry_fingerprint(cfg.ancestry)  # hashed once per build: every shape task reuses it
    key = manifest.build_key(profiles, cfg, fingerprint)
    previous = manifest.previous(out, key)
    if (
        previous is not None
        and not dry_run
        and previous.get("data", {}).get("identity_key") == _data_key(previous, cfg)
    ):
        log(f"build is up to date ({key}): nothing to do")
        return previous

    anc, ds = ancestry_and_data(cfg, (fingerprint, None))  # the heavy imports (torch, timm) and loading start here
    identity = (fingerprint, ds.identity.removesuffix(":uint8-cache"))
    if cfg.expand_img_size is not None:  # refused before any search or measurement, not while allocating for it
        from factory.core.expanding_phase import check_distill_size

        check_distill_size(cfg.expand_img_size, anc.arch)
    if cfg.learngene is None:  # --gene-layers/--gene-heads refused before the transfer check and the dry run
        from factory.core.learngene import check_gene_size

        check_gene_size(cfg.gene_layers, cfg.gene_heads, anc.arch, params=("gene_layers", "gene_heads"))
    batch, note = fit_batch(cfg.batch_size, len(ds.train), split=f"the training split of {cfg.data}")
    if note:
        log(f"fine-tuning: {note}")
        cfg = dataclasses.replace(cfg, batch_size=batch)
    if ds.test_from != "test":
        log(f"data: test accuracy is measured on {ds.test_from}")
    for note in ds.notes:
        log(f"data: {note}")
    ctx = BuildContext(out, cfg, Cache(out / ".cache", log), log, anc, ds, dry_run=dry_run)
    if learngene_source(ctx).runs_expanding_phase:
        fit_expanding_batch(ctx)
    mirror = decide_hflip(ctx)  # --hflip auto: a number in the config before any recipe is planned or hashed
    cfg = ctx.cfg
    if cfg.init not in ("auto", "peg") and learngene_source(ctx).runs_expanding_phase:
        log(
            f"expanding phase: not run: --init {cfg.init} does not start from the learngene (it is sampled for the "
            "record, untrained)"
        )
        ctx.cfg = dataclasses.replace(cfg, expand_steps=0)
    elif cfg.init == "auto" and cfg.time_budget_s is None and learngene_source(ctx).runs_expanding_phase:
        steps = expanding_config(cfg).steps  # a budget plans the phase itself, this bar included (time_budget)
        counted = learngene_steps(cfg, anc)  # in steps of the full sandwich: --expand-largest-every counts less
        if 0 < counted < cfg.expand_min_steps:
            worth = f" (worth {counted} of the full sandwich)" if counted != steps else ""
            log(
                f"expanding phase: not run: --expand-steps {steps}{worth} is below --expand-min-steps "
                f"{cfg.expand_min_steps}: "
                "a learngene trained that little starts its descendants below weight selection, so --init auto "
                f"would not start from it (--init peg runs it; --expand-min-steps {counted} counts it as trained)"
            )
            ctx.cfg = dataclasses.replace(cfg, expand_steps=0)
    objective, why = objective_for(ctx.cfg, anc)
    log(f"objective: {objective} ({why})")
    space = SearchSpace.from_arch(anc.arch, num_classes=ds.num_classes)
    devices, results = search_devices(profiles, space, anc, cfg, objective, why, log)
    check = ctx.transfer_check = expanding_phase_check(ctx, devices)
    if check is not None:
        scores = ", ".join(f"{m} {v:.3f}" for m, v in check.scores.items())
        if check.transfers:
            log(f"expanding phase: the ancestry's features transfer at {check.shape} (k-NN {scores}); it will run")
        else:
            log(
                f"expanding phase: skipped: the ancestry's features do not transfer to this data at {check.shape} "
                f"(k-NN {scores}: {check.to_dict()['rule']}); it cannot pay here -- the build goes on with the best "
                "other start (--init peg forces it)"
            )
            ctx.cfg = dataclasses.replace(cfg, expand_steps=0)  # the learngene stays as sampled
            objective, why = objective_for(ctx.cfg, anc)
            devices, results = search_devices(profiles, space, anc, ctx.cfg, objective, why, None)
    clock = _Clock(t_start)
    budget: dict[str, Any] = {}
    if cfg.time_budget_s is not None:  # the steps that fit the budget (factory.pipeline.budget_costs)
        first = _plan(ctx, devices, profiles, key, clock, objective, probed=False, dry_run=dry_run)
        planned_objective, planned_why = objective_for(ctx.cfg, anc)
        if planned_objective != objective:  # no expanding phase planned: an untrained learngene
            objective, why = planned_objective, planned_why
            log(f"objective: {objective} ({why}); the budget is planned again with its probes")
            devices, results = search_devices(profiles, space, anc, ctx.cfg, objective, why, None)
            dropped = first.expand_why or True
            first = _plan(ctx, devices, profiles, key, clock, objective, probed=False, dry_run=dry_run, replan=dropped)
        budget["plans"] = {"first": first.to_dict()}
        # each device's probes compare shapes at the fine-tuning time the plan gives its shape (equal time per shape)
        ctx.time_shares = {label: first.time_share(label) for label in first.step_s}
    clock.mark("setup")
    if dry_run:
        budget_part = {"time_budget": {"budget_s": cfg.time_budget_s, **budget}} if budget else {}
        setup = clock.phases["setup"]  # measured: loading, the search, the check (a budget's planning)
        return {
            **plan(ctx, devices, profiles, objective, setup),
            **_check_part(check),
            **mirror_part(mirror),
            **budget_part,
        }

    lg_entry = make_learngene(ctx)
    ctx.expanding_data = None  # the phase's own images (when not --data) are not needed after it
    clock.mark("learngene")
    devices = choose_pairs(ctx, devices, results, objective, why)  # --init auto: the pair (shape, init)
    clock.mark("probes")
    second = None
    if cfg.time_budget_s is not None:  # the fine-tunes get what is left, as it was measured
        second = _plan(ctx, devices, profiles, key, clock, objective, probed=True)
        budget["plans"]["second"] = second.to_dict()
        clock.mark("planning")
    # the recipe that ran: a skipped expanding phase and a time budget's planned steps included
    head = {
        **manifest.head(ctx.cfg, anc, ctx.learngene, ds, lg_entry.key, names),
        **_check_part(check),
        **mirror_part(mirror),
    }
    head["learngene"]["seconds"] = lg_entry.info().get("seconds", 0.0)  # the stage's own time, whenever it ran
    tasks = []
    for (shape, init), group in shape_groups(devices, profiles).items():
        fine_tune = finetune_key(shape, init)  # a time budget's: its own steps, its share of the time (time_budget)
        tasks.append(
            ShapeTask(
                str(out.resolve()),
                dataclasses.replace(ctx.cfg, finetune_steps=second.steps_for(fine_tune)) if second else ctx.cfg,
                str((lg_entry.path / "learngene").resolve()),
                ctx.learngene.sha256,
                shape,
                tuple(DeviceTask(prof, device) for prof, device in group),
                head,
                identity,
                joint_decision(group[0][1]),
                second.finetune_s(fine_tune) if second else None,  # a budget's fine-tune keeps to its time (pacing)
            )
        )
    finished = {r.name: r for rs in executor.map(run_shape_task, tasks, log=log, failed=ShapeTask.failed) for r in rs}
    devices = [finished.get(d.name, d) for d in devices]
    clock.mark("shape_tasks")
    records = [d.to_manifest() for d in devices]
    if budget:
        head["time_budget"] = budget_record(cfg.time_budget_s, budget["plans"], clock, records, log)
    built = manifest.assemble(
        head,
        key=key,
        devices=records,
        executor=executor.describe(),
        seconds=time.perf_counter() - t_start,
    )
    claim(out, OUTPUT_NAMES, writer="build")  # checked again and recorded, then written
    write_reports(out, built)
    manifest.write(out, built)
    return built


class _Clock:
    """Wall time of the build's phases since ``start`` (``mark(name)`` closes the phase that ran since the last)."""

    def __init__(self, start: float) -> None:
        self.start = self.last = start
        self.phases: dict[str, float] = {}

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.phases[name] = round(self.phases.get(name, 0.0) + now - self.last, 2)
        self.last = now

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def _plan(
    ctx,
    devices,
    profiles,
    key,
    clock: _Clock,
    objective: str,
    *,
    probed: bool,
    dry_run: bool = False,
    replan: str | bool = False,
):
    """A time-budget plan (:func:`factory.pipeline.budget_costs.plan_time`), applied to ``ctx.cfg``; ``replan``:
    the first plan dropped the phase (why it did, when it said)."""
    from factory.pipeline.budget_costs import plan_time
    from factory.pipeline.learngene_stage import learngene_source

    expanding = not probed and learngene_source(ctx).runs_expanding_phase
    plan = plan_time(
        ctx,
        devices,
        profiles,
        key=key,
        elapsed_s=clock.elapsed,
        objective=objective,
        expanding=expanding,
        probed=probed,
        dry_run=dry_run,
        replan=replan,
    )
    steps = {"finetune_steps": plan.finetune_steps}
    if plan.expand_steps is not None:
        steps["expand_steps"] = plan.expand_steps
    ctx.cfg = dataclasses.replace(ctx.cfg, **steps)
    return plan


def budget_record(budget_s: float, plans, clock: _Clock, devices: list[dict[str, Any]], log) -> dict[str, Any]:
    """The manifest's ``time_budget``: the plans, and per phase and stage the seconds this run measured,
    with the build's time against its budget."""
    stages: dict[str, float] = {}
    seen: set[tuple[str, str]] = set()
    for d in devices:
        for stage, (key, seconds) in (d.get("stage_seconds") or {}).items():
            if (stage, key) not in seen:  # a shape's fine-tune and measure once, each device's export
                seen.add((stage, key))
                stages[stage] = round(stages.get(stage, 0.0) + seconds, 2)
    total = clock.elapsed
    log(
        f"time budget: {total:.0f}s of {budget_s:.0f}s ({total / budget_s:.2f}x); "
        + ", ".join(f"{k} {v:.0f}s" for k, v in {**clock.phases, **stages}.items())
    )
    return {
        "budget_s": budget_s,
        "plans": plans,
        "measured_s": {"phases": dict(clock.phases), "stages": stages},
        "seconds": round(total, 2),
        "ratio": round(total / budget_s, 3),
    }


def _check_part(check) -> dict[str, Any]:
    """The manifest's (and dry run's) record of the expanding-phase check: ``{}`` when none was made."""
    if check is None:
        return {}
    return {"expanding_phase_check": {**check.to_dict(), "skipped_phase": not check.transfers}}


#: What torchrun sets: a build seeing them would wait for process-group peers that never come.
TORCHRUN_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def refuse_torchrun() -> None:
    """A build is not a torchrun job: it runs its fine-tunes in this process (or as Ray tasks). Inside a
    torchrun environment of several processes -- or with its variables left malformed -- it refuses in one
    line naming them, instead of hanging in a process group (``peg-factory train`` runs under torchrun)."""
    import os

    from factory.training.distributed import dist_info

    _, world = dist_info()  # malformed variables: one line
    if world > 1:
        found = ", ".join(f"{v}={os.environ[v]}" for v in TORCHRUN_VARIABLES if v in os.environ)
        raise FactoryError(
            f"build does not run under torchrun ({found}): it fine-tunes each shape in this process or on Ray "
            "(--executor ray); unset those variables, or run `peg-factory train` under torchrun for one model on "
            "many processes"
        )
