"""Build reports: ``report.md``, a self-contained ``report.html`` and the Pareto plot PNG, rendered
from the manifest alone. The plot needs matplotlib (the ``dev`` extra); without it the reports
say so and carry the table only."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from factory.io import atomic_write_bytes

PLOT_HINT = "the Pareto plot needs matplotlib: pip install matplotlib"


def pareto_png(path: Path, manifest: dict[str, Any]) -> bool:
    """Per device: predicted accuracy vs predicted latency of the estimated candidates, with the
    chosen shape and the shipped model's measured test accuracy marked (accuracy objective); or the
    capacity Pareto front with rejected shapes (capacity objective). Latency budget as a line.
    False (and no file) where matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [d for d in manifest["devices"] if "front" in d.get("search", {})]
    fig, axes = plt.subplots(1, max(1, len(ok)), figsize=(4.5 * max(1, len(ok)), 3.6), squeeze=False)
    for ax, dev in zip(axes[0], ok):
        found = dev["search"]
        sel = dev.get("selection", {})
        if sel.get("objective") == "accuracy":
            rows = sorted(sel["candidates"], key=lambda r: r["latency_ms"])
            ax.plot([r["latency_ms"] for r in rows], [r["predicted_accuracy"] for r in rows], "o-", ms=4,
                    label="candidates (probe val. accuracy)")
            chosen = next(r for r in rows if r["chosen"])
            ax.scatter([chosen["latency_ms"]], [chosen["predicted_accuracy"]], s=90, marker="*", color="crimson", zorder=5,
                       label="chosen (proxy)")
            if "accuracy" in dev:
                ax.scatter([chosen["latency_ms"]], [dev["accuracy"]["test"]], s=60, marker="D", color="black", zorder=5,
                           label="shipped (measured test)")
            ax.set_ylabel("accuracy")
        else:
            rejected, front = found["rejected_points"], found["front"]
            ax.scatter([p[0] for p in rejected], [p[1] for p in rejected], s=6, color="lightgray", label="rejected")
            ax.plot([p[0] for p in front], [p[1] for p in front], "o-", ms=3, label="Pareto front")
            ax.scatter([found["chosen"][0]], [found["chosen"][1]], s=80, marker="*", color="crimson", zorder=5, label="chosen")
            ax.set_ylabel("capacity score (log FLOPs + 0.5 log params)")
        budget = dev.get("budgets", {}).get("latency_ms")
        if budget:
            ax.axvline(budget, color="crimson", ls="--", lw=1, label="latency budget")
        title = dev["name"] + (f"\ntest acc {dev['accuracy']['test']:.3f}" if "accuracy" in dev else "")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("predicted latency (ms)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _rows(manifest: dict[str, Any]) -> list[list[str]]:
    rows = []
    for d in manifest["devices"]:
        if d.get("status") != "ok":
            rows.append([d["name"], "FAILED", d.get("error", ""), "", "", "", "", "", ""])
            continue
        s = d["shape"]
        margins = ", ".join(f"{k} {v:+.0%}" for k, v in d["margins"].items())
        sel = d.get("selection", {})
        pred = f"{d['predicted']['accuracy']:.3f}" if sel.get("objective") == "accuracy" else "capacity"
        rows.append([
            d["name"], f"d{s['depth']} w{s['embed_dim']} h{s['num_heads']} r{s['mlp_ratio']:g} i{s['img_size']}", pred,
            f"{d['accuracy']['test']:.4f}", f"{d['flops']['fvcore'] / 1e9:.4f}", f"{d['params'] / 1e6:.3f}",
            f"{d['latency_ms']['predicted_target']:.4f}", f"{d['latency_ms']['host_onnxruntime']:.4f}", margins,
        ])
    return rows


HEADER = ["device", "shape", "chosen by (pred. acc)", "test acc", "GFLOPs", "params M", "pred. latency ms", "host ORT ms", "budget margins"]


def write_reports(out: Path, manifest: dict[str, Any]) -> None:
    png = out / "pareto.png"
    plotted = pareto_png(png, manifest)
    lg = manifest["learngene"]
    intro = (f"Ancestry `{manifest['ancestry']['spec']}` ({manifest['ancestry']['weights']}), learngene "
             f"`{(lg['sha256'] or '')[:12]}` ({lg['layers']} layers x {lg['heads']} heads, sampled once for "
             f"{len(lg['sampled_once_for'])} devices), data `{manifest['data']['spec']}`, init `{manifest['recipe']['init']}`, "
             f"{manifest['recipe']['finetune_steps']} fine-tuning steps; build took {manifest['seconds']} s.")
    rows = _rows(manifest)
    md = ["# peg-factory build report", "", intro, "", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    md += ["", "![Pareto fronts](pareto.png)" if plotted else f"({PLOT_HINT})", ""]
    atomic_write_bytes(out / "report.md", "\n".join(md).encode())
    table = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    figure = (f'<img alt="Pareto fronts" src="data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()}">'
              if plotted else f"<p>({html.escape(PLOT_HINT)})</p>")
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>peg-factory build report</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px}}</style>
</head><body><h1>peg-factory build report</h1><p>{html.escape(intro)}</p>
<table><tr>{''.join(f'<th>{html.escape(h)}</th>' for h in HEADER)}</tr>{table}</table>
<h2>Pareto fronts</h2>{figure}</body></html>
"""
    atomic_write_bytes(out / "report.html", page.encode())
