"""A budgeted fine-tune re-times itself once and trains the steps that fit its allotment
(factory.pipeline.pacing)."""

import dataclasses
import json
import math

import pytest
import torch

from factory import DescendantShape
from factory.core.timm_vit import build_vit
from factory.data import make_synthetic
from factory.errors import FactoryError, Interrupted
from factory.pipeline import pacing
from factory.pipeline.pacing import MAX_STRETCH, PACE_FILE, check_step, paced_steps, schedule, train_paced
from factory.pipeline.time_budget import BudgetPlan, Costs, fit_budget
from factory.training.loop import lr_at
from factory.training.train import TrainConfig

SHAPE = DescendantShape(1, 32, 2, 2.0, 16, 4, 4)


def _model():
    from factory.core.ancestry import DEMO_ARCH

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build_vit(DEMO_ARCH, SHAPE)


@pytest.fixture(scope="module")
def synthetic():
    return make_synthetic(img_size=16, num_classes=4, n_train=128, n_val=32)


class _Clock:
    """A clock that advances whenever it is read (a poll comes before every step, so each step takes a tick):
    ``slow`` seconds for the first ``slow_reads`` reads, then 1 s."""

    def __init__(self, slow: float = 1.0, slow_reads: int = 0) -> None:
        self.now, self.reads, self.slow, self.slow_reads = 0.0, 0, slow, slow_reads

    def perf_counter(self) -> float:
        self.reads += 1
        self.now += self.slow if self.reads <= self.slow_reads else 1.0
        return self.now


def _steps(work):
    return [json.loads(line)["step"] for line in (work / "metrics.jsonl").read_text().splitlines()]


def test_checks_come_at_fractions_of_the_steps_with_enough_steps_around_them():
    assert check_step(0, 1000) == 100 and check_step(1, 1000) == 400 and check_step(2, 1000) == 700
    assert check_step(3, 1000) is None
    assert check_step(0, 40) == 10 and check_step(1, 40, done=10) == 20 and check_step(2, 40, done=20) == 30
    assert check_step(1, 1000, done=395) == 405  # resumed near a check: the pace needs steps first
    assert check_step(0, 19) is None and check_step(2, 40, done=25) is None  # too few steps after it


@pytest.mark.parametrize(
    ("allotted", "spent", "pace", "expected"),
    [
        (100.0, 10.0, 1.0, 100),  # on plan: N
        (100.0, 10.0, 0.8, 122),  # 20% faster steps: 10 + floor(90 / 0.8)
        (100.0, 10.0, 1.25, 82),  # slower: 10 + floor(90 / 1.25)
        (100.0, 10.0, 0.1, 200),  # ten times faster: clipped at MAX_STRETCH * N
        (100.0, 10.0, 10.0, 50),  # ten times slower: clipped at N / MAX_STRETCH
        (100.0, 150.0, 1.0, 50),  # the check alone overran the allotment: still N / MAX_STRETCH
    ],
)
def test_paced_steps_fill_the_allotment_within_the_stretch(allotted, spent, pace, expected):
    assert paced_steps(100, allotted, 10, spent, pace) == expected
    assert 100 / MAX_STRETCH <= expected <= 100 * MAX_STRETCH


def test_paced_steps_never_go_back_before_the_check():
    assert paced_steps(30, 1.0, 20, 50.0, 5.0) == 20  # N / 2 = 15 < k = 20 steps already done


def test_the_learning_rate_stays_continuous_across_the_checks():
    recipe = TrainConfig(steps=100, warmup_steps=5, lr=1e-3, min_lr=1e-5)
    checks = [{"step": 3, "steps": 120}, {"step": 12, "steps": 150}, {"step": 60, "steps": 110}]
    segs = [schedule(recipe, checks[:i]) for i in range(4)]
    assert segs[1].warmup_steps == 5 and segs[1].lr == recipe.lr  # a check in the warm-up changes the count only
    bounds = [0, 3, 12, 60, 110]
    rates = [lr_at(s, segs[i]) for i in range(4) for s in range(bounds[i], bounds[i + 1])]
    assert len(rates) == 110 and segs[-1].steps == 110
    jumps = [abs(b - a) for a, b in zip(rates, rates[1:], strict=False)]
    assert max(jumps[6:]) <= recipe.lr * math.pi / 2 / (60 - 12) * 1.01  # no step past the warm-up jumps
    assert all(recipe.min_lr <= r <= recipe.lr for r in rates) and lr_at(110, segs[-1]) == pytest.approx(1e-5)
    for i, k in ((2, 12), (3, 60)):  # at a check the new schedule starts from the rate the old one had there
        assert lr_at(k, segs[i]) == pytest.approx(lr_at(k, segs[i - 1]))


