"""Writing artifacts safely and identifying them by content.

Every artifact goes to a temporary path in the destination's directory and is renamed into place,
so a crash leaves either the old artifact or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from factory.errors import FactoryError

if TYPE_CHECKING:
    import torch


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def state_dict_sha256(state: dict[str, torch.Tensor]) -> str:
    """Content hash of a state dict: keys, dtypes, shapes and values, in sorted key order."""
    import torch

    digest = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def canonical_safetensors(data: bytes) -> bytes:
    """``data`` (a safetensors file) with its JSON header re-serialised with sorted keys.

    The safetensors writer emits ``__metadata__`` from a hash map, so the same tensors and metadata
    give different bytes (and file hashes) from one process to the next. Tensor data and offsets
    are untouched (offsets are relative to the end of the header); the header is padded with
    spaces to a multiple of 8 bytes, as the writer does.
    """
    import json

    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + n :]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def ensure_parent(path: Path) -> None:
    """Create ``path``'s directory or fail with a one-line, actionable :class:`FactoryError`."""
    parent = path.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FactoryError(f"cannot create directory {parent}: {exc.strerror}; choose another --out") from exc
    if not os.access(parent, os.W_OK):
        raise FactoryError(f"directory {parent} is not writable; choose another --out")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory."""
    path = Path(path)
    ensure_parent(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; artifacts are ordinary files
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise FactoryError(f"cannot write {path}: {exc.strerror}") from exc
        raise


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``path`` as a whole.

    An existing ``path`` is only removed after the new directory is complete. On failure the
    temporary directory is deleted and ``path`` is left as it was.
    """
    path = Path(path)
    ensure_parent(path)
    if path.exists() and not path.is_dir():
        raise FactoryError(f"{path} exists and is not a directory; choose another --out")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / "x")
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def confined(base: str | os.PathLike, relative: str | os.PathLike, what: str = "path") -> Path:
    """``base / relative``, refusing (one-line :class:`FactoryError`) anything that resolves outside
    ``base`` -- absolute paths, ``..`` components, symlinks pointing out."""
    root = Path(base).resolve()
    target = (root / relative).resolve()
    if root not in target.parents:  # also refuses base itself ('.', '')
        raise FactoryError(f"{what} {str(relative)!r} points outside {base}; refusing to read or write it there")
    return target


SEAL_FILE = "done.json"


def _sealed_files(directory: Path) -> list[Path]:
    """The files a seal covers: every file under ``directory`` but the seal itself, sorted."""
    return [p for p in sorted(directory.rglob("*")) if p.is_file() and p.name != SEAL_FILE]


def seal(directory: str | os.PathLike, info: dict) -> None:
    """Mark ``directory`` complete: ``done.json`` = ``info`` + the sha256 of every other file in it.

    Called last, inside :func:`atomic_directory`; :func:`seal_state` checks it, so an entry
    damaged later (truncated, edited, a file lost) is noticed and rebuilt, never trusted.
    """
    import json

    directory = Path(directory)
    files = {p.relative_to(directory).as_posix(): sha256_file(p) for p in _sealed_files(directory)}
    (directory / SEAL_FILE).write_text(json.dumps({**info, "files": files}, sort_keys=True))


def seal_state(directory: str | os.PathLike) -> str:
    """``"done"`` (sealed and every file matches), ``"missing"`` (no seal) or ``"damaged"``."""
    import json

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
    present = {p.relative_to(directory).as_posix() for p in _sealed_files(directory)}
    if present != set(files):
        return "damaged"
    try:
        return "done" if all(sha256_file(directory / name) == digest for name, digest in files.items()) else "damaged"
    except OSError:
        return "damaged"


LOCK_FILE = ".peg-factory.lock"


@contextlib.contextmanager
def directory_lock(directory: str | os.PathLike, *, wait: bool = False, log=None) -> Iterator[None]:
    """Hold an exclusive lock on ``directory`` (``flock`` on ``directory/.peg-factory.lock``).

    A second holder fails at once with a one-line :class:`FactoryError` naming the holder, or, with
    ``wait``, blocks until the lock is free (saying so through ``log``). The kernel releases the
    lock when its process dies, so a killed build never leaves the directory locked.
    """
    import fcntl

    path = Path(directory)
    created = not path.exists()
    ensure_parent(path / LOCK_FILE)
    fh = open(path / LOCK_FILE, "a+")
    ok = False
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            if not wait:
                raise FactoryError(f"{path} is in use by another build ({holder}); wait for it to finish, "
                                   "pass --wait-lock to wait, or use another --out") from None
            if log is not None:
                log(f"waiting for the build holding {path} ({holder}) to finish")
            fcntl.flock(fh, fcntl.LOCK_EX)
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}\n")
        fh.flush()
        yield
        ok = True
    finally:
        fh.close()
        if created and not ok and [p.name for p in path.iterdir()] == [LOCK_FILE]:
            shutil.rmtree(path, ignore_errors=True)  # a build that failed before writing anything leaves nothing
