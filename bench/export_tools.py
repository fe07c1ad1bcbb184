"""What the users' own tools get from a build: ONNX node counts before/after onnxslim, the typed
FP16 and Q/DQ INT8 models' accuracy against FP32, OpenVINO at the precision that runs, and timm's
``local-dir`` loading against the ONNX -- measured on the default build's models.

Runs ``peg-factory build`` (the README's main job: the demo ancestry, digits) for a GPU profile
(FP16 TensorRT kit), the shipped INT8 TensorRT profile (Q/DQ kit) and the OpenVINO Pi 5 profile,
then reads each device's ``export.json`` and loads its folder with timm.

    python bench/export_tools.py --json bench/out/export_tools.json --md bench/out/export_tools.md
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from common import write_outputs

ROOT = Path(__file__).resolve().parents[1]
PROFILES = ("jetson_orin", "jetson_orin_nano_int8", "raspberry_pi5_openvino")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--md", type=Path, default=None)
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp()) / "build"
    cmd = [sys.executable, "-m", "factory.cli", "build", "--out", str(out), "--steps", str(args.steps)]
    for p in PROFILES:
        cmd += ["--profile", p]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True)
    import onnxruntime as ort
    import timm
    import torch

    rows = []
    for name in PROFILES:
        dev = out / name
        record = json.loads((dev / "export" / "export.json").read_text())
        art = record["artifacts"]
        onnx = art["onnx"]
        model = timm.create_model(f"local-dir:{dev}", pretrained=True).eval()
        x = np.random.default_rng(0).standard_normal((4, 1, 28, 28)).astype(np.float32)
        with torch.no_grad():
            timm_diff = float(
                np.abs(
                    model(torch.from_numpy(x)).numpy()
                    - ort.InferenceSession(str(dev / "export" / "model.onnx")).run(None, {"images": x})[0]
                ).max()
            )
        row = {
            "device": name,
            "nodes_exported": onnx["nodes"]["exported"],
            "nodes_simplified": onnx["nodes"].get("simplified"),
            "onnx_max_abs_diff": max(onnx["max_abs_diff"].values()),
            "fp32_val_accuracy": onnx.get("val_accuracy"),
            "timm_local_dir_max_abs_diff": timm_diff,
        }
        trt = art.get("trt")
        if trt:
            row.update(
                trt_typed_model=trt.get("typed_model"),
                trt_typed_val_accuracy=trt.get("typed_val_accuracy"),
                trt_typed_accuracy_delta=None
                if trt.get("typed_accuracy_drop_vs_fp32") is None
                else 0.0 - trt["typed_accuracy_drop_vs_fp32"],
            )
        if "onnx-int8" in art:
            row["onnx_int8_accuracy_delta"] = 0.0 - art["onnx-int8"]["accuracy_drop_vs_fp32"]
        for fmt in ("openvino", "openvino-bf16", "openvino-int8"):
            if fmt in art:
                a = art[fmt]
                row[fmt] = {
                    "precision": a["inference_precision"],
                    "test_accuracy_delta": 0.0 - a.get("accuracy_drop_vs_fp32", 0.0),
                    "b1_median_ms": a["latency_ms_b1"],
                    "b1_p90_ms": a["latency_ms_b1_p90"],
                    "host_load_1min": a["host_load_1min"],
                }
        row["deploy"] = record["deploy"]["format"]
        rows.append(row)
    lines = [
        "| device | ONNX nodes exported -> simplified | ONNX vs PyTorch | timm local-dir vs ONNX | TensorRT typed model | "
        "typed accuracy vs FP32 (val) | onnx-int8 vs FP32 (val) | "
        "OpenVINO (precision: test acc. delta, b1 median/p90 ms, load) | deploy |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ov = "; ".join(
            f"{f} ({v['precision']}: {v['test_accuracy_delta']:+.4f}, {v['b1_median_ms']:.3f}/{v['b1_p90_ms']:.3f} ms, "
            f"load {v['host_load_1min']})"
            for f in ("openvino", "openvino-bf16", "openvino-int8")
            if (v := r.get(f))
        )
        delta = r.get("trt_typed_accuracy_delta")
        int8 = r.get("onnx_int8_accuracy_delta")
        lines.append(
            f"| {r['device']} | {r['nodes_exported']} -> {r['nodes_simplified']} | {r['onnx_max_abs_diff']:.1e} | "
            f"{r['timm_local_dir_max_abs_diff']:.1e} | {r.get('trt_typed_model') or ''} | "
            f"{'' if delta is None else f'{delta:+.4f}'} | {'' if int8 is None else f'{int8:+.4f}'} | {ov} | {r['deploy']} |"
        )
    write_outputs(rows, "\n".join(lines), args.json, args.md)


if __name__ == "__main__":
    main()
