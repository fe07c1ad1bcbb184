"""The device runtimes, registered once: the profile schema, the roofline, the calibration fit and kit,
the kernel tables and the deploy choice read :data:`RUNTIMES`.

A :class:`RuntimeSpec` holds what the cost model must know of a runtime -- its memory overhead, whether it
fuses attention and elementwise ops (TensorRT's MHA kernels; OpenVINO's CPU plugin with SDPA fusion and
eltwise post-ops; onnxruntime on CPU runs attention as MatMul-Softmax-MatMul, every op dispatched), its
prior efficiencies per hardware kind until a calibration replaces them -- and how the calibration kit
times it on the device (``kit_timer``: a function of ``factory/device/templates/measure.py``). Which
artifacts it runs is the format registry's answer (:func:`formats_of`), never a second list. A name
missing from the registry is an error (:func:`runtime_spec`), never a silent default.

Adding a runtime: one entry here, its timer in the kit's ``measure.py``, and its formats' entries in
:mod:`export.formats` (``ARCHITECTURE.md``, "Adding a format or a runtime").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from factory.errors import FactoryError

Kind = Literal["cpu", "gpu", "npu"]


@dataclass(frozen=True)
class RuntimeSpec:
    name: str
    kinds: tuple[Kind, ...]  # hardware kinds it runs on
    overhead_mb: float  # the runtime's own memory beside weights and activations (the memory model's constant)
    fuses: bool  # attention fused (no N^2 scores through memory) and elementwise ops folded into neighbours
    kit_timer: str | None  # the calibration kit's timing function (factory/device/templates/measure.py)
    #: prior Efficiency fields by hardware kind ("*": any other kind); {} is Efficiency()'s defaults
    priors: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    kernel_tables: bool = False  # `peg-factory profiles measure` can time its kernels on this host
    typed_kit_models: bool = False  # builds strongly typed: the kit ships FP16 / Q/DQ twins of its models
    deployable: bool = True  # a profile may name it (False: a basis of the cost model only)
    # "module:function" writing the kit model's twin this runtime loads ((onnx path, torch model, input shape) ->
    # path), e.g. an ExecuTorch .pte beside each kit .onnx; None: the runtime reads the ONNX model itself
    kit_model: str | None = None

    def prior_for(self, kind: str) -> Mapping[str, float]:
        """The prior efficiencies on hardware of ``kind`` (a calibration CSV replaces them)."""
        return self.priors.get(kind, self.priors.get("*", {}))


_CPU_PRIOR = {"matmul": 0.45, "attention": 0.25, "memory": 0.5, "op_overhead_us": 8.0, "fixed_ms": 0.03}

_REGISTRY: tuple[RuntimeSpec, ...] = (
    RuntimeSpec(
        "tensorrt",
        ("gpu",),
        overhead_mb=40.0,
        fuses=True,
        kit_timer="tensorrt_ms",
        typed_kit_models=True,
        priors={"*": {"matmul": 0.6, "attention": 0.4, "memory": 0.7, "op_overhead_us": 3.0, "fixed_ms": 0.05}},
    ),
    RuntimeSpec(
        "onnxruntime",
        ("cpu", "gpu", "npu"),
        overhead_mb=20.0,
        fuses=False,
        kit_timer="onnxruntime_ms",
        kernel_tables=True,
        priors={"cpu": _CPU_PRIOR},
    ),
    # fewer, fused ops than onnxruntime on the same CPU; calibrate with real rows
    RuntimeSpec(
        "openvino",
        ("cpu", "gpu", "npu"),
        overhead_mb=30.0,
        fuses=True,
        kit_timer="openvino_ms",
        priors={"*": {"matmul": 0.5, "attention": 0.35, "memory": 0.55, "op_overhead_us": 5.0, "fixed_ms": 0.05}},
    ),
    # ExecuTorch with the XNNPACK delegate (phones, ARM boards): kernels per op like onnxruntime's CPU provider
    RuntimeSpec(
        "executorch",
        ("cpu",),
        overhead_mb=10.0,
        fuses=False,
        kit_timer="executorch_ms",
        priors={"cpu": _CPU_PRIOR},
        kit_model="export.executorch_export:kit_model",
    ),
    # LiteRT (the TFLite runtime) with its default XNNPACK delegate (Android phones, ARM boards): per-op kernels
    RuntimeSpec(
        "litert",
        ("cpu",),
        overhead_mb=10.0,
        fuses=False,
        kit_timer="litert_ms",
        priors={"cpu": _CPU_PRIOR},
        kit_model="export.litert_export:kit_model",
    ),
    # Core ML on Apple silicon (iPhone, iPad, Mac): Core ML places each op on the Neural Engine, the GPU or the
    # CPU at load time. Its priors are guesses until a calibration: ViTs not rewritten for the Neural Engine
    # (Apple's "Deploying Transformers on the Apple Neural Engine", 2022) reach a small share of its peak
    RuntimeSpec(
        "coreml",
        ("npu", "gpu", "cpu"),
        overhead_mb=30.0,
        fuses=True,
        kit_timer="coreml_ms",
        priors={"*": {"matmul": 0.15, "attention": 0.1, "memory": 0.5, "op_overhead_us": 15.0, "fixed_ms": 0.3}},
        kit_model="export.coreml_export:kit_model",
    ),
    # the published latencies the CPU terms are fitted on (timm's benchmark tables: PyTorch, torch.compile)
    RuntimeSpec("pytorch", ("cpu", "gpu"), overhead_mb=0.0, fuses=False, kit_timer=None, deployable=False),
)

#: Every registered runtime, by name.
RUNTIMES: dict[str, RuntimeSpec] = {spec.name: spec for spec in _REGISTRY}
#: The runtimes a profile may name.
RUNTIME_NAMES: tuple[str, ...] = tuple(name for name, spec in RUNTIMES.items() if spec.deployable)
Runtime = Literal[RUNTIME_NAMES]  # type: ignore[valid-type]  # the profile schema's enum, from the registry


def runtime_spec(name: str) -> RuntimeSpec:
    """The registered spec of ``name``; one line naming the registered ones otherwise."""
    if name in RUNTIMES:
        return RUNTIMES[name]
    else:
        raise FactoryError(f"unknown runtime {name!r}; registered runtimes: {', '.join(RUNTIME_NAMES)}") from None


def formats_of(runtime: str) -> tuple[str, ...]:
    """The export formats whose artifacts ``runtime`` runs (from :data:`export.formats.FORMATS`)."""
    from export.formats import FORMATS

    return tuple(name for name, spec in FORMATS.items() if spec.runtime == runtime)
