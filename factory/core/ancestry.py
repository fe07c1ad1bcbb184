"""Loading ancestry ViTs.

Spec grammar (``load_ancestry(spec)``):

=============================  ==============================================================
``demo``                       the project's demo ancestry (:data:`DEMO_ARCH`); trained weights
                               when ``peg-factory ancestry train`` has cached them, else a
                               seeded random init (reported as such in ``weights``)
``timm:NAME`` or ``NAME``      ``timm.create_model(NAME, pretrained=True)`` (needs the HF hub
                               or a populated timm cache)
``random:NAME``                ``timm.create_model(NAME, pretrained=False)``, seeded (tests,
                               benchmarks)
``PATH@NAME``                  a local checkpoint (``.safetensors``; ``.pth``/``.pt`` read with
                               ``weights_only=True``; ``{"model": ...}`` / ``{"state_dict": ...}``
                               wrappers as DeiT ships them) loaded into timm architecture NAME
``PATH.safetensors``           a checkpoint written by peg-factory (its metadata names the arch)
an ``nn.Module``               an already built timm ``VisionTransformer``
=============================  ==============================================================

Non-ViT models and checkpoints that do not fit the architecture are rejected with one line.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from factory.core.assets import demo_weights
from factory.core.shapes import ArchConfig
from factory.core.timm_vit import arch_of, empty_vit, split_state_dict
from factory.errors import FactoryError
from factory.io import state_dict_sha256
from factory.io.atomic import require_regular_file
from factory.io.paths import MODEL_FILE, model_file

#: The demo ancestry: small enough to train on MNIST on two CPU cores.
DEMO_ARCH = ArchConfig(
    embed_dim=192,
    depth=6,
    num_heads=3,
    mlp_hidden=768,
    img_size=28,
    patch_size=7,
    num_classes=10,
    in_chans=1,
)

#: safetensors metadata key under which peg-factory stores an ``ArchConfig`` as JSON.
ARCH_METADATA_KEY = "peg_factory.arch"


@dataclass
class Ancestry:
    """A loaded ancestry: the model (eval mode), its architecture, where it came from, its hash."""

    model: nn.Module
    arch: ArchConfig
    spec: str
    sha256: str
    weights: str  # "pretrained", "checkpoint", "random", "trained-demo", "module"

    def layers(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """``(stem, stacked_blocks)`` of the weights as float32 copies (see ``split_state_dict``)."""
        state = {k: v.detach().float() for k, v in self.model.state_dict().items()}
        return split_state_dict(state, self.arch.depth)

    def identity(self) -> dict[str, str]:
        return {"spec": self.spec, "sha256": self.sha256, "weights": self.weights}

    @property
    def hub_id(self) -> str | None:
        """The Hugging Face Hub id of a named pretrained model's weights (timm's ``pretrained_cfg``
        ``hf_hub_id``, e.g. ``timm/deit_tiny_patch16_224.fb_in1k``): the descendants' ``base_model``. None for
        random, demo, module and a user's checkpoint (whose origin only the user knows)."""
        if self.weights != "pretrained":
            return None
        cfg = getattr(self.model, "pretrained_cfg", None) or {}
        return cfg.get("hf_hub_id") or None


