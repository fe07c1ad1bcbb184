"""The export formats, registered once: the exporter, the deploy choice, the manifest, the profile schema
and the CLI all read :data:`FORMATS`.

A :class:`FormatSpec` says which runtime runs the artifact and at which precision, whether it needs the
task's images, whether it is *exact* (FP32, verified against PyTorch to 1e-4) or *checked* (a reduced
precision, deployable only within :data:`export.context.MAX_ACCURACY_DROP` of FP32's accuracy), the step
that writes it (``"module:function"``, imported only when the format runs, so reading the registry costs
no torch or runtime import), which formats it needs made first, and the fields of its ``export.json``
entry the build manifest keeps. Adding a format: one module with its step ``fn(run: ExportRun) ->
{artifact name: entry}`` and one entry here (``ARCHITECTURE.md``, "Adding a format or a runtime").

An artifact another format's step records (``openvino-bf16``: the FP32 IR executed in BF16) is
registered too, with ``step=None`` and ``made_by``: it is never requested, but the deploy choice and the
manifest read its runtime, precision and fields here like any other.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

#: Fields every artifact's manifest entry keeps when its export record has them.
COMMON_FIELDS = (
    "sha256",
    "files",
    "weights_sha256",
    "latency_ms_b1",
    "latency_ms_b32",
    "val_accuracy",
    "test_accuracy",
    "accuracy_drop_vs_fp32",
)


def _none(profile: Any) -> tuple[str, ...]:
    return ()


@dataclass(frozen=True)
class FormatSpec:
    name: str
    runtime: str  # a factory.device.runtimes.RUNTIMES name (a test checks each one is registered)
    precision: str | None  # what the deploy choice and the card report: fp32, fp16, bf16, int8; None: the profile's
    step: str | None  # "module:function" writing the artifact(s); None: recorded by ``made_by``'s step
    exact: bool = False  # FP32, verified against PyTorch; else checked by accuracy
    needs_data: bool = True  # task images: calibration or the accuracy check
    fields: tuple[str, ...] = ()  # export.json fields the manifest keeps besides COMMON_FIELDS
    requires: Callable[[Any], tuple[str, ...]] = _none  # (profile or None) -> formats made first
    runtime_only: bool = False  # runs on its own runtime alone: refused for a profile of another runtime
    extra: str | None = None  # "module:function" raising one line naming the pip extra when it is missing
    made_by: str | None = None  # for a recorded-only artifact: the format whose step records it
    summary: str = ""
    # the step's time in units of the measure stage's reference round of the same shape on the same host (an ONNX
    # export, session and timed runs: factory.pipeline.finetune_facts.round_seconds); what the dry run and a time
    # budget plan with. Fitted at 28 px on this host (bench/RESULTS.md, "A wall-clock budget"); a new format: its nearest kin's
    cost: float = 2.0

    @property
    def manifest_fields(self) -> tuple[str, ...]:
        return COMMON_FIELDS + self.fields

    def run(self, export_run) -> dict[str, dict[str, Any]]:
        """Write this format's artifact(s) into ``export_run.tmp``; ``{artifact name: export.json entry}``."""
        from factory.errors import FactoryError

        if self.step is None:
            raise FactoryError(f"{self.name} is recorded by {self.made_by}'s export; request {self.made_by}")
        return _resolve(self.step)(export_run)

    def check_available(self) -> None:
        """Raise one line naming the extra to install when this format's tools are missing."""
        if self.extra is not None:
            _resolve(self.extra)()


def _resolve(ref: str) -> Callable:
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def _int8_qdq_first(profile: Any) -> tuple[str, ...]:
    """A TensorRT INT8 profile builds from the Q/DQ ONNX model, so ``onnx-int8`` is made (and recorded) first."""
    return ("onnx-int8",) if profile is not None and profile.precision == "int8" else ()


#: What an ExecuTorch or LiteRT artifact's manifest entry keeps: its delegate coverage and its check on the task's
#: images.
_DELEGATED_FIELDS = (
    "attention",
    "delegated_ops",
    "total_ops",
    "delegated_fraction",
    "delegated_subgraphs",
    "outside_ops",
    "max_abs_diff_vs_pytorch",
    "top1_agreement",
    "checked_on",
    "warning",
)

