"""A generated ImageFolder tree: photos-sized RGB images whose class is learnable, made offline.

For tests and ``bench/real_scale.py`` (no photo data set can be downloaded there). Class ``k`` of
``K`` is a disc of hue ``k / K`` on a textured background, at a random place and size, with pixel
noise; image sizes vary around ``size`` (aspect ratios 3:4 to 4:3), so resizing and cropping paths
are exercised the way a user's photos exercise them. Deterministic in ``seed``.
"""

from __future__ import annotations

import colorsys
from pathlib import Path

import numpy as np


def write_image_folder(
    root: str | Path,
    *,
    classes: int = 5,
    per_class: dict[str, int] | None = None,
    size: int = 224,
    seed: int = 0,
    mode: str = "RGB",
    fmt: str = "JPEG",
) -> Path:
    """Write ``root/{split}/class{k}/{i}.jpg`` for each split in ``per_class`` (default train 30, val 10,
    test 10 per class) and return ``root``. ``mode="L"`` writes greyscale images."""
    from PIL import Image

    root = Path(root)
    per_class = per_class or {"train": 30, "val": 10, "test": 10}
    rng = np.random.default_rng(seed)
    ext = {"JPEG": "jpg", "PNG": "png"}[fmt]
    for split, count in per_class.items():
        for k in range(classes):
            folder = root / split / f"class{k}"
            folder.mkdir(parents=True, exist_ok=True)
            colour = np.array(colorsys.hsv_to_rgb(k / classes, 0.8, 0.9)) * 255
            for i in range(count):
                aspect = rng.uniform(0.75, 1.333)
                w, h = int(size * aspect**0.5), int(size / aspect**0.5)
                yy, xx = np.mgrid[0:h, 0:w]
                background = 110 + 40 * np.sin(xx / rng.uniform(4, 16)) * np.cos(yy / rng.uniform(4, 16))
                image = np.repeat(background[..., None], 3, axis=2)
                cy, cx, r = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w, rng.uniform(0.15, 0.3) * min(h, w)
                disc = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
                image[disc] = colour
                image += rng.normal(0, 12, image.shape)
                pil = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8), "RGB")
                (pil.convert("L") if mode == "L" else pil).save(
                    folder / f"{i}.{ext}", fmt, **({"quality": 90} if fmt == "JPEG" else {})
                )
    return root
