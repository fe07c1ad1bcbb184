"""Build reports, rendered from the manifest alone: ``report.md`` and a self-contained ``report.html``.

As an ML engineer reads a build: a summary row per device; the accuracy-vs-latency front of each
device's search; then per device its deploy choice, a budget verdict for every budget (and a word
on the host's onnxruntime time, which says nothing about another target), every artifact with its
verified accuracy and host latency, the fine-tune's training curve and the test confusion matrix.
Figures need matplotlib (the ``dev`` extra); without it the reports say so and keep the tables.
Figure files go to ``OUT/report_files/``; the HTML embeds them.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

import yaml

from factory.io import atomic_write_bytes
from factory.pipeline.markdown import md_cell, md_text
from factory.pipeline.model_card import selection_text
from factory.pipeline.perf_card import PERF, perf_rows

PLOT_HINT = "figures need matplotlib: pip install matplotlib"
BUDGET_UNITS = {"latency_ms": "ms", "memory_mb": "MB", "flops_g": "GFLOPs", "params_m": "M params"}
PREDICTED = {"latency_ms": ("latency_ms", "predicted_target"), "memory_mb": ("memory_mb", "predicted_target")}


def _plt():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    _plt().close(fig)
    return buf.getvalue()


def front_png(dev: dict[str, Any]) -> bytes | None:
    """The device's accuracy-vs-latency front: the probed candidates (accuracy objective) or the capacity
    Pareto front with the rejected shapes (capacity), the chosen shape, the shipped model's test accuracy."""
    plt, found = _plt(), dev.get("search", {})
    if plt is None or "front" not in found:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.4))
    sel = dev.get("selection", {})
    if sel.get("objective") == "accuracy":
        rows = sorted(sel["candidates"], key=lambda r: r["latency_ms"])
        ax.plot(
            [r["latency_ms"] for r in rows],
            [r["predicted_accuracy"] for r in rows],
            "o-",
            ms=4,
            label="candidates (probe)",
        )
        chosen = next(r for r in rows if r["chosen"])
        ax.scatter(
            [chosen["latency_ms"]],
            [chosen["predicted_accuracy"]],
            s=90,
            marker="*",
            color="crimson",
            zorder=5,
            label="chosen",
        )
        if "accuracy" in dev:
            ax.scatter(
                [chosen["latency_ms"]],
                [dev["accuracy"]["test"]],
                s=60,
                marker="D",
                color="black",
                zorder=5,
                label="shipped (test accuracy)",
            )
        ax.set_ylabel("accuracy")
    else:
        rejected, front = found.get("rejected_points", []), found["front"]
        if rejected:
            ax.scatter([p[0] for p in rejected], [p[1] for p in rejected], s=6, color="lightgray", label="rejected")
        ax.plot([p[0] for p in front], [p[1] for p in front], "o-", ms=3, label="Pareto front")
        ax.scatter(
            [found["chosen"][0]], [found["chosen"][1]], s=80, marker="*", color="crimson", zorder=5, label="chosen"
        )
        ax.set_ylabel("capacity (log FLOPs + 0.5 log params)")
    budget = dev.get("budgets", {}).get("latency_ms")
    if budget:
        ax.axvline(budget, color="crimson", ls="--", lw=1, label="latency budget")
    ax.set_xlabel("predicted target latency (ms)")
    ax.set_title(dev["name"], fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def curve_png(dev: dict[str, Any]) -> bytes | None:
    plt, curve = _plt(), dev.get("finetune", {}).get("curve") or []
    if plt is None or not curve:
        return None
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot([r[0] for r in curve], [r[1] for r in curve], lw=1.2, label="training loss")
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("loss")
    ax2 = ax.twinx()
    ax2.plot(
        [r[0] for r in curve], [r[2] for r in curve], lw=0.8, color="tab:orange", alpha=0.7, label="batch accuracy"
    )
    ax2.set_ylabel("batch accuracy")
    ax.set_title(f"{dev['name']}: fine-tune (test accuracy {dev['accuracy']['test']:.3f})", fontsize=9)
    fig.tight_layout()
    return _png(fig)


def confusion_png(dev: dict[str, Any], classes: list[str]) -> bytes | None:
    plt, m = _plt(), dev.get("accuracy", {}).get("confusion")
    if plt is None or not m:
        return None
    k = len(m)
    fig, ax = plt.subplots(figsize=(min(8, 2 + 0.35 * k), min(7, 1.6 + 0.35 * k)))
    ax.imshow(m, cmap="Blues")
    labels = classes if len(classes) == k else [str(i) for i in range(k)]
    ax.set_xticks(range(k), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(k), labels, fontsize=7)
    if k <= 15:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, str(m[i][j]), ha="center", va="center", fontsize=7, color="black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{dev['name']}: test confusion matrix", fontsize=9)
    fig.tight_layout()
    return _png(fig)


