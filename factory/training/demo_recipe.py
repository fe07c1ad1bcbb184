"""The demo ancestry's training recipe: a small ViT (:data:`factory.core.ancestry.DEMO_ARCH`) on MNIST.

``peg-factory ancestry train`` trains it with :data:`DEMO_RECIPE` on the 50k MNIST training
split (the 10k validation and 10k test splits stay unseen, so downstream benchmarks can use
them) and writes fp16 weights (~5 MB) plus a JSON log with the recipe and test accuracy, to the
user's cache by default (:func:`factory.core.assets.demo_checkpoint_path`, where
:func:`factory.core.ancestry.load_demo_ancestry` looks first).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from factory.core.ancestry import ARCH_METADATA_KEY, DEMO_ARCH
from factory.core.assets import demo_checkpoint_path
from factory.core.timm_vit import build_vit
from factory.data import load_dataset
from factory.io import atomic_write_bytes, ensure_parent
from factory.training.train import TrainConfig, evaluate, train

#: How the shipped demo ancestry was trained (see ``peg-factory ancestry train --help``).
DEMO_RECIPE: dict[str, Any] = {
    "data": "mnist",
    "steps": 4000,
    "batch_size": 128,
    "lr": 1.5e-3,
    "warmup_steps": 50,
    "label_smoothing": 0.0,
    "shift": 1,
    "weight_decay": 0.05,
    "seed": 0,
}


def train_demo_ancestry(
    out: str | Path | None = None, *, recipe: dict[str, Any] | None = None, progress: bool = True, half: bool = True
) -> dict[str, Any]:
    """Train the demo ancestry, write ``out`` (+ ``.json`` log beside it); returns the log."""
    from safetensors.torch import save

    path = Path(out) if out is not None else demo_checkpoint_path()
    ensure_parent(path)  # fail before a long training run, not after it
    recipe = {**DEMO_RECIPE, **(recipe or {})}
    data = load_dataset(recipe["data"], img_size=DEMO_ARCH.img_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe["seed"])
        model = build_vit(DEMO_ARCH)
        cfg = TrainConfig(**{k: v for k, v in recipe.items() if k != "data"})
        result = train(model, data.train, cfg, progress=progress)
    model = model.cpu().eval()
    acc = evaluate(model, data.test)
    state = {k: (v.half() if half else v).contiguous() for k, v in model.state_dict().items()}
    if half:  # report the accuracy of what is shipped, not of the fp32 weights
        model.load_state_dict({k: v.float() for k, v in state.items()})
        acc = evaluate(model, data.test)
    log = {
        "command": "peg-factory ancestry train",
        "recipe": recipe,
        "arch": DEMO_ARCH.to_dict(),
        "test_accuracy": round(acc, 4),
        "final_loss": round(result.final_loss, 4),
        "train_seconds": round(result.seconds, 1),
        "dtype": "float16" if half else "float32",
        "torch": torch.__version__,
    }
    atomic_write_bytes(path, save(state, metadata={ARCH_METADATA_KEY: json.dumps(DEMO_ARCH.to_dict(), sort_keys=True)}))
    atomic_write_bytes(path.with_suffix(".json"), (json.dumps(log, indent=2) + "\n").encode())
    return log
