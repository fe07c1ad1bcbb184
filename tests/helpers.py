"""Shared test helpers."""

import functools

import torch
from torch import nn


def make_vit(seed: int = 0, **overrides) -> nn.Module:
    """A small random timm ViT (qkv bias, class token) for fast CPU tests."""
    from timm.models.vision_transformer import VisionTransformer

    kwargs = dict(
        img_size=32,
        patch_size=8,
        embed_dim=64,
        depth=4,
        num_heads=4,
        mlp_ratio=4.0,
        num_classes=10,
        qkv_bias=True,
        norm_layer=functools.partial(nn.LayerNorm, eps=1e-6),
    )
    kwargs.update(overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = VisionTransformer(**kwargs)
        # timm zero-inits biases and the head; randomise everything so tests see real signal
        for p in model.parameters():
            p.data.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def export_onnx_copy(run):
    """The step of a format registered by tests/test_registries.py: a byte copy of the verified ONNX."""
    import shutil

    shutil.copyfile(run.onnx_path, run.tmp / "model.copy.onnx")
    return {
        "onnx-copy": {
            "file": "model.copy.onnx",
            "copied_from": "model.onnx",
            "private_note": "not kept",
            "latency_ms_b1": run.fp32_stats["latency_ms_b1"],
        }
    }
