"""On-device TensorRT build kits, for TensorRT 10 (JetPack 6) and 11 alike.

A TensorRT engine only runs on the GPU model and TensorRT version that built it, so for any
target other than this machine peg-factory ships a kit that builds and checks the engine *on the
device*. TensorRT 11 builds strongly typed networks only (precision lives in the ONNX graph:
``--fp16``/``--int8``, ``BuilderFlag.FP16``/``INT8`` and calibrators are gone) and TensorRT 10 has
``--stronglyTyped``, so the kit carries *typed* ONNX models and builds from them:

- ``model.onnx`` (FP32), ``model.fp16.onnx`` (FP16 weights and compute, FP32 inputs/outputs and
  FP32 LayerNorm/Softmax: :func:`export.quantize.to_fp16`) for FP16 profiles, ``model.int8.onnx``
  (explicit quantisation, QuantizeLinear/DequantizeLinear calibrated on the task's images:
  :func:`export.quantize.to_int8`) for INT8 profiles -- each checked against PyTorch with
  onnxruntime on the build machine (``export.json``);
- ``build_engine.sh``: finds ``trtexec`` (``$TRTEXEC``, the PATH, JetPack's
  ``/usr/src/tensorrt/bin``), reads its version, and runs :func:`trtexec_command`: ``--stronglyTyped``
  on the typed model for TensorRT >= :data:`STRONG_TYPING_SINCE`, the weak-typing flags
  (``--fp16``, ``--int8``) only for older ones; shapes min 1 / opt and max the profile's batch;
- ``reference.npz``: inputs at batch 1 and the profile's batch (the opt shape) with onnxruntime's
  FP32 logits;
- ``check_engine.py``: runs the engine on those inputs and compares (0 pass, 1 fail, 2 usage);
- ``README.md``: the steps, on the device.
"""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path

import numpy as np

from .onnx_export import INPUT_NAME

TEMPLATE = Path(__file__).parent / "templates" / "check_engine.py"
#: trtexec discovery (``$TRTEXEC``, the PATH, JetPack's) and its version, copied into this kit and the calibration kit.
TRTEXEC_TOOLS = Path(__file__).parent / "templates" / "trtexec_tools.py"
#: The first TensorRT major version whose trtexec builds strongly typed networks (``--stronglyTyped``).
STRONG_TYPING_SINCE = 9
#: The kit's model for each precision: the typed graph a strongly typed build reads.
TYPED_MODEL = {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}


def trtexec_command(
    onnx_name: str,
    engine_name: str,
    *,
    precision: str,
    in_chans: int,
    img_size: int,
    batch: int,
    strongly_typed: bool = True,
    trtexec: str = "trtexec",
) -> list[str]:
    """The ``trtexec`` argument vector for one engine build: typed (``--stronglyTyped``, the
    precision is the ONNX graph's) or, for TensorRT < :data:`STRONG_TYPING_SINCE`, weakly typed
    (``--fp16``, ``--int8``). Shapes: min batch 1, opt and max the profile's ``batch``."""
    dims = f"{in_chans}x{img_size}x{img_size}"
    cmd = [
        trtexec,
        f"--onnx={onnx_name}",
        f"--saveEngine={engine_name}",
        f"--minShapes={INPUT_NAME}:1x{dims}",
        f"--optShapes={INPUT_NAME}:{batch}x{dims}",
        f"--maxShapes={INPUT_NAME}:{batch}x{dims}",
        "--timingCacheFile=timing.cache",
        f"--exportTimes=times.{precision}.json",
    ]
    if strongly_typed:
        cmd.append("--stronglyTyped")
    else:
        cmd += {"fp16": ["--fp16"], "int8": ["--int8", "--fp16"]}.get(precision, [])
    return cmd