def test_a_plan_splits_the_fine_tuning_time_evenly_between_its_shapes():
    plan = BudgetPlan(600.0, 400, None, {"finetune": 300.0}, 50.0, step_s={"a": 0.25, "b": 0.5})
    # N = 400 steps of each shape priced 400 * (0.25 + 0.5) = 300 s: 150 s each, the fast shape twice the steps
    assert plan.finetune_s("a") == pytest.approx(150.0) and plan.finetune_s("b") == pytest.approx(150.0)
    assert plan.steps_for("a") == 600 and plan.steps_for("b") == 300
    assert plan.time_share("a") == pytest.approx(1.5) and plan.time_share("b") == pytest.approx(0.75)
    assert plan.finetune_s("c") is None and plan.steps_for("c") == 400  # not measured: N, not paced
    assert plan.time_share("c") == 1.0
    assert plan.to_dict()["step_s"] == {"a": 0.25, "b": 0.5} and plan.to_dict()["split"] == "time"
    # --budget-split steps: N steps each, the slow shape twice the time
    steps = dataclasses.replace(plan, split="steps")
    assert (steps.finetune_s("a"), steps.finetune_s("b")) == (pytest.approx(100.0), pytest.approx(200.0))
    assert steps.steps_for("a") == steps.steps_for("b") == 400 and steps.time_share("b") == 1.0


def test_a_plan_recorded_before_the_split_reads_back_as_equal_steps(tmp_path):
    from factory.pipeline.budget_costs import _from_dict

    plan = BudgetPlan(600.0, 400, None, {"finetune": 300.0}, 50.0, step_s={"a": 0.25, "b": 0.5})
    assert _from_dict(plan.to_dict()) == plan
    old = {k: v for k, v in plan.to_dict().items() if k != "split"}  # what a build before it recorded
    assert _from_dict(old).split == "steps" and _from_dict(old).steps_for("a") == 400
    assert _from_dict({**plan.to_dict(), "split": "even"}) is None  # malformed: the build plans anew
    with pytest.raises(FactoryError, match="budget split 'even' must be one of time, steps"):
        fit_budget(600, Costs({}, lambda n: {"finetune": 0.75 * n}, step_s={"a": 0.25, "b": 0.5}), split="even")


@pytest.mark.parametrize(("step_s", "expected"), [(0.5, 25), (1.0, 50), (1.3, 65), (3.0, 100)])
def test_a_paced_fine_tune_trains_the_steps_that_fit_its_time(synthetic, tmp_path, monkeypatch, step_s, expected):
    """Every step takes 1 s (the fake clock); 50 steps planned at ``step_s`` seconds each."""
    monkeypatch.setattr(pacing, "time", _Clock())
    recipe = TrainConfig(steps=50, batch_size=8, lr=1e-3, warmup_steps=2)
    lines: list[str] = []
    work = tmp_path / "work"
    result, ran, record = train_paced(
        _model(),
        synthetic.train,
        recipe,
        allotted_s=50 * step_s,
        work=work,
        resume=False,
        log=lines.append,
        progress=False,
    )
    assert ran.steps == record["steps"] == result.steps == expected  # clipped to [25, 100]
    first = record["checks"][0]
    assert record["planned_steps"] == 50 and first["step"] == 10 and first["pace_s"] == pytest.approx(1.0)
    assert first["elapsed_s"] == pytest.approx(10.0) and first["steps"] == expected
    assert _steps(work) == list(range(1, expected + 1))  # every step once, the checks' pauses included
    assert json.loads((work / PACE_FILE).read_text())["checks"] == record["checks"]
    assert any("paced to its" in line and f"{expected} steps (planned 50)" in line for line in lines), lines


