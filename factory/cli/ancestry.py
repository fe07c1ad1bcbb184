"""``peg-factory ancestry train``: train the demo ancestry (real users bring timm names or checkpoints)."""

from __future__ import annotations

from pathlib import Path

import click

from factory.cli.common import POSITIVE_STEPS, FactoryGroup, seed_option


@click.group(cls=FactoryGroup)
def ancestry() -> None:
    """The demo ancestry (real users bring timm names or checkpoints)."""


@ancestry.command("train")
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Weights file [default: the user cache, where `demo` looks first].",
)
@click.option("--steps", type=POSITIVE_STEPS, default=None, help="Override the recipe's step count.")
@seed_option(None, "Override the recipe's seed.")
@click.option("--fp32", is_flag=True, help="Store fp32 weights (default fp16, ~5 MB).")
def ancestry_train(out, steps, seed, fp32) -> None:
    """Train the demo ancestry on MNIST (about 5 minutes on 2 CPU cores).

    \b
    Example:
      peg-factory ancestry train
      peg-factory ancestry train --out factory/assets/demo_ancestry.safetensors
    """
    from factory.training.demo_recipe import train_demo_ancestry

    overrides = {k: v for k, v in (("steps", steps), ("seed", seed)) if v is not None}
    log = train_demo_ancestry(out, recipe=overrides, half=not fp32)
    click.echo(
        f"demo ancestry: test accuracy {log['test_accuracy']:.4f} after {log['recipe']['steps']} steps "
        f"({log['train_seconds']}s)"
    )
