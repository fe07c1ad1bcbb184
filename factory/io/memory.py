"""Give the memory a finished stage freed back to the operating system.

glibc's allocator keeps freed heap pages for reuse, so a process that ran a training stage holds that
stage's peak long after it ended, and the next stage, with tensors of other sizes, grows on top of it
(a 224-px dry run measured the expanding phase, then a fine-tuning step, and climbed from 1.9 to 2.6 GB
of RSS with nothing of the first alive). ``malloc_trim(0)`` returns the free pages (madvise), so each
stage's peak stands alone. It costs a walk over the heap (milliseconds) and is called after training runs
and steps of a second or more (:class:`factory.training.loop.StepLoop`) and after probe features, never
inside a step. Elsewhere than glibc (macOS, musl, Windows) it does nothing. No garbage collection: tensors
are freed by reference counting, and a ``gc.collect`` per short training run cost the test suite minutes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.lru_cache(maxsize=1)
def _trim():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return getattr(libc, "malloc_trim", None)
    except OSError:
        return None


def release_freed_memory() -> bool:
    """Return freed heap pages to the OS; True where the allocator could be asked."""
    trim = _trim()
    if trim is None:
        return False
    trim(0)
    return True


def available_memory_bytes() -> int | None:
    """Bytes this process could still allocate without swapping, as the OS and the container say: the least of
    ``MemAvailable`` (``/proc/meminfo``) and a cgroup v2 limit's headroom (``memory.max - memory.current``); None
    where neither can be read (not Linux), so a caller's check is skipped rather than guessed."""
    found = []
    try:
        for line in open("/proc/meminfo", encoding="ascii"):
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
                break
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = open("/sys/fs/cgroup/memory.max", encoding="ascii").read().strip()
        if limit != "max":
            used = int(open("/sys/fs/cgroup/memory.current", encoding="ascii").read().strip())
            found.append(max(0, int(limit) - used))
    except (OSError, ValueError):
        pass
    return min(found) if found else None
