"""``peg-factory calibrate``: a latency calibration kit to run on a device the factory cannot reach."""

from __future__ import annotations

import click

from factory.cli.common import ancestry_option, out_option, seed_option


@click.command("calibrate")
@click.option("--profile", "profile_spec", required=True, help="Profile YAML path or shipped name.")
@ancestry_option(help="Ancestry whose search space the kit samples.")
@click.option(
    "--shapes", "count", type=click.IntRange(3, 200), default=12, show_default=True, help="Models in the kit."
)
@seed_option(help="Seed of the shapes' spread.")
@out_option("Kit directory to write.")
def calibrate_cmd(profile_spec, ancestry, count, seed, out) -> None:
    """Write a latency calibration kit to run on the device (ONNX models, measure.py, README).

    \b
    Example:
      peg-factory calibrate --profile jetson_orin --out kit/
      # on the device: python3 kit/measure.py   -> kit/calibration.csv, kit/calibration.json
      # in the profile: calibration: kit/calibration.csv
    """
    from factory.core.ancestry import load_ancestry
    from factory.device.calibration_kit import write_kit
    from factory.device.profile import load_profile
    from factory.device.resolve import latency_model_for
    from factory.device.search import SearchSpace

    profile = load_profile(profile_spec)
    arch = load_ancestry(ancestry).arch
    kit = write_kit(
        profile,
        arch,
        SearchSpace.from_arch(arch),
        out,
        latency_model_for(profile, arch=arch),
        count=count,
        seed=seed,
        log=click.echo,
    )
    click.echo(
        f"calibration kit {kit}: {count} models for {profile.name} ({profile.hardware.runtime}); "
        f"run `python3 {kit / 'measure.py'}` on the device, then set `calibration: {kit / 'calibration.csv'}`"
    )
