#!/usr/bin/env python3
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
sys.path.insert(0, str(HERE))
import trtexec_tools  # noqa: E402  # copied beside this script, shared with the TensorRT build kit

KIT = {}  # kit.json, read by main()


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


def executorch_ms(path, shape, repeats):
    """The kit model's ExecuTorch twin (``.pte``, XNNPACK) timed by ``executorch.runtime`` where Python and
    ``pip install executorch`` are there (an ARM board); on a phone, run ExecuTorch's ``executor_runner``
    over the same ``.pte`` files (adb) and put its times in calibration.csv."""
    try:
        import torch
        from executorch.runtime import Runtime
    except ImportError:
        usage(
            "executorch is not installed here: pip install executorch, or time models/*.pte with ExecuTorch's "
            "executor_runner on the device and fill calibration.csv"
        )
    import executorch

    method = Runtime.get().load_program(str(path.with_suffix(".pte"))).load_method("forward")
    x = [torch.randn(*shape)]
    return median_ms(lambda: method.execute(x), repeats), getattr(executorch, "__version__", "unknown")


def litert_ms(path, shape, repeats):
    """The kit model's LiteRT twin (``.tflite``) timed by ``ai_edge_litert``'s Interpreter with its XNNPACK delegate
    where Python and ``pip install ai-edge-litert`` are there (an ARM board); on a phone, run LiteRT's
    ``benchmark_model`` over the same ``.tflite`` files (adb) and put its times in calibration.csv."""
    try:
        import numpy as np
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        usage(
            "ai-edge-litert is not installed here: pip install ai-edge-litert, or time models/*.tflite with LiteRT's "
            "benchmark_model on the device and fill calibration.csv"
        )
    import ai_edge_litert

    it = Interpreter(model_path=str(path.with_suffix(".tflite")))
    it.allocate_tensors()
    detail = it.get_input_details()[0]  # an INT8 model's input may be INT8: random values of its own type
    it.set_tensor(detail["index"], np.random.randn(*shape).astype(np.float32).astype(detail["dtype"]))
    return median_ms(it.invoke, repeats), getattr(ai_edge_litert, "__version__", "unknown")


def coreml_ms(path, shape, repeats):
    """The kit model's Core ML twin (``.mlpackage``) timed by ``coremltools`` on a Mac (Core ML's runtime is
    only on Apple platforms); on an iPhone, open the same packages in Xcode's Core ML performance report and
    put its median times in calibration.csv."""
    import platform

    try:
        import coremltools as ct
        import numpy as np
    except ImportError:
        usage(
            "coremltools is not installed here: pip install coremltools (on a Mac), or time models/*.mlpackage "
            "with Xcode's Core ML performance report and fill calibration.csv"
        )
    if platform.system() != "Darwin":
        usage(
            "Core ML runs only on macOS/iOS: run this kit on a Mac, or time models/*.mlpackage with Xcode's "
            "Core ML performance report and fill calibration.csv"
        )
    model = ct.models.MLModel(str(path.with_suffix(".mlpackage")), compute_units=ct.ComputeUnit.ALL)
    x = {"images": np.random.randn(*shape).astype(np.float32)}
    return median_ms(lambda: model.predict(x), repeats), ct.__version__


def find_trtexec():
    """The trtexec to use (:func:`trtexec_tools.find_trtexec`), or a usage error naming where it looked."""
    found = trtexec_tools.find_trtexec()
    if found is None:
        usage(trtexec_tools.NOT_FOUND)
    return found


def tensorrt_ms(path, shape, repeats):
    """trtexec's median GPU compute time: strongly typed from the kit's typed model (TensorRT >= 9, the
    only mode of TensorRT 11), the weak-typing precision flags on the FP32 model for older ones."""
    trtexec = find_trtexec()
    major = trtexec_tools.trtexec_major(trtexec)
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
    cmd = [
        trtexec,
        f"--onnx={path}",
        f"--shapes=images:{dims}",
        "--noDataTransfers",
        "--useCudaGraph",
        f"--iterations={repeats}",
        "--warmUp=200",
        *precision,
    ]
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


#: The timing function of each runtime (factory.device.runtimes.RuntimeSpec.kit_timer names it).
TIMERS = {
    "onnxruntime": onnxruntime_ms,
    "openvino": openvino_ms,
    "tensorrt": tensorrt_ms,
    "executorch": executorch_ms,
    "litert": litert_ms,
    "coreml": coreml_ms,
}


def main():
    try:
        KIT.update(json.loads((HERE / "kit.json").read_text()))
    except (OSError, ValueError) as exc:
        usage(f"cannot read kit.json ({exc}); re-create the kit with peg-factory calibrate")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--runtime",
        default=KIT["runtime"],
        choices=sorted(TIMERS),
        help="the runtime to time with (default: the profile's, from kit.json)",
    )
    parser.add_argument("--repeats", type=int, default=50, help="timed runs per model (>= 1)")
    args = parser.parse_args()
    if args.repeats < 1:
        usage(f"--repeats must be >= 1, got {args.repeats}")
    timer = TIMERS[args.runtime]
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
        rows.append(
            {**{k: v for k, v in row.items() if k != "file"}, "runtime": args.runtime, "latency_ms": f"{ms:.5f}"}
        )
        print(f"{row['file']}: {ms:.4f} ms", flush=True)
    tmp = HERE / "calibration.csv.tmp"
    with open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(HERE / "calibration.csv")
    meta = {
        "runtime": args.runtime,
        "runtime_version": version,
        "host": platform.node(),
        "machine": platform.machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "repeats": args.repeats,
        "profile": KIT["profile"],
        "precision": KIT["precision"],
    }
    (HERE / "calibration.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {HERE / 'calibration.csv'} ({len(rows)} rows) and calibration.json")


if __name__ == "__main__":
    main()
