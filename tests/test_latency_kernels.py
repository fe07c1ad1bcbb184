"""The kernel-level latency predictor (tables, interpolation, fit, profiles) and the calibration kit."""

import math
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner

from factory import DescendantShape, FactoryError
from factory.cli import cli
from factory.core.ancestry import DEMO_ARCH
from factory.device.measure import kernel_model, measure_tables, time_onnx
from factory.device.profile import load_profile, parse_profile
from factory.device.resolve import latency_model_for
from factory.device.search import SearchSpace, search
from factory.device.tables import KERNELS, Grids, KernelTables, spread_shapes

SPACE = SearchSpace.from_arch(DEMO_ARCH)


@pytest.mark.parametrize(
    "kernel, dims",
    [
        ("linear", (50, 96, 288)),
        ("linear_gelu", (50, 96, 192)),
        ("attention", (6, 17, 32)),
        ("layernorm", (50, 96)),
        ("add", (50, 96)),
        ("stem", (16, 96)),
    ],
)
def test_every_kernel_micro_model_runs_in_onnxruntime(kernel, dims):
    import onnxruntime as ort

    model, shape = kernel_model(kernel, dims, DEMO_ARCH)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y = sess.run(None, {"x": np.zeros(shape, np.float32)})[0]
    expect = {
        "linear": (1, 50, 288),
        "linear_gelu": (1, 50, 192),
        "attention": (1, 17, 192),
        "layernorm": (1, 50, 96),
        "add": (1, 50, 96),
        "stem": (1, 17, 96),
    }[kernel]
    assert y.shape == expect
    assert time_onnx(model, shape, budget_s=0.01) > 0


def test_latency_statistic_of_repeated_runs():
    from export.runtime import summarise_times

    runs = [3.0, 1.0, 2.0, 9.0]  # one run disturbed by another tenant
    assert summarise_times(runs) == 2.5 and summarise_times(runs, "min") == 1.0
    with pytest.raises(ValueError, match="median"):
        summarise_times(runs, "mean")


def _power_law_tables(empty=0.01) -> KernelTables:
    """Synthetic tables with t = 1e-6 * prod(dims): log-multilinear interpolation reproduces it exactly."""
    grids = Grids.for_space(SPACE, DEMO_ARCH, (1, 8), points=4)
    tables = {}
    for kernel in KERNELS:
        axes = grids.axes(kernel)
        mesh = np.meshgrid(*[np.asarray(a, float) for a in axes], indexing="ij")
        tables[kernel] = {"axes": axes, "ms": (1e-6 * np.prod(mesh, axis=0)).tolist()}
    return KernelTables({"cpu": "synthetic"}, DEMO_ARCH.to_dict(), empty, tables)


def test_interpolation_is_exact_for_power_laws_inside_and_outside_the_grid():
    t = _power_law_tables()
    for dims in [(100, 96, 288), (7, 40, 1000), (5000, 3000, 20)]:  # inside, between, beyond the grid
        assert t.kernel_ms("linear", dims) == pytest.approx(1e-6 * math.prod(dims), rel=1e-6)
    s = DescendantShape(4, 96, 2, 2.0, 28, 7, 10)
    n = 17
    block = (
        2 * 1e-6 * n * 96
        + 1e-6 * n * 96 * 288
        + 1e-6 * 2 * 17 * 48
        + 1e-6 * n * 96 * 96
        + 2 * 1e-6 * n * 96
        + 1e-6 * n * 96 * 192
        + 1e-6 * n * 192 * 96
    )
    expect = 1e-6 * 16 * 96 + 4 * block + 1e-6 * n * 96 + 1e-6 * 96 * 10
    assert t.kernel_sum_ms(s, 1, DEMO_ARCH) == pytest.approx(expect, rel=1e-6)
    assert t.latency_ms(s, 1, DEMO_ARCH) == pytest.approx(expect + 0.01, rel=1e-6)


def test_whole_model_terms_are_recovered_by_the_fit():
    t = _power_law_tables(empty=0.0)
    shapes = [(SPACE.random_shape(__import__("random").Random(i)), 1) for i in range(12)]
    rows = [(s, 1, 1.3 * t.kernel_sum_ms(s, 1, DEMO_ARCH) + 0.02 * s.depth + 0.05) for s, _ in shapes]
    rows += [(s, 8, 0.9 * t.kernel_sum_ms(s, 8, DEMO_ARCH) + 0.1) for s, _ in shapes]
    t.fit(rows, DEMO_ARCH)
    assert t.terms_for(1) == pytest.approx((1.3, 0.02, 0.05), rel=1e-3)
    assert t.terms_for(8) == pytest.approx((0.9, 0.0, 0.1), abs=1e-4)
    assert t.terms_for(2) == t.terms_for(1) and t.terms_for(32) == t.terms_for(8)  # nearest fitted batch


