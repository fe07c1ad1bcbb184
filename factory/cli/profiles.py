"""``peg-factory profiles``: list, show, measure (this host's kernel tables) and the schema."""

from __future__ import annotations

import json
from pathlib import Path

import click

from factory.cli.common import BATCH, SIZE, FactoryGroup, UserError, ancestry_option, echo_json, seed_option
from factory.device.runtimes import RUNTIMES


@click.group(cls=FactoryGroup)
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

    names = list_profiles()
    width = max(len(n) for n in names) + 1
    for name in names:
        p = load_profile(name)
        budgets = ", ".join(f"{k}={v:g}" for k, v in p.budgets.items())
        size = f"{p.input_size} px" if p.input_size else "-"
        click.echo(
            f"{name:{width}s} {p.hardware.kind:4s} {p.hardware.runtime:12s} {p.precision:5s} batch {p.batch:<3d} "
            f"{size:7s} {budgets}"
        )


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
@click.option(
    "--runtime",
    type=click.Choice([n for n, s in RUNTIMES.items() if s.kernel_tables]),
    default="onnxruntime",
    show_default=True,
    help="Runtime whose kernels are measured (onnxruntime on this CPU).",
)
@ancestry_option(help="Ancestry whose search space the tables span.")
@click.option("--batch", "batches", type=BATCH, multiple=True, help="Batch sizes to span [default: 1 and 8].")
@click.option(
    "--img-size", "img_sizes", type=SIZE, multiple=True, help="Input sizes to span [default: the search space's]."
)
@click.option("--points", type=click.IntRange(3, 12), default=6, show_default=True, help="Grid points per table axis.")
@click.option(
    "--fit",
    "fit_models",
    type=click.IntRange(3, 100),
    default=10,
    show_default=True,
    help="Whole models measured to fit the scale and overhead terms.",
)
@seed_option(help="Seed of the whole models sampled to fit the terms.")
@click.option(
    "--stat",
    type=click.Choice(["median", "min"]),
    default="median",
    show_default=True,
    help="Statistic of each timing's runs: median (a dedicated machine's typical run) or min (the "
    "least-disturbed run, steadier on a shared host); the tables predict that statistic.",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Tables file [default: this host's, which profiles with 'latency_tables: host' use].",
)
def profiles_measure(runtime, ancestry, batches, img_sizes, points, fit_models, seed, stat, out) -> None:
    """Measure this machine's kernel latency tables (the kernel-level latency predictor).

    Each kernel of a ViT block as onnxruntime runs it (MatMul+bias, MatMul+BiasGelu, attention,
    LayerNorm, Add, patch stem) is timed on a grid spanning the ancestry's search space; a few
    whole models fit the scale and overhead terms (factory/device/tables.py). Takes a few minutes; the
    result is cached per host, onnxruntime version and ancestry architecture.

    \b
    Example:
      peg-factory profiles measure
      peg-factory search --profile host      # host.yaml has latency_tables: host
    """
    from factory.core.ancestry import load_ancestry
    from factory.device.measure import host_tables_path, measure_tables
    from factory.device.search import SearchSpace
    from factory.device.tables import Grids, spread_shapes
    from factory.io import ensure_parent

    arch = load_ancestry(ancestry).arch
    path = out or host_tables_path(arch)
    ensure_parent(path)  # an unwritable --out fails now, not after minutes of measuring
    if path.is_dir():
        raise UserError(f"--out {path} is a directory; give the tables file's path, e.g. {path / 'tables.json'}")
    batches = tuple(batches) or (1, 8)
    space = SearchSpace.from_arch(arch, img_sizes=tuple(img_sizes) or None)
    grids = Grids.for_space(space, arch, batches, points)
    tables = measure_tables(
        arch, grids, fit_shapes=spread_shapes(space, fit_models, batches, seed), log=click.echo, stat=stat
    )
    tables.save(path)
    click.echo(
        f"latency tables {path}: {tables.points} kernel points + {fit_models} whole models in {tables.seconds:.0f}s "
        f"({tables.describe_terms()})"
    )


@profiles.command("schema")
def profiles_schema() -> None:
    """Print the profile JSON schema (the file profiles/profile.schema.json).

    \b
    Example:
      peg-factory profiles schema > profiles/profile.schema.json
    """
    from factory.device.profile import profile_json_schema

    echo_json(profile_json_schema())


@profiles.command("datasheet")
def profiles_datasheet() -> None:
    """Print a datasheet profile of this machine (its ISA, cores and clock from /proc/cpuinfo; nothing measured).

    What the check of the published CPU latency terms predicts this host with (bench/latency_model.py derives it
    the same way): a profile written on another VM type describes that one, not this.

    \b
    Example:
      peg-factory profiles datasheet > my_host_datasheet.yaml
    """
    import yaml

    from factory.device.host_datasheet import host_datasheet
    from factory.device.profile import parse_profile

    text = yaml.safe_dump(host_datasheet(), sort_keys=False, width=120)
    parse_profile(text, "this machine's datasheet profile")  # what it prints loads as a profile
    click.echo("# A datasheet profile of this machine (peg-factory profiles datasheet); nothing in it was measured.")
    click.echo(text, nl=False)
