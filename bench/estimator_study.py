"""Which few-step probe predicts a shape's accuracy after the build's fine-tune? (issue 10)

For every (task, seed) of a ``search_quality.py`` JSON, each shape of its candidate pools is
initialised from the shipped learngene exactly as the build does and probed in two ways, all
measured on the task's full validation split (top-1 accuracy and the mean negative log-likelihood,
NLL, which has a far lower variance than accuracy on a few hundred images):

- ``const``: the build's learning rate after a 2-step warm-up, held constant, with validation after
  3, 6, 12 and 24 steps -- the rungs of successive halving, which continues the survivors' training;
- ``cosine-k``: the build's recipe compressed to ``k`` steps (k = 6, 12; the shipped estimator is
  ``cosine-6`` scored by accuracy on 256 images).

The probes' records are joined offline with the test accuracies the search_quality run measured
after the full fine-tune, to compare estimators by the shapes they would choose.

The table: for each estimator, the shapes it would choose among each row's candidates (ties to the
capacity proxy's choice), scored like ``search_quality.py`` -- gain over the capacity proxy's choice,
gap to the per-seed oracle, gap to the best seed-averaged shape -- with the Spearman correlation of
its scores and its cost in units of one fine-tune of the chosen shape (that shape's 100-step time
extrapolated from its longest ``const`` probe, same threads). ``halving a/b/c`` simulates successive
halving on the recorded ``const`` probes (8 -> 4 -> 2 candidates, by NLL); ``halving 3/6/12`` is
what ``--objective accuracy`` runs.

Usage:
    python bench/estimator_study.py --from bench/out/search_quality.json --json bench/out/estimator_study.json \
        --md bench/out/estimator_study.md --rungs 3 6 12 24 48 --cosine 6 12 25
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import re
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from common import write_outputs

from factory import init_descendant, load_ancestry
from factory.core.demo import load_demo_learngene
from factory.core.shapes import DescendantShape
from factory.data import load_dataset
from factory.device.accuracy import SuccessiveHalving
from factory.pipeline.config import BuildConfig, finetune_recipe
from factory.training.train import evaluate_nll, train


def val_metrics(model, data, per_image: dict | None = None, key: str = "") -> tuple[float, float]:
    """(accuracy, mean NLL) on ``data``; the NLL of each image goes to ``per_image[key]`` if given."""
    acc, nll = evaluate_nll(model, data)
    if per_image is not None:
        per_image[key] = [round(float(v), 4) for v in nll]
    return acc, float(nll.mean())


def probe(anc, lg, ds, shape, recipe, rungs, cosine, cool=()) -> dict:
    out: dict[str, Any] = {}
    per_image: dict[str, list[float]] = {}
    model = init_descendant("peg", shape, ancestry=anc, learngene=lg, seed=recipe.seed)
    out["init"] = val_metrics(model, ds.val)
    shipped = SuccessiveHalving(anc, lg, ds, recipe)  # the estimator's own probe recipes (constant and annealed)
    spent, carry = 0.0, {}
    for k in rungs:
        t0 = time.perf_counter()
        train(model, ds.train, shipped.probe_recipe(k), progress=False, carry=carry)
        spent += time.perf_counter() - t0
        out[f"const-{k}"] = (*val_metrics(model, ds.val, per_image, f"const-{k}"), round(spent, 2))
        if k in cool:  # branch: from the constant-LR state at k, cosine cool-down to min_lr over k more steps
            branch, branch_carry = copy.deepcopy(model), copy.deepcopy(carry)
            t1 = time.perf_counter()
            train(branch, ds.train, shipped.probe_recipe(2 * k, cool_from=k), progress=False, carry=branch_carry)
            out[f"cool-{k}"] = (
                *val_metrics(branch, ds.val, per_image, f"cool-{k}"),
                round(spent + time.perf_counter() - t1, 2),
            )
    for k in cosine:
        model = init_descendant("peg", shape, ancestry=anc, learngene=lg, seed=recipe.seed)
        t0 = time.perf_counter()
        warm = max(1, round(recipe.warmup_steps * k / recipe.steps))
        train(model, ds.train, dataclasses.replace(recipe, steps=k, warmup_steps=warm, ckpt_every=0), progress=False)
        out[f"cosine-{k}"] = (*val_metrics(model, ds.val), round(time.perf_counter() - t0, 2))
    out["nll_per_image"] = per_image
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="source", type=Path, required=True)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--rungs", type=int, nargs="+", default=[3, 6, 12, 24])
    parser.add_argument("--cosine", type=int, nargs="*", default=[6, 12])
    parser.add_argument(
        "--cool",
        type=int,
        nargs="*",
        default=[],
        help="rungs whose constant-LR state is also cooled down (cosine to min_lr) over as many steps again",
    )
    parser.add_argument("--md", type=Path, default=None)
    parser.add_argument(
        "--analyse",
        type=Path,
        default=None,
        metavar="STUDY_JSON",
        help="only re-analyse the probes of an earlier run's JSON against --from",
    )
    args = parser.parse_args()
    source = json.loads(args.source.read_text())
    if args.analyse:
        data = json.loads(args.analyse.read_text())
        write_outputs(data, analyse(source, data), args.json, args.md)
        return
    anc = load_ancestry("demo")
    lg = load_demo_learngene(anc)
    pools: dict[tuple[str, int], set[str]] = {}
    for r in source["rows"]:
        pools.setdefault((r["task"], r["seed"]), set()).update(r["measured"])
    probes = {}
    start = time.perf_counter()
    for (task, seed), labels in sorted(pools.items()):
        ds = load_dataset(task, img_size=anc.arch.img_size, in_chans=anc.arch.in_chans)
        recipe = finetune_recipe(
            BuildConfig(data=task, seed=seed, device="cpu", finetune_steps=source["args"]["steps"])
        )
        for label in sorted(labels):
            d, w, h, r, i, p = re.fullmatch(r"d(\d+)-w(\d+)-h(\d+)-r([\d.]+)-i(\d+)-p(\d+)", label).groups()
            shape = DescendantShape(int(d), int(w), int(h), float(r), int(i), int(p), num_classes=ds.num_classes)
            res = probe(anc, lg, ds, shape, recipe, args.rungs, args.cosine, args.cool)
            probes[f"{task}|{seed}|{label}"] = res
            print(
                task,
                seed,
                label,
                {k: tuple(round(x, 3) for x in v) for k, v in res.items() if k != "nll_per_image"},
                flush=True,
            )
    data = {
        "source": str(args.source),
        "rungs": args.rungs,
        "cosine": args.cosine,
        "cool": args.cool,
        "probes": probes,
        "wall_seconds": round(time.perf_counter() - start, 1),
        "threads": torch.get_num_threads(),
    }
    write_outputs(data, analyse(source, data), args.json, args.md)


def spearman(a: list[float], b: list[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def successive_halving(
    scores: dict[str, dict], cands: list[str], rungs: list[str], key: int
) -> tuple[str, float, dict]:
    """Simulate successive halving on recorded probes (``rungs``: the probe key of each rung, e.g.
    ``const-3``): every candidate to the first rung, the better half by ``key`` (0 accuracy, 1 NLL)
    continues to the next, ... ; returns (chosen, probe seconds, the score each candidate ended with)."""
    alive, cost, final = list(cands), 0.0, {}
    for i, k in enumerate(rungs):
        for c in alive:
            final[c] = scores[c][k]
        if i + 1 < len(rungs):
            order = sorted(alive, key=lambda c: final[c][1] if key else -final[c][0])
            alive = order[: max(1, math.ceil(len(alive) / 2))]
    cost = sum(final[c][2] for c in final)
    best = min(alive, key=lambda c: final[c][1]) if key else max(alive, key=lambda c: final[c][0])
    return best, cost, {c: (-v[1] if key else v[0]) for c, v in final.items()}


def anchored_halving(
    scores: dict[str, dict], cands: list[str], incumbent: str, rungs: list[str], z: float
) -> tuple[str, float, dict]:
    """Successive halving in which the capacity choice (the incumbent) always goes on; at the last
    rung the best challenger replaces it only if its per-image NLL is lower by more than ``z``
    standard errors of the paired difference (same validation images)."""
    alive, final = list(cands), {}
    for i, k in enumerate(rungs):
        for c in alive:
            final[c] = scores[c][k]
        if i + 1 < len(rungs):
            keep = max(min(len(alive), 2), math.ceil(len(alive) / 2))  # as EstimatorConfig.survivors
            challengers = sorted((c for c in alive if c != incumbent), key=lambda c: final[c][1])
            alive = [incumbent, *challengers[: keep - 1]]
    cost = sum(final[c][2] for c in final)
    pred = {c: -v[1] for c, v in final.items()}
    rivals = [c for c in alive if c != incumbent]
    if not rivals:
        return incumbent, cost, pred
    best = min(rivals, key=lambda c: final[c][1])
    last = rungs[-1]
    d = [a - b for a, b in zip(scores[incumbent]["nll_per_image"][last], scores[best]["nll_per_image"][last])]
    se = statistics.stdev(d) / math.sqrt(len(d))
    return (best if statistics.mean(d) > z * se else incumbent), cost, pred


def analyse(source: dict, study: dict) -> str:
    """Per estimator: mean gain over the capacity choice, gap to the oracle (per seed, and on the
    seed-averaged accuracies), within-1-point count, Spearman, cost as a fraction of one fine-tune."""
    probes, rungs, cos = study["probes"], study["rungs"], study["cosine"]
    full = f"const-{rungs[-1]}"
    variants: dict[str, Any] = {"capacity": None}
    for k in cos:
        variants[f"cosine-{k} acc"] = ("cos", k, 0)
        variants[f"cosine-{k} nll"] = ("cos", k, 1)
    for k in rungs:
        variants[f"const-{k} nll"] = ("const", k, 1)
    for lo in range(len(rungs) - 2):
        for n in (3, 4):
            if lo + n <= len(rungs):
                variants[f"halving {'/'.join(map(str, rungs[lo : lo + n]))} nll"] = (
                    "sh",
                    [f"const-{k}" for k in rungs[lo : lo + n]],
                    1,
                )
    if any("nll_per_image" in p for p in probes.values()):
        for z in (1.0, 2.0):
            variants[f"anchored halving {'/'.join(map(str, rungs[:3]))} z={z:g}"] = (
                "anchored",
                [f"const-{k}" for k in rungs[:3]],
                z,
            )
    for k in study.get("cool", []):  # the last rung cooled down: constant LR to k, then cosine to min_lr over k steps
        head = [f"const-{r}" for r in rungs if r <= k]
        name = f"{'/'.join(x.split('-')[1] for x in head)} + cool {k}->{2 * k}"
        variants[f"halving {name} nll"] = ("sh", [*head, f"cool-{k}"], 1)
        variants[f"anchored halving {name} z=2"] = ("anchored", [*head, f"cool-{k}"], 2.0)
    table = [
        "| estimator | mean gain over capacity | gap to oracle (mean / max) | within 1 pt | seed-averaged gap (mean / max) "
        "| Spearman | cost / fine-tune (mean / max) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, spec in variants.items():
        gains, gaps, avg_gap, rhos, costs = [], [], {}, [], []
        picks: dict[tuple[str, str], list[str]] = {}
        for r in source["rows"]:
            cands = sorted(r["measured"])
            sc = {c: probes[f"{r['task']}|{r['seed']}|{c}"] for c in cands}
            if spec is None:
                chosen, cost, pred = r["capacity"], 0.0, None
            elif spec[0] == "sh":
                chosen, cost, pred = successive_halving(sc, cands, spec[1], spec[2])
            elif spec[0] == "anchored":
                chosen, cost, pred = anchored_halving(sc, cands, r["capacity"], spec[1], spec[2])
            else:
                key = f"{'cosine' if spec[0] == 'cos' else 'const'}-{spec[1]}"
                pred = {c: (-sc[c][key][1] if spec[2] else sc[c][key][0]) for c in cands}
                cost = sum(sc[c][key][2] for c in cands)
                top = max(pred.values())
                chosen = max((c for c in cands if pred[c] >= top - 1e-9), key=lambda c: c == r["capacity"])
            acc = r["measured"]
            gains.append(100 * (acc[chosen] - acc[r["capacity"]]))
            gaps.append(100 * (max(acc.values()) - acc[chosen]))
            if pred:
                common = [c for c in cands if c in pred]
                if len(common) > 2:
                    rhos.append(spearman([pred[c] for c in common], [acc[c] for c in common]))
            one = sc[chosen][full][2] * source["args"]["steps"] / rungs[-1]
            costs.append(cost / one)
            picks.setdefault((r["profile"], r["task"]), []).append(chosen)
        for (prof, task), chosen in picks.items():
            rows = [r for r in source["rows"] if r["profile"] == prof and r["task"] == task]
            shared = set.intersection(*(set(r["measured"]) for r in rows))
            mean = {c: statistics.mean(r["measured"][c] for r in rows) for c in shared}
            avg_gap[(prof, task)] = 100 * (max(mean.values()) - statistics.mean(mean.get(c, 0.0) for c in chosen))
        table.append(
            f"| {name} | {statistics.mean(gains):+.2f} pt | {statistics.mean(gaps):.2f} / {max(gaps):.1f} pt | "
            f"{sum(g <= 1.0 for g in gaps)}/{len(gaps)} | {statistics.mean(avg_gap.values()):.2f} / "
            f"{max(avg_gap.values()):.1f} pt | {statistics.mean(rhos) if rhos else float('nan'):.2f} | "
            f"{statistics.mean(costs):.2f} / {max(costs):.2f} |"
        )
    return "\n".join(table)


if __name__ == "__main__":
    main()
