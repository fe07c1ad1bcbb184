"""The ``peg-factory`` command line: parse, call the Python API, print.

User mistakes (:class:`~factory.errors.FactoryError`) become a one-line ``Error: ...`` on stderr
and exit code 2, like click's own usage errors. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import click

from factory.errors import FactoryError


class UserError(click.ClickException):
    exit_code = 2


# Bounded option types: an absurd value is a usage error (exit 2) here, never an overflow deep in torch.
SEED = click.IntRange(0, 2**32 - 1)
STEPS = click.IntRange(0, 100_000_000)
POSITIVE_STEPS = click.IntRange(1, 100_000_000)
BATCH = click.IntRange(1, 1 << 16)
COUNT = click.IntRange(1, 4096)  # layers, heads, depth, jobs
SIZE = click.IntRange(1, 1 << 16)  # widths, image and patch sizes, classes
RATE = click.FloatRange(0, 10, min_open=True)  # learning rates (NaN is refused by the configs)


# Out of space, over quota, file too large (RLIMIT_FSIZE), read-only file system: the user's to fix, not a bug.
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})


class FactoryGroup(click.Group):
    """A click group that maps :class:`FactoryError` to exit code 2 for every subcommand."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except FactoryError as exc:
            raise UserError(str(exc)) from exc
        except OSError as exc:
            if exc.errno not in DISK_ERRNOS:
                raise
            where = f" writing {exc.filename}" if exc.filename else ""
            raise UserError(f"{exc.strerror or os.strerror(exc.errno)}{where}; free space (or raise the quota/file-size limit) "
                            "and rerun: finished stages are kept, nothing half-written is") from exc
        except KeyboardInterrupt:
            click.echo("Interrupted: stopped cleanly; finished stages and fine-tuning checkpoints are kept, rerun the same "
                       "command to resume", err=True)
            ctx.exit(130)


def _echo_json(data) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True))


@click.group(cls=FactoryGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="peg-factory")
def cli() -> None:
    """peg-factory: condense a ViT into a PEG learngene and expand it into device-sized ViTs.

    \b
    Example:
      peg-factory learngene --ancestry demo --layers 3 --out out/learngene
      peg-factory expand --learngene out/learngene --depth 4 --embed-dim 96 --heads 2 --out out/d4.safetensors
      peg-factory flops --model out/d4.safetensors
    """


@cli.group(cls=FactoryGroup, invoke_without_command=True)
@click.option("--ancestry", default="demo", show_default=True,
              help="'demo', a timm name (pretrained), 'random:NAME', or CKPT@ARCH.")
@click.option("--layers", type=COUNT, default=None, help="Gene layers L_b [default: half the ancestry's depth].")
@click.option("--heads", type=COUNT, default=None, help="Gene heads H_b [default: the ancestry's].")
@click.option("--tau", type=click.FloatRange(0, 1e6, min_open=True), default=1.0, show_default=True, help="Softmax temperature of the mixture.")
@click.option("--mixing", type=click.Choice(["softmax", "uniform", "identity"]), default="softmax", show_default=True)
@click.option("--head-mixing/--no-head-mixing", default=True, show_default=True,
              help="Mix heads within a gene layer (off: keep evenly spaced heads).")
@click.option("--rescale", type=click.Choice(["std", "none"]), default="std", show_default=True,
              help="Variance-preserving rescale of mixed tensors to the ancestry layers' spread.")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Learngene directory to write.")
@click.pass_context
def learngene(ctx, ancestry, layers, heads, tau, mixing, head_mixing, rescale, seed, out) -> None:
    """Sample a PEG learngene from an ancestry ViT and save it to --out.

    \b
    Example:
      peg-factory learngene --ancestry demo --layers 3 --heads 3 --seed 0 --out out/learngene
      peg-factory learngene --ancestry ckpt.pth@deit_small_patch16_224 --layers 6 --out lg/
    """
    if ctx.invoked_subcommand is not None:
        return
    if out is None:
        raise UserError("missing --out DIR: where to write the learngene")
    from factory.core.ancestry import load_ancestry
    from factory.core.learngene import sample_learngene

    anc = load_ancestry(ancestry)
    lg = sample_learngene(anc, max(1, anc.arch.depth // 2) if layers is None else layers, heads, tau=tau, seed=seed,
                          mixing=mixing, head_mixing=head_mixing, rescale=rescale)
    digest = lg.save(out)
    summary = lg.meta["stats"]["summary"]
    click.echo(
        f"learngene {out}: {lg.num_layers} layers x {lg.num_heads} heads from {anc.spec} "
        f"({anc.arch.depth} layers, {anc.arch.num_heads} heads, weights={anc.weights}); "
        f"sha256 {digest[:12]}; weight std ratio {summary['mean_std_ratio']:.3f}, "
        f"relative W1 {summary['mean_w1_rel']:.3f}"
    )


def _int_list(text: str | None, flag: str) -> list[int] | None:
    try:
        return [int(v) for v in text.split(",")] if text else None
    except ValueError as exc:
        raise UserError(f"{flag} must be comma-separated integers, got {text!r}") from exc


@learngene.command("train")
@click.option("--learngene", "learngene_dir", type=click.Path(path_type=Path), required=True, help="Sampled learngene directory.")
@click.option("--ancestry", default=None, help="Teacher ancestry spec [default: the one named in the learngene].")
@click.option("--data", default="mnist", show_default=True,
              help="Images to distil on (labels unused): the ancestry's own data where you have it, else the target's.")
@click.option("--depths", default=None, help="Comma-separated descendant depths [default: 1 .. 2 x ancestry depth].")
@click.option("--widths", default=None, help="Comma-separated descendant widths [default: ancestry width, 3/4 and 1/2 of it].")
@click.option("--steps", type=STEPS, default=1500, show_default=True)
@click.option("--batch-size", type=BATCH, default=64, show_default=True)
@click.option("--lr", type=RATE, default=1e-3, show_default=True)
@click.option("--extra-hidden", type=click.IntRange(0, 1 << 16), default=0, show_default=True, help="Extra ReLU units per depth map.")
@click.option("--vary-shapes", is_flag=True, help="Also sandwich over head counts and MLP ratios 1-4 per width.")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--work-dir", type=click.Path(path_type=Path), default=None,
              help="Checkpoints and loss log [default: OUT.partial]; a rerun resumes from it.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Trained learngene directory to write.")
