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
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{owner_tag()}.", suffix=".tmp", dir=path.parent)
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


def owner_tag() -> str:
    """What a temporary name carries so a later run can tell a killed writer's leftovers from a live one's: this
    host and process (``pf-HOST-PID``; a shared ``--out`` on Ray sees other hosts' and leaves them alone)."""
    import socket

    host = "".join(c for c in socket.gethostname() if c.isalnum())[:32] or "host"
    return f"pf-{host}-{os.getpid()}"


def sweep_leftovers(directory: Path, pattern: str = "*") -> None:
    """Remove the temporaries (``*.pf-HOST-PID.*.tmp|.old``, and ``.peg-factory-tmp-pf-HOST-PID-*``) in ``directory``
    whose writer, a process of this host, is gone (killed mid-write, e.g. by SIGKILL); names matching ``pattern``."""
    import re

    tag = owner_tag().rsplit("-", 1)[0]  # pf-HOST
    found = re.compile(rf"{re.escape(tag)}-(\d+)[.-]")
    with contextlib.suppress(OSError):
        for entry in directory.glob(pattern):
            match = found.search(entry.name)
            if match is None or not (
                entry.name.endswith((".tmp", ".old")) or entry.name.startswith(".peg-factory-tmp-")
            ):
                continue
            pid = int(match.group(1))
            if pid == os.getpid() or _alive(pid):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    entry.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``path`` as a whole.

    An existing ``path`` is only removed after the new directory is complete. On failure the
    temporary directory is deleted and ``path`` is left as it was.
    """
    path = Path(path)
    ensure_parent(path)
    require_directory_or_absent(path, param="out")
    sweep_leftovers(path.parent, f".{path.name}.*")  # a killed writer's temporaries of this path
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{owner_tag()}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.{owner_tag()}.", suffix=".old", dir=path.parent))
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


def require_directory_or_absent(path: Path, what: str = "", *, links: bool = True, param: str | None = None) -> None:
    """Refuse, in one line, a ``path`` to write a folder at that exists as anything else (a file, a FIFO), or as a
    symlink where ``links`` is false (a work folder, the user's link to elsewhere)."""
    if (path.is_symlink() and not links) or (path.exists() and not path.is_dir()):
        raise FactoryError(f"{path} exists and is not a directory; choose another {what}".rstrip(), param=param)


def require_regular_file(path: Path, what: str) -> Path:
    """``path`` when it is a regular file (links followed); one line otherwise -- a FIFO, socket or device would
    make the reader wait forever or read without end."""
    import stat

    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise FactoryError(f"{what} {path}: cannot read it ({exc.strerror}); check the path") from exc
    if not stat.S_ISREG(mode):
        if stat.S_ISDIR(mode):
            raise FactoryError(f"{what} {path} is a directory, not a regular file; pass a file")
        kind = "a FIFO" if stat.S_ISFIFO(mode) else "not a regular file"
        raise FactoryError(f"{what} {path} is {kind}, not a regular file; remove it or pass a file")
    return path