def test_a_fine_tune_that_speeds_up_is_re_timed_on_its_latest_steps(synthetic, tmp_path, monkeypatch):
    """The first 10 steps take 2 s, the rest 1 s; 100 steps allotted 100 s."""
    monkeypatch.setattr(pacing, "time", _Clock(slow=2.0, slow_reads=11))
    recipe = TrainConfig(steps=100, batch_size=8, lr=1e-3, warmup_steps=2)
    _, ran, record = train_paced(
        _model(), synthetic.train, recipe, allotted_s=100, work=tmp_path / "w", resume=False, log=print, progress=False
    )
    # check 1 at 10 (20 s, 2 s a step): 10 + 80 / 2 = 50; check 2 at 20 (30 s, 1 s a step): 20 + 70 = 90;
    # check 3 at ceil(0.7 * 90) = 63 (73 s): 63 + 27 = 90 -- the allotment filled exactly
    got = [(c["step"], c["elapsed_s"], c["pace_s"], c["steps"]) for c in record["checks"]]
    assert got == [(10, 20.0, 2.0, 50), (20, 30.0, 1.0, 90), (63, 73.0, 1.0, 90)]
    assert ran.steps == 90 and _steps(tmp_path / "w") == list(range(1, 91))


def test_a_resumed_paced_fine_tune_goes_on_with_its_record(synthetic, tmp_path, monkeypatch):
    monkeypatch.setattr(pacing, "time", _Clock())
    recipe = TrainConfig(steps=40, batch_size=8, lr=1e-3, warmup_steps=2, ckpt_every=5)
    work = tmp_path / "work"
    stops = iter([False] * 20 + [True])  # Ctrl-C between the first check (10) and the second (24 of the paced 60)

    with pytest.raises(Interrupted):
        train_paced(
            _model(),
            synthetic.train,
            recipe,
            allotted_s=60,
            work=work,
            resume=False,
            log=print,
            should_stop=lambda: next(stops, True),
            progress=False,
        )
    assert [c["steps"] for c in json.loads((work / PACE_FILE).read_text())["checks"]] == [60]
    # resumed (the checkpoint at 19) with another allotment: the record's is kept
    _, ran, record = train_paced(
        _model(), synthetic.train, recipe, allotted_s=5, work=work, resume=True, log=print, progress=False
    )
    assert record["allotted_s"] == 60 and ran.steps == record["steps"] == 60
    assert [c["step"] for c in record["checks"]] == [10, 29, 42]  # 19 + 10 steps to time; then 0.7 * 60
    assert sorted(set(_steps(work))) == list(range(1, 61))


def test_a_fresh_start_ignores_a_stale_pace_record(synthetic, tmp_path, monkeypatch):
    monkeypatch.setattr(pacing, "time", _Clock())
    work = tmp_path / "work"
    work.mkdir()
    (work / PACE_FILE).write_text(json.dumps({"planned_steps": 30, "allotted_s": 7, "checks": [], "steps": 7}))
    recipe = TrainConfig(steps=30, batch_size=8, lr=1e-3, warmup_steps=2)
    _, ran, record = train_paced(
        _model(), synthetic.train, recipe, allotted_s=30, work=work, resume=False, log=print, progress=False
    )
    assert ran.steps == record["steps"] == 30 and record["allotted_s"] == 30


def test_a_short_fine_tune_is_not_paced(synthetic, tmp_path):
    recipe = TrainConfig(steps=19, batch_size=8, lr=1e-3, warmup_steps=2)
    result, ran, record = train_paced(
        _model(), synthetic.train, recipe, allotted_s=1e-3, work=tmp_path / "w", resume=False, log=print, progress=False
    )
    assert record is None and ran == recipe and result.steps == 19
    assert not (tmp_path / "w" / PACE_FILE).exists()