def learngene_train(learngene_dir, ancestry, data, depths, widths, steps, batch_size, lr, extra_hidden, vary_shapes, seed, work_dir,
                    out) -> None:
    """The learngene expanding phase: distil the ancestry into every expansion at once.

    Resumable: checkpoints go to --work-dir (default OUT.partial) and a rerun of the same
    command continues from the last one; the work dir is removed when OUT is written.

    \b
    Example:
      peg-factory learngene train --learngene out/learngene --data mnist --steps 600 --out out/learngene-trained
    """
    import shutil

    from factory.core.ancestry import load_ancestry
    from factory.pipeline.artifacts import ensure_parent
    from factory.training.data import load_dataset
    from factory.core.expanding import ExpandingConfig, default_shapes, train_learngene
    from factory.core.learngene import Learngene
    from factory.training.train import resume_or_restart

    lg = Learngene.load(learngene_dir)
    spec = ancestry or lg.meta.get("ancestry", {}).get("spec")
    if not spec or spec.startswith("module:"):
        raise UserError("the learngene does not name a loadable ancestry; pass --ancestry SPEC")
    anc = load_ancestry(spec)
    if anc.sha256 != lg.meta.get("ancestry", {}).get("sha256"):
        raise UserError(f"ancestry {spec!r} is not the one this learngene was sampled from (hash differs); pass the right --ancestry")
    shapes = default_shapes(lg, _int_list(depths, "--depths"), _int_list(widths, "--widths"), vary=vary_shapes)
    cfg = ExpandingConfig(steps=steps, batch_size=batch_size, lr=lr, extra_hidden=extra_hidden, seed=seed)
    ensure_parent(out)
    work = work_dir or out.with_name(out.name + ".partial")
    resume = resume_or_restart(work, "the expanding phase", click.echo)
    ds = load_dataset(data, img_size=anc.arch.img_size, in_chans=anc.arch.in_chans)
    own = anc.arch.shape()  # zero-shot is reported at the ancestry's width, heads and ratio, at every depth
    eval_shapes = [s for s in shapes if (s.embed_dim, s.num_heads, s.mlp_ratio) == (own.embed_dim, own.num_heads, own.mlp_ratio)]
    trained, report = train_learngene(lg, anc, ds.train, shapes, cfg, eval_data=ds.val.subset(0, 2000),
                                      eval_shapes=eval_shapes or shapes[-1:], out_dir=work, resume=resume)
    trained.meta["expanding_phase"]["data"] = ds.identity
    log_file = work / "metrics.jsonl"
    trained.save(out, {"expanding_log.jsonl": log_file.read_bytes()} if log_file.is_file() else None)
    shutil.rmtree(work, ignore_errors=True)
    if report["loss_first"] is not None:
        click.echo(f"learngene {out}: distillation loss {report['loss_first']:.4f} -> {report['loss_last']:.4f} in {report['seconds']}s")
    for label, before in report.get("zero_shot_before", {}).items():
        click.echo(f"  {label}: zero-shot accuracy {before:.4f} -> {report['zero_shot_after'][label]:.4f}")


@cli.group(cls=FactoryGroup)
def ancestry() -> None:
    """The demo ancestry (real users bring timm names or checkpoints)."""


@ancestry.command("train")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Weights file [default: the user cache, where `demo` looks first].")
@click.option("--steps", type=POSITIVE_STEPS, default=None, help="Override the recipe's step count.")
@click.option("--seed", type=SEED, default=None, help="Override the recipe's seed.")
@click.option("--fp32", is_flag=True, help="Store fp32 weights (default fp16, ~5 MB).")
def ancestry_train(out, steps, seed, fp32) -> None:
    """Train the demo ancestry on MNIST (about 5 minutes on 2 CPU cores).

    \b
    Example:
      peg-factory ancestry train
      peg-factory ancestry train --out factory/assets/demo_ancestry.safetensors
    """
    from factory.pipeline.demo import train_demo_ancestry

    overrides = {k: v for k, v in (("steps", steps), ("seed", seed)) if v is not None}
    log = train_demo_ancestry(out, recipe=overrides, half=not fp32)
    click.echo(f"demo ancestry: test accuracy {log['test_accuracy']:.4f} after {log['recipe']['steps']} steps "
               f"({log['train_seconds']}s)")


