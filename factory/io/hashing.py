"""Content hashes: files, bytes, state dicts, canonical safetensors, cache keys (stdlib only; torch lazily)."""

from __future__ import annotations

import hashlib
import json
import os
from typing import TYPE_CHECKING, Any

from factory._version import __version__

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
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + data[8 + n :]


def content_key(*parts: Any, length: int = 20) -> str:
    """sha256 (first ``length`` hex digits) of the package version and ``parts`` as sorted-key JSON
    (objects JSON cannot hold, e.g. paths, by their ``str``): the key of a cache entry."""
    text = json.dumps([__version__, *parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:length]
