"""The weights a fine-tune ships, measured: the last step's against the best of its validation evaluations
(``--keep-weights last`` against ``best-val``, the default; :mod:`factory.training.best_weights`).

Each cell is one fine-tune with the build's recipe (:func:`factory.pipeline.config.finetune_stage_recipe`:
its batch, learning rate, schedule, the validation split read up to 10 times: 10 in every default cell) on the build's data
in memory, from the demo ancestry. Both figures come from the *same* run: the weights it returns (the best
evaluation's) and its last checkpoint (the last step's), each scored on the test split, so the difference is
paired -- the selection alone, no seed or timing noise between two runs. Shapes, starts and step counts are
those the time-budget builds of ``bench/time_budget.py`` shipped (RESULTS, Runs 17-20).

Tasks: ``digits`` (sklearn's 8x8: 1,000 train, 397 val, 400 test), ``mnist-unseen`` (bench/common.py: 2,000
/ 500 / 2,000) and ``textures`` (1,000 / 400 / 400 crops of photographs, val and test from the same unseen
region).

Usage:
    python bench/keep_weights.py --json bench/out/keep_weights.json --md bench/out/keep_weights.md
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import tempfile
from pathlib import Path

from common import binomial_se, mnist_unseen, run_and_write

#: (task, depth, width, heads, start, steps): what Runs 17-20 shipped at 600 s.
CELLS = (
    ("digits", 3, 192, 3, "weight_selection", 1500),
    ("digits", 2, 160, 5, "scratch", 3000),
    ("mnist-unseen", 3, 192, 3, "weight_selection", 1600),
    ("mnist-unseen", 6, 192, 3, "peg", 800),
    ("textures", 2, 160, 5, "scratch", 4300),
    ("textures", 3, 192, 3, "scratch", 3100),
    ("textures", 1, 192, 3, "scratch", 6600),
)


def _cell(task, depth, width, heads, init, steps, seed, anc, lg, data, work: Path) -> dict:
    from safetensors.torch import load_file

    from factory.core.baselines import init_descendant
    from factory.core.shapes import DescendantShape
    from factory.pipeline.config import BuildConfig, finetune_stage_recipe
    from factory.training.best_weights import MOST_EVALUATIONS
    from factory.training.train import evaluate, train

    a = anc.arch
    shape = DescendantShape(depth, width, heads, 4.0, a.img_size, a.patch_size, a.num_classes)
    recipe = finetune_stage_recipe(BuildConfig(data=task, finetune_steps=steps, seed=seed), data)
    forced = not recipe.keep_best  # too few steps for the build's rule to evaluate (a --max-steps smoke run)
    if forced:
        recipe = dataclasses.replace(recipe, keep_best=True, eval_every=max(1, steps // MOST_EVALUATIONS))
    model = init_descendant(init, shape, ancestry=anc, learngene=lg, seed=seed)
    result = train(model, data.train, recipe, val_data=data.val, out_dir=work, progress=False)
    best = evaluate(model, data.test)
    last_state = load_file(str(work / "checkpoint" / "state.safetensors"))  # the checkpoint of the last step
    model.load_state_dict({k[6:]: v for k, v in last_state.items() if k.startswith("model.")})
    last = evaluate(model, data.test)
    evals = [h["val_acc"] for h in result.history if "val_acc" in h]
    return {
        "task": task,
        "shape": shape.label(),
        "init": init,
        "steps": steps,
        "seed": seed,
        "kept_step": result.kept_step,
        "evaluations": len([h for h in result.history if "val_acc" in h]),
        "forced": forced,  # evaluated every tenth of the steps though the build would not (too few steps)
        "val_kept": round(result.val_accuracy, 4),
        "val_last": evals[-1],
        "test_last": round(last, 4),
        "test_best_val": round(best, 4),
        "test_images": len(data.test),
        "seconds": round(result.seconds, 1),
    }


def run(args) -> dict:
    import torch

    from factory.core.ancestry import load_ancestry
    from factory.core.demo import load_demo_learngene
    from factory.data import load_dataset

    anc = load_ancestry("demo")
    lg = load_demo_learngene(anc)
    datasets = {}
    rows = []
    for task, depth, width, heads, init, steps in CELLS:
        if args.tasks and task not in args.tasks:
            continue
        if task not in datasets:
            datasets[task] = mnist_unseen() if task == "mnist-unseen" else load_dataset(task, img_size=28)
            datasets[task] = dataclasses.replace(datasets[task], test_from="test")  # each has its own test split
        steps = min(steps, args.max_steps) if args.max_steps else steps
        for seed in args.seeds:
            with tempfile.TemporaryDirectory() as tmp:
                row = _cell(task, depth, width, heads, init, steps, seed, anc, lg, datasets[task], Path(tmp))
            rows.append(row)
            print(row, flush=True)
    return {"machine": platform.machine(), "torch": torch.__version__, "seeds": args.seeds, "rows": rows}


def summarise(data: dict) -> str:
    lines = [
        f"Machine {data['machine']}, torch {data['torch']}; seeds {data['seeds']}; each row one fine-tune, both "
        "figures from it (paired).",
        "",
        "| task | shape | init | steps | seed | kept step | val: kept / last | test: last (SE) | test: best-val | "
        "difference (pt) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        se = binomial_se(r["test_last"], r["test_images"])
        lines.append(
            f"| {r['task']} | {r['shape']} | {r['init']} | {r['steps']} | {r['seed']} | {r['kept_step']} | "
            f"{r['val_kept']:.4f} / {r['val_last']:.4f} | {r['test_last']:.4f} ({se:.4f}) | {r['test_best_val']:.4f} | "
            f"{100 * (r['test_best_val'] - r['test_last']):+.2f} |"
        )
    lines += [
        "",
        "| task | cells | best-val higher / same / lower | mean difference (pt) | min / max (pt) |",
        "|---|---|---|---|---|",
    ]
    tasks = sorted({r["task"] for r in data["rows"]})
    for task in [*tasks, "all"]:
        rs = [r for r in data["rows"] if task in ("all", r["task"])]
        d = [100 * (r["test_best_val"] - r["test_last"]) for r in rs]
        up, same = sum(x > 1e-9 for x in d), sum(abs(x) <= 1e-9 for x in d)
        lines.append(
            f"| {task} | {len(rs)} | {up} / {same} / {len(rs) - up - same} | {sum(d) / len(d):+.2f} | "
            f"{min(d):+.2f} / {max(d):+.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="*", default=[], help="only these tasks (default: all)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--max-steps", type=int, default=0, help="cap every cell's steps (a smoke run; 0: none)")
    parser.add_argument("--json", type=Path, default=Path("bench/out/keep_weights.json"))
    parser.add_argument("--md", type=Path, default=Path("bench/out/keep_weights.md"))
    run_and_write(run, summarise, parser.parse_args())


if __name__ == "__main__":
    main()
