"""What a trained learngene's start is worth in fine-tuning steps: its *head start* (issue 31, item 5).

At equal wall time the expanding phase competes with fine-tuning: its seconds are fine-tuning steps that weight
selection (free: it needs no phase) gets instead. So the question a budget asks is not "does the learngene start
above weight selection?" (``expand_min_steps``: yes, from ~750 phase steps, at a *fixed* fine-tune) but "how many
fine-tuning steps is that start worth?". This bench measures it with the shipped demo learngene (the recipe's
1,500 phase steps, so no phase is paid here): for each task and each fine-tuning length ``N`` (a separate run each,
the schedule depends on ``N``), PEG's descendant and weight selection's are fine-tuned with the build's recipe and
tested. The head start at ``N`` is

    H(N) = N_ws(acc_peg(N)) - N

where ``N_ws(a)`` is the fine-tuning length weight selection needs to reach accuracy ``a``: its measured accuracies
interpolated linearly in ``log N`` over their running maximum (a curve that only rises). Where PEG's accuracy is
above every weight-selection run the head start is at least ``N_max - N`` (written ``>``); where it is below
weight selection at the shortest run, at most ``N_min - N`` (``<``). The phase pays at a budget only where ``H``
exceeds the fine-tuning steps its time costs each shape (``factory.pipeline.time_budget``).

Usage:
    python bench/phase_payoff.py --json bench/out/phase_payoff.json --md bench/out/phase_payoff.md   # ~35 min
    python bench/phase_payoff.py --quick --json /tmp/q.json                                          # smoke run
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from pathlib import Path

import torch
from common import TASKS, finetune_curve, load_tasks, run_and_write

from factory import DescendantShape, init_descendant, load_ancestry
from factory.core.demo import load_demo_learngene
from factory.core.transfer import expanding_steps

INITS = ("peg", "weight_selection")


def cpu_model() -> str:
    """The CPU's model name (Linux), else the platform's machine."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def steps_to_reach(curve: dict[int, float], accuracy: float) -> tuple[float, str]:
    """``N_ws(accuracy)`` on ``curve`` (steps -> accuracy) and how it is bounded: ``""`` (interpolated), ``">"``
    (above every point: at least the longest run), ``"<"`` (below the shortest run: at most it)."""
    steps = sorted(curve)
    best, env = -math.inf, []
    for n in steps:  # running maximum: more steps never reach less
        best = max(best, curve[n])
        env.append(best)
    if accuracy > env[-1]:
        return float(steps[-1]), ">"
    if accuracy <= env[0]:
        return float(steps[0]), "<" if accuracy < env[0] else ""
    for (n0, a0), (n1, a1) in zip(zip(steps, env), zip(steps[1:], env[1:])):
        if a0 < accuracy <= a1:
            frac = (accuracy - a0) / (a1 - a0)
            return math.exp(math.log(n0) + frac * (math.log(n1) - math.log(n0))), ""
    return float(steps[-1]), ""  # unreachable: the envelope's last point is above accuracy


def head_starts(rows: list[dict]) -> list[dict]:
    """One row per (task, N): both accuracies and PEG's head start ``H(N)`` against weight selection."""
    out = []
    for task in dict.fromkeys(r["task"] for r in rows):
        sub = [r for r in rows if r["task"] == task]
        ws = {r["steps"]: r["accuracy"] for r in sub if r["init"] == "weight_selection"}
        for r in (r for r in sub if r["init"] == "peg"):
            n_ws, bound = steps_to_reach(ws, r["accuracy"])
            se = math.sqrt(r["accuracy"] * (1 - r["accuracy"]) / r["test_images"])
            out.append(
                {
                    "task": task,
                    "steps": r["steps"],
                    "peg": r["accuracy"],
                    "weight_selection": ws.get(r["steps"]),
                    "se": se,
                    "head_start": n_ws - r["steps"],
                    "bound": bound,
                    "step_s": r["seconds"] / r["steps"],
                }
            )
    return out


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    anc = load_ancestry("demo")
    lg = load_demo_learngene(anc)
    shape = DescendantShape.from_label(args.shape, 10)
    rows = []
    for task, (train_set, test_set) in load_tasks(args.tasks).items():
        for steps in args.steps:
            for init in INITS:
                model = init_descendant(init, shape, ancestry=anc, learngene=lg, seed=args.seed)
                t0 = time.perf_counter()
                acc = finetune_curve(model, train_set, test_set, steps, steps, args.seed)[steps]
                rows.append(
                    {
                        "task": task,
                        "steps": steps,
                        "init": init,
                        "accuracy": acc,
                        "seconds": round(time.perf_counter() - t0, 2),
                        "test_images": len(test_set),
                    }
                )
                print(f"{task:12s} N={steps:5d} {init:16s} {acc:.4f} ({rows[-1]['seconds']:.0f}s)", flush=True)
    return {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": f"{cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "shape": shape.label(),
        "learngene": {"sha256": lg.sha256, "expanding_steps": expanding_steps(lg)},
        "rows": rows,
    }


def summarise(data: dict) -> str:
    lines = [
        f"Machine: {data['machine']}; shape {data['shape']}; the shipped learngene "
        f"({data['learngene']['expanding_steps']} expanding-phase steps); seed {data['args']['seed']}. "
        "H = the fine-tuning steps weight selection needs to reach PEG's accuracy, minus PEG's own (`>`: PEG "
        "is above every weight-selection run, a lower bound; `<`: below the shortest, an upper bound). SE = "
        "binomial standard error of PEG's accuracy on the test split.\n",
        "| task | N | PEG | weight selection | PEG - WS (SE) | head start H | H / N | s / step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for h in head_starts(data["rows"]):
        ws = h["weight_selection"]
        diff = "-" if ws is None else f"{100 * (h['peg'] - ws):+.1f} pt ({(h['peg'] - ws) / h['se']:+.1f})"
        lines.append(
            f"| {h['task']} | {h['steps']} | {h['peg']:.4f} | {'-' if ws is None else f'{ws:.4f}'} | {diff} | "
            f"{h['bound']}{h['head_start']:.0f} | {h['bound']}{h['head_start'] / h['steps']:.2f} | {h['step_s']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: digits, N 4 and 8")
    parser.add_argument("--json", type=Path, required=True, help="raw results")
    parser.add_argument("--md", type=Path, default=None, help="where to write the Markdown table")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--shape", default="d3-w192-h3-r4-i28-p7", help="descendant shape label (demo scale)")
    parser.add_argument("--steps", nargs="+", type=int, default=[100, 300, 1000, 3000], help="fine-tuning lengths")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    if args.quick:
        args.tasks, args.steps = ["digits"], [4, 8]
    run_and_write(run, summarise, args)


if __name__ == "__main__":
    main()
