"""The expanding phase's sandwich: how often its largest shape is trained (``largest_every``; issue 32, item 3)."""

import dataclasses

import pytest

from factory import FactoryError
from factory.core.expanding_phase import ExpandingConfig, picks_at, recipe_fields
from factory.pipeline.config import BuildConfig, build_learngene_recipe, expanding_config
from factory.training import expanding_loop

from .helpers import cli_run, one_line_exit_2

BY_COST = [f"s{i}" for i in range(12)]  # picks_at only orders and draws: labels stand in for shapes


def test_the_default_is_the_sandwich_rule_smallest_and_largest_every_step():
    # measured: every 3rd step is 1.78x fewer FLOPs a step but no better a learngene at equal phase time
    assert ExpandingConfig().largest_every == 1
    for step in range(20):
        picks = picks_at(step, BY_COST, ExpandingConfig())
        assert picks[:2] == ["s0", "s11"] and len(picks) == len(set(picks)) <= 3


def test_largest_every_k_keeps_the_largest_in_one_step_of_k_and_the_same_random_draws():
    import random

    every3 = ExpandingConfig(largest_every=3)
    for step in range(30):
        drawn = random.Random(every3.seed * 1_000_003 + step).choice(BY_COST)  # the documented seeded draw
        picks = picks_at(step, BY_COST, every3)
        assert picks[0] == "s0" and drawn in picks and len(picks) == len(set(picks))
        assert ("s11" in picks) == (step % 3 == 0 or drawn == "s11")
        assert drawn in picks_at(step, BY_COST, ExpandingConfig())  # the same draw as the default's


def test_largest_every_zero_trains_it_only_when_drawn():
    cfg = ExpandingConfig(largest_every=0, random_per_step=0)
    assert all(picks_at(s, BY_COST, cfg) == ["s0"] for s in range(10))
    two = ExpandingConfig(largest_every=0, random_per_step=2)
    counts = [len(picks_at(s, BY_COST, two)) for s in range(50)]
    assert max(counts) == 3 and sum("s11" in picks_at(s, BY_COST, two) for s in range(50)) < 25


def test_largest_every_is_part_of_the_recipe_and_the_shipped_learngene_has_the_default():
    from factory.core.ancestry import load_ancestry
    from factory.pipeline.stages import shipped_learngene

    assert recipe_fields(ExpandingConfig(largest_every=3)) != recipe_fields(ExpandingConfig())
    anc = load_ancestry("demo")
    # the shipped learngene is made with the default: the default build uses it, a build asking for 3 trains its own
    assert shipped_learngene(build_learngene_recipe(BuildConfig(), anc)) is not None
    assert shipped_learngene(build_learngene_recipe(BuildConfig(expand_largest_every=1), anc)) is not None
    assert shipped_learngene(build_learngene_recipe(BuildConfig(expand_largest_every=3), anc)) is None
    # a learngene logged before the field existed was trained with the largest shape every step
    from factory.core.expanding_phase import LATER_FIELDS

    assert LATER_FIELDS["largest_every"] == 1
    assert expanding_config(BuildConfig(expand_largest_every=3)).largest_every == 3
    assert expanding_config(BuildConfig()).largest_every == ExpandingConfig.largest_every


def test_bad_largest_every_is_refused():
    with pytest.raises(FactoryError, match="largest_every >= 0"):
        ExpandingConfig(largest_every=-1)
    with pytest.raises(FactoryError, match="expand largest every"):
        BuildConfig(expand_largest_every=-2)
    for args in (
        ["learngene", "train", "--learngene", "x", "--largest-every", "-1", "--out", "y"],
        ["build", "--profile", "demo/jetson_orin", "--expand-largest-every", "-1", "--dry-run"],
    ):
        one_line_exit_2(cli_run(*args), "largest-every")


def test_step_seconds_average_a_whole_cycle_when_the_largest_is_not_in_every_step(monkeypatch):
    """With the largest every 3rd step the per-step estimate is the mean of steps 1..3 (step 3 has it), not a
    median that would skip it; the default keeps the median."""
    seen = {}

    def fake_train(lg, anc, data, shapes, cfg, progress, **_):
        seen["steps"] = cfg.steps
        seconds = [9.0] + [3.0 if s % max(cfg.largest_every, 1) == 0 else 1.0 for s in range(1, cfg.steps)]
        return lg, {"history": [{"seconds": s} for s in seconds], "trainable_numel": 10, "device": "cpu"}

    monkeypatch.setattr(expanding_loop, "train_learngene", fake_train)
    monkeypatch.setattr(expanding_loop, "adamw_extra_seconds", lambda numel, device: 0.25)  # AdamW's, added back
    arch = dataclasses.make_dataclass("A", [("img_size", int), ("in_chans", int)])(8, 3)
    lg = type("L", (), {"arch": arch})()
    per = expanding_loop.measure_step_seconds(lg, None, [], ExpandingConfig(batch_size=2, largest_every=3), steps=3)
    assert seen["steps"] == 4 and per == pytest.approx((1 + 1 + 3) / 3 + 0.25)
    every = ExpandingConfig(batch_size=2, largest_every=1)
    first, per = expanding_loop.measure_step_seconds(lg, None, [], every, steps=3, first=True)
    assert first == 9.25 and per == 3.25  # every step has the largest: 3 s each


