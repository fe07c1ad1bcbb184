"""Hostile pass, round five: the refusals a fifth hostile pass found missing or mis-worded (each fixed, each with a
test in ``tests/test_bad_input.py``).

A case *holds* as in ``bench/hostile_pass3.py``: exit code 2, exactly one ``Error`` line, no traceback, no file
in the case's folder created, changed or removed, and the error is the one the case is about (its needle). The
cases run in round three's folder (:func:`hostile_pass3.setup`) plus the few files they add themselves. This
round's fixes that change what a command *does* rather than how it refuses (a batch larger than its split, hidden
folders, model folders) are not cases here: their tests say what they do.

    python bench/hostile_pass5.py --json bench/out/hostile_pass5.json --md bench/out/hostile_pass5.md
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hostile_pass3 import _images, main  # noqa: E402
from hostile_pass4 import other_classes_model  # noqa: E402


def cases(p: dict[str, str]) -> list[tuple[str, list[str], dict[str, str], str]]:
    """``(name, arguments, environment, needle)``; the files a case needs beyond round three's are written here,
    before the case's folder is snapshotted."""
    root = Path(p["profile"]).parent
    five = other_classes_model(root, classes=5)  # a teacher whose logits are not the task's
    no_val = _images(root / "data_no_val", splits=("train", "test"))
    empty_class = _images(root / "data_empty_class")
    for f in (empty_class / "val" / "b").iterdir():
        f.unlink()
    (root / "kit").mkdir()
    for field in ("calibration", "latency_tables"):
        (root / f"{field}_folder.yaml").write_text(Path(p["profile"]).read_text() + f"{field}: kit\n")
    train = ["train", "--model", p["model"], "--data", "builtin:digits", "--steps", "1", "--out", "t"]
    return [
        (
            "train: --resume without a checkpoint",
            [*train, "--resume"],
            {},
            "cannot resume training (--resume): no checkpoint in t/checkpoint",
        ),
        (
            "train: --distill-from a 224-px timm ViT",
            [*train, "--distill-from", "random:vit_tiny_patch16_224"],
            {},
            "--distill-from: the teacher has input size 224 (the student's 28)",
        ),
        (
            "train: --distill-from a model of other classes",
            [*train, "--distill-from", five],
            {},
            "--distill-from: the teacher has classes 5 (the student's 10)",
        ),
        (
            "train: data with train/ and test/ but no val/",
            ["train", "--model", p["model"], "--data", str(no_val), "--out", "t"],
            {},
            "has no val/ (it holds test/, train/)",
        ),
        (
            "train: a class folder without images",
            ["train", "--model", p["model"], "--data", str(empty_class), "--out", "t"],
            {},
            "Found no valid file for the classes b; every class folder needs at least one image",
        ),
        (
            "search: a profile's calibration CSV is a folder",
            ["search", "--profile", str(root / "calibration_folder.yaml")],
            {},
            "/kit is a directory, not a regular file; pass a file",
        ),
        (
            "search: a profile's latency tables are a folder",
            ["search", "--profile", str(root / "latency_tables_folder.yaml")],
            {},
            "/kit is a directory, not a regular file; pass a file",
        ),
        (
            "train: --distill-alpha without --distill-from",
            [*train, "--distill-alpha", "0.9"],
            {},
            "--distill-alpha only applies with --distill-from",
        ),
        (
            "build: --budget-split without --time-budget",
            ["build", "--profile", p["profile"], "--data", "synthetic", "--budget-split", "steps", "--out", "o"],
            {},
            "--budget-split only applies with --time-budget",
        ),
        (
            "build: --task-cpus without --executor ray",
            ["build", "--profile", p["profile"], "--data", "synthetic", "--task-cpus", "4", "--out", "o"],
            {},
            "--task-cpus only applies with --executor ray",
        ),
        (
            "build: --no-joint-choice with --init scratch",
            ["build", "--profile", p["profile"], "--data", "synthetic", "--init", "scratch", "--no-joint-choice"]
            + ["--out", "o"],
            {},
            "--joint-choice/--no-joint-choice only applies with --init auto",
        ),
        (
            "build: --expand-steps with --learngene",
            ["build", "--profile", p["profile"], "--data", "synthetic", "--learngene", p["lg_clean"]]
            + ["--expand-steps", "600", "--out", "o"],
            {},
            "--expand-steps only applies with a learngene the build makes: leave out --learngene",
        ),
        (
            "learngene: --tau with --mixing uniform",
            ["learngene", "--mixing", "uniform", "--tau", "3", "--out", "lg"],
            {},
            "--tau only applies with --mixing softmax",
        ),
        (
            "flops: --model a folder without model.safetensors",
            ["flops", "--model", p["nomodel"]],
            {},
            "is a folder without model.safetensors; pass a checkpoint file, or a model folder",
        ),
    ]


if __name__ == "__main__":
    main(cases, "hostile cases of round five")
