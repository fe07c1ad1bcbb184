"""A client that uses only what the build wrote (timm's config.json, the model card) sees the model the
factory measured: the same preprocessing, the same predictions, the base model named."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from factory.device.profile import load_profile
from factory.pipeline.build import BuildConfig, build
from factory.pipeline.model_card import front_matter

from .test_build import _profile


def _folder(root, n=(12, 4, 10), size=(40, 34)):
    """Two classes told apart by texture (stripes against blobs), odd-sized images: a real resize and crop."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in zip(("train", "val", "test"), n):
        for c in ("stripes", "blobs"):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                h, w = size[0] + i % 5, size[1] + 2 * (i % 3)
                y, x = np.mgrid[:h, :w]
                base = np.sin(x / (1.5 + i % 3)) if c == "stripes" else np.sin(x / 6.0) * np.cos(y / 5.0)
                img = (127 + 100 * base + rng.normal(0, 25, (h, w))).clip(0, 255).astype(np.uint8)
                Image.fromarray(img, "L").save(root / split / c / f"{i}.png")
    return root


def test_timm_alone_reproduces_the_measured_test_accuracy_from_the_written_folder(tmp_path):
    import timm
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    data = _folder(tmp_path / "data")
    cfg = BuildConfig(data=str(data), finetune_steps=6, batch_size=8, init="weight_selection", objective="capacity")
    manifest = build([load_profile(_profile(tmp_path, "dev", 0.2))], tmp_path / "out", cfg, log=lambda *_: None)
    dev = manifest["devices"][0]
    assert dev["status"] == "ok"
    config = json.loads((tmp_path / "out" / "dev" / "config.json").read_text())["pretrained_cfg"]
    assert config["interpolation"] == "bicubic" and config["crop_pct"] == 0.875  # what the factory evaluated with

    model = timm.create_model(f"local-dir:{tmp_path / 'out' / 'dev'}", pretrained=True).eval()
    transform = create_transform(**resolve_data_config({}, model=model))
    classes = json.loads((tmp_path / "out" / "dev" / "config.json").read_text())["label_names"]
    files = sorted((data / "test").rglob("*.png"))
    with torch.no_grad():
        batch = torch.stack([transform(Image.open(f).convert("L")) for f in files])
        predicted = model(batch).argmax(-1)
    labels = torch.tensor([classes.index(f.parent.name) for f in files])
    accuracy = float((predicted == labels).float().mean())
    assert accuracy == pytest.approx(dev["accuracy"]["test"], abs=1e-9), (accuracy, dev["accuracy"]["test"])


def test_the_card_names_a_pretrained_ancestry_as_its_base_model():
    import timm

    from factory.core.ancestry import Ancestry
    from factory.core.timm_vit import arch_of

    model = timm.create_model("deit_tiny_patch16_224", pretrained=False)  # random weights: no hub here
    named = Ancestry(model, arch_of(model), "timm:deit_tiny_patch16_224", "0" * 64, "pretrained")
    assert named.hub_id == "timm/deit_tiny_patch16_224.fb_in1k"
    assert Ancestry(model, arch_of(model), "random:deit_tiny_patch16_224", "0" * 64, "random").hub_id is None
    head = {
        "ancestry": {**named.identity(), "base_model": named.hub_id},
        "recipe": {"data": "digits"},
        "license": "other",
    }
    dev = {
        "name": "phone",
        "accuracy": {"test": 0.9},
        "shape": {
            "depth": 2,
            "embed_dim": 64,
            "num_heads": 1,
            "mlp_ratio": 4.0,
            "img_size": 224,
            "patch_size": 16,
            "num_classes": 10,
        },
    }
    meta = front_matter(head, dev)
    assert meta["base_model"] == "timm/deit_tiny_patch16_224.fb_in1k" and meta["base_model_relation"] == "finetune"
    head["ancestry"].pop("base_model")
    assert "base_model" not in front_matter(head, dev)  # the demo or a user's checkpoint: not claimed
