"""A device's performance card: ``OUT/<device>/perf.yaml`` beside the model card, after Qualcomm AI Hub's
per-model ``perf.yaml``, and its table in the report.

One entry per artifact the export wrote (a runtime at a precision):

- ``latency_ms``: ``host`` -- measured on the build host at batch 1 (its CPU named in ``host``; says nothing
  of another target), and ``target`` -- predicted on the device by the profile's cost model for that artifact's
  runtime and precision, with the model's error ``band``; only for the artifacts the profile's runtime runs
  (the deploy choice's candidates, or the shipped artifact). A target that is this machine: ``target`` is the
  measurement.
- ``peak_memory_mb``: a range: low, the artifact's bytes plus its runtime's own overhead
  (:attr:`factory.device.runtimes.RuntimeSpec.overhead_mb`); high, the memory model's peak on the target with
  activations (at least the low end). A model, not a measurement: AI Hub measures it on the device.
- ``compute_unit``: where the ops run -- the profile's hardware kind for its own runtime, ``CPU (XNNPACK)`` for
  ExecuTorch and LiteRT, Core ML's own choice (decided on the device) for a ``.mlpackage``; an artifact of a
  runtime the profile does not name is said to run on none of the device's units.
- ``layers``: the delegate's operators of all (ExecuTorch, LiteRT), or the program's ops (Core ML).
- ``accuracy``: the artifact's accuracy on the task's images and its drop from FP32, and what it was checked on.
- ``ships``: whether it is the deploy choice; the card's ``verdicts`` are about that one.
- ``tool_versions``: the runtime's and the converter's packages as installed on the build host.
"""

from __future__ import annotations

import importlib.metadata as md
from pathlib import Path
from typing import Any

from export.formats import FORMATS
from factory.device.runtimes import RUNTIMES

#: The packages that convert to and run each runtime's artifacts, whose versions a card records.
RUNTIME_PACKAGES = {
    "onnxruntime": ("onnx", "onnxruntime"),
    "openvino": ("openvino", "nncf"),
    "executorch": ("executorch", "torchao"),
    "litert": ("litert-torch", "ai-edge-litert"),
    "coreml": ("coremltools",),
    "tensorrt": ("tensorrt", "onnx"),
}
NOT_ARTIFACTS = ("model", "timm_config")


