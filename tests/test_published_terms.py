"""The generic CPU latency terms: the published data, the multi-core roofline terms, the fit, and
which profiles get them."""

import dataclasses
import json
import statistics

import pytest

from factory import DescendantShape, FactoryError
from factory.device.fit import Measurement, calibrate
from factory.device.profile import load_profile, parse_profile
from factory.device.published import (
    CPU_BAND,
    CPU_TERMS,
    DATA,
    FITTED,
    fit_cpu_terms,
    leave_one_device_out,
    load_published,
    predict,
)
from factory.device.resolve import latency_model_for
from factory.device.roofline import UNCALIBRATED_BAND, CostModel, Device, Efficiency, roofline_ms, vit_ops

DEIT_TINY = DescendantShape(12, 192, 3, 4.0, 224, 16, 1000)


def test_published_data_is_cited_and_complete():
    data = json.loads(DATA.read_text())
    assert len(data["rows"]) == 42 and {r["device"] for r in data["rows"]} == set(data["devices"])
    for dev in data["devices"].values():
        assert (
            "Intel ARK" in dev["source"]
            and "pytorch-image-models results/benchmark-infer-fp32" in dev["latency_source"]
        )
        assert dev["cores"] == 14
    assert data["devices"]["i9_10940x"]["peak_fp32_tflops"] == pytest.approx(14 * 64 * 3.3 / 1000, rel=1e-3)
    devices, rows = load_published()
    tiny = [r for r in rows if r.model == "deit_tiny_patch16_224" and r.device == "i9_10940x"]
    assert tiny[0].shape == DEIT_TINY and tiny[0].latency_ms == 5.484
    assert {r.shape.patch_size for r in rows} == {8, 14, 16, 32} and {r.shape.img_size for r in rows} == {224, 384}


def test_shipped_terms_are_the_fit_of_the_shipped_data():
    devices, rows = load_published()
    terms, errors = fit_cpu_terms(devices, rows)
    for name in FITTED:
        assert getattr(terms, name) == pytest.approx(getattr(CPU_TERMS, name), rel=2e-3, abs=1e-3), name
    assert terms.matmul == CPU_TERMS.matmul == 0.9 and terms.cached_activations
    errors = sorted(abs(e) for e in errors)
    assert statistics.median(errors) < 0.12  # CPU_BAND states 9.7%
    assert f"median {statistics.median(errors):.1%}" in CPU_BAND


def test_terms_transfer_between_the_published_cpus():
    """Fitted on one CPU, the terms predict the other (a laptop vs a desktop, both 14 cores) within 25% median."""
    devices, rows = load_published()
    lodo = leave_one_device_out(devices, rows)
    assert set(lodo) == {"i7_12700h", "i9_10940x"}
    for dev, errors in lodo.items():
        assert statistics.median(abs(e) for e in errors) < 0.25, dev
    # and a constant-efficiency roofline (no serial fraction, no per-thread cost) does not transfer as well
    flat = dataclasses.replace(CPU_TERMS, serial_fraction=0.0, sync_us_per_thread=0.0, op_overhead_us=30.0)
    i9 = devices["i9_10940x"]
    assert predict(CPU_TERMS, i9, DEIT_TINY) == pytest.approx(5.484, rel=0.3)
    assert abs(predict(flat, i9, DEIT_TINY) / 5.484 - 1) > abs(predict(CPU_TERMS, i9, DEIT_TINY) / 5.484 - 1)


def test_multicore_terms_of_the_roofline():
    ops = vit_ops(DEIT_TINY)
    base = Efficiency(matmul=1.0, attention=1.0, memory=1.0, op_overhead_us=0.0, fixed_ms=0.0)
    one = Device(1e11, 1e10, "onnxruntime", 1e3, False, cores=1)
    four = dataclasses.replace(one, cores=4)
    t1 = roofline_ms(ops, one, base)
    assert roofline_ms(ops, four, base) == pytest.approx(t1)  # no serial fraction: the peak already counts the cores
    amdahl = dataclasses.replace(base, serial_fraction=0.1)
    assert roofline_ms(ops, four, amdahl) == pytest.approx(t1 * (1 + 0.1 * 3))
    n_ops = sum(count for _, count in ops)
    sync = dataclasses.replace(base, sync_us_per_thread=2.0)
    assert roofline_ms(ops, four, sync) - t1 == pytest.approx(n_ops * 4 * 2.0e-3)
    # cached activations: only weights stream from memory, so a bandwidth-starved device speeds up and
    # elementwise ops cost nothing but their overheads
    slow_memory = Device(1e14, 1e9, "onnxruntime", 1e3, False, cores=1)
    cached = dataclasses.replace(base, cached_activations=True)
    assert roofline_ms(ops, slow_memory, cached) < roofline_ms(ops, slow_memory, base)
    weights = sum(op.weight_bytes * count for op, count in ops)
    assert roofline_ms(ops, slow_memory, cached) == pytest.approx(weights / 1e9 * 1e3, rel=0.05)
    assert roofline_ms([(op, c) for op, c in ops if op.kind == "elementwise"], slow_memory, cached) == 0.0


