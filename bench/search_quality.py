"""Does the accuracy-aware search pick the shape that ends up most accurate?

For every profile of ``profiles/demo/fleet.yaml`` (the 28-px demo fleet), task (``digits``; ``textures``, the unseen task
of the PEG benchmark) and seed, the searcher's feasible shapes are narrowed to >= 8 candidates
(the estimator's Pareto-front spread, topped up with the next feasible shapes by capacity), every
candidate is fine-tuned with the build's exact recipe (:func:`factory.pipeline.config.finetune_recipe`, the
shipped learngene, ``init=peg``) and its test accuracy measured. Reported per (profile, task, seed):
the accuracy of the shape the estimator chooses, of the best candidate (the oracle) and of the
capacity proxy's choice; the Spearman rank correlation between the estimator's ranking and the
measured accuracies; and the estimator's time against one fine-tune of the chosen shape.

A single fine-tune's test accuracy is noisy (400 test images: 1 point is 4 images; the fine-tune's
seed moves a shape by up to 10 points on ``textures``), so the per-seed oracle is the maximum of
noisy scores. The summary also scores each (profile, task) on the accuracies averaged over the
seeds: the chosen shapes' mean against the best seed-averaged shape.

Usage:
    python bench/search_quality.py --json bench/out/search_quality.json --md bench/out/search_quality.md
    python bench/search_quality.py --quick --json /tmp/q.json                    # smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from common import mnist_unseen, run_and_write, within_one_se, write_outputs
from scipy.stats import spearmanr

from factory import init_descendant, load_ancestry, sample_learngene
from factory.core.demo import load_demo_learngene
from factory.data import load_dataset
from factory.device.accuracy import (
    EstimatorConfig,
    SuccessiveHalving,
    candidates,
    choose_by_accuracy,
)
from factory.device.profile import load_profile
from factory.device.resolve import latency_model_for
from factory.device.search import SearchSpace, search
from factory.pipeline.config import BuildConfig, finetune_recipe
from factory.pipeline.fleet import load_fleet
from factory.training.train import evaluate, train

ROOT = Path(__file__).resolve().parent.parent


def task_dataset(task: str, anc):
    """The task's splits; ``mnist-unseen``: :func:`common.mnist_unseen` (its validation split scores the probes)."""
    if task == "mnist-unseen":
        return mnist_unseen(anc.arch.img_size, anc.arch.in_chans)
    return load_dataset(task, img_size=anc.arch.img_size, in_chans=anc.arch.in_chans)


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    anc = load_ancestry("demo")
    lg = load_demo_learngene(anc) if args.learngene == "shipped" else sample_learngene(anc, 3, seed=0)
    profiles = [load_profile(p) for p in load_fleet(ROOT / "profiles" / "demo" / "fleet.yaml")][
        : 1 if args.quick else None
    ]
    rows, measured = [], reused_measurements(args.reuse)
    for task in args.tasks:
        ds = task_dataset(task, anc)
        space = SearchSpace.from_arch(anc.arch, num_classes=ds.num_classes)
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            cfg = BuildConfig(  # the recipe's settings; the data are ds's
                data="mnist" if task == "mnist-unseen" else task,
                finetune_steps=args.steps,
                seed=seed,
                device="cpu",
                init=args.init,
            )
            for prof in profiles:
                result = search(prof, space, latency_model_for(prof, arch=anc.arch), seed=seed)
                predictor = SuccessiveHalving(
                    anc,
                    lg,
                    ds,
                    finetune_recipe(cfg),
                    init=args.init,
                    config=EstimatorConfig(
                        candidates=args.candidates,
                        anchor=args.anchor,
                        score=args.score,
                        **({"rung_fractions": tuple(args.rungs)} if args.rungs else {}),
                    ),
                )
                t0 = time.perf_counter()
                chosen, est_rows = choose_by_accuracy(result, predictor, args.candidates)
                est_seconds = time.perf_counter() - t0
                pool = candidates(result, max(args.candidates, args.min_shapes))
                pool += [c for c in candidates(result, args.candidates) if c not in pool]  # the estimator's own picks
                for c in result.feasible:  # top up to the benchmark's minimum with the next shapes by capacity
                    if len(pool) >= args.min_shapes:
                        break
                    if c not in pool:
                        pool.append(c)
                for c in pool:
                    key = (task, seed, c.shape.label())
                    if key not in measured:
                        model = init_descendant(args.init, c.shape, ancestry=anc, learngene=lg, seed=seed)
                        res = train(
                            model, ds.train, dataclasses.replace(finetune_recipe(cfg), ckpt_every=0), progress=False
                        )
                        measured[key] = (evaluate(model, ds.test), res.seconds)
                        print(
                            f"{task:9s} s{seed} {c.shape.label():24s} test {measured[key][0]:.4f} ({res.seconds:.1f}s)",
                            flush=True,
                        )
                # the estimator's ranking (rung reached, then NLL) as a score: best = highest
                pred = {r["label"]: float(len(est_rows) - i) for i, r in enumerate(est_rows)}
                acc = {c.shape.label(): measured[(task, seed, c.shape.label())][0] for c in pool}
                labels = sorted(pred)  # rank correlation over the estimator's candidates
                rho = spearmanr([pred[k] for k in labels], [acc[k] for k in labels]).statistic
                oracle = max(acc, key=acc.get)
                cap = result.feasible[0].shape.label()
                row = {
                    "profile": prof.name,
                    "task": task,
                    "seed": seed,
                    "shapes": len(acc),
                    "chosen": chosen.shape.label(),
                    "chosen_acc": acc[chosen.shape.label()],
                    "oracle": oracle,
                    "oracle_acc": acc[oracle],
                    "capacity": cap,
                    "capacity_acc": acc[cap],
                    "spearman": round(float(rho), 3),
                    "test_images": len(ds.test),
                    "estimator_seconds": round(est_seconds, 1),
                    "finetune_seconds_chosen": round(measured[(task, seed, chosen.shape.label())][1], 1),
                    "predicted": pred,
                    "probes": est_rows,
                    "measured": acc,
                    "finetune_seconds": {c.shape.label(): measured[(task, seed, c.shape.label())][1] for c in pool},
                }
                rows.append(row)
                print(
                    f"{prof.name}: chosen {row['chosen']} {row['chosen_acc']:.4f}, oracle {oracle} {row['oracle_acc']:.4f}, "
                    f"capacity {cap} {row['capacity_acc']:.4f}, rho {row['spearman']}, estimator {est_seconds:.1f}s",
                    flush=True,
                )
    return {
        "args": {k: v for k, v in vars(args).items() if k not in ("json", "md")},
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "learngene": lg.sha256,
        "rows": rows,
    }


