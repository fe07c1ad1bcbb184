import itertools

import pytest
import torch

from factory import DescendantShape, FactoryError, expand, expand_tensors, sample_learngene
from factory.core.head_selection import descend
from factory.core.timm_vit import split_state_dict


@pytest.fixture(scope="module")
def learngene(ancestry):
    return sample_learngene(ancestry, 2, 4, seed=0)


def _shape(**kw):
    base = dict(depth=4, embed_dim=64, num_heads=4, mlp_ratio=4.0, img_size=32, patch_size=8, num_classes=10)
    base.update(kw)
    return DescendantShape(**base)


@pytest.mark.parametrize("selection", ["even", "importance"])
def test_selecting_all_indices_is_identity(ancestry, selection):
    stem, blocks = split_state_dict({k: v.detach() for k, v in ancestry.model.state_dict().items()}, 4)
    new_stem, new_blocks = descend(ancestry.arch, stem, blocks, 4, ancestry.arch.shape(), selection=selection)
    for k in stem:
        assert torch.equal(new_stem[k], stem[k])
    for k in blocks:
        assert torch.equal(new_blocks[k], blocks[k])


def test_even_selection_picks_documented_indices(ancestry):
    stem, blocks = split_state_dict({k: v.detach() for k, v in ancestry.model.state_dict().items()}, 4)
    shape = _shape(embed_dim=32, num_heads=2, mlp_ratio=2.0)  # head dim 16 kept, 2 of 4 heads
    new_stem, new_blocks = descend(ancestry.arch, stem, blocks, 4, shape)
    d_idx = torch.tensor([int(i * 63 / 31 + 0.5) for i in range(32)])  # round(i*(64-1)/(32-1))
    from factory.core.mixing import evenly_spaced

    assert torch.equal(evenly_spaced(32, 64), d_idx)
    torch.testing.assert_close(new_stem["cls_token"], stem["cls_token"][..., d_idx])
    torch.testing.assert_close(new_blocks["norm1.weight"], blocks["norm1.weight"][:, d_idx])
    # heads 0 and 3 of 4 (evenly spaced), their q rows, residual columns d_idx
    q = blocks["attn.qkv.weight"].reshape(4, 3, 4, 16, 64)[:, :, [0, 3]][..., d_idx]
    torch.testing.assert_close(new_blocks["attn.qkv.weight"], q.reshape(4, 96, 32))
    m_idx = evenly_spaced(64, 256)
    torch.testing.assert_close(new_blocks["mlp.fc2.weight"], blocks["mlp.fc2.weight"][:, d_idx][:, :, m_idx])


def test_importance_selection_keeps_the_heaviest_units(ancestry):
    stem, blocks = split_state_dict({k: v.detach().clone() for k, v in ancestry.model.state_dict().items()}, 4)
    blocks["mlp.fc1.weight"][:, 7] *= 100  # hidden unit 7 becomes the most important everywhere
    blocks["mlp.fc1.weight"][:, 8] *= 0  # unit 8 is dead
    shape = _shape(mlp_ratio=0.25)  # 16 of 256 units
    _, out = descend(ancestry.arch, stem, blocks, 4, shape, selection="importance")
    for layer in range(4):
        rows = out["mlp.fc1.weight"][layer]
        assert any(torch.equal(r, blocks["mlp.fc1.weight"][layer, 7]) for r in rows)
        assert not any(torch.equal(r, blocks["mlp.fc1.weight"][layer, 8]) for r in rows)


