"""The roofline cost model: latency and memory of a ViT shape on a device, from its datasheet (or measured) figures.

**Roofline latency.** A shape at batch ``B`` is lowered to the ops a runtime executes
(:func:`vit_ops`): matmuls (patch embedding, qkv, proj, fc1, fc2, head), attention (``q k^T``,
softmax, ``attn v``) and memory-bound elementwise ops (LayerNorms, GELU, residual adds). Each op
takes

    t_op = A(n) * max( 2 * MACs / (peak * eff_kind),  bytes / (bandwidth * eff_mem) )
           + overhead_op + n * sync_op,          A(n) = 1 + serial_fraction * (n - 1)

(``peak`` in FLOP/s counts 2 FLOPs per multiply-add, as datasheets do; ``n`` is the device's
``cores``, 1 when undeclared), and the latency is ``sum(t_op) + fixed_ms``. ``A(n)`` is Amdahl's
law: ``n`` cores deliver ``n / A(n)`` times one core's throughput, so a 14-core desktop at batch 1
reaches a smaller fraction of its datasheet peak than a 2-core VM. ``sync_op`` is the fork-join
cost per thread of one parallel op. ``bytes`` counts weights plus activations read and written at
the profile's precision, or the weights alone with ``cached_activations`` (a CPU keeps a small
ViT's activations in its caches: only weights stream from DRAM, and an elementwise op costs its
overheads). Runtimes differ in what they fuse: TensorRT fuses attention (no ``N^2`` score traffic)
and folds elementwise ops into neighbours (no per-op overhead for them); onnxruntime on CPU runs
attention as MatMul-Softmax-MatMul, so the ``H*N^2`` scores go through memory, and every op pays
dispatch overhead. :class:`Efficiency` holds the factors: CPU profiles that declare ``cores`` (and
the measured host, on its thread count) get the generic terms fitted on published measurements
(:mod:`factory.device.published`), other devices rough priors, and :func:`factory.device.fit.calibrate` fits them to measured rows.

**Calibration.** Given measured ``(shape, batch, latency)`` rows (a profile's CSV, or host
measurements from :func:`factory.device.measure.measure_onnxruntime_latency`), :func:`factory.device.fit.calibrate` fits the five
:class:`Efficiency` parameters by bounded least squares on ``log(predicted / measured)``.

**Memory.** ``weights + peak activations + runtime overhead`` with weights ``params * bytes``
and peak activations ``B * bytes * (2*N*D + max(3*N*D + S, 2*N*M))`` -- the residual stream and
its normalised copy, plus the larger working set of attention (q, k, v and scores
``S = H*N^2``, zero when fused) or the MLP (hidden pre- and post-GELU).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from factory.core.shapes import STANDARD_ARCH, ArchConfig, DescendantShape, num_tokens, vit_params
from factory.device.profile import Hardware, Profile
from factory.device.runtimes import runtime_spec

BYTES = {"fp32": 4, "fp16": 2, "int8": 1}
OpKind = Literal["matmul", "attention", "elementwise"]


#: The error band of a roofline from declared figures alone, with the priors of :meth:`Efficiency.default_for`: none
#: is known for a device never measured. On the one machine the project can measure, these priors predicted about
#: twice the measured latency (median error 81-124%, predicted/measured about 2.1x; bench/RESULTS.md, "Latency models").
UNCALIBRATED_BAND = (
    "none stated: an uncalibrated roofline with prior efficiencies (on the build host this basis predicted "
    "about 2x the measured latency, median error 81-124%, bench/RESULTS.md); treat it as a rough estimate, "
    "or give the profile a calibration CSV"
)
#: Kernel tables measured on this host, as measured on held-out shapes (bench/latency_model.py, RESULTS.md "Latency models").
TABLES_BAND = (
    "held-out median error 8.3%, 93% of shapes within +-20% (this host's kernel tables, bench/latency_model.py)"
)


@dataclass(frozen=True)
class Op:
    name: str
    kind: OpKind
    macs: int
    bytes: int
    weight_bytes: int = 0  # the part of ``bytes`` that is weights (what streams from DRAM when activations stay cached)


@dataclass(frozen=True)
class Efficiency:
    """Fractions of peak a runtime attains, plus per-op and per-run overheads; ``serial_fraction``,
    ``sync_us_per_thread`` and ``cached_activations`` are the multi-core terms of the module docstring
    (off by default: the priors below predate them)."""

    matmul: float = 0.5
    attention: float = 0.3
    memory: float = 0.6
    op_overhead_us: float = 5.0
    fixed_ms: float = 0.05
    serial_fraction: float = 0.0
    sync_us_per_thread: float = 0.0
    cached_activations: bool = False

    @classmethod
    def default_for(cls, hw: Hardware) -> Efficiency:
        """The runtime's prior on this kind of hardware (:meth:`factory.device.runtimes.RuntimeSpec.prior_for`)."""
        return cls(**runtime_spec(hw.runtime).prior_for(hw.kind))


