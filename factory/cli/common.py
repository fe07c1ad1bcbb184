"""What every command shares: the error mapping (one line, exit 2), bounded option types, and the
options that name a registry (init methods, objectives, export formats, data sets, executors),
built once from the registries themselves so a new entry shows up in every command."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import click

from export.formats import FORMAT_NAMES
from factory.core.baselines import METHODS
from factory.data import BUILTIN_DATASETS
from factory.device.objective import OBJECTIVES
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


class Duration(click.ParamType):
    """A wall-clock duration (``90``, ``90s``, ``45m``, ``1.5h``, ``1h 30m``) as seconds
    (:func:`factory.pipeline.time_budget.parse_duration`)."""

    name = "duration"

    def convert(self, value, param, ctx):
        from factory.errors import FactoryError
        from factory.pipeline.time_budget import parse_duration

        if isinstance(value, float):
            return value
        try:
            return parse_duration(value)
        except FactoryError as exc:
            self.fail(exc.message, param, ctx)  # click names the option; the API argument name would repeat it


DURATION = Duration()


class AutoOrMB(click.ParamType):
    """``--train-memory-mb``: whole MB (``0``: no limit) or ``auto`` (``None``: the step's device decides,
    :func:`factory.training.micro_batch.resolve_memory_mb`)."""

    name = "mb|auto"

    def convert(self, value, param, ctx):
        if value is None or isinstance(value, int):
            return value
        if str(value).strip().lower() == "auto":
            return None
        try:
            mb = int(str(value).strip())
        except ValueError:
            mb = -1
        if not 0 <= mb <= 1 << 24:
            self.fail(f"{value!r} is not a whole number of MB in 0..{1 << 24} or auto", param, ctx)
        return mb


AUTO_OR_MB = AutoOrMB()


class FlipProbability(click.ParamType):
    """``--hflip``: a probability in [0, 1], or ``auto`` where the command can decide it (``build``)."""

    name = "probability"

    def __init__(self, auto: bool) -> None:
        self.auto = auto

    def convert(self, value, param, ctx):
        import math

        if self.auto and str(value).strip().lower() == "auto":
            return "auto"
        try:
            p = float(value)
        except (TypeError, ValueError):
            p = math.nan
        if not 0 <= p <= 1:  # NaN too
            self.fail(f"{value!r} is not a probability in [0, 1]{' or auto' if self.auto else ''}", param, ctx)
        return p


# Out of space, over quota, file too large (RLIMIT_FSIZE), read-only file system: the user's to fix, not a bug.
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})

DATA_HELP = f"{', '.join(BUILTIN_DATASETS)}, or an ImageFolder directory (train/, val/, optional test/)."
FORMAT_HELP = (
    f"{', '.join(FORMAT_NAMES)}, all (the profile's formats; without --profile, every format installed here), "
    "or a comma list."
)
OBJECTIVE_HELP = (
    "accuracy: probe the Pareto-front shapes by successive halving on the data and pick the lowest "
    "(temperature-scaled) validation loss; capacity: the largest shape that fits, no probes; auto: capacity "
    "for the trained learngene (measured within noise of the best), accuracy for another --init or "
    "--expand-steps 0."
)


#: API argument names whose CLI option is named otherwise (the option's Python name).
PARAM_ALIASES = {"distill_img_size": "expand_img_size", "finetune_steps": "steps", "expand_steps": "expand_steps"}


def flag_for(root: click.Command, param: str) -> str | None:
    """The CLI flag of the API argument ``param`` (``out`` -> ``--out``), searched in every command under ``root``."""
    name = PARAM_ALIASES.get(param, param)
    pending = [root]
    while pending:
        cmd = pending.pop()
        for option in getattr(cmd, "params", []):
            if isinstance(option, click.Option) and option.name == name:
                return max(option.opts, key=len)
        pending.extend(getattr(cmd, "commands", {}).values())
    return None


def refuse_without(requirement: str, present: bool, options: list[str], *, instead: str | None = None) -> None:
    """One line (exit 2) where an option that means something only with ``requirement`` was set by the user (on
    the command line or in the environment, not by default) while ``requirement`` is absent: such an option was
    silently ignored, so the user believed it ran. ``instead``: the fix when it is not "give REQUIREMENT"."""
    from click.core import ParameterSource

    ctx = click.get_current_context()
    flags = {p.name: "/".join(p.opts[:1] + getattr(p, "secondary_opts", [])[:1]) for p in ctx.command.params}
    set_ = [
        flags[name]
        for name in options
        if ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    ]
    if set_ and not present:
        verb, them = ("applies", "it") if len(set_) == 1 else ("apply", "them")
        fix = instead or f"give {requirement}"
        raise UserError(f"{' and '.join(set_)} only {verb} with {requirement}: {fix}, or drop {them}")


class FactoryGroup(click.Group):
    """A click group that maps :class:`FactoryError` to exit code 2 for every subcommand, naming the flag
    of the argument at fault where the error names one (:attr:`FactoryError.param`)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except FactoryError as exc:
            flag = flag_for(ctx.find_root().command, exc.param) if exc.param else None
            raise UserError(f"{flag}: {exc.message}" if flag else str(exc)) from exc
        except OSError as exc:
            if exc.errno == errno.ENAMETOOLONG:
                raise UserError(
                    f"a file name is too long for the file system ({exc.filename or 'a path component over 255 bytes'}); "
                    "use a shorter name"
                ) from exc
            if exc.errno not in DISK_ERRNOS:
                raise
            where = f" writing {exc.filename}" if exc.filename else ""
            raise UserError(
                f"{exc.strerror or os.strerror(exc.errno)}{where}; free space (or raise the quota/file-size limit) "
                "and rerun: finished stages are kept, nothing half-written is"
            ) from exc
        except KeyboardInterrupt:
            click.echo(
                "Interrupted: stopped cleanly; finished stages and fine-tuning checkpoints are kept, rerun the same "
                "command to resume",
                err=True,
            )
            ctx.exit(130)


