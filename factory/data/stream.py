"""Image files read as they are needed: a split of an ImageFolder tree, decoded batch by batch.

An :class:`ImageFiles` split holds the file list and labels only, so a build's memory does not
grow with the data set: each batch is decoded, transformed and stacked when it is needed, in
``DataLoader`` worker processes (:func:`step_loader`, :func:`eval_loader`).

Transforms are timm's (:func:`timm.data.create_transform`): for training ``RandomResizedCrop`` to
``img_size`` (area scale ``crop_scale``-1, ratio 3/4-4/3, bicubic) and a horizontal flip with probability
``hflip``, no colour jitter (:class:`TrainView`: timm's ImageNet defaults 0.08 and 0.5 unless the caller
says otherwise -- a fine-tune does, :class:`factory.training.train.TrainConfig`); for evaluation the
shorter side resized to ``img_size / crop_pct`` (bicubic, ``crop_pct`` 0.875: DeiT's) and a centre crop --
the aspect ratio is kept. Both normalise with the split's ``mean`` and ``std``.

Determinism. The training view of image ``i`` at step ``s`` is drawn from RNGs seeded with
``(seed, s, i)`` (python's ``random`` for timm's crop, torch's for torchvision's flip), inside a
forked torch RNG, so a batch is a pure function of ``(seed, step)`` whichever process decodes it,
and a resumed fine-tune sees the batches it would have seen.

Optional decoded cache (:meth:`ImageFiles.cached`): every image resized (shorter side) and centre
cropped to ``img_size / crop_pct`` and held as uint8, built only when ``N * C * R * R`` bytes fit the
stated cap; training crops are then drawn from that square instead of the full photo.
"""

from __future__ import annotations

import os
import random
import signal
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch

from factory.data.tensors import ImageTensors
from factory.errors import FactoryError

#: Images larger than this (e.g. a "decompression bomb": a tiny file declaring a gigapixel canvas) are refused.
MAX_IMAGE_PIXELS = 8192 * 8192
#: DeiT's evaluation crop: the shorter side resized to img_size / CROP_PCT, then a centre crop.
CROP_PCT = 0.875


@dataclass(frozen=True)
class TrainView:
    """How a training view of a streamed image is drawn: ``RandomResizedCrop`` of at least ``crop_scale`` of
    the image's area, then a horizontal flip with probability ``hflip``. The defaults are timm's ImageNet
    recipe (0.08, 0.5), made for hundreds of epochs on photos where left and right mean the same; the expanding
    phase distils with them (the teacher sees the student's view, so a flip cannot mislabel), a fine-tune sets its
    own (:class:`factory.training.train.TrainConfig`: 0.5 and no flip)."""

    hflip: float = 0.5
    crop_scale: float = 0.08

    def __post_init__(self) -> None:
        if not (0.0 <= self.hflip <= 1.0 and 0.0 < self.crop_scale <= 1.0):
            raise FactoryError(
                f"training view needs hflip in [0, 1] and crop_scale in (0, 1], got hflip={self.hflip}, "
                f"crop_scale={self.crop_scale}"
            )


def check_size(path, width: int, height: int, min_side: int) -> None:
    """Refuse (one line) an image over :data:`MAX_IMAGE_PIXELS` or with a side under ``min_side`` (a patch)."""
    if width * height > MAX_IMAGE_PIXELS:
        raise FactoryError(
            f"image {path} is {width}x{height} pixels, over the {MAX_IMAGE_PIXELS:,} this loader decodes; "
            "downscale it or remove it"
        )
    if min(width, height) < min_side:
        raise FactoryError(
            f"image {path} is {width}x{height} pixels, smaller than one {min_side}-px patch of the model; "
            "remove it or use larger images"
        )


#: PIL modes of greyscale images wider than 8 bits: 16-bit PNGs and TIFFs open as ``I;16*`` or ``I``, float TIFFs as ``F``
WIDE_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I", "F"})


