"""The deploy choice for a device that is not this machine: from its cost model, never from host timings.

``export_model`` times every artifact on the build host; for a profile that *is* this machine
(``measure: true``, e.g. ``host``) the fastest verified one is the right choice. For any other CPU
target (a Raspberry Pi 5, a laptop) the host's x86 timings say nothing about which precision wins
there, so :func:`chooser` predicts each verified artifact's latency with the profile's own latency
model (:func:`factory.device.resolve.latency_model_for` at that artifact's precision: the roofline
from its datasheet figures, its calibration CSV, or its kernel tables) and picks the fastest
predicted, among the artifacts the profile's runtime can run whose precision its datasheet rates. On a CPU
target without a calibration, a reduced precision's prediction is FP32's times the ratio measured on the build
host (:func:`measured_ratio`), not the datasheet's peak ratio.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from export.context import verified_formats
from export.formats import format_spec
from factory.core.shapes import ArchConfig, DescendantShape
from factory.device.profile import Profile


def is_this_machine(profile: Profile | None) -> bool:
    """Whether ``profile`` describes the build host itself (its figures are measured here)."""
    return profile is None or bool(profile.hardware.measure)


def predicted_deployment(
    profile: Profile, arch: ArchConfig, shape: DescendantShape, artifacts: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """The verified artifact ``profile``'s cost model predicts fastest for ``shape`` (see module docstring)."""
    from factory.device.resolve import latency_model_for

    rated = set((profile.hardware.peak_tflops or {}).keys()) or {profile.precision}
    predicted, methods = {}, {}
    for fmt in verified_formats(artifacts):
        spec = format_spec(fmt)  # which runtime runs the artifact, at which precision (the format registry)
        runtime, precision = spec.runtime, spec.precision
        if runtime != profile.hardware.runtime or precision not in rated:
            continue
        ratio = measured_ratio(fmt, artifacts) if profile.hardware.kind == "cpu" and not profile.calibration else None
        if ratio is not None and "fp32" in rated:  # a CPU's reduced precision: FP32's prediction x the measured ratio
            model = latency_model_for(profile.model_copy(update={"precision": "fp32"}), arch=arch)
            predicted[fmt] = round(model.latency_ms(shape) * ratio[0], 4)
            methods[fmt] = (
                f"{model.method}, x {ratio[0]:.2f} = {fmt}'s time over {ratio[1]}'s measured on the build host"
            )
            continue
        model = latency_model_for(profile.model_copy(update={"precision": precision}), arch=arch)
        predicted[fmt] = round(model.latency_ms(shape), 4)
        methods[fmt] = model.method
    if not predicted:
        return {
            "format": "onnx",
            "basis": "none",
            "reason": f"no verified artifact runs on {profile.hardware.runtime} at a precision "
            f"{profile.name}'s datasheet rates; FP32 ONNX",
        }
    best = min(predicted, key=predicted.get)
    base = predicted.get("onnx")
    speed = f", {base / predicted[best]:.2f}x FP32" if base and best != "onnx" else ""
    return {
        "format": best,
        "latency_ms_predicted": predicted[best],
        "basis": f"{profile.name} cost model ({methods[best]})",
        "reason": f"fastest predicted on {profile.name} by its cost model: {predicted[best]:.3f} ms{speed}; host timings "
        "do not transfer to this device",
        "candidates_ms_predicted": predicted,
    }


def measured_ratio(fmt: str, artifacts: dict[str, dict[str, Any]]) -> tuple[float, str] | None:
    """``(t_fmt / t_fp32, fp32 format)``: a reduced-precision artifact's batch-1 time over the FP32 artifact's of the
    same runtime, both measured on the build host; None for an FP32 artifact or without both timings.

    A CPU target's INT8 or BF16 speed-up is this measured ratio, never the datasheet's peak ratio alone (INT8
    peaks at 4x FP32 on paper; on this host the measured INT8 ran 0.9-1.85x, and slower than FP32 for some
    shapes): the ratio of another x86 CPU is not the target's, but it carries the runtime's real INT8 kernels,
    quantise/dequantise overhead and unquantised ops (LayerNorm, Softmax, GELU), which a peak figure does not."""
    spec = format_spec(fmt)
    if spec.precision in (None, "fp32"):
        return None
    base = next(
        (
            name
            for name in artifacts
            if format_spec(name).runtime == spec.runtime and format_spec(name).precision == "fp32"
        ),
        None,
    )
    mine, ref = artifacts[fmt].get("latency_ms_b1"), (artifacts.get(base) or {}).get("latency_ms_b1")
    if base is None or not mine or not ref:
        return None
    return mine / ref, base


def shipped_memory(
    profile: Profile, arch: ArchConfig, shape: DescendantShape, deploy: dict[str, Any]
) -> dict[str, Any]:
    """The memory model's prediction for the artifact that ships (``deploy``): at its runtime and precision (an
    FP32 fallback holds 4x an INT8 profile's weights), with the limit a memory verdict checks it against (the
    memory budget, capped at the device's own memory: :meth:`Profile.limits`)."""
    from factory.device.roofline import memory_mb
    from factory.device.runtimes import runtime_spec

    fmt = deploy.get("format", "onnx")
    spec = format_spec(fmt)
    precision = {"bf16": "fp16"}.get(spec.precision or profile.precision, spec.precision or profile.precision)
    mb = memory_mb(
        shape, profile.batch, precision, spec.runtime, arch=arch, fused_attention=runtime_spec(spec.runtime).fuses
    )
    return {"mb": round(mb, 3), "format": fmt, "precision": precision, "limit_mb": dict(profile.limits())["memory_mb"]}


def chooser(profile: Profile | None) -> Callable[[dict[str, dict[str, Any]], ArchConfig], dict[str, Any]] | None:
    """The ``choose`` hook for :func:`export.api.export_model`: None (host timings decide) for this machine
    or no profile; else :func:`predicted_deployment` for the exported model (``arch`` is its own)."""
    if is_this_machine(profile):
        return None
    return lambda artifacts, arch: predicted_deployment(profile, arch, arch.shape(), artifacts)
