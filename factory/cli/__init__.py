"""The ``peg-factory`` command line: one module per command, each parsing, calling the Python API, printing.

User mistakes (:class:`~factory.errors.FactoryError`) become a one-line ``Error: ...`` on stderr
and exit code 2, like click's own usage errors (:class:`factory.cli.common.FactoryGroup`).
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys

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


def skip_triton_without_cuda() -> None:
    """On a machine without a CUDA GPU, make ``import triton`` fail (``sys.modules["triton"] = None``, Python's
    way to mark a module absent) before torchvision is imported. The CUDA torch wheel installs Triton, and
    torchvision's operator registrations import it through ``torch._library``: 84 MB of every process's memory
    (measured with ``import torch, torchvision``: 682 MB against 599 MB), for a compiler that generates GPU
    kernels only. torch treats Triton as not installed (``torch.utils._triton.has_triton_package``), as on a CPU
    wheel; ``torch.compile`` on the CPU generates C++ without it. The console script alone does this, never an
    importer of the library, and never where a GPU is visible or Triton is already imported."""
    import torch

    if "triton" not in sys.modules and not torch.cuda.is_available():
        sys.modules["triton"] = None


def main() -> None:
    """The console script. Under ``torchrun`` a rank other than 0 keeps its user errors to itself (exit code 2
    still): every rank runs the same checks on the same input before any work, so rank 0's one line says it for
    all, where each rank printed it (torchrun reports each failed rank's exit code itself). Tracebacks (bugs)
    still print on every rank."""
    skip_triton_without_cuda()
    rank = os.environ.get("RANK", "0")
    if not (rank.isdigit() and int(rank) > 0):
        cli(prog_name="peg-factory")
        return
    try:
        code = cli.main(prog_name="peg-factory", standalone_mode=False)
    except click.ClickException as exc:
        sys.exit(exc.exit_code)
    except click.Abort:
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)
