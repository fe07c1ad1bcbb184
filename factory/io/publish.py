"""Writing a command's output folder without touching what the user keeps there.

:func:`owned_directory` yields a temporary directory; when the body succeeds, its files are put
in place under ``path``:

- ``path`` missing: the whole directory is renamed into place (atomic);
- ``path`` existing (empty or not): each new file replaces the file of the same name only if peg-factory
  wrote that one (it is listed in ``path``'s :data:`OWNED_FILE`), each file replaced atomically;
  files the same *writer* (``build``, ``export``, ...) wrote there before and does not write now are
  removed -- another command's files stay, e.g. the model a build put there when ``export`` writes
  beside it; **every file of the user's is left as it is**, and a new file whose name a file of the user's already has is refused (one
  line, nothing changed) instead of overwritten.

The temporary directory lives inside ``path`` (or beside it when ``path`` is new), so nothing is
ever written outside ``path``'s own parent and ``path`` itself is never renamed or replaced once
it exists -- it may be the working directory (``--out .``).

**The rule, for every command** (enforced here and nowhere else): a command deletes or replaces only files
it recorded writing, in the folder's :data:`OWNED_FILE`, and every record is checked to lie inside that
folder before it is trusted (:func:`owned_files` drops ``../x``, absolute paths and paths through a link
that leaves the folder). Besides :func:`owned_directory`, the same rule serves commands that write a few
named files straight into a folder (:func:`claim`, which checks and records them before they are written:
``train --out``, the build's manifest and reports) and the work folders of resumable runs (:func:`work_directory`: made and marked by
peg-factory, or empty when given; :func:`remove_work_directory` deletes only what a run puts there).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from factory.errors import FactoryError
from factory.io.atomic import (
    atomic_directory,
    atomic_write_bytes,
    ensure_parent,
    owner_tag,
    require_directory_or_absent,
    sweep_leftovers,
)

#: The list of files peg-factory wrote into a directory (relative POSIX paths), kept in that directory.
OWNED_FILE = ".peg-factory-files.json"
TMP_PREFIX = ".peg-factory-tmp-"


def _files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() or p.is_symlink())


def inside(root: Path, rel: str) -> bool:
    """Whether the relative POSIX path ``rel`` names something inside ``root``: not absolute, no ``..`` or empty
    part, and no link on the way that leaves ``root``."""
    from pathlib import PurePosixPath

    parts = PurePosixPath(rel).parts
    if not parts or PurePosixPath(rel).is_absolute() or "\\" in rel or any(p in ("..", ".", "") for p in parts):
        return False
    try:
        (root / rel).resolve().relative_to(root.resolve())
    except (ValueError, OSError, RuntimeError):
        return False
    return True


def owned_files(path: Path) -> dict[str, str]:
    """The files peg-factory recorded writing into ``path``, each with the command that wrote it; a record
    pointing outside ``path`` (:func:`inside`) is ignored, never trusted."""
    try:
        data = json.loads((path / OWNED_FILE).read_text())
    except (OSError, ValueError, RecursionError):
        return {}
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict):
        return {}
    return {f: w for f, w in files.items() if isinstance(f, str) and isinstance(w, str) and inside(path, f)}


def claim(path: Path, names: list[str], writer: str, what: str = "--out", *, record: bool = True) -> None:
    """Before a command writes ``names`` straight into the folder ``path`` (a name ending in ``/``: a folder it
    replaces whole): one line, nothing changed, when one of them exists and is not peg-factory's
    (:func:`owned_files`); else they are recorded as ``writer``'s now, before they are written, so a run killed
    half-way leaves files the next run may replace. ``record=False`` checks only (nothing is created: a build
    checks before its work and records just before it writes)."""
    require_directory_or_absent(path, what)
    ours = owned_files(path)
    for name in names:
        folder = name.endswith("/")
        target = path / name.rstrip("/")
        if not (target.exists() or target.is_symlink()):
            continue
        if target.is_symlink() or folder != target.is_dir():
            mine = False
        elif folder:
            mine = name in ours or all(f"{name}{rel}" in ours for rel in _files(target))
        else:
            mine = name in ours
        if not mine:
            raise FactoryError(
                f"{target} exists and was not written by peg-factory; move it away or choose another {what} "
                "(nothing was changed)"
            )
    if record:
        ensure_parent(path / OWNED_FILE)  # one line naming the folder when it cannot be made
        atomic_write_bytes(path / OWNED_FILE, _record_bytes({**ours, **{name: writer for name in names}}))


#: The mark of a work folder peg-factory made (checkpoints and logs of a resumable run).
WORK_MARK = ".peg-factory-work"


def work_directory(path: Path, what: str = "--work-dir") -> Path:
    """``path`` as a run's work folder: made and marked now, or marked already (a run to resume); an empty
    folder is adopted. A folder holding anything else is refused (one line): it is the user's."""
    path = Path(path)
    require_directory_or_absent(path, what, links=False)
    # the mark is read once, with the listing: under torchrun every rank calls this at once, and a rank that found
    # no mark before a peer made it must not take the peer's fresh mark for a file of the user's
    if path.is_dir() and any(entry.name != WORK_MARK for entry in path.iterdir()) and not (path / WORK_MARK).is_file():
        raise FactoryError(
            f"{path} holds files peg-factory did not make; choose an empty or new {what} (nothing was changed)"
        )
    path.mkdir(parents=True, exist_ok=True)
    (path / WORK_MARK).touch()
    return path


