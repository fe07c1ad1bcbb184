"""The trained learngene: rescale, head-mixing switch, exact resume, 0 steps, the shipped one, the build stage."""

import dataclasses

import pytest
import torch

import factory.training.batches as batches
from factory import DescendantShape, expand, load_ancestry, sample_learngene
from factory.core.demo import load_demo_learngene
from factory.core.expanding_phase import ExpandingConfig, default_shapes, default_widths
from factory.core.mixing import mixing_matrix, rescale_like
from factory.data import load_dataset, make_synthetic
from factory.device.profile import load_profile
from factory.pipeline.build import BuildConfig, build
from factory.training.expanding_loop import train_learngene
from factory.training.train import evaluate

from .helpers import make_vit
from .test_build import _profile


def test_rescale_restores_the_mixed_layers_spread():
    gen = torch.Generator().manual_seed(0)
    stack = torch.randn(6, 50, 40, generator=gen) * torch.linspace(0.5, 2.0, 6)[:, None, None] + 0.3
    p = mixing_matrix(3, 6, tau=1.0, generator=gen)
    mixed = torch.tensordot(p, stack, dims=([1], [0]))
    out = rescale_like(mixed, stack, p)
    target = torch.sqrt(p @ stack.reshape(6, -1).var(dim=1, unbiased=False))
    assert torch.allclose(out.reshape(3, -1).std(dim=1, unbiased=False), target, rtol=1e-4)
    assert torch.allclose(out.reshape(3, -1).mean(dim=1), mixed.reshape(3, -1).mean(dim=1), atol=1e-5)
    assert (mixed.reshape(3, -1).std(dim=1) < 0.9 * target).all()  # the shrink it undoes is real
    one_hot = mixing_matrix(3, 6, "identity")
    selected = torch.tensordot(one_hot, stack, dims=([1], [0]))
    assert torch.allclose(rescale_like(selected, stack, one_hot), selected, atol=1e-5)


def test_rescaled_learngene_is_closer_to_the_ancestry(ancestry):
    plain = sample_learngene(ancestry, 2, seed=0)
    scaled = sample_learngene(ancestry, 2, seed=0, rescale="std")
    assert torch.equal(plain.layer_mixing, scaled.layer_mixing)
    s_plain, s_scaled = plain.meta["stats"]["summary"], scaled.meta["stats"]["summary"]
    assert abs(s_scaled["mean_std_ratio"] - 1) < abs(s_plain["mean_std_ratio"] - 1)
    assert s_scaled["mean_w1_rel"] < s_plain["mean_w1_rel"]
    assert scaled.meta["rescale"] == "std" and scaled.meta["heads_mixed"] is True


def test_head_mixing_off_keeps_whole_heads(ancestry):
    lg = sample_learngene(ancestry, 2, 2, seed=3, head_mixing=False)
    assert ((lg.head_mixing == 0) | (lg.head_mixing == 1)).all() and torch.equal(
        lg.head_mixing.sum(-1), torch.ones(2, 2)
    )
    mixed = sample_learngene(ancestry, 2, 2, seed=3)
    assert torch.equal(lg.layer_mixing, mixed.layer_mixing)  # same layer draw either way
    with pytest.raises(Exception, match="at most"):
        sample_learngene(ancestry, 2, 8, head_mixing=False)


