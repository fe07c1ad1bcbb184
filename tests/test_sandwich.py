"""The expanding phase's sandwich: how often its largest shape is trained (``largest_every``; issue 32, item 3)."""

import dataclasses

import pytest

from factory import FactoryError
from factory.core.expanding_phase import ExpandingConfig, picks_at, recipe_fields
from factory.pipeline.config import BuildConfig, build_learngene_recipe, expanding_config
from factory.training import expanding_loop

from .helpers import cli_run, one_line_exit_2

BY_COST = [f"s{i}" for i in range(12)]  # picks_at only orders and draws: labels stand in for shapes


def test_largest_every_step_is_the_sandwich_rule_and_the_default_is_every_third():
    assert ExpandingConfig().largest_every == 3  # measured: the learngene's quality of 1 at 1.78x fewer FLOPs
    for step in range(20):
        picks = picks_at(step, BY_COST, ExpandingConfig(largest_every=1))
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

    assert recipe_fields(ExpandingConfig(largest_every=1)) != recipe_fields(ExpandingConfig())
    anc = load_ancestry("demo")
    # the shipped learngene is made with the default: the default build uses it, a build asking for 1 trains its own
    assert shipped_learngene(build_learngene_recipe(BuildConfig(), anc)) is not None
    assert shipped_learngene(build_learngene_recipe(BuildConfig(expand_largest_every=3), anc)) is not None
    assert shipped_learngene(build_learngene_recipe(BuildConfig(expand_largest_every=1), anc)) is None
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

    def fake_train(lg, anc, data, shapes, cfg, progress):
        seen["steps"] = cfg.steps
        seconds = [9.0] + [3.0 if s % max(cfg.largest_every, 1) == 0 else 1.0 for s in range(1, cfg.steps)]
        return lg, {"history": [{"seconds": s} for s in seconds]}

    monkeypatch.setattr(expanding_loop, "train_learngene", fake_train)
    arch = dataclasses.make_dataclass("A", [("img_size", int), ("in_chans", int)])(8, 3)
    lg = type("L", (), {"arch": arch})()
    per = expanding_loop.measure_step_seconds(lg, None, [], ExpandingConfig(batch_size=2, largest_every=3), steps=3)
    assert seen["steps"] == 4 and per == pytest.approx((1 + 1 + 3) / 3)
    every = ExpandingConfig(batch_size=2, largest_every=1)
    first, per = expanding_loop.measure_step_seconds(lg, None, [], every, steps=3, first=True)
    assert first == 9.0 and per == 3.0  # every step has the largest: 3 s each


def test_the_dry_run_says_it_timed_a_whole_cycle(tmp_path):
    res = cli_run(
        "build", "--profile", "demo/jetson_orin", "--expand-steps", "800", "--expand-largest-every", "3",
        "--init", "peg", "--dry-run", "--out", tmp_path / "out",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "the largest shape every 3 steps: a cycle's mean" in res.output
    assert "will be sampled and trained for 800 expanding-phase steps" in res.output
    assert not (tmp_path / "out").exists()  # a dry run writes nothing
