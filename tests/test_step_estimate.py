"""The expanding-phase step estimated from shallow probe passes (factory.training.step_estimate)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from factory import load_ancestry, sample_learngene
from factory.core.expanding_phase import ExpandingConfig, default_shapes, picks_at
from factory.core.shapes import vit_flops
from factory.data import ImageTensors
from factory.training import expanding_loop, step_estimate, update_timing
from factory.training.micro_batch import activation_mb_per_image, micro_batch_size, spans
from factory.training.step_estimate import StepModel, block_type, pass_seconds, probe_plan


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
    # the probe only where the real step holds too much: the demo's largest shape is small
    assert not step_estimate.extrapolates(shapes) and step_estimate.extrapolates(shapes, 6, above_params=0)
    assert not step_estimate.extrapolates(shallow, 6, above_params=0)
    assert not step_estimate.extrapolates(shapes, None, above_params=0)
    assert not step_estimate.extrapolates(shapes, 24, above_params=0)


def test_a_deit_small_sandwich_is_probed_and_a_deit_tiny_one_measured_whole():
    from factory.core.expanding_phase import sandwich_grid
    from factory.core.shapes import ArchConfig

    def grid(width: int, heads: int):
        arch = ArchConfig(width, 12, heads, 4 * width, img_size=224, patch_size=16, num_classes=1000)
        return sandwich_grid(arch, heads)

    assert not step_estimate.extrapolates(grid(192, 3))  # d24-w192: 10.7M parameters
    assert step_estimate.extrapolates(grid(384, 6))  # d24-w384: 42.5M


def test_a_probe_pass_trims_the_heap_where_the_deep_pass_it_stands_for_would(demo):
    """The heap goes back after a long pass (TRIM_AFTER_S); a shallow probe counts as the deep shape it is sized
    as, so a 224-px probe trims as the real d24 pass does and a 28-px one (tens of milliseconds) trims nothing."""
    from factory.training.loop import TRIM_AFTER_S

    _, lg = demo
    probes, sized_as = probe_plan(default_shapes(lg), 6)  # the demo's: each stands for a d12 shape
    d1, d6 = (next(p for p in probes if p.depth == d) for d in (1, 6))
    long, short = TRIM_AFTER_S, 0.99 * TRIM_AFTER_S
    assert expanding_loop.is_long_pass(long, d6) and not expanding_loop.is_long_pass(short, d6)  # no map: as timed
    assert expanding_loop.is_long_pass(long / 12, d1, sized_as)  # d1 stands for d12: 12x its pass
    assert not expanding_loop.is_long_pass(short / 12, d1, sized_as)
    assert expanding_loop.is_long_pass(long / 2, d6, sized_as) and not expanding_loop.is_long_pass(
        short / 2, d6, sized_as
    )
    assert not expanding_loop.is_long_pass(0.03, d1, sized_as)  # a 28-px probe pass: 0.36 s for the d12 it stands for


def test_a_pass_is_affine_in_depth_per_block_type(demo):
    _, lg = demo
    shapes = default_shapes(lg)
    probes, _ = probe_plan(shapes, 6)
    timed = {p: (1.0 if p.depth == 1 else 3.5) * p.embed_dim / 96 for p in probes}
    for s in shapes:  # slope (3.5 - 1) / 5 = 0.5 a block at width 96, scaled by width
        assert pass_seconds(s, timed, 6) == pytest.approx((1.0 + 0.5 * (s.depth - 1)) * s.embed_dim / 96)
    flat = {
        p: (2.0 if p.depth == 1 else 1.0) for p in probes
    }  # noise making the deeper probe faster: no negative slope
    assert pass_seconds(shapes[-1], flat, 6) == 2.0


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
    (report,) = seen
    ran = {label for h in report["history"] for label in h["shape_seconds"]}
    assert ran == {p.label() for p in probe_plan(shapes, 6)[0]} and len(report["history"]) == 3
    assert max(int(label.split("-")[0][1:]) for label in ran) == 6
    deepest = max(shapes, key=lambda s: (vit_flops(s), s.label()))
    tokens = (anc.arch.img_size // anc.arch.patch_size) ** 2 + 1
    per = activation_mb_per_image(12, tokens, deepest.embed_dim, deepest.mlp_hidden, report["precision"])
    want = len(spans(8, micro_batch_size(8, per, report["memory_mb"])))
    assert report["micro_batches"][dataclasses.replace(deepest, depth=6).label()] == want > 1
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
    first, per = step_estimate.estimate_step_seconds(lg, anc, shapes, cfg)
    assert first >= per > 0


def test_a_dry_run_probes_a_sandwich_above_the_threshold_at_the_builds_own_budget(tmp_path, monkeypatch):
    """With the threshold at 0 the demo's sandwich is probed: at the build's activation budget (the probe is
    shallow), and the dry run says how; a real step is never measured."""
    from factory.device.profile import load_profile
    from factory.pipeline.build import BuildConfig, build

    from .helpers import transfer_check_passes
    from .test_build import _profile

    seen: dict[str, list] = {"probe": [], "steps run": []}
    real_probe, real_train = step_estimate.probe_step, expanding_loop.train_learngene

    def probe(lg, anc, shapes, cfg, **kwargs):
        seen["probe"].append(cfg.memory_mb)
        return real_probe(lg, anc, shapes, cfg, **kwargs)

    def train(*args, **kwargs):  # every expanding-phase step the dry run runs: the probe's own (picks given)
        seen["steps run"].append(kwargs.get("picks") is not None)
        return real_train(*args, **kwargs)

    monkeypatch.setattr(step_estimate, "PROBE_ABOVE_PARAMS", 0)
    monkeypatch.setattr(step_estimate, "probe_step", probe)
    monkeypatch.setattr(expanding_loop, "train_learngene", train)
    transfer_check_passes(monkeypatch)
    cfg = BuildConfig(
        data="synthetic", batch_size=16, expand_steps=12, expand_batch_size=8, expand_min_steps=5,
        train_memory_mb=1024, objective="capacity", device="cpu",
    )  # fmt: skip
    lines: list[str] = []
    build([load_profile(_profile(tmp_path, "dev", 0.2))], tmp_path / "out", cfg, dry_run=True, log=lines.append)
    assert seen["probe"] == [1024] and seen["steps run"] == [True], seen
    step_line = next(line for line in lines if "one expanding-phase step measured" in line)
    assert "depths over 6 extrapolated from passes at d1 and d6" in step_line and "upper bound" not in step_line
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def _deit_small_wide(depth: int):
    from factory.core.shapes import DescendantShape

    return DescendantShape(depth, 352, 11, 3.5, img_size=224, patch_size=16, num_classes=5)


def test_a_large_deep_fine_tune_and_its_measure_round_are_timed_at_depths_one_and_six(monkeypatch):
    """The dry run's fine-tuning step and export round of a shape whose weights would set its peak: measured at
    depths 1 and 6 and taken affine in depth; a small shape measured whole."""
    import types

    from factory.core.shapes import DescendantShape
    from factory.pipeline import finetune_facts

    assert step_estimate.holds_too_much(_deit_small_wide(21))  # ~31M parameters
    assert not step_estimate.holds_too_much(_deit_small_wide(6))  # no deeper than the probe
    assert not step_estimate.holds_too_much(DescendantShape(24, 192, 3, 4.0, img_size=224, patch_size=16))  # 10.7M

    measured: list[int] = []

    def whole(ctx, shape, batch):
        measured.append(shape.depth)
        return 0.5 + 0.2 * shape.depth

    monkeypatch.setattr(finetune_facts, "_measure_whole", whole)
    assert finetune_facts._measure_steps(None, _deit_small_wide(21), 32) == pytest.approx(0.5 + 0.2 * 21)
    assert measured == [1, 6]
    small = DescendantShape(24, 192, 3, 4.0, img_size=224, patch_size=16)
    assert finetune_facts._measure_steps(None, small, 32) == pytest.approx(0.5 + 0.2 * 24) and measured[-1] == 24

    rounds: list[int] = []
    import factory.device.measure as measure

    monkeypatch.setattr(measure, "measure_onnxruntime_latency", lambda shape, batch, arch: rounds.append(shape.depth))
    ctx = types.SimpleNamespace(round_times={}, ancestry=types.SimpleNamespace(arch=None))
    assert finetune_facts.round_seconds(ctx, _deit_small_wide(21)) >= 0 and rounds == [1, 6]
    finetune_facts.round_seconds(ctx, _deit_small_wide(21))  # once per context
    assert rounds == [1, 6] and list(ctx.round_times) == [_deit_small_wide(21).label()]


def test_the_timing_probes_hold_no_optimizer_state_nor_a_second_learngene_and_leave_the_ancestry(demo, monkeypatch):
    """AdamW's two moment buffers are twice the trained tensors (91 MB for a DeiT-Small learngene at the dry run's
    peak): the probe and the whole-step measurement update with stateless SGD and add AdamW's extra seconds. The
    dry run's sampled learngene is dropped after its probe, so with ``own`` the probe trains it in place (no second
    copy); its stem tensors are the ancestry's own, so those are copied: the ancestry the build goes on with is
    intact."""
    anc, _ = demo
    made, extra = [], []
    real_optimizer, real_extra = update_timing.stateless_optimizer, update_timing.adamw_extra_seconds

    def optimizer(params, lr):
        made.append(real_optimizer(params, lr))
        return made[-1]

    def adamw_extra(numel, **kwargs):
        extra.append(numel)
        assert kwargs["device"] == "cpu"  # timed where the probe ran
        return real_extra(numel, **kwargs)

    for module in (step_estimate, expanding_loop):  # where the probe and the whole-step measurement look them up
        monkeypatch.setattr(module, "stateless_optimizer", optimizer)
        monkeypatch.setattr(module, "adamw_extra_seconds", adamw_extra)
    weights = anc.model.state_dict()
    before = {k: v.clone() for k, v in weights.items()}
    for run in (step_estimate.probe_step, expanding_loop.measure_step_seconds):
        lg = sample_learngene(anc, anc.arch.depth // 2, seed=1, rescale="std")
        assert any(t.data_ptr() in {w.data_ptr() for w in weights.values()} for t in lg.stem.values())
        genes = {k: v.clone() for k, v in lg.genes.items()}
        shapes = sorted(default_shapes(lg), key=vit_flops)[:3]  # the cheapest: what is held, not how long
        run(lg, anc, shapes, ExpandingConfig(batch_size=8), steps=2, own=True)
        assert any(not torch.equal(lg.genes[k], genes[k]) for k in genes)  # trained in place
        assert all(torch.equal(v, before[k]) for k, v in anc.model.state_dict().items())
    probes = [o for o in made if len(o.param_groups[0]["params"]) > 1]  # not adamw_extra's one-tensor timing
    assert len(probes) == 2 and all(isinstance(o, torch.optim.SGD) and not o.state for o in made)
    genes = sum(t.numel() for t in lg.genes.values())
    assert len(extra) == 2 and all(n > genes for n in extra)  # the genes, the stem and the depth maps


def test_adamws_extra_update_time_is_timed_on_a_chunk_and_scaled_to_the_parameters(monkeypatch):
    timed: list[int] = []

    def update_seconds(make, numel, repeats, device):
        timed.append(numel)
        return 0.125 if make is update_timing.stateless_optimizer else 0.5

    monkeypatch.setattr(update_timing, "_update_seconds", update_seconds)
    assert update_timing.adamw_extra_seconds(1000, chunk=100) == pytest.approx(3.75)  # (0.5 - 0.125) * 10
    assert update_timing.adamw_extra_seconds(50, chunk=100) == pytest.approx(0.375) and timed == [100, 100, 50, 50]
    monkeypatch.undo()
    assert update_timing.adamw_extra_seconds(1 << 22) > 0  # measured: AdamW does more per element than SGD
