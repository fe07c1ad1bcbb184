"""One model, four runtimes on this host: ONNX (onnxruntime), OpenVINO IR, ExecuTorch ``.pte`` (XNNPACK) and LiteRT
``.tflite`` (XNNPACK), FP32 and INT8, batch 1, for three ViT shapes at 224 px.

Each shape is built once (random weights, seeded: latency does not depend on them) and converted the way the
export converts it (the formats' own functions: ``export_onnx``, OpenVINO's converter, ExecuTorch's
``lower`` with the explicit attention the export chooses, LiteRT's ``kit_model``). INT8: onnxruntime's static
Q/DQ (:func:`export.quantize.to_int8`), NNCF for OpenVINO, PT2E for XNNPACK (ExecuTorch, LiteRT), all
calibrated on the same 16 random images (timing does not depend on the calibration). Every runtime runs with
the host's threads; each figure is the median of ``--repeats`` timed runs after 3 warm-ups, the runtimes of a
shape timed back to back (the VM's speed drifts over minutes, far less within one shape's round).

LiteRT cannot share the main venv (its typing-extensions pin breaks coremltools): its conversions and timings
run in ``--litert-python`` (default ``.venv-litert/bin/python``) as a worker of this script, on the same seeded
models; without that venv its column says so.

Reported: ms per runtime and precision, the delegate's share of operators (ExecuTorch, LiteRT), and each
INT8's speed-up over its own FP32 -- the measured ratios a CPU target's deploy choice should use, not a
datasheet's 4x.

Usage: python bench/runtime_latency.py [--repeats 30] --json PATH [--md PATH]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import run_and_write

from factory.core.shapes import ArchConfig, DescendantShape
from factory.core.timm_vit import build_vit

ARCH = ArchConfig(embed_dim=384, depth=12, num_heads=6, mlp_hidden=1536, img_size=224, patch_size=16, num_classes=1000)
#: a shallow DeiT-Tiny, DeiT-Tiny, DeiT-Small
SHAPES = (
    DescendantShape(4, 192, 3, 4.0, 224, 16, 1000),
    DescendantShape(12, 192, 3, 4.0, 224, 16, 1000),
    DescendantShape(12, 384, 6, 4.0, 224, 16, 1000),
)
CALIB = 16


def model(shape: DescendantShape):
    return build_vit(ARCH, shape, seed=0).eval()


def images(n: int, seed: int):
    import numpy as np

    return np.random.default_rng(seed).standard_normal((n, 3, 224, 224), dtype=np.float32)


def litert_worker(shape_index: int, repeats: int) -> dict:
    """Convert and time one shape in this (LiteRT) venv: FP32 and PT2E INT8."""
    import torch

    from export.context import attention_form, pt2e_quantised
    from export.litert_export import convert, coverage, interpreter, tflite_latency_ms

    net = model(SHAPES[shape_index])
    x1 = images(1, 1)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "m.tflite"
        with attention_form(net, False):
            convert(net, torch.from_numpy(x1), fp32)
        it = interpreter(fp32)
        out["litert"] = {"ms": tflite_latency_ms(it, x1, repeats=repeats), **coverage(it)}
        from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
        from litert_torch.quantize.quant_config import QuantConfig

        quantizer = PT2EQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
        with attention_form(net, False):
            q = pt2e_quantised(net, torch.from_numpy(x1), quantizer, images(CALIB, 2), fold_quantize=False)
        int8 = Path(tmp) / "m.int8.tflite"
        convert(q, torch.from_numpy(x1), int8, quant_config=QuantConfig(pt2e_quantizer=quantizer))
        it = interpreter(int8)
        out["litert-int8"] = {"ms": tflite_latency_ms(it, x1, repeats=repeats), **coverage(it)}
    return out


def time_litert(python: str, shape_index: int, repeats: int) -> dict:
    if not Path(python).is_file():
        return {"litert": {"error": f"no LiteRT venv at {python} (see README, 'Which extras combine')"}}
    done = subprocess.run(
        [python, __file__, "--litert-worker", str(shape_index), "--repeats", str(repeats)],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"litert": {"error": (done.stderr.strip().splitlines() or ["failed"])[-1][:300]}}
    return json.loads(lines[-1])


def time_main_venv(shape: DescendantShape, tmp: Path, repeats: int) -> dict:
    import torch

    from export.context import attention_form, pt2e_quantised
    from export.executorch_export import lower, pte_latency_ms, pte_method
    from export.onnx_export import export_onnx
    from export.openvino_export import ov_compile, ov_latency_ms, to_openvino, to_openvino_int8
    from export.quantize import to_int8
    from export.runtime import ort_latency_ms, ort_session

    net, x1, calib = model(shape), images(1, 1), images(CALIB, 2)
    out: dict[str, dict] = {}
    onnx = tmp / "m.onnx"
    export_onnx(net, onnx, img_size=224, in_chans=3, verify=False)
    out["onnx"] = {"ms": ort_latency_ms(ort_session(onnx), x1, repeats=repeats)}
    int8 = tmp / "m.int8.onnx"
    to_int8(onnx, int8, calib)
    out["onnx-int8"] = {"ms": ort_latency_ms(ort_session(int8), x1, repeats=repeats)}
    xml = to_openvino(onnx, tmp / "m.xml")
    out["openvino"] = {"ms": ov_latency_ms(ov_compile(xml), x1, repeats=repeats)}
    xml8 = to_openvino_int8(xml, tmp / "m.int8.xml", calib)
    out["openvino-int8"] = {"ms": ov_latency_ms(ov_compile(xml8), x1, repeats=repeats)}
    example = torch.from_numpy(x1)
    with attention_form(net, False):
        program, cov = lower(net, example)
    (tmp / "m.pte").write_bytes(program.buffer)
    out["executorch"] = {"ms": pte_latency_ms(pte_method(tmp / "m.pte"), x1, repeats=repeats), **cov}
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )

    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    with attention_form(net, False):
        program, cov = lower(pt2e_quantised(net, example, quantizer, calib), example)
    (tmp / "m.int8.pte").write_bytes(program.buffer)
    out["executorch-int8"] = {"ms": pte_latency_ms(pte_method(tmp / "m.int8.pte"), x1, repeats=repeats), **cov}
    for entry in out.values():
        entry.pop("outside_ops", None)
        entry.pop("delegated_subgraphs", None)
    return out


def run(args) -> dict:
    from factory.device.measure import host_facts

    rows = []
    for i, shape in enumerate(SHAPES):
        with tempfile.TemporaryDirectory() as tmp:
            timed = time_main_venv(shape, Path(tmp), args.repeats)
        timed.update(time_litert(args.litert_python, i, args.repeats))
        rows.append({"shape": shape.label(), "runtimes": timed})
        print(shape.label(), {k: round(v.get("ms", float("nan")), 2) for k, v in timed.items()}, flush=True)
    return {"host": host_facts(), "repeats": args.repeats, "rows": rows}


COLUMNS = ("onnx", "openvino", "executorch", "litert")


def summarise(data: dict) -> str:
    host = data["host"]
    lines = [
        f"Batch 1, 224 px, random weights, {host['cpus']} threads on {host['cpu']} (median of {data['repeats']} runs).",
        "",
        "| shape | "
        + " | ".join(f"{c} FP32 ms | {c} INT8 ms (x FP32)" for c in COLUMNS)
        + " | delegated ops (ET / LiteRT) |",
        "|---|" + "---:|---:|" * len(COLUMNS) + "---|",
    ]
    for row in data["rows"]:
        r = row["runtimes"]
        cells = []
        for c in COLUMNS:
            fp32, int8 = r.get(c, {}), r.get(f"{c}-int8", {})
            cells.append(f"{fp32['ms']:.2f}" if "ms" in fp32 else fp32.get("error", "n/a"))
            cells.append(
                f"{int8['ms']:.2f} ({fp32['ms'] / int8['ms']:.2f}x)" if "ms" in int8 and "ms" in fp32 else "n/a"
            )
        cov = " / ".join(
            f"{r[k]['delegated_ops']}/{r[k]['total_ops']}" if "delegated_ops" in r.get(k, {}) else "n/a"
            for k in ("executorch", "litert")
        )
        lines.append(f"| {row['shape']} | " + " | ".join(cells) + f" | {cov} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--litert-python", default=str(Path(__file__).resolve().parents[1] / ".venv-litert/bin/python"))
    parser.add_argument("--litert-worker", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--md", type=Path)
    args = parser.parse_args()
    if args.litert_worker is not None:
        print(json.dumps(litert_worker(args.litert_worker, args.repeats)))
        return
    if args.json is None:
        parser.error("--json PATH is required")
    run_and_write(run, summarise, args)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
