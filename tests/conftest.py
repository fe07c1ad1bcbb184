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
