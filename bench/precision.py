"""Does bf16 autocast on the CPU cost accuracy? Fine-tunes in fp32 and in bf16, same inits, seeds, steps.

The build fine-tunes under ``amp="auto"``: bf16 autocast on a CPU with native bf16 (AVX512-BF16 or
AMX), fp32 elsewhere (:func:`factory.training.precision.precision_for`). This bench fine-tunes the same
descendants (PEG from the shipped learngene, and scratch) of two of the PEG benchmark's shapes with
the shared recipe (``bench/common.py``) for ``--steps`` steps in both precisions, on every task and
several seeds, and reports the mean test accuracy per precision, their difference against one
binomial standard error of the test set, and the seconds per step of each (the speed-up).

Usage:
    python bench/precision.py --json bench/out/precision.json --md bench/out/precision.md
    python bench/precision.py --quick --json /tmp/p.json      # smoke run
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import time
from pathlib import Path

import torch
from common import TASKS, load_tasks, recipe, run_and_write

from factory import DescendantShape, init_descendant, load_ancestry
from factory.core.demo import load_demo_learngene
from factory.training.precision import precision_for
from factory.training.train import evaluate, train

SHAPES = [DescendantShape(3, 192, 3, 4.0, 28, 7, 10), DescendantShape(9, 192, 3, 4.0, 28, 7, 10)]
INITS = ("peg", "scratch")


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    anc = load_ancestry("demo")
    lg = load_demo_learngene(anc)
    tasks = load_tasks(args.tasks)
    rows = []
    for task, (train_set, test_set) in tasks.items():
        for shape in SHAPES[: 1 if args.quick else None]:
            for init in INITS:
                for seed in range(args.seeds):
                    for amp in ("off", "auto"):
                        model = init_descendant(init, shape, ancestry=anc, learngene=lg, seed=seed)
                        t0 = time.perf_counter()
                        res = train(model, train_set, recipe(args.steps, 0, seed, amp), progress=False)
                        seconds = time.perf_counter() - t0
                        acc = evaluate(model, test_set)
                        rows.append(
                            {
                                "task": task,
                                "shape": shape.label(),
                                "init": init,
                                "seed": seed,
                                "amp": amp,
                                "precision": res.precision,
                                "accuracy": acc,
                                "s_per_step": seconds / args.steps,
                                "test_images": len(test_set),
                            }
                        )
                        print(
                            f"{task:13s} {shape.label():22s} {init:8s} s{seed} {res.precision}: {acc:.4f} "
                            f"{seconds / args.steps:.3f} s/step",
                            flush=True,
                        )
    return {
        "args": {k: v for k, v in vars(args).items() if k not in ("json", "md")},
        "machine": f"{platform.machine()} {platform.processor() or ''}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "auto_precision": precision_for(torch.device("cpu"), "auto"),
        "rows": rows,
    }


def summarise(data: dict) -> str:
    rows = data["rows"]
    lines = [
        f"Fine-tuning precision: `amp=auto` resolved to **{data['auto_precision']}** on this machine ({data['machine']}); "
        f"{data['args']['steps']} steps, {data['args']['seeds']} seeds. Accuracy = mean test accuracy over the seeds; "
        "SE = one binomial standard error of the test set at that accuracy.",
        "",
        "| task | shape | init | fp32 acc | auto acc | auto - fp32 | SE | within 1 SE | fp32 s/step | auto s/step | speed-up |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    groups = dict.fromkeys((r["task"], r["shape"], r["init"]) for r in rows)
    diffs, speedups, within = [], [], 0
    for task, shape, init in groups:
        sel = [r for r in rows if (r["task"], r["shape"], r["init"]) == (task, shape, init)]
        fp32 = [r for r in sel if r["amp"] == "off"]
        auto = [r for r in sel if r["amp"] == "auto"]
        a32, aau = statistics.mean(r["accuracy"] for r in fp32), statistics.mean(r["accuracy"] for r in auto)
        n = sel[0]["test_images"] * len(fp32)
        se = math.sqrt(max(a32 * (1 - a32), 1e-9) / n)
        t32, tau = statistics.mean(r["s_per_step"] for r in fp32), statistics.mean(r["s_per_step"] for r in auto)
        ok = abs(aau - a32) <= se
        within += ok
        diffs.append(aau - a32)
        speedups.append(t32 / tau)
        lines.append(
            f"| {task} | {shape} | {init} | {a32:.4f} | {aau:.4f} | {aau - a32:+.4f} | {se:.4f} | {'yes' if ok else 'no'} | "
            f"{t32:.3f} | {tau:.3f} | {t32 / tau:.2f}x |"
        )
    lines += [
        "",
        f"Mean difference (auto - fp32) over {len(groups)} groups: {statistics.mean(diffs):+.4f}; within one SE in "
        f"{within}/{len(groups)}; median speed-up {statistics.median(speedups):.2f}x.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=None, help="where to write the raw results")
    parser.add_argument("--md", type=Path, default=None, help="where to write the Markdown table")
    parser.add_argument("--quick", action="store_true", help="smoke run: one task, one shape, 5 steps, one seed")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    if args.quick:
        args.tasks, args.steps, args.seeds = ["digits"], 5, 1
    run_and_write(run, summarise, args)


if __name__ == "__main__":
    main()
