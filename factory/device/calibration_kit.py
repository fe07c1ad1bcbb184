"""The device calibration kit: shapes to time on a device the factory cannot reach.

``peg-factory calibrate --profile P --out kit/`` writes

- ``models/*.onnx``: ``K`` descendants of the profile's search space (random weights: latency does
  not depend on them), spread log-uniformly over the profile's predicted latency range so the fit
  sees small and large models alike, at the profile's batch;
- ``shapes.csv``: their shapes, batch and file;
- ``measure.py``: a stand-alone script (numpy + the runtime, no peg-factory needed) that times each
  model with the profile's runtime -- ``trtexec`` for TensorRT (median GPU compute time, the
  profile's precision), onnxruntime or OpenVINO on CPU boards -- and writes ``calibration.csv``
  (the columns :func:`factory.device.fit.read_calibration_csv` reads) and ``calibration.json`` (what it
  was measured with: runtime and version, host, date);
- ``README.md``: the steps.

Back on the build machine, the profile's ``calibration: kit/calibration.csv`` fits the roofline's
efficiencies to those rows (:func:`factory.device.fit.calibrate`); the cost model's ``method`` names the
CSV and what ``calibration.json`` says it was measured with.
"""

from __future__ import annotations

import csv
import importlib
import io
import json
import math
import random
import shutil
from collections.abc import Callable
from pathlib import Path

from export.trt_kit import TRTEXEC_TOOLS
from factory.core.shapes import ArchConfig, DescendantShape
from factory.device.fit import CALIBRATION_FIELDS
from factory.device.runtimes import runtime_spec
from factory.errors import FactoryError
from factory.io import owned_directory

#: The kit's timing script: stand-alone (numpy and the runtime), a real file linted and tested as code.
MEASURE_TEMPLATE = Path(__file__).parent / "templates" / "measure.py"


def spread_by_latency(
    shapes: list[DescendantShape], latency: Callable[[DescendantShape], float], count: int, seed: int = 0
) -> list[DescendantShape]:
    """``count`` distinct shapes whose predicted latencies are spread log-uniformly over the range
    of ``shapes``: for each of ``count`` evenly spaced log-latency targets, the nearest unused shape."""
    if not shapes:
        raise FactoryError("no shapes to calibrate with: the search space is empty")
    rng = random.Random(seed)
    pool = rng.sample(shapes, min(len(shapes), 4000))
    timed = sorted((math.log(latency(s)), s.label(), s) for s in pool)
    lo, hi = timed[0][0], timed[-1][0]
    chosen: dict[str, DescendantShape] = {}
    for i in range(count):
        target = lo + (hi - lo) * (i + 0.5) / count
        for _, label, s in sorted(timed, key=lambda t: abs(t[0] - target)):
            if label not in chosen:
                chosen[label] = s
                break
    return list(chosen.values())


def write_kit(
    profile,
    arch: ArchConfig,
    space,
    out: str | Path,
    latency,
    *,
    count: int = 12,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> Path:
    """Write the kit for ``profile`` into ``out`` (:func:`factory.io.owned_directory`: a complete kit or none, the
    user's own files in ``out`` left alone), its shapes spread
    over the predictions of ``latency`` (a :class:`factory.device.latency.LatencyModel`)."""
    from export.onnx_export import export_onnx
    from factory.core.timm_vit import build_vit

    cost = latency
    shapes = spread_by_latency(list(space.enumerate()), cost.latency_ms, count, seed)
    rows = io.StringIO()
    writer = csv.writer(rows)
    writer.writerow([*CALIBRATION_FIELDS, "file"])
    out = Path(out)
    with owned_directory(out, writer="calibrate") as tmp:
        (tmp / "models").mkdir()
        for s in shapes:
            name = f"{s.label()}-b{profile.batch}.onnx"
            export_onnx(
                build_vit(arch, s, seed=0).eval(),
                tmp / "models" / name,
                img_size=s.img_size,
                in_chans=arch.in_chans,
                verify=False,
            )
            spec = runtime_spec(profile.hardware.runtime)
            if spec.kit_model is not None:  # the runtime's own format of the same model (e.g. ExecuTorch's .pte)
                module, _, function = spec.kit_model.partition(":")
                getattr(importlib.import_module(module), function)(
                    tmp / "models" / name,
                    build_vit(arch, s, seed=0).eval(),
                    (profile.batch, arch.in_chans, s.img_size, s.img_size),
                )
            if spec.typed_kit_models and profile.precision != "fp32":
                typed_model(
                    tmp / "models" / name, profile.precision, (profile.batch, arch.in_chans, s.img_size, s.img_size)
                )
            writer.writerow(
                [
                    s.depth,
                    s.embed_dim,
                    s.num_heads,
                    s.mlp_ratio,
                    s.img_size,
                    s.patch_size,
                    s.num_classes,
                    profile.batch,
                    f"models/{name}",
                ]
            )
            log(f"kit: {name} (predicted {cost.latency_ms(s):.3f} ms)")
        (tmp / "shapes.csv").write_text(rows.getvalue())
        shutil.copyfile(MEASURE_TEMPLATE, tmp / "measure.py")
        shutil.copyfile(TRTEXEC_TOOLS, tmp / TRTEXEC_TOOLS.name)
        (tmp / "kit.json").write_text(
            json.dumps(
                {
                    "profile": profile.name,
                    "runtime": profile.hardware.runtime,
                    "timer": runtime_spec(profile.hardware.runtime).kit_timer,
                    "precision": profile.precision,
                    "batch": profile.batch,
                    "in_chans": arch.in_chans,
                    "count": len(shapes),
                },
                indent=2,
            )
        )
        (tmp / "README.md").write_text(
            README.format(
                name=profile.name, runtime=profile.hardware.runtime, count=len(shapes), precision=profile.precision
            )
        )
    return out


def typed_model(onnx_path: Path, precision: str, shape: tuple[int, ...]) -> Path:
    """The FP16 (``.fp16.onnx``) or Q/DQ INT8 (``.int8.onnx``) twin of a kit model, for a strongly typed
    TensorRT build (TensorRT 11 has no precision flags). The INT8 scales come from random inputs: the
    kit times the models, it does not score them."""
    import numpy as np

    from export.quantize import to_fp16, to_int8

    target = onnx_path.with_suffix(f".{precision}.onnx")
    if precision == "fp16":
        return to_fp16(onnx_path, target)
    calibration = np.random.default_rng(0).standard_normal((8, *shape[1:]), dtype=np.float32)
    return to_int8(onnx_path, target, calibration)[0]


README = """# Latency calibration kit for `{name}`

{count} ViT descendants spread over the latency range the searcher considers for this device
(`models/*.onnx`, random weights), and a script that times them with **{runtime}** ({precision}).

1. Copy this folder to the device.
2. Run `python3 measure.py` there (needs numpy and the runtime: `trtexec` for TensorRT -- `$TRTEXEC`,
   the PATH or JetPack's `/usr/src/tensorrt/bin` --, `pip install onnxruntime` or `openvino` on CPU boards; `--runtime` overrides the
   profile's, `--repeats` sets the timing length). Keep the device otherwise idle.
3. Copy `calibration.csv` and `calibration.json` back and add `calibration: path/to/calibration.csv`
   to the profile. `peg-factory search` then fits its latency model to your measurements and says
   so (`latency by roofline calibrated on N rows of calibration.csv (...)`).
"""
