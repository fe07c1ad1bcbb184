"""Where the user-level cache lives (no project imports)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$PEG_FACTORY_CACHE``, else ``$XDG_CACHE_HOME/peg-factory``, else ``~/.cache/peg-factory``."""
    if os.environ.get("PEG_FACTORY_CACHE"):
        return Path(os.environ["PEG_FACTORY_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "peg-factory"