def budget_rows(dev: dict[str, Any]) -> list[list[str]]:
    """``[budget, limit, value, margin, verdict]`` per budget, then the host timing row with what it means."""
    rows = []
    for name, limit in dev["budgets"].items():
        margin = dev["margins"].get(name)
        shipped = dev["latency_ms"].get("shipped")
        memory = dev["memory_mb"].get("shipped")
        if name == "latency_ms" and shipped:  # the verdict is the shipped artifact's
            value, what = shipped["ms"], f"{shipped['format']}, {shipped['basis']}"
        elif name == "memory_mb" and memory:
            value, what = memory["mb"], f"{memory['format']} at {memory['precision']}, predicted on the target"
        elif name in PREDICTED:
            group, key = PREDICTED[name]
            value, what = dev[group][key], "predicted on the target"
        else:
            value = dev["flops"]["closed_form_g"] if name == "flops_g" else dev["params"] / 1e6
            what = "counted"
        verdict = "within" if margin is not None and margin >= 0 else "OVER"
        rows.append(
            [
                name,
                f"{limit:g} {BUDGET_UNITS.get(name, '')}",
                f"{value:.4g} ({what})",
                f"{margin:+.0%}" if margin is not None else "",
                verdict,
            ]
        )
    host = dev["latency_ms"]["host_onnxruntime"]
    target = dev.get("target", {})
    if target.get("this_host"):
        note = "the target is this machine: a real measurement"
    else:
        note = (
            f"onnxruntime on the build machine: says nothing about the target ({target.get('runtime', '?')} on "
            f"{target.get('description', dev['name'])})"
        )
    limit = dev["budgets"].get("latency_ms")
    rows.append(["host latency", f"{limit:g} ms" if limit else "", f"{host:.4g} ms", "", note])
    return rows


def artifact_rows(dev: dict[str, Any]) -> list[list[str]]:
    """``[format, file, precision, verified accuracy, host latency b1 (median / p90), note]`` per artifact."""
    rows = []
    for fmt, art in dev.get("artifacts", {}).items():
        acc = art.get("test_accuracy", art.get("val_accuracy", art.get("typed_val_accuracy")))
        drop = art.get("accuracy_drop_vs_fp32", art.get("typed_accuracy_drop_vs_fp32"))
        verified = (f"{acc:.4f}" if acc is not None else "") + (
            f" ({0.0 - drop:+.4f} vs FP32)" if drop is not None else ""
        )
        lat = art.get("latency_ms_b1")
        latency = (
            f"{lat:.3f}" + (f" / {art['latency_ms_b1_p90']:.3f}" if art.get("latency_ms_b1_p90") else "") if lat else ""
        )
        note = art.get("warning") or art.get("reason") or art.get("benchmark_app") or ""  # a coverage warning first
        if art.get("nodes", {}).get("simplified"):
            note = f"{art['nodes']['exported']} -> {art['nodes']['simplified']} nodes (onnxslim)"
        rows.append(
            [
                fmt,
                Path(art["path"]).name,
                art.get("inference_precision") or art.get("precision") or art.get("mode") or "",
                verified,
                latency,
                note,
            ]
        )
    return rows


