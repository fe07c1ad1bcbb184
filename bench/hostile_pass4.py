"""Hostile pass, round four: the defects a fourth hostile pass found (each fixed, each with a test) and the cases
of earlier rounds that were refused for another fault before the one they were about, aimed again.

A case *holds* as in ``bench/hostile_pass3.py``: exit code 2, exactly one ``Error`` line, no traceback, no file
in the case's folder created, changed or removed, and the error is the one the case is about (its needle). The
cases run in round three's folder (:func:`hostile_pass3.setup`) plus the few files they add themselves.

    python bench/hostile_pass4.py --json bench/out/hostile_pass4.json --md bench/out/hostile_pass4.md
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hostile_pass3 import main  # noqa: E402


def other_classes_model(folder: Path, classes: int = 7) -> str:
    """A demo-style descendant predicting ``classes`` classes (digits has 10)."""
    from factory.core.ancestry import load_ancestry
    from factory.core.checkpoint import save_descendant
    from factory.core.timm_vit import build_vit

    path = folder / f"classes{classes}.safetensors"
    if not path.exists():
        arch = dataclasses.replace(load_ancestry("demo").arch, num_classes=classes)
        save_descendant(build_vit(arch, seed=0), arch, path, {"method": "scratch"})
    return str(path)


def cases(p: dict[str, str]) -> list[tuple[str, list[str], dict[str, str], str]]:
    """``(name, arguments, environment, needle)``; the files a case needs beyond round three's are written here,
    before the case's folder is snapshotted."""
    root = Path(p["profile"]).parent
    (root / "twice.yaml").write_text("profiles: [demo/pixel8, demo/pixel8]\n")
    seven = other_classes_model(root)
    prof, tiny_mem = p["profile"], p["tiny_mem"]
    build = ["build", "--profile", prof, "--data", "synthetic", "--steps", "1"]
    dry = [*build, "--dry-run", "--out"]
    clean = ["learngene", "train", "--learngene", p["lg_clean"], "--data", "builtin:digits", "--out", "lg2"]
    expand = ["expand", "--method", "scratch", "--ancestry", "demo", "--depth", "2", "--embed-dim", "64"]
    return [
        (
            "build: --time-budget below the least work",
            [*build, "--out", "o", "--time-budget", "1s"],
            {},
            "time budget 1s is below the least this build can do",
        ),
        (
            "learngene: --layers deeper than the ancestry",
            ["learngene", "--layers", "999", "--out", "lg"],
            {},
            "--layers: learngene layers 999 exceed the ancestry's 6",
        ),
        (
            "build: --gene-layers deeper than the ancestry",
            [*build, "--out", "o", "--gene-layers", "9"],
            {},
            "--gene-layers: learngene layers 9 exceed the ancestry's 6",
        ),
        (
            "learngene: --heads more than the ancestry's",
            ["learngene", "--heads", "999", "--layers", "2", "--out", "lg"],
            {},
            "--heads: learngene heads 999 exceed the ancestry's 3",
        ),
        (
            "build --dry-run: no shape fits the device",
            ["build", "--profile", tiny_mem, "--data", "synthetic", "--dry-run", "--out", "o"],
            {},
            "1 of 1 profiles would fail: tiny: profile tiny: no shape fits",
        ),
        ("build --dry-run: --out is a file", [*dry, p["file"]], {}, "afile exists and is not a directory"),
        (
            "build --dry-run: --out holds the user's manifest.json",
            [*dry, "out_manifest"],
            {},
            "manifest.json exists and was not written by peg-factory",
        ),
        (
            "build: a fleet lists a shipped profile twice",
            ["build", "--fleet", str(root / "twice.yaml"), "--out", "o"],
            {},
            "profile names must be unique in a fleet",
        ),
        (
            "build: --lr nan",
            [*build, "--out", "o", "--lr", "nan"],
            {},
            "--lr: invalid build setting: learning rate nan",
        ),
        (
            "train: --lr nan",
            ["train", "--model", p["model"], "--data", "builtin:digits", "--lr", "nan", "--out", "t"],
            {},
            "--lr: learning rate must be a finite number > 0",
        ),
        (
            "expand: an MLP ratio with no hidden units",
            [*expand, "--heads", "2", "--mlp-ratio", "0.001", "--out", "x.safetensors"],
            {},
            "mlp_ratio 0.001 gives no MLP hidden units at width 64",
        ),
        (
            "learngene: a hybrid ViT ancestry",
            ["learngene", "--ancestry", "random:vit_tiny_r_s16_p8_224", "--layers", "2", "--out", "lg"],
            {},
            "is a hybrid ViT",
        ),
        (
            "export: data of other classes than the model's",
            ["export", "--model", seven, "--format", "onnx-int8", "--data", "builtin:digits", "--out", "e"],
            {},
            "--data: data 'builtin:digits' has 10 classes but the model predicts 7",
        ),
        (
            "learngene train: --depths not numbers (round two's, aimed again)",
            [*clean, "--depths", "a,b"],
            {},
            "--depths must be comma-separated integers",
        ),
    ]


if __name__ == "__main__":
    main(cases, "hostile cases of round four")