@dataclass(frozen=True)
class HostFacts:
    """This machine, measured (:func:`factory.device.measure.measure_host`)."""

    peak_flops: float  # fp32 FLOP/s attained by a large GEMM
    bandwidth: float  # bytes/s of a large copy
    threads: int


@dataclass(frozen=True)
class Device:
    """Resolved hardware numbers a cost model needs (declared or measured)."""

    peak_flops: float  # FLOP/s at the profile precision
    bandwidth: float  # bytes/s
    runtime: str
    memory_mb: float
    fused_attention: bool
    cores: int | None = None  # cores the runtime's threads run on (the Amdahl and sync terms); None: 1

    @classmethod
    def from_profile(cls, profile: Profile, host: HostFacts | None = None) -> Device:
        """The profile's declared figures, or ``host``'s measured ones for a ``measure: true`` profile
        (which then needs ``host``: :func:`factory.device.resolve.latency_model_for` measures it)."""
        hw = profile.hardware
        cores = hw.cores
        if hw.measure:
            assert host is not None, "a measured profile needs the host's facts"
            peak, bw = host.peak_flops * {"fp32": 1, "fp16": 1, "int8": 2}[profile.precision], host.bandwidth
            cores = cores or host.threads
        else:
            assert hw.peak_tflops is not None and hw.memory_bandwidth_gbs is not None
            peak, bw = hw.peak_tflops[profile.precision] * 1e12, hw.memory_bandwidth_gbs * 1e9
        return cls(peak, bw, hw.runtime, hw.memory_mb, fused_attention=runtime_spec(hw.runtime).fuses, cores=cores)


def vit_ops(
    shape: DescendantShape,
    batch: int = 1,
    precision: str = "fp32",
    *,
    arch: ArchConfig = STANDARD_ARCH,
    fused_attention: bool = False,
) -> list[tuple[Op, int]]:
    """The ops of one forward pass as ``(op, count)`` pairs (blocks are identical, so each block
    op appears once with ``count = depth``); see the module docstring for what bytes count."""
    b = BYTES[precision]
    n, d, m, h = num_tokens(shape, arch), shape.embed_dim, shape.mlp_hidden, shape.num_heads
    bn = batch * n
    g, c, p = shape.grid**2, arch.in_chans, shape.patch_size

    def mm(name: str, rows: int, k: int, cols: int) -> Op:
        return Op(name, "matmul", rows * k * cols, (rows * k + k * cols + rows * cols) * b, k * cols * b)

    def ew(name: str, elements: int, tensors: int = 2) -> Op:
        return Op(name, "elementwise", 0, elements * tensors * b)

    scores = 0 if fused_attention else 3 * batch * h * n * n * b
    block = [
        ew("norm1", bn * d),
        mm("qkv", bn, d, 3 * d),
        Op("attention", "attention", 2 * batch * n * n * d, 4 * bn * d * b + scores),
        mm("proj", bn, d, d),
        ew("add1", bn * d, 3),
        ew("norm2", bn * d),
        mm("fc1", bn, d, m),
        ew("gelu", bn * m),
        mm("fc2", bn, m, d),
        ew("add2", bn * d, 3),
    ]
    return (
        [(mm("patch_embed", batch * g, c * p * p, d), 1)]
        + [(op, shape.depth) for op in block]
        + [(ew("norm", bn * d), 1), (mm("head", batch, d, max(1, shape.num_classes)), 1)]
    )


