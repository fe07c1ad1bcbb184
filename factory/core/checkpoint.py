"""Descendant checkpoints: one ``.safetensors`` file that names its own architecture.

The file's metadata holds ``peg_factory.arch`` (the :class:`~factory.core.shapes.ArchConfig` as JSON,
enough to rebuild the timm model) and ``peg_factory.info`` (how it was made: init method,
learngene hash, shape). ``load_descendant(path)`` -- or ``load_ancestry(path)``, so descendants
can be ancestries in turn -- rebuilds the model. Without peg-factory, the same model is
``timm.models.vision_transformer.VisionTransformer(**kwargs)`` with the kwargs of
``ArchConfig.timm_kwargs()`` (plus ``norm_layer`` with ``norm_eps``), then ``load_state_dict``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from factory.core.ancestry import ARCH_METADATA_KEY, load_ancestry
from factory.io import atomic_write_bytes, canonical_safetensors, sha256_bytes
from factory.errors import FactoryError
from factory.core.shapes import ArchConfig

INFO_METADATA_KEY = "peg_factory.info"


def save_descendant(model: nn.Module, arch: ArchConfig, path: str | Path, info: dict[str, Any]) -> str:
    """Write ``model``'s weights with arch/info metadata atomically; returns the file's sha256
    (a function of the weights and metadata alone: :func:`~factory.io.canonical_safetensors`)."""
    from safetensors.torch import save

    path = Path(path)
    if path.suffix != ".safetensors":
        raise FactoryError(f"descendant file {path} must end in .safetensors")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    data = canonical_safetensors(save(
        state,
        metadata={
            ARCH_METADATA_KEY: json.dumps(arch.to_dict(), sort_keys=True),
            INFO_METADATA_KEY: json.dumps(info, sort_keys=True),
        },
    ))
    atomic_write_bytes(path, data)
    return sha256_bytes(data)


def load_descendant(path: str | Path) -> nn.Module:
    """The timm ViT stored at ``path`` by :func:`save_descendant` (eval mode)."""
    return load_ancestry(Path(path)).model
