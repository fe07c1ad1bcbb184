"""What the PEG benchmarks share: the downstream tasks, the fine-tuning recipe and its tables.

Tasks (all offline, all unseen by the demo ancestry and its learngene):
- ``digits``: scikit-learn's 8x8 digits, upsampled (1,000 train / 400 test).
- ``mnist-unseen``: 2,000 images of MNIST's validation split to train, 2,000 of its test split to
  evaluate (the ancestry trained on the 50k training split only).
- ``textures``: which of 10 scikit-image photographs a crop comes from (natural textures and
  scenes, train and test crops from disjoint image regions; :func:`factory.data.builtin.load_textures`).

Recipe (``recipe(steps)``): batch 32, AdamW lr 1e-3, warm-up steps/15, cosine, label smoothing
0.1, one-pixel shifts, the trainer's precision (``amp``: ``auto`` = bf16 autocast on a bf16 CPU, as the
build; ``off`` = fp32, as every result in RESULTS.md measured before bf16 became the default); accuracy
on the task's test split every ``eval_every`` steps.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics

from factory.data import Dataset, ImageTensors, load_dataset
from factory.training.train import TrainConfig, evaluate, train

TASKS = ("digits", "mnist-unseen", "textures")


def load_tasks(names: tuple[str, ...] | list[str]) -> dict[str, tuple[ImageTensors, ImageTensors]]:
    out = {}
    for name in names:
        if name == "mnist-unseen":
            mnist = load_dataset("mnist", img_size=28)
            out[name] = (mnist.val.subset(0, 2000), mnist.test.subset(0, 2000))
        else:
            ds = load_dataset(name, img_size=28)
            out[name] = (ds.train, ds.test)
    return out


def mnist_unseen(img_size: int = 28, in_chans: int = 1) -> Dataset:
    """MNIST the demo ancestry never trained on, with a validation split (the builds' and probes' benches):
    2,000 images of MNIST's validation split to train, 500 of its test split to validate, the next 2,000 to
    test. (:func:`load_tasks`' older ``mnist-unseen`` has no validation split and tests on the first 2,000.)"""
    mnist = load_dataset("mnist", img_size=img_size, in_chans=in_chans)
    return dataclasses.replace(
        mnist,
        name="mnist-unseen",
        train=mnist.val.subset(0, 2000),
        val=mnist.test.subset(0, 500),
        test=mnist.test.subset(500, 2500),
        identity=f"{mnist.identity}:unseen-2000-500-2000",
    )


def write_folder(ds: Dataset, root) -> str:
    """``ds`` (in memory, one channel) written as an ImageFolder ``root/{train,val,test}/<label>/<i>.png``, its
    normalisation undone: the same images through the streamed loader a user's folder takes."""
    from pathlib import Path

    from PIL import Image

    root = Path(root)
    for split, data in {"train": ds.train, "val": ds.val, "test": ds.test}.items():
        images = data.images[:, :1] * ds.std[0] + ds.mean[0]
        for i, (x, y) in enumerate(zip(images, data.labels.tolist())):
            folder = root / split / str(y)
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray((x[0].clamp(0, 1) * 255).round().byte().numpy(), "L").save(folder / f"{i}.png")
    return str(root)


def binomial_se(p: float, n: int) -> float:
    """``sqrt(p (1 - p) / n)``: the standard error of an accuracy ``p`` on ``n`` images (floored above zero, so
    a gap can be divided by it)."""
    return math.sqrt(max(p * (1 - p), 1e-12) / n)


def within_one_se(best: float, acc: float, n: int) -> bool:
    """``acc`` within one binomial standard error of ``best``'s accuracy on ``n`` images (issue 31's criterion)."""
    return best - acc <= binomial_se(best, n) + 1e-9


def recipe(steps: int, eval_every: int, seed: int, amp: str = "auto") -> TrainConfig:
    return TrainConfig(
        steps=steps,
        batch_size=32,
        lr=1e-3,
        warmup_steps=max(1, steps // 15),
        eval_every=eval_every,
        label_smoothing=0.1,
        shift=1,
        seed=seed,
        amp=amp,
    )


def finetune_curve(
    model, train_set: ImageTensors, eval_set: ImageTensors, steps: int, eval_every: int, seed: int, amp: str = "auto"
) -> dict[int, float]:
    """Test accuracy at step 0 and every ``eval_every`` steps of the recipe (trained in ``amp``'s precision)."""
    zero = evaluate(model, eval_set)
    res = train(model, train_set, recipe(steps, eval_every, seed, amp), val_data=eval_set, progress=False)
    return {0: zero, **{h["step"]: h["val_acc"] for h in res.history if "val_acc" in h}}


def rows_with_int_steps(results: list[dict]) -> list[dict]:
    """Result rows with integer curve keys (JSON turns them into strings)."""
    return [{**r, "curve": {int(k): float(v) for k, v in r["curve"].items()}} for r in results]


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.pstdev(values)


def write_outputs(data, table: str, json_path, md_path) -> None:
    """Write the raw results (JSON, when ``json_path`` is given) and the Markdown table (``md_path``), and
    print the table (and the run's wall time when ``data`` records one)."""
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(data, indent=2, default=str))
    if md_path:
        md_path.parent.mkdir(parents=True, exist_ok=True)
        md_path.write_text(table + "\n")
    print(table)
    if isinstance(data, dict) and "wall_seconds" in data:
        print(f"\nwall time {data['wall_seconds']} s")


def run_and_write(run, summarise, args, *, as_saved: bool = False) -> dict:
    """``run(args)`` timed (``wall_seconds``), then its outputs written by :func:`write_outputs` to
    ``args.json`` / ``args.md`` with ``summarise``'s table (of the data as the JSON will read back, with
    ``as_saved``: string keys); returns the data."""
    import time

    start = time.perf_counter()
    data = run(args)
    data["wall_seconds"] = round(time.perf_counter() - start, 1)
    shown = json.loads(json.dumps(data, default=str)) if as_saved else data
    write_outputs(data, summarise(shown), args.json, args.md)
    return data
