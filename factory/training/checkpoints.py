"""A trainer's checkpoint on disk: the weights, the AdamW moments and the RNG in one sealed folder
(:func:`factory.io.seal`), written atomically, resumed only when intact. The fine-tune
(:func:`factory.training.train.train`) and the expanding phase (:mod:`factory.training.expanding_loop`) share it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from factory.errors import FactoryError
from factory.io import atomic_directory, seal, seal_state, sealed_info
from factory.training.distributed import check_resume_world


def as_os_error(exc: Exception, path: Path) -> Exception:
    """safetensors' error for a failed write ("... I/O error: No space left on device (os error 28)") as the
    ``OSError`` it wraps, so a full disk is the CLI's one line like any other; other errors unchanged."""
    import re

    found = re.search(r"os error (\d+)", str(exc))
    if found is None:
        return exc
    code = int(found.group(1))
    return OSError(code, os.strerror(code), str(path))


def save_checkpoint(
    directory: Path, model: nn.Module, opt: torch.optim.Optimizer, step: int, cfg, *, world: int = 1
) -> None:
    """``state.safetensors`` (weights, AdamW moments, RNG) + ``state.json`` (step, config), sealed
    (:func:`factory.io.seal`) so a damaged checkpoint is detected before a resume trusts it."""
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    opt_state = opt.state_dict()
    scalars: dict[str, Any] = {}
    for pid, state in opt_state["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"opt.{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{key}"] = value
    tensors["rng.cpu"] = torch.get_rng_state()
    with atomic_directory(directory) as tmp:
        try:
            save_file(tensors, str(tmp / "state.safetensors"))
        except Exception as exc:  # noqa: BLE001 - safetensors reports a failed write as its own error type
            raise as_os_error(exc, tmp / "state.safetensors") from exc
        meta = {
            "step": step,
            "config": asdict(cfg),
            "opt_scalars": scalars,
            "param_groups": opt_state["param_groups"],
            "world_size": world,  # a resume on another count is refused (factory.training.distributed)
        }
        (tmp / "state.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        seal(tmp, {"step": step})


def load_checkpoint(directory: Path, model: nn.Module, opt: torch.optim.Optimizer, *, world: int = 1) -> int:
    from safetensors.torch import load_file

    try:
        meta = json.loads((directory / "state.json").read_text())
        tensors = load_file(str(directory / "state.safetensors"))
    except (OSError, ValueError) as exc:
        raise FactoryError(
            f"cannot resume from {directory}: {exc}; remove it or do not resume", param="resume"
        ) from exc
    check_resume_world(int(meta.get("world_size", 1)), world, f"from {directory}")
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    for key, value in meta["opt_scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["rng.cpu"])
    return int(meta["step"])


def resume_or_restart(work: Path, what: str, log: Callable[[str], None]) -> bool:
    """Whether ``work`` holds an intact (sealed) checkpoint to resume ``what`` from. A damaged one is
    reported and removed (the checkpoint alone: whatever else ``work`` holds stays), so the run starts over
    instead of failing on every rerun."""
    import shutil

    state = seal_state(Path(work) / "checkpoint")
    if state == "damaged":
        log(f"{what}: its checkpoint in {work} is damaged; starting over")
        shutil.rmtree(Path(work) / "checkpoint", ignore_errors=True)
    elif state == "done":
        log(f"{what}: resuming from its last checkpoint")
    return state == "done"


def checkpoint_step(work: str | Path) -> int:
    """The step of the checkpoint in ``work`` as its seal recorded it (0: none, or unreadable)."""
    return int(sealed_info(Path(work) / "checkpoint").get("step", 0))


def open_checkpoint(
    out_dir: str | Path | None,
    resume: bool,
    module: nn.Module,
    opt: torch.optim.Optimizer,
    what: str,
    *,
    world: int = 1,
) -> tuple[Path | None, int]:
    """``(checkpoint dir or None, first step)``: with ``resume``, ``module`` and ``opt`` are loaded
    from ``out_dir/checkpoint`` (one-line error naming ``what`` if there is none)."""
    ckpt = Path(out_dir) / "checkpoint" if out_dir is not None else None
    if not resume:
        return ckpt, 0
    ckpt = resumable_checkpoint(out_dir, what)
    return ckpt, load_checkpoint(ckpt, module, opt, world=world)


def resumable_checkpoint(out_dir: str | Path | None, what: str) -> Path:
    """``out_dir/checkpoint``, refused in one line naming ``what`` when there is none or it is damaged: what a
    resume checks before it loads anything (and a CLI before it writes anything)."""
    ckpt = Path(out_dir) / "checkpoint" if out_dir is not None else None
    if ckpt is None or not (ckpt / "state.json").is_file():
        raise FactoryError(f"cannot resume {what}: no checkpoint in {ckpt}; run it without resuming first")
    if seal_state(ckpt) == "damaged":
        raise FactoryError(
            f"cannot resume {what}: the checkpoint in {ckpt} is damaged (a file is missing or changed); "
            "remove it and run without resuming"
        )
    return ckpt
