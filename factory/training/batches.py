"""Training and evaluation batches: a pure function of ``(seed, step)``, in memory or streamed.

Batch ``s`` of a run is the next slice of a seeded per-epoch permutation (:func:`batch_indices`);
in-memory images are augmented by random shifts drawn from a generator seeded with ``(seed, s)``
(:func:`augment`); a streamed split (:class:`factory.data.stream.ImageFiles`) decodes the same
indices with timm's training transform, seeded per image. Either way a resumed run sees the
batches an uninterrupted one would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F

from factory.data import ImageTensors
from factory.errors import FactoryError


def check_batch_fits(
    batch_size: int, images: int, *, param: str = "batch_size", split: str = "the training split"
) -> None:
    """Refuse a global batch larger than the split it is drawn from (``batch_size > images``).

    :func:`batch_indices` would serve it, cycling epochs: every image ``batch_size / images`` times in one step,
    one gradient of a repeated epoch at as many epochs' compute -- never what a caller of the API meant. The
    commands cap such a batch instead, and say so (:func:`fit_batch`)."""
    if batch_size > images:
        raise FactoryError(
            f"{batch_size} images a step is more than the {images} images of {split}: each step would repeat "
            f"every image {batch_size / images:.1f} times; use a batch of at most {images} (or more data)",
            param=param,
        )


def fit_batch(batch_size: int, images: int, *, world: int = 1, split: str = "the training split") -> tuple[int, str]:
    """``(batch, note)``: ``batch_size`` where the split holds that many images (``note`` empty), else the whole
    split rounded down to a multiple of ``world`` and a note saying so. What the commands run when a batch (their
    default 32 on a folder of 8 images, or a GPU's 65536 on 1,000) is more than the split: steps of the whole split,
    not steps that repeat each image (:func:`check_batch_fits`)."""
    if batch_size <= images:
        return batch_size, ""
    batch = max(images - images % world, world)
    return batch, (
        f"a batch of {batch_size} is more than the {images} images of {split}: steps of {batch} images "
        f"(the whole split) instead"
    )


def batch_indices(n: int, batch: int, step: int, seed: int) -> torch.Tensor:
    """Indices of global batch ``step``: consecutive slices of per-epoch seeded permutations."""
    start = step * batch
    out = []
    while len(out) < batch:
        epoch, offset = divmod(start + len(out), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.extend(perm[offset : offset + batch - len(out)].tolist())
    return torch.tensor(out)


def augment(images: torch.Tensor, shift: int, generator: torch.Generator) -> torch.Tensor:
    """Random translation by up to ``shift`` pixels (zero padding), one offset per image."""
    if shift <= 0:
        return images
    n, _, h, w = images.shape
    padded = F.pad(images, (shift, shift, shift, shift), value=float(images.min()))
    dy = torch.randint(0, 2 * shift + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * shift + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None])[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w)[None])[:, None, None, :]
    batch = torch.arange(n)[:, None, None, None]
    chans = torch.arange(images.shape[1])[None, :, None, None]
    return padded[batch, chans, rows, cols]


def step_batch(
    data: ImageTensors, batch_size: int, step: int, seed: int, shift: int, *, rank: int = 0, world: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, labels)`` of global batch ``step`` (this rank's slice of it), augmented with a
    generator seeded by ``(seed, step)``: a pure function of its arguments, hence exact resume. The whole
    global batch is augmented and then sliced, so each rank's images carry the shifts they have in one
    process's batch (slicing first gave every rank the shifts of the batch's first images)."""
    local = batch_size // world
    idx = batch_indices(len(data), batch_size, step, seed)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    mine = slice(rank * local, (rank + 1) * local)
    return augment(data.images[idx], shift, gen)[mine], data.labels[idx][mine]


class RankIndices:
    """``indices(step)``: this rank's slice of global batch ``step`` (:func:`batch_indices`); picklable."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int, world: int):
        self.n, self.batch_size, self.seed, self.rank, self.local = n, batch_size, seed, rank, batch_size // world

    def __call__(self, step: int) -> torch.Tensor:
        idx = batch_indices(self.n, self.batch_size, step, self.seed)
        return idx[self.rank * self.local : (self.rank + 1) * self.local]


def training_batches(
    data, batch_size: int, steps: range, seed: int, shift: int, *, rank: int = 0, world: int = 1, view=None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(images, labels)`` of each step in ``steps``: :func:`step_batch` for an in-memory split; for a
    streamed one (:class:`factory.data.stream.ImageFiles`) the same indices decoded with timm's training
    transform by DataLoader workers, drawn as ``view`` says (:class:`factory.data.stream.TrainView`; None: its
    defaults). ``shift`` does not apply to a streamed split: the random crop is the augmentation."""
    if isinstance(data, ImageTensors):
        return (step_batch(data, batch_size, step, seed, shift, rank=rank, world=world) for step in steps)
    from factory.data.stream import TrainView, step_loader

    return step_loader(data, steps, RankIndices(len(data), batch_size, seed, rank, world), seed, view or TrainView())


#: An evaluation batch holds at most this many bytes of float32 input: at 224 px RGB (602 KB an image) 53 images,
#: not 512 (300 MB of input and ~1 GB of a ViT's activations); at 28 px the full 512. What a batch's activations
#: take grows with its images, so this bounds evaluation's memory whatever the image size.
EVAL_BATCH_BYTES = 32 << 20


def eval_batch_size(data, batch_size: int) -> int:
    """``batch_size`` capped to :data:`EVAL_BATCH_BYTES` of float32 input at the split's image size."""
    if isinstance(data, ImageTensors):
        per_image = 4 * (data.images[0].numel() if len(data) else 1)
    else:
        per_image = 4 * data.in_chans * data.img_size * data.img_size
    return max(1, min(batch_size, EVAL_BATCH_BYTES // per_image))


def eval_batches(data, batch_size: int) -> Iterator[torch.Tensor]:
    """The split's images in order, in batches of at most ``batch_size`` and :data:`EVAL_BATCH_BYTES` (evaluation
    transform for a streamed split)."""
    batch_size = eval_batch_size(data, batch_size)
    if isinstance(data, ImageTensors):
        return (data.images[i : i + batch_size] for i in range(0, len(data), batch_size))
    from factory.data.stream import eval_loader

    return (x for x, _ in eval_loader(data, batch_size))
