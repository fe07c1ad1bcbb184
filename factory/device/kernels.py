"""Kernel-level latency prediction for onnxruntime on CPU, from measured look-up tables.

nn-Meter's recipe, for the ops of a timm ViT as onnxruntime runs them after its graph
optimisations (checked on the exported graph: LayerNormalization and BiasGelu fused, MatMul and
its bias Add kept apart, attention left as reshape/transpose/scale/MatMul/Softmax/MatMul):

=============  ======================  =====================================================
kernel         table axes              what the micro-model runs
=============  ======================  =====================================================
linear         rows, in, out           MatMul [1,rows,in] x [in,out] + bias Add
linear_gelu    rows, in, out           MatMul + BiasGelu (fc1)
attention      batch*heads, tokens,    Reshape, Transpose, Split, scale Muls, q k^T MatMul,
               head_dim                Softmax, MatMul with v, Transpose, Reshape
layernorm      rows, width             LayerNormalization
add            rows, width             Add (residual)
stem           rows (= batch*grid^2),  Conv (stride = patch), Reshape, Transpose, Concat of the
               width                   class token, Add of the position embedding
=============  ======================  =====================================================

A shape at batch ``B`` (``N`` tokens, width ``D``, ``H`` heads, hidden ``M``, ``G`` patches) is

    t_kernels = stem(B*G, D) + depth * [2 ln(BN, D) + lin(BN, D, 3D) + attn(BH, N, D/H)
                + lin(BN, D, D) + 2 add(BN, D) + lin_gelu(BN, D, M) + lin(BN, M, D)]
                + ln(BN, D) + lin(B, D, classes)

where each term is interpolated (multilinear in log size, log time; linear extrapolation
beyond the grid) from that kernel's own measurements, net of the runtime's empty-run time.
The whole-model time adds what single kernels do not show -- the small shape ops between
kernels (attention's scale computed from shapes at run time), cache misses when weights are
not resident -- through three terms fitted, per batch size, on whole models measured with the
tables (a batch with no fitted terms uses the nearest one's):

    t = scale_B * t_kernels + per_block_ms_B * depth + fixed_ms_B.

Per batch size because the missing part differs in kind: at batch 1 the kernels are small and
weight-bound, so dispatch and cold weights weigh more than at batch 8, where compute dominates.

:func:`measure_tables` measures everything (grids spanning a search space, a handful of whole
models for the three terms) on this host; :func:`host_tables_path` is where the CLI caches them,
per host and onnxruntime version (``peg-factory profiles measure``).
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from factory.errors import FactoryError
from factory.core.shapes import ArchConfig, DescendantShape, num_tokens

FORMAT = 2
KERNELS = ("linear", "linear_gelu", "attention", "layernorm", "add", "stem")


# -- micro-models -----------------------------------------------------------------------------------

def _model(nodes, inputs, outputs, initializers):
    from onnx import helper

    graph = helper.make_graph(nodes, "kernel", inputs, outputs, initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    return model


def _tensor(name, shape, rng):
    import numpy as np
    from onnx import numpy_helper

    return numpy_helper.from_array((rng.standard_normal(shape) * 0.02).astype(np.float32), name)


def kernel_model(kernel: str, dims: tuple[int, ...], arch: ArchConfig):
    """The one-kernel ONNX model of ``kernel`` at table point ``dims`` and its input shape."""
    import numpy as np
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    f = TensorProto.FLOAT
    vi = helper.make_tensor_value_info
    if kernel in ("linear", "linear_gelu"):
        rows, k, c = dims
        act = (helper.make_node("Add", ["mm", "b"], ["y"]) if kernel == "linear"
               else helper.make_node("BiasGelu", ["mm", "b"], ["y"], domain="com.microsoft"))
        nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"]), act]
        return _model(nodes, [vi("x", f, [1, rows, k])], [vi("y", f, [1, rows, c])],
                      [_tensor("w", (k, c), rng), _tensor("b", (c,), rng)]), (1, rows, k)
    if kernel == "layernorm":
        rows, d = dims
        nodes = [helper.make_node("LayerNormalization", ["x", "g", "b"], ["y"], axis=-1, epsilon=1e-6)]
        return _model(nodes, [vi("x", f, [1, rows, d])], [vi("y", f, [1, rows, d])],
                      [_tensor("g", (d,), rng), _tensor("b", (d,), rng)]), (1, rows, d)
    if kernel == "add":
        rows, d = dims
        nodes = [helper.make_node("Add", ["x", "r"], ["y"])]
        return _model(nodes, [vi("x", f, [1, rows, d])], [vi("y", f, [1, rows, d])], [_tensor("r", (1, rows, d), rng)]), (1, rows, d)
    if kernel == "attention":
        bh, n, dh = dims
        scale = np.array(dh**-0.25, np.float32)
        from onnx import numpy_helper

        inits = [numpy_helper.from_array(np.array([1, n, 3, bh, dh], np.int64), "s5"),
                 numpy_helper.from_array(np.array([1, n, bh * dh], np.int64), "s3"),
                 numpy_helper.from_array(scale, "scale"), numpy_helper.from_array(np.array([0], np.int64), "ax0")]
        nodes = [
            helper.make_node("Reshape", ["x", "s5"], ["r"]),
            helper.make_node("Transpose", ["r"], ["t"], perm=[2, 0, 3, 1, 4]),
            helper.make_node("Split", ["t"], ["q0", "k0", "v0"], axis=0),
            helper.make_node("Squeeze", ["q0", "ax0"], ["q1"]),
            helper.make_node("Squeeze", ["k0", "ax0"], ["k1"]),
            helper.make_node("Squeeze", ["v0", "ax0"], ["v"]),
            helper.make_node("Mul", ["q1", "scale"], ["q"]),
            helper.make_node("Transpose", ["k1"], ["kt"], perm=[0, 1, 3, 2]),
            helper.make_node("Mul", ["kt", "scale"], ["k"]),
            helper.make_node("MatMul", ["q", "k"], ["s"]),
            helper.make_node("Softmax", ["s"], ["p"], axis=-1),
            helper.make_node("MatMul", ["p", "v"], ["o"]),
            helper.make_node("Transpose", ["o"], ["ot"], perm=[0, 2, 1, 3]),
            helper.make_node("Reshape", ["ot", "s3"], ["y"]),
        ]
        return _model(nodes, [vi("x", f, [1, n, 3 * bh * dh])], [vi("y", f, [1, n, bh * dh])], inits), (1, n, 3 * bh * dh)
    if kernel == "stem":
        rows, d = dims
        g = max(1, round(math.sqrt(rows)))
        p, c = arch.patch_size, arch.in_chans
        from onnx import numpy_helper

        n = g * g + 1
        inits = [_tensor("w", (d, c, p, p), rng), _tensor("cb", (d,), rng), _tensor("cls", (1, 1, d), rng),
                 _tensor("pos", (1, n, d), rng), numpy_helper.from_array(np.array([1, d, g * g], np.int64), "s")]
        nodes = [
            helper.make_node("Conv", ["x", "w", "cb"], ["c"], strides=[p, p], kernel_shape=[p, p]),
            helper.make_node("Reshape", ["c", "s"], ["r"]),
            helper.make_node("Transpose", ["r"], ["t"], perm=[0, 2, 1]),
            helper.make_node("Concat", ["cls", "t"], ["cat"], axis=1),
            helper.make_node("Add", ["cat", "pos"], ["y"]),
        ]
        return _model(nodes, [vi("x", f, [1, c, g * p, g * p])], [vi("y", f, [1, n, d])], inits), (1, c, g * p, g * p)
    raise FactoryError(f"unknown kernel {kernel!r}; known: {', '.join(KERNELS)}")


def empty_model():
    from onnx import TensorProto, helper

    node = helper.make_node("Identity", ["x"], ["y"])
    return _model([node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], []), (1, 8)


# -- timing ---------------------------------------------------------------------------------------------

def time_onnx(model, input_shape, *, min_repeats: int = 5, budget_s: float = 0.05, stat: str = "median") -> float:
    """``session.run`` wall time in ms of an in-memory ONNX model (a session as
    :func:`export.runtime.ort_session` makes it), repeated until ``budget_s`` or ``min_repeats``;
    the ``stat`` of the runs (:func:`export.runtime.summarise_times`)."""
    import numpy as np

    from export.runtime import ort_session, summarise_times

    sess = ort_session(model.SerializeToString())
    feed = {sess.get_inputs()[0].name: np.random.default_rng(0).standard_normal(input_shape).astype(np.float32)}
    for _ in range(2):
        sess.run(None, feed)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_repeats or (time.perf_counter() - start < budget_s and len(times) < 200):
        t0 = time.perf_counter()
        sess.run(None, feed)
        times.append((time.perf_counter() - t0) * 1e3)
    return summarise_times(times, stat)


# -- tables ---------------------------------------------------------------------------------------------

def _geom(lo: int, hi: int, n: int) -> list[int]:
    """``n`` integers spread geometrically over ``[lo, hi]`` (deduplicated)."""
    if hi <= lo or n < 2:
        return [lo]
    return sorted({round(lo * (hi / lo) ** (i / (n - 1))) for i in range(n)})


@dataclass(frozen=True)
class Grids:
    """Table axes spanning a search space: rows (batch x tokens), widths, hidden sizes, tokens, heads."""

    rows: list[int]
    widths: list[int]
    tokens: list[int]
    batch_heads: list[int]
    head_dims: list[int]
    stem_rows: list[int]

    @classmethod
    def spanning(cls, arch: ArchConfig, *, max_width: int, max_hidden: int, img_sizes: tuple[int, ...], batches: tuple[int, ...],
                 max_heads: int, points: int = 6) -> "Grids":
        grids = [s // arch.patch_size for s in img_sizes]
        n_lo, n_hi = min(grids) ** 2 + arch.num_prefix_tokens, max(grids) ** 2 + arch.num_prefix_tokens
        return cls(rows=_geom(1, max(batches) * n_hi, points + 2), widths=_geom(16, max(max_width, max_hidden, 3 * max_width), points + 1),
                   tokens=_geom(max(2, n_lo), n_hi, points - 2), batch_heads=_geom(1, max(batches) * max_heads, points - 2),
                   head_dims=_geom(16, 128, 3), stem_rows=sorted({g * g for g in _geom(min(grids), max(grids) * 3, points - 2)}))

    @classmethod
    def for_space(cls, space, arch: ArchConfig, batches: tuple[int, ...], points: int = 6) -> "Grids":
        """Grids spanning every shape of a :class:`factory.device.search.SearchSpace` at ``batches``."""
        widths = space._widths
        return cls.spanning(arch, max_width=max(w for w, _, _ in widths), max_hidden=max(int(w * max(r)) for w, _, r in widths),
                            img_sizes=tuple(space.img_sizes), batches=batches, max_heads=max(max(h) for _, h, _ in widths),
                            points=points)

    def axes(self, kernel: str) -> list[list[int]]:
        return {"linear": [self.rows, self.widths, self.widths], "linear_gelu": [self.rows, self.widths, self.widths],
                "attention": [self.batch_heads, self.tokens, self.head_dims], "layernorm": [self.rows, self.widths],
                "add": [self.rows, self.widths], "stem": [self.stem_rows, self.widths]}[kernel]


@dataclass
class KernelTables:
    """Measured kernel times (ms, net of the empty run) on grids, plus the whole-model terms."""

    host: dict[str, Any]
    arch: dict[str, Any]
    empty_ms: float
    tables: dict[str, dict[str, Any]]  # kernel -> {"axes": [[...]], "ms": nested list}
    terms: dict[str, list[float]] = field(default_factory=dict)  # batch -> [scale, per_block_ms, fixed_ms]
    fit_rows: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    _memo: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def points(self) -> int:
        return sum(math.prod(len(a) for a in t["axes"]) for t in self.tables.values())

    # -- prediction --
    def _interpolator(self, kernel: str) -> Callable[[tuple[int, ...]], float]:
        """Multilinear in log(dims) -> log(ms), extrapolating linearly; axes with one point are constant."""
        import numpy as np
        from scipy.interpolate import RegularGridInterpolator

        t = self.tables[kernel]
        axes = [np.log(np.asarray(a, dtype=float)) for a in t["axes"]]
        values = np.log(np.maximum(np.asarray(t["ms"], dtype=float), 1e-4)).reshape([len(a) for a in axes])
        keep = [i for i, a in enumerate(axes) if len(a) > 1]
        for i in reversed(range(len(axes))):
            if i not in keep:
                values = values.take(0, axis=i)
        if not keep:
            constant = float(np.exp(values))
            return lambda dims: constant
        rgi = RegularGridInterpolator([axes[i] for i in keep], values, bounds_error=False, fill_value=None)
        return lambda dims: float(np.exp(rgi(np.log([[max(1, dims[i]) for i in keep]]))[0]))

    def kernel_ms(self, kernel: str, dims: tuple[int, ...]) -> float:
        """One kernel's predicted time (ms, net of the empty run), memoised per ``(kernel, dims)``."""
        key = (kernel, dims)
        if key not in self._memo:
            if kernel not in self._memo:
                self._memo[kernel] = self._interpolator(kernel)
            self._memo[key] = self._memo[kernel](dims)
        return self._memo[key]

    def kernel_sum_ms(self, shape: DescendantShape, batch: int, arch: ArchConfig) -> float:
        """``t_kernels`` of the module docstring."""
        n, d, m, h = num_tokens(shape, arch), shape.embed_dim, shape.mlp_hidden, shape.num_heads
        bn, k = batch * n, self.kernel_ms
        block = (2 * k("layernorm", (bn, d)) + k("linear", (bn, d, 3 * d)) + k("attention", (batch * h, n, d // h))
                 + k("linear", (bn, d, d)) + 2 * k("add", (bn, d)) + k("linear_gelu", (bn, d, m)) + k("linear", (bn, m, d)))
        return (k("stem", (batch * shape.grid**2, d)) + shape.depth * block + k("layernorm", (bn, d))
                + k("linear", (batch, d, max(1, shape.num_classes))))

    def terms_for(self, batch: int) -> tuple[float, float, float]:
        """``(scale, per_block_ms, fixed_ms)`` fitted at ``batch``, else at the nearest fitted batch (log scale)."""
        if not self.terms:
            return 1.0, 0.0, 0.0
        key = min(self.terms, key=lambda b: abs(math.log(int(b)) - math.log(batch)))
        scale, per_block, fixed = self.terms[key]
        return scale, per_block, fixed

    def latency_ms(self, shape: DescendantShape, batch: int, arch: ArchConfig) -> float:
        scale, per_block, fixed = self.terms_for(batch)
        return scale * self.kernel_sum_ms(shape, batch, arch) + per_block * shape.depth + fixed + self.empty_ms

    def describe_terms(self) -> str:
        return "; ".join(f"batch {b}: scale {t[0]:.3f}, {t[1] * 1e3:.1f} us per block, fixed {t[2] * 1e3:.1f} us"
                         for b, t in sorted(self.terms.items(), key=lambda kv: int(kv[0]))) or "none fitted"

    # -- fitting the whole-model terms --
    def fit(self, rows: list[tuple[DescendantShape, int, float]], arch: ArchConfig) -> None:
        """Per batch size, least squares for ``scale, per_block_ms, fixed_ms`` on measured whole
        models (relative errors; scale in [0.3, 3], non-negative per-block time)."""
        import numpy as np
        from scipy.optimize import lsq_linear

        self.terms = {}
        for batch in sorted({b for _, b, _ in rows}):
            mine = [(s, t) for s, b, t in rows if b == batch]
            measured = np.array([t for _, t in mine])
            a = np.array([[self.kernel_sum_ms(s, batch, arch), s.depth, 1.0] for s, _ in mine]) / measured[:, None]
            y = (measured - self.empty_ms) / measured
            res = lsq_linear(a, y, bounds=([0.3, 0.0, -self.empty_ms], [3.0, np.inf, np.inf]))
            self.terms[str(batch)] = [float(v) for v in res.x]
        self.fit_rows = [{"shape": s.label(), "batch": b, "measured_ms": round(t, 4)} for s, b, t in rows]

    # -- persistence --
    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "host": self.host, "arch": self.arch, "empty_ms": self.empty_ms, "tables": self.tables,
                "terms": self.terms, "fit_rows": self.fit_rows,
                "seconds": self.seconds}

    def save(self, path: str | Path) -> None:
        from factory.pipeline.artifacts import atomic_write_bytes

        atomic_write_bytes(path, json.dumps(self.to_dict(), indent=1).encode())

    @classmethod
    def load(cls, path: str | Path) -> "KernelTables":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
            if data.get("format") != FORMAT:
                raise ValueError(f"format {data.get('format')!r}, expected {FORMAT}")
            tables = cls(data["host"], data["arch"], float(data["empty_ms"]), data["tables"],
                         {str(b): [float(v) for v in t] for b, t in data["terms"].items()}, data.get("fit_rows", []),
                         data.get("seconds", 0.0))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise FactoryError(f"latency tables {path}: unreadable ({exc}); re-measure with `peg-factory profiles measure`") from exc
        for kernel in KERNELS:
            if kernel not in tables.tables:
                raise FactoryError(f"latency tables {path}: kernel {kernel!r} missing; re-measure with `peg-factory profiles measure`")
        return tables


def host_facts() -> dict[str, Any]:
    """What identifies this host and runtime for the tables: CPU model, CPU count, versions."""
    import onnxruntime as ort

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"node": platform.node(), "cpu": cpu, "cpus": cpus, "machine": platform.machine(), "runtime": "onnxruntime",
            "runtime_version": ort.__version__}


