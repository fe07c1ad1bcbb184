"""What the shipped profiles' budgets buy a real ancestry: the capacity choice for DeiT-Tiny at 224 px.

For every shipped real-use profile (``profiles/*.yaml``, budgets for a stated use at 224 px) and its
28-px demo counterpart (``profiles/demo/``), the search over DeiT-Tiny's space (depth up to 24, widths
up to 192, 224-px input, patch 16) picks the largest shape that fits; the table shows it, its predicted
latency, the latency basis and its stated error band. Search only: nothing is trained or timed.

Usage: python bench/profile_budgets.py --json bench/out/profile_budgets.json --md bench/out/profile_budgets.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import run_and_write

from factory.core.shapes import ArchConfig
from factory.device.profile import list_profiles, load_profile
from factory.device.resolve import latency_model_for
from factory.device.search import SearchSpace, search

DEIT_TINY = ArchConfig(
    embed_dim=192, depth=12, num_heads=3, mlp_hidden=768, img_size=224, patch_size=16, num_classes=1000, in_chans=3
)


def run(args) -> dict:
    space = SearchSpace.from_arch(DEIT_TINY)
    rows = []
    for name in list_profiles():
        prof = load_profile(name)
        if prof.hardware.measure:
            continue  # host: measured at run time, not a shipped budget
        cost = latency_model_for(prof, arch=DEIT_TINY)
        result = search(prof, space, cost)
        best = result.feasible[0] if result.feasible else None
        rows.append(
            {
                "profile": name,
                "use": prof.use,
                "input_size": prof.input_size,
                "budgets": dict(prof.budgets.items()),
                "fit": len(result.feasible),
                "evaluated": result.evaluated,
                "chosen": best.shape.label() if best else None,
                "latency_ms": best.latency_ms if best else None,
                "basis": cost.method,
                "band": cost.band,
            }
        )
    return {"rows": rows}


def summarise(data: dict) -> str:
    lines = [
        "| profile | sized for | budgets | shapes that fit | capacity choice (DeiT-Tiny, 224 px) | predicted ms | basis |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        budgets = ", ".join(f"{k} {v:g}" for k, v in r["budgets"].items())
        lat = f"{r['latency_ms']:.2f}" if r["latency_ms"] is not None else "-"
        lines.append(
            f"| {r['profile']} | {r['input_size']} px | {budgets} | {r['fit']}/{r['evaluated']} | {r['chosen'] or 'none'} "
            f"| {lat} | {r['basis']} |"
        )
    bands = sorted({r["band"] for r in data["rows"]})
    lines += ["", "Error bands stated: " + "; ".join(bands)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=None, help="raw results")
    parser.add_argument("--md", type=Path, default=None, help="Markdown table")
    run_and_write(run, summarise, parser.parse_args())


if __name__ == "__main__":
    main()