def reused_measurements(path: Path | None) -> dict:
    """``{(task, seed, shape label): (test accuracy, fine-tune seconds)}`` from an earlier run's JSON
    (``--reuse``): the fine-tunes are deterministic for a seed and thread count, so an estimator variant can
    be scored on the same fine-tunes without repeating them. Seconds the earlier run did not record are NaN."""
    if path is None:
        return {}
    return {
        (r["task"], r["seed"], label): (acc, r.get("finetune_seconds", {}).get(label, float("nan")))
        for r in json.loads(Path(path).read_text())["rows"]
        for label, acc in r["measured"].items()
    }


def summarise(data: dict) -> str:
    rows = data["rows"]
    lines = [
        "| profile | task | seed | shapes | chosen (accuracy objective) | oracle | capacity choice | gap to oracle | "
        "gain over capacity | Spearman | estimator s / fine-tune s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['profile']} | {r['task']} | {r['seed']} | {r['shapes']} | {r['chosen']} {r['chosen_acc']:.3f} | "
            f"{r['oracle']} {r['oracle_acc']:.3f} | {r['capacity']} {r['capacity_acc']:.3f} | "
            f"{100 * (r['oracle_acc'] - r['chosen_acc']):.1f} pt | {100 * (r['chosen_acc'] - r['capacity_acc']):+.1f} pt | "
            f"{r['spearman']:.2f} | {r['estimator_seconds']:.1f} / {r['finetune_seconds_chosen']:.1f} |"
        )
    gaps = [100 * (r["oracle_acc"] - r["chosen_acc"]) for r in rows]
    gains = [100 * (r["chosen_acc"] - r["capacity_acc"]) for r in rows]
    cap_gaps = [100 * (r["oracle_acc"] - r["capacity_acc"]) for r in rows]
    rhos = [r["spearman"] for r in rows if r["spearman"] == r["spearman"]]
    within_se = [r for r in rows if "test_images" in r and chosen_within_one_se(r)]
    ratio = [
        r["estimator_seconds"] / r["finetune_seconds_chosen"] for r in rows if r["finetune_seconds_chosen"] > 0
    ] or [float("nan")]
    lines += [
        "",
        f"Over {len(rows)} (profile, task, seed) cases: gap to the oracle mean {statistics.mean(gaps):.2f} pt, "
        f"max {max(gaps):.1f} pt, within 1 pt in {sum(g <= 1.0 for g in gaps)}/{len(gaps)}, within one binomial SE of the "
        f"oracle's accuracy in {len(within_se)}/{sum('test_images' in r for r in rows)}; capacity proxy's gap to the "
        f"oracle mean {statistics.mean(cap_gaps):.2f} pt, max {max(cap_gaps):.1f} pt; gain of the accuracy objective over "
        f"capacity mean {statistics.mean(gains):+.2f} pt; Spearman mean {statistics.mean(rhos) if rhos else float('nan'):.2f}; "
        f"estimator time / one fine-tune of the chosen shape: mean {statistics.mean(ratio):.2f}, max {max(ratio):.2f}.",
    ]
    avg = seed_averaged(rows)
    if avg:
        lines += [
            "",
            "Seed-averaged (each shape's test accuracy averaged over the seeds; chosen = the mean over seeds of "
            "the shapes each seed's run chose):",
            "",
            "| profile | task | best shape (seed mean) | accuracy objective | capacity | gap to best | gain over capacity |",
            "|---|---|---|---|---|---|---|",
        ]
        for a in avg:
            lines.append(
                f"| {a['profile']} | {a['task']} | {a['best']} {a['best_acc']:.3f} | {a['chosen_acc']:.3f} | "
                f"{a['capacity_acc']:.3f} | {100 * (a['best_acc'] - a['chosen_acc']):.1f} pt | "
                f"{100 * (a['chosen_acc'] - a['capacity_acc']):+.1f} pt |"
            )
        lines += [
            "",
            f"Seed-averaged over {len(avg)} (profile, task) pairs: accuracy objective's gap to the best mean "
            f"{statistics.mean(100 * (a['best_acc'] - a['chosen_acc']) for a in avg):.2f} pt, capacity's "
            f"{statistics.mean(100 * (a['best_acc'] - a['capacity_acc']) for a in avg):.2f} pt.",
        ]
    return "\n".join(lines)


