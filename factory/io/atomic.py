"""Writing artifacts safely: every artifact goes to a temporary path in the destination's
directory and is renamed into place, so a crash leaves either the old artifact or the new one,
never half of one."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from factory.errors import FactoryError


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
        raise FactoryError(f"cannot create directory {parent}: {exc.strerror}; choose another", param="out") from exc
    if not os.access(parent, os.W_OK):
        raise FactoryError(f"directory {parent} is not writable; choose another", param="out")


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
        raise FactoryError(f"{path} exists and is not a directory; choose another", param="out")
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


def require_regular_file(path: Path, what: str) -> Path:
    """``path`` when it is a regular file (links followed); one line otherwise -- a FIFO, socket or device would
    make the reader wait forever or read without end."""
    import stat

    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise FactoryError(f"{what} {path}: cannot read it ({exc.strerror}); check the path") from exc
    if not stat.S_ISREG(mode):
        kind = "a FIFO" if stat.S_ISFIFO(mode) else "a directory" if stat.S_ISDIR(mode) else "not a regular file"
        raise FactoryError(f"{what} {path} is {kind}, not a regular file; remove it or pass a file")
    return path