def _perf_rows(out: Path, dev: dict[str, Any]) -> list[list[str]]:
    """The rows of the device's ``perf.yaml`` (none when the build wrote none: an older build's manifest)."""
    try:
        return perf_rows(yaml.safe_load((out / dev["perf_card"]).read_text()))
    except (KeyError, OSError, yaml.YAMLError):
        return []


def summary_rows(manifest: dict[str, Any]) -> list[list[str]]:
    rows = []
    for d in manifest["devices"]:
        if d.get("status") != "ok":
            rows.append([d["name"], "FAILED", d.get("error", ""), "", "", "", "", ""])
            continue
        sel = d.get("selection", {})
        pred = f"{d['predicted']['accuracy']:.3f}" if sel.get("objective") == "accuracy" else "capacity"
        deploy = d.get("deploy") or {}
        over = [k for k, v in d["margins"].items() if v < 0]
        init = d.get("init", manifest["recipe"]["init"]) + (" (auto)" if d.get("init_decision") else "")
        rows.append(
            [
                d["name"],
                _label(d["shape"]),
                pred,
                init,
                f"{d['accuracy']['test']:.4f}",
                deploy.get("format", "onnx"),
                f"{d['latency_ms'].get('shipped', {}).get('ms', d['latency_ms']['predicted_target']):.4f}",
                "all within" if not over else "OVER: " + ", ".join(over),
            ]
        )
    return rows


def _label(s: dict[str, Any]) -> str:
    return f"d{s['depth']} w{s['embed_dim']} h{s['num_heads']} r{s['mlp_ratio']:g} i{s['img_size']}"


SUMMARY = ["device", "shape", "chosen by (pred. acc)", "init", "test acc", "deploy", "target ms (shipped)", "budgets"]
BUDGETS = ["budget", "limit", "value", "margin", "verdict"]
ARTIFACTS = ["format", "file", "precision", "verified accuracy", "host b1 ms (median / p90)", "note"]


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    cell = md_cell  # a cell is inert text: no tag, no "|" ending it early
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(map(cell, r)) + " |" for r in rows
    ]


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _paced(manifest: dict[str, Any]) -> bool:
    return any((d.get("finetune") or {}).get("pace") for d in manifest.get("devices", []))


def _split(manifest: dict[str, Any]) -> str:
    second = ((manifest.get("time_budget") or {}).get("plans") or {}).get("second") or {}
    return ", an equal share of the fine-tuning time per shape" if second.get("split") == "time" else ""


