"""The ``peg-factory`` command line: parse, call the Python API, print.

User mistakes (:class:`~factory.errors.FactoryError`) become a one-line ``Error: ...`` on stderr
and exit code 2, like click's own usage errors. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from .errors import FactoryError


class UserError(click.ClickException):
    exit_code = 2


class FactoryGroup(click.Group):
    """A click group that maps :class:`FactoryError` to exit code 2 for every subcommand."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except FactoryError as exc:
            raise UserError(str(exc)) from exc


def _echo_json(data) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True))


@click.group(cls=FactoryGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="peg-factory")
def cli() -> None:
    """peg-factory: condense a ViT into a PEG learngene and expand it into device-sized ViTs.

    \b
    Example:
      peg-factory learngene --ancestry demo --layers 3 --out out/learngene
      peg-factory expand --learngene out/learngene --depth 4 --embed-dim 96 --heads 2 --out out/d4.safetensors
      peg-factory flops --model out/d4.safetensors
    """


@cli.group(cls=FactoryGroup, invoke_without_command=True)
@click.option("--ancestry", default="demo", show_default=True,
              help="'demo', a timm name (pretrained), 'random:NAME', or CKPT@ARCH.")
@click.option("--layers", type=int, default=None, help="Gene layers L_b [default: half the ancestry's depth].")
@click.option("--heads", type=int, default=None, help="Gene heads H_b [default: the ancestry's].")
@click.option("--tau", type=float, default=1.0, show_default=True, help="Softmax temperature of the mixture.")
@click.option("--mixing", type=click.Choice(["softmax", "uniform", "identity"]), default="softmax", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Learngene directory to write.")
@click.pass_context
def learngene(ctx, ancestry, layers, heads, tau, mixing, seed, out) -> None:
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
    from .ancestry import load_ancestry
    from .learngene import sample_learngene

    anc = load_ancestry(ancestry)
    lg = sample_learngene(anc, max(1, anc.arch.depth // 2) if layers is None else layers, heads, tau=tau, seed=seed, mixing=mixing)
    digest = lg.save(out)
    summary = lg.meta["stats"]["summary"]
    click.echo(
        f"learngene {out}: {lg.num_layers} layers x {lg.num_heads} heads from {anc.spec} "
        f"({anc.arch.depth} layers, {anc.arch.num_heads} heads, weights={anc.weights}); "
        f"sha256 {digest[:12]}; weight std ratio {summary['mean_std_ratio']:.3f}, "
        f"relative W1 {summary['mean_w1_rel']:.3f}"
    )


def _shape_options(fn):
    options = [
        click.option("--depth", type=int, help="Descendant depth L_d."),
        click.option("--embed-dim", type=int, help="Descendant width D_d."),
        click.option("--heads", "num_heads", type=int, help="Descendant heads H_d."),
        click.option("--mlp-ratio", type=float, default=None, help="MLP hidden / width [default: ancestry's]."),
        click.option("--img-size", type=int, default=None, help="Input size [default: ancestry's]."),
        click.option("--patch-size", type=int, default=None, help="Patch size [default: ancestry's]."),
        click.option("--num-classes", type=int, default=None, help="Classes [default: ancestry's]."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _shape_from(arch, depth, embed_dim, num_heads, mlp_ratio, img_size, patch_size, num_classes):
    from .shapes import DescendantShape

    for name, value in (("--depth", depth), ("--embed-dim", embed_dim), ("--heads", num_heads)):
        if value is None:
            raise UserError(f"missing {name}")
    return DescendantShape(
        depth=depth,
        embed_dim=embed_dim,
        num_heads=num_heads,
        mlp_ratio=mlp_ratio if mlp_ratio is not None else arch.mlp_ratio,
        img_size=img_size or arch.img_size,
        patch_size=patch_size or arch.patch_size,
        num_classes=num_classes if num_classes is not None else arch.num_classes,
    )


@cli.command()
@click.option("--learngene", "learngene_dir", type=click.Path(path_type=Path), default=None,
              help="Learngene directory (needed for --method peg).")
@click.option("--ancestry", default=None, help="Ancestry spec (needed for tleg / weight_selection).")
@click.option("--method", type=click.Choice(["peg", "tleg", "weight_selection", "scratch"]), default="peg", show_default=True)
@click.option("--selection", type=click.Choice(["even", "importance"]), default="even", show_default=True,
              help="How heads/width/hidden units are chosen.")
@_shape_options
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Descendant .safetensors file.")
def expand(learngene_dir, ancestry, method, selection, depth, embed_dim, num_heads, mlp_ratio,
           img_size, patch_size, num_classes, seed, out) -> None:
    """Expand a learngene (or a baseline init) into a timm ViT descendant.

    \b
    Example:
      peg-factory expand --learngene out/learngene --depth 9 --embed-dim 192 --heads 3 --out out/d9.safetensors
      peg-factory expand --method tleg --ancestry demo --depth 4 --embed-dim 96 --heads 2 --out out/tleg.safetensors
    """
    from .ancestry import load_ancestry
    from .baselines import init_descendant
    from .checkpoint import save_descendant
    from .flops import count_params
    from .learngene import Learngene

    lg = Learngene.load(learngene_dir) if learngene_dir is not None else None
    anc = load_ancestry(ancestry) if ancestry is not None else None
    if method == "peg" and lg is None:
        raise UserError("--method peg needs --learngene DIR (create one with `peg-factory learngene`)")
    arch = lg.arch if lg is not None else anc.arch if anc is not None else None
    if arch is None:
        from .ancestry import DEMO_ARCH

        arch = DEMO_ARCH
    shape = _shape_from(arch, depth, embed_dim, num_heads, mlp_ratio, img_size, patch_size, num_classes)
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
    click.echo(f"descendant {out}: {shape.label()} by {method}, {count_params(model) / 1e6:.2f}M params, sha256 {digest[:12]}")


@cli.command()
@click.option("--model", "model_path", type=click.Path(path_type=Path), default=None,
              help="Descendant .safetensors (or any ancestry spec) to measure with fvcore.")
@_shape_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def flops(model_path, depth, embed_dim, num_heads, mlp_ratio, img_size, patch_size, num_classes, as_json) -> None:
    """FLOPs (multiply-adds, fvcore's convention) and parameters of a model or a shape.

    \b
    Example:
      peg-factory flops --model out/d9.safetensors
      peg-factory flops --depth 12 --embed-dim 384 --heads 6 --img-size 224 --patch-size 16 --num-classes 1000
    """
    from .ancestry import load_ancestry
    from .flops import count_flops, count_params
    from .shapes import STANDARD_ARCH, vit_flops, vit_params

    if model_path is not None:
        anc = load_ancestry(model_path if Path(model_path).exists() else str(model_path))
        shape, arch = anc.arch.shape(), anc.arch
        measured, params = count_flops(anc.model), count_params(anc.model)
    else:
        arch = STANDARD_ARCH
        shape = _shape_from(
            arch, depth, embed_dim, num_heads, mlp_ratio, img_size or 224, patch_size or 16,
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
        _echo_json(result)
        return
    line = f"{shape.label()}: {result['flops_closed_form'] / 1e9:.4f} GFLOPs (closed form)"
    if measured is not None:
        line += f", {measured / 1e9:.4f} GFLOPs (fvcore), {params / 1e6:.3f}M params"
    else:
        line += f", {result['params_closed_form'] / 1e6:.3f}M params"
    click.echo(line)


def main() -> None:
    cli(prog_name="peg-factory")


if __name__ == "__main__":
    main()