_REGISTRY: tuple[FormatSpec, ...] = (
    FormatSpec(
        "onnx",
        "onnxruntime",
        "fp32",
        None,
        exact=True,
        needs_data=False,
        fields=("nodes",),
        summary="FP32 ONNX, verified against PyTorch (always produced: the others derive from it)",
        cost=2.0,
    ),
    FormatSpec(
        "onnx-fp16",
        "onnxruntime",
        "fp16",
        "export.onnx_variants:export_fp16",
        fields=("max_abs_diff_vs_fp32",),
        summary="FP16 weights and compute, FP32 inputs/outputs and LayerNorm/Softmax",
        cost=1.5,
    ),
    FormatSpec(
        "onnx-int8",
        "onnxruntime",
        "int8",
        "export.onnx_variants:export_int8",
        fields=("mode",),
        summary="static Q/DQ calibrated on the task's training images (dynamic without data)",
        cost=3.0,
    ),
    FormatSpec(
        "openvino",
        "openvino",
        "fp32",
        "export.openvino_export:export_openvino",
        exact=True,
        fields=("inference_precision", "latency_ms_b1_p90", "benchmark_app"),
        extra="export.openvino_export:require_openvino",
        summary="FP32 IR (also timed with BF16 execution where the CPU has it, as openvino-bf16)",
        cost=3.8,
    ),
    FormatSpec(
        "openvino-bf16",
        "openvino",
        "bf16",
        None,
        made_by="openvino",
        fields=("execution_precision", "inference_precision", "latency_ms_b1_p90", "benchmark_app"),
        summary="the FP32 IR executed in BF16 (recorded by openvino)",
        cost=0.0,
    ),
    FormatSpec(
        "openvino-int8",
        "openvino",
        "int8",
        "export.openvino_export:export_openvino_int8",
        fields=("inference_precision", "latency_ms_b1_p90", "benchmark_app"),
        requires=lambda p: ("openvino",),
        extra="export.openvino_export:require_openvino",
        summary="NNCF post-training INT8 IR",
        cost=13.0,
    ),
    FormatSpec(
        "executorch",
        "executorch",
        "fp32",
        "export.executorch_export:export_executorch",
        exact=True,
        fields=_DELEGATED_FIELDS,
        extra="export.executorch_export:require_executorch",
        summary="XNNPACK-delegated ExecuTorch program (.pte, batch 1), verified on the task's test images",
        cost=6.0,
    ),
    FormatSpec(
        "executorch-int8",
        "executorch",
        "int8",
        "export.executorch_export:export_executorch_int8",
        fields=(*_DELEGATED_FIELDS, "calibration_images"),
        requires=lambda p: ("executorch",),
        extra="export.executorch_export:require_executorch",
        summary="PT2E INT8 for XNNPACK calibrated on the task's training images (.pte)",
        cost=8.0,
    ),
    FormatSpec(
        "litert",
        "litert",
        "fp32",
        "export.litert_export:export_litert",
        exact=True,
        fields=_DELEGATED_FIELDS,
        extra="export.litert_export:require_litert",
        summary="LiteRT (TFLite) flatbuffer (.tflite, batch 1) run by ai-edge-litert with XNNPACK, verified on the "
        "task's test images",
        cost=6.0,
    ),
    FormatSpec(
        "litert-int8",
        "litert",
        "int8",
        "export.litert_export:export_litert_int8",
        fields=(*_DELEGATED_FIELDS, "calibration_images"),
        requires=lambda p: ("litert",),
        extra="export.litert_export:require_litert",
        summary="PT2E static INT8 LiteRT flatbuffer calibrated on the task's training images (.tflite)",
        cost=8.0,
    ),
    FormatSpec(
        "coreml",
        "coreml",
        "fp16",
        "export.coreml_export:export_coreml",
        fields=(
            "package",
            "deployment_target",
            "compute_precision",
            "compute_units",
            "total_ops",
            "op_types",
            "runs_here",
            "checked_on",
            "max_abs_diff_vs_pytorch",
            "top1_agreement",
        ),
        extra="export.coreml_export:require_coreml",
        summary="FP16 Core ML ML Program (.mlpackage, iOS 17+), checked by coremltools; run only on Apple devices",
        cost=5.0,
    ),
    FormatSpec(
        "trt",
        "tensorrt",
        None,
        "export.trt_format:export_trt",
        runtime_only=True,
        requires=_int8_qdq_first,
        fields=("kind", "precision", "typed_model", "reason", "typed_val_accuracy", "typed_accuracy_drop_vs_fp32"),
        summary="a TensorRT engine built here, or the on-device build kit (trt_kit/)",
        cost=1.4,
    ),
)

#: Every registered artifact kind, by name, in the order the exporter runs them.
FORMATS: dict[str, FormatSpec] = {spec.name: spec for spec in _REGISTRY}
#: The formats a user may request (``--format``, a profile's ``export`` list).
FORMAT_NAMES: tuple[str, ...] = tuple(name for name, spec in FORMATS.items() if spec.step is not None or name == "onnx")
Format = Literal[FORMAT_NAMES]  # type: ignore[valid-type]  # the profile schema's enum, from the registry


def format_spec(name: str) -> FormatSpec:
    """The registered spec of ``name``; a name missing from the registry is an error, never a default."""
    from factory.errors import FactoryError  # imported here: the profile schema reads this module while factory loads

    try:
        return FORMATS[name]
    except KeyError:
        raise FactoryError(f"unknown export format {name!r}; choose from {', '.join(FORMAT_NAMES)}") from None


def with_requirements(formats: list[str], profile: Any = None) -> list[str]:
    """``formats`` plus the formats they need made first, in registry order (``onnx`` always first)."""
    wanted = {"onnx"}
    pending = list(formats)
    while pending:
        name = pending.pop()
        if name not in wanted:
            wanted.add(name)
            pending.extend(format_spec(name).requires(profile))
    return [name for name in FORMATS if name in wanted]