@cli.command("train")
@click.option("--model", "model_path", type=click.Path(path_type=Path), required=True, help="Descendant .safetensors to fine-tune.")
@click.option("--data", default="digits", show_default=True, help="mnist, digits, synthetic or an ImageFolder directory.")
@click.option("--steps", type=STEPS, default=200, show_default=True)
@click.option("--batch-size", type=BATCH, default=64, show_default=True)
@click.option("--lr", type=RATE, default=1e-3, show_default=True)
@click.option("--warmup-steps", type=STEPS, default=20, show_default=True)
@click.option("--distill-from", default=None, help="Teacher ancestry spec for knowledge distillation.")
@click.option("--distill-alpha", type=click.FloatRange(0, 1), default=0.5, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--amp", type=click.Choice(["auto", "bf16", "fp16", "off"]), default="auto", show_default=True)
@click.option("--ckpt-every", type=STEPS, default=50, show_default=True)
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--resume", is_flag=True, help="Continue from OUT/checkpoint.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Run directory.")
def train_cmd(model_path, data, steps, batch_size, lr, warmup_steps, distill_from, distill_alpha, device, amp,
              ckpt_every, seed, resume, out) -> None:
    """Fine-tune a descendant (CPU, or GPU with AMP; multi-GPU under torchrun).

    \b
    Example:
      peg-factory train --model out/descendant.safetensors --data digits --steps 200 --out runs/d9
      torchrun --nproc_per_node 4 -m factory.cli train --model d.safetensors --data ./imagenet --out runs/x
    """
    from factory.core.ancestry import load_ancestry
    from factory.core.checkpoint import save_descendant
    from factory.training.data import load_dataset
    from factory.training.train import TrainConfig, evaluate, train

    anc = load_ancestry(model_path)
    ds = load_dataset(data, img_size=anc.arch.img_size, in_chans=anc.arch.in_chans)
    model, arch = anc.model, anc.arch
    if ds.num_classes != arch.num_classes:
        import dataclasses

        from factory.core.expand import model_from_state

        shape = dataclasses.replace(arch.shape(), num_classes=ds.num_classes)  # new classifier
        state = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
        model, arch = model_from_state(arch, shape, state, seed=seed), arch.with_shape(shape)
    teacher = load_ancestry(distill_from).model if distill_from else None
    cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps, device=device, amp=amp,
                      seed=seed, ckpt_every=ckpt_every, distill_alpha=distill_alpha if teacher is not None else 0.0)
    result = train(model, ds.train, cfg, val_data=ds.val, teacher=teacher, out_dir=out, resume=resume)
    model = model.cpu()
    test_acc = evaluate(model, ds.test)
    save_descendant(model, arch, out / "model.safetensors",
                    {"finetuned_from": str(model_path), "data": ds.identity, "steps": steps, "seed": seed})
    click.echo(f"trained {out}: val accuracy {result.val_accuracy:.4f}, test accuracy {test_acc:.4f}, {result.seconds:.0f}s")


@cli.group(cls=FactoryGroup)
def profiles() -> None:
    """Shipped device profiles."""


@profiles.command("list")
def profiles_list() -> None:
    """List the shipped profiles.

    \b
    Example:
      peg-factory profiles list
    """
    from factory.device.profile import list_profiles, load_profile

    for name in list_profiles():
        p = load_profile(name)
        budgets = ", ".join(f"{k}={v:g}" for k, v in p.budgets.items())
        click.echo(f"{name:18s} {p.hardware.kind:4s} {p.hardware.runtime:12s} {p.precision:5s} batch {p.batch:<3d} {budgets}")


@profiles.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def profiles_show(name, as_json) -> None:
    """Show one profile (a shipped name or a YAML path), validated.

    \b
    Example:
      peg-factory profiles show jetson_orin
    """
    import yaml

    from factory.device.profile import load_profile

    data = load_profile(name).model_dump(exclude_none=True)
    click.echo(json.dumps(data, indent=2) if as_json else yaml.safe_dump(data, sort_keys=False).rstrip())


@profiles.command("measure")
@click.option("--runtime", type=click.Choice(["onnxruntime"]), default="onnxruntime", show_default=True,
              help="Runtime whose kernels are measured (onnxruntime on this CPU).")
@click.option("--ancestry", default="demo", show_default=True, help="Ancestry whose search space the tables span.")
@click.option("--batch", "batches", type=BATCH, multiple=True, help="Batch sizes to span [default: 1 and 8].")
@click.option("--img-size", "img_sizes", type=SIZE, multiple=True, help="Input sizes to span [default: the search space's].")
@click.option("--points", type=click.IntRange(3, 12), default=6, show_default=True, help="Grid points per table axis.")
@click.option("--fit", "fit_models", type=click.IntRange(3, 100), default=10, show_default=True,
              help="Whole models measured to fit the scale and overhead terms.")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--stat", type=click.Choice(["median", "min"]), default="median", show_default=True,
              help="Statistic of each timing's runs: median (a dedicated machine's typical run) or min (the "
                   "least-disturbed run, steadier on a shared host); the tables predict that statistic.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Tables file [default: this host's, which profiles with 'latency_tables: host' use].")
