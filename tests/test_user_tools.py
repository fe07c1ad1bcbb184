"""A default build's artifacts open in the users' own tools as they are: timm, Hugging Face, onnxruntime."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from factory.cli import cli

from .test_build import _profile


@pytest.fixture(scope="module")
def device_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tools")
    out = root / "out"
    res = CliRunner().invoke(
        cli,
        [
            "build",
            "--profile",
            str(_profile(root, "tiny")),
            "--out",
            str(out),
            "--data",
            "synthetic",
            "--steps",
            "2",
            "--batch-size",
            "8",
        ],
    )
    assert res.exit_code == 0, res.output
    return out / "tiny"


def test_timm_local_dir_gives_the_onnx_logits(device_dir):
    import onnxruntime as ort
    import timm

    model = timm.create_model(f"local-dir:{device_dir}", pretrained=True).eval()
    x = np.random.default_rng(0).standard_normal((3, 1, 28, 28)).astype(np.float32)
    sess = ort.InferenceSession(str(device_dir / "export" / "model.onnx"))
    with torch.no_grad():
        assert np.abs(model(torch.from_numpy(x)).numpy() - sess.run(None, {"images": x})[0]).max() < 1e-4
    cfg = json.loads((device_dir / "config.json").read_text())
    assert (
        cfg["architecture"]
        and cfg["model_args"]["in_chans"] == 1
        and cfg["label_names"] == [f"class{i}" for i in range(4)]
    )
    data = timm.data.resolve_data_config({}, model=model)
    assert tuple(data["input_size"]) == (1, 28, 28) and list(data["mean"]) == [0.0] and list(data["std"]) == [1.0]
    assert data["crop_pct"] == 1.0


def test_the_safetensors_metadata_rebuilds_with_timms_own_keywords(device_dir):
    from safetensors import safe_open
    from safetensors.torch import load_file
    from timm.models.vision_transformer import VisionTransformer

    with safe_open(str(device_dir / "model.safetensors"), "pt") as fh:
        args = json.loads(fh.metadata()["timm.model_args"])
    model = VisionTransformer(**args)
    model.load_state_dict(load_file(str(device_dir / "model.safetensors")))


def test_the_model_card_is_a_hugging_face_card(device_dir):
    from huggingface_hub import ModelCard

    card = ModelCard.load(device_dir / "MODEL_CARD.md")
    assert card.data.library_name == "timm" and "image-classification" in card.data.tags
    assert card.data.license and card.data.datasets == ["synthetic"]
    manifest = json.loads((device_dir.parent / "manifest.json").read_text())
    result = card.data.eval_results[0]
    assert result.metric_type == "accuracy" and result.metric_value == round(
        manifest["devices"][0]["accuracy"]["test"], 4
    )
    text = card.text
    assert (
        "## Intended use" in text
        and "## Limitations" in text
        and 'timm.create_model("local-dir:.", pretrained=True)' in text
    )
    assert manifest["devices"][0]["artifacts"]["timm_config"]["path"] == "tiny/config.json"


def test_the_report_reads_as_an_engineer_needs(device_dir):
    from html.parser import HTMLParser

    out = device_dir.parent
    md = (out / "report.md").read_text()
    for section in (
        "## tiny",
        "**Deploy:**",
        "### Budgets",
        "### Artifacts",
        "### Accuracy vs latency",
        "### Training curve",
        "### Confusion matrix (test)",
    ):
        assert section in md, section
    assert "| params_m | 0.2 M params |" in md and "| within |" in md
    assert "says nothing about the target (onnxruntime on tiny)" in md  # a host timing is flagged as such
    assert "`" not in md.split("\n", 3)[2]  # no literal backticks in the introduction

    class Page(HTMLParser):
        def __init__(self):
            super().__init__()
            self.images, self.headings, self._h = [], [], False

        def handle_starttag(self, tag, attrs):
            self._h = tag in ("h2", "h3")
            if tag == "img":
                self.images.append(dict(attrs))

        def handle_data(self, data):
            if self._h:
                self.headings.append(data)
                self._h = False

    page = Page()
    page.feed((out / "report.html").read_text())
    assert {i["alt"] for i in page.images} == {"Accuracy vs latency", "Training curve", "Confusion matrix (test)"}
    assert all(i["src"].startswith("data:image/png;base64,") and len(i["src"]) > 2000 for i in page.images)
    assert {"tiny", "Budgets", "Artifacts"} <= set(page.headings)
    manifest = json.loads((out / "manifest.json").read_text())
    dev = manifest["devices"][0]
    assert len(dev["finetune"]["curve"]) == 2 and sum(map(sum, dev["accuracy"]["confusion"])) == 64  # the test split


def test_a_build_leaks_no_library_warnings_and_prints_rounded_numbers(tmp_path):
    import re
    import subprocess
    import sys

    pytest.importorskip(
        "openvino", reason="OpenVINO is an optional extra: pip install 'peg-factory[openvino]' (CI installs it)"
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "factory.cli",
            "build",
            "--profile",
            "demo/raspberry_pi5_openvino",
            "--out",
            str(tmp_path / "o"),
            "--data",
            "digits",
            "--steps",
            "2",
            "--batch-size",
            "8",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    noise = [
        line
        for line in done.stderr.replace("\r", "\n").splitlines()
        if line.strip() and not re.match(r"^(finetune|probes|expanding phase|int8 calibration)\b", line.strip())
    ]
    assert not noise, noise  # progress bars only: no "No CUDA runtime is found", no library warnings
    assert not re.search(r"\d\.\d{7,}", done.stdout), done.stdout  # numbers are rounded in the log


def test_the_timm_config_is_the_same_with_a_timm_before_data_config(tmp_path, monkeypatch):
    """timm < 1.0.30's ``save_config_for_hf`` takes no ``data_config`` (the first GPU machine's timm 1.0.29
    failed the build there): the preprocessing then rides on the twin's ``pretrained_cfg``, same config.json."""
    import timm.models._hub as hub

    from factory import load_ancestry
    from factory.core.checkpoint import write_timm_config

    arch = load_ancestry("demo").arch
    kwargs = {"mean": (0.13,), "std": (0.31,), "label_names": [str(i) for i in range(10)], "crop_pct": 0.875}
    (tmp_path / "new").mkdir()
    (tmp_path / "old").mkdir()
    new = json.loads(write_timm_config(tmp_path / "new", arch, **kwargs).read_text())
    current = hub.save_config_for_hf

    def before_data_config(model, config_path, model_config=None, model_args=None):
        with config_path.open("w"):  # as timm < 1.0.30 opens it: a Path, not a str
            pass
        return current(model, config_path, model_config=model_config, model_args=model_args)

    monkeypatch.setattr(hub, "save_config_for_hf", before_data_config)
    old = json.loads(write_timm_config(tmp_path / "old", arch, **kwargs).read_text())
    for cfg in (old, new):  # timm drops null fields (remove_null) or writes them: the same config to a reader
        cfg["pretrained_cfg"] = {k: v for k, v in cfg["pretrained_cfg"].items() if v is not None}
    assert old == new
    assert new["pretrained_cfg"]["mean"] == [0.13] and new["pretrained_cfg"]["crop_pct"] == 0.875
    assert new["pretrained_cfg"]["input_size"] == [1, 28, 28] and new["pretrained_cfg"]["tag"] == "peg-factory"
