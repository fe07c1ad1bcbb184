"""``peg-factory flops``: FLOPs and parameters of a model (fvcore) or of a shape (closed form)."""

from __future__ import annotations

from pathlib import Path

import click

from factory.cli.common import echo_json, shape_from, shape_options


@click.command()
@click.option(
    "--model",
    "model_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Descendant .safetensors (or any ancestry spec) to measure with fvcore.",
)
@shape_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def flops(model_path, depth, embed_dim, num_heads, mlp_ratio, img_size, patch_size, num_classes, as_json) -> None:
    """FLOPs (multiply-adds, fvcore's convention) and parameters of a model or a shape.

    \b
    Example:
      peg-factory flops --model out/d9.safetensors
      peg-factory flops --depth 12 --embed-dim 384 --heads 6 --img-size 224 --patch-size 16 --num-classes 1000
    """
    from factory.core.ancestry import load_ancestry
    from factory.core.flops import count_flops, count_params
    from factory.core.shapes import STANDARD_ARCH, vit_flops, vit_params

    if model_path is not None:
        anc = load_ancestry(model_path if Path(model_path).exists() else str(model_path))
        shape, arch = anc.arch.shape(), anc.arch
        measured, params = count_flops(anc.model), count_params(anc.model)
    else:
        arch = STANDARD_ARCH
        shape = shape_from(
            arch,
            depth,
            embed_dim,
            num_heads,
            mlp_ratio,
            img_size or 224,
            patch_size or 16,
            num_classes if num_classes is not None else 1000,
        )
        measured = params = None
    result = {
        "shape": shape.to_dict(),
        "flops_closed_form": vit_flops(shape, arch),
        "params_closed_form": vit_params(shape, arch),
        "flops_fvcore": measured,
        "params": params,
    }
    if as_json:
        echo_json(result)
        return
    line = f"{shape.label()}: {result['flops_closed_form'] / 1e9:.4f} GFLOPs (closed form)"
    if measured is not None:
        line += f", {measured / 1e9:.4f} GFLOPs (fvcore), {params / 1e6:.3f}M params"
    else:
        line += f", {result['params_closed_form'] / 1e6:.3f}M params"
    click.echo(line)