def roofline_ms(ops: list[tuple[Op, int]], device: Device, eff: Efficiency) -> float:
    """Sum of per-op roofline times plus overheads, in milliseconds (formula in the module docstring)."""
    peak = {"matmul": device.peak_flops * eff.matmul, "attention": device.peak_flops * eff.attention}
    bw = device.bandwidth * eff.memory
    cores = device.cores or 1
    amdahl = 1.0 + eff.serial_fraction * (cores - 1)
    per_op = (eff.op_overhead_us + cores * eff.sync_us_per_thread) * 1e-6
    skip_elementwise_overhead = runtime_spec(device.runtime).fuses  # fused into neighbouring kernels
    total = 0.0
    for op, count in ops:
        compute = 2 * op.macs / peak[op.kind] if op.kind != "elementwise" else 0.0
        moved = op.weight_bytes if eff.cached_activations else op.bytes
        t = amdahl * max(compute, moved / bw)
        if not (skip_elementwise_overhead and op.kind == "elementwise"):
            t += per_op
        total += t * count
    return total * 1e3 + eff.fixed_ms


def memory_mb(
    shape: DescendantShape,
    batch: int,
    precision: str,
    runtime: str,
    *,
    arch: ArchConfig = STANDARD_ARCH,
    fused_attention: bool = False,
) -> float:
    """Predicted device memory in MB (formula in the module docstring)."""
    b = BYTES[precision]
    n, d, m, h = num_tokens(shape, arch), shape.embed_dim, shape.mlp_hidden, shape.num_heads
    weights = vit_params(shape, arch) * b
    scores = 0 if fused_attention else h * n * n
    acts = batch * b * (2 * n * d + max(3 * n * d + scores, 2 * n * m))
    return (weights + acts) / 1e6 + runtime_spec(runtime).overhead_mb  # an unregistered runtime is an error, not 0 MB


@dataclass(frozen=True)
class CostModel:
    """Latency and memory predictions for one profile (device, precision, batch): the roofline, or
    kernel tables for latency when ``tables`` is set. A :class:`factory.device.latency.LatencyModel`;
    :func:`factory.device.resolve.latency_model_for` decides which a profile gets."""

    device: Device
    precision: str
    batch: int
    efficiency: Efficiency
    arch: ArchConfig = STANDARD_ARCH
    calibrated: bool = False
    tables: Any = None  # factory.device.tables.KernelTables: kernel-level prediction replaces the roofline
    method: str = "roofline"  # how latency is predicted, in words (search output, manifest)
    band: str = UNCALIBRATED_BAND  # its error band and the evidence for it (calibration and tables replace it)

    def latency_ms(self, shape: DescendantShape, batch: int | None = None) -> float:
        if self.tables is not None:
            return self.tables.latency_ms(shape, batch or self.batch, self.arch)
        ops = vit_ops(
            shape, batch or self.batch, self.precision, arch=self.arch, fused_attention=self.device.fused_attention
        )
        return roofline_ms(ops, self.device, self.efficiency)

    def memory_mb(self, shape: DescendantShape) -> float:
        return memory_mb(
            shape,
            self.batch,
            self.precision,
            self.device.runtime,
            arch=self.arch,
            fused_attention=self.device.fused_attention,
        )
