import pytest
import torch

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
