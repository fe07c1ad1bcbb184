"""GPU readiness in one run (under 8 minutes on one GPU): what the factory does on CUDA, measured.

1. Fine-tuning steps of DeiT-Tiny at 224 px (batch 64) through the factory's trainer under AMP
   (``amp=auto``: bf16 where supported, else fp16 with a GradScaler) and in fp32: images per second, with the
   CPU's activation budget (micro-batches of at most 512 MB of saved activations) and with the default on CUDA
   (``--train-memory-mb auto``: half the GPU's free memory).
2. Expanding-phase steps of a DeiT-Tiny learngene at 224 px (batch 64, the build's sandwich) under
   AMP on the GPU, at 224 px and distilling at 112 px, both activation budgets: images per second.
3. ``torchrun`` on one GPU and, where there are two, on two: a fine-tune (``peg-factory train``) and
   expanding-phase steps (``peg-factory learngene train``), the global batch split over the processes (the
   NCCL process group, gradients averaged): images per second and rank 0's peak CUDA memory.
4. CUDA onnxruntime parity: the exported ONNX model run by ``CUDAExecutionProvider`` against
   PyTorch's logits (max abs diff), where onnxruntime-gpu is installed; said plainly where not.
5. ``peg-factory build`` end to end with ``--device cuda`` (the demo learngene, ``jetson_orin``, digits, 300
   fine-tuning steps): exit status, wall time, the shipped test accuracy, the fine-tune's precision and device.

Writes a Markdown table (``--md``, default stdout) and the raw figures (``--json``). Never run by the
tests; run it where a GPU is, e.g. through the device tool:
    python bench/gpu_check.py --md $OUT/gpu_check.md --json $OUT/gpu_check.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import write_outputs  # noqa: E402

ANCESTRY = "random:deit_tiny_patch16_224"


def timed(fn, steps: int) -> float:
    """Median seconds of ``fn()`` over ``steps`` calls after one warm-up, CUDA-synchronised."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def peak_mb() -> float:
    """The CUDA caching allocator's peak since the last reset, in MB."""
    return torch.cuda.max_memory_allocated() / 2**20


def memory_text(memory_mb: int | None) -> str:
    if memory_mb is None:
        return "--train-memory-mb auto (the default: half the free GPU memory)"
    return f"--train-memory-mb {memory_mb} (the CPU's budget)" if memory_mb > 0 else "the whole batch in one pass"


