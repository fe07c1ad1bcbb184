"""All latency measuring on this host: onnxruntime timing of kernels and whole models, the
host's GEMM throughput and bandwidth, and the kernel tables measured from them.

The one-kernel ONNX micro-models (:func:`kernel_model`) are what :class:`factory.device.tables.KernelTables`
are measured with; see that module for the table axes and the whole-model terms.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from factory.core.shapes import STANDARD_ARCH, ArchConfig, DescendantShape
from factory.device.roofline import HostFacts
from factory.device.tables import KERNELS, Grids, KernelTables
from factory.errors import FactoryError
from factory.io import cache_dir

# -- micro-models -----------------------------------------------------------------------------------


def _model(nodes, inputs, outputs, initializers):
    from onnx import helper

    graph = helper.make_graph(nodes, "kernel", inputs, outputs, initializer=initializers)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
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
        act = (
            helper.make_node("Add", ["mm", "b"], ["y"])
            if kernel == "linear"
            else helper.make_node("BiasGelu", ["mm", "b"], ["y"], domain="com.microsoft")
        )
        nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"]), act]
        return _model(
            nodes,
            [vi("x", f, [1, rows, k])],
            [vi("y", f, [1, rows, c])],
            [_tensor("w", (k, c), rng), _tensor("b", (c,), rng)],
        ), (1, rows, k)
    if kernel == "layernorm":
        rows, d = dims
        nodes = [helper.make_node("LayerNormalization", ["x", "g", "b"], ["y"], axis=-1, epsilon=1e-6)]
        return _model(
            nodes,
            [vi("x", f, [1, rows, d])],
            [vi("y", f, [1, rows, d])],
            [_tensor("g", (d,), rng), _tensor("b", (d,), rng)],
        ), (1, rows, d)
    if kernel == "add":
        rows, d = dims
        nodes = [helper.make_node("Add", ["x", "r"], ["y"])]
        return _model(
            nodes, [vi("x", f, [1, rows, d])], [vi("y", f, [1, rows, d])], [_tensor("r", (1, rows, d), rng)]
        ), (1, rows, d)
    if kernel == "attention":
        bh, n, dh = dims
        scale = np.array(dh**-0.25, np.float32)
        from onnx import numpy_helper

        inits = [
            numpy_helper.from_array(np.array([1, n, 3, bh, dh], np.int64), "s5"),
            numpy_helper.from_array(np.array([1, n, bh * dh], np.int64), "s3"),
            numpy_helper.from_array(scale, "scale"),
            numpy_helper.from_array(np.array([0], np.int64), "ax0"),
        ]
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
        return _model(nodes, [vi("x", f, [1, n, 3 * bh * dh])], [vi("y", f, [1, n, bh * dh])], inits), (
            1,
            n,
            3 * bh * dh,
        )
    if kernel == "stem":
        rows, d = dims
        g = max(1, round(math.sqrt(rows)))
        p, c = arch.patch_size, arch.in_chans
        from onnx import numpy_helper

        n = g * g + 1
        inits = [
            _tensor("w", (d, c, p, p), rng),
            _tensor("cb", (d,), rng),
            _tensor("cls", (1, 1, d), rng),
            _tensor("pos", (1, n, d), rng),
            numpy_helper.from_array(np.array([1, d, g * g], np.int64), "s"),
        ]
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
    return _model(
        [node],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
        [],
    ), (1, 8)


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
    return {
        "node": platform.node(),
        "cpu": cpu,
        "cpus": cpus,
        "machine": platform.machine(),
        "runtime": "onnxruntime",
        "runtime_version": ort.__version__,
    }


def host_tables_path(arch: ArchConfig) -> Path:
    """``cache_dir()/latency_tables/onnxruntime-<host>-<arch>.json``: one file per CPU model, CPU
    count, onnxruntime version and ancestry architecture (the stem kernel depends on its channels
    and patch size)."""
    import hashlib

    facts = host_facts()
    host = json.dumps({k: facts[k] for k in ("cpu", "cpus", "machine", "runtime_version")}, sort_keys=True)
    return (
        cache_dir()
        / "latency_tables"
        / (
            f"onnxruntime-{hashlib.sha256(host.encode()).hexdigest()[:12]}-"
            f"{hashlib.sha256(json.dumps(arch.to_dict(), sort_keys=True).encode()).hexdigest()[:8]}.json"
        )
    )


REFERENCE_KERNEL = ("linear", (128, 256, 768))


def measure_tables(
    arch: ArchConfig,
    grids: Grids,
    *,
    fit_shapes: list[tuple[DescendantShape, int]] = (),
    log: Callable[[str], None] = lambda _: None,
    budget_s: float = 0.05,
    probe_every: int = 12,
    stat: str = "median",
) -> KernelTables:
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
        rows = [(s, b, float(t)) for (s, b), t in zip(whole, normalised[len(slots) :])]
        result.fit(rows, arch)
        log(f"fitted whole-model terms on {len(rows)} models: {result.describe_terms()}")
    log(
        f"host speed during the measurement: reference kernel {ref.min():.3f}-{ref.max():.3f} ms ({ref.max() / ref.min():.2f}x), "
        "normalised to the first probe"
    )
    result.seconds = round(time.perf_counter() - t0, 1)
    return result


def measure_host(seconds: float = 0.5) -> HostFacts:
    """Measure this machine: fp32 GEMM throughput at ViT sizes and copy bandwidth (torch, all threads)."""
    import torch

    # the GEMMs a ViT runs (tokens x width x hidden of ViT-S/B blocks at batch 1 and 8), all threads; the
    # best of them is the attainable peak (a square 1024^3 GEMM under-reports it: fitted efficiencies > 1)
    flops = 0.0
    for m, k, n_ in ((197, 384, 1536), (1576, 384, 1152), (1576, 768, 3072)):
        a, b = torch.randn(m, k), torch.randn(k, n_)
        for _ in range(3):
            a @ b
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / 6:
            a @ b
            n += 1
        flops = max(flops, 2 * m * k * n_ * n / (time.perf_counter() - start))
    src = torch.empty(32 * 1024 * 1024)  # 128 MB
    src.fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds / 2:
        dst.copy_(src)
        n += 1
    bandwidth = 2 * src.numel() * 4 * n / (time.perf_counter() - start)
    return HostFacts(flops, bandwidth, torch.get_num_threads())


def measure_onnxruntime_latency(
    shape: DescendantShape,
    batch: int = 1,
    *,
    arch: ArchConfig = STANDARD_ARCH,
    repeats: int = 20,
    warmup: int = 3,
    stat: str = "median",
    threads: int | None = None,
) -> float:
    """Latency (ms; the ``stat`` of ``repeats`` runs) of a randomly initialised descendant under
    onnxruntime on this CPU (``threads`` intra-op threads; default all cores)."""
    import tempfile
    from pathlib import Path

    import numpy as np

    from export.onnx_export import export_onnx
    from export.runtime import ort_latency_ms, ort_session
    from factory.core.timm_vit import build_vit

    model = build_vit(arch, shape, seed=0).eval()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.onnx"
        export_onnx(model, path, img_size=shape.img_size, in_chans=arch.in_chans, verify=False)
        sess = ort_session(path, threads=threads)
    x = np.random.default_rng(0).standard_normal(
        (batch, arch.in_chans, shape.img_size, shape.img_size), dtype=np.float32
    )
    return ort_latency_ms(sess, x, repeats=repeats, warmup=warmup, stat=stat)
