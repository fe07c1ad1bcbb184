"""Host latency of every CPU artifact -- torch eager, onnxruntime FP32/INT8, OpenVINO FP32/BF16/INT8 --
and the reduced precisions' accuracy cost, all measured in one run on this machine.

Models: the demo ancestry (d6-w192, MNIST-trained) evaluated on MNIST test; two descendants of it
(weight selection, d3-w96 and d9-w192) fine-tuned ``--steps`` on digits and evaluated on digits test;
and a ViT-S/16-sized model at 224x224 (random weights: no task, so its "accuracy" is the top-1
agreement with FP32 on random inputs, and its INT8 models are calibrated on random images). Median of
``--repeats`` runs at batch 1 and a third of them at batch 32, same inputs for every runtime. "best
verified" is :func:`export.api.choose_deployment` over these timings: FP32 artifacts, and reduced
precisions within 1 point of FP32's accuracy (agreement for ViT-S).

Usage: python bench/export_latency.py [--steps 150] [--repeats 30] --json PATH [--md PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from export.api import export_model
from export.runtime import ort_latency_ms, ort_session
from factory import DescendantShape, init_descendant, load_ancestry
from factory.core.checkpoint import save_descendant
from factory.core.shapes import ArchConfig
from factory.core.timm_vit import build_vit
from factory.data import load_dataset
from factory.training.train import TrainConfig, train


def eager_ms(model, x: torch.Tensor, repeats: int) -> float:
    with torch.inference_mode():
        for _ in range(3):
            model(x)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


RUNTIMES = ("ort_fp32", "ort_int8", "ov_fp32", "ov_bf16", "ov_int8")
LABELS = {
    "ort_fp32": "onnx",
    "ort_int8": "onnx-int8",
    "ov_fp32": "openvino",
    "ov_bf16": "openvino-bf16",
    "ov_int8": "openvino-int8",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--json", type=Path, required=True, help="where to write the rows")
    parser.add_argument("--md", type=Path, default=None, help="where to write the Markdown table")
    args = parser.parse_args()
    from export.api import choose_deployment
    from export.openvino_export import (
        cpu_supports_bf16,
        ov_compile,
        ov_latency_ms,
        ov_logits,
        to_openvino,
        to_openvino_int8,
    )
    from export.quantize import to_int8
    from export.runtime import ort_logits

    anc = load_ancestry("demo")
    digits = load_dataset("digits", img_size=28)
    mnist = load_dataset("mnist", img_size=28)
    cases = [("demo ancestry d6-w192 (mnist)", anc.model, anc.arch, mnist)]
    for shape in (DescendantShape(3, 96, 2, 4.0, 28, 7, 10), DescendantShape(9, 192, 3, 4.0, 28, 7, 10)):
        model = init_descendant("weight_selection", shape, ancestry=anc)
        train(
            model, digits.train, TrainConfig(steps=args.steps, batch_size=32, lr=1e-3, warmup_steps=10), progress=False
        )
        cases.append((f"{shape.label()} (digits)", model.eval(), anc.arch.with_shape(shape), digits))
    vits = ArchConfig(
        embed_dim=384, depth=12, num_heads=6, mlp_hidden=1536, img_size=224, patch_size=16, num_classes=1000
    )
    cases.append(("ViT-S/16 224 (random weights)", build_vit(vits).eval(), vits, None))
    bf16 = cpu_supports_bf16()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, model, arch, ds in cases:
            tmpd = Path(tmp)
            path = tmpd / "m.safetensors"
            save_descendant(model, arch, path, {"method": "bench"})
            export_model(path, ["onnx"], tmpd / "exp", log=lambda *_: None)  # verified FP32 ONNX (<= 1e-4 vs PyTorch)
            onnx_path = tmpd / "exp" / "model.onnx"
            rng = np.random.default_rng(0)
            shape_in = (arch.in_chans, arch.img_size, arch.img_size)
            if ds is not None:
                calib = ds.train.images[:256].numpy()
                eval_x, eval_y = ds.test.images.numpy(), ds.test.labels.numpy()
            else:  # no task: calibrate on random images, "accuracy" = agreement with FP32 on random inputs
                calib = rng.standard_normal((64, *shape_in), dtype=np.float32)
                eval_x, eval_y = rng.standard_normal((64, *shape_in), dtype=np.float32), None
            to_int8(onnx_path, tmpd / "m.int8.onnx", calib)
            xml = to_openvino(onnx_path, tmpd / "m.xml")
            to_openvino_int8(xml, tmpd / "m.int8.xml", calib)
            sessions = {
                "ort_fp32": ("ort", ort_session(onnx_path)),
                "ort_int8": ("ort", ort_session(tmpd / "m.int8.onnx")),
                "ov_fp32": ("ov", ov_compile(xml)),
                "ov_int8": ("ov", ov_compile(tmpd / "m.int8.xml")),
            }
            if bf16:
                sessions["ov_bf16"] = ("ov", ov_compile(xml, precision="bf16"))
            row = {"model": name}
            preds = {}
            for key, (kind, sess) in sessions.items():
                logits = (ort_logits if kind == "ort" else ov_logits)(sess, eval_x)
                preds[key] = logits.argmax(-1)
            reference = preds["ort_fp32"] if eval_y is None else eval_y
            for key in sessions:
                row[f"{key}_acc"] = float((preds[key] == reference).mean())
            for batch in (1, 32):
                x = np.random.default_rng(batch).standard_normal((batch, *shape_in), dtype=np.float32)
                reps = args.repeats if batch == 1 else max(5, args.repeats // 3)
                row[f"eager_b{batch}"] = eager_ms(model, torch.from_numpy(x), reps)
                for key, (kind, sess) in sessions.items():
                    row[f"{key}_b{batch}"] = (ort_latency_ms if kind == "ort" else ov_latency_ms)(sess, x, repeats=reps)
            for batch in (1, 32):
                arts = {
                    LABELS[k]: {"latency_ms_b1": row[f"{k}_b{batch}"], "test_accuracy": row[f"{k}_acc"]}
                    for k in sessions
                }
                row[f"best_b{batch}"] = choose_deployment(arts, 1)["format"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    machine = f"{platform.machine()}, torch {torch.__version__} ({torch.get_num_threads()} threads), CPU BF16: {bf16}"
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps({"machine": machine, "args": {"steps": args.steps, "repeats": args.repeats}, "rows": rows}, indent=2)
        + "\n"
    )
    present = [k for k in RUNTIMES if f"{k}_b1" in rows[0]]
    lines = [
        f"Machine: {machine}. Latency in ms (median); accuracy on the model's test split (ViT-S: top-1 agreement with "
        "ORT FP32 on random inputs); speed-up of the best verified artifact over ORT FP32.",
        "",
        "| model | batch | eager | "
        + " | ".join(LABELS[k] for k in present)
        + " | best verified | speed-up vs ORT FP32 |",
        "|---|---|---|" + "---|" * (len(present) + 2),
    ]
    for r in rows:
        for b in (1, 32):
            best = r[f"best_b{b}"]
            best_key = next(k for k in present if LABELS[k] == best)
            cells = " | ".join(f"{r[f'{k}_b{b}']:.3f}" for k in present)
            lines.append(
                f"| {r['model']} | {b} | {r[f'eager_b{b}']:.3f} | {cells} | {best} | "
                f"{r['ort_fp32_b' + str(b)] / r[f'{best_key}_b{b}']:.2f}x |"
            )
        lines.append(f"| {r['model']} | accuracy | | " + " | ".join(f"{r[f'{k}_acc']:.4f}" for k in present) + " | | |")
    table = "\n".join(lines)
    if args.md:
        args.md.write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