def finetune_rows(anc, steps: int, batch: int) -> list[dict]:
    from factory.core.timm_vit import build_vit
    from factory.data import ImageTensors
    from factory.training.precision import precision_for
    from factory.training.train import TrainConfig, train

    shape = dataclasses.replace(anc.arch.shape(), num_classes=10)
    x = torch.randn(batch * 2, 3, 224, 224)
    data = ImageTensors(x, torch.randint(0, 10, (batch * 2,)), [str(i) for i in range(10)])
    rows = []
    for amp, memory_mb in (("auto", 512), ("off", 512), ("auto", None), ("off", None)):
        model = build_vit(anc.arch, shape, seed=0)
        cfg = TrainConfig(
            steps=steps + 1, batch_size=batch, amp=amp, device="cuda", warmup_steps=1, memory_mb=memory_mb
        )
        torch.cuda.reset_peak_memory_stats()
        res = train(model, data, cfg, progress=False)
        per = sorted(h["seconds"] for h in res.history[1:])[(steps - 1) // 2]
        rows.append(
            {
                "check": f"fine-tune step, DeiT-Tiny 224 px, batch {batch}, {memory_text(memory_mb)}",
                "precision": res.precision,
                "value": f"{batch / per:.0f} img/s ({per * 1e3:.0f} ms/step), peak {peak_mb():.0f} MB",
                "precision_expected": precision_for(torch.device("cuda"), amp),
            }
        )
    return rows


def expanding_rows(anc, steps: int, batch: int) -> list[dict]:
    from factory import sample_learngene
    from factory.core.expanding_phase import ExpandingConfig, default_shapes
    from factory.training.expanding_loop import measure_step_seconds

    lg = sample_learngene(anc, anc.arch.depth // 2, seed=0, rescale="std")
    rows = []
    for size, memory_mb in ((224, 512), (112, 512), (224, None), (112, None)):
        cfg = ExpandingConfig(batch_size=batch, distill_img_size=size, memory_mb=memory_mb)
        torch.cuda.reset_peak_memory_stats()
        per = measure_step_seconds(lg, anc, default_shapes(lg), cfg, steps=steps)
        rows.append(
            {
                "check": f"expanding-phase step, batch {batch}, distils at {size} px, {memory_text(memory_mb)}",
                "precision": "auto",
                "value": f"{batch / per:.1f} img/s ({per:.2f} s/step), peak {peak_mb():.0f} MB",
            }
        )
    return rows


def torchrun_rows(tmp: Path, batch: int) -> list[dict]:
    """``torchrun`` on 1 GPU and, where there are two, on 2: a fine-tune (``peg-factory train``) and expanding-phase
    steps (``peg-factory learngene train``) of the demo ancestry at 28 px, the global batch split over the
    processes (NCCL, gradients averaged): images per second from the steps' own times (median after the first)
    and rank 0's peak CUDA memory, from the metrics each writes."""
    from factory import load_ancestry
    from factory.core.checkpoint import save_descendant
    from factory.core.timm_vit import build_vit

    anc = load_ancestry("demo")
    model_path = tmp / "model.safetensors"
    save_descendant(build_vit(anc.arch, anc.arch.shape(), seed=0), anc.arch, model_path, {"method": "gpu_check"})
    sampled = [sys.executable, "-m", "factory.cli", "learngene", "--ancestry", "demo", "--out", str(tmp / "lg")]
    subprocess.run(sampled, check=True, capture_output=True, cwd=tmp, timeout=300)  # the build's default sampling
    jobs = {
        "fine-tune": (["train", "--model", str(model_path), "--device", "cuda"], "metrics.jsonl"),
        "expanding phase": (["learngene", "train", "--learngene", str(tmp / "lg")], "expanding_log.jsonl"),
    }
    rows = []
    for nproc in (1, 2) if torch.cuda.device_count() >= 2 else (1,):
        for what, (args, log) in jobs.items():
            out = tmp / f"{what.replace(' ', '_')}-{nproc}"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
            cmd += ["-m", "factory.cli", *args, "--data", "digits", "--steps", "8", "--batch-size", str(batch)]
            cmd += ["--out", str(out)]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp, timeout=600)
            check = f"torchrun --nproc_per_node {nproc}: {what}, 8 steps, global batch {batch} (NCCL)"
            if proc.returncode != 0:
                rows.append(
                    {
                        "check": check,
                        "precision": "auto",
                        "value": f"exit {proc.returncode}: {proc.stderr.strip()[-300:]}",
                    }
                )
                continue
            steps = [json.loads(line) for line in (out / log).read_text().splitlines() if line.strip()]
            per_step = statistics.median(r["seconds"] for r in steps[1:]) if len(steps) > 1 else steps[0]["seconds"]
            peak = max((r.get("cuda_peak_mb", 0.0) for r in steps), default=0.0)
            rows.append(
                {
                    "check": check,
                    "precision": "auto",
                    "value": f"{batch / per_step:.0f} img/s, rank-0 peak {peak:.0f} MB, "
                    f"{time.perf_counter() - t0:.1f}s with start-up",
                }
            )
    return rows


def ort_cuda_row(tmp: Path) -> dict:
    try:
        import onnxruntime as ort
    except ImportError:
        return {"check": "onnxruntime CUDA parity", "precision": "fp32", "value": "onnxruntime not installed"}
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return {
            "check": "onnxruntime CUDA parity",
            "precision": "fp32",
            "value": f"no CUDAExecutionProvider (providers: {', '.join(ort.get_available_providers())}); "
            "pip install onnxruntime-gpu to check it",
        }
    from export.onnx_export import export_onnx
    from factory import load_ancestry

    anc = load_ancestry(ANCESTRY)
    net = anc.model.eval()
    path = tmp / "deit.onnx"
    export_onnx(net, path, img_size=224, in_chans=3, verify_batch=2)
    x = torch.randn(8, 3, 224, 224)
    with torch.no_grad():
        ref = net(x).numpy()
    sess = ort.InferenceSession(str(path), providers=["CUDAExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    return {
        "check": "onnxruntime CUDA parity, DeiT-Tiny batch 8",
        "precision": "fp32",
        "value": f"max abs diff {abs(out - ref).max():.2e} vs PyTorch CPU",
    }


def build_row(tmp: Path, steps: int = 300, device: str = "cuda") -> dict:
    """``peg-factory build --device cuda`` on the demo, as a user would run it: the whole pipeline on a GPU."""
    root = Path(__file__).resolve().parent.parent
    out = tmp / "build"
    cmd = [sys.executable, "-m", "factory.cli", "build", "--profile", str(root / "profiles" / "jetson_orin.yaml")]
    cmd += ["--data", "digits", "--steps", str(steps), "--device", device, "--out", str(out)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp, timeout=300)
    check = f"peg-factory build --device {device} (jetson_orin, digits, {steps} steps)"
    if proc.returncode != 0:
        return {"check": check, "precision": "auto", "value": f"exit {proc.returncode}: {proc.stderr.strip()[-300:]}"}
    built = json.loads((out / "manifest.json").read_text())["devices"][0]
    shape, finetune = built["shape"], built["finetune"]
    return {
        "check": check,
        "precision": str(finetune.get("precision")),
        "value": f"exit 0 in {time.perf_counter() - t0:.1f}s: d{shape['depth']}-w{shape['embed_dim']} from {built['init']}, "
        f"test accuracy {built['accuracy']['test']:.4f} (fine-tuned on {finetune['config']['device']})",
    }


def summarise(data: dict) -> str:
    lines = [
        f"GPU: {data['gpu']}; torch {data['torch']}; wall {data.get('wall_seconds', '?')} s",
        "",
        "| check | precision | result |",
        "|---|---|---|",
    ]
    lines += [f"| {r['check']} | {r['precision']} | {r['value']} |" for r in data["rows"]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--md", type=Path, default=None)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA GPU here (torch.cuda.is_available() is False); run it on a GPU machine", file=sys.stderr
        )
        raise SystemExit(2)
    from factory import load_ancestry

    start = time.perf_counter()
    anc = load_ancestry(ANCESTRY)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for step in (
            lambda: finetune_rows(anc, args.steps, args.batch),
            lambda: expanding_rows(anc, 3, args.batch),
            lambda: torchrun_rows(Path(tmp), args.batch),
            lambda: [ort_cuda_row(Path(tmp))],
            lambda: [build_row(Path(tmp))],
        ):
            try:
                rows += step()
            except Exception as exc:  # one failed check must not hide the others
                rows.append(
                    {"check": getattr(step, "__name__", "check"), "precision": "-", "value": f"FAILED: {exc!r}"[:300]}
                )
            print(rows[-1], flush=True)
    data = {
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "rows": rows,
        "wall_seconds": round(time.perf_counter() - start, 1),
        "env": {k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES",)},
    }
    write_outputs(data, summarise(data), args.json, args.md)


if __name__ == "__main__":
    main()
