"""The bottom layer: version-stamped hashes, atomic writes, seals, locks and cache paths.

Imports nothing of the project but :mod:`factory.errors` and :mod:`factory._version`; every
other layer may use it (``pyproject.toml``'s import-linter contracts enforce this).
"""

from factory.io.atomic import atomic_directory, atomic_write_bytes, confined, ensure_parent, require_regular_file
from factory.io.hashing import canonical_safetensors, content_key, sha256_bytes, sha256_file, state_dict_sha256
from factory.io.lock import LOCK_FILE, directory_lock
from factory.io.memory import available_memory_bytes, release_freed_memory
from factory.io.paths import MODEL_FILE, cache_dir, model_file
from factory.io.publish import (
    OWNED_FILE,
    WORK_MARK,
    claim,
    owned_directory,
    owned_files,
    remove_work_directory,
    work_directory,
)
from factory.io.seal import SEAL_FILE, seal, seal_state, sealed_files, sealed_info

__all__ = [
    "LOCK_FILE",
    "MODEL_FILE",
    "OWNED_FILE",
    "WORK_MARK",
    "SEAL_FILE",
    "atomic_directory",
    "atomic_write_bytes",
    "cache_dir",
    "canonical_safetensors",
    "claim",
    "confined",
    "content_key",
    "directory_lock",
    "ensure_parent",
    "model_file",
    "owned_directory",
    "owned_files",
    "available_memory_bytes",
    "release_freed_memory",
    "remove_work_directory",
    "require_regular_file",
    "seal",
    "seal_state",
    "sealed_files",
    "sealed_info",
    "sha256_bytes",
    "sha256_file",
    "state_dict_sha256",
    "work_directory",
]
