"""Which learngene recipe makes PEG descendants learn fastest? One knob at a time, then combined.

Every variant makes a learngene from the shipped demo ancestry (d6-w192, MNIST-trained), expands it
to two of the PEG benchmark's shapes (d3-w192 shallower, d6-w96 narrower; ``--deep`` adds d9-w192, ``--largest`` the
sandwich's largest, d12-w192, with a per-shape table)
and fine-tunes each with the shared
recipe (``bench/common.py``) on ``digits`` and ``textures`` for several seeds; weight selection and
TLEG are run in the same process on the same shapes, seeds and steps as the reference. Knobs:

- ``tau``: softmax temperature of the layer/head mixture (1 = the paper's Gaussian mixture).
- ``head mixing`` on/off; ``rescale``: the variance-preserving rescale (factory.core.mixing.rescale_like).
- ``gene layers``: 3 (= L_a/2, the paper's) or 6.
- expanding phase: ``steps``; ``data`` (MNIST train = the ancestry's own data, or the target
  task's own training images); ``sandwich`` (``depths``: depths 1/3/6/9/12 at the ancestry's width,
  the old default; ``grid``: depths 1..12 x widths 96/144/192 at one head count and MLP ratio each;
  the factory's default; ``varied``: the grid with two head counts and MLP ratios 1-4 per width,
  ``--vary-shapes``); ``extra hidden`` units of the depth maps; ``largest_every`` (the sandwich's largest
  shape every k-th step; 0: only when drawn) and ``random_per_step`` (random draws per step): the recipe's speed
  lever at 224 px, where the largest shape is about two thirds of a step. The "shipped recipe, ..." variants
  keep the largest every step (``BASE``), as the shipped learngene was made (in fp32; precision is not part of a
  recipe). "expand 430/750/860, largest every step" against "expand 750, largest every 3rd step" and "shipped
  recipe, bf16, largest every 3rd step" compare the two sandwiches at equal phase *time*.
- ``amp`` of the expanding phase (``off`` = fp32, how every learngene here was trained until bf16
  autocast arrived; ``bf16``) and ``distill``: the input size it distils at (position embeddings
  resampled; None = the ancestry's 28 px): the real-scale speed-ups of issue 21, whose quality is measured
  against the shipped learngene (the same recipe in fp32 at 28 px) by the "shipped recipe, ..." variants.
- ``shipped``: the learngene shipped in ``factory/assets`` (the factory's default).

``--variants NAME ...`` runs only those (the baselines always run); ``--amp`` is the fine-tunes' precision.

Usage:
    python bench/learngene_study.py --json bench/out/learngene_study.json --md bench/out/learngene_study.md
    python bench/learngene_study.py --quick --json /tmp/s.json --md /tmp/s.md     # smoke run
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from common import finetune_curve, load_tasks, mean_std, rows_with_int_steps, run_and_write

from factory import DescendantShape, init_descendant, load_ancestry, sample_learngene
from factory.core.demo import load_demo_learngene
from factory.core.expanding_phase import ExpandingConfig, default_shapes
from factory.data import load_dataset
from factory.training.expanding_loop import train_learngene

BASE = dict(
    tau=1.0,
    head_mixing=True,
    rescale="none",
    layers=3,
    steps=0,
    data="mnist",
    sandwich="grid",
    extra_hidden=0,
    amp="off",
    distill=None,
    largest_every=1,
    random_per_step=1,
)

VARIANTS: list[tuple[str, dict]] = [
    ("paper (untrained, tau 1)", {}),
    ("tau 0.3", dict(tau=0.3)),
    ("tau 0.1", dict(tau=0.1)),
    ("no head mixing", dict(head_mixing=False)),
    ("rescale std", dict(rescale="std")),
    ("6 gene layers", dict(layers=6)),
    ("expand 150 steps", dict(steps=150)),
    ("expand 250 steps", dict(steps=250)),
    ("expand 250, target data", dict(steps=250, data="target")),
    ("expand 250, old sandwich (depths only)", dict(steps=250, sandwich="depths")),
    ("expand 250, extra hidden 6", dict(steps=250, extra_hidden=6)),
    ("rescale std + expand 250", dict(rescale="std", steps=250)),
    ("shipped default", dict(shipped=True)),
    ("shipped recipe, bf16", dict(rescale="std", steps=1500, amp="bf16")),
    ("shipped recipe, bf16, distil at 21 px", dict(rescale="std", steps=1500, amp="bf16", distill=21)),
    ("shipped recipe, bf16, varied heads and ratios", dict(rescale="std", steps=1500, amp="bf16", sandwich="varied")),
    ("shipped recipe, bf16, largest every 3rd step", dict(rescale="std", steps=1500, amp="bf16", largest_every=3)),
    ("expand 750, largest every step", dict(rescale="std", steps=750, amp="bf16")),
    ("expand 750, largest every 3rd step", dict(rescale="std", steps=750, amp="bf16", largest_every=3)),
    # equal phase time: k=3 makes a step ~1.75x cheaper (its FLOPs), so 430/860 steps of the largest every step
    # cost about what 750/1,500 steps of every 3rd do.
    ("expand 430, largest every step", dict(rescale="std", steps=430, amp="bf16")),
    ("expand 860, largest every step", dict(rescale="std", steps=860, amp="bf16")),
    (
        "shipped recipe, bf16, no largest, 2 random",
        dict(rescale="std", steps=1500, amp="bf16", largest_every=0, random_per_step=2),
    ),
]
SHAPES = [
    DescendantShape(3, 192, 3, 4.0, 28, 7, 10),
    DescendantShape(6, 96, 2, 2.0, 28, 7, 10),
    DescendantShape(9, 192, 3, 4.0, 28, 7, 10),
]
#: ``--largest``: the sandwich's largest shape (twice the demo ancestry's depth, its width), the one a thinner
#: sandwich trains least and the one the demo profiles' searches often pick
LARGEST = DescendantShape(12, 192, 3, 4.0, 28, 7, 10)


def make_learngene(anc, knobs: dict, task_train, mnist_train):
    if knobs.get("shipped"):
        lg = load_demo_learngene(anc)
        return lg, {"seconds": 0.0, "steps": lg.meta.get("expanding_phase", {}).get("config", {}).get("steps")}
    k = {**BASE, **knobs}
    lg = sample_learngene(anc, k["layers"], tau=k["tau"], head_mixing=k["head_mixing"], rescale=k["rescale"], seed=0)
    if not k["steps"]:
        return lg, {"seconds": 0.0, "std_ratio": lg.meta["stats"]["summary"]["mean_std_ratio"]}
    if k["sandwich"] == "depths":
        shapes = default_shapes(lg, [1, 3, 6, 9, 12], [anc.arch.embed_dim], vary=False)
    elif k["sandwich"] == "grid":
        shapes = default_shapes(lg, vary=False)
    else:  # "varied": heads and MLP ratios varied too (default_shapes(vary=True))
        shapes = default_shapes(lg, vary=True)
    data = task_train if k["data"] == "target" else mnist_train
    t0 = time.perf_counter()
    exp = ExpandingConfig(
        steps=k["steps"],
        extra_hidden=k["extra_hidden"],
        amp=k["amp"],
        distill_img_size=k["distill"],
        largest_every=k["largest_every"],
        random_per_step=k["random_per_step"],
    )
    trained, _ = train_learngene(lg, anc, data, shapes, exp, progress=False)
    return trained, {
        "seconds": round(time.perf_counter() - t0, 1),
        "std_ratio": lg.meta["stats"]["summary"]["mean_std_ratio"],
    }


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    anc = load_ancestry("demo")
    tasks = load_tasks(args.tasks)
    mnist_train = load_dataset("digits" if args.quick else "mnist", img_size=28).train
    variants = VARIANTS[:2] + [("expand 3 steps", dict(steps=3))] if args.quick else VARIANTS
    if args.variants:
        unknown = set(args.variants) - {n for n, _ in variants}
        if unknown:
            raise SystemExit(f"unknown variant(s) {sorted(unknown)}; known: {[n for n, _ in variants]}")
        variants = [(n, k) for n, k in variants if n in args.variants]
    shapes = SHAPES[:1] if args.quick else SHAPES if args.deep else SHAPES[:2]
    shapes = shapes + [LARGEST] if args.largest else shapes
    results, learngenes = [], {}
    cache = {}
    for name, knobs in [("weight_selection", {"method": "weight_selection"}), ("tleg", {"method": "tleg"})] + variants:
        for task, (train_set, eval_set) in tasks.items():
            method = knobs.get("method", "peg")
            lg = None
            if method == "peg":
                key = (name, task if knobs.get("data") == "target" else None)
                if key not in cache:
                    cache[key] = make_learngene(anc, knobs, train_set, mnist_train)
                    learngenes[f"{name}" + (f" [{task}]" if key[1] else "")] = cache[key][1]
                lg = cache[key][0]
            for shape in shapes:
                for seed in range(args.seeds):
                    model = init_descendant(method, shape, ancestry=anc, learngene=lg, seed=seed)
                    curve = finetune_curve(model, train_set, eval_set, args.steps, args.eval_every, seed, args.amp)
                    results.append(
                        {"variant": name, "task": task, "shape": shape.label(), "seed": seed, "curve": curve}
                    )
                    print(
                        f"{name:40s} {task:9s} {shape.label():22s} s{seed} "
                        + " ".join(f"{k}:{v:.3f}" for k, v in curve.items()),
                        flush=True,
                    )
    return {
        "args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items() if k not in ("json", "md")},
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "base": BASE,
        "variants": [[n, k] for n, k in variants],
        "learngenes": learngenes,
        "results": results,
    }


def summarise(data: dict) -> str:
    rows = rows_with_int_steps(data["results"])
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    steps = sorted({k for r in rows for k in r["curve"]} - {0})
    names = list(dict.fromkeys(r["variant"] for r in rows))

    def show(k: dict) -> str:
        return ", ".join(f"{key}={value}" for key, value in sorted(k.items())) or "(base)"

    knobs = {"weight_selection": "baseline", "tleg": "baseline", **{n: show(k) for n, k in data["variants"]}}
    head = " | ".join(f"{t} @{s}" for t in tasks for s in steps)
    lines = [
        f"Mean test accuracy over {len({r['shape'] for r in rows})} shapes x {len({r['seed'] for r in rows})} seeds "
        f"(± std over those runs); knobs differ from the base: {show(data['base'])}.",
        "",
        f"| variant | knobs | {head} | mean | vs weight selection |",
        "|---|---|" + "---|" * (len(tasks) * len(steps) + 2),
    ]
    overall = {}
    for name in names:
        cells, means = [], []
        for t in tasks:
            for s in steps:
                m, sd = mean_std([r["curve"][s] for r in rows if r["variant"] == name and r["task"] == t])
                cells.append(f"{m:.3f} ± {sd:.3f}")
                means.append(m)
        overall[name] = sum(means) / len(means)
    for name in names:
        delta = overall[name] - overall["weight_selection"]
        cells = []
        for t in tasks:
            for s in steps:
                m, sd = mean_std([r["curve"][s] for r in rows if r["variant"] == name and r["task"] == t])
                cells.append(f"{m:.3f} ± {sd:.3f}")
        lines.append(
            f"| {name} | {knobs.get(name, '')} | " + " | ".join(cells) + f" | {overall[name]:.3f} | {delta:+.3f} |"
        )
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    if len(shapes) > 1:
        lines += ["", "Per shape (mean over tasks, evaluations and seeds; vs weight selection at that shape):", ""]
        lines += ["| variant | " + " | ".join(shapes) + " |", "|---|" + "---|" * len(shapes)]
        for name in names:
            cells = []
            for shape in shapes:
                at = [m for t in tasks for st in steps for m in _cell(rows, name, t, st, shape)]
                base = [m for t in tasks for st in steps for m in _cell(rows, "weight_selection", t, st, shape)]
                cells.append(f"{sum(at) / len(at):.3f} ({sum(at) / len(at) - sum(base) / len(base):+.3f})")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lg_lines = [
        "",
        "Learngenes (expanding-phase seconds on this machine; std ratio = gene/ancestry weight std before training):",
        "",
    ]
    lg_lines += [f"- {n}: {show(v)}" for n, v in data["learngenes"].items()]
    return "\n".join(lines + lg_lines)


def _cell(rows, name, task, step, shape) -> list[float]:
    """The mean over seeds of one (variant, task, evaluation step, shape), as a one-item list (empty if none)."""
    values = [r["curve"][step] for r in rows if (r["variant"], r["task"], r["shape"]) == (name, task, shape)]
    return [sum(values) / len(values)] if values else []


def render(json_path: Path, md_path: Path | None) -> None:
    """Re-render the table from a saved JSON (no re-run)."""
    table = summarise(json.loads(json_path.read_text()))
    if md_path:
        md_path.write_text(table + "\n")
    print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 variants, 1 shape, few steps, 1 seed")
    parser.add_argument("--json", type=Path, required=True, help="where to write the raw results")
    parser.add_argument("--md", type=Path, default=None, help="where to write the Markdown table")
    parser.add_argument("--tasks", nargs="+", default=["digits", "textures"])
    parser.add_argument("--deep", action="store_true", help="also the deeper d9-w192 shape (about 2.5x the time)")
    parser.add_argument("--largest", action="store_true", help="also the sandwich's largest shape, d12-w192")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--render", action="store_true", help="only re-render --md from an existing --json")
    parser.add_argument("--variants", nargs="+", default=None, help="run only these variants (and the baselines)")
    parser.add_argument("--amp", default="off", choices=["auto", "bf16", "off"], help="the fine-tunes' precision")
    args = parser.parse_args()
    if args.render:
        return render(args.json, args.md)
    if args.quick:
        args.tasks = ["digits"]
    args.steps = args.steps or (10 if args.quick else 50)
    args.eval_every = max(1, args.steps // 2) if args.quick else args.eval_every
    args.seeds = args.seeds or (1 if args.quick else 3)
    run_and_write(run, summarise, args, as_saved=True)


if __name__ == "__main__":
    main()
