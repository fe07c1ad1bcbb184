"""``peg-factory export``: a model, or every device of the latest build here, to the deployable formats."""

from __future__ import annotations

from pathlib import Path

import click

from factory.cli.common import FORMAT_HELP, UserError


@click.command("export")
@click.option(
    "--model",
    "model_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Run directory or descendant .safetensors [default: every device of the latest build here].",
)
@click.option("--format", "fmt", default="onnx", show_default=True, help=FORMAT_HELP)
@click.option("--profile", "profile_spec", default=None, help="Target profile (batch, precision, which TensorRT path).")
@click.option(
    "--data",
    default=None,
    help="Images for INT8 calibration and accuracy [default: digits for 1-channel 10-class models].",
)
@click.option(
    "--out", type=click.Path(path_type=Path), default=None, help="Output directory [default: MODEL_DIR/export]."
)
@click.option(
    "--require-engine",
    is_flag=True,
    help="Fail (exit 2) instead of writing a build kit when no engine can be built here.",
)
def export_cmd(model_path, fmt, profile_spec, data, out, require_engine) -> None:
    """Export a descendant to ONNX (verified), FP16/INT8 ONNX and TensorRT (engine or on-device kit).

    \b
    Example:
      peg-factory export --model runs/d9 --format all --profile jetson_orin
      peg-factory export --model out/descendant.safetensors --format onnx-int8 --data digits --out out/export
      peg-factory export --format trt        # every device of the latest build in this directory
    """
    import contextlib

    from export.api import export_model, installed_only, parse_formats, resolve_model_path, skipped_error
    from factory.device.deploy import chooser
    from factory.device.profile import load_profile
    from factory.io import confined, directory_lock
    from factory.pipeline.manifest import build_data, built_devices, refresh_export

    jobs = []
    lock = contextlib.nullcontext()
    manifest = None
    if model_path is not None:
        path = resolve_model_path(model_path)
        jobs.append((path, load_profile(profile_spec) if profile_spec else None, out or path.parent / "export", None))
    else:
        manifest = latest_manifest(Path.cwd())
        lock = directory_lock(manifest.parent)  # it rewrites the build's device folders: never while a build runs there
        data = data or build_data(manifest)  # the build's own data: its class names, normalisation and checks
        for device in built_devices(manifest):
            if device.error is not None:
                click.echo(f"{device.name}: skipped (its build failed: {device.error})")
                continue
            prof = load_profile(profile_spec) if profile_spec else device.profile
            in_build = out is None  # the device's own export/ folder: the manifest lists its artifacts
            target = confined(out, device.name, "device name") if out else device.model.parent / "export"
            jobs.append((device.model, prof, target, device.name if in_build else None))
    failed = None
    with lock:
        for path, prof, target, device_name in jobs:
            formats = parse_formats(fmt, prof)
            if prof is None and "all" in (item.strip() for item in fmt.split(",")):  # all this environment can write
                formats, left_out = installed_only(formats)
                for name, reason in left_out.items():
                    click.echo(f"{name}: left out of 'all' (not installed here: {reason})")
            record = export_model(
                path,
                formats,
                target,
                profile=prof,
                data=data,
                require_engine=require_engine,
                log=click.echo,
                choose=chooser(prof),
            )
            if device_name is not None:
                refresh_export(manifest, device_name, record)  # the manifest's hashes follow the new artifacts
            click.echo(
                f"exported {path} -> {target} ({', '.join(record['artifacts'])}); hashes in {target / 'export.json'}"
            )
            failed = failed or skipped_error(record, str(target))
    if failed is not None:  # after every job: the formats that could be written are
        raise failed


def latest_manifest(root: Path) -> Path:
    """The newest ``manifest.json`` at most two folders below ``root``."""
    candidates = [
        p for pattern in ("manifest.json", "*/manifest.json", "*/*/manifest.json") for p in root.glob(pattern)
    ]
    if not candidates:
        raise UserError(
            f"no --model given and no build (manifest.json) under {root}; run `peg-factory build` first or pass --model"
        )
    return max(candidates, key=lambda p: p.stat().st_mtime)
