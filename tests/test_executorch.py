"""ExecuTorch artifacts (the executorch extra, installed by CI): an XNNPACK .pte, FP32 and INT8, verified on the
task's test images with its delegate coverage; refused in one line without the extra."""

from __future__ import annotations

import pytest

from factory.errors import FactoryError

from .helpers import cli_run, one_line_exit_2, small_descendant

executorch = pytest.importorskip(
    "executorch", reason="the executorch extra is not installed (pip install 'peg-factory[executorch]'; CI installs it)"
)


@pytest.fixture(scope="module")
def small_file(tmp_path_factory):
    """A 2-block descendant of the demo ancestry (weight selection: real features), quick to lower and run."""
    return small_descendant(tmp_path_factory.mktemp("et-model") / "d2.safetensors", 96, 3)


@pytest.fixture(scope="module")
def exported(small_file, tmp_path_factory):
    from export.api import export_model

    out = tmp_path_factory.mktemp("et") / "exp"
    lines: list[str] = []
    record = export_model(small_file, ["executorch", "executorch-int8"], out, data="digits", log=lines.append)
    return out, record, lines


def test_the_fp32_program_is_exact_on_the_task_images_with_its_coverage(exported):
    from export.executorch_export import pte_logits, pte_method

    out, record, lines = exported
    art = record["artifacts"]["executorch"]
    assert (out / "model.pte").is_file() and art["checked_on"].endswith("test images")
    assert art["max_abs_diff_vs_pytorch"] <= 1e-4 and art["top1_agreement"] == 1.0
    assert art["accuracy_drop_vs_fp32"] == 0.0 and 0 <= art["test_accuracy"] <= 1  # PyTorch's own predictions
    assert 0 < art["delegated_ops"] <= art["total_ops"] and art["delegated_fraction"] > 0.5
    assert "getitem" not in art["outside_ops"]  # tuple indexing is not an operator
    if art["delegated_fraction"] < 0.9:  # what stays on the portable kernels is named, in the log too
        assert art["warning"].startswith("XNNPACK takes") and any("WARNING XNNPACK" in line for line in lines)
    assert art["attention"] in ("explicit", "fused") and art["latency_ms_b1"] > 0
    import numpy as np

    x = np.zeros((2, 1, 28, 28), dtype=np.float32)
    assert pte_logits(pte_method(out / "model.pte"), x).shape == (2, 10)  # the file runs on its own
    assert any(line.startswith("executorch: model.pte") for line in lines)


def test_the_int8_program_is_calibrated_and_checked_by_accuracy(exported):
    _, record, _ = exported
    art = record["artifacts"]["executorch-int8"]
    assert art["calibration_images"] > 0 and art["file"] == "model.int8.pte"
    assert art["top1_agreement"] > 0.8 and abs(art["accuracy_drop_vs_fp32"]) < 0.1


def test_the_explicit_attention_form_lowers_more_of_the_graph(exported, small_file):
    """timm's fused attention stays on ExecuTorch's portable kernels; the export keeps the form XNNPACK takes."""
    import torch

    from export.context import set_fused_attention
    from export.executorch_export import lower
    from factory.core.checkpoint import load_descendant

    model = load_descendant(small_file).eval()
    x = torch.zeros(1, 1, 28, 28)
    shares = {}
    for fused in (True, False):
        set_fused_attention(model, fused)
        shares[fused] = lower(model, x)[1]
    set_fused_attention(model, True)
    frac = {k: v["delegated_ops"] / v["total_ops"] for k, v in shares.items()}
    assert frac[False] >= frac[True]
    assert exported[1]["artifacts"]["executorch"]["attention"] == ("explicit" if frac[False] >= frac[True] else "fused")


def test_without_the_extra_the_format_is_one_line_naming_it(small_file, tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_executorch(name, *args, **kwargs):
        if name.startswith("executorch"):
            raise ImportError("No module named 'executorch'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_executorch)
    from export.executorch_export import require_executorch

    with pytest.raises(FactoryError, match=r"pip install 'peg-factory\[executorch\]'"):
        require_executorch()
    res = cli_run("export", "--model", small_file, "--format", "executorch", "--out", tmp_path / "x")
    one_line_exit_2(res, "peg-factory[executorch]")
