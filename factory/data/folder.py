"""The user's own data: a torchvision ``ImageFolder`` tree with ``train/``, ``val/`` and optional ``test/``."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from factory.data.tensors import Dataset, ImageTensors
from factory.errors import FactoryError

# Images larger than this (e.g. a "decompression bomb": a tiny file declaring a gigapixel canvas) are refused.
MAX_IMAGE_PIXELS = 8192 * 8192

def scan_tree(root: Path) -> list[Path]:
    """Every file under ``root``, following directory symlinks (as ImageFolder does), sorted.

    A symlink that leads back to a directory already on the walk (a loop) is refused with a
    one-line :class:`FactoryError` instead of walking it until the path length limit.
    """
    files: list[Path] = []
    seen: set[tuple[int, int]] = set()

    def visit(directory: Path) -> None:
        try:
            st = directory.stat()
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError as exc:
            raise FactoryError(f"data directory {root}: cannot read {directory} ({exc.strerror}); fix its permissions") from exc
        key = (st.st_dev, st.st_ino)
        if key in seen:
            raise FactoryError(f"data directory {root}: {directory} leads back to a folder already scanned (a symlink loop); "
                               "remove the link")
        seen.add(key)
        for entry in entries:
            path = Path(entry.path)
            try:
                if entry.is_dir():
                    visit(path)
                elif entry.is_file():
                    files.append(path)
            except OSError:  # dangling link or a race with a writer: not a file we can read
                continue
        seen.discard(key)  # only ancestors make a loop; the same folder linked twice side by side is fine

    visit(Path(root))
    return files


def folder_identity(root: Path, img_size: int, in_chans: int) -> str:
    """The file listing (names, sizes, mtimes) of an ImageFolder tree, hashed, with the input size."""
    listing = []
    for p in scan_tree(root):
        st = p.stat()
        listing.append(f"{p.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}")
    digest = hashlib.sha256("\n".join(listing).encode()).hexdigest()[:16]
    return f"folder:{root.resolve()}:{digest}:{img_size}:{in_chans}"


def load_image_folder(root: Path, img_size: int, in_chans: int = 3) -> Dataset:
    """An ImageFolder tree (``train/``, ``val/``, optional ``test/``) resized and normalised."""
    from PIL import Image, UnidentifiedImageError
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import functional as TF

    if not (root / "train").is_dir() or not (root / "val").is_dir():
        raise FactoryError(f"data directory {root} needs train/ and val/ subdirectories in ImageFolder layout")
    # one walk of the tree, which also refuses symlink loops before torchvision walks it
    identity = folder_identity(root, img_size, in_chans)
    mean = (0.485, 0.456, 0.406) if in_chans == 3 else (0.5,)
    std = (0.229, 0.224, 0.225) if in_chans == 3 else (0.5,)

    def read(split: str) -> ImageTensors:
        try:
            folder = ImageFolder(str(root / split))
        except (FileNotFoundError, OSError) as exc:
            raise FactoryError(f"cannot read {root / split}: {exc}") from exc
        if len(folder.classes) < 2:
            raise FactoryError(f"{root / split} has {len(folder.classes)} class folder(s); a classifier needs at least 2 "
                               "(one subfolder of images per class)")
        xs, ys = [], []
        for path, label in folder.samples:
            try:
                with Image.open(path) as im:
                    if im.width * im.height > MAX_IMAGE_PIXELS:  # checked on the header, before decoding
                        raise FactoryError(f"image {path} is {im.width}x{im.height} pixels, over the {MAX_IMAGE_PIXELS:,} "
                                           "this loader decodes; downscale it or remove it")
                    im = im.convert("RGB" if in_chans == 3 else "L").resize((img_size, img_size), Image.BILINEAR)
                    xs.append(TF.normalize(TF.to_tensor(im), mean, std))
            except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as exc:
                raise FactoryError(f"cannot read image {path}: {exc}") from exc
            ys.append(label)
        present = sorted(set(ys))
        if len(present) < 2:
            raise FactoryError(f"{root / split} holds images of {len(present)} class(es); a classifier needs at least 2 "
                               "(put images in at least two class folders)")
        return ImageTensors(torch.stack(xs), torch.tensor(ys), list(folder.classes))

    train, val = read("train"), read("val")
    test = read("test") if (root / "test").is_dir() else val
    if train.classes != val.classes:
        raise FactoryError(f"{root}/train and {root}/val have different class folders")
    test_from = "test" if (root / "test").is_dir() else f"val (no test/ folder in {root}: add one for an unbiased test accuracy)"
    return Dataset(root.name, train, val, test, mean, std, identity=identity, test_from=test_from)