def _seeded(fn, seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn()


def _from_module(model: nn.Module, spec: str, weights: str) -> Ancestry:
    arch = arch_of(model)
    model.eval()
    return Ancestry(model, arch, spec, state_dict_sha256(model.state_dict()), weights)


def _create_timm(name: str, pretrained: bool) -> nn.Module:
    import timm

    if not timm.is_model(name):
        raise FactoryError(
            f"unknown timm model {name!r}; run `python -c \"import timm; print(timm.list_models('*vit*'))\"` "
            "to list architectures"
        )
    if pretrained:  # reject non-ViT architectures before any download (meta: no memory)
        with torch.device("meta"):
            arch_of(timm.create_model(name, pretrained=False))
    try:
        return timm.create_model(name, pretrained=pretrained)
    except (OSError, RuntimeError, ValueError) as exc:
        if not pretrained:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FactoryError(
            f"could not fetch pretrained weights for {name!r} ({first}); "
            f"download them where the hub is reachable and pass PATH@{name}"
        ) from exc


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a state dict (and safetensors metadata) from ``path``; one-line errors on failure."""
    if path.is_dir():
        raise FactoryError(
            f"checkpoint {path} is a folder without {MODEL_FILE}; pass a checkpoint file, or a model folder (a "
            "`train` run's, a build's device folder)"
        )
    if path.exists():  # a FIFO would be read forever
        require_regular_file(path, "checkpoint")
    if not path.is_file():
        raise FactoryError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
                return _finite({k: fh.get_tensor(k) for k in fh.keys()}, path), meta
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FactoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - any parse failure is the file's fault
        if "weights only load failed" in str(exc).lower():  # torch's hint to disable the check must not be passed on
            raise FactoryError(
                f"checkpoint {path} contains code or objects other than tensors and was refused; "
                "re-save it as a plain state dict (torch.save(model.state_dict())) or as safetensors"
            ) from exc
        raise FactoryError(
            f"cannot read checkpoint {path}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from exc
    for key in ("model", "state_dict", "model_ema"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise FactoryError(f"checkpoint {path} holds no state dict of tensors")
    return _finite(obj, path), {}


def _finite(state: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """``state`` unchanged, or a one-line error naming the first tensor holding NaN or infinity
    (a diverged training run saved as a checkpoint would otherwise propagate NaN silently)."""
    for key, value in state.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise FactoryError(
                f"checkpoint {path}: tensor {key!r} holds NaN or infinite values (a diverged run?); "
                "use an earlier checkpoint"
            )
    return state


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str, name: str) -> None:
    from timm.models.vision_transformer import checkpoint_filter_fn

    state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        state = checkpoint_filter_fn(state, model)
    except Exception:  # noqa: BLE001 - fall back to the raw keys; load_state_dict reports
        pass
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        what = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
        raise FactoryError(
            f"checkpoint {source} does not fit architecture {name!r} ({what}, "
            f"{len(missing)} missing / {len(unexpected)} unexpected keys); pass the right PATH@ARCH"
        )
    for key, value in state.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise FactoryError(
                f"checkpoint {source} does not fit architecture {name!r}: {key} has shape "
                f"{tuple(value.shape)}, the model expects {tuple(own[key].shape)}"
            )
    model.load_state_dict(state)


def load_demo_ancestry(seed: int = 0) -> Ancestry:
    """The demo ancestry (:data:`DEMO_ARCH`): the user's cache written by ``peg-factory ancestry
    train`` first, then the weights shipped in the package (made by that same command), else a
    seeded random initialisation reported as ``weights="random"``. Read-only: training it is
    :func:`factory.training.demo_recipe.train_demo_ancestry`'s job."""
    path = demo_weights()
    if path is not None:
        state, _ = read_checkpoint(path)
        model = empty_vit(DEMO_ARCH)
        _load_into(model, {k: v.float() for k, v in state.items()}, str(path), "demo")
        return _from_module(model, "demo", "trained-demo")
    from factory.core.timm_vit import build_vit

    return _from_module(build_vit(DEMO_ARCH, seed=seed), "demo", "random")


def load_ancestry(spec: str | os.PathLike | nn.Module | Ancestry, *, seed: int = 0) -> Ancestry:
    """Load an ancestry from a spec (grammar in the module docstring)."""
    if isinstance(spec, Ancestry):
        return spec
    if isinstance(spec, nn.Module):
        return _from_module(spec, f"module:{type(spec).__name__}", "module")
    text = os.fspath(spec).strip()
    if not text:
        raise FactoryError("empty ancestry spec; use 'demo', a timm model name, or PATH@ARCH")
    if text == "demo":
        return load_demo_ancestry(seed)
    if text.startswith("random:"):
        name = text.split(":", 1)[1]
        model = _seeded(lambda: _create_timm(name, pretrained=False), seed)
        return _from_module(model, text, "random")
    if text.startswith("timm:"):
        name = text.split(":", 1)[1]
        return _from_module(_create_timm(name, pretrained=True), text, "pretrained")
    if "@" in text:
        path_text, name = text.rsplit("@", 1)
        path = model_file(Path(path_text).expanduser())
        state, _ = read_checkpoint(path)
        model = _create_timm(name, pretrained=False)
        arch_of(model)  # reject non-ViT architectures before complaining about keys
        _load_into(model, state, str(path), name)
        return _from_module(model, text, "checkpoint")
    path = model_file(Path(text).expanduser())
    if path.suffix in (".safetensors", ".pth", ".pt", ".bin") or path.exists():
        state, meta = read_checkpoint(path)
        if ARCH_METADATA_KEY not in meta:
            raise FactoryError(
                f"checkpoint {path} does not name its architecture; pass it as {path}@ARCH, e.g. @vit_small_patch16_224"
            )
        try:
            arch = ArchConfig.from_dict(json.loads(meta[ARCH_METADATA_KEY]))
        except (TypeError, ValueError) as exc:
            raise FactoryError(f"checkpoint {path} has unreadable architecture metadata: {exc}") from exc
        model = empty_vit(arch)  # every tensor comes from the checkpoint (checked by _load_into)
        _load_into(model, state, str(path), "its own metadata")
        return _from_module(model, str(path), "checkpoint")
    import timm

    if timm.is_model(text):
        return _from_module(_create_timm(text, pretrained=True), text, "pretrained")
    raise FactoryError(
        f"ancestry {text!r} is neither 'demo', a timm model name, nor an existing checkpoint; "
        "use e.g. 'demo', 'vit_small_patch16_224' or 'ckpt.pth@vit_small_patch16_224'"
    )
