"""Choosing the initialisation (``--init auto``): the transfer probe against every fixed choice.

For each task, shape and seed: every candidate initialisation (``peg`` = the shipped learngene,
``weight_selection``, ``tleg``, ``scratch``) is scored by the factory's transfer probe
(:func:`factory.core.transfer.decide_init`: leave-one-out k-NN on its untrained features, the first
512 training images), then fine-tuned with the build's recipe at each budget (a separate run per
budget: the schedule depends on it) and tested. ``auto`` is the fixed choice the decision rule picks
for that seed: the same fine-tune, so its accuracy is that run's. Reported per task, shape and budget:
every fixed choice (mean over seeds), auto, the best fixed choice and auto's gap to it in binomial
standard errors, and the decision's cost against one fine-tune; then the margins swept.

Tasks: ``digits``, ``mnist-unseen``, ``textures`` (bench/common.py) and ``stripes``, a task this
bench generates (:func:`factory.data.builtin.make_synthetic`: 8 classes of noisy stripes, 4
directions x 2 periods, 1,000 train / 400 test) that the MNIST ancestry has never seen.

Usage:
    python bench/init_study.py --json bench/out/init_study.json --md bench/out/init_study.md   # ~50 min, 2 cores
    python bench/init_study.py --quick --json /tmp/q.json                                      # smoke run
    python bench/init_study.py --render --json A.json [B.json ...] --md OUT.md                 # tables of saved runs
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import platform
import statistics
import time
from pathlib import Path

import torch
from common import finetune_curve, load_tasks, run_and_write, write_outputs

from factory import DescendantShape, init_descendant, load_ancestry
from factory.core.demo import load_demo_learngene
from factory.core.transfer import TransferProbe, choose_init, decide_init, trained_by

TASKS = ("digits", "mnist-unseen", "textures", "stripes")
SHAPES = {
    "d3-w192": DescendantShape(3, 192, 3, 4.0, 28, 7, 10),
    "d6-w96-h2-r2": DescendantShape(6, 96, 2, 2.0, 28, 7, 10),
    "d3-w192-h3-r2": DescendantShape(3, 192, 3, 2.0, 28, 7, 10),
}
METHODS = ("peg", "weight_selection", "tleg", "scratch")


def tasks(names):
    from factory.data.builtin import make_synthetic

    out = load_tasks([n for n in names if n != "stripes"])
    if "stripes" in names:
        s = make_synthetic(28, 8, 1000, 400, seed=7)
        out["stripes"] = (s.train, s.val)
    return out


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    anc = load_ancestry("demo")
    lg = load_demo_learngene(anc)
    probe = TransferProbe()
    rows = []
    for task, (train_set, test_set) in tasks(args.tasks).items():
        for shape_name in args.shapes:
            shape = SHAPES[shape_name]
            for seed in range(args.seeds):
                decision = decide_init(
                    shape, train_set.images, train_set.labels, ancestry=anc, learngene=lg, seed=seed, probe=probe
                )
                row = {
                    "task": task,
                    "shape": shape.label(),
                    "seed": seed,
                    "decision": decision.to_dict(),
                    "finetune": {},
                }
                for budget in args.budgets:
                    for method in METHODS:
                        model = init_descendant(method, shape, ancestry=anc, learngene=lg, seed=seed)
                        t0 = time.perf_counter()
                        acc = finetune_curve(model, train_set, test_set, budget, budget, seed)[budget]
                        row["finetune"].setdefault(str(budget), {})[method] = {
                            "accuracy": acc,
                            "seconds": round(time.perf_counter() - t0, 2),
                        }
                rows.append(row)
                print(
                    f"{task:12s} {shape.label():22s} seed {seed}: auto -> {decision.chosen} ({decision.seconds:.1f}s) "
                    + " ".join(
                        f"{b}:" + ",".join(f"{m[:4]}={v['accuracy']:.3f}" for m, v in row["finetune"][str(b)].items())
                        for b in args.budgets
                    ),
                    flush=True,
                )
    return {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "probe": dataclasses.asdict(probe),
        "learngene": lg.sha256,
        "rows": rows,
    }


def test_size(task: str) -> int:
    return {"mnist-unseen": 2000}.get(task, 400)


@functools.cache
def shape_trained(label: str) -> bool:
    """Whether the shipped learngene's expanding phase trained the shape (the rule's input; recomputed, so
    runs saved before the decision recorded it are judged by the same rule)."""
    return trained_by(DescendantShape.from_label(label, 10), load_demo_learngene())


def auto_choice(row: dict, probe: TransferProbe) -> str:
    return choose_init(row["decision"]["knn_accuracy"], probe, trained=shape_trained(row["shape"]))[0]


def cells(rows: list[dict], probe: TransferProbe) -> list[dict]:
    """One cell per (task, shape, budget): mean accuracy of each fixed choice and of auto over seeds."""
    out = []
    for task, shape in sorted({(r["task"], r["shape"]) for r in rows}, key=lambda ts: (TASKS.index(ts[0]), ts[1])):
        sub = [r for r in rows if r["task"] == task and r["shape"] == shape]
        for budget in sorted({int(b) for r in sub for b in r["finetune"]}):
            fixed = {m: statistics.mean(r["finetune"][str(budget)][m]["accuracy"] for r in sub) for m in METHODS}
            picks = [auto_choice(r, probe) for r in sub]
            auto = statistics.mean(r["finetune"][str(budget)][p]["accuracy"] for r, p in zip(sub, picks))
            best = max(fixed, key=fixed.get)
            se = math.sqrt(fixed[best] * (1 - fixed[best]) / test_size(task)) or 1e-9
            ft = statistics.mean(r["finetune"][str(budget)][m]["seconds"] for r in sub for m in METHODS)
            cost = statistics.mean(r["decision"]["seconds"] for r in sub)
            out.append(
                {
                    "task": task,
                    "shape": shape,
                    "budget": budget,
                    "fixed": fixed,
                    "auto": auto,
                    "picks": picks,
                    "best": best,
                    "se": se,
                    "gap_se": (fixed[best] - auto) / se,
                    "vs_peg": auto - fixed["peg"],
                    "cost_ratio": cost / ft,
                }
            )
    return out


def summarise(data: dict) -> str:
    rows = [r for d in data.get("runs", [data]) for r in d["rows"]]
    probe = TransferProbe()
    lines = [
        f"\nDecision rule: `TransferProbe()` (k-NN, {probe.images} images, k {probe.k}, scratch margin "
        f"{probe.scratch_margin:g}, inherit margin {'never' if probe.inherit_margin >= 1 else probe.inherit_margin}, "
        f"{probe.untrained_shape_init} preferred at "
        "shapes the learngene never trained). Accuracy = mean over seeds; SE = binomial standard error of the best "
        "fixed choice on the task's test set.\n",
        "| task | shape | budget | peg | weight_selection | tleg | scratch | auto (picks) | best fixed | auto - best | "
        "in 1 SE | auto - peg | decision / fine-tune |",
        "|---" * 13 + "|",
    ]
    table = cells(rows, probe)
    for c in table:
        f = c["fixed"]
        counts = "/".join(f"{p[:4]}x{c['picks'].count(p)}" for p in dict.fromkeys(c["picks"]))
        lines.append(
            f"| {c['task']} | {c['shape']} | {c['budget']} | "
            + " | ".join(f"{f[m]:.3f}" for m in METHODS)
            + f" | {c['auto']:.3f} ({counts}) | {c['best']} | {100 * (c['auto'] - f[c['best']]):+.1f} pt "
            f"({c['gap_se']:.1f} SE) | {'yes' if c['gap_se'] <= 1 else 'no'} | {100 * c['vs_peg']:+.1f} pt | "
            f"{c['cost_ratio']:.1%} |"
        )
    lines.append("\n**Margins swept** (cells within 1 SE of the best fixed choice, of all cells; mean auto - best):\n")
    lines.append(
        "| preferred at untrained shapes | scratch margin | inherit margin | cells in 1 SE | mean auto - best | "
        "worst auto - best | textures @100: auto - peg |"
    )
    lines.append("|---|---|---|---|---|---|---|")
    for pref in ("weight_selection", "peg"):
        for sm in (0.0, 0.03, 0.05, 0.1):
            for im in (0.0, 0.03, 1.0):
                p = TransferProbe(scratch_margin=sm, inherit_margin=im, untrained_shape_init=pref)
                t = cells(rows, p)
                tex = [c["vs_peg"] for c in t if c["task"] == "textures" and c["budget"] == 100]
                gaps = [c["auto"] - c["fixed"][c["best"]] for c in t]
                lines.append(
                    f"| {pref} | {sm:g} | {'never' if im >= 1 else f'{im:g}'} | {sum(c['gap_se'] <= 1 for c in t)}/{len(t)} | "
                    f"{100 * statistics.mean(gaps):+.2f} pt | {100 * min(gaps):+.1f} pt | "
                    + (", ".join(f"{100 * v:+.1f}" for v in tex) or "-")
                    + " |"
                )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: digits, one shape, budgets 5, one seed")
    parser.add_argument("--json", type=Path, nargs="+", required=True, help="raw results (several with --render)")
    parser.add_argument("--md", type=Path, default=None, help="where to write the Markdown table")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--budgets", nargs="+", type=int, default=[100, 400], help="fine-tuning steps, one run each")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--render", action="store_true", help="only render --md from existing --json files")
    args = parser.parse_args()
    if args.render:
        data = {"runs": [json.loads(p.read_text()) for p in args.json]}
        write_outputs(data, summarise(data), None, args.md)
        return
    if args.quick:
        args.tasks, args.shapes, args.budgets, args.seeds = ["digits"], ["d6-w96-h2-r2"], [5], 1
    args.json = args.json[0]
    run_and_write(run, summarise, args)


if __name__ == "__main__":
    main()