def test_the_dry_run_says_it_timed_a_whole_cycle(tmp_path):
    res = cli_run(
        "build", "--profile", "demo/jetson_orin", "--expand-steps", "800", "--expand-largest-every", "3",
        "--init", "peg", "--dry-run", "--out", tmp_path / "out",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "the largest shape every 3 steps: a cycle's mean, each step worth 0.56 of the full sandwich's" in res.output
    assert "will be sampled and trained for 800 expanding-phase steps" in res.output
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


def test_a_thinner_sandwich_counts_its_steps_in_steps_of_the_full_one():
    """``full_sandwich_share`` by its formula on the demo's grid; a given learngene of 1,500 steps with the largest
    every 3rd step counts ~843 (over the 750 bar), one of 750 counts ~421 (under it: measured 3.2 points below
    weight selection); the default recipe counts its own steps."""
    from factory.core.ancestry import load_ancestry
    from factory.core.expanding_phase import full_sandwich_share, full_sandwich_steps, sandwich_grid
    from factory.core.shapes import vit_flops
    from factory.core.transfer import expanding_steps
    from factory.pipeline.config import learngene_steps, learngene_trained, phase_share

    anc = load_ancestry("demo")
    grid, teacher = sandwich_grid(anc.arch, anc.arch.num_heads), anc.arch.shape()
    assert len(grid) == 36  # depths 1..12 x widths 96/144/192
    costs = sorted(map(vit_flops, grid))
    t, small, big, mean = vit_flops(teacher), costs[0], costs[-1], sum(costs) / len(costs)
    full = t + 3 * (small + big + mean)
    assert full_sandwich_share(grid, teacher, 3, 1) == pytest.approx((t + 3 * (small + big / 3 + mean)) / full)
    assert full_sandwich_share(grid, teacher, 0, 2) == pytest.approx((t + 3 * (small + 2 * mean)) / full)
    assert full_sandwich_share(grid, teacher, 1, 1) == pytest.approx(1.0)
    assert 0.5 < full_sandwich_share(grid, teacher, 3, 1) < 0.6  # the largest is about two thirds of a step
    assert full_sandwich_steps(1500, grid, teacher, 1, 1) == 1500

    def given(steps, every):
        config = {"steps": steps} | ({} if every is None else {"largest_every": every})
        meta = {"expanding_phase": {"config": config, "shapes": [s.label() for s in grid]}}
        return type("G", (), {"meta": meta, "arch": anc.arch})()

    assert expanding_steps(given(1500, None)) == expanding_steps(given(1500, 1)) == 1500  # old logs: every step
    assert 830 < expanding_steps(given(1500, 3)) < 860 and 410 < expanding_steps(given(750, 3)) < 430
    # the build's own phase: --expand-largest-every 3 with 1,000 steps is worth ~560, under the default bar of 750
    cfg = BuildConfig(expand_steps=1000, expand_largest_every=3)
    assert phase_share(BuildConfig(), anc) == 1.0 and learngene_steps(BuildConfig(expand_steps=1000), anc) == 1000
    assert 550 < learngene_steps(cfg, anc) < 570 and not learngene_trained(cfg, anc)
    assert learngene_trained(dataclasses.replace(cfg, expand_steps=1500), anc)


def test_a_budget_counts_the_phase_in_steps_of_the_full_sandwich():
    from factory.pipeline.time_budget import Costs, fit_budget

    costs = Costs(
        fixed={"search": 10.0},
        per_steps=lambda n: {"finetune": 0.01 * n},
        expand_first_s=1.0,
        expand_step_s=0.1,
        expanding_planned=True,
    )
    full = fit_budget(1000.0, costs, max_expand_steps=1000, min_expand_steps=750)
    thin = fit_budget(1000.0, costs, max_expand_steps=1000, min_expand_steps=750, step_share=0.56)
    assert full.expand_steps == 1000 and thin.expand_steps == 0  # the same 1,000 steps are worth 560: under 750
    assert "buys 1000 steps (worth 560 of the full sandwich), fewer than the 750 that pay" in thin.expand_why


def test_a_build_does_not_run_a_thin_phase_worth_fewer_steps_than_pay(tmp_path):
    """``--init auto`` with 1,000 steps of every 3rd: worth ~560 of the full sandwich, under --expand-min-steps 750
    (the full sandwich's 750 steps measured +3.3 points over weight selection, every 3rd's 750 -3.2)."""
    res = cli_run(
        "build", "--profile", "demo/jetson_orin", "--expand-steps", "1000", "--expand-largest-every", "3",
        "--dry-run", "--out", tmp_path / "out",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "--expand-steps 1000 (worth 562 of the full sandwich) is below --expand-min-steps 750" in res.output
    assert "--expand-min-steps 562 counts it as trained" in res.output  # the bar in the same unit as the phase
    assert not (tmp_path / "out").exists()
