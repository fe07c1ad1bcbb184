"""LiteRT artifacts (the litert extra: its own venv, .ci/run's .venv-litert, since it cannot share one with the
executorch/coreml extras): a .tflite, FP32 and INT8, verified on the task's test images with its XNNPACK coverage;
refused in one line without the extra, the other formats still written. The coverage walk is pure: tested here
in every venv."""

from __future__ import annotations

import json

import numpy as np
import pytest

from export.litert_export import delegated_nodes

from .helpers import cli_run, one_line_exit_2, small_descendant

NO_LITERT = (
    "the litert extra is not installed in this venv (CI tests it in .venv-litert: pip install 'peg-factory[litert]')"
)


def _node(op, inputs, outputs):
    return {"op_name": op, "inputs": np.array(inputs), "outputs": np.array(outputs)}


def test_a_delegate_partition_is_walked_back_from_its_outputs_to_its_inputs():
    # 0 -FC-> 1 -GELU-> 2 -FC-> 3 -SOFTMAX-> 4; XNNPACK took FC, GELU, FC (tensors 0 -> 3); SOFTMAX stays outside
    nodes = [
        _node("FULLY_CONNECTED", [0, 10, 11], [1]),
        _node("GELU", [1], [2]),
        _node("FULLY_CONNECTED", [2, 12, -1], [3]),  # -1: an optional input left out
        _node("SOFTMAX", [3], [4]),
        _node("DELEGATE", [0, 10, 11, 12], [3]),
    ]
    assert delegated_nodes(nodes) == (3, 4, {"SOFTMAX": 1})
    # two partitions, one op outside between them
    nodes = [
        _node("ADD", [0, 0], [1]),
        _node("GELU", [1], [2]),
        _node("ADD", [2, 2], [3]),
        _node("DELEGATE", [0], [1]),
        _node("DELEGATE", [2], [3]),
    ]
    assert delegated_nodes(nodes) == (2, 3, {"GELU": 1})
    assert delegated_nodes([_node("GELU", [0], [1])]) == (0, 1, {"GELU": 1})  # no delegate: all outside


@pytest.fixture(scope="module")
def small_file(tmp_path_factory):
    return small_descendant(tmp_path_factory.mktemp("lt-model") / "d2.safetensors", 96, 3)


@pytest.fixture(scope="module")
def exported(small_file, tmp_path_factory):
    pytest.importorskip("litert_torch", reason=NO_LITERT)
    from export.api import export_model

    out = tmp_path_factory.mktemp("lt") / "exp"
    lines: list[str] = []
    record = export_model(small_file, ["litert", "litert-int8"], out, data="digits", log=lines.append)
    return out, record, lines


def test_the_fp32_flatbuffer_is_exact_on_the_task_images_with_its_coverage(exported):
    from export.litert_export import interpreter, tflite_logits

    out, record, lines = exported
    art = record["artifacts"]["litert"]
    assert (out / "model.tflite").is_file() and not list(out.glob("model.*explicit*"))  # no trial file left
    assert art["checked_on"] == "400 test images"  # digits' test split, not random inputs
    assert art["max_abs_diff_vs_pytorch"] <= 1e-4 and art["top1_agreement"] == 1.0 and art["accuracy_drop_vs_fp32"] == 0
    assert 0 < art["delegated_ops"] <= art["total_ops"] and art["delegated_fraction"] >= 0.9
    assert art["attention"] in ("explicit", "fused") and art["latency_ms_b1"] > 0
    x = np.zeros((2, 1, 28, 28), dtype=np.float32)
    assert tflite_logits(interpreter(out / "model.tflite"), x).shape == (2, 10)  # the file runs on its own
    assert any(line.startswith("litert: model.tflite") for line in lines)


def test_the_int8_flatbuffer_is_calibrated_and_checked_by_accuracy(exported):
    _, record, _ = exported
    art = record["artifacts"]["litert-int8"]
    assert art["calibration_images"] > 0 and art["file"] == "model.int8.tflite"
    assert art["top1_agreement"] > 0.8 and abs(art["accuracy_drop_vs_fp32"]) < 0.1
    assert art["total_ops"] > 0 and set(art["outside_ops"]) <= {"GELU", "QUANTIZE", "DEQUANTIZE"}, art["outside_ops"]


