"""Core ML artifacts (the coreml extra, installed by CI): an FP16 .mlpackage converted and checked by coremltools,
its accuracy on the task's test images from the FP16 emulation (Core ML runs only on Apple platforms), deployed on
an iPhone profile by its cost model; the calibration kit's .mlpackage twins; refused in one line without the extra."""

from __future__ import annotations

import platform

import pytest

from factory.errors import FactoryError

from .helpers import cli_run, one_line_exit_2, small_descendant

coremltools = pytest.importorskip(
    "coremltools", reason="the coreml extra is not installed (pip install 'peg-factory[coreml]'; CI installs it)"
)


@pytest.fixture(scope="module")
def small_file(tmp_path_factory):
    return small_descendant(tmp_path_factory.mktemp("cm-model") / "d2.safetensors", 96, 3)


@pytest.fixture(scope="module")
def exported(small_file, tmp_path_factory):
    from export.api import export_model
    from factory.device.deploy import chooser
    from factory.device.profile import load_profile

    out = tmp_path_factory.mktemp("cm") / "exp"
    lines: list[str] = []
    profile = load_profile("demo/iphone15_pro")
    record = export_model(
        small_file, ["coreml"], out, data="digits", profile=profile, choose=chooser(profile), log=lines.append
    )
    return out, record, lines


def test_the_package_is_an_fp16_ml_program_with_the_models_interface(exported):
    from export.coreml_export import check_package, op_counts, tree_sha256

    out, record, lines = exported
    art = record["artifacts"]["coreml"]
    package = out / "model.mlpackage"
    assert (package / "Manifest.json").is_file() and art["package"] == "model.mlpackage"
    assert art["sha256"] == tree_sha256(package)  # the digest covers the whole package tree
    spec = check_package(package, (1, 1, 28, 28), 10)  # coremltools reads it back: images -> logits
    assert op_counts(spec) == art["op_types"] and art["total_ops"] == sum(art["op_types"].values()) > 10
    assert "const" not in art["op_types"] and {"matmul", "softmax", "layer_norm"} <= set(art["op_types"])
    assert art["compute_precision"] == "fp16" and art["deployment_target"] == "iOS17"
    assert any(line.startswith("coreml: model.mlpackage") for line in lines)


def test_the_check_runs_on_the_task_images_and_says_what_ran(exported):
    _, record, _ = exported
    art = record["artifacts"]["coreml"]
    assert art["runs_here"] == (platform.system() == "Darwin")
    if not art["runs_here"]:  # honest: the emulation, not the artifact
        assert "PyTorch FP16 emulation" in art["checked_on"] and "not run here" in art["checked_on"]
    assert art["checked_on"].startswith("400 test images")  # digits' whole test split, not random inputs
    assert art["top1_agreement"] >= 0.98 and 0 < art["max_abs_diff_vs_pytorch"] < 0.05  # FP16 rounding, not FP32
    assert abs(art["accuracy_drop_vs_fp32"]) <= 0.01


def test_an_iphone_profile_deploys_the_core_ml_package(exported):
    _, record, _ = exported
    deploy = record["deploy"]
    assert deploy["format"] == "coreml" and deploy["basis"].startswith("iphone15_pro cost model")
    assert deploy["latency_ms_predicted"] > 0 and set(deploy["candidates_ms_predicted"]) == {"coreml"}


def test_the_calibration_kit_ships_core_ml_twins_and_says_where_they_run(tmp_path):
    from .helpers import run_script

    kit = tmp_path / "kit"
    res = cli_run("calibrate", "--profile", "demo/iphone15_pro", "--shapes", "3", "--out", kit)
    assert res.exit_code == 0, res.output
    onnx = sorted((kit / "models").glob("*.onnx"))
    assert len(onnx) == 3 and all((p.with_suffix(".mlpackage") / "Manifest.json").is_file() for p in onnx)
    if platform.system() != "Darwin":
        done = run_script(kit / "measure.py", "--repeats", "1")
        assert done.returncode == 2 and "Core ML runs only on macOS/iOS" in done.stderr, done.stderr


def test_without_the_extra_the_format_is_one_line_naming_it(small_file, tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_coremltools(name, *args, **kwargs):
        if name.startswith("coremltools"):
            raise ImportError("No module named 'coremltools'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_coremltools)
    from export.coreml_export import require_coreml

    with pytest.raises(FactoryError, match=r"pip install 'peg-factory\[coreml\]'"):
        require_coreml()
    res = cli_run("export", "--model", small_file, "--format", "coreml", "--out", tmp_path / "x")
    one_line_exit_2(res, "peg-factory[coreml]")
    assert (tmp_path / "x" / "model.onnx").is_file() and not (tmp_path / "x" / "model.mlpackage").exists()