def profiles_measure(runtime, ancestry, batches, img_sizes, points, fit_models, seed, stat, out) -> None:
    """Measure this machine's kernel latency tables (the kernel-level latency predictor).

    Each kernel of a ViT block as onnxruntime runs it (MatMul+bias, MatMul+BiasGelu, attention,
    LayerNorm, Add, patch stem) is timed on a grid spanning the ancestry's search space; a few
    whole models fit the scale and overhead terms (factory/kernels.py). Takes a few minutes; the
    result is cached per host, onnxruntime version and ancestry architecture.

    \b
    Example:
      peg-factory profiles measure
      peg-factory search --profile host      # host.yaml has latency_tables: host
    """
    from factory.core.ancestry import load_ancestry
    from factory.device.kernels import Grids, host_tables_path, measure_tables, spread_shapes
    from factory.pipeline.artifacts import ensure_parent
    from factory.device.search import SearchSpace

    arch = load_ancestry(ancestry).arch
    path = out or host_tables_path(arch)
    ensure_parent(path)  # an unwritable --out fails now, not after minutes of measuring
    batches = tuple(batches) or (1, 8)
    space = SearchSpace.from_arch(arch, img_sizes=tuple(img_sizes) or None)
    grids = Grids.for_space(space, arch, batches, points)
    tables = measure_tables(arch, grids, fit_shapes=spread_shapes(space, fit_models, batches, seed), log=click.echo,
                            stat=stat)
    tables.save(path)
    click.echo(f"latency tables {path}: {tables.points} kernel points + {fit_models} whole models in {tables.seconds:.0f}s "
               f"({tables.describe_terms()})")


@profiles.command("schema")
def profiles_schema() -> None:
    """Print the profile JSON schema (the file profiles/profile.schema.json).

    \b
    Example:
      peg-factory profiles schema > profiles/profile.schema.json
    """
    from factory.device.profile import profile_json_schema

    _echo_json(profile_json_schema())


@cli.command("calibrate")
@click.option("--profile", "profile_spec", required=True, help="Profile YAML path or shipped name.")
@click.option("--ancestry", default="demo", show_default=True, help="Ancestry whose search space the kit samples.")
@click.option("--shapes", "count", type=click.IntRange(3, 200), default=12, show_default=True, help="Models in the kit.")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Kit directory to write.")
def calibrate_cmd(profile_spec, ancestry, count, seed, out) -> None:
    """Write a latency calibration kit to run on the device (ONNX models, measure.py, README).

    \b
    Example:
      peg-factory calibrate --profile jetson_orin --out kit/
      # on the device: python3 kit/measure.py   -> kit/calibration.csv, kit/calibration.json
      # in the profile: calibration: kit/calibration.csv
    """
    from factory.core.ancestry import load_ancestry
    from factory.device.calibration import write_kit
    from factory.device.profile import load_profile
    from factory.device.search import SearchSpace

    profile = load_profile(profile_spec)
    arch = load_ancestry(ancestry).arch
    kit = write_kit(profile, arch, SearchSpace.from_arch(arch), out, count=count, seed=seed, log=click.echo)
    click.echo(f"calibration kit {kit}: {count} models for {profile.name} ({profile.hardware.runtime}); "
               f"run `python3 {kit / 'measure.py'}` on the device, then set `calibration: {kit / 'calibration.csv'}`")


@cli.command("search")
@click.option("--profile", "profile_spec", required=True, help="Profile YAML path or shipped name.")
@click.option("--ancestry", default="demo", show_default=True, help="Ancestry whose expansions are searched.")
@click.option("--data", default=None, help="Task data (mnist, digits, textures, synthetic or an ImageFolder dir): rank by predicted accuracy on it.")
@click.option("--objective", type=click.Choice(["auto", "accuracy", "capacity"]), default="auto", show_default=True,
              help="accuracy: few-step probes (successive halving) of the Pareto front on --data pick the shape predicted most "
                   "accurate after --steps; capacity: the largest shape that fits; auto: capacity for the trained learngene "
                   "(measured within noise of the best), accuracy otherwise (--init other than peg, untrained learngene).")
@click.option("--init", "init_method", type=click.Choice(["peg", "tleg", "weight_selection", "scratch"]), default="peg",
              show_default=True, help="How the build will initialise descendants (the probes use the same).")
@click.option("--expand-steps", type=STEPS, default=None,
              help="Expanding-phase steps of the learngene [default: the build's, 1500; 0 = untrained].")
@click.option("--steps", type=POSITIVE_STEPS, default=100, show_default=True, help="Fine-tuning budget the accuracy is predicted for.")
@click.option("--work", type=click.Path(path_type=Path), default=Path("out/build"), show_default=True,
              help="Build directory whose cache (learngene, estimates) is used and filled; `build --out` the same dir reuses it.")
