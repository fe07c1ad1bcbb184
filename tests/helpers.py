"""Shared test helpers."""

import functools
import os
import subprocess
import sys
from pathlib import Path

import torch
from click.testing import CliRunner
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


def cli_run(*args):
    from factory.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args])


def one_line_exit_2(res, needle):
    assert res.exit_code == 2, res.output
    assert needle in res.output, res.output
    assert "Traceback" not in res.output
    assert len([line for line in res.output.splitlines() if line.startswith("Error")]) == 1


def run_script(script, *args, env=None, cwd=None):
    return subprocess.run(
        [sys.executable, str(script), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )


def image_folder(root: Path, classes=("a", "b"), n=3, size=8) -> Path:
    from PIL import Image

    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.new("L", (size, size), 40 * i).save(root / split / c / f"{i}.png")
    return root


def build_cmd(prof, out, steps, *extra) -> list[str]:
    """``python -m factory.cli build`` of profile ``prof`` on synthetic data, as a subprocess's argument vector."""
    return [
        sys.executable,
        "-m",
        "factory.cli",
        "build",
        "--profile",
        str(prof),
        "--out",
        str(out),
        "--data",
        "synthetic",
        "--steps",
        str(steps),
        "--batch-size",
        "8",
        *extra,
    ]


def leftovers(out: Path) -> list[str]:
    """Temporary files or folders left under ``out`` (``*.tmp``, ``*.old``)."""
    return [str(p) for p in out.rglob("*") if p.name.endswith((".tmp", ".old"))]


def small_descendant(path: Path, embed_dim: int, num_heads: int) -> Path:
    """A 2-block descendant of the demo ancestry at ``path`` (weight selection: real features), quick to train,
    lower and run."""
    from factory import load_ancestry
    from factory.core.baselines import init_descendant
    from factory.core.checkpoint import save_descendant
    from factory.core.shapes import DescendantShape

    anc = load_ancestry("demo")
    shape = DescendantShape(
        depth=2, embed_dim=embed_dim, num_heads=num_heads, mlp_ratio=2.0, img_size=28, patch_size=7, num_classes=10
    )
    save_descendant(init_descendant("weight_selection", shape, ancestry=anc), anc.arch.with_shape(shape), path, {})
    return path


def transfer_check_passes(monkeypatch) -> None:
    """The build's transfer check (factory.core.transfer.check_transfer) scores as if the ancestry's features
    transfer (weight selection 0.9 against scratch 0.2), so an expanding phase is planned on any data."""
    import factory.core.transfer as transfer

    real = transfer.check_transfer

    def transfers(*args, **kwargs):
        return transfer.TransferCheck(
            **{**real(*args, **kwargs).__dict__, "scores": {"weight_selection": 0.9, "scratch": 0.2}}
        )

    monkeypatch.setattr(transfer, "check_transfer", transfers)
