"""The registries a choice is made in once: export formats, runtimes, initialisations, executors.

They protect the rule that adding a format or a runtime is one module plus one entry: every consumer
reads the registry, and a name missing from it is an error, never a silent default."""

from __future__ import annotations

import ast
import json

import pytest

from export.formats import FORMAT_NAMES, FORMATS, FormatSpec, format_spec, with_requirements
from factory.device.runtimes import RUNTIME_NAMES, RUNTIMES, formats_of, runtime_spec
from factory.errors import FactoryError


def test_every_format_names_a_registered_runtime_a_real_step_and_registered_requirements():
    import importlib

    for name, spec in FORMATS.items():
        assert spec.runtime in RUNTIMES, name
        if spec.step is not None:
            module, _, fn = spec.step.partition(":")
            assert callable(getattr(importlib.import_module(module), fn)), spec.step
        else:
            assert spec.made_by in FORMATS or name == "onnx", name
        for profile in (None, type("P", (), {"precision": "int8"})()):
            assert set(spec.requires(profile)) <= set(FORMATS)
        assert set(spec.manifest_fields) >= {"sha256", "latency_ms_b1"}
    assert FORMAT_NAMES[0] == "onnx" and "openvino-bf16" not in FORMAT_NAMES  # recorded, never requested


def test_requirements_come_first_in_registry_order():
    int8 = type("P", (), {"precision": "int8"})()
    assert with_requirements(["trt"], int8) == ["onnx", "onnx-int8", "trt"]
    assert with_requirements(["trt"], None) == ["onnx", "trt"]
    assert with_requirements(["openvino-int8"]) == ["onnx", "openvino", "openvino-int8"]


def test_unknown_names_are_one_line_errors_not_defaults():
    with pytest.raises(FactoryError, match="unknown export format 'tflite-magic'"):
        format_spec("tflite-magic")
    with pytest.raises(FactoryError, match="unknown runtime 'mystery'.*onnxruntime"):
        runtime_spec("mystery")
    from factory.core.shapes import DescendantShape
    from factory.device.roofline import memory_mb

    with pytest.raises(FactoryError, match="unknown runtime"):  # it was 0 MB of overhead, silently
        memory_mb(DescendantShape(4, 64, 2, 2.0, 28, 4, 10), 1, "fp32", "mystery")


def test_runtime_formats_come_from_the_format_registry():
    assert formats_of("onnxruntime") == ("onnx", "onnx-fp16", "onnx-int8")
    assert formats_of("openvino") == ("openvino", "openvino-bf16", "openvino-int8")
    assert formats_of("tensorrt") == ("trt",)


def test_the_profile_schema_enums_are_the_registries():
    from factory.device.profile import profile_json_schema

    schema = json.dumps(profile_json_schema())
    for name in RUNTIME_NAMES:
        assert f'"{name}"' in schema
    assert '"pytorch"' not in schema  # a cost-model basis only: no profile may name it
    for name in FORMAT_NAMES:
        assert f'"{name}"' in schema


def test_every_runtime_has_its_kit_timer_in_the_real_measure_script():
    from factory.device.calibration_kit import MEASURE_TEMPLATE

    tree = ast.parse(MEASURE_TEMPLATE.read_text())
    functions = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    timers = next(
        node.value
        for node in tree.body
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "TIMERS" for t in node.targets)
    )
    mapping = {k.value: v.id for k, v in zip(timers.keys, timers.values)}
    for name in RUNTIME_NAMES:
        spec = RUNTIMES[name]
        assert spec.kit_timer in functions and mapping[name] == spec.kit_timer, name


def test_a_new_format_is_one_module_and_one_entry(demo_file, tmp_path, monkeypatch):
    """Registering a format (its step in a module of its own) is all it takes: the exporter runs it, the
    deploy rule reads its runtime and exactness, and the manifest keeps the fields it declares."""
    from export.api import export_model
    from factory.pipeline.manifest import device_record

    spec = FormatSpec(
        "onnx-copy",
        "onnxruntime",
        "fp32",
        "tests.helpers:export_onnx_copy",
        exact=True,
        needs_data=False,
        fields=("copied_from",),
    )
    monkeypatch.setitem(FORMATS, "onnx-copy", spec)
    record = export_model(demo_file, ["onnx-copy"], tmp_path / "exp", log=lambda *_: None)
    art = record["artifacts"]["onnx-copy"]
    assert (tmp_path / "exp" / "model.copy.onnx").read_bytes() == (tmp_path / "exp" / "model.onnx").read_bytes()
    assert art["sha256"] == record["artifacts"]["onnx"]["sha256"]
    assert "onnx-copy" in record["deploy"]["candidates_ms"]  # exact: verified without an accuracy figure
    entry = {"name": "dev", "predicted": {"flops_g": 0.1, "latency_ms": 1.0, "memory_mb": 1.0, "margins": {}}}
    built = device_record(
        entry,
        finetune={"seconds": 1.0, "val_accuracy": 0.5, "test_accuracy": 0.5},
        finetune_key="k",
        measured={"flops_fvcore": 1, "params": 1, "host_latency_ms_onnxruntime": 1.0},
        export_record=record,
        model_sha256="x",
        cfg=_cfg(),
        learngene_sha256="y",
    )
    assert built["artifacts"]["onnx-copy"]["copied_from"] == "model.onnx"
    assert "private_note" not in built["artifacts"]["onnx-copy"]  # undeclared fields stay in export.json only


def _cfg():
    from factory.pipeline.config import BuildConfig

    return BuildConfig()


def test_initialisations_and_executors_are_registries_the_cli_reads():
    from click.testing import CliRunner

    from factory.cli import cli
    from factory.core.baselines import METHODS
    from factory.pipeline.executor import EXECUTORS

    help_text = CliRunner().invoke(cli, ["build", "--help"]).output
    for name in (*METHODS, *EXECUTORS):
        assert name in help_text


def test_every_initialisation_and_executor_is_one_registered_entry(demo_file):
    from factory.core.baselines import INITIALISATIONS, METHODS
    from factory.pipeline.executor import EXECUTOR_FACTORIES, EXECUTORS, LocalExecutor, make_executor
    from factory.pipeline.manifest_schema import MANIFEST_SCHEMA

    assert METHODS == tuple(INITIALISATIONS) and EXECUTORS == tuple(EXECUTOR_FACTORIES)
    init_enum = MANIFEST_SCHEMA["properties"]["devices"]["items"]["properties"]["init"]["enum"]
    assert init_enum == list(METHODS)
    assert isinstance(make_executor("local", jobs=2), LocalExecutor)
    with pytest.raises(FactoryError, match="unknown executor 'slurm'"):
        make_executor("slurm")