@click.option("--img-size", "img_sizes", type=SIZE, multiple=True, help="Input sizes to consider [default: ancestry's].")
@click.option("--num-classes", type=click.IntRange(0, 1 << 20), default=None, help="Classes of the task [default: the data's, else the ancestry's].")
@click.option("--snap", type=SIZE, default=32, show_default=True, help="Widths are multiples of this.")
@click.option("--max-depth", type=COUNT, default=None, help="Deepest descendant [default: 2x ancestry].")
@click.option("--top", type=click.IntRange(1, 1_000_000), default=5, show_default=True)
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON (all fields, rejected shapes too).")
def search_cmd(profile_spec, ancestry, data, objective, init_method, expand_steps, steps, work, img_sizes, num_classes, snap, max_depth, top, seed,
               as_json) -> None:
    """Find descendant shapes that fit a device profile's budgets, ranked by predicted accuracy or capacity.

    \b
    Example:
      peg-factory search --profile profiles/jetson_orin.yaml --top 5
      peg-factory search --profile raspberry_pi5 --data digits      # probe the candidates on the task
      peg-factory search --profile raspberry_pi5 --json
    """
    import time

    from factory.core.ancestry import load_ancestry
    from factory.device.accuracy import describe_decision
    from factory.device.cost import CostModel
    from factory.device.profile import load_profile
    from factory.device.search import SearchSpace, search
    from factory.pipeline.build import Builder, BuildConfig, choose_for_devices

    profile = load_profile(profile_spec)
    anc = load_ancestry(ancestry)
    arch = anc.arch
    ds = None
    builder = Builder(work, BuildConfig(ancestry=ancestry, data=data or "digits", finetune_steps=steps, seed=seed, init=init_method,
                                        expand_steps=expand_steps, objective=objective),
                      log=lambda line: click.echo(line, err=True))
    if objective == "accuracy" and not data:
        objective, reason = "capacity", "--objective accuracy needs --data (task images to estimate on); fell back to capacity"
        click.echo(f"note: {reason}", err=True)
    elif not data:
        objective, reason = "capacity", "no --data given (give --data to rank by predicted accuracy on it)"
    else:
        objective, reason = builder.objective(anc)
    if data:
        from factory.training.data import load_dataset

        ds = load_dataset(data, img_size=arch.img_size, in_chans=arch.in_chans)
        num_classes = num_classes or ds.num_classes
    space = SearchSpace.from_arch(arch, max_depth=max_depth, snap=snap, img_sizes=tuple(img_sizes) or None,
                                  num_classes=num_classes)
    cost = CostModel.for_profile(profile, arch=arch)
    result = search(profile, space, cost, seed=seed)
    selection: dict = {"objective": objective, **({"reason": reason} if reason else {})}
    if objective == "accuracy" and result.feasible:
        lg, _ = builder.learngene(anc)
        t0 = time.perf_counter()
        entry = {"name": profile.name}
        searches = {profile.name: (result, result.feasible[0], cost)}
        choose_for_devices(builder, [entry], searches, anc, lg, ds, reason=reason)
        selection = {**entry["selection"], "seconds_total": round(time.perf_counter() - t0, 2)}
    if as_json:
        _echo_json({**result.to_dict(top=top), "selection": selection, "latency_method": cost.method})
        result.require_feasible()  # nothing fits: exit 2 with the closest miss, after the JSON
        return
    if objective == "accuracy" and result.feasible:
        click.echo(f"profile {profile.name}: predicted accuracy after {steps} fine-tuning steps on {data} "
                   f"(successive halving, probe rungs {'/'.join(map(str, selection['estimator']['rungs']))} steps, "
                   f"{selection['seconds']:.1f}s for estimates):")
        click.echo(f"{'':2}{'shape':28s} {'steps':>5} {'cal NLL':>8} {'val acc':>8} {'latency ms':>10} {'capacity':>9}")
        for row in selection["candidates"]:
            click.echo(f"{'*' if row['chosen'] else ' ':2}{row['label']:28s} {row.get('probe_steps', ''):>5} "
                       f"{row.get('val_nll', float('nan')):8.4f} {row['predicted_accuracy']:8.3f} "
                       f"{row['latency_ms']:10.4f} {row['capacity_score']:9.2f}")
        decision = next(r for r in selection["candidates"] if r["chosen"]).get("decision", {})
        click.echo(f"chosen: {selection['chosen']} (capacity proxy would pick {selection['capacity_choice']}); "
                   f"{describe_decision(decision)}")
        return
    if as_json:
        _echo_json(result.to_dict(top=top))
        result.require_feasible()  # nothing fits: exit 2 with the closest miss, after the JSON
        return
    click.echo(f"profile {profile.name}: {result.evaluated} shapes evaluated ({result.strategy}), "
               f"{len(result.feasible)} fit, {len(result.rejected)} rejected; latency by {cost.method}")
    click.echo("ranked by capacity (log FLOPs + 0.5 log params), largest first" + (f"; {reason}" if reason else ""))
    result.require_feasible()  # nothing fits: one line with the closest miss, exit 2
    click.echo(f"{'rank':>4}  {'shape':28s} {'latency ms':>10} {'memory MB':>9} {'GFLOPs':>8} {'params M':>8}  margins")
    for i, c in enumerate(result.top(top), 1):
        margins = " ".join(f"{k}:{v:+.0%}" for k, v in c.margins.items())
        click.echo(f"{i:>4}  {c.shape.label():28s} {c.latency_ms:10.4f} {c.memory_mb:9.2f} {c.flops_g:8.4f} {c.params_m:8.3f}  {margins}")
    click.echo(f"pareto front: {len(result.pareto)} shapes, latency {result.pareto[0].latency_ms:.4f}..{result.pareto[-1].latency_ms:.4f} ms")
    by_budget: dict[str, int] = {}
    for c in result.rejected:
        for k in c.broken:
            by_budget[k] = by_budget.get(k, 0) + 1
    if by_budget:
        click.echo("rejected: " + ", ".join(f"{n} broke {k}" for k, n in sorted(by_budget.items())))