def test_tables_round_trip_and_damaged_files_are_one_line(tmp_path):
    t = _power_law_tables()
    t.save(tmp_path / "t.json")
    back = KernelTables.load(tmp_path / "t.json")
    s = DescendantShape(6, 128, 4, 3.0, 28, 7, 10)
    assert back.latency_ms(s, 8, DEMO_ARCH) == pytest.approx(t.latency_ms(s, 8, DEMO_ARCH))
    (tmp_path / "t.json").write_text('{"format": 1}')
    with pytest.raises(FactoryError, match="unreadable.*re-measure"):
        KernelTables.load(tmp_path / "t.json")


def _host_profile(tmp_path, extra: str) -> object:
    text = open(load_profile("host").path).read().replace("latency_tables: host\n", "") + extra
    path = tmp_path / "p.yaml"
    path.write_text(text)
    return load_profile(path)


def test_profiles_choose_the_predictor_and_say_which(tmp_path, monkeypatch):
    _power_law_tables().save(tmp_path / "tables.json")
    cost = latency_model_for(_host_profile(tmp_path, "latency_tables: tables.json\n"), arch=DEMO_ARCH)
    assert cost.method == "kernel tables tables.json" and cost.tables is not None
    assert "held-out median error" in cost.band
    monkeypatch.setenv("PEG_FACTORY_CACHE", str(tmp_path / "empty-cache"))
    cost = latency_model_for(_host_profile(tmp_path, "latency_tables: host\n"), arch=DEMO_ARCH)
    assert cost.tables is None and "no host latency tables yet: run `peg-factory profiles measure`" in cost.method
    with pytest.raises(FactoryError, match="latency_tables nope.json not found"):
        latency_model_for(_host_profile(tmp_path, "latency_tables: nope.json\n"), arch=DEMO_ARCH)
    trt = open(load_profile("demo/jetson_orin").path).read() + "latency_tables: host\n"
    with pytest.raises(FactoryError, match="latency_tables are measured with onnxruntime at fp32"):
        parse_profile(trt, "trt.yaml")


def test_search_with_kernel_tables_stays_fast(tmp_path):
    from factory.core.ancestry import load_ancestry

    arch = load_ancestry("random:vit_base_patch16_224").arch
    space = SearchSpace.from_arch(arch, img_sizes=(160, 192, 224))
    grids = Grids.for_space(space, arch, (1,), points=4)
    tables = {k: {"axes": grids.axes(k), "ms": np.ones([len(a) for a in grids.axes(k)]).tolist()} for k in KERNELS}
    KernelTables({}, arch.to_dict(), 0.01, tables).save(tmp_path / "vitb.json")
    profile = _host_profile(tmp_path, "latency_tables: vitb.json\n")
    cost = latency_model_for(profile, arch=arch)
    t0 = time.perf_counter()
    result = search(profile, space, cost)
    assert result.evaluated >= 10_000 and time.perf_counter() - t0 < 5


def test_measured_tables_predict_real_models_of_the_demo_space(tmp_path):
    """A small real measurement (seconds): predictions land in the measured latency's ballpark."""
    space = SearchSpace.from_arch(DEMO_ARCH, max_depth=6)
    grids = Grids.for_space(space, DEMO_ARCH, (1,), points=3)
    from factory.device.measure import measure_onnxruntime_latency

    # this shared VM's speed moves up to 2x within minutes (bench/RESULTS.md), and a 0.1-ms model's ratio with it
    # (1.6x, 0.7x, 0.9x for one shape in three runs; 4.7x once in CI, the tables timed in a slow moment): every
    # shape within 4x, their median within 2.5x -- in one of two attempts, each measuring tables and models anew
    for _attempt in range(2):
        tables = measure_tables(
            DEMO_ARCH, grids, fit_shapes=spread_shapes(space, 4, (1,), seed=1), budget_s=0.02, stat="min"
        )
        assert tables.terms_for(1)[0] > 0 and tables.points > 50 and tables.host["stat"] == "min"
        found = [
            (
                s.label(),
                tables.latency_ms(s, b, DEMO_ARCH),
                measure_onnxruntime_latency(s, b, arch=DEMO_ARCH, stat="min"),
            )
            for s, b in spread_shapes(space, 3, (1,), seed=7)
        ]
        ratios = [p / m for _, p, m in found]
        if all(0.25 < r < 4 for r in ratios) and 0.4 < sorted(ratios)[1] < 2.5:
            break
    assert all(0.25 < r < 4 for r in ratios), found
    assert 0.4 < sorted(ratios)[1] < 2.5, ratios


