"""``peg-factory expand``: a learngene (or a baseline init) expanded into a timm ViT descendant."""

from __future__ import annotations

from pathlib import Path

import click

from factory.cli.common import (
    UserError,
    ancestry_option,
    init_option,
    out_option,
    seed_option,
    shape_from,
    shape_options,
)


@click.command()
@click.option(
    "--learngene",
    "learngene_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Learngene directory (needed for --method peg).",
)
@ancestry_option(None, "Ancestry spec (needed for tleg / weight_selection).")
@init_option("method", "--method", "How the descendant is initialised: PEG expansion or a baseline.")
@click.option(
    "--selection",
    type=click.Choice(["even", "importance"]),
    default="even",
    show_default=True,
    help="How heads/width/hidden units are chosen.",
)
@shape_options
@seed_option(help="Seed of whatever is initialised at random.")
@out_option("Descendant .safetensors file.")
def expand(
    learngene_dir,
    ancestry,
    method,
    selection,
    depth,
    embed_dim,
    num_heads,
    mlp_ratio,
    img_size,
    patch_size,
    num_classes,
    seed,
    out,
) -> None:
    """Expand a learngene (or a baseline init) into a timm ViT descendant.

    \b
    Example:
      peg-factory expand --learngene out/learngene --depth 9 --embed-dim 192 --heads 3 --out out/d9.safetensors
      peg-factory expand --method tleg --ancestry demo --depth 4 --embed-dim 96 --heads 2 --out out/tleg.safetensors
    """
    from factory.core.ancestry import load_ancestry
    from factory.core.baselines import init_descendant
    from factory.core.checkpoint import save_descendant
    from factory.core.flops import count_params
    from factory.core.learngene import Learngene

    lg = Learngene.load(learngene_dir) if learngene_dir is not None else None
    anc = load_ancestry(ancestry) if ancestry is not None else None
    if method == "peg" and lg is None:
        raise UserError("--method peg needs --learngene DIR (create one with `peg-factory learngene`)")
    arch = lg.arch if lg is not None else anc.arch if anc is not None else None
    if arch is None:
        from factory.core.ancestry import DEMO_ARCH

        arch = DEMO_ARCH
    shape = shape_from(arch, depth, embed_dim, num_heads, mlp_ratio, img_size, patch_size, num_classes)
    model = init_descendant(method, shape, ancestry=anc, learngene=lg, seed=seed, selection=selection)
    info = {
        "method": method,
        "selection": selection,
        "seed": seed,
        "shape": shape.to_dict(),
        "learngene_sha256": lg.sha256 if lg is not None else None,
        "ancestry": anc.identity() if anc is not None else None,
    }
    digest = save_descendant(model, arch.with_shape(shape), out, info)
    click.echo(
        f"descendant {out}: {shape.label()} by {method}, {count_params(model) / 1e6:.2f}M params, sha256 {digest[:12]}"
    )
