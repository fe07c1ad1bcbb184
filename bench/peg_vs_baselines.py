"""PEG vs baselines: fine-tuning speed of descendants initialised five ways.

For each descendant shape (shallower, narrower and deeper than the learngene) and downstream task
(``digits``; ``mnist-unseen``: MNIST's validation split for training and its test split for
evaluation, neither seen by the demo ancestry), every initialisation -- ``scratch``,
``weight_selection``, ``tleg``, ``peg`` (sampled learngene) and ``peg-trained`` (after the
expanding phase) -- is fine-tuned with the same recipe and step budget for several seeds.
Reported: accuracy at fixed step budgets (mean over seeds, plotted to PNG) and the steps each
method needs to reach the scratch model's final accuracy.

Usage:
    python bench/peg_vs_baselines.py --out bench/out            # full run (~25 min, 2 CPU cores)
    python bench/peg_vs_baselines.py --quick --out /tmp/q       # smoke run (CI), asserts nothing
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from factory import DescendantShape, init_descendant, load_ancestry, sample_learngene
from factory.data import ImageTensors, load_dataset
from factory.expanding import ExpandingConfig, default_shapes, train_learngene
from factory.train import TrainConfig, evaluate, train

METHODS = ("scratch", "weight_selection", "tleg", "peg", "peg-trained")


def tasks(quick: bool) -> dict[str, tuple[ImageTensors, ImageTensors]]:
    digits = load_dataset("digits", img_size=28)
    out = {"digits": (digits.train, digits.test)}
    if not quick:
        mnist = load_dataset("mnist", img_size=28)
        out["mnist-unseen"] = (mnist.val.subset(0, 2000), mnist.test.subset(0, 2000))
    return out


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    anc = load_ancestry("demo")
    lg = sample_learngene(anc, args.gene_layers, anc.arch.num_heads, seed=0)
    shapes = [
        DescendantShape(3, 192, 3, 4.0, 28, 7, 10),  # shallower than the ancestry, learngene depth
        DescendantShape(6, 96, 2, 2.0, 28, 7, 10),  # narrower
        DescendantShape(9, 192, 3, 4.0, 28, 7, 10),  # deeper
    ][: 1 if args.quick else 3]
    t0 = time.perf_counter()
    mnist_train = load_dataset("mnist", img_size=28).train if not args.quick else load_dataset("digits", img_size=28).train
    lg_shapes = default_shapes(lg, sorted({s.depth for s in shapes} | {1, 12}))
    trained, report = train_learngene(lg, anc, mnist_train, lg_shapes,
                                      ExpandingConfig(steps=args.expand_steps, batch_size=64, lr=5e-4),
                                      eval_data=load_dataset("digits", img_size=28).test, progress=False)
    expand_seconds = time.perf_counter() - t0
    cfg = dict(steps=args.steps, batch_size=args.batch, lr=args.lr, warmup_steps=max(1, args.steps // 15),
               eval_every=args.eval_every, label_smoothing=0.1, shift=1)
    results = []
    for task, (train_set, eval_set) in tasks(args.quick).items():
        for shape in shapes:
            for method in METHODS:
                for seed in range(args.seeds):
                    kind = "peg" if method.startswith("peg") else method
                    model = init_descendant(kind, shape, ancestry=anc, learngene=trained if method == "peg-trained" else lg, seed=seed)
                    zero = evaluate(model, eval_set)
                    res = train(model, train_set, TrainConfig(seed=seed, **cfg), val_data=eval_set, progress=False)
                    curve = {0: zero, **{h["step"]: h["val_acc"] for h in res.history if "val_acc" in h}}
                    results.append({"task": task, "shape": shape.label(), "method": method, "seed": seed,
                                    "curve": curve, "seconds": round(res.seconds, 1)})
                    print(f"{task:12s} {shape.label():22s} {method:16s} seed {seed}: "
                          + " ".join(f"{k}:{v:.3f}" for k, v in curve.items()), flush=True)
    return {
        "args": vars(args),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "ancestry": anc.identity(),
        "learngene": {"layers": lg.num_layers, "heads": lg.num_heads, "stats": lg.meta["stats"]["summary"]},
        "expanding_phase": {k: v for k, v in report.items() if k != "history"} | {"seconds_total": round(expand_seconds, 1)},
        "results": results,
    }


def _rows(data: dict) -> list[dict]:
    """Result rows with integer curve keys (JSON turns them into strings)."""
    return [{**r, "curve": {int(k): float(v) for k, v in r["curve"].items()}} for r in data["results"]]


def summarise(data: dict) -> str:
    """Markdown tables: accuracy at each budget (mean +- std over seeds), steps to scratch's final."""
    rows = _rows(data)
    lines = []
    groups = sorted({(r["task"], r["shape"]) for r in rows})
    for task, shape in groups:
        sub = [r for r in rows if r["task"] == task and r["shape"] == shape]
        steps = sorted({k for r in sub for k in r["curve"]})
        lines.append(f"\n**{task}, {shape}** (accuracy, mean ± std over {len({r['seed'] for r in sub})} seeds)\n")
        lines.append("| method | " + " | ".join(f"step {s}" for s in steps) + " | steps to scratch final |")
        lines.append("|---|" + "---|" * (len(steps) + 1))
        mean_curve = {}
        for method in METHODS:
            runs = [r for r in sub if r["method"] == method]
            if not runs:
                continue
            mean_curve[method] = {s: statistics.mean(r["curve"][s] for r in runs) for s in steps}
            std = {s: statistics.pstdev(r["curve"][s] for r in runs) for s in steps}
            mean_curve[method + "_std"] = std
        target = mean_curve["scratch"][steps[-1]]
        for method in METHODS:
            if method not in mean_curve:
                continue
            reach = next((s for s in steps if mean_curve[method][s] >= target), None)
            cells = " | ".join(f"{mean_curve[method][s]:.3f} ± {mean_curve[method + '_std'][s]:.3f}" for s in steps)
            lines.append(f"| {method} | {cells} | {reach if reach is not None else '> ' + str(steps[-1])} |")
    return "\n".join(lines)


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _rows(data)
    groups = sorted({(r["task"], r["shape"]) for r in rows})
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.6), squeeze=False)
    for ax, (task, shape) in zip(axes[0], groups):
        for method in METHODS:
            runs = [r for r in rows if r["task"] == task and r["shape"] == shape and r["method"] == method]
            if not runs:
                continue
            steps = sorted(runs[0]["curve"])
            mean = [statistics.mean(r["curve"][s] for r in runs) for s in steps]
            ax.plot(steps, mean, marker="o", markersize=3, label=method)
        ax.set_title(f"{task}\n{shape}", fontsize=9)
        ax.set_xlabel("fine-tuning steps")
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 shape, digits, few steps, 1 seed")
    parser.add_argument("--out", type=Path, default=Path("bench/out"))
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--eval-every", type=int, default=None)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--gene-layers", type=int, default=3)
    parser.add_argument("--expand-steps", type=int, default=None)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    args.steps = args.steps or (10 if args.quick else 150)
    args.eval_every = args.eval_every or (5 if args.quick else 25)
    args.seeds = args.seeds or (1 if args.quick else 3)
    args.expand_steps = args.expand_steps if args.expand_steps is not None else (3 if args.quick else 150)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    data = run(args)
    data["wall_seconds"] = round(time.perf_counter() - start, 1)
    args.out.joinpath("peg_vs_baselines.json").write_text(json.dumps(data, indent=2, default=str))
    table = summarise(json.loads(json.dumps(data, default=str)))
    args.out.joinpath("peg_vs_baselines.md").write_text(table + "\n")
    plot(json.loads(json.dumps(data, default=str)), args.out / "peg_vs_baselines.png")
    print(table)
    print(f"\nwall time {data['wall_seconds']} s; expanding phase {data['expanding_phase']}")


if __name__ == "__main__":
    main()
