"""The training view of an ImageFolder: what the random crop's scale and the horizontal flip cost a fine-tune.

A folder (a user's data) is streamed through timm's training transform (``factory.data.stream.TrainView``):
``RandomResizedCrop`` of at least ``crop_scale`` of the image's area, then a horizontal flip with probability
``hflip``. timm's ImageNet recipe is 0.08 and 0.5 -- made for hundreds of epochs on photos. This bench
fine-tunes the same model from the same start on the same images written as a folder with each view, in one
run, and reports the test accuracy (binomial SE).

Tasks (bench/common.py, written as folders with :func:`common.write_folder`): ``mnist-unseen`` (digits:
a flip changes what a 2 or a 7 looks like) and ``textures`` (crops of photographs: mirrored, still the same
photograph). Start: weight selection from the demo ancestry (what the default ships on both tasks), the
build's fine-tuning recipe (``factory.pipeline.config.finetune_recipe``: batch 32, AdamW 1e-3, cosine).

Usage:
    python bench/train_view.py --json bench/out/train_view.json --md bench/out/train_view.md
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import tempfile
from pathlib import Path

from common import binomial_se, mnist_unseen, run_and_write, write_folder

#: (hflip, crop_scale): timm's ImageNet recipe first, the fine-tune's default (TrainConfig) marked in the table.
VIEWS = ((0.5, 0.08), (0.0, 0.08), (0.5, 0.5), (0.0, 0.5), (0.0, 1.0))
#: task -> (descendant shape, fine-tuning steps): a shape the demo fleet ships on that task, the steps of a
#: 10-minute budget there (bench/RESULTS.md, "A wall-clock budget").
TASKS = {"mnist-unseen": ("d6-w192-h3-r4-i28-p7", 700), "textures": ("d3-w192-h3-r4-i28-p7", 600)}


def _task_data(task: str, root: Path):
    from factory.data import load_dataset

    ds = mnist_unseen() if task == "mnist-unseen" else load_dataset(task, img_size=28)
    return load_dataset(write_folder(ds, root / task), img_size=28, in_chans=1)


def run(args) -> dict:
    from factory.core.ancestry import load_ancestry
    from factory.core.baselines import init_descendant
    from factory.core.shapes import DescendantShape
    from factory.pipeline.config import BuildConfig, finetune_recipe
    from factory.training.train import TrainConfig, evaluate, train

    anc = load_ancestry("demo")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for task in args.tasks:
            label, steps = TASKS[task]
            steps = args.steps or steps
            ds = _task_data(task, Path(tmp))
            shape = DescendantShape.from_label(label)
            for hflip, crop_scale in VIEWS:
                recipe = dataclasses.replace(
                    finetune_recipe(BuildConfig(finetune_steps=steps, seed=args.seed)),
                    hflip=hflip,
                    crop_scale=crop_scale,
                )
                model = init_descendant("weight_selection", shape, ancestry=anc, seed=args.seed)
                result = train(model, ds.train, recipe, val_data=ds.val, progress=False)
                acc = evaluate(model.cpu().eval(), ds.test)
                n = len(ds.test)
                default = (hflip, crop_scale) == (TrainConfig.hflip, TrainConfig.crop_scale)
                rows.append(
                    {
                        "task": task,
                        "shape": label,
                        "steps": steps,
                        "hflip": hflip,
                        "crop_scale": crop_scale,
                        "view": "timm ImageNet" if (hflip, crop_scale) == VIEWS[0] else ("default" if default else ""),
                        "accuracy": round(acc, 4),
                        "se": round(binomial_se(acc, n), 4),
                        "test_images": n,
                        "seconds": round(result.seconds, 1),
                    }
                )
                print(f"{task} hflip {hflip} crop_scale {crop_scale}: {acc:.4f} ({result.seconds:.0f}s)", flush=True)
    return {"machine": platform.machine(), "seed": args.seed, "rows": rows}


def summarise(data: dict) -> str:
    lines = [
        f"Machine {data['machine']}; seed {data['seed']}; weight selection from the demo ancestry; the build's "
        "fine-tuning recipe; each task written as an ImageFolder and streamed.",
        "",
        "| task | shape | steps | hflip | crop scale | view | test acc. (SE) | vs timm's view | train s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    base = {r["task"]: r["accuracy"] for r in data["rows"] if r["view"] == "timm ImageNet"}
    for r in data["rows"]:
        gain = (r["accuracy"] - base[r["task"]]) * 100
        lines.append(
            f"| {r['task']} | {r['shape'].split('-h')[0]} | {r['steps']} | {r['hflip']:g} | {r['crop_scale']:g} | "
            f"{r['view']} | {r['accuracy']:.4f} ({r['se']:.4f}) | {gain:+.1f} pts | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--steps", type=int, default=0, help="fine-tuning steps (0: each task's own)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--md", type=Path)
    run_and_write(run, summarise, parser.parse_args())


if __name__ == "__main__":
    main()
