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
import io
import json
import math
import random
from pathlib import Path
from typing import Callable

from factory.core.shapes import ArchConfig, DescendantShape
from factory.device.fit import CALIBRATION_FIELDS
from factory.errors import FactoryError
from factory.io import owned_directory

def spread_by_latency(shapes: list[DescendantShape], latency: Callable[[DescendantShape], float], count: int,
                      seed: int = 0) -> list[DescendantShape]:
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


def write_kit(profile, arch: ArchConfig, space, out: str | Path, latency, *, count: int = 12, seed: int = 0,
              log: Callable[[str], None] = print) -> Path:
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
            export_onnx(build_vit(arch, s, seed=0).eval(), tmp / "models" / name, img_size=s.img_size, in_chans=arch.in_chans,
                        verify=False)
            if profile.hardware.runtime == "tensorrt" and profile.precision != "fp32":
                typed_model(tmp / "models" / name, profile.precision, (profile.batch, arch.in_chans, s.img_size, s.img_size))
            writer.writerow([s.depth, s.embed_dim, s.num_heads, s.mlp_ratio, s.img_size, s.patch_size, s.num_classes,
                             profile.batch, f"models/{name}"])
            log(f"kit: {name} (predicted {cost.latency_ms(s):.3f} ms)")
        (tmp / "shapes.csv").write_text(rows.getvalue())
        (tmp / "measure.py").write_text(MEASURE_SCRIPT)
        (tmp / "kit.json").write_text(json.dumps({"profile": profile.name, "runtime": profile.hardware.runtime,
                                                  "precision": profile.precision, "batch": profile.batch,
                                                  "in_chans": arch.in_chans, "count": len(shapes)}, indent=2))
        (tmp / "README.md").write_text(README.format(name=profile.name, runtime=profile.hardware.runtime, count=len(shapes),
                                                     precision=profile.precision))
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

