"""``peg-factory train``: fine-tune a descendant (CPU, or GPU with AMP; multi-GPU under torchrun)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click

from factory.cli.common import (
    RATE,
    STEPS,
    amp_option,
    data_option,
    global_batch_option,
    out_option,
    refuse_without,
    seed_option,
    view_options,
)


@click.command("train")
@click.option(
    "--model",
    "model_path",
    type=click.Path(path_type=Path),
    required=True,
    help="Descendant .safetensors to fine-tune.",
)
@data_option("digits")
@click.option("--steps", type=STEPS, default=200, show_default=True, help="Optimiser steps.")
@global_batch_option()
@click.option(
    "--lr", type=RATE, default=1e-3, show_default=True, help="AdamW peak learning rate (warm-up, then cosine)."
)
@click.option(
    "--warmup-steps",
    type=STEPS,
    default=None,
    help="Linear warm-up steps, at most --steps  [default: 20, at most half of --steps].",
)
@view_options
@click.option("--distill-from", default=None, help="Teacher ancestry spec for knowledge distillation.")
@click.option(
    "--distill-alpha",
    type=click.FloatRange(0, 1),
    default=0.5,
    show_default=True,
    help="Weight of the distillation loss (with --distill-from).",
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@amp_option()
@click.option(
    "--ckpt-every", type=STEPS, default=50, show_default=True, help="Checkpoint every N steps (0: only at the end)."
)
@seed_option()
@click.option(
    "--keep-weights",
    type=click.Choice(("best-val", "last")),
    default="best-val",
    show_default=True,
    help="The weights written: those of the evaluation with the best validation accuracy (best-val: the validation "
    "split is read up to 10 times, at most a tenth of the training's work; only where the data has its own test "
    "split) or the last step's.",
)
@click.option("--resume", is_flag=True, help="Continue from OUT/checkpoint.")
@out_option("Run directory.")
def train_cmd(
    model_path,
    data,
    steps,
    batch_size,
    lr,
    warmup_steps,
    hflip,
    crop_scale,
    distill_from,
    distill_alpha,
    device,
    amp,
    ckpt_every,
    seed,
    keep_weights,
    resume,
    out,
) -> None:
    """Fine-tune a descendant (CPU, or GPU with AMP; multi-GPU under torchrun).

    \b
    Example:
      peg-factory train --model out/descendant.safetensors --data digits --steps 200 --out runs/d9
      torchrun --nproc_per_node 4 -m factory.cli train --model d.safetensors --data ./imagenet --out runs/x
    """
    from factory.core.ancestry import load_ancestry
    from factory.core.checkpoint import save_descendant
    from factory.data import load_dataset
    from factory.pipeline.config import keep_best_recipe
    from factory.training.best_weights import BEST_FILE
    from factory.training.loop import warmup_for
    from factory.training.train import TrainConfig, evaluate, train

    refuse_without("--distill-from", distill_from is not None, ["distill_alpha"])
    warmup_steps = warmup_for(steps, warmup_steps)  # before anything is loaded
    anc = load_ancestry(model_path)
    ds = load_dataset(data, img_size=anc.arch.img_size, in_chans=anc.arch.in_chans, min_side=anc.arch.patch_size)
    model, arch = anc.model, anc.arch
    if ds.num_classes != arch.num_classes:
        from factory.core.expand import model_from_state

        shape = dataclasses.replace(arch.shape(), num_classes=ds.num_classes)  # new classifier
        state = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
        model, arch = model_from_state(arch, shape, state, seed=seed), arch.with_shape(shape)
    teacher = None
    if distill_from:
        from factory.training.train import check_teacher

        tutor = load_ancestry(distill_from)
        check_teacher(tutor.arch, arch)  # before any work, not a traceback at the first step
        teacher = tutor.model
    cfg = TrainConfig(
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        warmup_steps=warmup_steps,
        hflip=hflip,
        crop_scale=crop_scale,
        device=device,
        amp=amp,
        seed=seed,
        ckpt_every=ckpt_every,
        distill_alpha=distill_alpha if teacher is not None else 0.0,
    )
    cfg = keep_best_recipe(cfg, keep_weights == "best-val", ds)  # the build's rule (factory.pipeline.config)
    from factory.io import MODEL_FILE, claim
    from factory.training.batches import fit_batch
    from factory.training.checkpoints import resumable_checkpoint
    from factory.training.distributed import check_batch, dist_info

    rank, world = dist_info()
    check_batch(batch_size, world)  # before any process waits for its peers
    for note in ds.notes if rank == 0 else ():
        click.echo(f"data: {note}")
    batch_size, note = fit_batch(batch_size, len(ds.train), world=world, split=f"the training split of {data}")
    if note:
        cfg = dataclasses.replace(cfg, batch_size=batch_size)
        if rank == 0:
            click.echo(f"train: {note}")
    if resume:
        resumable_checkpoint(out, "training (--resume)")
    if world > 1 and rank == 0:
        click.echo(f"training on {world} processes: global batch {batch_size} ({batch_size // world} per process)")
    # the user's own model.safetensors, metrics.jsonl or checkpoint/ in --out are never overwritten
    claim(Path(out), [MODEL_FILE, "metrics.jsonl", "checkpoint/", BEST_FILE], writer="train", record=rank == 0)
    result = train(model, ds.train, cfg, val_data=ds.val, teacher=teacher, out_dir=out, resume=resume)
    if rank != 0:  # one model, one result: rank 0 writes and says it
        return
    model = model.cpu()
    test_acc = evaluate(model, ds.test)
    save_descendant(
        model,
        arch,
        out / MODEL_FILE,
        {
            "finetuned_from": str(model_path),
            "data": ds.identity,
            "steps": steps,
            "seed": seed,
            "world_size": world,
            "global_batch": batch_size,
        },
    )
    val = f"{result.val_accuracy:.4f}" if result.val_accuracy is not None else "not measured (no step ran)"
    on = f" on {world} processes" if world > 1 else ""
    if result.kept_step is not None and result.kept_step < steps:
        on += f" (the weights of step {result.kept_step}, the best validation accuracy of its evaluations)"
    click.echo(f"trained {out}{on}: val accuracy {val}, test accuracy {test_acc:.4f}, {result.seconds:.0f}s")
