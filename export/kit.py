"""On-device TensorRT build kits.

A TensorRT engine only runs on the GPU model and TensorRT version that built it, so for any
target other than this machine peg-factory ships a kit that builds and checks the engine *on the
device*:

- ``model.onnx`` (FP32) and, for INT8, ``model.int8.onnx`` (QDQ: explicit quantisation, so
  ``trtexec --int8`` needs no calibrator) plus ``calibration.npy`` (real images, for users who
  prefer TensorRT's own entropy calibration through :mod:`export.tensorrt_build`);
- ``build_engine.sh``: the exact ``trtexec`` command (precision flags, min/opt/max shapes from the
  profile's batch, ``--saveEngine``, ``--timingCacheFile``, ``--exportTimes``);
- ``reference.npz``: inputs at batch 1 and the profile's batch with onnxruntime's FP32 logits;
- ``check_engine.py``: runs the engine on those inputs and compares (exit code 0 = pass).
"""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path

import numpy as np

from .onnx_export import INPUT_NAME

TEMPLATE = Path(__file__).parent / "templates" / "check_engine.py"


def trtexec_command(onnx_name: str, engine_name: str, *, precision: str, in_chans: int, img_size: int,
                    batch: int, max_batch: int | None = None) -> list[str]:
    """The ``trtexec`` argument vector for one engine build."""
    dims = f"{in_chans}x{img_size}x{img_size}"
    max_batch = max_batch or max(batch, 2 * batch)
    cmd = [
        "trtexec",
        f"--onnx={onnx_name}",
        f"--saveEngine={engine_name}",
        f"--minShapes={INPUT_NAME}:1x{dims}",
        f"--optShapes={INPUT_NAME}:{batch}x{dims}",
        f"--maxShapes={INPUT_NAME}:{max_batch}x{dims}",
        "--timingCacheFile=timing.cache",
        f"--exportTimes=times.{precision}.json",
    ]
    if precision in ("fp16", "int8"):
        cmd.append("--fp16")
    if precision == "int8":
        cmd.append("--int8")
    return cmd


def write_kit(directory: Path, *, onnx_fp32: Path, precision: str, in_chans: int, img_size: int, batch: int,
              reference_inputs: dict[int, np.ndarray], reference_outputs: dict[int, np.ndarray],
              onnx_int8: Path | None = None, calibration: np.ndarray | None = None, target: str = "") -> list[Path]:
    """Write the kit's files into ``directory`` (which the caller renames into place)."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(onnx_fp32, directory / "model.onnx")
    files = [directory / "model.onnx"]
    source = "model.onnx"
    if precision == "int8":
        if onnx_int8 is None:
            raise ValueError("an INT8 kit needs the QDQ INT8 ONNX model")
        shutil.copyfile(onnx_int8, directory / "model.int8.onnx")
        files.append(directory / "model.int8.onnx")
        source = "model.int8.onnx"
        if calibration is not None:
            np.save(directory / "calibration.npy", calibration.astype(np.float32))
            files.append(directory / "calibration.npy")
    engine = f"model.{precision}.engine"
    cmd = trtexec_command(source, engine, precision=precision, in_chans=in_chans, img_size=img_size, batch=batch)
    script = directory / "build_engine.sh"
    script.write_text(
        "#!/usr/bin/env bash\n"
        f"# Build the {precision.upper()} TensorRT engine on the target device{(' (' + target + ')') if target else ''},\n"
        "# then check it against onnxruntime's reference outputs.\n"
        "set -euo pipefail\n"
        'cd "$(dirname "$0")"\n'
        + " ".join(shlex.quote(c) for c in cmd) + "\n"
        + f"python3 check_engine.py {engine}\n"
    )
    script.chmod(0o755)
    files.append(script)
    arrays = {f"input_{b}": x for b, x in reference_inputs.items()}
    arrays.update({f"output_{b}": y for b, y in reference_outputs.items()})
    np.savez(directory / "reference.npz", **arrays)
    files.append(directory / "reference.npz")
    shutil.copyfile(TEMPLATE, directory / "check_engine.py")
    files.append(directory / "check_engine.py")
    return files