def versions(packages: tuple[str, ...]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in packages:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def size_mb(path: Path) -> float | None:
    """The bytes of a file, or of every file under a directory (a ``.mlpackage``, a kit), in MB."""
    if path.is_file():
        return path.stat().st_size / 1e6
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1e6
    return None


def compute_unit(fmt: str, art: dict[str, Any], dev: dict[str, Any], kind: str) -> str:
    runtime = FORMATS[fmt].runtime
    if "compute_units" in art:
        return art["compute_units"]
    if runtime in ("executorch", "litert"):
        return "CPU (XNNPACK delegate)"
    if runtime == dev["target"]["runtime"]:
        return kind.upper()
    return f"none on this device (it runs {dev['target']['runtime']}); timed on the build host's CPU"


def entry(fmt: str, art: dict[str, Any], dev: dict[str, Any], device_dir: Path, kind: str) -> dict[str, Any]:
    spec = FORMATS[fmt]
    deploy = dev.get("deploy") or {}
    shipped = dev["latency_ms"].get("shipped") or {}
    predicted = (deploy.get("candidates_ms_predicted") or {}).get(fmt)
    if predicted is None and fmt == shipped.get("format"):
        predicted = shipped.get("ms")
    latency: dict[str, Any] = {}
    if art.get("latency_ms_b1") is not None:
        latency["host"] = art["latency_ms_b1"]
    if predicted is not None:
        latency["target"] = predicted
        latency["target_basis"] = dev.get("latency_method", "the profile's latency model")
        if dev.get("latency_band"):
            latency["band"] = dev["latency_band"]
    size = size_mb(device_dir / Path(art["path"]).relative_to(dev["name"])) if "path" in art else None
    low = (size or 0.0) + RUNTIMES[spec.runtime].overhead_mb
    out: dict[str, Any] = {
        "runtime": spec.runtime,
        "precision": spec.precision or art.get("precision") or dev["target"]["precision"],
        "ships": fmt == deploy.get("format"),
        "latency_ms": latency,
        "peak_memory_mb": [round(low, 1), round(max(low, dev["memory_mb"]["predicted_target"]), 1)],
        "compute_unit": compute_unit(fmt, art, dev, kind),
        "tool_versions": versions(RUNTIME_PACKAGES.get(spec.runtime, ())),
    }
    if "delegated_ops" in art:
        out["layers"] = {"delegated": art["delegated_ops"], "total": art["total_ops"]}
    elif "total_ops" in art:
        out["layers"] = {"total": art["total_ops"]}
    acc = art.get("test_accuracy", art.get("val_accuracy", art.get("typed_val_accuracy")))
    if acc is not None:
        drop = art.get("accuracy_drop_vs_fp32", art.get("typed_accuracy_drop_vs_fp32"))
        out["accuracy"] = {
            "value": acc,
            "split": "test" if "test_accuracy" in art else "val",
            **({"drop_vs_fp32": drop} if drop is not None else {}),
            **({"checked_on": art["checked_on"]} if art.get("checked_on") else {}),
        }
    if art.get("warning"):
        out["warning"] = art["warning"]
    return out


def perf_card(head: dict[str, Any], dev: dict[str, Any], device_dir: Path, host: dict[str, Any]) -> dict[str, Any]:
    """The card of built device ``dev`` (a manifest entry), whose folder's files are in ``device_dir`` (the
    manifest's paths are ``<device>/...``), ``head`` the manifest's build-wide part, ``host`` the build host's
    facts (:func:`factory.device.measure.host_facts`)."""
    profile = dev.get("profile_data") or {}
    kind = (profile.get("hardware") or {}).get("kind", "cpu")
    artifacts = {
        fmt: entry(fmt, art, dev, device_dir, kind)
        for fmt, art in dev.get("artifacts", {}).items()
        if fmt not in NOT_ARTIFACTS and fmt in FORMATS
    }
    shipped = dev["latency_ms"].get("shipped") or {}
    return {
        "model": dev["name"],
        "shape": dev["predicted"]["label"] if "label" in dev.get("predicted", {}) else None,
        "device": {
            "name": dev["name"],
            "description": dev["target"]["description"],
            "runtime": dev["target"]["runtime"],
            "kind": kind,
            "batch": dev["target"]["batch"],
        },
        "host": {"cpu": host.get("cpu"), "cpus": host.get("cpus"), "machine": host.get("machine")},
        "ships": (dev.get("deploy") or {}).get("format", "onnx"),
        "verdicts": {
            "latency_ms": {
                "budget": dev["budgets"].get("latency_ms"),
                "value": shipped.get("ms"),
                "basis": shipped.get("basis"),
                "within": dev["margins"].get("latency_ms", 0) >= 0,
            }
            if "latency_ms" in dev["budgets"]
            else None,
            **{k: {"margin": v, "within": v >= 0} for k, v in dev["margins"].items() if k != "latency_ms"},
        },
        "artifacts": artifacts,
        "tool_versions": head.get("tools", {}),
        **({"formats_not_written": dev["formats_not_written"]} if dev.get("formats_not_written") else {}),
    }


def perf_rows(card: dict[str, Any]) -> list[list[str]]:
    """The report's table of a card: ``[format, runtime, precision, host ms, target ms, peak MB, unit, layers,
    accuracy (drop)]``, the shipped artifact marked."""
    rows = []
    for fmt, e in card["artifacts"].items():
        lat, layers, acc = e["latency_ms"], e.get("layers", {}), e.get("accuracy", {})
        rows.append(
            [
                fmt + (" (ships)" if e["ships"] else ""),
                e["runtime"],
                e["precision"],
                f"{lat['host']:.3f}" if "host" in lat else "",
                f"{lat['target']:.3f}" if "target" in lat else "",
                f"{e['peak_memory_mb'][0]:g}-{e['peak_memory_mb'][1]:g}",
                e["compute_unit"],
                f"{layers.get('delegated', '')}/{layers['total']}".lstrip("/") if layers else "",
                (f"{acc['value']:.4f}" + (f" ({0.0 - acc['drop_vs_fp32']:+.4f})" if "drop_vs_fp32" in acc else ""))
                if acc
                else "",
            ]
        )
    return rows


PERF = ["format", "runtime", "precision", "host ms", "target ms", "peak MB", "compute unit", "layers", "accuracy"]