SCRIPT = """#!/usr/bin/env bash
# Build the {upper} TensorRT engine on the target device{target}, then check it against onnxruntime's
# reference outputs. TensorRT >= {since}: strongly typed, from {typed}; older: weak-typing flags, from {weak}.
set -euo pipefail
usage="usage: bash build_engine.sh [-h]
Builds {engine} here with trtexec (found at \\$TRTEXEC, on the PATH or in /usr/src/tensorrt/bin; set TRTEXEC
to choose one), then runs check_engine.py on it. Takes no arguments. Exit codes: 0 built and checked,
1 trtexec failed, wrote no engine or the check failed, 2 no trtexec or a usage error."
case "${{1:-}}" in
  "") ;;
  -h|--help) echo "$usage"; exit 0 ;;
  *) echo "build_engine.sh: error: unknown argument $1 (it takes none; -h for help)" >&2; exit 2 ;;
esac
cd "$(dirname "$0")"
# trtexec discovery and its version: trtexec_tools.py, shared with the latency calibration kit
if ! TRTEXEC=$(python3 trtexec_tools.py find); then exit 2; fi
MAJOR=$(python3 trtexec_tools.py major "$TRTEXEC")
if [ -z "$MAJOR" ]; then
  echo "build_engine.sh: could not read trtexec's TensorRT version; assuming strong typing" >&2
  MAJOR={since}
fi
echo "TensorRT $MAJOR ($TRTEXEC)"
if [ "$MAJOR" -ge {since} ]; then
{typed_cmd}
else
{weak_cmd}
fi
if [ ! -s {engine} ]; then
  echo "build_engine.sh: error: trtexec exited 0 but wrote no {engine}; see its output above" >&2
  exit 1
fi
python3 check_engine.py {engine}
"""

README = """# TensorRT build kit{target}

Build and check the {upper} engine on the device itself (an engine runs only on the GPU and TensorRT
version that built it).

1. Copy this folder to the device (JetPack 6 ships TensorRT 10; desktop GPUs may have TensorRT 11).
2. `bash build_engine.sh` finds `trtexec` (`$TRTEXEC`, the PATH, `/usr/src/tensorrt/bin`), builds
   `{engine}` from `{typed}` with `--stronglyTyped` (TensorRT >= {since}; older versions get
   `{weak}` with the weak-typing flags), batch 1 to {batch}, and runs the check.
3. `python3 check_engine.py {engine}` compares the engine's logits with onnxruntime's FP32 ones in
   `reference.npz` (batch 1 and {batch}). It needs the `tensorrt` Python package and either
   `polygraphy` or `cuda-python` (`pip install polygraphy` / `pip install cuda-python`; a CUDA build of
   torch also works). Exit code 0: pass, 1: the engine disagrees, 2: a usage error (no engine, no
   reference, a missing package).

Files: {files}.
"""


def write_kit(
    directory: Path,
    *,
    onnx_fp32: Path,
    precision: str,
    in_chans: int,
    img_size: int,
    batch: int,
    reference_inputs: dict[int, np.ndarray],
    reference_outputs: dict[int, np.ndarray],
    onnx_typed: Path | None = None,
    target: str = "",
) -> list[Path]:
    """Write the kit's files into ``directory`` (which the caller publishes). ``onnx_typed`` is the
    FP16 or INT8 (Q/DQ) model for those precisions."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(onnx_fp32, directory / "model.onnx")
    typed = TYPED_MODEL[precision]
    if precision != "fp32":
        if onnx_typed is None:
            raise ValueError(f"a {precision} kit needs the typed {typed}")
        shutil.copyfile(onnx_typed, directory / typed)
    weak = "model.int8.onnx" if precision == "int8" else "model.onnx"
    engine = f"model.{precision}.engine"
    common = dict(precision=precision, in_chans=in_chans, img_size=img_size, batch=batch, trtexec='"$TRTEXEC"')

    def line(cmd: list[str]) -> str:
        return "  " + " ".join(c if c == '"$TRTEXEC"' else shlex.quote(c) for c in cmd)

    script = directory / "build_engine.sh"
    fields = dict(
        upper=precision.upper(),
        target=f" ({target})" if target else "",
        since=STRONG_TYPING_SINCE,
        typed=typed,
        weak=weak,
        engine=engine,
        batch=batch,
    )
    script.write_text(
        SCRIPT.format(
            **fields,
            typed_cmd=line(trtexec_command(typed, engine, **common)),
            weak_cmd=line(trtexec_command(weak, engine, strongly_typed=False, **common)),
        )
    )
    script.chmod(0o755)
    arrays = {f"input_{b}": x for b, x in reference_inputs.items()}
    arrays.update({f"output_{b}": y for b, y in reference_outputs.items()})
    np.savez(directory / "reference.npz", **arrays)
    shutil.copyfile(TEMPLATE, directory / "check_engine.py")
    shutil.copyfile(TRTEXEC_TOOLS, directory / TRTEXEC_TOOLS.name)
    names = sorted(
        {"model.onnx", typed, "build_engine.sh", "reference.npz", "check_engine.py", TRTEXEC_TOOLS.name, "README.md"}
    )
    (directory / "README.md").write_text(README.format(**fields, files=", ".join(f"`{n}`" for n in names)))
    return [directory / n for n in names]
