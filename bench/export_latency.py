"""Host latency of torch eager vs onnxruntime FP32 vs onnxruntime INT8, and INT8's accuracy cost.

Shapes: the demo ancestry (d6-w192, MNIST-trained) evaluated on MNIST test; two descendants of it
(weight selection, d3-w96 and d9-w192) fine-tuned ``--steps`` on digits and evaluated on digits
test; and a ViT-S/16-sized model at 224x224 (random weights, latency only). Median of repeats at
batch 1 and 32, all measured in one run on this machine.

Usage: python bench/export_latency.py [--steps 150] [--repeats 30]
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
from factory.checkpoint import save_descendant
from factory.data import load_dataset
from factory.shapes import ArchConfig
from factory.timm_vit import build_vit
from factory.train import TrainConfig, train


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--json", type=Path, required=True, help="where to write the rows")
    parser.add_argument("--md", type=Path, default=None, help="where to write the Markdown table")
    args = parser.parse_args()
    anc = load_ancestry("demo")
    digits = load_dataset("digits", img_size=28)
    cases = [("demo ancestry d6-w192 (mnist)", anc.model, anc.arch, "mnist")]
    for shape in (DescendantShape(3, 96, 2, 4.0, 28, 7, 10), DescendantShape(9, 192, 3, 4.0, 28, 7, 10)):
        model = init_descendant("weight_selection", shape, ancestry=anc)
        train(model, digits.train, TrainConfig(steps=args.steps, batch_size=32, lr=1e-3, warmup_steps=10), progress=False)
        cases.append((f"{shape.label()} (digits)", model.eval(), anc.arch.with_shape(shape), "digits"))
    vits = ArchConfig(embed_dim=384, depth=12, num_heads=6, mlp_hidden=1536, img_size=224, patch_size=16, num_classes=1000)
    cases.append(("ViT-S/16 224 (random weights)", build_vit(vits).eval(), vits, None))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, model, arch, data in cases:
            path = Path(tmp) / "m.safetensors"
            save_descendant(model, arch, path, {"method": "bench"})
            # no task data for the random ViT-S: INT8 falls back to dynamic quantisation there
            record = export_model(path, ["onnx", "onnx-int8"], Path(tmp) / "exp", data=data, log=lambda *_: None)
            row = {"model": name}
            for batch in (1, 32):
                x = np.random.default_rng(batch).standard_normal((batch, arch.in_chans, arch.img_size, arch.img_size), dtype=np.float32)
                reps = args.repeats if batch == 1 else max(5, args.repeats // 3)
                row[f"eager_b{batch}"] = eager_ms(model, torch.from_numpy(x), reps)
                row[f"ort_fp32_b{batch}"] = ort_latency_ms(ort_session(Path(tmp) / "exp" / "model.onnx"), x, repeats=reps)
                row[f"ort_int8_b{batch}"] = ort_latency_ms(ort_session(Path(tmp) / "exp" / "model.int8.onnx"), x, repeats=reps)
            art = record["artifacts"]
            row["fp32_acc"] = art["onnx"].get("val_accuracy")
            row["int8_acc"] = art["onnx-int8"].get("val_accuracy")
            row["int8_mode"] = art["onnx-int8"]["mode"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    machine = f"{platform.machine()}, torch {torch.__version__} ({torch.get_num_threads()} threads)"
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"machine": machine, "args": {"steps": args.steps, "repeats": args.repeats}, "rows": rows},
                                    indent=2) + "\n")
    lines = [f"Machine: {machine}.", "",
             "| model | batch | eager ms | ORT FP32 ms | ORT INT8 ms | FP32/eager speed-up | INT8/FP32 speed-up | FP32 acc | INT8 acc |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for b in (1, 32):
            e, f, i = r[f"eager_b{b}"], r[f"ort_fp32_b{b}"], r[f"ort_int8_b{b}"]
            acc = (f"{r['fp32_acc']:.4f} | {r['int8_acc']:.4f}" if r["fp32_acc"] is not None else "n/a | n/a") if b == 1 else " | "
            lines.append(f"| {r['model']} | {b} | {e:.3f} | {f:.3f} | {i:.3f} | {e / f:.2f}x | {f / i:.2f}x | {acc} |")
    table = "\n".join(lines)
    if args.md:
        args.md.write_text(table + "\n")
    print(table)

if __name__ == "__main__":
    main()
