import json

import pytest
import torch

from factory import FactoryError, Learngene, expand, sample_learngene
from factory.core.mixing import mix_heads
from factory.core.timm_vit import join_state_dict, split_state_dict

from .helpers import make_vit


def test_identity_learngene_reproduces_the_ancestry_exactly(ancestry, images):
    lg = sample_learngene(ancestry, ancestry.arch.depth, ancestry.arch.num_heads, mixing="identity")
    model = expand(lg, ancestry.arch.shape())
    with torch.no_grad():
        diff = (model(images) - ancestry.model(images)).abs().max().item()
    assert diff <= 1e-5


def test_identity_is_exact_with_register_tokens_avg_pool_and_layer_scale(images):
    vit = make_vit(reg_tokens=2, class_token=False, global_pool="avg", init_values=0.1, no_embed_class=True)
    lg = sample_learngene(vit, 4, 4, mixing="identity")
    model = expand(lg, lg.arch.shape())
    with torch.no_grad():
        assert (model(images) - vit(images)).abs().max().item() <= 1e-5


def test_head_permutation_leaves_each_block_unchanged(vit):
    state = {k: v.detach() for k, v in vit.state_dict().items()}
    stem, blocks = split_state_dict(state, 4)
    perm = torch.stack([torch.eye(4)[torch.randperm(4, generator=torch.Generator().manual_seed(i))] for i in range(4)])
    mixed = mix_heads(blocks, perm, head_dim=16)
    assert not torch.equal(mixed["attn.qkv.weight"], blocks["attn.qkv.weight"])
    permuted = make_vit()
    permuted.load_state_dict(join_state_dict(stem, mixed))
    x = torch.randn(2, 17, 64)
    with torch.no_grad():
        for b_orig, b_perm in zip(vit.blocks, permuted.blocks):
            torch.testing.assert_close(b_perm(x), b_orig(x), rtol=1e-5, atol=1e-5)


def test_sampling_is_seeded_and_bit_identical(ancestry):
    a = sample_learngene(ancestry, 2, 3, seed=7)
    b = sample_learngene(ancestry, 2, 3, seed=7)
    c = sample_learngene(ancestry, 2, 3, seed=8)
    for name in a.genes:
        assert torch.equal(a.genes[name], b.genes[name])
    assert not torch.equal(a.genes["mlp.fc1.weight"], c.genes["mlp.fc1.weight"])
    assert torch.equal(a.layer_mixing, b.layer_mixing)


def test_gene_tensors_are_the_documented_mixtures(ancestry):
    lg = sample_learngene(ancestry, 2, 2, seed=3)
    _, blocks = split_state_dict({k: v.detach() for k, v in ancestry.model.state_dict().items()}, 4)
    p, q = lg.layer_mixing, lg.head_mixing
    assert p.shape == (2, 4) and q.shape == (2, 2, 4)
    torch.testing.assert_close(lg.genes["mlp.fc2.weight"], torch.einsum("ba,a...->b...", p, blocks["mlp.fc2.weight"]))
    # gene layer 0, head 1, q rows = sum_i q[0,1,i] * (layer-mixed head i q rows)
    layer0 = torch.einsum("a,a...->...", p[0], blocks["attn.qkv.weight"]).reshape(3, 4, 16, 64)
    expected = torch.einsum("h,thed->ted", q[0, 1], layer0)
    got = lg.genes["attn.qkv.weight"][0].reshape(3, 2, 16, 64)[:, 1]
    torch.testing.assert_close(got, expected)
    assert lg.genes["attn.proj.weight"].shape == (2, 64, 32)


def test_uniform_learngene_is_the_ancestry_mean(ancestry):
    lg = sample_learngene(ancestry, 3, 4, mixing="uniform")
    _, blocks = split_state_dict({k: v.detach() for k, v in ancestry.model.state_dict().items()}, 4)
    for name in ("norm1.weight", "mlp.fc1.weight"):
        torch.testing.assert_close(lg.genes[name], blocks[name].mean(0).expand_as(lg.genes[name]))
    # uniform head mixing: every gene head equals the mean head
    w = lg.genes["attn.qkv.weight"].reshape(3, 3, 4, 16, 64)
    torch.testing.assert_close(w[:, :, 0], w[:, :, 3])


