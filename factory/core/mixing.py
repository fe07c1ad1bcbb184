"""Pure tensor math of PEG: mixing matrices, interpolation, head mixing, the depth map.

Everything here is a function of its arguments (randomness only through an explicit seed or
``torch.Generator``), differentiable where it takes tensors, and free of I/O.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from factory.errors import FactoryError

MixingKind = Literal["softmax", "uniform", "identity"]
MIXING_KINDS: tuple[str, ...] = ("softmax", "uniform", "identity")


def evenly_spaced(n_out: int, n_in: int) -> torch.Tensor:
    """``n_out`` indices spread evenly over ``range(n_in)``, ends included.

    ``idx[i] = round(i * (n_in - 1) / (n_out - 1))`` (ties round up), computed in integers so
    ``n_out == n_in`` gives exactly ``0..n_in-1``; ``n_out == 1`` gives the middle index
    ``(n_in - 1) // 2``. For ``n_out <= n_in`` the indices are distinct and increasing.
    """
    if n_out < 1 or n_in < 1:
        raise FactoryError(f"cannot pick {n_out} of {n_in} indices")
    if n_out == 1:
        return torch.tensor([(n_in - 1) // 2])
    den = n_out - 1
    return torch.tensor([(2 * i * (n_in - 1) + den) // (2 * den) for i in range(n_out)])


def interpolation_matrix(n_out: int, n_in: int) -> torch.Tensor:
    """Linear interpolation over relative position, shape ``(n_out, n_in)``, rows convex.

    Output unit ``j`` sits at ``x_j = j * (n_in - 1) / (n_out - 1)`` on the input axis
    (``x = (n_in - 1) / 2`` when ``n_out == 1``) and takes ``(1 - f)`` of input ``floor(x_j)``
    and ``f`` of ``floor(x_j) + 1``. Exact identity when ``n_out == n_in``.
    """
    if n_out < 1 or n_in < 1:
        raise FactoryError(f"cannot interpolate {n_in} units to {n_out}")
    mat = torch.zeros(n_out, n_in)
    num_scale, den = (n_in - 1, n_out - 1) if n_out > 1 else (n_in - 1, 2)
    for j in range(n_out):
        num = (j if n_out > 1 else 1) * num_scale
        lo, rem = divmod(num, den)
        frac = rem / den
        mat[j, lo] += 1.0 - frac
        if rem:
            mat[j, lo + 1] += frac
    return mat


def mixing_matrix(
    n_out: int,
    n_in: int,
    kind: str = "softmax",
    *,
    tau: float = 1.0,
    generator: torch.Generator | None = None,
    batch: tuple[int, ...] = (),
) -> torch.Tensor:
    """A row-stochastic mixing matrix of shape ``(*batch, n_out, n_in)``.

    - ``softmax``: ``P = softmax(Z / tau)`` along rows with ``Z ~ N(0, 1)`` drawn from
      ``generator`` (PEG's "Gaussian" mixture); ``tau -> inf`` tends to ``uniform``.
    - ``uniform``: every entry ``1 / n_in`` (each output is the mean of the inputs).
    - ``identity``: one-hot rows at :func:`evenly_spaced` indices, i.e. plain selection;
      the identity matrix when ``n_out == n_in``.
    """
    if kind == "softmax":
        if not tau > 0:
            raise FactoryError(f"mixing temperature tau must be > 0, got {tau}")
        z = torch.randn(*batch, n_out, n_in, generator=generator)
        return torch.softmax(z / tau, dim=-1)
    if kind == "uniform":
        return torch.full((*batch, n_out, n_in), 1.0 / n_in)
    if kind == "identity":
        eye = torch.zeros(n_out, n_in)
        eye[torch.arange(n_out), evenly_spaced(n_out, n_in)] = 1.0
        return eye.expand(*batch, n_out, n_in).clone()
    raise FactoryError(f"unknown mixing {kind!r}; choose one of {', '.join(MIXING_KINDS)}")


def mix_layers(mixing: torch.Tensor, stack: torch.Tensor) -> torch.Tensor:
    """``G = P . B`` along the layer axis: ``(L_out, L_in) x (L_in, *S) -> (L_out, *S)``."""
    return torch.tensordot(mixing, stack, dims=([1], [0]))


def rescale_like(mixed: torch.Tensor, stack: torch.Tensor, mixing: torch.Tensor) -> torch.Tensor:
    """Variance-preserving rescale of a layer mixture ``mixed = P . stack`` (``P: (L_out, L_in)``).

    A convex mixture of layers that are not perfectly correlated has a smaller spread than its
    inputs (independent layers: ``var(sum_i p_i B_i) = sum_i p_i^2 var(B_i)``). For every output
    layer ``l`` this restores the spread the mixed layers had on average, around the mixture's
    own mean:

        G_l <- m_l + (G_l - m_l) * sqrt(sum_i P_li * var(B_i)) / std(G_l),   m_l = mean(G_l)

    with mean/var/std taken over all elements of the tensor. A mixture that is a selection
    (one-hot rows) is returned unchanged up to float rounding; constant tensors are left alone.
    """
    flat_in = stack.reshape(stack.shape[0], -1)
    target = torch.sqrt(mixing.to(flat_in.dtype) @ flat_in.var(dim=1, unbiased=False))
    flat = mixed.reshape(mixed.shape[0], -1)
    mean = flat.mean(dim=1, keepdim=True)
    std = flat.std(dim=1, unbiased=False, keepdim=True)
    scale = torch.where(std > 0, target[:, None] / std.clamp_min(1e-30), torch.ones_like(std))
    return (mean + (flat - mean) * scale).reshape(mixed.shape)


def mix_heads(
    blocks: dict[str, torch.Tensor],
    mixing: torch.Tensor,
    head_dim: int,
    *,
    proj_scale: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Mix attention heads of stacked blocks with per-layer matrices ``mixing: (L, H_out, H_in)``.

    New head ``o`` of layer ``l`` is ``sum_h mixing[l, o, h] * head_h`` where a head is its q, k
    and v rows of ``attn.qkv`` (weight and bias) and its columns of ``attn.proj.weight``; the proj
    columns are further multiplied by ``proj_scale``. A permutation matrix therefore permutes
    heads and leaves each block's function unchanged. Other tensors pass through.
    """
    out = dict(blocks)
    n_layers, h_out, h_in = mixing.shape
    mixing = mixing.to(blocks["attn.qkv.weight"].dtype)
    w = blocks["attn.qkv.weight"]  # (L, 3*H*hd, D)
    w = w.reshape(n_layers, 3, h_in, head_dim, w.shape[-1])
    out["attn.qkv.weight"] = torch.einsum("loh,lthed->ltoed", mixing, w).reshape(n_layers, 3 * h_out * head_dim, -1)
    if "attn.qkv.bias" in blocks:
        b = blocks["attn.qkv.bias"].reshape(n_layers, 3, h_in, head_dim)
        out["attn.qkv.bias"] = torch.einsum("loh,lthe->ltoe", mixing, b).reshape(n_layers, -1)
    p = blocks["attn.proj.weight"]  # (L, D, H*hd)
    p = p.reshape(n_layers, p.shape[1], h_in, head_dim)
    out["attn.proj.weight"] = torch.einsum("loh,ldhe->ldoe", mixing, p).reshape(n_layers, p.shape[1], -1) * proj_scale
    return out


class DepthMap(nn.Module):
    """PEG's non-linear layer-axis map, applied element-wise to every stacked tensor.

    ``theta_d[:, e] = W2 . ReLU(W1 . theta_b[:, e] + b1) + b2`` with ``W1: (K, L_in)``,
    ``W2: (L_out, K)``, ``K = 2 * L_in + extra_hidden``.

    Initialisation (deterministic, no training needed): ``W1 = [I; -I; R]``, ``b1 = 0``,
    ``W2 = [A, -A, 0]``, ``b2 = 0`` where ``A`` is :func:`interpolation_matrix` ``(L_out, L_in)``
    and ``R`` are small random rows (seeded) for the optional extra units. Since
    ``x = ReLU(x) - ReLU(-x)``, the map starts as exactly ``theta_d = A . theta_b``: linear
    interpolation between gene layers over relative depth. The reference code's map has
    ``K = L_out`` and random untrained weights; we choose ``K >= 2 * L_in`` so the interpolating
    start is representable, and the expanding phase (training) may move it anywhere.
    """

    def __init__(self, l_in: int, l_out: int, *, extra_hidden: int = 0, seed: int = 0):
        super().__init__()
        if l_in < 1 or l_out < 1 or extra_hidden < 0:
            raise FactoryError(f"invalid depth map {l_in} -> {l_out} (extra_hidden={extra_hidden})")
        self.l_in, self.l_out = l_in, l_out
        a = interpolation_matrix(l_out, l_in)
        eye = torch.eye(l_in)
        gen = torch.Generator().manual_seed(seed)
        extra = torch.randn(extra_hidden, l_in, generator=gen) * 0.01
        self.w1 = nn.Parameter(torch.cat([eye, -eye, extra]))
        self.b1 = nn.Parameter(torch.zeros(2 * l_in + extra_hidden))
        self.w2 = nn.Parameter(torch.cat([a, -a, torch.zeros(l_out, extra_hidden)], dim=1))
        self.b2 = nn.Parameter(torch.zeros(l_out))

    def forward(self, stack: torch.Tensor) -> torch.Tensor:
        if stack.shape[0] != self.l_in:
            raise FactoryError(f"depth map expects {self.l_in} layers, got {stack.shape[0]}")
        x = stack.reshape(self.l_in, -1)
        w1, b1, w2, b2 = (t.to(x.dtype) for t in (self.w1, self.b1, self.w2, self.b2))
        h = torch.relu(torch.addmm(b1[:, None], w1, x))
        y = torch.addmm(b2[:, None], w2, h)
        return y.reshape(self.l_out, *stack.shape[1:])
