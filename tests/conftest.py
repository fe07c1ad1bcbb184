import pytest
import torch
from click.testing import CliRunner

from factory.cli import cli

from .helpers import make_vit


@pytest.fixture(scope="session")
def vit():
    return make_vit()


@pytest.fixture(scope="session")
def ancestry(vit):
    from factory import load_ancestry

    return load_ancestry(vit)


@pytest.fixture(scope="session")
def images():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="session")
def demo_file(tmp_path_factory):
    """The demo ancestry saved as a descendant checkpoint: what export and the format registry tests export."""
    from factory import load_ancestry
    from factory.core.checkpoint import save_descendant

    anc = load_ancestry("demo")
    path = tmp_path_factory.mktemp("demo") / "demo.safetensors"
    save_descendant(anc.model, anc.arch, path, {"method": "ancestry"})
    return path


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    """A finished tiny build (synthetic data, 2 steps), shared by the tests of re-exporting and user files."""
    from .test_build import _profile

    root = tmp_path_factory.mktemp("built")
    prof = _profile(root, "tiny")
    out = root / "out"
    res = CliRunner().invoke(
        cli,
        [
            "build",
            "--profile",
            str(prof),
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
    return out


@pytest.fixture(scope="session")
def kit(tmp_path_factory):
    kit = tmp_path_factory.mktemp("kit") / "kit"
    res = CliRunner().invoke(cli, ["calibrate", "--profile", "demo/jetson_orin", "--shapes", "3", "--out", str(kit)])
    assert res.exit_code == 0, res.output
    return kit