def _interrupt_expanding_phase_at(monkeypatch, call: int):
    """Make the expanding phase's ``call``-th batch raise KeyboardInterrupt (a killed run); returns
    the real ``step_batch`` to put back."""
    real = batches.step_batch
    calls = []

    def dies(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(batches, "step_batch", dies)
    return real


@pytest.fixture(scope="module")
def small():
    teacher = make_vit(img_size=16, patch_size=4, num_classes=4)
    anc = load_ancestry(teacher)
    lg = sample_learngene(anc, 2, 4, rescale="std")
    data = make_synthetic(img_size=16, num_classes=4, n_train=64, n_val=16, in_chans=3)
    return anc, lg, data, default_shapes(lg, [1, 3, 5], [64, 32])


def test_zero_steps_is_the_sampled_learngene(small, tmp_path):
    anc, lg, data, shapes = small
    trained, report = train_learngene(lg, anc, data.train, shapes, ExpandingConfig(steps=0), progress=False)
    assert report["history"] == []
    assert set(trained.genes) == set(lg.genes) and all(torch.equal(trained.genes[k], lg.genes[k]) for k in lg.genes)
    assert all(torch.equal(trained.stem[k], lg.stem[k]) for k in lg.stem)
    assert lg.save(tmp_path / "a") == trained.save(tmp_path / "b")


def test_expanding_phase_trains_every_width_and_resumes_bit_exactly(small, tmp_path, monkeypatch):
    anc, lg, data, shapes = small
    assert {s.embed_dim for s in shapes} == {64, 32}
    cfg = ExpandingConfig(steps=6, batch_size=16, lr=2e-3)
    whole, _ = train_learngene(lg, anc, data.train, shapes, cfg, progress=False)
    real = _interrupt_expanding_phase_at(monkeypatch, 5)  # dies after step 4 (checkpointed at 2 and 4)
    with pytest.raises(KeyboardInterrupt):
        train_learngene(lg, anc, data.train, shapes, cfg, out_dir=tmp_path, ckpt_every=2, progress=False)
    monkeypatch.setattr(batches, "step_batch", real)
    resumed, report = train_learngene(
        lg, anc, data.train, shapes, cfg, out_dir=tmp_path, ckpt_every=2, resume=True, progress=False
    )
    assert [h["step"] for h in report["history"]] == [5, 6]
    for k in whole.genes:
        assert torch.equal(whole.genes[k], resumed.genes[k]), k
    for d in whole.depth_maps:
        assert all(
            torch.equal(a, b) for a, b in zip(whole.depth_maps[d].parameters(), resumed.depth_maps[d].parameters())
        )
    assert not torch.equal(whole.genes["mlp.fc1.weight"], lg.genes["mlp.fc1.weight"])


def test_default_widths_and_depths_cover_the_search_space():
    lg = load_demo_learngene()
    assert default_widths(lg) == [96, 144, 192]
    assert set(lg.depth_maps) == set(range(1, 13))


def test_shipped_learngene_expands_at_every_trained_depth_and_knows_mnist():
    lg = load_demo_learngene()
    val = load_dataset("mnist", img_size=28).val.subset(0, 500)
    x = val.images[:4]
    for depth in sorted(lg.depth_maps):
        for width in default_widths(lg):
            shape = DescendantShape(depth, width, 3, 4.0, 28, 7, 10)
            logits = expand(lg, shape)(x)
            assert logits.shape == (4, 10) and torch.isfinite(logits).all(), shape.label()
    # trained: expansions at the ancestry's width already classify the ancestry's own task
    for depth in (3, 6, 12):
        acc = evaluate(expand(lg, DescendantShape(depth, 192, 3, 4.0, 28, 7, 10)), val)
        assert acc > 0.8, (depth, acc)


def test_build_uses_the_shipped_learngene_by_default(tmp_path):
    lines = []
    build(
        [load_profile(_profile(tmp_path, "tiny"))],
        tmp_path / "out",
        BuildConfig(data="synthetic", finetune_steps=2, batch_size=8),
        log=lines.append,
    )
    assert any("shipped demo learngene" in line for line in lines), lines
    manifest = (tmp_path / "out" / "manifest.json").read_text()
    assert load_demo_learngene().sha256 in manifest


def test_build_trains_other_learngenes_once_caches_and_resumes(tmp_path, monkeypatch):
    prof = load_profile(_profile(tmp_path, "tiny"))
    cfg = BuildConfig(
        data="synthetic", finetune_steps=2, batch_size=8, gene_seed=1, expand_steps=4, expand_min_steps=1
    )  # 4 steps count as trained (else --init auto skips a phase that short)
    real = _interrupt_expanding_phase_at(monkeypatch, 4)  # dies after step 3 of 4
    with pytest.raises(KeyboardInterrupt):
        build([prof], tmp_path / "a", cfg, log=lambda *_: None)
    monkeypatch.setattr(batches, "step_batch", real)
    lines = []
    resumed = build([prof], tmp_path / "a", cfg, log=lines.append)
    assert any("expanding phase: resuming" in line for line in lines), lines
    assert any("trained 4 expanding-phase steps on mnist" in line for line in lines), lines
    whole = build([prof], tmp_path / "b", cfg, log=lambda *_: None)
    assert resumed["learngene"]["sha256"] == whole["learngene"]["sha256"] != load_demo_learngene().sha256
    lines.clear()
    build([prof], tmp_path / "a", dataclasses.replace(cfg, finetune_steps=3), log=lines.append)
    assert any(line.startswith("learngene: cached") for line in lines), lines