@cli.command("export")
@click.option("--model", "model_path", type=click.Path(path_type=Path), default=None,
              help="Run directory or descendant .safetensors [default: every device of the latest build here].")
@click.option("--format", "fmt", default="onnx", show_default=True, help="onnx, onnx-fp16, onnx-int8, openvino, openvino-int8, trt, all, or a comma list.")
@click.option("--profile", "profile_spec", default=None, help="Target profile (batch, precision, which TensorRT path).")
@click.option("--data", default=None, help="Images for INT8 calibration and accuracy [default: digits for 1-channel 10-class models].")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Output directory [default: MODEL_DIR/export].")
@click.option("--require-engine", is_flag=True, help="Fail (exit 2) instead of writing a build kit when no engine can be built here.")
def export_cmd(model_path, fmt, profile_spec, data, out, require_engine) -> None:
    """Export a descendant to ONNX (verified), FP16/INT8 ONNX and TensorRT (engine or on-device kit).

    \b
    Example:
      peg-factory export --model runs/d9 --format all --profile jetson_orin
      peg-factory export --model out/descendant.safetensors --format onnx-int8 --data digits --out out/export
      peg-factory export --format trt        # every device of the latest build in this directory
    """
    from export.api import export_model, parse_formats, resolve_model_path

    from factory.device.profile import load_profile

    import contextlib

    from factory.pipeline.artifacts import confined, directory_lock

    jobs = []
    lock = contextlib.nullcontext()
    if model_path is not None:
        path = resolve_model_path(model_path)
        jobs.append((path, load_profile(profile_spec) if profile_spec else None, out or path.parent / "export"))
    else:
        manifest = _latest_manifest(Path.cwd())
        base = manifest["path"].parent
        lock = directory_lock(base)  # it rewrites the build's device folders: never while a build runs there
        for device in manifest["data"]["devices"]:
            if device.get("status") != "ok":
                click.echo(f"{device['name']}: skipped (its build failed: {device.get('error')})")
                continue
            prof = load_profile(profile_spec or device["profile"])
            model = confined(base, device["artifacts"]["model"]["path"], f"{manifest['path']}: model path")
            jobs.append((model, prof, confined(out, device["name"], "device name") if out else model.parent / "export"))
    with lock:
        for path, prof, target in jobs:
            formats = parse_formats(fmt, prof)
            record = export_model(path, formats, target, profile=prof, data=data, require_engine=require_engine, log=click.echo)
            click.echo(f"exported {path} -> {target} ({', '.join(record['artifacts'])}); hashes in {target / 'export.json'}")


def _latest_manifest(root: Path) -> dict:
    candidates = [p for pattern in ("manifest.json", "*/manifest.json", "*/*/manifest.json") for p in root.glob(pattern)]
    if not candidates:
        raise UserError(f"no --model given and no build (manifest.json) under {root}; run `peg-factory build` first or pass --model")
    path = max(candidates, key=lambda p: p.stat().st_mtime)
    try:
        data = json.loads(path.read_text())
        assert isinstance(data["devices"], list)
    except (ValueError, KeyError, AssertionError, TypeError) as exc:
        raise UserError(f"{path} is not a peg-factory build manifest; pass --model") from exc
    return {"path": path, "data": data}


