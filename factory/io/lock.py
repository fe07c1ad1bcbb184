"""An exclusive, process-lifetime lock on a directory (``flock``)."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from factory.errors import FactoryError
from factory.io.atomic import ensure_parent

LOCK_FILE = ".peg-factory.lock"


def _open_lock(lock: Path):
    import stat

    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | getattr(os, "O_NONBLOCK", 0), 0o644)
    except OSError as exc:
        raise FactoryError(
            f"lock file {lock} cannot be opened as a regular file ({exc.strerror}: a link or a directory is in "
            "its place?); remove it, or use another output folder",
            param="out",
        ) from exc
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise FactoryError(
            f"lock file {lock} is not a regular file; remove it, or use another output folder", param="out"
        )
    return os.fdopen(fd, "r+")


@contextlib.contextmanager
def directory_lock(directory: str | os.PathLike, *, wait: bool = False, log=None) -> Iterator[None]:
    """Hold an exclusive lock on ``directory`` (``flock`` on ``directory/.peg-factory.lock``).

    A second holder fails at once with a one-line :class:`FactoryError` naming the holder, or, with
    ``wait``, blocks until the lock is free (saying so through ``log``). The kernel releases the
    lock when its process dies, so a killed build never leaves the directory locked. The lock file
    is opened without following links (``O_NOFOLLOW``): a lock path that is a link, a directory or
    anything but a regular file is refused with one line, never written through.
    """
    import fcntl

    path = Path(directory)
    created = not path.exists()
    ensure_parent(path / LOCK_FILE)
    fh = _open_lock(path / LOCK_FILE)
    ok = False
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            if not wait:
                raise FactoryError(
                    f"{path} is in use by another build ({holder}); wait for it to finish, "
                    "wait for the lock (--wait-lock), or use another output folder",
                    param="out",
                ) from None
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