def test_profiles_that_declare_cores_get_the_published_terms():
    pi5 = latency_model_for(load_profile("raspberry_pi5"))
    assert pi5.efficiency == CPU_TERMS and pi5.band.startswith(CPU_BAND) and pi5.device.cores == 4
    assert "Fitted at FP32: at int8" in pi5.band  # the Pi 5 profile runs INT8
    assert "published ViT measurements" in pi5.method and "4 cores" in pi5.method
    datasheet = latency_model_for(load_profile("host_datasheet"))
    assert datasheet.device.peak_flops == pytest.approx(2 * 32 * 2.6e9, rel=1e-3) and datasheet.efficiency == CPU_TERMS
    assert datasheet.band == CPU_BAND  # FP32: no caveat
    # without cores, or measured, or not a CPU: the priors, and the band says there is none
    text = open(load_profile("raspberry_pi5").path).read().replace("  cores: 4\n", "")
    no_cores_profile = parse_profile(text, "p.yaml")
    no_cores = latency_model_for(no_cores_profile)
    assert no_cores.efficiency == Efficiency.default_for(no_cores_profile.hardware)
    assert no_cores_profile.hardware.cores is None and no_cores.band == UNCALIBRATED_BAND
    orin = latency_model_for(load_profile("jetson_orin"))
    assert orin.efficiency != CPU_TERMS and orin.band == UNCALIBRATED_BAND


def test_bad_cores_is_one_clear_error():
    text = open(load_profile("raspberry_pi5").path).read().replace("cores: 4", "cores: 0")
    with pytest.raises(FactoryError, match=r"hardware\.cores"):
        parse_profile(text, "p.yaml")


def test_calibration_band_is_held_out_with_enough_rows():
    dev = Device(4e11, 5e10, "onnxruntime", 1e3, False, cores=4)
    truth = dataclasses.replace(CPU_TERMS, matmul=0.5, attention=0.7, fixed_ms=0.2)
    model = CostModel(dev, "fp32", 1, CPU_TERMS)
    shapes = [
        DescendantShape(d, w, w // 64, r, i, 16, 1000)
        for d, w, r, i in [
            (2, 128, 2.0, 96),
            (4, 192, 4.0, 224),
            (8, 256, 3.0, 160),
            (12, 384, 4.0, 224),
            (3, 64, 1.0, 64),
            (6, 320, 2.5, 192),
            (10, 128, 4.0, 128),
            (1, 448, 2.0, 224),
        ]
    ]
    noisy = [
        Measurement(s, 1, roofline_ms(vit_ops(s), dev, truth) * (1.1 if i % 2 else 0.9)) for i, s in enumerate(shapes)
    ]
    fitted = calibrate(model, noisy)
    assert "cross-validated" in fitted.band and "8 calibration rows" in fitted.band
    assert fitted.efficiency.serial_fraction == CPU_TERMS.serial_fraction  # the multi-core terms are kept
    in_sample = calibrate(model, noisy[:4])
    assert "in-sample" in in_sample.band
    # +-10% noise: the held-out error is at least the noise, never the in-sample fit's lower figure
    held = float(fitted.band.split("median ")[1].split("%")[0])
    assert held >= 5


def test_the_measured_host_gets_the_published_terms_on_its_thread_count():
    from factory.device.published import HOST_MEASURED_BAND
    from factory.device.roofline import HostFacts

    host = load_profile("host").model_copy(update={"latency_tables": None})
    cost = latency_model_for(host, host=HostFacts(peak_flops=1.9e11, bandwidth=3e10, threads=3))
    assert cost.efficiency == CPU_TERMS and cost.device.cores == 3 and cost.device.peak_flops == 1.9e11
    assert cost.band == HOST_MEASURED_BAND and "3 threads" in cost.method and "measured" in cost.method
