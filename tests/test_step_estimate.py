"""The expanding-phase step estimated from shallow probe passes (factory.training.step_estimate)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from factory import load_ancestry, sample_learngene
from factory.core.expanding_phase import ExpandingConfig, default_shapes, picks_at
from factory.core.shapes import vit_flops
from factory.data import ImageTensors
from factory.training import expanding_loop, step_estimate
from factory.training.micro_batch import activation_mb_per_image, micro_batch_size, spans
from factory.training.step_estimate import StepModel, affine_pass, between, block_type, probe_plan


@pytest.fixture(scope="module")
def demo():
    anc = load_ancestry("demo")
    return anc, sample_learngene(anc, anc.arch.depth // 2, seed=0, rescale="std")


def test_the_probe_runs_each_block_type_at_depth_one_and_the_probe_depth_sized_as_its_deepest(demo):
    _, lg = demo
    shapes = default_shapes(lg)  # depths 1..12 (twice the demo ancestry's) at three widths
    probes, sized_as = probe_plan(shapes, 6)
    widths = sorted({s.embed_dim for s in shapes})
    assert len(widths) == 3 and sorted((p.embed_dim, p.depth) for p in probes) == [
        (w, d) for w in widths for d in (1, 6)
    ]
    assert all(sized_as[p].depth == 12 and block_type(sized_as[p]) == block_type(p) for p in probes)
    shallow = [s for s in shapes if s.depth <= 4]  # no shape as deep as the probe depth: probed at its deepest
    assert sorted({p.depth for p in probe_plan(shallow, 6)[0]}) == [1, 4]
    assert step_estimate.extrapolates(shapes) and not step_estimate.extrapolates(shallow)
    assert not step_estimate.extrapolates(shapes, None) and not step_estimate.extrapolates(shapes, 24)


def test_a_pass_is_affine_in_depth_per_block_type_and_log_interpolated_in_micro_batch_size(demo):
    _, lg = demo
    shapes = default_shapes(lg)
    probes, _ = probe_plan(shapes, 6)
    timed = {p: (1.0 if p.depth == 1 else 3.5) * p.embed_dim / 96 for p in probes}
    for s in shapes:  # slope (3.5 - 1) / 5 = 0.5 a block at width 96, scaled by width
        assert affine_pass(s, timed) == pytest.approx((1.0 + 0.5 * (s.depth - 1)) * s.embed_dim / 96)
    flat = {
        p: (2.0 if p.depth == 1 else 1.0) for p in probes
    }  # noise making the deeper probe faster: no negative slope
    assert affine_pass(shapes[-1], flat) == 2.0
    # micro-batches of 8 images, between probes at 2 and 32: halfway in log m
    assert between(8.0, (2.0, 10.0), (32.0, 6.0)) == pytest.approx(8.0)
    assert between(64.0, (2.0, 10.0), (32.0, 6.0)) == 6.0 and between(1.0, (2.0, 10.0), (32.0, 6.0)) == 10.0
    assert between(5.0, (4.0, 3.0), (4.0, 9.0)) == 3.0  # one micro-batch size: nothing to interpolate


def test_the_second_probe_is_cut_as_the_shallowest_shapes_and_never_deeper_than_they_are(demo):
    _, lg = demo
    shapes = default_shapes(lg)
    per_piece = {s: 64.0 if s.depth <= 3 else 16.0 for s in shapes}.__getitem__  # whole batch up to d3
    probes, sized_as = probe_plan(shapes, 6, per_piece)
    assert sorted({p.depth for p in probes}) == [1, 3] and all(sized_as[p].depth == 3 for p in probes)
    assert all(per_piece(sized_as[p]) == 64.0 for p in probes)


def test_the_model_averages_the_seeded_picks_of_the_sandwich(demo):
    _, lg = demo
    shapes = default_shapes(lg)
    passes = {s: 0.01 * s.depth + 0.001 * s.embed_dim for s in shapes}
    model = StepModel(fixed=0.5, passes=passes, one_off=2.0)
    by_cost = sorted(shapes, key=lambda s: (vit_flops(s), s.label()))
    for every in (1, 3):
        cfg = ExpandingConfig(largest_every=every)
        want = [0.5 + sum(passes[s] for s in picks_at(i, by_cost, cfg)) for i in range(1, 7)]
        assert model.mean(cfg, range(1, 7)) == pytest.approx(sum(want) / 6)
    # the largest (d12 at full width) every step costs more than every 3rd
    assert model.mean(ExpandingConfig(largest_every=1)) > model.mean(ExpandingConfig(largest_every=3))


def test_a_probe_runs_no_shape_deeper_than_the_probe_depth_in_the_deepest_shapes_micro_batches(demo, monkeypatch):
    anc, lg = demo
    shapes = default_shapes(lg)
    seen: list = []
    real = expanding_loop.train_learngene

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append(out[1])
        return out

    monkeypatch.setattr(expanding_loop, "train_learngene", spy)
    cfg = ExpandingConfig(batch_size=8, memory_mb=1.0)  # a budget small enough that d12 is cut finer than d6
    model = step_estimate.probe_step(lg, anc, shapes, cfg, steps=2)
    deepest_run, shallowest_run = seen  # two runs: the budget cuts d12 finer than d1
    for report in seen:
        ran = {label for h in report["history"] for label in h["shape_seconds"]}
        assert max(int(label.split("-")[0][1:]) for label in ran) <= 6 and len(report["history"]) == 3
    ran = {label for h in deepest_run["history"] for label in h["shape_seconds"]}
    assert ran == {p.label() for p in probe_plan(shapes, 6)[0]}
    deepest = max(shapes, key=lambda s: (vit_flops(s), s.label()))
    tokens = (anc.arch.img_size // anc.arch.patch_size) ** 2 + 1
    per = activation_mb_per_image(12, tokens, deepest.embed_dim, deepest.mlp_hidden, deepest_run["precision"])
    want = len(spans(8, micro_batch_size(8, per, deepest_run["memory_mb"])))
    assert deepest_run["micro_batches"][dataclasses.replace(deepest, depth=6).label()] == want > 1
    assert max(shallowest_run["micro_batches"].values()) < want  # cut as the shallowest shapes are: coarser
    assert set(model.passes) == set(shapes) and model.fixed > 0 and model.one_off >= 0
    assert all(
        model.passes[s] <= model.passes[dataclasses.replace(s, depth=s.depth + 1)] for s in shapes if s.depth < 12
    )


def test_the_estimate_tracks_the_real_steps_of_the_sandwich(demo):
    """The probe's model against the real sandwich's steps, measured in one process on the demo (28 px): the same
    seeded steps, within a factor the timing noise of a shared 2-core machine leaves (0.94-0.96 measured quiet)."""
    anc, lg = demo
    shapes = default_shapes(lg)
    cfg = ExpandingConfig(batch_size=32)
    torch.manual_seed(0)
    model = step_estimate.probe_step(lg, anc, shapes, cfg, steps=3)
    images = torch.randn(32, anc.arch.in_chans, anc.arch.img_size, anc.arch.img_size)
    data = ImageTensors(images, torch.zeros(32, dtype=torch.int64), ["x"])
    _, report = expanding_loop.train_learngene(lg, anc, data, shapes, dataclasses.replace(cfg, steps=7), progress=False)
    real = sum(h["seconds"] for h in report["history"][1:])
    by_cost = sorted(shapes, key=lambda s: (vit_flops(s), s.label()))
    estimated = sum(model.step(i, by_cost, cfg) for i in range(1, 7))
    assert 0.6 < estimated / real < 1.6, (estimated, real)
    first, per = expanding_loop.measure_step_seconds(lg, anc, shapes, cfg, first=True, probe_depth=6)
    assert first >= per > 0