def test_a_phone_build_writes_what_this_venv_can_and_names_the_rest(tmp_path):
    """demo/pixel8 lists both ExecuTorch and LiteRT formats; no venv has both extras: each build writes its own
    and names the others with the pip command, in the log, the manifest and the card."""
    from factory.device.profile import PROFILE_DIR

    text = (PROFILE_DIR / "demo" / "pixel8.yaml").read_text()
    assert "export: [onnx, executorch, executorch-int8, litert, litert-int8]" in text
    prof = tmp_path / "pixel8.yaml"  # the FP32 formats only: the INT8 ones are tested above, at a lower cost
    prof.write_text(text.replace("executorch-int8, litert, litert-int8]", "litert]"))
    res = cli_run("build", "--profile", prof, "--out", tmp_path / "out", "--steps", 4, "--init", "weight_selection")
    assert res.exit_code == 0, res.output
    dev = json.loads((tmp_path / "out" / "manifest.json").read_text())["devices"][0]
    made = {"executorch", "executorch-int8", "litert", "litert-int8"} & set(dev["artifacts"])
    missing = dev.get("formats_not_written", {})
    assert made and made.isdisjoint(missing) and made | set(missing) >= {"executorch", "litert"}
    if "executorch" in made:  # the phone's runtime runs what ships
        assert (
            dev["deploy"]["format"] in ("executorch", "executorch-int8")
            and (tmp_path / "out" / "pixel8" / "export" / "model.pte").is_file()
        )
    for fmt, reason in missing.items():
        assert "pip install 'peg-factory[" in reason and f"{fmt}: not written" in res.output
    card = (tmp_path / "out" / "pixel8" / "MODEL_CARD.md").read_text()
    assert all(f"`{fmt}`" in card for fmt in missing) and ("**Not written:**" in card) == bool(missing)
    warned = [a["warning"] for a in dev["artifacts"].values() if a.get("warning")]  # a delegate below 90%
    report = (tmp_path / "out" / "report.md").read_text()
    assert ("**Warning:**" in card) == bool(warned) and all(w.split(" (")[0] in report for w in warned)


def test_without_the_extra_the_format_is_one_line_and_the_others_are_written(small_file, tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_litert(name, *args, **kwargs):
        if name.startswith(("litert_torch", "ai_edge_litert")):
            raise ImportError(f"No module named '{name}'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_litert)
    res = cli_run("export", "--model", small_file, "--format", "onnx-fp16,litert", "--out", tmp_path / "x")
    one_line_exit_2(res, "peg-factory[litert]")
    record = json.loads((tmp_path / "x" / "export.json").read_text())
    assert set(record["artifacts"]) == {"onnx", "onnx-fp16"} and set(record["skipped"]) == {"litert"}
    assert (tmp_path / "x" / "model.fp16.onnx").is_file() and not list((tmp_path / "x").glob("*.tflite"))


def test_the_calibration_kit_ships_tflite_twins_that_its_measure_py_times(tmp_path):
    pytest.importorskip("litert_torch", reason=NO_LITERT)
    from .helpers import run_script

    kit = tmp_path / "kit"
    res = cli_run("calibrate", "--profile", "demo/raspberry_pi5_litert", "--shapes", "3", "--out", kit)
    assert res.exit_code == 0, res.output
    onnx = sorted((kit / "models").glob("*.onnx"))
    assert len(onnx) == 3 and all(p.with_suffix(".tflite").is_file() for p in onnx)
    done = run_script(kit / "measure.py", "--repeats", "2")
    assert done.returncode == 0, done.stderr
    rows = (kit / "calibration.csv").read_text().splitlines()
    assert len(rows) == 4 and all(float(r.split(",")[-1] or 0) >= 0 for r in rows[1:])
