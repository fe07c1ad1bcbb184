import pytest
import torch

from factory import DepthMap, FactoryError
from factory.core.mixing import evenly_spaced, interpolation_matrix, mix_layers, mixing_matrix


@pytest.mark.parametrize("kind", ["softmax", "uniform", "identity"])
@pytest.mark.parametrize("n_out,n_in", [(1, 1), (3, 12), (6, 6), (4, 7)])
def test_mixing_rows_are_convex(kind, n_out, n_in):
    p = mixing_matrix(n_out, n_in, kind, generator=torch.Generator().manual_seed(0))
    assert p.shape == (n_out, n_in)
    assert (p >= 0).all()
    torch.testing.assert_close(p.sum(dim=1), torch.ones(n_out))


def test_softmax_mixing_is_seeded_and_temperature_controls_spread():
    a = mixing_matrix(3, 8, generator=torch.Generator().manual_seed(5))
    b = mixing_matrix(3, 8, generator=torch.Generator().manual_seed(5))
    c = mixing_matrix(3, 8, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    hot = mixing_matrix(3, 8, tau=100.0, generator=torch.Generator().manual_seed(5))
    cold = mixing_matrix(3, 8, tau=0.05, generator=torch.Generator().manual_seed(5))
    assert (hot - 1 / 8).abs().max() < 0.01  # tau -> inf tends to uniform
    assert cold.max(dim=1).values.min() > 0.9  # tau -> 0 tends to one-hot


def test_uniform_mixing_is_the_layer_mean():
    stack = torch.randn(5, 4, 3)
    torch.testing.assert_close(mix_layers(mixing_matrix(2, 5, "uniform"), stack), stack.mean(0).expand(2, 4, 3))


def test_identity_mixing_is_identity_or_even_selection():
    assert torch.equal(mixing_matrix(4, 4, "identity"), torch.eye(4))
    assert mixing_matrix(3, 7, "identity").argmax(1).tolist() == [0, 3, 6]


def test_bad_mixing_arguments():
    with pytest.raises(FactoryError, match="unknown mixing"):
        mixing_matrix(2, 3, "gaussian")
    with pytest.raises(FactoryError, match="tau"):
        mixing_matrix(2, 3, tau=0.0)


def test_evenly_spaced_indices():
    assert evenly_spaced(4, 4).tolist() == [0, 1, 2, 3]
    assert evenly_spaced(3, 12).tolist() == [0, 6, 11]
    assert evenly_spaced(1, 12).tolist() == [5]
    assert evenly_spaced(2, 9).tolist() == [0, 8]


def test_interpolation_matrix():
    assert torch.equal(interpolation_matrix(5, 5), torch.eye(5))
    m = interpolation_matrix(3, 2)
    torch.testing.assert_close(m, torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]))
    m = interpolation_matrix(4, 3)  # positions 0, 2/3, 4/3, 2
    torch.testing.assert_close(m[1], torch.tensor([1 / 3, 2 / 3, 0.0]))
    torch.testing.assert_close(m[2], torch.tensor([0.0, 2 / 3, 1 / 3]))
    torch.testing.assert_close(interpolation_matrix(1, 3), torch.tensor([[0.0, 1.0, 0.0]]))
    torch.testing.assert_close(interpolation_matrix(1, 2), torch.tensor([[0.5, 0.5]]))


@pytest.mark.parametrize("l_in,l_out", [(3, 3), (3, 7), (4, 2), (1, 5), (6, 1)])
def test_depth_map_starts_as_linear_interpolation(l_in, l_out):
    stack = torch.randn(l_in, 8, 5)
    dm = DepthMap(l_in, l_out, extra_hidden=3)
    expected = mix_layers(interpolation_matrix(l_out, l_in), stack)
    torch.testing.assert_close(dm(stack), expected, rtol=1e-6, atol=1e-6)


def test_depth_map_equal_depth_is_exact_identity():
    stack = torch.randn(4, 33)
    assert torch.equal(DepthMap(4, 4)(stack), stack)


def test_depth_map_is_nonlinear_after_perturbation_and_trainable():
    dm = DepthMap(2, 3)
    stack = torch.randn(2, 10, requires_grad=True)
    dm(stack).pow(2).sum().backward()
    assert stack.grad is not None and stack.grad.abs().sum() > 0
    assert all(p.grad is not None for p in dm.parameters())
    with torch.no_grad():
        dm.b1.fill_(-0.5)  # shifts the ReLU kinks: no longer linear in theta
    a, b = torch.ones(2, 1), 2 * torch.ones(2, 1)
    assert not torch.allclose(dm(b), 2 * dm(a))
