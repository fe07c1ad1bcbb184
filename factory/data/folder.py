"""The user's own data: a torchvision ``ImageFolder`` tree with ``train/``, ``val/`` and optional ``test/``."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from factory.data.stream import check_size  # one size check, here on headers and where images are decoded
from factory.data.tensors import Dataset
from factory.errors import FactoryError
from factory.io import require_regular_file


def hidden(name: str) -> bool:
    """A dot-file or dot-folder (``.ipynb_checkpoints/``, ``.DS_Store``, macOS's ``._x.png`` AppleDouble files): not
    the user's data, so neither a class nor an image. torchvision's ImageFolder takes a hidden folder for a class
    (a ``.ipynb_checkpoints`` class) and ``._x.png`` for an image; these loaders skip both."""
    return name.startswith(".")


def scan_tree(root: Path) -> list[Path]:
    """Every file under ``root`` but :func:`hidden` ones, following directory symlinks (as ImageFolder does), sorted.

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
            raise FactoryError(
                f"data directory {root}: cannot read {directory} ({exc.strerror}); fix its permissions"
            ) from exc
        key = (st.st_dev, st.st_ino)
        if key in seen:
            raise FactoryError(
                f"data directory {root}: {directory} leads back to a folder already scanned (a symlink loop); "
                "remove the link"
            )
        seen.add(key)
        for entry in entries:
            if hidden(entry.name):
                continue
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


#: Modes PIL reads as single-channel: a folder of only these is greyscale.
GREY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"})


def check_header(path: Path, min_side: int) -> str:
    """Read ``path``'s header only (no decode): refuse what cannot be an image for the model (one line);
    return the image's PIL mode."""
    from PIL import Image, UnidentifiedImageError

    require_regular_file(path, "image")  # a FIFO named like an image would make PIL wait forever
    try:
        with Image.open(path) as im:
            width, height, mode = im.width, im.height, im.mode
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as exc:
        raise FactoryError(f"cannot read image {path}: {exc}") from exc
    check_size(path, width, height, min_side)
    return mode


def image_file(path: str) -> bool:
    """ImageFolder's test of a file (an image extension), :func:`hidden` files excluded."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

    return not hidden(Path(path).name) and has_file_allowed_extension(path, IMG_EXTENSIONS)


def class_folders(directory: Path) -> list[str]:
    """The class names of an ImageFolder split: its subfolders that are not :func:`hidden`, sorted (torchvision's
    ``find_classes`` takes a hidden folder for a class); fewer than two refused in one line."""
    classes = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not hidden(e.name))
    if len(classes) < 2:
        raise FactoryError(
            f"{directory} has {len(classes)} class folder(s); a classifier needs at least 2 "
            "(one subfolder of images per class)"
        )
    return classes


def load_image_folder(root: Path, img_size: int, in_chans: int = 3, *, min_side: int = 1) -> Dataset:
    """An ImageFolder tree (``train/``, ``val/``, optional ``test/``) as streamed splits
    (:class:`factory.data.stream.ImageFiles`: nothing is decoded here).

    Every file's header is read once (size, mode), so what cannot be trained on is refused in one line
    before any work: an unreadable file, an image over :data:`factory.data.stream.MAX_IMAGE_PIXELS`, an image smaller than
    ``min_side`` (the model's patch) and a split of fewer than two classes. Every image is read in the model's
    channels: a greyscale image for a 3-channel model is repeated into its channels (PIL's ``convert("RGB")``, as
    timm's and torchvision's loaders do; a folder of only greyscale images says so in ``notes``), a colour image
    for a 1-channel model is converted to luminance. Normalised with ImageNet's mean and std (DeiT's; timm's
    defaults) for 3 channels, 0.5/0.5 for 1.
    """
    from torchvision.datasets.folder import make_dataset

    from factory.data.stream import ImageFiles

    missing = [f"{split}/" for split in ("train", "val") if not (root / split).is_dir()]
    if missing:
        found = sorted(f"{p.name}/" for p in root.iterdir() if p.is_dir() and not hidden(p.name))
        raise FactoryError(
            f"data directory {root} has no {' and no '.join(missing)} (it holds {', '.join(found) or 'no folders'}): "
            "the ImageFolder layout is train/CLASS/*, val/CLASS/* and an optional test/CLASS/*; "
            + ("move some training images of each class into val/" if missing == ["val/"] else "arrange it so")
        )
    # one walk of the tree, which also refuses symlink loops before torchvision walks it
    identity = folder_identity(root, img_size, in_chans)
    mean = (0.485, 0.456, 0.406) if in_chans == 3 else (0.5,)
    std = (0.229, 0.224, 0.225) if in_chans == 3 else (0.5,)
    modes: set[str] = set()

    def read(split: str) -> ImageFiles:
        try:
            classes = class_folders(root / split)
            samples = make_dataset(root / split, {c: i for i, c in enumerate(classes)}, is_valid_file=image_file)
        except FileNotFoundError as exc:  # torchvision: a class folder without an image
            raise FactoryError(
                f"{root / split}: {str(exc).strip().rstrip('.')}; every class folder needs at least one image "
                "(.jpg, .png, .webp, ...), in every split: add images or remove the class from every split"
            ) from exc
        except OSError as exc:
            raise FactoryError(f"cannot read {root / split}: {exc}") from exc
        for path, _ in samples:
            modes.add(check_header(Path(path), min_side))
        return ImageFiles(
            [(str(p), int(y)) for p, y in samples],
            classes,
            img_size,
            in_chans,
            mean,
            std,
            min_side=min_side,
        )

    train, val = read("train"), read("val")
    test = read("test") if (root / "test").is_dir() else val
    for name, split in (("val", val), ("test", test)):
        if split.classes != train.classes:  # labels are folder indices: another set of folders mislabels them
            missing = sorted(set(train.classes) - set(split.classes))
            extra = sorted(set(split.classes) - set(train.classes))
            what = "; ".join(
                x
                for x in (
                    f"missing {', '.join(missing)}" if missing else "",
                    f"extra {', '.join(extra)}" if extra else "",
                )
                if x
            )
            raise FactoryError(
                f"{root}/{name} has other class folders than {root}/train ({what}); give every split the same "
                "class folders"
            )
    notes = ()
    if in_chans == 3 and modes and modes <= GREY_MODES:  # e.g. X-rays for an ImageNet ViT: the usual transfer
        notes = (
            f"the images are greyscale (mode {', '.join(sorted(modes))}): each is repeated into the model's 3 "
            "channels, as timm's loader does",
        )
    test_from = (
        "test"
        if (root / "test").is_dir()
        else f"val (no test/ folder in {root}: add one for an unbiased test accuracy)"
    )
    return Dataset(root.name, train, val, test, mean, std, identity=identity, test_from=test_from, notes=notes)
