"""In-memory labelled image sets and their train/val/test bundle."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class ImageTensors:
    """An in-memory labelled image set (already resized and normalised)."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.images.shape[0] != self.labels.shape[0]:
            raise ValueError("images and labels differ in length")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_chans(self) -> int:
        return int(self.images.shape[1])

    @property
    def eval_config(self) -> dict[str, object]:
        """How a client prepares an image like these (timm ``pretrained_cfg`` fields): they are stored at the
        model's input size, so an image of that size passes unchanged (no crop; the resize a no-op)."""
        return {"interpolation": "bilinear", "crop_pct": 1.0}

    def tensors(self, limit: int | None = None) -> ImageTensors:
        """The first ``limit`` images (all by default): the same interface as a streamed split's."""
        return self if limit is None or limit >= len(self) else self.subset(0, limit)

    def subset(self, start: int, stop: int | None = None) -> ImageTensors:
        return ImageTensors(self.images[start:stop], self.labels[start:stop], self.classes)

    def pick(self, indices: list[int]) -> ImageTensors:
        """The images at ``indices``, in that order."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return ImageTensors(self.images[idx], self.labels[idx], self.classes)


@dataclass
class Dataset:
    """Train/val/test splits plus what identifies the data (for manifests and caches).

    A split is in memory (:class:`ImageTensors`: the built-in sets) or streamed from files
    (:class:`factory.data.stream.ImageFiles`: ImageFolder trees); both have ``labels``, ``classes``,
    ``in_chans``, ``subset`` and ``tensors(limit)``, and the trainer reads either.
    """

    name: str
    train: Any  # ImageTensors | ImageFiles
    val: Any
    test: Any
    mean: tuple[float, ...]
    std: tuple[float, ...]
    identity: str
    #: where "test" accuracy comes from: ``"test"``, or why it is another split (said in logs, manifest, card)
    test_from: str = "test"
    #: what loading did to the images that their owner should know (said in logs and the manifest)
    notes: tuple[str, ...] = ()

    @property
    def num_classes(self) -> int:
        return self.train.num_classes

    @property
    def in_chans(self) -> int:
        return int(self.train.in_chans)


#: A streamed split is decoded into memory for checks (export accuracy, INT8 calibration) up to this many bytes
#: (fp32): 334 images at 224 px, every image of a 28-px set; a spread sample beyond that (:func:`in_memory`). So
#: a build's memory does not grow with the test split (issue 32: flat within 100 MB from 300 to 3,000 images).
CHECK_BYTES = 192 << 20


def spread(split, n: int | None):
    """``n`` images of ``split`` (all if it has fewer, or ``n`` is None) at evenly spaced indices
    ``floor(i * len / n)``, still a split (streamed or in memory): every part of a split sorted by class is
    represented, where its first ``n`` would hold only the first classes."""
    total = len(split)
    if n is None or n >= total:
        return split
    return split.pick([i * total // n for i in range(n)])


def spread_sample(split, n: int) -> ImageTensors:
    """:func:`spread` decoded for evaluation (in memory)."""
    part = spread(split, n)
    return part if isinstance(part, ImageTensors) else part.tensors()


def in_memory(ds: Dataset, cap_bytes: int = CHECK_BYTES, *, train_images: int | None = None) -> Dataset:
    """``ds`` with every split in memory: in-memory splits as they are, a streamed split's
    ``cap_bytes // (4 * C * H * W)`` images decoded for evaluation (all of a small one), and of the
    training split at most ``train_images`` (what INT8 calibration reads). A split cut to fewer images is
    a :func:`spread_sample` (evenly spaced indices over the split, which folders list by class), never its
    first N files: a check or a calibration on it sees every class."""

    def bounded(split, limit=None):
        if isinstance(split, ImageTensors):
            return split
        per_image = 4 * split.in_chans * split.img_size * split.img_size
        most = max(1, cap_bytes // per_image)
        return spread_sample(split, most if limit is None else min(most, limit))

    return dataclasses.replace(ds, train=bounded(ds.train, train_images), val=bounded(ds.val), test=bounded(ds.test))
