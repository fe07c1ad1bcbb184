"""In-memory labelled image sets and their train/val/test bundle."""

from __future__ import annotations

from dataclasses import dataclass, field

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

    def subset(self, start: int, stop: int | None = None) -> "ImageTensors":
        return ImageTensors(self.images[start:stop], self.labels[start:stop], self.classes)


@dataclass
class Dataset:
    """Train/val/test splits plus what identifies the data (for manifests and caches)."""

    name: str
    train: ImageTensors
    val: ImageTensors
    test: ImageTensors
    mean: tuple[float, ...]
    std: tuple[float, ...]
    identity: str
    #: where "test" accuracy comes from: ``"test"``, or why it is another split (said in logs, manifest, card)
    test_from: str = "test"

    @property
    def num_classes(self) -> int:
        return self.train.num_classes

    @property
    def in_chans(self) -> int:
        return int(self.train.images.shape[1])
