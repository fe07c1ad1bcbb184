"""Real scale: a DeiT-Tiny ancestry (random weights: none can be downloaded here) and 224-px RGB photos.

Four measurements, on a generated 5-class ImageFolder (:func:`factory.data.generate.write_image_folder`:
hue discs on textured backgrounds, JPEG, sizes around 256 px with varied aspect ratios):

1. **Expanding-phase step** (batch ``--batch``, DeiT-Tiny at 224 px; the build's sandwich: smallest,
   largest = twice the ancestry's depth, one random shape): seconds per step in fp32 and bf16 at 224 px
   and with distillation at 112 px (:func:`factory.training.expanding_loop.measure_step_seconds`), and the
   share of a step that the teacher's forward pass takes (what caching its outputs could save at most).
2. **Fine-tuning step** of the DeiT-Tiny shape at 224 px, batch 32: the factory's trainer in fp32 and
   bf16 against a bare timm + AdamW loop on the same in-memory batch (the trainer's overhead), and the
   trainer reading the streamed folder (the data path's cost).
3. **Build peak RSS against the data set's size**: ``peg-factory build`` in a fresh process on folders
   of ``--sizes`` training images (a few expanding and fine-tuning steps, ONNX export), peak RSS of the
   build process and of its largest child (a DataLoader worker).
4. **Dry-run estimate against the measured time** of the expanding phase in that build.

Usage:
    python bench/real_scale.py --json bench/out/real_scale.json --md bench/out/real_scale.md
    python bench/real_scale.py --quick --json /tmp/r.json     # smoke run (small images, few steps)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import run_and_write

from factory import load_ancestry, sample_learngene
from factory.core.expanding_phase import ExpandingConfig, default_shapes
from factory.data import load_dataset
from factory.data.generate import write_image_folder
from factory.training.expanding_loop import measure_step_seconds
from factory.training.precision import precision_for
from factory.training.train import TrainConfig, train

ROOT = Path(__file__).resolve().parent.parent
ANCESTRY = "random:deit_tiny_patch16_224"


def expanding_steps(anc, batch: int, steps: int, low: int) -> list[dict]:
    lg = sample_learngene(anc, anc.arch.depth // 2, seed=0, rescale="std")
    shapes = default_shapes(lg)
    rows = []
    for amp, size in (("off", None), ("bf16", None), ("bf16", low), ("off", low)):
        cfg = ExpandingConfig(batch_size=batch, amp=amp, distill_img_size=size)
        seconds = measure_step_seconds(lg, anc, shapes, cfg, steps=steps)
        rows.append(
            {
                "precision": "fp32" if amp == "off" else "bf16",
                "distill_px": size or anc.arch.img_size,
                "s_per_step": round(seconds, 3),
            }
        )
        print(f"expanding step {rows[-1]}", flush=True)
    x = torch.randn(batch, 3, anc.arch.img_size, anc.arch.img_size)
    teacher = anc.model.eval()
    with torch.no_grad():
        teacher(x)
        t0 = time.perf_counter()
        teacher(x)
        fwd = time.perf_counter() - t0
    rows.append(
        {"teacher_forward_s": round(fwd, 3), "teacher_share_of_fp32_step": round(fwd / rows[0]["s_per_step"], 3)}
    )
    return rows


def finetune_steps(anc, folder: Path, steps: int) -> list[dict]:
    import timm
    import torch.nn.functional as F

    shape = anc.arch.shape()
    size, batch = anc.arch.img_size, 32
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 5, (batch,))
    from factory.core.timm_vit import build_vit
    from factory.data import ImageTensors

    rows = []
    model = timm.create_model("deit_tiny_patch16_224", num_classes=5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    bare = statistics.median(times[1:])
    rows.append({"loop": "bare timm + AdamW (fp32, in memory)", "s_per_step": round(bare, 3), "vs_bare": 1.0})
    memory = ImageTensors(x.repeat(4, 1, 1, 1), y.repeat(4), [str(i) for i in range(5)])
    ds = load_dataset(str(folder), img_size=size, in_chans=3)
    for name, data, amp in (
        ("factory trainer, fp32, in memory", memory, "off"),
        ("factory trainer, bf16, in memory", memory, "auto"),
        ("factory trainer, bf16, streamed folder", ds.train, "auto"),
    ):
        model = build_vit(anc.arch, dataclasses.replace(shape, num_classes=5), seed=0)
        cfg = TrainConfig(steps=steps + 1, batch_size=batch, amp=amp, warmup_steps=1, shift=0)
        res = train(model, data, cfg, progress=False)
        per = statistics.median(h["seconds"] for h in res.history[1:])  # the first step's one-off costs left out
        rows.append(
            {"loop": name, "precision": res.precision, "s_per_step": round(per, 3), "vs_bare": round(per / bare, 3)}
        )
        print(f"finetune {rows[-1]}", flush=True)
    return rows


WRAPPER = (
    "import resource, subprocess, sys, json, time; t=time.perf_counter(); p = subprocess.run(sys.argv[1:], "
    "capture_output=True, text=True); print(json.dumps({'rc': p.returncode, 'seconds': time.perf_counter()-t, "
    "'children_peak_kb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, 'out': p.stdout[-4000:] + p.stderr[-4000:]}))"
)


def peak_run(cmd: list[str]) -> dict:
    """``cmd`` in a fresh wrapper process: exit code, wall seconds, the largest descendant's peak RSS, output tail."""
    proc = subprocess.run([sys.executable, "-c", WRAPPER, *cmd], capture_output=True, text=True, cwd=ROOT)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def build_rss(
    ancestries: list[str],
    sizes: list[int],
    img: int,
    expand_steps: int,
    steps: int,
    tmp: Path,
    memories: list[int] | tuple[int, ...] = (512,),
    dry_only: bool = False,
    init: str = "peg",
) -> list[dict]:
    """``peg-factory build --profile raspberry_pi5`` at its defaults (expanding batch 64 and fine-tune batch 32 at
    224 px; the profile chooses d24) for each ancestry, training-set size and ``--train-memory-mb`` in
    ``memories``, and its ``--dry-run`` (with ``dry_only``, the dry run alone); each in a fresh wrapper process
    that reports the largest process's peak RSS (the build or a DataLoader worker). ``init`` "peg" (the default)
    runs the expanding phase at any ``expand_steps`` -- ``auto`` would skip a phase of fewer than
    ``--expand-min-steps`` (750) as too short to pay -- so its memory and the dry run's timing of its step are
    measured."""
    rows = []
    for n in sizes:
        folder = write_image_folder(
            tmp / f"photos{n}", classes=5, size=img, per_class={"train": n // 5, "val": 10, "test": 10}
        )
        for ancestry in ancestries:
            for memory in memories:
                out = tmp / f"build{n}-{ancestry.rsplit(':', 1)[-1]}-{memory}"
                cmd = [sys.executable, "-m", "factory.cli", "build", "--profile", "raspberry_pi5"]
                cmd += ["--ancestry", ancestry, "--data", str(folder), "--expand-steps", str(expand_steps)]
                cmd += ["--steps", str(steps), "--train-memory-mb", str(memory), "--init", init, "--out", str(out)]
                dry = peak_run(cmd + ["--dry-run"])
                estimate = re.search(r"expanding-phase steps \(~(\d+)s\)", dry["out"])
                step = re.search(r"one expanding-phase step measured at ([\d.]+)s", dry["out"])
                info = None if dry_only else peak_run(cmd)
                measured = re.search(r"learngene: sampled .* in ([\d.]+)s", info["out"]) if info else None
                shape = re.search(r"raspberry_pi5: (\d+)x(\d+) test acc", info["out"]) if info else None
                rows.append(
                    {
                        "ancestry": ancestry,
                        "train_images": n,
                        "train_memory_mb": memory,
                        "rc": info["rc"] if info else None,
                        "shape": f"d{shape.group(1)}-w{shape.group(2)}" if shape else None,
                        "build_s": round(info["seconds"], 1) if info else None,
                        "peak_rss_mb": round(info["children_peak_kb"] / 1024) if info else None,
                        "dry_run_rc": dry["rc"],
                        "dry_run_s": round(dry["seconds"], 1),
                        "dry_run_peak_rss_mb": round(dry["children_peak_kb"] / 1024),
                        "dry_run_expanding_step_s": float(step.group(1)) if step else None,
                        "expand_steps": expand_steps,
                        "dry_run_expanding_estimate_s": int(estimate.group(1)) if estimate else None,
                        "measured_learngene_stage_s": float(measured.group(1)) if measured else None,
                        "tail": (info or dry)["out"][-600:] if (info or dry)["rc"] else "",
                    }
                )
                print(f"build {rows[-1]}", flush=True)
    return rows


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    anc = load_ancestry(ANCESTRY)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = write_image_folder(tmp / "photos", classes=5, size=args.image_px, per_class={"train": 40, "val": 10})
        data = {
            "expanding": [] if args.skip_steps else expanding_steps(anc, args.batch, args.steps, args.low),
            "finetune": [] if args.skip_steps else finetune_steps(anc, folder, args.steps),
            "builds": build_rss(
                args.ancestries,
                args.sizes,
                args.image_px,
                args.expand_steps,
                args.build_steps,
                tmp,
                args.train_memory_mb,
                args.dry_only,
                args.init,
            ),
        }
    data.update(
        args={k: v for k, v in vars(args).items() if k not in ("json", "md")},
        machine=f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"auto precision {precision_for(torch.device('cpu'), 'auto')}",
    )
    return data


def step_tables(d: dict) -> list[str]:
    """The expanding-phase and fine-tuning step tables (absent with ``--skip-steps``)."""
    a = d["args"]
    exp = [r for r in d["expanding"] if "s_per_step" in r]
    teacher = next(r for r in d["expanding"] if "teacher_forward_s" in r)
    base = exp[0]["s_per_step"]
    lines = [
        f"Ancestry `{ANCESTRY}` (DeiT-Tiny, 224 px, patch 16).",
        "",
        f"**Expanding-phase step**, batch {a['batch']}, the build's sandwich (median of {a['steps']} steps after one warm-up):",
        "",
        "| precision | distils at | s / step | vs fp32 224 px |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['precision']} | {r['distill_px']} px | {r['s_per_step']:.2f} | {base / r['s_per_step']:.2f}x |"
        for r in exp
    ]
    lines += [
        "",
        f"Teacher forward at 224 px: {teacher['teacher_forward_s']:.2f} s = {100 * teacher['teacher_share_of_fp32_step']:.1f}% "
        "of an fp32 step: the most that caching the teacher's outputs could save.",
        "",
        "**Fine-tuning step**, DeiT-Tiny shape at 224 px, batch 32:",
        "",
        "| loop | precision | s / step | vs bare loop |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['loop']} | {r.get('precision', 'fp32')} | {r['s_per_step']:.3f} | {r['vs_bare']:.2f}x |"
        for r in d["finetune"]
    ]
    return [*lines, ""]


def summarise(d: dict) -> str:
    a = d["args"]
    lines = [f"Machine: {d['machine']}.", ""]
    if d["expanding"]:
        lines += step_tables(d)
    lines += [
        f"**Build** (`peg-factory build --profile raspberry_pi5 --ancestry A --expand-steps {a['expand_steps']} "
        f"--steps {a['build_steps']} --init {a.get('init', 'auto')}`: expanding batch 64 and fine-tune batch 32 at 224 px, "
        "the defaults) on generated "
        f"5-class folders of {a['image_px']}-px JPEGs; peak RSS of the largest process (the build or a DataLoader worker):",
        "",
        "| ancestry | train images | --train-memory-mb | shape | exit | wall s | build peak RSS MB | dry run peak RSS MB "
        "| dry run's expanding step s | dry-run expanding estimate s | measured learngene stage s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['ancestry']} | {r['train_images']} | {r.get('train_memory_mb', 512)} | {r['shape']} | {r['rc']} | "
        f"{r['build_s']} | {r['peak_rss_mb']} | {r['dry_run_peak_rss_mb']} | {r.get('dry_run_expanding_step_s')} | "
        f"{r['dry_run_expanding_estimate_s']} | {r['measured_learngene_stage_s']} |"
        for r in d["builds"]
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--md", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help="smoke run: batch 8, 2 steps, small folders")
    parser.add_argument("--batch", type=int, default=64, help="expanding-phase batch")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per measurement (after one warm-up)")
    parser.add_argument("--low", type=int, default=112, help="the lower distillation size")
    parser.add_argument("--sizes", type=int, nargs="+", default=[300, 3000], help="training images per build")
    parser.add_argument(
        "--ancestries", nargs="+", default=[ANCESTRY, "random:deit_small_patch16_224"], help="the builds' ancestries"
    )
    parser.add_argument("--image-px", type=int, default=256)
    parser.add_argument("--expand-steps", type=int, default=10)
    parser.add_argument("--build-steps", type=int, default=20, help="the builds' fine-tuning steps")
    parser.add_argument("--skip-steps", action="store_true", help="builds only (no step timings)")
    parser.add_argument(
        "--train-memory-mb", type=int, nargs="+", default=[512], help="the builds' --train-memory-mb, each in turn"
    )
    parser.add_argument("--dry-only", action="store_true", help="the builds' dry runs alone")
    parser.add_argument(
        "--init", default="peg", help="the builds' --init (peg: the expanding phase runs at any --expand-steps)"
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    if args.quick:
        args.batch, args.steps, args.sizes, args.expand_steps, args.build_steps = 8, 2, [20, 60], 2, 2
        args.ancestries = [ANCESTRY]
    run_and_write(run, summarise, args)


if __name__ == "__main__":
    main()
