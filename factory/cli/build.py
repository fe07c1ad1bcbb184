"""``peg-factory build``: the whole pipeline for one device profile or a fleet.

Each option that sets a :class:`~factory.pipeline.config.BuildConfig` field is declared with that
field's name, so the config is made from the options by name, not copied by hand.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click

from factory.cli.common import (
    AUTO_OR_MB,
    BATCH,
    COUNT,
    DURATION,
    POSITIVE_STEPS,
    RATE,
    SIZE,
    STEPS,
    UserError,
    amp_option,
    ancestry_option,
    data_option,
    init_option,
    objective_option,
    out_option,
    refuse_without,
    seed_option,
    view_options,
)
from factory.pipeline.config import INIT_CHOICES, KEEP_WEIGHTS, BuildConfig
from factory.pipeline.executor import EXECUTORS
from factory.pipeline.time_budget import SPLITS

CONFIG_FIELDS = {f.name for f in dataclasses.fields(BuildConfig)}


@click.command("build")
@click.option("--profile", "profile_specs", multiple=True, help="Profile YAML or shipped name (repeatable).")
@click.option(
    "--fleet",
    type=click.Path(path_type=Path),
    default=None,
    help="Fleet file: 'profiles: [a.yaml, b.yaml]', or a shipped fleet's name (demo/fleet, demo/fleet_all).",
)
@out_option("Build directory (manifest, report, one folder per device, the cache).", default=Path("out/build"))
@ancestry_option()
@data_option("digits")
@init_option(
    help="How descendants are initialised. auto: per chosen shape, the candidate (PEG expansion of the learngene, "
    "weight selection, TLEG, scratch) whose untrained features separate the task's classes best by a k-NN "
    "probe (scratch only by a margin); or one of them always.",
    choices=INIT_CHOICES,
)
@click.option(
    "--joint-choice/--no-joint-choice",
    default=True,
    show_default=True,
    help="With --init auto: choose (shape, initialisation) together -- search the shape again for a start other "
    "than PEG's descendant, skip an expanding phase where the ancestry does not transfer; off: decide the "
    "initialisation at the shape searched for PEG.",
)
@click.option("--gene-layers", type=COUNT, default=None, help="Learngene layers [default: half the ancestry's].")
@click.option(
    "--expand-steps",
    type=STEPS,
    default=None,
    help="Expanding-phase steps for the learngene [default: 1500; 0 = untrained, sampled only].",
)
@click.option(
    "--expand-min-steps",
    type=STEPS,
    default=BuildConfig.expand_min_steps,
    show_default=True,
    help="Expanding-phase steps from which a learngene counts as trained: one trained less starts its descendants "
    "below weight selection, so --init/--objective auto treat it as untrained, and a --time-budget whose share "
    "buys fewer runs no phase.",
)
@click.option(
    "--expand-head-start",
    type=STEPS,
    default=BuildConfig.expand_head_start,
    show_default=True,
    help="With --time-budget and --init auto: the fine-tuning steps a learngene of the recipe's 1500 phase steps "
    "saves its descendants (measured: bench/phase_payoff.py); the phase runs only where that repays the "
    "fine-tuning steps its time costs every shape.",
)
@click.option(
    "--expand-data",
    default=None,
    help="Images for the expanding phase [default: the ancestry's own (mnist for the demo), else --data].",
)
@click.option("--expand-batch-size", type=BATCH, default=None, help="Images per expanding-phase step [default: 64].")
@click.option(
    "--expand-img-size",
    type=SIZE,
    default=None,
    help="Distil at this input size (a multiple of the patch size), position embeddings resampled "
    "[default: the ancestry's]; 112 for a 224-px ancestry is ~4x faster per step.",
)
@click.option(
    "--expand-largest-every",
    type=click.IntRange(0, 1 << 20),
    default=None,
    help="Train the sandwich's largest shape every K-th expanding-phase step [default: 1, every step]; 0: only "
    "when drawn. K=3 does 1.78x fewer FLOPs a step, but needs about as many more steps for the same learngene "
    "(bench/RESULTS.md, equal phase time); --expand-min-steps counts such a phase in steps of K=1.",
)
@click.option(
    "--learngene",
    default=None,
    help="A learngene directory to use as it is (e.g. from `peg-factory learngene train`): no sampling, no "
    "expanding phase; it must come from --ancestry.",
)
@click.option(
    "--steps",
    "finetune_steps",
    type=POSITIVE_STEPS,
    default=100,
    show_default=True,
    help="Fine-tuning steps per model.",
)
@click.option("--batch-size", type=BATCH, default=32, show_default=True, help="Fine-tuning images per step.")
@click.option(
    "--time-budget",
    "time_budget_s",
    type=DURATION,
    default=None,
    help="Fit the build in this wall-clock time on this machine (90s, 45m, 1.5h, 1h 30m): the fine-tuning steps (--steps is "
    "then planned) and an expanding phase that must run (at most --expand-steps) are set from measured step times.",
)
@click.option(
    "--budget-split",
    type=click.Choice(SPLITS),
    default=BuildConfig.budget_split,
    show_default=True,
    help="With --time-budget: share the fleet's fine-tuning time between its shapes as equal seconds each (time: a "
    "fast shape trains more steps) or equal steps (steps: a slow shape gets more of the time).",
)
@click.option(
    "--keep-weights",
    type=click.Choice(KEEP_WEIGHTS),
    default=BuildConfig.keep_weights,
    show_default=True,
    help="The fine-tuned weights a device ships: those of the evaluation with the best validation accuracy "
    "(best-val: the validation split is read up to 10 times, at most a tenth of the training's work; only where the "
    "data has its own test split) "
    "or the last step's (last).",
)
@click.option("--lr", type=RATE, default=1e-3, show_default=True, help="Fine-tuning learning rate (AdamW, cosine).")
@view_options(auto=True)
@seed_option(help="Seed of the search, the probes and the fine-tunes.")
@click.option("--jobs", type=COUNT, default=1, show_default=True, help="Models fine-tuned in parallel on this machine.")
@click.option(
    "--executor",
    "executor_kind",
    type=click.Choice(EXECUTORS),
    default="local",
    show_default=True,
    help="local: --jobs threads here; ray: one Ray task per distinct shape (pip install 'peg-factory[ray]').",
)
@click.option(
    "--ray-address", default=None, help="Ray cluster to join ('auto', ray://HOST:10001) [default: start a local one]."
)
@click.option(
    "--task-cpus", type=click.FloatRange(0.01, 1024), default=1.0, show_default=True, help="CPUs per Ray task."
)
@click.option(
    "--task-gpus",
    type=click.FloatRange(0, 64),
    default=0.0,
    show_default=True,
    help="GPUs per Ray task (fractions share a GPU).",
)
@click.option("--device", default="auto", show_default=True, help="Where fine-tunes run: auto, cpu, cuda or cuda:N.")
@amp_option()
@click.option(
    "--data-cache-mb",
    type=click.IntRange(0, 1 << 24),
    default=0,
    show_default=True,
    help="For an ImageFolder: decode the training images once into a uint8 cache (shorter side resized and centre "
    "cropped to img_size/0.875) when they fit in this many MiB; 0 streams them from disk every step.",
)
@click.option(
    "--train-memory-mb",
    type=AUTO_OR_MB,
    default="auto",
    show_default=True,
    help="MB of saved activations one forward/backward may hold (expanding phase and fine-tunes): larger batches run "
    "in micro-batches that fit, gradients accumulated (the same update); 0: the whole batch at once; auto: 512 on "
    "the CPU, half the GPU's free memory on CUDA.",
)
@objective_option()
@click.option(
    "--share-within",
    type=click.FloatRange(0, 100),
    default=BuildConfig.share_within,
    show_default=True,
    help="In a fleet: a device takes a shape another device chose (one fine-tune for both; under --time-budget "
    "each fine-tune then gets more time) where its probe's validation NLL is within this many paired standard "
    "errors of the device's own best; 0: each device its own best.",
)
@click.option("--dry-run", is_flag=True, help="Print the plan (shapes, cached stages, time estimates) and stop.")
@click.option("--wait-lock", is_flag=True, help="If another build is using --out, wait for it instead of failing.")
def build_cmd(
    profile_specs, fleet, out, executor_kind, ray_address, task_cpus, task_gpus, dry_run, wait_lock, **settings
) -> None:
    """Build deployable models for one or many device profiles (search, expand, fine-tune, measure, export).

    \b
    Example:
      peg-factory build --profile profiles/jetson_orin.yaml
      peg-factory build --fleet profiles/demo/fleet.yaml --out out/fleet --jobs 2
      peg-factory build --fleet fleet.yaml --out /shared/fleet --executor ray --ray-address auto --task-gpus 1
      peg-factory build --profile demo/jetson_orin --profile demo/raspberry_pi5 --dry-run
    """
    from factory.device.profile import load_profile
    from factory.pipeline.build import build
    from factory.pipeline.executor import make_executor
    from factory.pipeline.fleet import load_fleet

    assert set(settings) <= CONFIG_FIELDS, set(settings) - CONFIG_FIELDS  # every other option is a BuildConfig field
    if executor_kind == "local" and (ray_address or task_gpus):
        raise UserError("--ray-address and --task-gpus need --executor ray")
    refuse_without("--executor ray", executor_kind == "ray", ["task_cpus"])
    refuse_without("--init auto", settings["init"] == "auto", ["joint_choice"])
    made_here = ["gene_layers", "expand_steps", "expand_data", "expand_batch_size", "expand_img_size"]
    refuse_without(
        "a learngene the build makes", settings["learngene"] is None, made_here, instead="leave out --learngene"
    )
    refuse_without("--time-budget", settings["time_budget_s"] is not None, ["budget_split", "expand_head_start"])
    executor = make_executor(
        executor_kind, jobs=settings["jobs"], address=ray_address, task_cpus=task_cpus, task_gpus=task_gpus
    )
    specs = list(profile_specs) + (load_fleet(fleet) if fleet else [])
    if not specs:
        raise UserError("no profile: pass --profile profiles/jetson_orin.yaml (repeatable) or --fleet FILE")
    profiles = [load_profile(s) for s in specs]
    manifest = build(
        profiles, out, BuildConfig(**settings), dry_run=dry_run, log=click.echo, wait_lock=wait_lock, executor=executor
    )
    if dry_run:  # a plan in which a device cannot be built fails as the build would (a script's `--dry-run && ...`)
        failed = [d for d in manifest["devices"] if d.get("error") is not None]
        if failed:
            raise UserError(
                f"{len(failed)} of {len(manifest['devices'])} profiles would fail: "
                + "; ".join(f"{d['name']}: {d['error']}" for d in failed)
            )
        return
    failed = [d for d in manifest["devices"] if d["status"] != "ok"]
    for d in manifest["devices"]:
        if d["status"] == "ok":
            click.echo(
                f"{d['name']}: {d['shape']['depth']}x{d['shape']['embed_dim']} test acc {d['accuracy']['test']:.4f}, "
                f"predicted {d['latency_ms']['predicted_target']:.4f} ms -> {out / d['name']}"
            )
    click.echo(f"manifest {out / 'manifest.json'}, report {out / 'report.html'} ({manifest['seconds']} s)")
    if failed:
        raise UserError(
            f"{len(failed)} of {len(manifest['devices'])} profiles failed: "
            + "; ".join(f"{d['name']}: {d['error']}" for d in failed)
        )