def test_distribution_report_is_in_the_metadata(ancestry, tmp_path):
    same = sample_learngene(ancestry, 4, 4, mixing="identity")
    mixed = sample_learngene(ancestry, 2, 2, mixing="softmax")
    s_same, s_mixed = same.meta["stats"]["summary"], mixed.meta["stats"]["summary"]
    assert s_same["mean_w1_rel"] < 1e-6 and abs(s_same["mean_std_ratio"] - 1) < 1e-6
    assert s_mixed["mean_w1_rel"] > 0.05  # a convex mixture shrinks the spread: measured, not assumed
    assert 0 < s_mixed["mean_std_ratio"] < 1
    mixed.save(tmp_path / "lg")
    meta = json.loads((tmp_path / "lg" / "learngene.json").read_text())
    assert set(meta["stats"]["per_tensor"]["mlp.fc1.weight"]) >= {"ancestry_std", "gene_std", "w1_rel"}
    assert meta["seed"] == 0 and meta["tau"] == 1.0 and meta["mixing"] == "softmax"
    assert meta["ancestry"]["sha256"] == ancestry.sha256
    assert len(meta["layer_mixing"]) == 2


def test_save_load_round_trip_is_bit_exact(ancestry, tmp_path):
    lg = sample_learngene(ancestry, 2, 3, seed=1)
    from factory import DepthMap

    lg.depth_maps[5] = DepthMap(2, 5, extra_hidden=2, seed=3)
    digest = lg.save(tmp_path / "lg")
    back = Learngene.load(tmp_path / "lg")
    assert back.sha256 == digest
    assert back.tensors().keys() == lg.tensors().keys()
    for key, value in lg.tensors().items():
        assert torch.equal(back.tensors()[key], value), key
    assert back.arch == lg.arch and back.num_heads == 3 and set(back.depth_maps) == {5}
    assert lg.save(tmp_path / "lg2") == digest  # deterministic bytes


def test_corrupted_and_truncated_learngene_files_give_clear_errors(ancestry, tmp_path):
    lg = sample_learngene(ancestry, 2, 2)
    lg.save(tmp_path / "lg")
    tensors = tmp_path / "lg" / "learngene.safetensors"
    data = tensors.read_bytes()
    tensors.write_bytes(data[: len(data) // 2])
    with pytest.raises(FactoryError, match="corrupted or truncated"):
        Learngene.load(tmp_path / "lg")
    tensors.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(FactoryError, match="corrupted"):
        Learngene.load(tmp_path / "lg")
    tensors.write_bytes(data)
    (tmp_path / "lg" / "learngene.json").write_text("{not json")
    with pytest.raises(FactoryError, match="learngene.json is corrupted"):
        Learngene.load(tmp_path / "lg")
    with pytest.raises(FactoryError, match="not a learngene directory"):
        Learngene.load(tmp_path / "missing")


def test_failed_save_leaves_the_previous_learngene_intact(ancestry, tmp_path, monkeypatch):
    lg = sample_learngene(ancestry, 2, 2)
    digest = lg.save(tmp_path / "lg")
    other = sample_learngene(ancestry, 2, 2, seed=9)

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("json.dumps", boom)
    with pytest.raises(OSError):
        other.save(tmp_path / "lg")
    monkeypatch.undo()  # loading checks learngene.json's own hash (json.dumps)
    assert Learngene.load(tmp_path / "lg").sha256 == digest
    assert [p.name for p in tmp_path.iterdir()] == ["lg"]  # no temp leftovers


def test_invalid_sampling_arguments(ancestry):
    with pytest.raises(FactoryError, match=r"heads 5 exceed the ancestry's 4: .* give at most 4") as err:
        sample_learngene(ancestry, 2, ancestry.arch.num_heads + 1)  # a learngene larger than its ancestry
    assert err.value.param == "heads"
    with pytest.raises(FactoryError, match="exceed the ancestry's"):
        sample_learngene(ancestry, ancestry.arch.depth + 1)
    with pytest.raises(FactoryError, match="layers must be"):
        sample_learngene(ancestry, 0)
    with pytest.raises(FactoryError, match="unknown mixing"):
        sample_learngene(ancestry, 2, mixing="nope")