def test_calibration_kit_round_trip_on_the_host(tmp_path):
    kit = tmp_path / "kit"
    res = CliRunner().invoke(cli, ["calibrate", "--profile", "host", "--shapes", "3", "--out", str(kit)])
    assert res.exit_code == 0, res.output
    assert len(list((kit / "models").glob("*.onnx"))) == 3 and (kit / "README.md").is_file()
    done = subprocess.run(
        [sys.executable, str(kit / "measure.py"), "--repeats", "5"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    rows = (kit / "calibration.csv").read_text().splitlines()
    assert len(rows) == 4 and rows[0].endswith("latency_ms")
    profile = tmp_path / "calibrated.yaml"
    profile.write_text(
        open(load_profile("host").path).read().replace("latency_tables: host\n", "")
        + f"calibration: {kit / 'calibration.csv'}\n"
    )
    res = CliRunner().invoke(cli, ["search", "--profile", str(profile), "--top", "2"])
    assert res.exit_code == 0, res.output
    assert "latency by roofline calibrated on 3 rows of calibration.csv (onnxruntime" in res.output


FAKE_TRTEXEC = """#!/usr/bin/env python3
import sys
args = dict(a.lstrip("-").split("=", 1) for a in sys.argv[1:] if "=" in a)
assert "fp16" in " ".join(sys.argv) and args["shapes"].startswith("images:1x1x28x28"), sys.argv
open(sys.argv[0] + ".calls", "a").write(args["onnx"] + "\\n")
print("[11/29/2026-05:00:00] [I] TensorRT version: 10.3.0")
print("[11/29/2026-05:00:01] [I] GPU Compute Time: min = 0.25 ms, max = 0.4 ms, mean = 0.3 ms, median = 0.29 ms, "
      "percentile(90%) = 0.35 ms, percentile(95%) = 0.37 ms, percentile(99%) = 0.39 ms")
"""


def test_calibration_kit_drives_trtexec_and_openvino(tmp_path):
    """The TensorRT path against a stand-in `trtexec` printing trtexec's documented summary; OpenVINO for real."""
    import os

    kit = tmp_path / "kit"
    res = CliRunner().invoke(cli, ["calibrate", "--profile", "demo/jetson_orin", "--shapes", "3", "--out", str(kit)])
    assert res.exit_code == 0, res.output
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "trtexec").write_text(FAKE_TRTEXEC)
    (bin_dir / "trtexec").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    done = subprocess.run(
        [sys.executable, str(kit / "measure.py")], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stderr
    assert len((bin_dir / "trtexec.calls").read_text().split()) == 3
    rows = (kit / "calibration.csv").read_text().splitlines()[1:]
    assert len(rows) == 3 and all(r.endswith(",0.29000") for r in rows)
    meta = __import__("json").loads((kit / "calibration.json").read_text())
    assert meta["runtime"] == "tensorrt" and meta["runtime_version"] == "10.3.0" and meta["precision"] == "fp16"
    done = subprocess.run(
        [sys.executable, str(kit / "measure.py"), "--runtime", "openvino", "--repeats", "3"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert __import__("json").loads((kit / "calibration.json").read_text())["runtime"] == "openvino"


def test_new_commands_refuse_bad_input_in_one_line_before_working(tmp_path):
    (tmp_path / "file").write_text("x")
    t0 = time.perf_counter()
    res = CliRunner().invoke(cli, ["profiles", "measure", "--out", str(tmp_path / "file" / "t.json")])
    assert res.exit_code == 2 and "cannot create directory" in res.output and time.perf_counter() - t0 < 30, res.output
    res = CliRunner().invoke(cli, ["calibrate", "--profile", "host", "--shapes", "3", "--out", str(tmp_path / "file")])
    assert res.exit_code == 2 and "exists and is not a directory" in res.output
    res = CliRunner().invoke(cli, ["calibrate", "--profile", "nope", "--out", str(tmp_path / "kit")])
    assert res.exit_code == 2 and "profile nope not found" in res.output and not (tmp_path / "kit").exists()


def test_an_unknown_kernel_is_one_line():
    with pytest.raises(FactoryError, match="unknown kernel 'conv3d'"):
        kernel_model("conv3d", (1, 2, 3), DEMO_ARCH)