def eight_bit(im):
    """A greyscale image wider than 8 bits (:data:`WIDE_MODES`) as an 8-bit ``L`` image over its format's whole
    range, any other image as it is. PIL's own ``convert("L")`` clips such an image at 255 -- a 16-bit image turns
    white where it is brighter than 255 of 65,535, and two classes that differ in brightness become one. The map is
    fixed per format, not per image, so brightness still means the same across images: integer modes are taken as
    16-bit (``v / 257``, what torchvision's 16-bit PNG decode then ``ToDtype(uint8, scale=True)`` gives), ``F`` as
    [0, 1] (``v * 255``); values beyond are clipped."""
    if im.mode not in WIDE_MODES:
        return im
    import numpy as np
    from PIL import Image

    values = np.asarray(im, dtype=np.float64)
    scaled = values * 255.0 if im.mode == "F" else values / 257.0
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L")


def default_workers() -> int:
    """Decoding processes per loader: half the CPUs this process may use, 1 to 4 (training uses the rest)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(4, cpus // 2))


@dataclass
class ImageFiles:
    """A labelled split of image files, decoded on demand (see module docstring)."""

    samples: list[tuple[str, int]]
    classes: list[str]
    img_size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    min_side: int = 1  # images smaller than this (the patch size) are refused when read
    workers: int = field(default_factory=default_workers)
    cache: torch.Tensor | None = None  # (N, C, R, R) uint8, see :meth:`cached`

    def __post_init__(self) -> None:
        self.labels = torch.tensor([label for _, label in self.samples], dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_chans(self) -> int:
        return self.channels

    def subset(self, start: int, stop: int | None = None) -> ImageFiles:
        cache = self.cache[start:stop] if self.cache is not None else None
        return replace(self, samples=self.samples[start:stop], cache=cache)

    def pick(self, indices: list[int]) -> ImageFiles:
        """The files at ``indices``, in that order."""
        cache = self.cache[torch.as_tensor(indices, dtype=torch.long)] if self.cache is not None else None
        return replace(self, samples=[self.samples[i] for i in indices], cache=cache)

    # -- decoding -----------------------------------------------------------------------------------------

    def open(self, i: int):
        """Image ``i`` as a PIL image in the split's mode (``RGB`` or ``L``), checked (one-line errors)."""
        from PIL import Image, UnidentifiedImageError

        if self.cache is not None:
            array = self.cache[i].permute(1, 2, 0).numpy()
            return Image.fromarray(array[:, :, 0] if self.channels == 1 else array)
        path = self.samples[i][0]
        try:
            with Image.open(path) as im:
                check_size(
                    path, im.width, im.height, self.min_side
                )  # on the header, before decoding (a file may have changed)
                return eight_bit(im).convert("RGB" if self.channels == 3 else "L")
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as exc:
            raise FactoryError(f"cannot read image {path}: {exc}") from exc

    @property
    def eval_config(self) -> dict[str, object]:
        """How a client reproduces the evaluation view (timm ``pretrained_cfg`` fields): bicubic, DeiT's crop."""
        return {"interpolation": "bicubic", "crop_pct": CROP_PCT}

    def transform(self, training: bool, view: TrainView = TrainView()):
        """timm's evaluation transform, or (``training``) its training transform drawn as ``view`` says."""
        from timm.data import create_transform

        extra = {"hflip": view.hflip, "scale": (view.crop_scale, 1.0)} if training else {}
        return create_transform(
            (self.channels, self.img_size, self.img_size),
            is_training=training,
            mean=self.mean,
            std=self.std,
            interpolation="bicubic",
            crop_pct=CROP_PCT,
            color_jitter=None,
            **extra,
        )

    def eval_item(self, i: int, transform=None) -> torch.Tensor:
        return (transform or self.transform(False))(self.open(i))

    def train_item(self, i: int, seed: int, transform=None) -> torch.Tensor:
        """The training view of image ``i`` under ``seed`` (a pure function of both)."""
        state = random.getstate()
        try:
            with torch.random.fork_rng(devices=[]):
                random.seed(seed)
                torch.manual_seed(seed)
                return (transform or self.transform(True))(self.open(i))
        finally:
            random.setstate(state)

    def tensors(self, limit: int | None = None) -> ImageTensors:
        """The first ``limit`` images (all by default) decoded for evaluation, in memory."""
        part = self.subset(0, limit)
        xs = [x for x, _ in eval_loader(part, 64)]
        images = torch.cat(xs) if xs else torch.zeros(0, self.channels, self.img_size, self.img_size)
        return ImageTensors(images, part.labels, self.classes)

    def cached(self, cap_bytes: int, log=None) -> ImageFiles:
        """This split with the decoded uint8 cache (module docstring) if it fits ``cap_bytes``, else unchanged."""
        side = int(round(self.img_size / CROP_PCT))
        need = len(self) * self.channels * side * side
        if self.cache is not None or need > cap_bytes or not len(self):
            if log and self.cache is None and len(self):
                log(f"data: decoded cache not used ({need / 2**20:.0f} MiB needed, cap {cap_bytes / 2**20:.0f} MiB)")
            return self
        from torchvision.transforms import CenterCrop, Compose, InterpolationMode, PILToTensor, Resize

        square = Compose([Resize(side, interpolation=InterpolationMode.BICUBIC), CenterCrop(side), PILToTensor()])
        cache = torch.empty(len(self), self.channels, side, side, dtype=torch.uint8)
        for i in range(len(self)):
            cache[i] = square(self.open(i))
        if log:
            log(f"data: {len(self)} images decoded once into a {need / 2**20:.0f} MiB uint8 cache ({side} px)")
        return replace(self, cache=cache)