def write_reports(out: Path, manifest: dict[str, Any]) -> None:
    lg, classes = manifest["learngene"], manifest["data"].get("classes", [])
    intro = (
        f"Ancestry {manifest['ancestry']['spec']} ({manifest['ancestry']['weights']}), learngene "
        f"{(lg['sha256'] or '')[:12]} ({lg['layers']} layers x {lg['heads']} heads, sampled once for "
        f"{len(lg['sampled_once_for'])} devices), data {md_text(manifest['data']['spec'])}, init {manifest['recipe']['init']}, "
        f"{manifest['recipe']['finetune_steps']} fine-tuning steps"
        + (
            f" planned (paced to the time budget{_split(manifest)}: each device's are its own)"
            if _paced(manifest)
            else ""
        )
        + f"; the build took {manifest['seconds']:.1f} s"
        + (
            f" (this run; its learngene and fine-tunes took {manifest['stage_seconds']:.1f} s in all, earlier runs "
            "of a resumed or cached build included)."
            if manifest.get("stage_seconds", 0) > manifest["seconds"]
            else "."
        )
    )
    if manifest.get("hflip_check"):  # --hflip auto measured the folder
        check = manifest["hflip_check"]
        intro += f" Training views flipped with p = {check['hflip']:g} (--hflip auto: {check['reason']})."
    md = ["# peg-factory build report", "", intro, "", *_md_table(SUMMARY, summary_rows(manifest)), ""]
    page = [
        f"<h1>peg-factory build report</h1><p>{html.escape(intro)}</p>",
        _html_table(SUMMARY, summary_rows(manifest)),
    ]
    plotted = _plt() is not None
    if not plotted:
        md.append(f"({PLOT_HINT})")
        page.append(f"<p>({html.escape(PLOT_HINT)})</p>")
    for dev in manifest["devices"]:
        if dev.get("status") != "ok":
            continue
        name, deploy = dev["name"], dev.get("deploy") or {}
        init = f"{dev.get('init', manifest['recipe']['init'])}" + (
            f" (--init auto: {dev['init_decision']['reason']})" if dev.get("init_decision") else ""
        )
        pairs = pairs_text(dev.get("joint") or {})
        if pairs:
            init += f". Pairs compared: {pairs}"
        shape = f"{_label(dev['shape'])}. {selection_text(dev.get('selection', {}))}"
        md += [
            f"## {name}",
            "",
            f"**Shape:** {md_text(shape)}",
            "",
            f"**Initialisation:** {md_text(init)}",
            "",
            f"**Deploy:** {deploy.get('format', 'onnx')} -- {md_text(deploy.get('reason', 'the only artifact'))}",
            "",
            "### Budgets",
            "",
            *_md_table(BUDGETS, budget_rows(dev)),
            "",
            "### Artifacts",
            "",
            *_md_table(ARTIFACTS, artifact_rows(dev)),
            "",
        ]
        perf = _perf_rows(out, dev)
        if perf:
            md += [f"### Performance card (`{dev['perf_card']}`)", "", *_md_table(PERF, perf), ""]
        page += [
            f"<h2 id='{html.escape(name)}'>{html.escape(name)}</h2>",
            f"<p><b>Shape:</b> {html.escape(shape)}</p>",
            f"<p><b>Initialisation:</b> {html.escape(init)}</p>",
            f"<p><b>Deploy:</b> {html.escape(str(deploy.get('format', 'onnx')))} &mdash; "
            f"{html.escape(str(deploy.get('reason', 'the only artifact')))}</p>",
            "<h3>Budgets</h3>",
            _html_table(BUDGETS, budget_rows(dev)),
            "<h3>Artifacts</h3>",
            _html_table(ARTIFACTS, artifact_rows(dev)),
        ]
        if perf:
            page += [f"<h3>Performance card ({html.escape(dev['perf_card'])})</h3>", _html_table(PERF, perf)]
        for kind, title, png in (
            ("front", "Accuracy vs latency", front_png(dev)),
            ("curve", "Training curve", curve_png(dev)),
            ("confusion", "Confusion matrix (test)", confusion_png(dev, classes)),
        ):
            if png is None:
                continue
            rel = f"report_files/{name}-{kind}.png"
            atomic_write_bytes(out / rel, png)
            md += [f"### {title}", "", f"![{title}]({rel})", ""]
            page += [
                f"<h3>{html.escape(title)}</h3>",
                f'<img alt="{html.escape(title)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">',
            ]
    atomic_write_bytes(out / "report.md", "\n".join(md).encode())
    style = (
        "body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse;margin:0.5em 0}"
        "td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px}th{background:#f3f3f3}img{max-width:100%}"
    )
    atomic_write_bytes(
        out / "report.html",
        (
            f'<!doctype html><html><head><meta charset="utf-8"><title>peg-factory build '
            f"report</title><style>{style}</style></head><body>{''.join(page)}</body></html>\n"
        ).encode(),
    )


def pairs_text(joint: dict[str, Any]) -> str:
    """The (shape, initialisation) pairs a joint choice compared, with their figures, in one line."""
    out = []
    for pair in joint.get("pairs", []):
        figures = []
        if pair.get("knn_accuracy") is not None:
            figures.append(f"k-NN {pair['knn_accuracy']:.3f}")
        if pair.get("val_nll") is not None:
            figures.append(
                f"val NLL {pair['val_nll']:.3f}, acc {pair['val_accuracy']:.3f} at {pair['probe_steps']} steps"
            )
        mark = " (chosen)" if pair.get("chosen") else ""
        out.append(f"({pair['shape']}, {pair['init']}){mark}: {'; '.join(figures) or 'not probed'}")
    return "; ".join(out)
