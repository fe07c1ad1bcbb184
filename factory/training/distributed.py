"""Training on several processes (``torchrun``): one model, its global batch split across ranks.

The contract, for fine-tuning and the expanding phase alike: a run on ``W`` processes with batch ``B``
makes the updates one process makes with batch ``B`` -- the same global batches (batch ``s`` is a pure
function of ``(seed, s)``, :mod:`factory.training.batches`), rank ``r`` taking the slice
``[r B/W, (r+1) B/W)`` *with the augmentation that slice has in the global batch* (not a copy of rank 0's),
gradients averaged over ranks (each rank's loss is its slice's mean, so the average is the global mean),
and the logged loss the global one. Up to floating-point reduction order the losses agree
(tests/test_distributed.py runs 2 CPU processes against 1).

Rank 0 alone logs, writes checkpoints, metrics and results; checkpoints record the world size, and a resume
with another one is refused: the updates would be the same in exact arithmetic, but the bit-exact resume
the trainer promises holds only for the same reduction order. ``W`` must divide ``B`` (one line otherwise).
Process groups: NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import os

import torch

from factory.errors import FactoryError


def dist_info() -> tuple[int, int]:
    """``(rank, world size)`` from torchrun's variables, checked: not integers, a rank outside the world, or a
    world of several processes without ``MASTER_ADDR`` (where ``init_process_group`` would wait forever) is
    one line naming the variable."""
    values = {}
    for name, default in (("WORLD_SIZE", "1"), ("RANK", "0")):
        raw = os.environ.get(name, default)
        try:
            values[name] = int(raw)
        except ValueError:
            raise FactoryError(
                f"the environment variable {name}={raw!r} is not an integer; unset it or run under torchrun"
            ) from None
    world, rank = values["WORLD_SIZE"], values["RANK"]
    if world < 1 or not 0 <= rank < world:
        raise FactoryError(
            f"WORLD_SIZE={world} and RANK={rank} do not make a process group; unset them or run under torchrun"
        )
    if world > 1 and not os.environ.get("MASTER_ADDR"):
        raise FactoryError(
            f"WORLD_SIZE={world} but MASTER_ADDR is not set: the processes could never meet; run under torchrun "
            "(it sets both), or unset WORLD_SIZE"
        )
    return rank, world


def check_batch(batch_size: int, world: int, param: str = "batch_size") -> None:
    """One line when ``world`` processes cannot split a global batch of ``batch_size`` evenly."""
    if batch_size < world:
        raise FactoryError(
            f"batch size {batch_size} is smaller than the {world} processes (WORLD_SIZE): each takes batch/world "
            f"images; pass at least {world}",
            param=param,
        )
    if batch_size % world:
        raise FactoryError(
            f"batch size {batch_size} is not divisible by the {world} processes (WORLD_SIZE): each takes "
            f"batch/world images; pass a multiple of {world} (e.g. {batch_size - batch_size % world})",
            param=param,
        )


def start(device: torch.device, batch_size: int) -> tuple[int, int, torch.device]:
    """``(rank, world, device)`` of this process, its process group started when ``world > 1`` (a CUDA rank
    on its ``LOCAL_RANK`` GPU); the batch checked first, before anything waits on peers."""
    rank, world = dist_info()
    check_batch(batch_size, world)
    if world > 1 and not torch.distributed.is_initialized():
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def average_gradients(params, world: int) -> None:
    """Each parameter's gradient averaged over the ranks (what DDP does, for a model whose graph changes
    every step: the expanding phase's sandwich of shapes)."""
    if world == 1:
        return
    for p in params:
        if p.grad is not None:
            torch.distributed.all_reduce(p.grad)
            p.grad.div_(world)


def global_mean(values: list[float], world: int) -> list[float]:
    """``values`` (e.g. the step's loss and accuracy on this rank's slice) averaged over the ranks."""
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return (t / world).tolist()


def check_resume_world(recorded: int, world: int, what: str) -> None:
    """A checkpoint written by ``recorded`` processes resumed by ``world``: one line unless they agree."""
    if recorded != world:
        raise FactoryError(
            f"cannot resume {what}: its checkpoint was written by {recorded} process(es), this run has {world}; "
            f"resume with the same count (torchrun --nproc_per_node {recorded}, or no torchrun for 1): the global "
            "batch would be the same, but the bit-exact resume holds only for the same reduction order",
            param="resume",
        )
