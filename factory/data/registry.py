"""Data sets by name: one registry maps a spec to its loader and to its identity.

A spec is a built-in name (:data:`DATASETS`) or a directory in ``ImageFolder`` layout. The
identity (:func:`dataset_identity`) says what the loaded content is without loading it, cheaply
(a file hash, a listing, the generator's parameters), so a cache can be keyed on it before torch
has anything to do.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from factory.data import builtin, folder
from factory.data.tensors import Dataset
from factory.errors import FactoryError


@dataclass(frozen=True)
class DatasetEntry:
    """A built-in data set: ``load(img_size, in_chans)`` and ``identity(img_size, in_chans)``."""

    load: Callable[[int, int], Dataset]
    identity: Callable[[int, int], str]


DATASETS: dict[str, DatasetEntry] = {
    "mnist": DatasetEntry(builtin.load_mnist, builtin.mnist_identity),
    "digits": DatasetEntry(builtin.load_digits, builtin.digits_identity),
    "textures": DatasetEntry(builtin.load_textures, builtin.textures_identity),
    "synthetic": DatasetEntry(
        lambda size, chans: builtin.make_synthetic(size, in_chans=chans),
        lambda size, chans: builtin.synthetic_identity(size, in_chans=chans),
    ),
}
BUILTIN_DATASETS = tuple(DATASETS)


def _builtin(spec: str) -> DatasetEntry | None:
    """The built-in set ``spec`` names, or None for a folder. A bare name that is both a built-in set and a
    folder in the working directory is ambiguous: one line asking for ``./NAME`` (the folder) or
    ``builtin:NAME`` (the set)."""
    if spec.startswith("builtin:"):
        name = spec.removeprefix("builtin:")
        if name not in DATASETS:
            raise FactoryError(f"unknown built-in dataset {name!r}: use one of {', '.join(BUILTIN_DATASETS)}")
        return DATASETS[name]
    if spec not in DATASETS:
        return None
    if Path(spec).is_dir():
        raise FactoryError(
            f"data {spec!r} is both a built-in set and a folder here; pass ./{spec} for the folder or builtin:{spec} "
            "for the built-in set"
        )
    return DATASETS[spec]


def _folder(spec: str) -> Path:
    root = Path(spec).expanduser()
    if not root.is_dir():
        raise FactoryError(
            f"unknown dataset {spec!r}: use one of {', '.join(BUILTIN_DATASETS)} or an ImageFolder directory"
        )
    return root


def load_dataset(spec: str, img_size: int = 28, in_chans: int = 1, *, min_side: int = 1) -> Dataset:
    """A built-in data set by name (in memory) or an ImageFolder directory (streamed), at ``img_size`` with
    ``in_chans`` channels; a folder's images smaller than ``min_side`` (the model's patch) are refused."""
    entry = _builtin(spec)
    if entry is not None:
        return entry.load(img_size, in_chans)
    return folder.load_image_folder(_folder(spec), img_size, in_chans, min_side=min_side)


def dataset_identity(spec: str, img_size: int = 28, in_chans: int = 1) -> str:
    """What identifies ``load_dataset(spec, img_size, in_chans)``'s content, without loading it."""
    entry = _builtin(spec)
    if entry is not None:
        return entry.identity(img_size, in_chans)
    return folder.folder_identity(_folder(spec), img_size, in_chans)
