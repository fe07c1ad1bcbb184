"""The ``peg-factory`` command line: one module per command, each parsing, calling the Python API, printing.

User mistakes (:class:`~factory.errors.FactoryError`) become a one-line ``Error: ...`` on stderr
and exit code 2, like click's own usage errors (:class:`factory.cli.common.FactoryGroup`).
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import click

from factory.cli.ancestry import ancestry
from factory.cli.build import build_cmd
from factory.cli.calibrate import calibrate_cmd
from factory.cli.common import FactoryGroup, UserError
from factory.cli.expand import expand
from factory.cli.export import export_cmd
from factory.cli.flops import flops
from factory.cli.learngene import learngene
from factory.cli.profiles import profiles
from factory.cli.search import search_cmd
from factory.cli.train import train_cmd

__all__ = ["UserError", "cli", "main"]


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


for command in (
    learngene,
    ancestry,
    train_cmd,
    profiles,
    calibrate_cmd,
    search_cmd,
    export_cmd,
    build_cmd,
    expand,
    flops,
):
    cli.add_command(command)


def main() -> None:
    cli(prog_name="peg-factory")
