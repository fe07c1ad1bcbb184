"""One expanding-phase step at 224 px, taken apart: its FLOPs against this machine's measured matmul rates (the
roofline fraction), where its time goes (torch.profiler), and exact alternatives A/B in one run (issue 32, item 3).

The step (:func:`factory.training.expanding_loop.train_learngene`, DeiT-Tiny ancestry with random weights, batch
``--batch``, the build's sandwich of ``default_shapes``: the smallest, one random shape and, every
``largest_every``-th step (1 by default: every step), the largest = d24): the teacher's forward, then per shape forward +
backward over micro-batches. Its multiply-adds per image: ``teacher + 3 * (sum of the drawn shapes' forwards)`` (a
backward is two forwards' worth), from :func:`factory.core.shapes.vit_flops`, the random shape's averaged over the
sandwich and the largest's over its cycle.

Variants, each the per-step seconds of :func:`measure_step_seconds` over ``--steps`` measured steps after a warm-up
(a median, or a whole cycle's mean where the largest shape is not in every step), the same shapes drawn in each
(seeded):

- ``default``: the build's settings (bf16 autocast where the CPU has it, micro-batches of ``memory_mb`` 512);
- ``whole batch``: no micro-batches (``memory_mb=0``; 2.65 GB of activations for d24 at batch 64);
- ``memory 256`` / ``memory 192`` / ``memory 128``: smaller micro-batches (less memory, the dry run's peak falls
  with them; a dry run measures its steps at 192, :data:`factory.training.micro_batch.DRY_RUN_CPU_MEMORY_MB`);
- ``math attention``: PyTorch's unfused SDPA (``sdpa_kernel(SDPBackend.MATH)``) instead of the CPU flash kernel;
- ``fp32``: no autocast.

And, for the d24 shape alone (forward + backward of one micro-batch of 12, the bulk of a step): eager against
``torch.compile`` (inductor), after compiling.

The sandwich (``ExpandingConfig.largest_every`` and ``random_per_step``, recipe changes whose quality
``bench/learngene_study.py`` measures): the largest shape every step (the sandwich rule, the default: at equal
phase time it measured at least as good a learngene as the others) against every 2nd or 3rd step and against no
largest shape with two random draws, each the
*mean* of ``--cycle`` steps after a warm-up (a whole number of 2- and 3-step cycles, the same seeded draws), beside
the speed-up their FLOPs predict. ``--sandwich-only`` runs just this table.

Usage:
    python bench/expanding_step.py --json bench/out/expanding_step.json --md bench/out/expanding_step.md
    python bench/expanding_step.py --sandwich-only --json bench/out/sandwich_step.json --md bench/out/sandwich_step.md
    python bench/expanding_step.py --quick --json /tmp/e.json      # smoke run (batch 8, 1 step, no compile)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import platform
import statistics
import time
from pathlib import Path

import torch
from common import run_and_write

from factory import load_ancestry, sample_learngene
from factory.core.expanding_phase import ExpandingConfig, default_shapes, picks_at, sandwich_step_macs
from factory.core.shapes import vit_flops
from factory.training.expanding_loop import measure_step_seconds, train_learngene
from factory.training.micro_batch import DRY_RUN_CPU_MEMORY_MB
from factory.training.precision import precision_for

ANCESTRY = "random:deit_tiny_patch16_224"


def matmul_rate(dtype: torch.dtype, m: int, k: int, n: int, seconds: float = 1.0) -> float:
    """GFLOP/s of ``(m x k) @ (k x n)`` in ``dtype``, repeated for about ``seconds`` after a warm-up."""
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * m * k * n * count / (time.perf_counter() - start) / 1e9


def step_flops(anc, shapes, cfg: ExpandingConfig) -> dict:
    """Multiply-adds of one step (module docstring), averaged over the sandwich's cycle: the random shapes averaged
    over ``shapes``, the largest counted ``1 / largest_every`` times (repeats of a drawn shape ignored)."""
    teacher, students = sandwich_step_macs(shapes, anc.arch.shape(), cfg.largest_every, cfg.random_per_step)
    macs = cfg.batch_size * (teacher + 3 * students)
    return {"gmac_per_step": round(macs / 1e9, 1), "teacher_share": round(teacher / (teacher + 3 * students), 3)}


def profile_step(lg, anc, shapes, cfg: ExpandingConfig, top: int) -> list[dict]:
    """The ops taking most self CPU time over two steps (the first's one-off costs included, small)."""
    from torch.profiler import ProfilerActivity, profile

    data = random_images(anc, cfg.batch_size)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        train_learngene(lg, anc, data, shapes, dataclasses.replace(cfg, steps=2), progress=False)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return [{"op": e.key, "share": round(e.self_cpu_time_total / total, 3), "calls": e.count} for e in events[:top]]


def compiled_d24(anc, micro: int, reps: int) -> dict:
    """Seconds of forward + backward of the largest shape on ``micro`` images: eager against torch.compile."""
    from factory.core.timm_vit import skeleton_vit

    shape = dataclasses.replace(anc.arch.shape(), depth=2 * anc.arch.depth)
    model = skeleton_vit(anc.arch, shape).eval()
    params = {
        k: (torch.randn(v.shape) * 0.02).requires_grad_(True) for k, v in model.state_dict(keep_vars=True).items()
    }
    x = torch.randn(micro, 3, anc.arch.img_size, anc.arch.img_size)

    def fwd(p, xs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return torch.func.functional_call(model, p, (xs,)).float().logsumexp(-1).mean()

    out = {"shape": shape.label(), "micro_batch": micro}
    for name, fn in (("eager", fwd), ("compiled", torch.compile(fwd))):
        start = time.perf_counter()
        fn(params, x).backward()
        out[f"{name}_first_s"] = round(time.perf_counter() - start, 2)
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn(params, x).backward()
            times.append(time.perf_counter() - start)
        out[f"{name}_s"] = round(statistics.median(times), 3)
    out["compiled_vs_eager"] = round(out["eager_s"] / out["compiled_s"], 3)
    return out


SANDWICHES = [
    ("largest every step (the default): smallest + largest + 1 random", dict(largest_every=1)),
    ("largest every 2nd step", dict(largest_every=2)),
    ("largest every 3rd step", dict(largest_every=3)),
    ("no largest, 2 random", dict(largest_every=0, random_per_step=2)),
]


def sandwich_rows(lg, anc, shapes, base: ExpandingConfig, cycle: int) -> list[dict]:
    """Mean seconds per step of each :data:`SANDWICHES` recipe over steps ``1..cycle`` (step 0, with its one-off
    costs, left out), against the first's (the largest shape every step), beside the speed-up :func:`step_flops`
    predicts."""
    rows = []
    for name, knobs in SANDWICHES:
        cfg = dataclasses.replace(base, steps=cycle + 1, **knobs)
        _, report = train_learngene(lg, anc, random_images(anc, cfg.batch_size), shapes, cfg, progress=False)
        seconds = statistics.mean(h["seconds"] for h in report["history"][1:])
        flops = step_flops(anc, shapes, cfg)["gmac_per_step"]
        drawn = drawn_gmac(anc, shapes, cfg, range(1, cycle + 1))
        rows.append(
            {"sandwich": name, **knobs, "s_per_step": round(seconds, 3), "gmac_per_step": flops, "drawn_gmac": drawn}
        )
        print(f"sandwich {rows[-1]}", flush=True)
    for r in rows:
        r["speedup"] = round(rows[0]["s_per_step"] / r["s_per_step"], 3)
        r["flops_speedup"] = round(rows[0]["gmac_per_step"] / r["gmac_per_step"], 3)
        r["drawn_speedup"] = round(rows[0]["drawn_gmac"] / r["drawn_gmac"], 3)
    return rows


def drawn_gmac(anc, shapes, cfg: ExpandingConfig, steps) -> float:
    """Mean multiply-adds per step of the shapes :func:`picks_at` actually draws at ``steps`` (the loop's order by
    cost), the teacher included: what the measured steps did, where :func:`step_flops` is the long-run mean."""
    by_cost = sorted(shapes, key=lambda s: (vit_flops(s), s.label()))
    teacher = vit_flops(anc.arch.shape())
    per_step = [teacher + 3 * sum(map(vit_flops, picks_at(step, by_cost, cfg))) for step in steps]
    return round(cfg.batch_size * statistics.mean(per_step) / 1e9, 1)


def random_images(anc, batch: int):
    from factory.data import ImageTensors

    images = torch.randn(batch, 3, anc.arch.img_size, anc.arch.img_size)
    return ImageTensors(images, torch.zeros(batch, dtype=torch.int64), ["x"])


def run(args) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.set_num_threads(args.threads)
    anc = load_ancestry(ANCESTRY)
    lg = sample_learngene(anc, anc.arch.depth // 2, seed=0, rescale="std")
    shapes = default_shapes(lg)
    base = ExpandingConfig(batch_size=args.batch)
    info = {
        "ancestry": ANCESTRY,
        "batch": args.batch,
        "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {platform.processor() or ''}, torch {torch.__version__}".strip(),
        "cycle": args.cycle,
        "sandwich": sandwich_rows(lg, anc, shapes, base, args.cycle),
    }
    if args.sandwich_only:
        return info
    rates = {
        "bf16_square_gflops": round(matmul_rate(torch.bfloat16, 2048, 2048, 2048), 1),
        "fp32_square_gflops": round(matmul_rate(torch.float32, 2048, 2048, 2048), 1),
        # the step's own GEMM: a micro-batch of 12 images' tokens through the MLP's first layer
        "bf16_vit_gflops": round(matmul_rate(torch.bfloat16, 12 * 197, 192, 768), 1),
        "fp32_vit_gflops": round(matmul_rate(torch.float32, 12 * 197, 192, 768), 1),
    }
    print(f"matmul rates {rates}", flush=True)
    variants = [
        ("default", base, contextlib.nullcontext),
        ("whole batch", dataclasses.replace(base, memory_mb=0), contextlib.nullcontext),
        ("memory 256", dataclasses.replace(base, memory_mb=256), contextlib.nullcontext),
        ("memory 192: a dry run's", dataclasses.replace(base, memory_mb=DRY_RUN_CPU_MEMORY_MB), contextlib.nullcontext),
        ("memory 128", dataclasses.replace(base, memory_mb=128), contextlib.nullcontext),
        ("math attention", base, lambda: sdpa_kernel(SDPBackend.MATH)),
        ("fp32", dataclasses.replace(base, amp="off"), contextlib.nullcontext),
    ]
    rows = []
    for name, cfg, context in variants:
        with context():
            seconds = measure_step_seconds(lg, anc, shapes, cfg, steps=args.steps + 1)
        rows.append({"variant": name, "memory_mb": cfg.memory_mb, "amp": cfg.amp, "s_per_step": round(seconds, 3)})
        print(f"step {rows[-1]}", flush=True)
    default = rows[0]["s_per_step"]
    for r in rows:
        r["vs_default"] = round(default / r["s_per_step"], 3)
    flops = step_flops(anc, shapes, base)
    achieved = 2 * flops["gmac_per_step"] / default
    precision = precision_for(torch.device("cpu"), "auto")
    peak = rates["bf16_square_gflops" if precision == "bf16" else "fp32_square_gflops"]
    return {
        **info,
        "precision": precision,
        "rates": rates,
        "flops": {**flops, "achieved_gflops": round(achieved, 1), "roofline_fraction": round(achieved / peak, 3)},
        "steps": rows,
        "profile": profile_step(lg, anc, shapes, base, args.top),
        "compile": None if args.quick else compiled_d24(anc, 12, args.steps),
    }


def sandwich_table(data: dict) -> list[str]:
    rows = data.get("sandwich") or []
    if not rows:
        return []
    lines = [
        "",
        f"The sandwich's recipes (mean seconds per step over {data['cycle']} steps after a "
        "warm-up, the same seeded draws):",
        "",
        "| sandwich | GMAC / step (long run) | GMAC / step (the measured steps) | s / step | speed-up | FLOPs "
        "predict (long run) | FLOPs predict (the measured steps) |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['sandwich']} | {r['gmac_per_step']} | {r.get('drawn_gmac', '-')} | {r['s_per_step']:.3f} | "
        f"{r['speedup']:.2f}x | {r['flops_speedup']:.2f}x | "
        + (f"{r['drawn_speedup']:.2f}x |" if "drawn_speedup" in r else "- |")
        for r in rows
    ]
    return lines


def summarise(data: dict) -> str:
    if "flops" not in data:  # --sandwich-only
        head = (
            f"Machine: {data['machine']}, {data['threads']} threads; {data['ancestry']}, batch {data['batch']}, 224 px."
        )
        return "\n".join([head, *sandwich_table(data)])
    f, r = data["flops"], data["rates"]
    lines = [
        f"Machine: {data['machine']}, {data['threads']} threads; {data['ancestry']}, batch {data['batch']}, 224 px, "
        f"the default precision here: {data['precision']}.",
        "",
        f"**FLOPs against the roofline.** One step: {f['gmac_per_step']} GMAC ({2 * f['gmac_per_step'] / 1000:.2f} "
        f"TFLOP; the teacher's forward {100 * f['teacher_share']:.0f}% of it) in {data['steps'][0]['s_per_step']} s = "
        f"{f['achieved_gflops']} GFLOP/s, **{100 * f['roofline_fraction']:.0f}% of this machine's "
        f"{data['precision']} matmul rate**. Measured matmul rates (GFLOP/s): bf16 {r['bf16_square_gflops']} and fp32 "
        f"{r['fp32_square_gflops']} at 2048^3; at the step's own MLP GEMM (2364 x 192 x 768) bf16 "
        f"{r['bf16_vit_gflops']} and fp32 {r['fp32_vit_gflops']}.",
        "",
        "| variant | memory_mb | amp | s / step | speed vs default |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {s['variant']} | {s['memory_mb']} | {s['amp']} | {s['s_per_step']:.3f} | {s['vs_default']:.2f}x |"
        for s in data["steps"]
    ]
    lines += ["", "Where the default step's time goes (torch.profiler, self CPU time, two steps):", ""]
    lines += ["| op | share | calls |", "|---|---|---|"]
    lines += [f"| `{p['op']}` | {100 * p['share']:.1f}% | {p['calls']} |" for p in data["profile"]]
    c = data.get("compile")
    if c:
        lines += [
            "",
            f"`torch.compile` (inductor) on {c['shape']}, forward + backward of a micro-batch of {c['micro_batch']}: "
            f"eager {c['eager_s']} s, compiled {c['compiled_s']} s ({c['compiled_vs_eager']:.2f}x) after "
            f"{c['compiled_first_s']} s of compiling.",
        ]
    return "\n".join(lines + sandwich_table(data))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--md", type=Path, default=None)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4, help="measured steps per variant (after a warm-up)")
    parser.add_argument("--top", type=int, default=10, help="profiled ops listed")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--cycle", type=int, default=6, help="measured steps per sandwich recipe (after a warm-up)")
    parser.add_argument("--sandwich-only", action="store_true", help="only the sandwich's recipes")
    parser.add_argument("--quick", action="store_true", help="smoke run: batch 8, 1 step, no compile")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.steps, args.top, args.cycle = 8, 1, 5, 2
    run_and_write(run, summarise, args)


if __name__ == "__main__":
    main()