@pytest.mark.parametrize(
    "depth,width,heads,img",
    list(itertools.product([1, 3, 8], [64, 48, 32], [1, 2, 4, 8], [32, 48])),
)
def test_expansion_grid_runs_forward(learngene, depth, width, heads, img):
    if width % heads or width // heads > 16:
        with pytest.raises(FactoryError):
            expand(learngene, _shape(depth=depth, embed_dim=width, num_heads=heads, img_size=img))
        return
    shape = _shape(depth=depth, embed_dim=width, num_heads=heads, img_size=img, mlp_ratio=2.0)
    model = expand(learngene, shape)
    assert len(model.blocks) == depth and model.embed_dim == width
    assert model.blocks[0].attn.num_heads == heads
    out = model(torch.randn(2, 3, img, img))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_more_heads_than_the_gene_are_mixed_with_preserved_scale(ancestry):
    lg = sample_learngene(ancestry, 2, 2)  # 2 heads of dim 16
    shape = _shape(embed_dim=64, num_heads=4)  # 4 heads of dim 16
    state = expand_tensors(lg, shape)
    proj = state["blocks.0.attn.proj.weight"].reshape(64, 4, 16)
    gene_proj = lg.depth_map(4)(lg.genes["attn.proj.weight"])[0].reshape(64, 2, 16)
    torch.testing.assert_close(proj[:, 0], gene_proj[:, 0] * 0.5)  # interpolated heads, scale 2/4
    torch.testing.assert_close(proj[:, 3], gene_proj[:, 1] * 0.5)
    torch.testing.assert_close(proj[:, 1], (gene_proj[:, 0] * 2 / 3 + gene_proj[:, 1] / 3) * 0.5)


def test_expansion_is_differentiable(learngene):
    for t in learngene.genes.values():
        t.requires_grad_(True)
    dm = learngene.depth_map(5)
    try:
        state = expand_tensors(learngene, _shape(depth=5, embed_dim=48, num_heads=3, img_size=48), depth_map=dm)
        loss = sum(v.float().pow(2).sum() for k, v in state.items() if k.startswith("blocks."))
        loss.backward()
        assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in learngene.genes.values())
        assert all(p.grad is not None for p in dm.parameters())
    finally:
        for t in learngene.genes.values():
            t.requires_grad_(False)
            t.grad = None


def test_grid_and_patch_changes_resample_the_stem(learngene, images):
    small = expand(learngene, _shape(img_size=16))  # 2x2 grid
    assert small.pos_embed.shape == (1, 5, 64)
    patched = expand(learngene, _shape(img_size=32, patch_size=4))
    assert patched.patch_embed.proj.weight.shape == (64, 3, 4, 4)
    assert patched.pos_embed.shape == (1, 65, 64)
    assert patched(images).shape == (3, 10)


def test_classifier_is_inherited_only_when_classes_match(learngene):
    same = expand(learngene, _shape())
    assert torch.equal(same.head.weight, learngene.stem["head.weight"])
    other = expand(learngene, _shape(num_classes=3))
    assert other.head.weight.shape == (3, 64)
    assert torch.equal(
        expand(learngene, _shape(num_classes=3), seed=1).blocks[0].norm1.weight, other.blocks[0].norm1.weight
    )


def test_descendants_are_plain_timm_models(learngene):
    from timm.models.vision_transformer import VisionTransformer

    model = expand(learngene, _shape(depth=3))
    assert type(model) is VisionTransformer
    feats = model.forward_features(torch.randn(1, 3, 32, 32))
    assert feats.shape == (1, 17, 64)
    assert model.forward_head(feats).shape == (1, 10)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(embed_dim=128, num_heads=8), "exceeds the ancestry"),
        (dict(embed_dim=64, num_heads=2), "head dim"),
        (dict(mlp_ratio=8.0), "MLP hidden"),
    ],
)
def test_impossible_shapes_are_rejected(learngene, kw, match):
    with pytest.raises(FactoryError, match=match):
        expand(learngene, _shape(**kw))


def test_shape_validation():
    with pytest.raises(FactoryError, match="not divisible"):
        _shape(embed_dim=60, num_heads=7)
    with pytest.raises(FactoryError, match="multiple of patch_size"):
        _shape(img_size=30)
    with pytest.raises(FactoryError, match="depth"):
        _shape(depth=0)
    # a ratio so small that timm's int(width * ratio) is 0: refused with the least ratio, not as "got 0.0" later
    with pytest.raises(FactoryError, match=r"mlp_ratio 0.001 gives no MLP hidden units at width 64 .* at least 0.0156"):
        _shape(embed_dim=64, num_heads=2, mlp_ratio=0.001)
    assert _shape(embed_dim=64, num_heads=2, mlp_ratio=1 / 64).mlp_hidden == 1
