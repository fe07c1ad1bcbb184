"""A learngene trained too little: what ``--init auto`` ships when ``--expand-steps`` is below the bar.

A user who asks for a short expanding phase (``--expand-steps 30``, or 300) gets a learngene whose descendants
start below weight selection (the learngene study: 150 steps -12.7 points, 250 steps -4.7, crossing near 750).
Each cell is a real ``peg-factory build`` of ``jetson_orin`` in a fresh process at a fixed fine-tune (``--steps``),
the default (``--init auto``) beside the default as it was before the bar applied to it (``--expand-min-steps 1``:
any phase made the learngene "trained") and the fixed starts ``peg`` and ``weight_selection``, on the tasks given
(digits: the demo ancestry's own kind of data; mnist-unseen: digit classes it never saw, as a folder).
Reports the shape, the start, the shipped test accuracy with its binomial SE and the gap to the best in SE.

    python bench/short_phase.py --json bench/out/short_phase.json --md bench/out/short_phase.md
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import binomial_se, mnist_unseen, run_and_write, write_folder  # noqa: E402

#: name -> the build's arguments; "auto, any phase counts" is the default before the bar applied to it (any
#: expanding phase made a learngene "trained"), for the before/after in one run
STRATEGIES = {
    "auto (default)": ["--init", "auto"],
    "auto, any phase counts": ["--init", "auto", "--expand-min-steps", "1"],
    "peg": ["--init", "peg"],
    "weight_selection": ["--init", "weight_selection"],
}


def _data(task: str, scratch: Path) -> str:
    return write_folder(mnist_unseen(), scratch / "mnist-unseen") if task == "mnist-unseen" else task


def _build(data: str, init: list[str], expand_steps: int, steps: int, seed: int, out: Path) -> dict:
    """One build in a fresh process; its device's figures from the manifest."""
    root = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, "-m", "factory.cli", "build", "--profile", str(root / "profiles" / "jetson_orin.yaml")]
    cmd += ["--data", data, "--steps", str(steps), "--expand-steps", str(expand_steps), *init]
    cmd += ["--seed", str(seed), "--out", str(out)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    dev = json.loads((out / "manifest.json").read_text())["devices"][0]
    conf = dev["accuracy"]["confusion"]
    return {
        "shape": f"d{dev['shape']['depth']}-w{dev['shape']['embed_dim']}",
        "init": dev["init"],
        "test_acc": dev["accuracy"]["test"],
        "test_n": sum(map(sum, conf)),
        "reason": (dev.get("init_decision") or {}).get("reason", ""),
        "seconds": round(seconds, 1),
    }


def run(args) -> dict:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        for task in args.tasks:
            data = _data(task, scratch)
            for expand in args.expand_steps:
                cell = []
                for k, (name, init) in enumerate((n, STRATEGIES[n]) for n in args.strategies):
                    res = _build(data, init, expand, args.steps, args.seed, scratch / f"{task}-{expand}-{k}")
                    cell.append({"task": task, "expand_steps": expand, "strategy": name, **res})
                    print(cell[-1], flush=True)
                best = max(r["test_acc"] for r in cell)
                for r in cell:
                    se = binomial_se(best, r["test_n"])
                    r["gap_se"] = round((r["test_acc"] - best) / se, 1) if se > 0 else 0.0
                rows += cell
    return {
        "machine": f"{platform.machine()} {platform.processor()}".strip(),
        "steps": args.steps,
        "seed": args.seed,
        "rows": rows,
    }


def summarise(data: dict) -> str:
    lines = [
        f"Machine {data['machine']}; profile `jetson_orin`; {data['steps']} fine-tuning steps; seed {data['seed']}.",
        "",
        "| task | --expand-steps | strategy | shape | init | test acc. (SE) | gap to best (SE) | build s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        se = binomial_se(r["test_acc"], r["test_n"])
        lines.append(
            f"| {r['task']} | {r['expand_steps']} | {r['strategy']} | {r['shape']} | {r['init']} | {r['test_acc']:.4f} "
            f"({se:.4f}) | {r['gap_se']:+.1f} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["digits", "mnist-unseen"])
    parser.add_argument("--expand-steps", type=int, nargs="+", default=[30, 300])
    parser.add_argument("--steps", type=int, default=300, help="fine-tuning steps of every build")
    parser.add_argument("--strategies", nargs="+", choices=list(STRATEGIES), default=list(STRATEGIES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--md", type=Path, default=None)
    run_and_write(run, summarise, parser.parse_args())


if __name__ == "__main__":
    main()