MEASURE_SCRIPT = r'''#!/usr/bin/env python3
"""Time every model of this calibration kit on this device; write calibration.csv + calibration.json.

Stand-alone (numpy and the runtime only). Usage: python3 measure.py [--runtime R] [--repeats N]
Exit codes: 0 measured, 1 a measurement failed (the model or the runtime), 2 a usage error.
"""
import argparse
import csv
import datetime
import json
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
KIT = json.loads((HERE / "kit.json").read_text())


def median_ms(run, repeats, warmup=3):
    """Median wall time (ms) of ``run()`` after ``warmup`` calls."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def onnxruntime_ms(path, shape, repeats):
    import numpy as np
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
    return median_ms(lambda: sess.run(None, feed), repeats), ort.__version__


def openvino_ms(path, shape, repeats):
    import numpy as np
    import openvino as ov

    compiled = ov.Core().compile_model(str(path), "CPU", {"PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    return median_ms(lambda: request.infer([x]), repeats), ov.__version__


def find_trtexec():
    """``$TRTEXEC``, else ``trtexec`` on the PATH, else JetPack's ``/usr/src/tensorrt/bin/trtexec``."""
    import os
    import shutil

    for candidate in (os.environ.get("TRTEXEC"), shutil.which("trtexec"), "/usr/src/tensorrt/bin/trtexec"):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    usage("no trtexec found (looked at $TRTEXEC, the PATH and /usr/src/tensorrt/bin); install TensorRT or set TRTEXEC")


def trtexec_major(trtexec):
    """TensorRT's major version from ``trtexec --help`` ("TensorRT v100300" -> 10); None if unreadable."""
    try:
        out = subprocess.run([trtexec, "--help"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = re.search(r"TensorRT v(\d+)", out.stdout + out.stderr)
    if not found:
        return None
    v = int(found.group(1))
    return v // 10000 if v >= 10000 else v // 1000


def tensorrt_ms(path, shape, repeats):
    """trtexec's median GPU compute time: strongly typed from the kit's typed model (TensorRT >= 9, the
    only mode of TensorRT 11), the weak-typing precision flags on the FP32 model for older ones."""
    trtexec = find_trtexec()
    major = trtexec_major(trtexec)
    typed = path.with_suffix(f".{KIT['precision']}.onnx")
    if KIT["precision"] != "fp32" and (major is None or major >= 9):
        if not typed.is_file():
            usage(f"{typed.name} is missing from the kit; re-create it with peg-factory calibrate")
        path, precision = typed, ["--stronglyTyped"]
    elif KIT["precision"] == "fp32":
        precision = ["--stronglyTyped"] if major is None or major >= 9 else []
    else:
        precision = {"fp16": ["--fp16"], "int8": ["--int8", "--fp16"]}[KIT["precision"]]
    dims = "x".join(str(d) for d in shape)
    cmd = [trtexec, f"--onnx={path}", f"--shapes=images:{dims}", "--noDataTransfers", "--useCudaGraph",
           f"--iterations={repeats}", "--warmUp=200", *precision]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"trtexec exited {done.returncode}: {tail[0][:300]}")
    out = done.stdout
    median = re.search(r"GPU Compute Time:.*?median =? ?([0-9.]+) ms", out)  # "median = x ms" (older: "median x ms")
    if median is None:
        raise RuntimeError(f"could not find the GPU compute time in trtexec's output for {path}")
    version = re.search(r"TensorRT version: ([0-9.]+)", out) or re.search(r"\[TensorRT v(\d+)\]", out)
    return float(median.group(1)), version.group(1) if version else "?"


def usage(message):
    """A usage error (wrong arguments, a missing tool or file): one line, exit 2."""
    print(f"measure.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def fail(message):
    """A measurement that failed (the model or the runtime): one line, exit 1."""
    print(f"measure.py: failed: {message}", file=sys.stderr)
    raise SystemExit(1)


def read_shapes():
    try:
        with open(HERE / "shapes.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        usage(f"cannot read shapes.csv ({exc}); re-create the kit with peg-factory calibrate")
    if not rows:
        usage("shapes.csv lists no models; re-create the kit with peg-factory calibrate")
    for row in rows:
        if not all(row.get(k) for k in ("batch", "img_size", "file")):
            usage(f"shapes.csv row {row} lacks batch, img_size or file; re-create the kit with peg-factory calibrate")
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime", default=KIT["runtime"], choices=["onnxruntime", "openvino", "tensorrt"])
    parser.add_argument("--repeats", type=int, default=50, help="timed runs per model (>= 1)")
    args = parser.parse_args()
    if args.repeats < 1:
        usage(f"--repeats must be >= 1, got {args.repeats}")
    timer = {"onnxruntime": onnxruntime_ms, "openvino": openvino_ms, "tensorrt": tensorrt_ms}[args.runtime]
    if args.runtime == "tensorrt":
        find_trtexec()
    rows, version = [], "?"
    for row in read_shapes():
        model = HERE / row["file"]
        if not model.is_file():
            usage(f"{row['file']} is missing from the kit; re-create it with peg-factory calibrate")
        shape = (int(row["batch"]), KIT["in_chans"], int(row["img_size"]), int(row["img_size"]))
        try:
            ms, version = timer(model, shape, args.repeats)
        except ImportError as exc:
            usage(f"the {args.runtime} runtime is not installed here ({exc}); install it or pass --runtime")
        except Exception as exc:  # noqa: BLE001 - the runtime rejected the model or failed running it
            fail(f"{row['file']}: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}")
        rows.append({**{k: v for k, v in row.items() if k != "file"}, "runtime": args.runtime, "latency_ms": f"{ms:.5f}"})
        print(f"{row['file']}: {ms:.4f} ms", flush=True)
    tmp = HERE / "calibration.csv.tmp"
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(HERE / "calibration.csv")
    meta = {"runtime": args.runtime, "runtime_version": version, "host": platform.node(), "machine": platform.machine(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "repeats": args.repeats,
            "profile": KIT["profile"], "precision": KIT["precision"]}
    (HERE / "calibration.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {HERE / 'calibration.csv'} ({len(rows)} rows) and calibration.json")


if __name__ == "__main__":
    main()
'''
