"""How close two sets of weights are as distributions (checking PEG's central claim).

For each tensor name we compare all ancestry layers' values ``a`` with all gene layers' values
``g`` by mean, standard deviation and the 1-D Wasserstein-1 distance between their empirical
distributions, ``W1 = integral_0^1 |F_a^-1(u) - F_g^-1(u)| du``, estimated on ``quantiles``
evenly spaced levels and reported relative to ``std(a)`` so tensors of different scale compare.
Large tensors are subsampled (seeded) to ``max_values`` entries first.
"""

from __future__ import annotations

import torch


def _sample(t: torch.Tensor, max_values: int, generator: torch.Generator) -> torch.Tensor:
    flat = t.detach().reshape(-1).float()
    if flat.numel() > max_values:
        flat = flat[torch.randint(flat.numel(), (max_values,), generator=generator)]
    return flat


def wasserstein1(a: torch.Tensor, b: torch.Tensor, quantiles: int = 1001) -> float:
    """W1 between the empirical distributions of ``a`` and ``b`` (1-D, via quantile functions)."""
    levels = torch.linspace(0.0, 1.0, quantiles)
    qa = torch.quantile(a.float(), levels)
    qb = torch.quantile(b.float(), levels)
    return float((qa - qb).abs().mean())


def distribution_report(
    reference: dict[str, torch.Tensor],
    candidate: dict[str, torch.Tensor],
    *,
    max_values: int = 1 << 20,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Per shared tensor name: means, stds, std ratio and relative W1 (see module doc)."""
    gen = torch.Generator().manual_seed(seed)
    report: dict[str, dict[str, float]] = {}
    for name in sorted(set(reference) & set(candidate)):
        a = _sample(reference[name], max_values, gen)
        g = _sample(candidate[name], max_values, gen)
        a_std, g_std = float(a.std()), float(g.std())
        report[name] = {
            "ancestry_mean": float(a.mean()),
            "ancestry_std": a_std,
            "gene_mean": float(g.mean()),
            "gene_std": g_std,
            "std_ratio": g_std / a_std if a_std > 0 else float("nan"),
            "w1_rel": wasserstein1(a, g) / a_std if a_std > 0 else float("nan"),
        }
    return report


def summarize(report: dict[str, dict[str, float]]) -> dict[str, float]:
    """Mean ``w1_rel`` and ``std_ratio`` over tensors (NaNs skipped)."""

    def mean(key: str) -> float:
        vals = [r[key] for r in report.values() if r[key] == r[key]]
        return sum(vals) / len(vals) if vals else float("nan")

    return {"mean_w1_rel": mean("w1_rel"), "mean_std_ratio": mean("std_ratio")}
