import json
import shlex
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from export.api import export_model, parse_formats, skipped_error
from export.onnx_export import export_onnx
from export.tensorrt_build import tensorrt_available
from export.trt_kit import trtexec_command
from factory import DescendantShape, FactoryError, init_descendant, load_ancestry
from factory.cli import cli
from factory.device.profile import load_profile


@pytest.mark.parametrize(
    "shape",
    [
        DescendantShape(2, 64, 2, 2.0, 32, 8, 10),
        DescendantShape(5, 96, 3, 4.0, 28, 7, 7),
        DescendantShape(1, 32, 1, 1.0, 16, 4, 3),
    ],
    ids=lambda s: s.label(),
)
def test_onnx_parity_at_two_batch_sizes(tmp_path, shape):
    model = init_descendant("scratch", shape, seed=1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    result = export_onnx(
        model, tmp_path / "m.onnx", img_size=shape.img_size, in_chans=1, metadata={"k": {"a": 1}}, verify_batch=5
    )
    assert set(result["max_abs_diff"]) == {"batch1", "batch5"}
    assert max(result["max_abs_diff"].values()) <= 1e-4
    proto = onnx.load(str(tmp_path / "m.onnx"))
    onnx.checker.check_model(proto)
    assert {p.key: p.value for p in proto.metadata_props}["k"] == '{"a": 1}'
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


def test_a_wrong_export_fails_with_the_measured_diff_and_leaves_nothing(tmp_path, monkeypatch):
    model = init_descendant("scratch", DescendantShape(1, 32, 1, 1.0, 16, 4, 3))
    import export.onnx_export as ox

    real = ox._export_graph

    def sabotaged(m, x, path, opset, exporter):
        with torch.no_grad():
            m.head.bias.add_(1.0)  # the graph now differs from the model verified against
        real(m, x, path, opset, exporter)
        with torch.no_grad():
            m.head.bias.sub_(1.0)

    monkeypatch.setattr(ox, "_export_graph", sabotaged)
    with pytest.raises(FactoryError, match=r"ONNX output differs from PyTorch by 1 at batch 1"):
        export_onnx(model, tmp_path / "m.onnx", img_size=16, in_chans=1)
    assert list(tmp_path.iterdir()) == []


def test_a_format_list_ignores_empty_items_and_refuses_none_in_one_line():
    assert parse_formats("onnx, onnx-fp16,") == parse_formats(["onnx", "", "onnx-fp16"]) == ["onnx", "onnx-fp16"]
    for text in ("", " , ", ","):
        with pytest.raises(FactoryError, match="no export format given; choose from onnx") as err:
            parse_formats(text)
        assert "\n" not in str(err.value)
    with pytest.raises(FactoryError, match="unknown export format 'ONNX'"):
        parse_formats("ONNX,")


def test_export_all_formats_with_metadata_hashes_and_int8_accuracy(demo_file, tmp_path):
    profile = load_profile("demo/jetson_orin")
    record = export_model(
        demo_file,
        parse_formats("onnx,onnx-fp16,onnx-int8,trt"),
        tmp_path / "exp",
        profile=profile,
        data="mnist",
        log=lambda *_: None,
    )
    out = tmp_path / "exp"
    assert json.loads((out / "export.json").read_text()) == json.loads(json.dumps(record, sort_keys=True))
    art = record["artifacts"]
    assert set(art) == {"onnx", "onnx-fp16", "onnx-int8", "trt"}
    from factory.io import sha256_file

    for name in ("onnx", "onnx-fp16", "onnx-int8"):
        assert art[name]["sha256"] == sha256_file(out / art[name]["file"])
    meta = {p.key: p.value for p in onnx.load(str(out / "model.onnx")).metadata_props}
    assert json.loads(meta["peg_factory.shape"])["depth"] == 6
    assert meta["peg_factory.profile"] == "jetson_orin"
    assert json.loads(meta["peg_factory.preprocessing"])["size"] == 28
    assert int(meta["peg_factory.params"]) > 0 and int(meta["peg_factory.flops"]) > 0
    assert len(json.loads(meta["peg_factory.class_names"])) == 10
    int8 = art["onnx-int8"]
    assert int8["mode"] == "static" and int8["calibration_images"] == 256
    if load_ancestry("demo").weights == "trained-demo":
        assert art["onnx"]["val_accuracy"] > 0.9
    assert int8["accuracy_drop_vs_fp32"] <= 0.01  # <= 1 point
    assert art["onnx-fp16"]["max_abs_diff_vs_fp32"] < 0.05
    if not tensorrt_available()[0]:
        assert art["trt"]["kind"] == "kit"
    assert (
        record["deploy"]["format"] == "trt" and "TensorRT" in record["deploy"]["reason"]
    )  # not a host-timed CPU artifact


def _build_commands(script: str) -> tuple[list[str], list[str]]:
    """The strongly typed and the weakly typed trtexec command lines of a build_engine.sh."""
    lines = [
        shlex.split(line.strip().replace('"$TRTEXEC"', "trtexec"))
        for line in script.splitlines()
        if line.strip().startswith('"$TRTEXEC" --onnx')
    ]
    assert len(lines) == 2, script
    return lines[0], lines[1]


def test_kit_contents_and_trtexec_commands(demo_file, tmp_path):
    record = export_model(
        demo_file, ["trt"], tmp_path / "exp", profile=load_profile("demo/jetson_orin_nano"), log=lambda *_: None
    )
    kit = tmp_path / "exp" / "trt_kit"
    assert {p.name for p in kit.iterdir()} == {
        "model.onnx",
        "model.fp16.onnx",
        "build_engine.sh",
        "reference.npz",
        "trtexec_tools.py",
        "check_engine.py",
        "README.md",
    }
    typed, weak = _build_commands((kit / "build_engine.sh").read_text())
    assert typed == trtexec_command(
        "model.fp16.onnx", "model.fp16.engine", precision="fp16", in_chans=1, img_size=28, batch=1
    )
    assert "--stronglyTyped" in typed and "--fp16" not in typed and "--saveEngine=model.fp16.engine" in typed
    assert "--fp16" in weak and "--stronglyTyped" not in weak and "--onnx=model.onnx" in weak  # TensorRT < 9 only
    assert "--minShapes=images:1x1x28x28" in typed and "--maxShapes=images:1x1x28x28" in typed
    assert "--timingCacheFile=timing.cache" in typed and "--exportTimes=times.fp16.json" in typed
    ref = np.load(kit / "reference.npz")
    assert ref["input_1"].shape == (1, 1, 28, 28) and ref["output_1"].shape == (1, 10)
    assert record["artifacts"]["trt"]["files"].keys() == {p.name for p in kit.iterdir()}
    assert record["artifacts"]["trt"]["typed_model"] == "model.fp16.onnx"
    assert record["artifacts"]["trt"]["typed_max_abs_diff_vs_fp32"] < 0.05
    assert not (tmp_path / "exp" / "model.fp16.onnx").exists()  # made for the kit only: not a stray artifact
    int8 = trtexec_command("model.int8.onnx", "model.int8.engine", precision="int8", in_chans=3, img_size=224, batch=8)
    assert "--stronglyTyped" in int8 and "--int8" not in int8 and "--optShapes=images:8x3x224x224" in int8
    assert "--maxShapes=images:8x3x224x224" in int8
    weak8 = trtexec_command(
        "model.int8.onnx",
        "model.int8.engine",
        precision="int8",
        in_chans=3,
        img_size=224,
        batch=8,
        strongly_typed=False,
    )
    assert "--int8" in weak8 and "--fp16" in weak8


FAKE_TRTEXEC = """#!/usr/bin/env bash
if [ "$1" = "--help" ]; then echo "&&&& RUNNING TensorRT.trtexec [TensorRT v{version}] # trtexec --help"; exit 0; fi
echo "$@" > "$(dirname "$0")/args"
for a in "$@"; do case "$a" in --saveEngine=*) [ -n "{write}" ] && printf engine > "${{a#--saveEngine=}}";; esac; done
"""


def test_build_engine_sh_picks_strong_typing_by_the_trtexec_version(demo_file, tmp_path):
    import subprocess
    import sys

    export_model(
        demo_file,
        ["trt"],
        tmp_path / "exp",
        profile=load_profile("demo/jetson_orin_nano_int8"),
        data="mnist",
        log=lambda *_: None,
    )
    kit = tmp_path / "exp" / "trt_kit"
    assert (kit / "model.int8.onnx").is_file()
    fake = tmp_path / "bin" / "trtexec"
    fake.parent.mkdir()
    path = f"{Path(sys.executable).parent}:/usr/bin:/bin"  # python3 with numpy, for check_engine.py
    for version, typed in (("100300", True), ("110400", True), ("8601", False)):  # JetPack 6, TensorRT 11, JetPack 5
        fake.write_text(FAKE_TRTEXEC.format(version=version, write="yes"))
        fake.chmod(0o755)
        done = subprocess.run(
            ["bash", str(kit / "build_engine.sh")],
            capture_output=True,
            text=True,
            env={"PATH": path, "TRTEXEC": str(fake)},
            timeout=60,
        )
        args = (fake.parent / "args").read_text()
        assert ("--stronglyTyped" in args) == typed and ("--int8" in args) == (not typed), (version, args)
        assert "--onnx=model.int8.onnx" in args
        assert done.returncode == 2 and "tensorrt Python package is not installed" in done.stderr  # the check ran
    fake.write_text(FAKE_TRTEXEC.format(version="100300", write=""))  # exits 0 and writes no engine
    (kit / "model.int8.engine").unlink()
    done = subprocess.run(
        ["bash", str(kit / "build_engine.sh")],
        capture_output=True,
        text=True,
        env={"PATH": path, "TRTEXEC": str(fake)},
        timeout=60,
    )
    assert done.returncode == 1 and "wrote no model.int8.engine" in done.stderr and "tensorrt Python" not in done.stderr
    done = subprocess.run(
        ["bash", str(kit / "build_engine.sh")],
        capture_output=True,
        text=True,
        env={"PATH": path, "TRTEXEC": ""},
        timeout=60,
    )
    assert done.returncode == 2 and "no trtexec" in done.stderr
    # every script of the kit describes its arguments; build_engine.sh takes none and refuses one
    for cmd, words in (
        (["bash", str(kit / "build_engine.sh"), "--help"], ("TRTEXEC", "model.int8.engine", "Exit codes")),
        ([sys.executable, str(kit / "check_engine.py"), "--help"], ("engine", "--reference", "--atol", "exit codes")),
        ([sys.executable, str(kit / "trtexec_tools.py"), "--help"], ("find", "major TRTEXEC")),
    ):
        done = subprocess.run(cmd, capture_output=True, text=True, env={"PATH": path}, timeout=60)
        assert done.returncode == 0 and all(w in done.stdout for w in words), (cmd, done.stdout, done.stderr)
    done = subprocess.run(["bash", str(kit / "build_engine.sh"), "x"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "unknown argument x" in done.stderr


def test_checker_logic_in_the_kit():
    from export.templates.check_engine import compare

    ref = np.eye(4, dtype=np.float32)
    assert compare(ref + 0.01, ref, 0.05)[2]
    assert not compare(ref[::-1].copy(), ref, 0.05)[2]


def test_interrupted_export_leaves_nothing_half_written(demo_file, tmp_path, monkeypatch):
    import export.quantize as q

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(q, "to_int8", boom)
    with pytest.raises(OSError):
        export_model(demo_file, ["onnx", "onnx-int8"], tmp_path / "exp", log=lambda *_: None)
    assert list(tmp_path.iterdir()) == []  # neither exp/ nor temporary siblings


def test_trt_on_a_non_tensorrt_profile_is_refused(demo_file, tmp_path):
    with pytest.raises(FactoryError, match="runs onnxruntime, not tensorrt; drop trt"):
        export_model(demo_file, ["trt"], tmp_path / "x", profile=load_profile("demo/raspberry_pi5"))
    assert parse_formats("all", load_profile("demo/raspberry_pi5")) == ["onnx", "onnx-int8"]


def test_require_engine_without_tensorrt(demo_file, tmp_path):
    available, why = tensorrt_available()
    if available:
        pytest.skip("TensorRT and a GPU are present: the engine path is tested by test_engine_build")
    result = CliRunner().invoke(
        cli, ["export", "--model", str(demo_file), "--format", "trt", "--require-engine", "--out", str(tmp_path / "e")]
    )
    assert result.exit_code == 2 and "--require-engine" in result.output and why.split(" (")[0] in result.output
    record = json.loads((tmp_path / "e" / "export.json").read_text())  # what could be written is, and says so
    assert set(record["artifacts"]) == {"onnx"} and record["skipped_params"] == {"trt": "require_engine"}


@pytest.mark.skipif(not tensorrt_available()[0], reason=f"TensorRT engine build needs it: {tensorrt_available()[1]}")
def test_engine_build(demo_file, tmp_path):
    record = export_model(demo_file, ["trt"], tmp_path / "exp", log=lambda *_: None)
    assert record["artifacts"]["trt"]["kind"] == "engine"
    assert record["artifacts"]["trt"]["max_abs_diff_vs_onnxruntime"] < 0.05


def test_export_cli_errors(demo_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def run(*args):
        return CliRunner().invoke(cli, ["export", *map(str, args)])

    result = run("--model", demo_file, "--format", "tflite")
    assert result.exit_code == 2 and "unknown export format 'tflite'" in result.output
    result = run("--model", tmp_path / "nope", "--format", "onnx")
    assert result.exit_code == 2 and "not found" in result.output
    result = run("--format", "trt")
    assert result.exit_code == 2 and "run `peg-factory build` first" in result.output
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = run("--model", demo_file, "--out", blocker / "out")
    assert result.exit_code == 2 and "cannot create directory" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_openvino_fp32_bf16_int8_verified_timed_and_the_fastest_chosen(demo_file, tmp_path):
    pytest.importorskip(
        "openvino", reason="OpenVINO is an optional extra: pip install 'peg-factory[openvino]' (CI installs it)"
    )
    from export.openvino_export import cpu_supports_bf16

    record = export_model(
        demo_file,
        ["onnx", "onnx-int8", "openvino", "openvino-int8"],
        tmp_path / "exp",
        profile=load_profile("demo/x86_laptop_cpu"),
        data="mnist",
        log=lambda *_: None,
    )
    art, out = record["artifacts"], tmp_path / "exp"
    from factory.io import sha256_file

    ov = art["openvino"]
    assert ov["max_abs_diff_vs_pytorch"] <= 1e-4 and ov["sha256"] == sha256_file(out / "model.xml")
    assert ov["weights_sha256"] == sha256_file(out / "model.bin")
    assert abs(ov["test_accuracy"] - ov["fp32_onnxruntime_test_accuracy"]) <= 0.001
    assert art["openvino-int8"]["accuracy_drop_vs_fp32"] <= 0.01 and (out / "model.int8.bin").is_file()
    assert ("openvino-bf16" in art) == cpu_supports_bf16()
    # the precision that runs is set, read back and recorded, with the exact benchmark_app call and the timing's spread
    assert ov["inference_precision"] == "f32" and art["openvino-int8"]["inference_precision"] == "f32"
    assert (
        ov["benchmark_app"]
        == "benchmark_app -m model.xml -d CPU -shape images[1,1,28,28] -infer_precision f32 -hint latency"
    )
    assert ov["latency_ms_b1_p90"] >= ov["latency_ms_b1"] > 0 and ov["host_load_1min"] >= 0
    if cpu_supports_bf16():
        assert (
            art["openvino-bf16"]["inference_precision"] == "bf16"
            and "-infer_precision bf16" in art["openvino-bf16"]["benchmark_app"]
        )
    # the ONNX is simplified and its parity re-checked on the simplified graph
    assert (
        art["onnx"]["nodes"]["simplified"] < art["onnx"]["nodes"]["exported"]
        and max(art["onnx"]["max_abs_diff"].values()) < 1e-4
    )
    deploy = record["deploy"]
    timed = deploy["candidates_ms"]
    assert deploy["format"] == min(timed, key=timed.get) and {"onnx", "openvino"} <= set(timed)
    assert all(art[f].get("accuracy_drop_vs_fp32", 0) <= 0.01 for f in timed)


def test_deployment_choice_skips_unverified_or_inaccurate_artifacts():
    from export.api import choose_deployment

    arts = {
        "onnx": {"latency_ms_b1": 2.0, "val_accuracy": 0.95, "test_accuracy": 0.95},
        "onnx-int8": {"latency_ms_b1": 0.5, "test_accuracy": 0.90},  # 5 points worse: not verified
        "openvino": {"latency_ms_b1": 1.5},
        "openvino-bf16": {"latency_ms_b1": 1.0, "test_accuracy": 0.946},
    }
    d = choose_deployment(arts, 1)
    assert (
        d["format"] == "openvino-bf16"
        and "2.00x onnxruntime FP32" in d["reason"]
        and "onnx-int8" not in d["candidates_ms"]
    )


def test_openvino_without_the_extra_is_refused_in_one_line(demo_file, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "openvino", None)  # as if the extra were not installed
    lines: list[str] = []
    record = export_model(demo_file, ["openvino", "openvino-int8"], tmp_path / "exp", log=lines.append)
    assert set(record["skipped"]) == {"openvino", "openvino-int8"} and set(record["artifacts"]) == {"onnx"}
    assert "need the openvino extra: pip install 'peg-factory[openvino]'" in record["skipped"]["openvino"]
    assert any(line.startswith("openvino: not written: ") for line in lines)
    assert skipped_error(record, "exp").args[0].startswith("openvino (and openvino-int8) not written: ")


def test_all_without_a_profile_is_every_format_installed_here(tmp_path, monkeypatch):
    """No one venv holds every extra (LiteRT and ExecuTorch cannot share one), so `--format all` without a profile
    ended in exit 2 in every documented install. It now writes what is installed and names what it left out; a
    format asked for by name, or by a profile, still fails in one line when its extra is missing."""
    from click.testing import CliRunner

    import export.api as api
    from export.formats import format_spec
    from factory.cli import cli

    def missing():
        raise FactoryError("onnx-fp16 needs the test's extra: pip install nothing")

    spec = format_spec("onnx-fp16")
    monkeypatch.setattr(api, "FORMAT_NAMES", ["onnx", "onnx-fp16"])
    monkeypatch.setattr(type(spec), "check_available", lambda self: missing() if self.name == "onnx-fp16" else None)
    assert api.installed_only(["onnx", "onnx-fp16"]) == (
        ["onnx"],
        {"onnx-fp16": "onnx-fp16 needs the test's extra: pip install nothing"},
    )
    model = tmp_path / "m.safetensors"
    args = ["expand", "--method", "scratch", "--ancestry", "demo", "--depth", "1", "--embed-dim", "32", "--heads", "1"]
    assert CliRunner().invoke(cli, [*args, "--out", str(model)]).exit_code == 0
    res = CliRunner().invoke(cli, ["export", "--model", str(model), "--format", "all", "--out", str(tmp_path / "e")])
    assert res.exit_code == 0, res.output
    assert "onnx-fp16: left out of 'all' (not installed here: onnx-fp16 needs the test's extra" in res.output
    assert json.loads((tmp_path / "e" / "export.json").read_text())["artifacts"].keys() == {"onnx"}
    res = CliRunner().invoke(
        cli, ["export", "--model", str(model), "--format", "onnx-fp16", "--out", str(tmp_path / "f")]
    )
    assert res.exit_code == 2 and "onnx-fp16 not written" in res.output
