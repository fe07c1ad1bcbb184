"""``peg-factory learngene``: sample a learngene; ``learngene train``: its expanding phase."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click

from factory.cli.common import (
    COUNT,
    RATE,
    SIZE,
    STEPS,
    FactoryGroup,
    UserError,
    amp_option,
    ancestry_option,
    data_option,
    global_batch_option,
    int_list,
    out_option,
    refuse_without,
    seed_option,
)
from factory.core.expanding_phase import ExpandingConfig


@click.group(cls=FactoryGroup, invoke_without_command=True)
@ancestry_option()
@click.option("--layers", type=COUNT, default=None, help="Gene layers L_b [default: half the ancestry's depth].")
@click.option("--heads", type=COUNT, default=None, help="Gene heads H_b [default: the ancestry's].")
@click.option(
    "--tau",
    type=click.FloatRange(0, 1e6, min_open=True),
    default=1.0,
    show_default=True,
    help="Softmax temperature of the mixture.",
)
@click.option(
    "--mixing",
    type=click.Choice(["softmax", "uniform", "identity"]),
    default="softmax",
    show_default=True,
    help="How gene layers mix the ancestry's layers: seeded softmax-Gaussian weights, uniform, or one layer each.",
)
@click.option(
    "--head-mixing/--no-head-mixing",
    default=True,
    show_default=True,
    help="Mix heads within a gene layer (off: keep evenly spaced heads).",
)
@click.option(
    "--rescale",
    type=click.Choice(["std", "none"]),
    default="std",
    show_default=True,
    help="Variance-preserving rescale of mixed tensors to the ancestry layers' spread.",
)
@seed_option(help="Seed of the mixture weights.")
@out_option("Learngene directory to write.", required=False)
@click.pass_context
def learngene(ctx, ancestry, layers, heads, tau, mixing, head_mixing, rescale, seed, out) -> None:
    """Sample a PEG learngene from an ancestry ViT and save it to --out.

    \b
    Example:
      peg-factory learngene --ancestry demo --layers 3 --heads 3 --seed 0 --out out/learngene
      peg-factory learngene --ancestry ckpt.pth@deit_small_patch16_224 --layers 6 --out lg/
    """
    if ctx.invoked_subcommand is not None:
        return
    if out is None:
        raise UserError("missing --out DIR: where to write the learngene")
    refuse_without("--mixing softmax", mixing == "softmax", ["tau"])  # the temperature of the softmax weights
    from factory.core.ancestry import load_ancestry
    from factory.core.learngene import sample_learngene

    anc = load_ancestry(ancestry)
    lg = sample_learngene(
        anc,
        max(1, anc.arch.depth // 2) if layers is None else layers,
        heads,
        tau=tau,
        seed=seed,
        mixing=mixing,
        head_mixing=head_mixing,
        rescale=rescale,
    )
    digest = lg.save(out)
    summary = lg.meta["stats"]["summary"]
    click.echo(
        f"learngene {out}: {lg.num_layers} layers x {lg.num_heads} heads from {anc.spec} "
        f"({anc.arch.depth} layers, {anc.arch.num_heads} heads, weights={anc.weights}); "
        f"sha256 {digest[:12]}; weight std ratio {summary['mean_std_ratio']:.3f}, "
        f"relative W1 {summary['mean_w1_rel']:.3f}"
    )


@learngene.command("train")
@click.option(
    "--learngene", "learngene_dir", type=click.Path(path_type=Path), required=True, help="Sampled learngene directory."
)
@ancestry_option(None, "Teacher ancestry spec [default: the one named in the learngene].")
@data_option(
    "mnist", "Images to distil on (labels unused): the ancestry's own data where you have it, else the target's."
)
@click.option("--depths", default=None, help="Comma-separated descendant depths [default: 1 .. 2 x ancestry depth].")
@click.option(
    "--widths", default=None, help="Comma-separated descendant widths [default: ancestry width, 3/4 and 1/2 of it]."
)
@click.option("--steps", type=STEPS, default=1500, show_default=True, help="Expanding-phase steps.")
@global_batch_option()
@click.option("--lr", type=RATE, default=1e-3, show_default=True, help="AdamW learning rate (warm-up, cosine).")
@click.option(
    "--extra-hidden",
    type=click.IntRange(0, 1 << 16),
    default=0,
    show_default=True,
    help="Extra ReLU units per depth map.",
)
@click.option(
    "--img-size",
    type=SIZE,
    default=None,
    help="Distil at this input size (a multiple of the patch size) [default: the ancestry's].",
)
@click.option(
    "--largest-every",
    type=click.IntRange(0, 1 << 20),
    default=ExpandingConfig.largest_every,
    show_default=True,
    help="Train the sandwich's largest shape every K-th step (1: every step); 0: only when drawn. "
    "K=3 does 1.78x fewer FLOPs a step, but needs about as many more steps for the same learngene "
    "(bench/RESULTS.md, equal phase time).",
)
@amp_option()
@click.option("--vary-shapes", is_flag=True, help="Also sandwich over head counts and MLP ratios 1-4 per width.")
@seed_option(help="Seed of the batches, the random shapes and the depth maps.")
@click.option(
    "--work-dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Checkpoints and loss log [default: OUT.partial]; a rerun resumes from it.",
)
@out_option("Trained learngene directory to write.")
def learngene_train(
    learngene_dir,
    ancestry,
    data,
    depths,
    widths,
    steps,
    batch_size,
    lr,
    extra_hidden,
    img_size,
    largest_every,
    amp,
    vary_shapes,
    seed,
    work_dir,
    out,
) -> None:
    """The learngene expanding phase: distil the ancestry into every expansion at once.

    Resumable: checkpoints go to --work-dir (default OUT.partial) and a rerun of the same
    command continues from the last one; the work dir is removed when OUT is written.

    \b
    Example:
      peg-factory learngene train --learngene out/learngene --data mnist --steps 600 --out out/learngene-trained
    """

    from factory.core.ancestry import load_ancestry
    from factory.core.expanding_phase import default_shapes
    from factory.core.learngene import Learngene
    from factory.data import load_dataset
    from factory.io import ensure_parent
    from factory.training.expanding_loop import run_expanding_phase

    lg = Learngene.load(learngene_dir)
    spec = ancestry or lg.meta.get("ancestry", {}).get("spec")
    if not spec or spec.startswith("module:"):
        raise UserError("the learngene does not name a loadable ancestry; pass --ancestry SPEC")
    anc = load_ancestry(spec)
    if anc.sha256 != lg.meta.get("ancestry", {}).get("sha256"):
        raise UserError(
            f"ancestry {spec!r} is not the one this learngene was sampled from (hash differs); pass the right --ancestry"
        )
    shapes = default_shapes(lg, int_list(depths, "--depths"), int_list(widths, "--widths"), vary=vary_shapes)
    cfg = ExpandingConfig(
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        extra_hidden=extra_hidden,
        seed=seed,
        distill_img_size=img_size,
        largest_every=largest_every,
        amp=amp,
    )
    from factory.io import remove_work_directory, work_directory
    from factory.training.batches import fit_batch
    from factory.training.distributed import check_batch, dist_info

    rank, world = dist_info()  # under torchrun: the global batch split across the processes, rank 0 writes
    check_batch(batch_size, world)
    say = click.echo if rank == 0 else (lambda *_: None)
    ds = load_dataset(data, img_size=anc.arch.img_size, in_chans=anc.arch.in_chans, min_side=anc.arch.patch_size)
    batch_size, note = fit_batch(batch_size, len(ds.train), world=world, split=f"the training split of {data}")
    if note:
        say(f"expanding phase: {note}")
        cfg = dataclasses.replace(cfg, batch_size=batch_size)
    if world > 1:
        say(f"expanding phase on {world} processes: global batch {batch_size} ({batch_size // world} per process)")
    ensure_parent(out)

    work = work_directory(work_dir or out.with_name(out.name + ".partial"))  # a folder of the user's is refused
    own = anc.arch.shape()  # zero-shot is reported at the ancestry's width, heads and ratio, at every depth
    eval_shapes = [
        s for s in shapes if (s.embed_dim, s.num_heads, s.mlp_ratio) == (own.embed_dim, own.num_heads, own.mlp_ratio)
    ]
    # zero-shot accuracy means something only where the task's labels are the ancestry's (its classifier is kept)
    same_labels = ds.num_classes == anc.arch.num_classes
    if not same_labels:
        say(
            f"zero-shot accuracy not reported: {data} has {ds.num_classes} classes, the ancestry's classifier "
            f"{anc.arch.num_classes}"
        )
    trained, report = run_expanding_phase(
        lg,
        anc,
        ds,
        shapes,
        cfg,
        work=work,
        log=say,
        ckpt_every=100,
        eval_shapes=eval_shapes or shapes[-1:],
        eval_images=2000 if same_labels else 0,
    )
    if rank != 0:
        return
    log_file = work / "metrics.jsonl"
    trained.save(out, {"expanding_log.jsonl": log_file.read_bytes()} if log_file.is_file() else None)
    remove_work_directory(work)  # only what the run wrote there
    if report["loss_first"] is not None:
        click.echo(
            f"learngene {out}: distillation loss {report['loss_first']:.4f} -> {report['loss_last']:.4f} in {report['seconds']}s"
        )
    for label, before in report.get("zero_shot_before", {}).items():
        click.echo(f"  {label}: zero-shot accuracy {before:.4f} -> {report['zero_shot_after'][label]:.4f}")
