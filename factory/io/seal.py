"""Seals: a directory marked complete with the sha256 of every file in it, and checked on reuse."""

from __future__ import annotations

import json
import os
from pathlib import Path

from factory.io.hashing import sha256_file

SEAL_FILE = "done.json"


def sealed_files(directory: Path) -> list[Path]:
    """The files a seal covers: every file under ``directory`` but the seal itself, sorted."""
    return [p for p in sorted(directory.rglob("*")) if p.is_file() and p.name != SEAL_FILE]


def seal(directory: str | os.PathLike, info: dict) -> None:
    """Mark ``directory`` complete: ``done.json`` = ``info`` + the sha256 of every other file in it.

    Called last, inside :func:`atomic_directory`; :func:`seal_state` checks it, so an entry
    damaged later (truncated, edited, a file lost) is noticed and rebuilt, never trusted.
    """
    directory = Path(directory)
    files = {p.relative_to(directory).as_posix(): sha256_file(p) for p in sealed_files(directory)}
    (directory / SEAL_FILE).write_text(json.dumps({**info, "files": files}, sort_keys=True))


def seal_state(directory: str | os.PathLike) -> str:
    """``"done"`` (sealed and every file matches), ``"missing"`` (no seal) or ``"damaged"``."""
    directory = Path(directory)
    try:
        record = json.loads((directory / SEAL_FILE).read_text())
    except FileNotFoundError:
        return "missing"
    except (OSError, ValueError):
        return "damaged"
    files = record.get("files") if isinstance(record, dict) else None
    if not isinstance(files, dict):
        return "damaged"  # written before seals carried hashes, or edited
    present = {p.relative_to(directory).as_posix() for p in sealed_files(directory)}
    if present != set(files):
        return "damaged"
    try:
        return "done" if all(sha256_file(directory / name) == digest for name, digest in files.items()) else "damaged"
    except OSError:
        return "damaged"


def sealed_info(directory: str | os.PathLike) -> dict:
    """The ``info`` a seal of ``directory`` recorded (``{}`` without a readable one); it does not check the files
    (:func:`seal_state` does)."""
    try:
        record = json.loads((Path(directory) / SEAL_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in record.items() if k != "files"} if isinstance(record, dict) else {}
