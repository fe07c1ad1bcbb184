"""The deploy choice for a device that is not this machine: from its cost model, never from host timings.

``export_model`` times every artifact on the build host; for a profile that *is* this machine
(``measure: true``, e.g. ``host``) the fastest verified one is the right choice. For any other CPU
target (a Raspberry Pi 5, a laptop) the host's x86 timings say nothing about which precision wins
there, so :func:`chooser` predicts each verified artifact's latency with the profile's own latency
model (:func:`factory.device.resolve.latency_model_for` at that artifact's precision: the roofline
from its datasheet figures, its calibration CSV, or its kernel tables) and picks the fastest
predicted, among the artifacts the profile's runtime can run whose precision its datasheet rates.
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


def chooser(profile: Profile | None) -> Callable[[dict[str, dict[str, Any]], ArchConfig], dict[str, Any]] | None:
    """The ``choose`` hook for :func:`export.api.export_model`: None (host timings decide) for this machine
    or no profile; else :func:`predicted_deployment` for the exported model (``arch`` is its own)."""
    if is_this_machine(profile):
        return None
    return lambda artifacts, arch: predicted_deployment(profile, arch, arch.shape(), artifacts)