def host_tables_path(arch: ArchConfig) -> Path:
    """``cache_dir()/latency_tables/onnxruntime-<host>-<arch>.json``: one file per CPU model, CPU
    count, onnxruntime version and ancestry architecture (the stem kernel depends on its channels
    and patch size)."""
    import hashlib

    from factory.pipeline.fingerprint import cache_dir

    facts = host_facts()
    host = json.dumps({k: facts[k] for k in ("cpu", "cpus", "machine", "runtime_version")}, sort_keys=True)
    return cache_dir() / "latency_tables" / (f"onnxruntime-{hashlib.sha256(host.encode()).hexdigest()[:12]}-"
                                             f"{hashlib.sha256(json.dumps(arch.to_dict(), sort_keys=True).encode()).hexdigest()[:8]}.json")


REFERENCE_KERNEL = ("linear", (128, 256, 768))


def measure_tables(arch: ArchConfig, grids: Grids, *, fit_shapes: list[tuple[DescendantShape, int]] = (),
                   log: Callable[[str], None] = lambda _: None, budget_s: float = 0.05, probe_every: int = 12,
                   stat: str = "median") -> KernelTables:
    """Measure every kernel on its grid (and the ``fit_shapes`` whole models for the three
    whole-model terms) with onnxruntime on this host.

    Hosts change speed while they are measured (turbo and thermal limits, shared VMs: the build VM
    drifted up to 1.9x within minutes). A reference kernel (:data:`REFERENCE_KERNEL`) is timed
    before the first point and every ``probe_every`` points; each measurement is scaled to the
    speed of the first probe, interpolating between the probes around it. The probe times are kept
    in the tables (``probes_ms``) to show how much the host moved. Every timing is the ``stat``
    (``median`` or ``min``, :func:`export.runtime.summarise_times`) of its runs; the tables record
    which, and predict that statistic.
    """
    import itertools

    import numpy as np

    t0 = time.perf_counter()
    empty = min(time_onnx(*empty_model(), budget_s=0.1, stat=stat) for _ in range(3))
    ref_model = kernel_model(REFERENCE_KERNEL[0], REFERENCE_KERNEL[1], arch)
    probes: list[tuple[int, float]] = []  # (measurement index, reference ms)
    raw: list[float] = []

    def probe() -> None:
        probes.append((len(raw), time_onnx(*ref_model, budget_s=budget_s, stat=stat)))

    def timed(model) -> None:
        if len(raw) % probe_every == 0:
            probe()
        raw.append(time_onnx(*model, budget_s=budget_s, stat=stat))

    slots: list[tuple[str, tuple[int, ...]]] = []
    for kernel in KERNELS:
        axes = grids.axes(kernel)
        for index in itertools.product(*[range(len(a)) for a in axes]):
            timed(kernel_model(kernel, tuple(a[i] for a, i in zip(axes, index)), arch))
            slots.append((kernel, index))
        log(f"measured {kernel}: {math.prod(len(a) for a in axes)} points")
    whole = []
    if fit_shapes:
        from factory.device.cost import measure_onnxruntime_latency

        for s, b in fit_shapes:
            probe()
            raw.append(measure_onnxruntime_latency(s, b, arch=arch, stat=stat))
            whole.append((s, b))
    probe()
    # speed factor per measurement: first probe / reference interpolated at that measurement
    at, ref = np.array([i for i, _ in probes], float), np.array([r for _, r in probes])
    factor = ref[0] / np.interp(np.arange(len(raw)), at, ref)
    normalised = np.asarray(raw) * factor
    tables = {k: {"axes": grids.axes(k), "ms": np.zeros([len(a) for a in grids.axes(k)])} for k in KERNELS}
    for (kernel, index), value in zip(slots, normalised):
        tables[kernel]["ms"][index] = max(1e-4, value - empty)
    for t in tables.values():
        t["ms"] = t["ms"].tolist()
    result = KernelTables(host_facts(), arch.to_dict(), empty, tables)
    result.host["probes_ms"] = [round(r, 4) for _, r in probes]
    result.host["stat"] = stat
    if whole:
        rows = [(s, b, float(t)) for (s, b), t in zip(whole, normalised[len(slots):])]
        result.fit(rows, arch)
        log(f"fitted whole-model terms on {len(rows)} models: {result.describe_terms()}")
    log(f"host speed during the measurement: reference kernel {ref.min():.3f}-{ref.max():.3f} ms ({ref.max() / ref.min():.2f}x), "
        "normalised to the first probe")
    result.seconds = round(time.perf_counter() - t0, 1)
    return result


def spread_shapes(space, count: int, batches: tuple[int, ...], seed: int = 0) -> list[tuple[DescendantShape, int]]:
    """``count`` random shapes of ``space`` (seeded), cycling through ``batches``."""
    import random

    rng = random.Random(seed)
    return [(space.random_shape(rng), batches[i % len(batches)]) for i in range(count)]