class _StepBatches(torch.utils.data.Dataset):
    """Item ``s`` = this rank's slice of global training batch ``s`` (decoded in a worker)."""

    def __init__(self, files: ImageFiles, indices, seed: int, view: TrainView):
        self.files, self.indices, self.seed, self.view = files, indices, seed, view
        self._transform = None

    def __len__(self) -> int:
        return 1 << 62

    def __getitem__(self, step: int):
        if self._transform is None:
            self._transform = self.files.transform(True, self.view)
        idx = self.indices(step)
        base = self.seed * 1_000_003 + step
        xs = [self.files.train_item(int(i), base * 100_003 + int(i), self._transform) for i in idx]
        return torch.stack(xs), self.files.labels[idx]


class _EvalImages(torch.utils.data.Dataset):
    def __init__(self, files: ImageFiles):
        self.files, self._transform = files, None

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        if self._transform is None:
            self._transform = self.files.transform(False)
        return self.files.eval_item(i, self._transform), self.files.labels[i]


def _loader(dataset, files: ImageFiles, **kwargs) -> torch.utils.data.DataLoader:
    workers = files.workers if len(files) > 0 else 0
    return torch.utils.data.DataLoader(
        dataset, num_workers=workers, prefetch_factor=2 if workers else None, persistent_workers=False, **kwargs
    )


def _one_line(batches) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``batches``, with a :class:`FactoryError` raised in a worker process re-raised as its own one line
    (the DataLoader wraps it in the worker's traceback).

    The first multi-worker DataLoader in the main thread installs torch's process-wide SIGCHLD handler and
    leaves it there; with it, a later unrelated child's exit (a subprocess the build or the user's program
    runs) was seen to crash the process (SIGSEGV, under pytest after OpenVINO had run). The previous
    handler is restored when the batches end; a worker that dies is still detected by the DataLoader's
    own liveness checks."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGCHLD) if main else None
    try:
        yield from batches
    except FactoryError as exc:
        lines = [line for line in str(exc).splitlines() if line.strip()]
        last = lines[-1] if lines else str(exc)
        raise FactoryError(last.split("FactoryError: ", 1)[-1]) from None
    finally:
        if main and signal.getsignal(signal.SIGCHLD) is not previous:
            signal.signal(signal.SIGCHLD, previous if previous is not None else signal.SIG_DFL)


def step_loader(
    files: ImageFiles, steps: Sequence[int], indices, seed: int, view: TrainView = TrainView()
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(images, labels)`` of each step in ``steps``; ``indices(step)`` gives the step's image indices; the
    training views drawn as ``view`` says."""
    return _one_line(_loader(_StepBatches(files, indices, seed, view), files, batch_size=None, sampler=list(steps)))


def eval_loader(files: ImageFiles, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(images, labels)`` batches of the split in order, evaluation transform."""
    return _one_line(_loader(_EvalImages(files), files, batch_size=batch_size, shuffle=False))
