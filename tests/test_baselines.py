import pytest
import torch

from factory import METHODS, DescendantShape, FactoryError, init_descendant, sample_learngene
from factory.core.baselines import tleg_expand, tleg_fit, weight_selection_layers
from factory.core.timm_vit import split_state_dict

SHAPES = [
    DescendantShape(2, 32, 2, 2.0, 32, 8, 10),  # shallower and narrower
    DescendantShape(7, 64, 4, 4.0, 48, 8, 5),  # deeper, new grid and classes
]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.label())
def test_every_method_builds_the_requested_shape(ancestry, method, shape):
    lg = sample_learngene(ancestry, 2, 4)
    model = init_descendant(method, shape, ancestry=ancestry, learngene=lg)
    assert len(model.blocks) == shape.depth and model.embed_dim == shape.embed_dim
    assert model.blocks[0].mlp.fc1.out_features == shape.mlp_hidden
    out = model(torch.randn(2, 3, shape.img_size, shape.img_size))
    assert out.shape == (2, shape.num_classes) and torch.isfinite(out).all()


def test_scratch_is_seeded_and_differs_from_inherited(ancestry):
    shape = SHAPES[0]
    a = init_descendant("scratch", shape, ancestry=ancestry, seed=1)
    b = init_descendant("scratch", shape, ancestry=ancestry, seed=1)
    c = init_descendant("scratch", shape, ancestry=ancestry, seed=2)
    assert torch.equal(a.blocks[0].attn.qkv.weight, b.blocks[0].attn.qkv.weight)
    assert not torch.equal(a.blocks[0].attn.qkv.weight, c.blocks[0].attn.qkv.weight)


def test_tleg_formula_on_a_known_pair():
    theta_a, theta_b = torch.tensor([1.0, -2.0]), torch.tensor([4.0, 8.0])
    out = tleg_expand(theta_a, theta_b, 4)  # theta_l = A + (l/4) B, l = 1..4
    torch.testing.assert_close(out, torch.tensor([[2.0, 0.0], [3.0, 2.0], [4.0, 4.0], [5.0, 6.0]]))
    a, b = tleg_fit(out)  # layers that are exactly linear in l/L are fitted exactly
    torch.testing.assert_close(a, theta_a)
    torch.testing.assert_close(b, theta_b)


def test_tleg_init_uses_the_fitted_line(ancestry):
    shape = DescendantShape(3, 64, 4, 4.0, 32, 8, 10)
    model = init_descendant("tleg", shape, ancestry=ancestry)
    _, blocks = split_state_dict({k: v.detach() for k, v in ancestry.model.state_dict().items()}, 4)
    a, b = tleg_fit(blocks["mlp.fc1.bias"])
    torch.testing.assert_close(model.blocks[1].mlp.fc1.bias, a + (2 / 3) * b)


def test_weight_selection_takes_first_layers_then_evenly_spaced(ancestry):
    assert weight_selection_layers(3, 12).tolist() == [0, 1, 2]
    assert weight_selection_layers(6, 4).tolist() == [0, 1, 1, 2, 2, 3]
    shape = DescendantShape(2, 32, 2, 2.0, 32, 8, 10)
    model = init_descendant("weight_selection", shape, ancestry=ancestry)
    anc = ancestry.model
    d_idx = torch.tensor([int(i * 63 / 31 + 0.5) for i in range(32)])
    torch.testing.assert_close(model.blocks[1].norm2.weight, anc.blocks[1].norm2.weight[d_idx])
    torch.testing.assert_close(model.patch_embed.proj.weight, anc.patch_embed.proj.weight[d_idx])


def test_method_errors(ancestry):
    with pytest.raises(FactoryError, match="unknown init method"):
        init_descendant("magic", SHAPES[0], ancestry=ancestry)
    with pytest.raises(FactoryError, match="needs a learngene"):
        init_descendant("peg", SHAPES[0], ancestry=ancestry)
    with pytest.raises(FactoryError, match="needs an ancestry"):
        init_descendant("tleg", SHAPES[0])
