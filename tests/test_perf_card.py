"""The performance card (perf.yaml) and the budget verdicts of the artifact that ships."""

from __future__ import annotations

import yaml

from factory.pipeline.manifest import shipped_latency, shipped_margins
from factory.pipeline.perf_card import perf_card, perf_rows
from factory.pipeline.report import budget_rows


def test_the_latency_verdict_is_the_shipped_artifacts():
    # a Pi 5 INT8 profile whose INT8 failed its check: FP32 ships, predicted 45.1 ms; the search said 13.1 (INT8)
    deploy = {"format": "onnx", "latency_ms_predicted": 45.1, "candidates_ms_predicted": {"onnx": 45.1}}
    shipped = shipped_latency(deploy, 13.1, this_host=False)
    assert shipped == {"ms": 45.1, "format": "onnx", "basis": "predicted on the target for it"}
    margins = shipped_margins({"latency_ms": 0.563, "memory_mb": 0.5}, {"latency_ms": 30.0, "memory_mb": 256}, shipped)
    assert margins == {"latency_ms": round((30 - 45.1) / 30, 4), "memory_mb": 0.5}  # OVER, not "all within"
    # the target is this machine: the measurement; a runtime-bound engine: the search's prediction at its precision
    assert shipped_latency({"format": "openvino", "latency_ms": 2.5}, 3.0, this_host=True)["ms"] == 2.5
    engine = shipped_latency({"format": "trt", "reason": "kit"}, 3.0, this_host=False)
    assert engine["ms"] == 3.0 and engine["basis"] == "predicted on the target at the profile's precision"
    assert shipped_margins({"params_m": 0.2}, {"params_m": 1.0}, engine) == {"params_m": 0.2}  # no latency budget


def _device(tmp_path):
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "model.onnx").write_bytes(b"x" * 2_000_000)
    (tmp_path / "export" / "model.pte").write_bytes(b"x" * 1_000_000)
    return {
        "name": "phone",
        "target": {"description": "a phone", "runtime": "executorch", "precision": "fp32", "batch": 1},
        "profile_data": {"hardware": {"kind": "cpu"}},
        "predicted": {"label": "d2-w96"},
        "budgets": {"latency_ms": 20.0, "memory_mb": 64.0},
        "margins": {"latency_ms": 0.5, "memory_mb": 0.5},
        "latency_ms": {
            "predicted_target": 10.0,
            "host_onnxruntime": 3.0,
            "shipped": {"ms": 10.0, "format": "executorch", "basis": "predicted on the target for it"},
        },
        "latency_method": "roofline",
        "latency_band": "about 20%",
        "memory_mb": {"predicted_target": 25.0},
        "deploy": {"format": "executorch", "candidates_ms_predicted": {"executorch": 10.0, "executorch-int8": 12.0}},
        "artifacts": {
            "model": {"path": "phone/model.safetensors"},
            "onnx": {"path": "phone/export/model.onnx", "latency_ms_b1": 3.0, "val_accuracy": 0.9},
            "executorch": {
                "path": "phone/export/model.pte",
                "latency_ms_b1": 2.0,
                "delegated_ops": 58,
                "total_ops": 79,
                "test_accuracy": 0.91,
                "accuracy_drop_vs_fp32": 0.0,
                "checked_on": "400 test images",
                "warning": "XNNPACK takes 58 of 79 ops",
            },
        },
    }


def test_the_card_has_a_row_per_artifact_with_its_runtime_basis_and_range(tmp_path):
    dev = _device(tmp_path)
    card = perf_card({"tools": {"torch": "2.14.1"}}, dev, tmp_path, {"cpu": "Test CPU", "cpus": 2, "machine": "x86_64"})
    assert yaml.safe_load(yaml.safe_dump(card)) == card  # what perf.yaml holds
    assert set(card["artifacts"]) == {"onnx", "executorch"} and card["ships"] == "executorch"
    et, onnx = card["artifacts"]["executorch"], card["artifacts"]["onnx"]
    assert et["ships"] and not onnx["ships"]
    assert et["latency_ms"] == {"host": 2.0, "target": 10.0, "target_basis": "roofline", "band": "about 20%"}
    assert "target" not in onnx["latency_ms"]  # the phone does not run onnxruntime: no prediction invented
    assert et["peak_memory_mb"] == [11.0, 25.0]  # 1 MB program + ExecuTorch's 10 MB .. the memory model's peak
    assert onnx["peak_memory_mb"] == [22.0, 25.0]
    assert et["layers"] == {"delegated": 58, "total": 79} and et["compute_unit"] == "CPU (XNNPACK delegate)"
    assert onnx["compute_unit"].startswith("none on this device")
    assert et["accuracy"] == {"value": 0.91, "split": "test", "drop_vs_fp32": 0.0, "checked_on": "400 test images"}
    assert et["warning"] and set(et["tool_versions"]) == {"executorch", "torchao"}
    assert card["verdicts"]["latency_ms"] == {
        "budget": 20.0,
        "value": 10.0,
        "basis": "predicted on the target for it",
        "within": True,
    }
    rows = perf_rows(card)
    assert rows[1][0] == "executorch (ships)" and rows[1][7] == "58/79" and rows[1][8] == "0.9100 (+0.0000)"


def test_the_report_verdict_reads_the_shipped_artifact(tmp_path):
    dev = _device(tmp_path)
    dev["latency_ms"]["shipped"] = {"ms": 45.1, "format": "onnx", "basis": "predicted on the target for it"}
    dev["margins"] = shipped_margins(dev["margins"], dev["budgets"], dev["latency_ms"]["shipped"])
    row = next(r for r in budget_rows(dev) if r[0] == "latency_ms")
    assert row[2].startswith("45.1 (onnx, predicted on the target for it)") and row[4] == "OVER"


def test_the_memory_verdict_is_the_shipped_precisions():
    from factory.core.ancestry import DEMO_ARCH
    from factory.device.deploy import shipped_memory
    from factory.device.profile import load_profile

    pi = load_profile("demo/raspberry_pi5")  # an INT8 profile
    int8 = shipped_memory(pi, DEMO_ARCH, DEMO_ARCH.shape(), {"format": "onnx-int8"})
    fp32 = shipped_memory(pi, DEMO_ARCH, DEMO_ARCH.shape(), {"format": "onnx"})  # INT8 failed its check
    assert (int8["precision"], fp32["precision"]) == ("int8", "fp32") and fp32["mb"] > int8["mb"]
    assert fp32["limit_mb"] == min(pi.budgets.memory_mb, pi.hardware.memory_mb)
    margins = shipped_margins({"memory_mb": 0.9}, {}, {"ms": 1.0}, fp32)
    assert margins["memory_mb"] == round((fp32["limit_mb"] - fp32["mb"]) / fp32["limit_mb"], 4)
