"""Descendant checkpoints: one ``.safetensors`` file that names its own architecture.

The file's metadata holds ``peg_factory.arch`` (the :class:`~factory.core.shapes.ArchConfig` as JSON,
enough to rebuild the timm model) and ``peg_factory.info`` (how it was made: init method,
learngene hash, shape). ``load_descendant(path)`` -- or ``load_ancestry(path)``, so descendants
can be ancestries in turn -- rebuilds the model. Without peg-factory, the same model is
``timm.models.vision_transformer.VisionTransformer(**json.loads(metadata["timm.model_args"]))``
(timm's own keyword names) and ``load_state_dict``; or, with the ``config.json`` that
:func:`write_timm_config` puts beside the file, ``timm.create_model("local-dir:DIR", pretrained=True)``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from factory.core.ancestry import ARCH_METADATA_KEY, load_ancestry
from factory.core.shapes import ArchConfig
from factory.errors import FactoryError
from factory.io import atomic_write_bytes, canonical_safetensors, sha256_bytes

INFO_METADATA_KEY = "peg_factory.info"


def save_descendant(model: nn.Module, arch: ArchConfig, path: str | Path, info: dict[str, Any]) -> str:
    """Write ``model``'s weights with arch/info metadata atomically; returns the file's sha256
    (a function of the weights and metadata alone: :func:`~factory.io.canonical_safetensors`)."""
    from safetensors.torch import save

    path = Path(path)
    if path.suffix != ".safetensors":
        raise FactoryError(f"descendant file {path} must end in .safetensors")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    data = canonical_safetensors(
        save(
            state,
            metadata={
                ARCH_METADATA_KEY: json.dumps(arch.to_dict(), sort_keys=True),
                INFO_METADATA_KEY: json.dumps(info, sort_keys=True),
                **(
                    {TIMM_ARGS_METADATA_KEY: json.dumps(timm_model_args(arch), sort_keys=True)}
                    if abs(arch.norm_eps - 1e-6) <= 1e-12
                    else {}
                ),
            },
        )
    )
    atomic_write_bytes(path, data)
    return sha256_bytes(data)


def load_descendant(path: str | Path) -> nn.Module:
    """The timm ViT stored at ``path`` by :func:`save_descendant` (eval mode)."""
    return load_ancestry(Path(path)).model


#: The registered timm architecture a descendant's ``config.json`` names; ``model_args`` carry every
#: field that makes it this descendant (a plain ``VisionTransformer`` either way).
TIMM_ARCHITECTURE = "vit_tiny_patch16_224"
#: safetensors metadata key with the descendant's ``VisionTransformer`` keyword arguments, in timm's names.
TIMM_ARGS_METADATA_KEY = "timm.model_args"


def timm_model_args(arch: ArchConfig) -> dict[str, Any]:
    """``arch``'s ``VisionTransformer`` keyword arguments, JSON-ready (timm's default LayerNorm eps, 1e-6,
    is the only one a config can express: other eps values are refused)."""
    if abs(arch.norm_eps - 1e-6) > 1e-12:
        raise FactoryError(
            f"LayerNorm eps {arch.norm_eps:g} differs from timm's default 1e-6; a timm config.json cannot "
            "express it (load the model with factory.core.checkpoint.load_descendant)"
        )
    return {k: v for k, v in arch.timm_kwargs().items() if v is not None}


def write_timm_config(
    directory: str | Path,
    arch: ArchConfig,
    *,
    mean,
    std,
    label_names: list[str],
    interpolation: str = "bilinear",
    crop_pct: float = 1.0,
    license: str = "other",
) -> Path:
    """``directory/config.json`` in timm's Hub format, written by timm itself (``save_config_for_hf``,
    the writer of ``timm.models.save_for_hf``) for a meta-device twin of the descendant built by
    ``timm.create_model``: ``architecture``, ``model_args``, ``pretrained_cfg`` (input size, mean/std,
    interpolation, crop) and ``label_names``. With ``model.safetensors`` beside it,
    ``timm.create_model("local-dir:DIR", pretrained=True)`` is the descendant.

    timm before 1.0.30 has no ``data_config`` argument and writes the twin's own ``pretrained_cfg`` (and lets a
    ``model_config["pretrained_cfg"]`` replace it whole): there the preprocessing goes into the twin's
    ``pretrained_cfg`` instead, the same ``config.json`` either way (the first GPU check ran timm 1.0.29)."""
    import inspect

    import timm
    import torch
    from timm.models._hub import save_config_for_hf  # timm's own config writer (what save_for_hf calls)

    args = timm_model_args(arch)
    with torch.device("meta"):
        twin = timm.create_model(TIMM_ARCHITECTURE, pretrained=False, **args)
    path = Path(directory) / "config.json"
    tmp = path.with_name(".config.json.tmp")
    tags = {"tag": "peg-factory", "license": license}
    data_config = {
        "mean": tuple(mean),
        "std": tuple(std),
        "interpolation": interpolation,
        "crop_pct": crop_pct,
        "input_size": (arch.in_chans, arch.img_size, arch.img_size),
    }
    model_config: dict[str, Any] = {"label_names": list(label_names)}
    if "data_config" in inspect.signature(save_config_for_hf).parameters:
        model_config["pretrained_cfg"] = tags
        save_config_for_hf(twin, tmp, model_config=model_config, model_args=args, data_config=data_config)
    else:
        twin.pretrained_cfg = {**twin.pretrained_cfg, **tags, **data_config}
        for key in ("test_input_size", "test_crop_pct", "pool_size", "label_names", "label_descriptions"):
            twin.pretrained_cfg.pop(key, None)  # the source checkpoint's, not this descendant's
        twin.pretrained_cfg["num_classes"] = arch.num_classes
        save_config_for_hf(twin, tmp, model_config=model_config, model_args=args)  # a Path: timm < 1.0.30 calls .open()
    tmp.replace(path)
    return path
