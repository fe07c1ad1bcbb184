"""The dry run's expanding-phase step, estimated from shallow probe passes, against the real step (issue 32, item 1).

For each ancestry (random weights at 224 px for the DeiTs; the demo at 28 px), the build's sandwich
(``default_shapes``: depths 1 to twice the ancestry's, three widths) at batch ``--batch``, three measurements,
each in a fresh process (so its peak RSS is its own):

- ``probe``: :func:`factory.training.step_estimate.probe_step` at the build's activation budget (512 MB on the
  CPU): every block type at depths 1 and ``--probe-depth``, the deeper shapes extrapolated; what the dry run and
  the time budget now plan with. Its estimate of each of the real run's steps (the same seeded picks) and its
  long-run mean (:data:`~factory.training.step_estimate.HORIZON` steps).
- ``build's step``: ``--steps`` real steps at the same budget after the first and ``--warm`` more (a run's first
  draws of a shape build its skeleton and the kernels' caches, costs a long phase amortises): the truth.
- ``real step at 192 MB``: the same at :data:`factory.training.micro_batch.DRY_RUN_CPU_MEMORY_MB`, the dry run's
  measurement before the probe (a real step in smaller micro-batches).

Peak RSS is the process's ``ru_maxrss`` (imports of torch, timm and the factory, the ancestry, the learngene and the
measurement; not onnxruntime, which the dry run's process also imports).

Usage:
    python bench/step_estimate.py --json bench/out/step_estimate.json --md bench/out/step_estimate.md
    python bench/step_estimate.py --quick --json /tmp/s.json      # smoke run (the demo, batch 8, 2 steps)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import run_and_write

ANCESTRIES = ["demo", "random:deit_tiny_patch16_224", "random:deit_small_patch16_224"]
MODES = ["probe", "build's step", "real step at 192 MB"]


def worker(mode: str, spec: str, batch: int, steps: int, warm: int, probe_depth: int, threads: int) -> dict:
    """One measurement in this process (see the module docstring); returns its row."""
    from factory import load_ancestry, sample_learngene
    from factory.core.expanding_phase import ExpandingConfig, default_shapes
    from factory.core.shapes import vit_flops
    from factory.data import ImageTensors
    from factory.training.expanding_loop import train_learngene
    from factory.training.micro_batch import DRY_RUN_CPU_MEMORY_MB
    from factory.training.step_estimate import probe_step

    torch.set_num_threads(threads)
    anc = load_ancestry(spec)
    lg = sample_learngene(anc, anc.arch.depth // 2, seed=0, rescale="std")
    shapes = default_shapes(lg)
    cfg = ExpandingConfig(batch_size=batch, memory_mb=DRY_RUN_CPU_MEMORY_MB if "192" in mode else None)
    t0 = time.perf_counter()
    row: dict = {"ancestry": spec, "measurement": mode}
    if mode == "probe":
        model = probe_step(lg, anc, shapes, cfg, steps=3, probe_depth=probe_depth)
        by_cost = sorted(shapes, key=lambda s: (vit_flops(s), s.label()))
        row["per_step"] = [round(model.step(i, by_cost, cfg), 3) for i in range(1 + warm, 1 + warm + steps)]
        row["long_run_mean"] = round(model.mean(cfg), 3)
        row["fixed"] = round(model.fixed, 3)
    else:
        size = anc.arch.img_size
        images = torch.randn(batch, anc.arch.in_chans, size, size)
        data = ImageTensors(images, torch.zeros(batch, dtype=torch.int64), ["x"])
        run = dataclasses.replace(cfg, steps=1 + warm + steps)
        _, report = train_learngene(lg, anc, data, shapes, run, progress=False)
        row["per_step"] = [round(h["seconds"], 3) for h in report["history"][1 + warm :]]
    row["wall_s"] = round(time.perf_counter() - t0, 1)
    row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    return row


def run(args) -> dict:
    rows = []
    for spec in args.ancestries:
        for mode in MODES:
            cmd = [sys.executable, __file__, "--worker", mode, spec, str(args.batch), str(args.steps), str(args.warm)]
            cmd += [str(args.probe_depth), str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise SystemExit(f"{mode} on {spec} failed: {proc.stderr[-1500:]}")
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    for spec in args.ancestries:
        mine = {r["measurement"]: r for r in rows if r["ancestry"] == spec}
        truth = sum(mine["build's step"]["per_step"])
        for r in mine.values():
            r["mean_s"] = round(sum(r["per_step"]) / len(r["per_step"]), 3)
            r["vs_build"] = round(sum(r["per_step"]) / truth, 3)
    return {
        "machine": f"{platform.machine()} {platform.processor() or ''}, torch {torch.__version__}".strip(),
        "threads": args.threads,
        "batch": args.batch,
        "steps": args.steps,
        "warm": args.warm,
        "probe_depth": args.probe_depth,
        "rows": rows,
    }


def summarise(data: dict) -> str:
    lines = [
        f"Machine: {data['machine']}, {data['threads']} threads; batch {data['batch']}, the build's sandwich; steps "
        f"{data['warm'] + 1}..{data['warm'] + data['steps']} after the first (the same seeded picks in every row); "
        f"probe depth {data['probe_depth']}.",
        "",
        "| ancestry | measurement | peak RSS MB | wall s | s / step (steps measured) | / build's step | long-run mean s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        lines.append(
            f"| {r['ancestry']} | {r['measurement']} | {r['peak_rss_mb']} | {r['wall_s']} | {r['mean_s']} | "
            f"{r['vs_build']:.3f} | {r.get('long_run_mean', '')} |"
        )
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        mode, spec, *numbers = sys.argv[2:9]
        print(json.dumps(worker(mode, spec, *map(int, numbers))))
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ancestries", nargs="+", default=ANCESTRIES)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=4, help="real steps measured after a warm-up")
    p.add_argument(
        "--warm",
        type=int,
        default=2,
        help="real steps run and not measured after the first (a run's "
        "first draws of a shape build its skeleton: costs a long phase amortises)",
    )
    p.add_argument("--probe-depth", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="smoke run: the demo, batch 8, 2 steps")
    p.add_argument("--json", type=Path, required=True, help="raw results")
    p.add_argument("--md", type=Path, default=None, help="where to write the Markdown table")
    args = p.parse_args()
    if args.quick:
        args.ancestries, args.batch, args.steps, args.warm = ["demo"], 8, 2, 1
    run_and_write(run, summarise, args)


if __name__ == "__main__":
    main()