@cli.command("build")
@click.option("--profile", "profile_specs", multiple=True, help="Profile YAML or shipped name (repeatable).")
@click.option("--fleet", type=click.Path(path_type=Path), default=None, help="Fleet file: 'profiles: [a.yaml, b.yaml]'.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("out/build"), show_default=True)
@click.option("--ancestry", default="demo", show_default=True)
@click.option("--data", default="digits", show_default=True, help="mnist, digits, synthetic or an ImageFolder directory.")
@click.option("--init", "init_method", type=click.Choice(["peg", "tleg", "weight_selection", "scratch"]), default="peg", show_default=True)
@click.option("--gene-layers", type=COUNT, default=None, help="Learngene layers [default: half the ancestry's].")
@click.option("--expand-steps", type=STEPS, default=None,
              help="Expanding-phase steps for the learngene [default: 1500; 0 = untrained, sampled only].")
@click.option("--expand-data", default=None,
              help="Images for the expanding phase [default: the ancestry's own (mnist for the demo), else --data].")
@click.option("--steps", type=POSITIVE_STEPS, default=100, show_default=True, help="Fine-tuning steps per model.")
@click.option("--batch-size", type=BATCH, default=32, show_default=True)
@click.option("--lr", type=RATE, default=1e-3, show_default=True, help="Fine-tuning learning rate (AdamW, cosine).")
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--jobs", type=COUNT, default=1, show_default=True, help="Models fine-tuned in parallel on this machine.")
@click.option("--executor", "executor_kind", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: --jobs threads here; ray: one Ray task per distinct shape (pip install 'peg-factory[ray]').")
@click.option("--ray-address", default=None, help="Ray cluster to join ('auto', ray://HOST:10001) [default: start a local one].")
@click.option("--task-cpus", type=click.FloatRange(0.01, 1024), default=1.0, show_default=True, help="CPUs per Ray task.")
@click.option("--task-gpus", type=click.FloatRange(0, 64), default=0.0, show_default=True,
              help="GPUs per Ray task (fractions share a GPU).")
@click.option("--device", default="auto", show_default=True)
@click.option("--objective", type=click.Choice(["auto", "accuracy", "capacity"]), default="auto", show_default=True,
              help="accuracy: probe the Pareto-front shapes by successive halving on --data and pick the lowest "
                   "(temperature-scaled) validation loss; capacity: the largest shape that fits, no probes; auto: capacity "
                   "for the trained learngene (measured within noise of the best), accuracy for --init tleg/"
                   "weight_selection/scratch or --expand-steps 0.")
@click.option("--dry-run", is_flag=True, help="Print the plan (shapes, cached stages, time estimates) and stop.")
@click.option("--wait-lock", is_flag=True, help="If another build is using --out, wait for it instead of failing.")
def build_cmd(profile_specs, fleet, out, ancestry, data, init_method, gene_layers, expand_steps, expand_data, steps, batch_size, lr,
              seed, jobs, executor_kind, ray_address, task_cpus, task_gpus, device, objective, dry_run, wait_lock) -> None:
    """Build deployable models for one or many device profiles (search, expand, fine-tune, measure, export).

    \b
    Example:
      peg-factory build --profile profiles/jetson_orin.yaml
      peg-factory build --fleet profiles/fleet_example.yaml --out out/fleet --jobs 2
      peg-factory build --fleet fleet.yaml --out /shared/fleet --executor ray --ray-address auto --task-gpus 1
      peg-factory build --profile jetson_orin --profile raspberry_pi5 --dry-run
    """
    from factory.pipeline.build import BuildConfig, build, load_fleet
    from factory.pipeline.executor import make_executor
    from factory.device.profile import load_profile

    if executor_kind == "local" and (ray_address or task_gpus):
        raise UserError("--ray-address and --task-gpus need --executor ray")
    executor = make_executor(executor_kind, jobs=jobs, address=ray_address, task_cpus=task_cpus, task_gpus=task_gpus)
    specs = list(profile_specs) + (load_fleet(fleet) if fleet else [])
    if not specs:
        raise UserError("no profile: pass --profile profiles/jetson_orin.yaml (repeatable) or --fleet FILE")
    profiles = [load_profile(s) for s in specs]
    cfg = BuildConfig(ancestry=ancestry, data=data, init=init_method, gene_layers=gene_layers, expand_steps=expand_steps,
                      expand_data=expand_data, objective=objective,
                      finetune_steps=steps, batch_size=batch_size, lr=lr, seed=seed, jobs=jobs, device=device)
    manifest = build(profiles, out, cfg, dry_run=dry_run, log=click.echo, wait_lock=wait_lock, executor=executor)
    if dry_run:
        return
    failed = [d for d in manifest["devices"] if d["status"] != "ok"]
    for d in manifest["devices"]:
        if d["status"] == "ok":
            click.echo(f"{d['name']}: {d['shape']['depth']}x{d['shape']['embed_dim']} test acc {d['accuracy']['test']:.4f}, "
                       f"predicted {d['latency_ms']['predicted_target']:.4f} ms -> {out / d['name']}")
    click.echo(f"manifest {out / 'manifest.json'}, report {out / 'report.html'} ({manifest['seconds']} s)")
    if failed:
        raise UserError(f"{len(failed)} of {len(manifest['devices'])} profiles failed: "
                        + "; ".join(f"{d['name']}: {d['error']}" for d in failed))


def _shape_options(fn):
    options = [
        click.option("--depth", type=COUNT, help="Descendant depth L_d."),
        click.option("--embed-dim", type=SIZE, help="Descendant width D_d."),
        click.option("--heads", "num_heads", type=COUNT, help="Descendant heads H_d."),
        click.option("--mlp-ratio", type=click.FloatRange(0, 64, min_open=True), default=None, help="MLP hidden / width [default: ancestry's]."),
        click.option("--img-size", type=SIZE, default=None, help="Input size [default: ancestry's]."),
        click.option("--patch-size", type=SIZE, default=None, help="Patch size [default: ancestry's]."),
        click.option("--num-classes", type=click.IntRange(0, 1 << 20), default=None, help="Classes [default: ancestry's]."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _shape_from(arch, depth, embed_dim, num_heads, mlp_ratio, img_size, patch_size, num_classes):
    from factory.core.shapes import DescendantShape

    for name, value in (("--depth", depth), ("--embed-dim", embed_dim), ("--heads", num_heads)):
        if value is None:
            raise UserError(f"missing {name}")
    return DescendantShape(
        depth=depth,
        embed_dim=embed_dim,
        num_heads=num_heads,
        mlp_ratio=mlp_ratio if mlp_ratio is not None else arch.mlp_ratio,
        img_size=img_size or arch.img_size,
        patch_size=patch_size or arch.patch_size,
        num_classes=num_classes if num_classes is not None else arch.num_classes,
    )


@cli.command()
@click.option("--learngene", "learngene_dir", type=click.Path(path_type=Path), default=None,
              help="Learngene directory (needed for --method peg).")
@click.option("--ancestry", default=None, help="Ancestry spec (needed for tleg / weight_selection).")
@click.option("--method", type=click.Choice(["peg", "tleg", "weight_selection", "scratch"]), default="peg", show_default=True)
@click.option("--selection", type=click.Choice(["even", "importance"]), default="even", show_default=True,
              help="How heads/width/hidden units are chosen.")
@_shape_options
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Descendant .safetensors file.")
def expand(learngene_dir, ancestry, method, selection, depth, embed_dim, num_heads, mlp_ratio,
           img_size, patch_size, num_classes, seed, out) -> None:
    """Expand a learngene (or a baseline init) into a timm ViT descendant.

    \b
    Example:
      peg-factory expand --learngene out/learngene --depth 9 --embed-dim 192 --heads 3 --out out/d9.safetensors
      peg-factory expand --method tleg --ancestry demo --depth 4 --embed-dim 96 --heads 2 --out out/tleg.safetensors
    """
    from factory.core.ancestry import load_ancestry
    from factory.core.baselines import init_descendant
    from factory.core.checkpoint import save_descendant
    from factory.core.flops import count_params
    from factory.core.learngene import Learngene

    lg = Learngene.load(learngene_dir) if learngene_dir is not None else None
    anc = load_ancestry(ancestry) if ancestry is not None else None
    if method == "peg" and lg is None:
        raise UserError("--method peg needs --learngene DIR (create one with `peg-factory learngene`)")
    arch = lg.arch if lg is not None else anc.arch if anc is not None else None
    if arch is None:
        from factory.core.ancestry import DEMO_ARCH

        arch = DEMO_ARCH
    shape = _shape_from(arch, depth, embed_dim, num_heads, mlp_ratio, img_size, patch_size, num_classes)
    model = init_descendant(method, shape, ancestry=anc, learngene=lg, seed=seed, selection=selection)
    info = {
        "method": method,
        "selection": selection,
        "seed": seed,
        "shape": shape.to_dict(),
        "learngene_sha256": lg.sha256 if lg is not None else None,
        "ancestry": anc.identity() if anc is not None else None,
    }
    digest = save_descendant(model, arch.with_shape(shape), out, info)
    click.echo(f"descendant {out}: {shape.label()} by {method}, {count_params(model) / 1e6:.2f}M params, sha256 {digest[:12]}")


@cli.command()
@click.option("--model", "model_path", type=click.Path(path_type=Path), default=None,
              help="Descendant .safetensors (or any ancestry spec) to measure with fvcore.")
@_shape_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def flops(model_path, depth, embed_dim, num_heads, mlp_ratio, img_size, patch_size, num_classes, as_json) -> None:
    """FLOPs (multiply-adds, fvcore's convention) and parameters of a model or a shape.

    \b
    Example:
      peg-factory flops --model out/d9.safetensors
      peg-factory flops --depth 12 --embed-dim 384 --heads 6 --img-size 224 --patch-size 16 --num-classes 1000
    """
    from factory.core.ancestry import load_ancestry
    from factory.core.flops import count_flops, count_params
    from factory.core.shapes import STANDARD_ARCH, vit_flops, vit_params

    if model_path is not None:
        anc = load_ancestry(model_path if Path(model_path).exists() else str(model_path))
        shape, arch = anc.arch.shape(), anc.arch
        measured, params = count_flops(anc.model), count_params(anc.model)
    else:
        arch = STANDARD_ARCH
        shape = _shape_from(
            arch, depth, embed_dim, num_heads, mlp_ratio, img_size or 224, patch_size or 16,
            num_classes if num_classes is not None else 1000,
        )
        measured = params = None
    result = {
        "shape": shape.to_dict(),
        "flops_closed_form": vit_flops(shape, arch),
        "params_closed_form": vit_params(shape, arch),
        "flops_fvcore": measured,
        "params": params,
    }
    if as_json:
        _echo_json(result)
        return
    line = f"{shape.label()}: {result['flops_closed_form'] / 1e9:.4f} GFLOPs (closed form)"
    if measured is not None:
        line += f", {measured / 1e9:.4f} GFLOPs (fvcore), {params / 1e6:.3f}M params"
    else:
        line += f", {result['params_closed_form'] / 1e6:.3f}M params"
    click.echo(line)


def main() -> None:
    cli(prog_name="peg-factory")


if __name__ == "__main__":
    main()
