"""``--hflip auto`` measured: what the mirror check (``factory.core.mirror``) sees and decides on each task, how
stable that decision is over samples, and what it costs.

For each task the check runs as the build runs it -- the ancestry's pooled features, leave-one-out k-NN of
the images and of their mirrors against the unmirrored images, on ``n`` training images in the evaluation
view -- on ``--draws`` random samples of each size (seeded; the build itself uses one spread sample of the
init probe's size: 100-512 images, fewer at 224 px). The table gives the mean figures and in how many draws
it chose to flip.

Tasks: ``digits`` (sklearn's 8x8, in memory), ``mnist-unseen`` and ``textures`` (bench/common.py, written as
ImageFolders: what a user's build streams; ``textures`` are crops of photographs), ``sided`` (a generated pair
of classes that are each other's mirror image, as a 2 and a mirrored 2: the hostile case), all with the demo
ancestry; ``photos224`` (a generated 224-px RGB folder, :func:`factory.data.generate.write_image_folder`) with
``random:deit_tiny_patch16_224`` -- random weights, the case where features may not tell.

What the choice is worth in accuracy is ``bench/train_view.py``'s (the same folders, flip on and off).

Usage:
    python bench/mirror_check.py --json bench/out/mirror_check.json --md bench/out/mirror_check.md
"""

from __future__ import annotations

import argparse
import platform
import tempfile
from pathlib import Path

from common import mnist_unseen, run_and_write, write_folder

TASKS = ("digits", "mnist-unseen", "textures", "sided", "photos224")


def _sided(root: Path) -> str:
    """Two 28-px classes, bright on the left or on the right (each the other's mirror), 300 training images each."""
    import torch
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 300), ("val", 20), ("test", 20)):
        for label in (0, 1):
            folder = root / split / str(label)
            folder.mkdir(parents=True)
            for i in range(n):
                x = torch.rand(28, 28, generator=g) * 90
                w = int(torch.randint(8, 15, (1,), generator=g))
                x[:, :w] += 140
                if label:
                    x = x.flip(-1)
                Image.fromarray(x.clamp(0, 255).to(torch.uint8).numpy(), "L").save(folder / f"{i}.png")
    return str(root)


def _task(task: str, root: Path):
    """``(train split, ancestry spec)`` of ``task``, streamed from a folder where a user's build would stream it."""
    from factory.data import load_dataset

    if task == "digits":
        return load_dataset("digits", img_size=28).train, "demo"
    if task == "photos224":
        from factory.data.generate import write_image_folder

        folder = write_image_folder(root / task, classes=5, size=256, per_class={"train": 120, "val": 10, "test": 10})
        return load_dataset(str(folder), img_size=224, in_chans=3).train, "random:deit_tiny_patch16_224"
    if task == "sided":
        return load_dataset(_sided(root / task), img_size=28, in_chans=1).train, "demo"
    ds = mnist_unseen() if task == "mnist-unseen" else load_dataset(task, img_size=28)
    return load_dataset(write_folder(ds, root / task), img_size=28, in_chans=1).train, "demo"


def run(args) -> dict:
    import statistics

    import torch

    from factory.core.ancestry import load_ancestry
    from factory.core.mirror import check_mirror

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for task in args.tasks:
            train, spec = _task(task, Path(tmp))
            anc = load_ancestry(spec)
            for n in args.sizes:
                n = min(n, len(train))
                checks = []
                for draw in range(args.draws):
                    g = torch.Generator().manual_seed(draw)
                    part = train.pick(sorted(torch.randperm(len(train), generator=g)[:n].tolist()))
                    sample = part if hasattr(part, "images") else part.tensors()
                    checks.append(check_mirror(anc.model, sample.images, sample.labels))
                    print(task, n, draw, checks[-1].to_dict(), flush=True)
                mean = {
                    k: statistics.mean(getattr(c, k) for c in checks)
                    for k in ("accuracy", "mirrored_accuracy", "chance", "kept", "loss_z", "seconds")
                }
                kept = [c.kept for c in checks]
                rows.append(
                    {
                        "task": task,
                        "ancestry": spec,
                        "images": n,
                        "draws": len(checks),
                        **{k: round(v, 4) for k, v in mean.items()},
                        "kept_min": round(min(kept), 3),
                        "kept_max": round(max(kept), 3),
                        "flipped": sum(c.hflip > 0 for c in checks),
                        "reasons": sorted({c.reason.split(" (")[0] for c in checks}),
                    }
                )
    return {
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "draws": args.draws,
        "rows": rows,
    }


def summarise(data: dict) -> str:
    lines = [
        f"Machine {data['machine']}, {data['threads']} threads, torch {data['torch']}; {data['draws']} random "
        "samples per size (mean figures; kept's range over the samples).",
        "",
        "| task | ancestry | images | k-NN acc. | mirrored | chance | kept (min-max) | McNemar z | flip chosen | s per check |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        lines.append(
            f"| {r['task']} | {r['ancestry']} | {r['images']} | {r['accuracy']:.3f} | {r['mirrored_accuracy']:.3f} | "
            f"{r['chance']:.3f} | {r['kept']:.2f} ({r['kept_min']:.2f}-{r['kept_max']:.2f}) | {r['loss_z']:.1f} | "
            f"{r['flipped']} of {r['draws']} | {r['seconds']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--sizes", nargs="+", type=int, default=[100, 278, 512])
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="smoke run: two tasks, one size, two draws")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--md", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.tasks, args.sizes, args.draws = ["digits", "sided"], [100], 2
    run_and_write(run, summarise, args)


if __name__ == "__main__":
    main()
