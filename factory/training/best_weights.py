"""Keep the weights that scored best on the validation split during a fine-tune (``TrainConfig.keep_best``).

A fine-tune evaluates its validation split every ``eval_every`` steps and at its last step; with
``keep_best`` the weights it returns are those of the evaluation with the highest validation accuracy,
ties going to the later one (so where accuracy only rises they are the last step's), not always the last
step's. Why: on a small training set a fine-tune reaches ~100% training accuracy long before its end and its
validation accuracy wanders with it; measured on the 1,000-image textures task (bench/RESULTS.md, "The
weights a fine-tune ships"), the last step's weights were up to 4.5 points below the best evaluation's on
the test split, while on the MNIST-like tasks, where accuracy rises to the end, the choice changed little.
This is what timm's ``CheckpointSaver`` does with its ``model_best`` checkpoint.

The choice is made on the validation split, so the test split must be another one to stay an unbiased
measure: the build keeps the best only where the data has its own test split
(:func:`factory.pipeline.config.finetune_stage_recipe`).

The best weights so far are kept in memory (a CPU copy) and, when the run has a folder, in
``best.safetensors`` there (metadata: the step and its validation accuracy), written atomically by rank 0, so
a resumed or paced fine-tune (:mod:`factory.pipeline.pacing`, several runs over one folder) keeps its best
across runs. A best file from a step after the checkpoint a run resumes from is not trusted (those steps run
again).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

BEST_FILE = "best.safetensors"
#: At most this many evaluations of the validation split (every ``steps // n`` steps, the last included) ...
MOST_EVALUATIONS = 10
#: ... costing at most this share of the fine-tune's training work (a forward of an image is ~1/3 of a step's).
EVALUATION_SHARE = 0.1


def evaluations(steps: int, batch_size: int, val_images: int) -> int:
    """How many times a fine-tune that keeps its best weights evaluates its validation split::

        n = min(MOST_EVALUATIONS, floor(EVALUATION_SHARE * 3 * batch_size * steps / val_images))

    so the evaluations cost at most :data:`EVALUATION_SHARE` of the training (a forward of one image being a
    third of the forward and backward a training image costs). Below 2 there is nothing to choose between:
    the last step's weights ship. A large validation split against a short fine-tune (50,000 images, 1,000
    steps of 32) gets 0; the 28-px tasks' 400-500 images against 1,500 steps get 10."""
    if steps < 2 or val_images < 1:
        return 0
    return min(MOST_EVALUATIONS, int(EVALUATION_SHARE * 3 * batch_size * steps / val_images))


@dataclass
class BestWeights:
    """The best evaluation so far: its step, its validation accuracy and (a CPU copy of) its weights."""

    path: Path | None = None  # where it is kept between runs (None: in memory only)
    write: bool = True  # this process writes the file (rank 0)
    step: int = 0
    accuracy: float = -math.inf
    state: dict[str, torch.Tensor] | None = None

    @classmethod
    def open(cls, out_dir: str | Path | None, resume_step: int | None, *, write: bool = True) -> BestWeights:
        """The best of the run in ``out_dir``: read back when the run resumes at ``resume_step`` (a record from a
        later step is dropped), none on a fresh start (``resume_step`` None; a stale file is removed)."""
        path = Path(out_dir) / BEST_FILE if out_dir is not None else None
        best = cls(path, write)
        if path is None:
            return best
        if resume_step is None:
            if write:
                path.unlink(missing_ok=True)
            return best
        record = _read(path)
        if record is not None and record[0] <= resume_step:
            best.step, best.accuracy, best.state = record
        return best

    def offer(self, step: int, accuracy: float, model: nn.Module) -> bool:
        """Keep ``model``'s weights if ``accuracy`` (after ``step`` steps) is at least the best so far."""
        if not accuracy >= self.accuracy:  # a NaN is never kept
            return False
        self.step, self.accuracy = step, accuracy
        self.state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        if self.path is not None and self.write:
            from safetensors.torch import save

            from factory.io import atomic_write_bytes

            meta = {"step": str(step), "val_accuracy": repr(accuracy)}
            atomic_write_bytes(self.path, save({k: v.contiguous() for k, v in self.state.items()}, metadata=meta))
        return True

    def restore(self, model: nn.Module, last_step: int) -> int:
        """Load the best weights into ``model`` when they are not the last step's; the step whose weights
        ``model`` now holds (``last_step`` when there is no better one)."""
        if self.state is None or self.step >= last_step:
            return last_step
        model.load_state_dict(self.state)
        return self.step


def _read(path: Path) -> tuple[int, float, dict[str, torch.Tensor]] | None:
    """``(step, accuracy, weights)`` of a best file, or None when there is none or it cannot be read."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has keys(), no iteration
        return int(meta["step"]), float(meta["val_accuracy"]), state
    except (OSError, ValueError, KeyError, RuntimeError):
        return None
