"""The demo ancestry: a small ViT (:data:`factory.ancestry.DEMO_ARCH`) for offline use.

``load_demo_ancestry`` returns the trained demo weights when ``peg-factory ancestry train`` has
written them to the cache (:func:`demo_checkpoint_path`), else a seeded random initialisation,
reported as ``weights="random"`` so nobody mistakes it for a trained model.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .ancestry import DEMO_ARCH, Ancestry, _from_module, _load_into, read_checkpoint
from .timm_vit import build_vit


def cache_dir() -> Path:
    """``$PEG_FACTORY_CACHE``, else ``$XDG_CACHE_HOME/peg-factory``, else ``~/.cache/peg-factory``."""
    if os.environ.get("PEG_FACTORY_CACHE"):
        return Path(os.environ["PEG_FACTORY_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "peg-factory"


def demo_checkpoint_path() -> Path:
    return cache_dir() / "demo_ancestry" / "model.safetensors"


def load_demo_ancestry(seed: int = 0) -> Ancestry:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_vit(DEMO_ARCH)
    path = demo_checkpoint_path()
    if path.is_file():
        state, _ = read_checkpoint(path)
        _load_into(model, state, str(path), "demo")
        return _from_module(model, "demo", "trained-demo")
    return _from_module(model, "demo", "random")