def regime_table(paths: list[Path]) -> str:
    """One line per earlier run (``--summarise``): how the accuracy objective and the capacity proxy fared
    in that run's regime (initialisation, learngene, probe score)."""
    lines = [
        "| run | init | learngene | score | cases | gain over capacity | within 1 pt of oracle (accuracy / capacity) | "
        "seed-averaged gap to best (accuracy / capacity) | Spearman |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for path in paths:
        data = json.loads(Path(path).read_text())
        rows, a = data["rows"], data["args"]
        gains = [100 * (r["chosen_acc"] - r["capacity_acc"]) for r in rows]
        near = sum(100 * (r["oracle_acc"] - r["chosen_acc"]) <= 1.0 for r in rows)
        cap_near = sum(100 * (r["oracle_acc"] - r["capacity_acc"]) <= 1.0 for r in rows)
        avg = seed_averaged(rows)
        gap = statistics.mean(100 * (x["best_acc"] - x["chosen_acc"]) for x in avg) if avg else float("nan")
        cap_gap = statistics.mean(100 * (x["best_acc"] - x["capacity_acc"]) for x in avg) if avg else float("nan")
        rhos = [r["spearman"] for r in rows if r["spearman"] == r["spearman"]]
        lines.append(
            f"| {Path(path).stem} | {a.get('init', 'peg')} | {a.get('learngene', 'shipped')} | "
            f"{'anchored ' if a.get('anchor') else ''}{a.get('score', 'raw')} | {len(rows)} | "
            f"{statistics.mean(gains):+.2f} pt | {near}/{len(rows)} / {cap_near}/{len(rows)} | {gap:.2f} / {cap_gap:.2f} pt | "
            f"{statistics.mean(rhos) if rhos else float('nan'):.2f} |"
        )
    return "\n".join(lines)


def chosen_within_one_se(row: dict) -> bool:
    """The chosen shape's test accuracy within one binomial standard error of the oracle's on the ``test_images``
    (issue 31's criterion for a probe that predicts the shipped model)."""
    return within_one_se(row["oracle_acc"], row["chosen_acc"], row["test_images"])


def seed_averaged(rows: list[dict]) -> list[dict]:
    """Per (profile, task) with more than one seed: shapes measured in every seed, their mean accuracy."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["profile"], r["task"]), []).append(r)
    out = []
    for (prof, task), rs in groups.items():
        shared = set.intersection(*(set(r["measured"]) for r in rs))
        if len(rs) < 2 or not all(r["chosen"] in shared and r["capacity"] in shared for r in rs):
            continue
        mean = {s: statistics.mean(r["measured"][s] for r in rs) for s in shared}
        best = max(mean, key=mean.get)
        out.append(
            {
                "profile": prof,
                "task": task,
                "best": best,
                "best_acc": mean[best],
                "chosen_acc": statistics.mean(mean[r["chosen"]] for r in rs),
                "capacity_acc": statistics.mean(mean[r["capacity"]] for r in rs),
            }
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: one profile, digits, 1 seed, 3 candidates")
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--md", type=Path, default=None)
    parser.add_argument(
        "--tasks",
        nargs="+",
        default=None,
        choices=("digits", "textures", "mnist-unseen", "mnist"),
        help="[default: digits textures; --quick: digits]",
    )
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds run from this one [default: 0]")
    parser.add_argument("--steps", type=int, default=None, help="fine-tuning budget [default: the build's, 100]")
    parser.add_argument("--candidates", type=int, default=None)
    parser.add_argument("--min-shapes", type=int, default=None)
    parser.add_argument(
        "--init",
        default="peg",
        choices=("peg", "tleg", "weight_selection", "scratch"),
        help="how the build initialises descendants [default: peg]",
    )
    parser.add_argument(
        "--learngene",
        default="shipped",
        choices=("shipped", "untrained"),
        help="the shipped trained learngene, or one sampled by the paper's recipe without the "
        "expanding phase (3 layers, tau 1, seed 0) [default: shipped]",
    )
    parser.add_argument("--anchor", action="store_true", help="the anchored estimator (EstimatorConfig.anchor)")
    parser.add_argument(
        "--rungs",
        type=float,
        nargs="+",
        default=None,
        help="the probes' rungs as fractions of the fine-tune (EstimatorConfig.rung_fractions) [default: the shipped]",
    )
    parser.add_argument(
        "--score", default="calibrated", choices=("calibrated", "raw"), help="probe score (EstimatorConfig.score)"
    )
    parser.add_argument(
        "--reuse",
        type=Path,
        default=None,
        help="an earlier run's --json: its fine-tunes (same seeds, tasks, init, threads) are not repeated",
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--summarise",
        type=Path,
        nargs="+",
        default=None,
        help="no run: one line per earlier run's --json (regime, gain over capacity, oracle gaps)",
    )
    args = parser.parse_args()
    for path in [*(args.summarise or []), *([args.reuse] if args.reuse else [])]:
        if not path.is_file():
            parser.error(f"{path}: no such file; pass the --json of an earlier search_quality run")
    if args.summarise:
        table = regime_table(args.summarise)
        data = {"runs": [str(p) for p in args.summarise], "wall_seconds": 0.0}
        write_outputs(data, table, args.json, args.md)
        return
    args.tasks = args.tasks or (["digits"] if args.quick else ["digits", "textures"])
    args.seeds = args.seeds or (1 if args.quick else 2)
    args.steps = args.steps or (8 if args.quick else BuildConfig().finetune_steps)
    args.candidates = args.candidates or (3 if args.quick else BuildConfig().candidates)
    args.min_shapes = args.min_shapes or (3 if args.quick else 8)
    if args.reuse:  # its fine-tunes are only the same ones under the same settings
        earlier = json.loads(args.reuse.read_text())["args"]
        defaults = {"init": "peg", "learngene": "shipped"}  # runs from before these options existed
        differ = [
            k for k in ("init", "learngene", "steps", "threads") if earlier.get(k, defaults.get(k)) != getattr(args, k)
        ]
        if differ:
            parser.error(
                f"--reuse {args.reuse} was run with other {', '.join(differ)} "
                f"({', '.join(f'{k}={earlier.get(k, defaults.get(k))}' for k in differ)}); pass the same"
            )
    run_and_write(run, summarise, args)


if __name__ == "__main__":
    main()
