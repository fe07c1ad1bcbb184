"""Time to sample a learngene and expand one descendant from a ViT-B/16-sized ancestry.

Usage: python bench/learngene_speed.py [--ancestry random:vit_base_patch16_224] [--repeats 3]

Random weights (no hub here). Reports median wall time of sampling (with and without the
weight-distribution report) and of expanding one descendant, and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import time

import torch

from factory import DescendantShape, expand, load_ancestry, sample_learngene


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ancestry", default="random:vit_base_patch16_224")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    anc = load_ancestry(args.ancestry)
    rss_ancestry = rss_mb()
    shape = DescendantShape(
        depth=9, embed_dim=384, num_heads=6, mlp_ratio=4.0, img_size=224, patch_size=16, num_classes=100
    )
    lg = sample_learngene(anc, args.layers, args.heads, report=False)
    t_sample = median_time(lambda: sample_learngene(anc, args.layers, args.heads, report=False), args.repeats)
    t_sample_report = median_time(lambda: sample_learngene(anc, args.layers, args.heads), args.repeats)
    t_expand = median_time(lambda: expand(lg, shape), args.repeats)
    deep = DescendantShape(
        depth=18, embed_dim=768, num_heads=12, mlp_ratio=4.0, img_size=224, patch_size=16, num_classes=1000
    )
    t_expand_deep = median_time(lambda: expand(lg, deep), args.repeats)
    result = {
        "ancestry": args.ancestry,
        "ancestry_params_m": round(sum(p.numel() for p in anc.model.parameters()) / 1e6, 1),
        "learngene": f"{args.layers} layers x {args.heads} heads",
        "sample_s": round(t_sample, 3),
        "sample_with_report_s": round(t_sample_report, 3),
        "expand_s": {shape.label(): round(t_expand, 3), deep.label(): round(t_expand_deep, 3)},
        "sample_plus_expand_s": round(t_sample + t_expand, 3),
        "peak_rss_mb": round(rss_mb()),
        "rss_after_loading_ancestry_mb": round(rss_ancestry),
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads".strip(),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
