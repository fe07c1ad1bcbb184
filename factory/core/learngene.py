"""The learngene: PEG's condensed ancestry, its sampling, and its on-disk format.

A learngene is a *stem* (patch embedding, class/register tokens, position embedding, norms and
the ancestry's classifier, copied) plus ``L_b`` *gene layers* with ``H_b`` heads each, ``1 <= L_b <= L_a`` and
``1 <= H_b <= H_a`` (:func:`check_gene_size`: a learngene condenses its ancestry; deeper or wider descendants
come from the expansion):

- Layer mixing. ``P = mixing_matrix(L_b, L_a)`` (``softmax``: ``softmax(Z / tau)``,
  ``Z ~ N(0, I)`` seeded; ``uniform``; ``identity`` = evenly spaced one-hot selection) and every
  block tensor is mixed along the layer axis, ``G = P . B`` -- qkv, proj, fc1, fc2, both norms and
  layer-scale gammas alike, weights and biases alike (PEG.md section 3).
- Head mixing. Per gene layer ``l``, ``Q_l = mixing_matrix(H_b, H_a)`` of the same kind; gene head
  ``h`` is ``sum_i Q_l[h, i]`` times ancestry head ``i``, where a head is its q, k, v rows and its
  proj columns (they move together). Head dim stays the ancestry's. Proj columns are not
  rescaled; with ``H_b < H_a`` the attention branch is therefore weaker until expansion or
  training compensates (documented choice; see :func:`factory.core.mixing.mix_heads`).
- Head mixing may be switched off (``head_mixing=False``): gene layer ``l`` then keeps ``H_b``
  evenly spaced heads of its mixture (one-hot ``Q_l``), so no head is blended with another.
- Variance-preserving rescale (``rescale="std"``, off with ``"none"``): after layer mixing, every
  gene tensor is recentred on its own mean and its spread scaled to the ``P``-weighted average
  spread of the ancestry layers it mixes (:func:`factory.core.mixing.rescale_like`); a convex mixture
  of weakly correlated layers otherwise shrinks the weights (~0.5x std at ``tau = 1``).
- Both draws come from one ``torch.Generator`` seeded with ``seed``: layer matrix first, then
  the head matrices, so the same ancestry, sizes, kind, tau and seed give a bit-identical learngene.

On disk, a learngene is a directory with ``learngene.safetensors`` (tensors ``stem.*``,
``gene.*``, ``mix.layer``, ``mix.head``, ``depth_map.<L_d>.*``) and ``learngene.json`` (format
version, ancestry identity and hash, arch, sizes, seed, tau, mixing kind, the mixing matrices,
the safetensors file's sha256, and the weight-distribution report of :mod:`factory.core.stats`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from factory._version import __version__
from factory.core.ancestry import Ancestry, load_ancestry
from factory.core.mixing import MIXING_KINDS, DepthMap, mix_heads, mix_layers, mixing_matrix, rescale_like
from factory.core.shapes import ArchConfig
from factory.core.stats import distribution_report, summarize
from factory.errors import FactoryError
from factory.io import owned_directory, sha256_bytes

FORMAT_VERSION = 1
TENSOR_FILE = "learngene.safetensors"
META_FILE = "learngene.json"
RESCALES: tuple[str, ...] = ("none", "std")


def meta_digest(meta: dict) -> str:
    """The sha256 of ``learngene.json``'s content less its own ``meta_sha256`` (canonical JSON, sorted keys)."""
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return sha256_bytes(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


@dataclass
class Learngene:
    """Stem + gene layers + mixing provenance (+ optional trained depth maps per depth)."""

    arch: ArchConfig
    stem: dict[str, torch.Tensor]
    genes: dict[str, torch.Tensor]
    num_heads: int
    layer_mixing: torch.Tensor
    head_mixing: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)
    depth_maps: dict[int, DepthMap] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return int(next(iter(self.genes.values())).shape[0])

    def depth_map(self, depth: int) -> DepthMap:
        """The trained map for ``depth`` if the learngene has one, else the interpolating init."""
        if depth in self.depth_maps:
            return self.depth_maps[depth]
        return DepthMap(self.num_layers, depth)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {f"stem.{k}": v for k, v in self.stem.items()}
        out.update({f"gene.{k}": v for k, v in self.genes.items()})
        out["mix.layer"] = self.layer_mixing
        out["mix.head"] = self.head_mixing
        for depth, dm in sorted(self.depth_maps.items()):
            for k, v in dm.state_dict().items():
                out[f"depth_map.{depth}.{k}"] = v
        return {k: v.detach().cpu().contiguous() for k, v in out.items()}

    def save(self, directory: str | Path, extra_files: dict[str, bytes] | None = None) -> str:
        """Write the learngene directory atomically (plus ``extra_files``, e.g. a training log);
        returns the tensor file's sha256."""
        from safetensors.torch import save

        data = save(self.tensors())
        digest = sha256_bytes(data)
        meta = dict(self.meta)
        meta.update(
            format_version=FORMAT_VERSION,
            peg_factory_version=__version__,
            arch=self.arch.to_dict(),
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            depth_maps=sorted(self.depth_maps),
            tensors_sha256=digest,
            layer_mixing=self.layer_mixing.tolist(),
            head_mixing=self.head_mixing.tolist(),
            shapes={k: list(v.shape) for k, v in self.tensors().items()},
        )
        meta.pop("meta_sha256", None)
        meta["meta_sha256"] = meta_digest(meta)  # learngene.json is under a hash too: an edited block is refused
        with owned_directory(directory, writer="learngene") as tmp:
            (tmp / TENSOR_FILE).write_bytes(data)
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
            for name, content in (extra_files or {}).items():
                (tmp / name).write_bytes(content)
        self.meta = meta
        return digest

    @property
    def sha256(self) -> str | None:
        return self.meta.get("tensors_sha256")

    @classmethod
    def load(cls, directory: str | Path) -> Learngene:
        """Read a learngene directory, verifying its hash; one-line errors on any damage."""
        from safetensors.torch import load

        directory = Path(directory)
        meta_path, tensor_path = directory / META_FILE, directory / TENSOR_FILE
        for p in (meta_path, tensor_path):
            if not p.is_file():
                raise FactoryError(
                    f"{p} not found; {directory} is not a learngene directory "
                    "(create one with `peg-factory learngene --out DIR`)"
                )
        try:
            meta = json.loads(meta_path.read_text())
            arch = ArchConfig.from_dict(meta["arch"])
            num_heads = int(meta["num_heads"])
            expected = meta["tensors_sha256"]
        except (ValueError, KeyError, TypeError) as exc:
            raise FactoryError(
                f"{meta_path} is corrupted ({type(exc).__name__}: {exc}); re-create the learngene"
            ) from exc
        if not isinstance(meta, dict) or meta.get("meta_sha256") != meta_digest(meta):
            raise FactoryError(
                f"{meta_path} was edited or damaged since it was written (its meta_sha256 does not match its "
                "content); re-create the learngene"
            )
        if meta.get("format_version") != FORMAT_VERSION:
            raise FactoryError(
                f"{meta_path} has format version {meta.get('format_version')!r}, this peg-factory "
                f"reads {FORMAT_VERSION}; re-create the learngene"
            )
        data = tensor_path.read_bytes()
        if sha256_bytes(data) != expected:
            raise FactoryError(
                f"{tensor_path} is corrupted or truncated (sha256 does not match {meta_path.name}); "
                "re-create the learngene"
            )
        try:
            tensors = load(data)
        except Exception as exc:  # noqa: BLE001 - hash matched, so this is a format mismatch
            raise FactoryError(f"{tensor_path} is not a readable safetensors file: {exc}") from exc
        stem = {k[5:]: v for k, v in tensors.items() if k.startswith("stem.")}
        genes = {k[5:]: v for k, v in tensors.items() if k.startswith("gene.")}
        maps: dict[int, DepthMap] = {}
        for depth in meta.get("depth_maps", []):
            prefix = f"depth_map.{depth}."
            sd = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            dm = DepthMap(
                int(sd["w1"].shape[1]), int(depth), extra_hidden=int(sd["w1"].shape[0]) - 2 * int(sd["w1"].shape[1])
            )
            dm.load_state_dict(sd)
            maps[int(depth)] = dm
        return cls(arch, stem, genes, num_heads, tensors["mix.layer"], tensors["mix.head"], meta, maps)