#: What a resumable run writes into its work folder (all that :func:`remove_work_directory` deletes).
WORK_ENTRIES = ("checkpoint", "metrics.jsonl", WORK_MARK)


def remove_work_directory(path: Path) -> None:
    """Delete what a run wrote into its work folder (:data:`WORK_ENTRIES`), then the folder if that left it
    empty; a folder without the mark is not peg-factory's and is left alone."""
    path = Path(path)
    if path.is_symlink() or not (path / WORK_MARK).is_file():
        return
    for name in WORK_ENTRIES:
        target = path / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target, ignore_errors=True)
        elif target.exists() or target.is_symlink():
            target.unlink()
    with contextlib.suppress(OSError):
        path.rmdir()


def _record_bytes(files: dict[str, str]) -> bytes:
    return (json.dumps({"written_by": "peg-factory", "files": dict(sorted(files.items()))}, indent=1) + "\n").encode()


@contextlib.contextmanager
def owned_directory(path: str | os.PathLike, what: str = "--out", writer: str = "peg-factory") -> Iterator[Path]:
    """Yield a temporary directory whose files are published into ``path`` (see the module docstring);
    ``writer`` names the command, whose earlier files in ``path`` it may remove."""
    path = Path(path)
    if path.is_symlink() and path.resolve().is_dir():
        path = path.resolve()  # the user's link to a folder: write into the folder it names (the link stays)
    ensure_parent(path)
    require_directory_or_absent(path, what, links=False)
    if not path.exists():
        with atomic_directory(path) as tmp:
            yield tmp
            (tmp / OWNED_FILE).write_bytes(_record_bytes({f: writer for f in _files(tmp)}))
        return
    if not os.access(path, os.W_OK):
        raise FactoryError(f"directory {path} is not writable; choose another {what}")
    sweep_leftovers(path, f"{TMP_PREFIX}*")  # a killed command's half-published folder
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{owner_tag()}-", dir=path))
    try:
        yield tmp
        _publish(tmp, path, what, writer)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _publish(tmp: Path, path: Path, what: str, writer: str) -> None:
    new = [f for f in _files(tmp) if f != OWNED_FILE]
    ours = owned_files(path)
    for rel in new:  # refuse before changing anything
        target = path / rel
        for parent in list(reversed(Path(rel).parents))[1:]:
            if (path / parent).is_symlink() or ((path / parent).exists() and not (path / parent).is_dir()):
                raise FactoryError(
                    f"{path / parent} is in the way of {rel} and was not written by peg-factory; move it "
                    f"away or choose another {what}"
                )
        if (target.exists() or target.is_symlink()) and (rel not in ours or target.is_dir() or target.is_symlink()):
            raise FactoryError(
                f"{target} exists and was not written by peg-factory; move it away or choose another {what} "
                "(nothing was changed)"
            )
    for rel in new:
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp / rel, path / rel)
    for rel in sorted(r for r, w in ours.items() if w == writer and r not in new):  # this writer's, not written now
        stale = path / rel
        if stale.is_file() and not stale.is_symlink():
            stale.unlink()
            for parent in Path(rel).parents:
                if parent == Path("."):
                    break
                with contextlib.suppress(OSError):
                    (path / parent).rmdir()  # only if empty: a user file inside keeps it
    kept = {r: w for r, w in ours.items() if r not in new and (w != writer) and (path / r).is_file()}
    atomic_write_bytes(path / OWNED_FILE, _record_bytes({**kept, **{r: writer for r in new}}))
