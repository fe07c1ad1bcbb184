"""How often *can* a shape chooser land within one SE of the best shape? The noise ceiling of issue 31's criterion.

Issue 31 item 2 scores a chooser per (initialisation, steps, task, profile) cell: the chosen shape's test
accuracy within one binomial standard error ``sqrt(p (1 - p) / n)`` of the best candidate's ``p`` after the
real fine-tune, *one seed*. That best candidate (the oracle) is the maximum of ~8 noisy numbers: a fine-tune's
seed moves a shape's test accuracy too. This bench reads two or more ``bench/search_quality.py`` runs of the same
settings at different seeds (``--first-seed``) and separates the chooser's error from that noise.

Per (init, steps), over the cells measured at two or more seeds:

- **seed noise** ``s``: per task, the standard deviation of a shape's accuracy between seeds,
  ``sd(a_seed0 - a_seed1) / sqrt(2)`` pooled over every shape of every profile (around the differences' mean:
  a shift common to every shape changes no ranking);
- **shipped**: the estimator's choice within one SE of its own seed's oracle (the issue's criterion), per seed;
- **capacity**: the same for the capacity proxy's choice (no probes);
- **the other seed's oracle**: the shape that ended best at another seed, scored at this one -- a chooser that
  knew a whole fine-tune of every candidate, one seed early;
- **perfect chooser (simulated)**: one that knows each shape's *expected* accuracy, taken as its mean over the
  seeds: draw each shape's accuracy ``mu + N(0, s^2)`` (capped at 1), score the expected-best shape against the
  draw's maximum by the criterion, ``draws`` times (seeded) -- the criterion's ceiling for any chooser (a
  generous one: the seed means still carry half the noise's variance, which spreads the shapes apart);
- **seed-averaged**: the chosen shapes' mean accuracy over the seeds within one SE (``n`` = seeds x test
  images) of the best seed-averaged shape (the criterion on what a chooser can be asked to predict).

Usage:
    python bench/selection_ceiling.py --runs A_seed0.json A_seed1.json B_seed0.json B_seed1.json \\
        --json bench/out/selection_ceiling.json --md bench/out/selection_ceiling.md
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
from pathlib import Path

from common import within_one_se as within
from common import write_outputs

OTHER = "other seed's oracle"


def cells(paths: list[Path]) -> dict[tuple, dict[int, dict]]:
    """``(init, steps, task, profile) -> {seed: row}`` from search_quality runs."""
    out: dict[tuple, dict[int, dict]] = {}
    for path in paths:
        data = json.loads(Path(path).read_text())
        a = data["args"]
        for r in data["rows"]:
            key = (a.get("init", "peg"), a["steps"], r["task"], r["profile"])
            out.setdefault(key, {})[r["seed"]] = r
    return out


def seed_noise(groups: list[dict[int, dict]]) -> float:
    """``sd(a_i - a_j) / sqrt(2)`` over every shape measured at the first two seeds of each group."""
    diffs = []
    for seeds in groups:
        a, b = (seeds[s]["measured"] for s in sorted(seeds)[:2])
        diffs += [a[k] - b[k] for k in a if k in b]
    return statistics.pstdev(diffs) / math.sqrt(2) if len(diffs) > 1 else float("nan")


def perfect_rate(means: dict[str, float], noise: float, n: int, draws: int, rng: random.Random) -> float:
    """The share of ``draws`` in which the expected-best shape lands within one SE of the draw's best."""
    best = max(means, key=means.get)
    hits = 0
    for _ in range(draws):
        draw = {k: min(1.0, mu + rng.gauss(0.0, noise)) for k, mu in means.items()}
        hits += within(max(draw.values()), draw[best], n)
    return hits / draws