def check_gene_size(
    layers: int | None, heads: int | None, arch: ArchConfig, params: tuple[str, str] | None = None
) -> None:
    """One line unless ``1 <= layers <= arch.depth`` and ``1 <= heads <= arch.num_heads``: a learngene condenses
    its ancestry (PEG's ``L_b <= L_a``, ``H_b <= H_a``). More gene layers, or heads, than the ones they mix hold no
    more of the ancestry, only more weights (999 heads of the 3-head demo: a 379-MB "learngene"), and are mostly a
    typo; deeper or wider descendants come from the expansion. ``None``: not given (a build's defaults, half the
    depth and the ancestry's heads, are within). ``params``: the API arguments named in the error (layers',
    heads')."""
    for value, most, what, param in (
        (layers, arch.depth, "layers", params[0] if params else None),
        (heads, arch.num_heads, "heads", params[1] if params else None),
    ):
        if value is None:
            continue
        if value < 1:
            raise FactoryError(f"learngene {what} must be >= 1, got {value}", param=param)
        if value > most:
            raise FactoryError(
                f"learngene {what} {value} exceed the ancestry's {most}: a learngene condenses its ancestry "
                f"(PEG's L_b <= L_a, H_b <= H_a); give at most {most}",
                param=param,
            )


def sample_learngene(
    ancestry: Ancestry | torch.nn.Module | str,
    layers: int,
    heads: int | None = None,
    *,
    tau: float = 1.0,
    seed: int = 0,
    mixing: str = "softmax",
    head_mixing: bool = True,
    rescale: str = "none",
    report: bool = True,
) -> Learngene:
    """Sample a learngene of ``layers`` gene layers with ``heads`` heads (default: ancestry's).

    Formulas in the module docstring. ``report`` adds the weight-distribution comparison
    (:func:`factory.core.stats.distribution_report`) to ``meta["stats"]``.
    """
    anc = load_ancestry(ancestry)
    arch = anc.arch
    heads = arch.num_heads if heads is None else heads
    if mixing not in MIXING_KINDS:
        raise FactoryError(f"unknown mixing {mixing!r}; choose one of {', '.join(MIXING_KINDS)}")
    if rescale not in RESCALES:
        raise FactoryError(f"unknown rescale {rescale!r}; choose one of {', '.join(RESCALES)}")
    check_gene_size(layers, heads, arch, params=("layers", "heads"))
    with torch.no_grad():
        stem, blocks = anc.layers()
        gen = torch.Generator().manual_seed(seed)
        p = mixing_matrix(layers, arch.depth, mixing, tau=tau, generator=gen)
        if head_mixing:
            q = mixing_matrix(heads, arch.num_heads, mixing, tau=tau, generator=gen, batch=(layers,))
        else:  # whole heads kept (check_gene_size: no more than the ancestry has)
            q = mixing_matrix(heads, arch.num_heads, "identity", batch=(layers,))
        genes = {name: mix_layers(p, t) for name, t in blocks.items()}
        if rescale == "std":
            genes = {name: rescale_like(g, blocks[name], p) for name, g in genes.items()}
        genes = mix_heads(genes, q, arch.head_dim)
    meta: dict[str, Any] = {
        "ancestry": anc.identity(),
        "seed": seed,
        "tau": tau,
        "mixing": mixing,
        "heads_mixed": head_mixing,
        "rescale": rescale,
    }
    if report:
        dist = distribution_report(blocks, genes, seed=seed)
        meta["stats"] = {"summary": summarize(dist), "per_tensor": dist}
    return Learngene(arch, stem, genes, heads, p, q, meta)