def echo_json(data) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True))


def init_option(
    name: str = "init",
    flag: str = "--init",
    help: str = "How descendants are initialised.",
    choices: tuple[str, ...] = METHODS,
) -> click.Option:
    return click.option(flag, name, type=click.Choice(choices), default=choices[0], show_default=True, help=help)


def objective_option(help: str = OBJECTIVE_HELP):
    return click.option("--objective", type=click.Choice(OBJECTIVES), default="auto", show_default=True, help=help)


def data_option(default: str | None, help: str = DATA_HELP):
    return click.option("--data", default=default, show_default=default is not None, help=help)


def ancestry_option(
    default: str | None = "demo", help: str = "'demo', a timm name (pretrained), 'random:NAME', or CKPT@ARCH."
):
    return click.option("--ancestry", default=default, show_default=default is not None, help=help)


AMP_HELP = (
    "Precision of the training steps. auto: bf16 autocast on CUDA (fp16 where bf16 is unsupported) and on CPUs "
    "with native bf16 (AVX512-BF16/AMX), else fp32; off: fp32."
)


def amp_option(help: str = AMP_HELP):
    return click.option(
        "--amp", type=click.Choice(["auto", "bf16", "fp16", "off"]), default="auto", show_default=True, help=help
    )


def global_batch_option(default: int = 64):
    """``--batch-size`` of a trainer that runs under torchrun (:mod:`factory.training.distributed`)."""
    return click.option(
        "--batch-size",
        type=BATCH,
        default=default,
        show_default=True,
        help="Images per step: the global batch, split evenly across the processes under torchrun.",
    )


def view_options(fn=None, *, auto: bool = False):
    """``--hflip`` and ``--crop-scale``: how a folder's training views are drawn (``TrainConfig``'s defaults;
    ``auto``: ``--hflip auto``, the build's mirror check, is the default)."""
    from factory.training.train import TrainConfig

    def decorate(fn):
        fn = click.option(
            "--crop-scale",
            type=click.FloatRange(0, 1, min_open=True),
            default=TrainConfig.crop_scale,
            show_default=True,
            help="An ImageFolder's training crops cover at least this fraction of the image (RandomResizedCrop; "
            "timm's ImageNet recipe: 0.08).",
        )(fn)
        return click.option(
            "--hflip",
            type=FlipProbability(auto),
            default="auto" if auto else TrainConfig.hflip,
            show_default=True,
            help="Probability of a horizontal flip of an ImageFolder's training images: 0.5 for photos whose classes "
            "look the same mirrored, 0 where they do not (digits, text, arrows)"
            + (
                "; auto: measured on the data -- does the ancestry's k-NN still classify mirrored images? -- 0.5 "
                "where it does, 0 where it does not or cannot tell."
                if auto
                else "."
            ),
        )(fn)

    return decorate if fn is None else decorate(fn)


def seed_option(default: int | None = 0, help: str = "Random seed."):
    return click.option("--seed", type=SEED, default=default, show_default=default is not None, help=help)


def out_option(help: str, *, required: bool = True, default: Path | None = None):
    # click >= 8.3 takes an explicit ``default=None`` as a value that satisfies ``required``: pass it only when set
    if default is not None:
        return click.option("--out", type=click.Path(path_type=Path), default=default, show_default=True, help=help)
    return click.option("--out", type=click.Path(path_type=Path), required=required, help=help)


def shape_options(fn):
    """``--depth --embed-dim --heads --mlp-ratio --img-size --patch-size --num-classes`` (see :func:`shape_from`)."""
    options = [
        click.option("--depth", type=COUNT, help="Descendant depth L_d."),
        click.option("--embed-dim", type=SIZE, help="Descendant width D_d."),
        click.option("--heads", "num_heads", type=COUNT, help="Descendant heads H_d."),
        click.option(
            "--mlp-ratio",
            type=click.FloatRange(0, 64, min_open=True),
            default=None,
            help="MLP hidden / width [default: ancestry's].",
        ),
        click.option("--img-size", type=SIZE, default=None, help="Input size [default: ancestry's]."),
        click.option("--patch-size", type=SIZE, default=None, help="Patch size [default: ancestry's]."),
        click.option(
            "--num-classes", type=click.IntRange(0, 1 << 20), default=None, help="Classes [default: ancestry's]."
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def shape_from(arch, depth, embed_dim, num_heads, mlp_ratio, img_size, patch_size, num_classes):
    """The :class:`~factory.core.shapes.DescendantShape` of :func:`shape_options`' values, ``arch``'s where not given."""
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


def int_list(text: str | None, flag: str) -> list[int] | None:
    try:
        return [int(v) for v in text.split(",")] if text else None
    except ValueError as exc:
        raise UserError(f"{flag} must be comma-separated integers, got {text!r}") from exc
