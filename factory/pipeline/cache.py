"""The build cache: one mechanism for every stage -- key, resume, seal, rebuild when damaged.

An entry lives at ``OUT/.cache/<stage>/<key>``, ``key`` = :func:`factory.io.content_key` of the
stage's inputs (the config objects that run, as data) and the package version. It is written as
a whole (:func:`factory.io.atomic_directory`) and sealed (:func:`factory.io.seal`: the sha256 of
every file); a damaged entry (a file missing or changed) is reported and rebuilt, never trusted.
Long stages checkpoint into the entry's *work* directory ``<key>.partial`` beside it, which
survives a killed build and is removed once the entry is sealed; the stage resumes from it
(:func:`factory.training.checkpoints.resume_or_restart`).
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from factory.io import SEAL_FILE, atomic_directory, content_key, seal, seal_state

#: The seal's field for the wall time the stage took when it ran (what a time budget plans against).
STAGE_SECONDS = "stage_seconds"


@dataclass(frozen=True)
class Entry:
    """One cache entry: ``stage/key`` under the cache root."""

    stage: str
    key: str
    path: Path

    @property
    def work(self) -> Path:
        """Where the stage keeps checkpoints while it runs (kept across a killed build)."""
        return self.path.with_name(self.key + ".partial")

    @property
    def cached(self) -> bool:
        """Sealed and intact (:func:`factory.io.seal_state`): a damaged entry is not cached."""
        return seal_state(self.path) == "done"

    def info(self) -> dict[str, Any]:
        """What the stage sealed the entry with (its result's small numbers)."""
        return json.loads((self.path / SEAL_FILE).read_text())


@dataclass(frozen=True)
class Cache:
    root: Path
    log: Callable[[str], None] = print

    def entry(self, stage: str, inputs: Any) -> Entry:
        key = content_key(inputs)
        return Entry(stage, key, self.root / stage / key)

    def get_or_run(
        self, entry: Entry, run: Callable[[Path, Path], dict[str, Any]], what: str, hit: str | None = None
    ) -> Entry:
        """``entry`` when it is cached and intact; else ``run(tmp, work)`` writes the files into ``tmp``
        (checkpointing into ``work`` if it is long) and returns the seal's info, and the entry is sealed (with
        :data:`STAGE_SECONDS`, the run's wall time) and put in place atomically. ``what`` names the stage in the
        log; ``hit`` replaces the default ``"<what>: cached (<key>)"`` line (``""``: say nothing)."""
        state = seal_state(entry.path)
        if state == "done":
            line = f"{what}: cached ({entry.key})" if hit is None else hit
            if line:
                self.log(line)
            return entry
        if state == "damaged":
            self.log(f"{entry.stage} cache entry {entry.key} is damaged (a file is missing or changed); rebuilding it")
        with atomic_directory(entry.path) as tmp:
            start = time.perf_counter()
            info = run(tmp, entry.work)
            seal(tmp, {**info, STAGE_SECONDS: round(time.perf_counter() - start, 2)})
        shutil.rmtree(entry.work, ignore_errors=True)
        return entry
