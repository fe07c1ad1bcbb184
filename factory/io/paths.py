"""Where the user-level cache lives, and where a model folder keeps its weights (no project imports)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$PEG_FACTORY_CACHE``, else ``$XDG_CACHE_HOME/peg-factory``, else ``~/.cache/peg-factory``."""
    if os.environ.get("PEG_FACTORY_CACHE"):
        return Path(os.environ["PEG_FACTORY_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "peg-factory"


#: The weights file of a model folder: a `train` run's, a build device's (``OUT/DEVICE/``).
MODEL_FILE = "model.safetensors"


def model_file(path: Path) -> Path:
    """``path/model.safetensors`` where ``path`` is a folder holding one (a `train` run, a build's device folder),
    else ``path``: every command that reads a model (``--model``, ``--ancestry``) takes either."""
    return path / MODEL_FILE if path.is_dir() and (path / MODEL_FILE).is_file() else path