def analyse(paths: list[Path], draws: int = 2000, seed: int = 0) -> dict:
    groups = {k: v for k, v in cells(paths).items() if len(v) >= 2}
    rng = random.Random(seed)
    out = []
    for init, steps in sorted({k[:2] for k in groups}, key=str):
        mine = {k: v for k, v in groups.items() if k[:2] == (init, steps)}
        noise = {t: seed_noise([v for k, v in mine.items() if k[2] == t]) for t in sorted({k[2] for k in mine})}
        tally = {"shipped": 0, "capacity": 0, OTHER: 0, "seed-averaged shipped": 0}
        perfect, scored, pairs = [], 0, 0
        for (_, _, task, _), seeds in sorted(mine.items()):
            rows = [seeds[s] for s in sorted(seeds)]
            common = sorted(set.intersection(*(set(r["measured"]) for r in rows)))  # sorted: ties break the same way
            n = next((r["test_images"] for r in rows if "test_images" in r), None)  # older runs lack it
            if n is None:
                raise SystemExit(f"no run of {init}/{steps}/{task} records test_images: rerun search_quality for it")
            for r in rows:
                m, others = r["measured"], [o for o in rows if o is not r]
                tally["shipped"] += within(r["oracle_acc"], r["chosen_acc"], n)
                tally["capacity"] += within(r["oracle_acc"], r["capacity_acc"], n)
                rival = max(common, key=lambda k: statistics.mean(o["measured"][k] for o in others))
                tally[OTHER] += within(r["oracle_acc"], m[rival], n)
                scored += 1
            means = {k: statistics.mean(r["measured"][k] for r in rows) for k in common}
            chosen = statistics.mean(means.get(r["chosen"], r["chosen_acc"]) for r in rows)
            tally["seed-averaged shipped"] += within(max(means.values()), chosen, n * len(rows))
            perfect.append(perfect_rate(means, noise[task], n, draws, rng))
            pairs += 1
        out.append(
            {
                "init": init,
                "steps": steps,
                "cells": scored,
                "pairs": pairs,
                "seeds": sorted({s for v in mine.values() for s in v}),
                "seed_noise_pt": {t: round(100 * s, 2) for t, s in noise.items()},
                "within_one_se": tally,
                "perfect_chooser_rate": round(statistics.mean(perfect), 3),
            }
        )
    return {"runs": [str(p) for p in paths], "draws": draws, "rows": out}


def table(data: dict) -> str:
    lines = [
        "| init | steps | cells | seed noise (pt) | shipped | capacity | other seed's oracle | perfect chooser "
        "(simulated) | seed-averaged: shipped |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        t, c = r["within_one_se"], r["cells"]
        noise = ", ".join(f"{k} {v:.1f}" for k, v in r["seed_noise_pt"].items())
        lines.append(
            f"| {r['init']} | {r['steps']} | {c} | {noise} | {t['shipped']}/{c} | {t['capacity']}/{c} | "
            f"{t[OTHER]}/{c} | {100 * r['perfect_chooser_rate']:.0f}% | "
            f"{t['seed-averaged shipped']}/{r['pairs']} |"
        )
    total = {k: sum(r["within_one_se"][k] for r in data["rows"]) for k in ("shipped", "capacity")}
    cells_n = sum(r["cells"] for r in data["rows"])
    if cells_n:
        perfect = statistics.mean(r["perfect_chooser_rate"] for r in data["rows"])
        lines += [
            "",
            f"Within one SE of the same seed's oracle: shipped {total['shipped']}/{cells_n}, capacity "
            f"{total['capacity']}/{cells_n}; a perfect chooser (expected accuracies known) {100 * perfect:.0f}% "
            f"({data['draws']} simulated draws per pair).",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, nargs="+", required=True, help="search_quality --json files")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--md", type=Path, default=None)
    parser.add_argument("--draws", type=int, default=2000, help="simulated draws per (profile, task) pair")
    args = parser.parse_args()
    missing = [p for p in args.runs if not p.is_file()]
    if missing:
        parser.error(f"{missing[0]}: no such file; pass the --json of search_quality runs")
    data = analyse(args.runs, args.draws)
    if not data["rows"]:
        parser.error("no (init, steps, task, profile) cell was measured at two seeds: pass runs of other --first-seed")
    write_outputs(data, table(data), args.json, args.md)


if __name__ == "__main__":
    main()
