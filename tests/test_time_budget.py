"""A wall-clock budget (--time-budget): parsing it, the planner's arithmetic, and a budgeted build."""

from __future__ import annotations

import dataclasses
import json
import random
import re

import pytest

from factory.core.shapes import DescendantShape
from factory.device.profile import load_profile
from factory.errors import FactoryError
from factory.pipeline.build import BuildConfig, build
from factory.pipeline.pacing import check_step
from factory.pipeline.time_budget import (
    HEAD_START_PHASE_STEPS,
    MIN_FINETUNE_STEPS,
    Costs,
    expanding_seconds,
    fit_budget,
    format_duration,
    head_start,
    parse_duration,
)

from .helpers import cli_run, leftovers, one_line_exit_2, transfer_check_passes
from .test_build import _profile


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("90", 90),
        ("90s", 90),
        ("45m", 2700),
        ("1.5h", 5400),
        (" 2M ", 120),
        (".5m", 30),
        (7, 7),
        ("1h30m", 5400),
        ("1h 05m", 3900),
        ("12m 30s", 750),
        ("10min", 600),
        ("2 hours", 7200),
    ],
)
def test_durations_parse_with_their_unit(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text",
    ["0", "0s", "-5m", "abc", "5d", "", "nan", "inf", "1e3", "5 m s", "30m 1h", "1h1h", "1h30", "1h -5m", "0h 0m"],
)
def test_a_wrong_duration_is_one_line_naming_what_is_accepted(text):
    with pytest.raises(FactoryError, match=r"90s, 45m, 1.5h") as err:
        parse_duration(text)
    assert "\n" not in str(err.value) and err.value.param == "time_budget_s"


def test_durations_are_written_as_a_budget_is():
    assert [format_duration(s) for s in (0.2, 59.1, 61, 3600, 5430)] == ["1s", "1m 00s", "1m 01s", "1h 00m", "1h 31m"]


@pytest.mark.parametrize("seconds", [0.2, 59.1, 61, 750, 3600, 5430, 86399.5])
def test_a_written_duration_is_given_back_as_a_budget(seconds):
    """The least budget an error names ("give at least 12m 30s") is accepted as written, never less."""
    assert seconds <= parse_duration(format_duration(seconds)) < seconds + 60


def _costs(fixed=10.0, step=0.5, first=0.0, each=0.0, expanding=False):
    return Costs({"export": fixed}, lambda n: {"finetune": step * n}, first, each, expanding)


def test_the_fine_tune_gets_what_the_fixed_work_leaves():
    plan = fit_budget(60, _costs())
    assert plan.finetune_steps == 100 and plan.expand_steps is None  # 10 + 0.5 * 100 = 60
    assert plan.planned_s == {"export": 10.0, "finetune": 50.0} and plan.minimum_s == 10 + 0.5 * MIN_FINETUNE_STEPS


def test_a_budget_below_the_least_work_names_the_least():
    with pytest.raises(FactoryError, match=r"below the least .* 15s .* give at least 15s") as err:
        fit_budget(14, _costs())
    assert err.value.param == "time_budget_s"
    # what the build spent before planning counts in the user's terms: the budget as given, the least with it
    with pytest.raises(FactoryError, match=r"time budget 1s is below the least .* 22s \(7s of start-up") as err:
        fit_budget(-6, _costs(), spent_s=7)
    assert "give at least 22s" in str(err.value)
    for given, text in ((0.5, "0.5s"), (14.0, "14s"), (90.0, "1m 30s")):  # as given: not rounded up by the float error
        spent = 6.1234567
        with pytest.raises(FactoryError, match=f"time budget {text} is below"):
            fit_budget(given - spent, _costs(fixed=100.0), spent_s=spent)


def test_a_phase_to_train_gets_its_share_of_the_spare_time():
    costs = _costs(first=2.0, each=1.0, expanding=True)
    plan = fit_budget(60, costs, expand_share=0.5)
    # spare above the least (15 s): 45 s, half of it 22.5 s -> the first step (2 s) and 20 more (1 s each)
    assert plan.expand_steps == 21 and expanding_seconds(costs, 21) == 22
    assert plan.finetune_steps == 56  # (60 - 10 - 22) / 0.5
    assert fit_budget(60, costs, max_expand_steps=5).expand_steps == 5  # --expand-steps caps it
    assert fit_budget(60, costs, expand_share=0).expand_steps == 0  # no share: the learngene stays as sampled
    assert fit_budget(16, costs).expand_steps == 0  # the spare half-second cannot pay the first step


def test_plans_never_exceed_their_budget_and_leave_no_whole_step_unspent():
    rng = random.Random(0)
    for _ in range(200):
        step, fixed = rng.uniform(0.01, 5), rng.uniform(0, 100)
        growing = rng.uniform(0, 3)  # the work that grows with N besides the steps (probes, the init probe)
        costs = Costs(
            {"fixed": fixed},
            lambda n, s=step, g=growing: {"finetune": s * n, "probes": g * (n // 7)},
            rng.uniform(0, 20),
            rng.uniform(0.1, 3),
            rng.random() < 0.5,
        )
        budget = fixed + costs.steps_s(MIN_FINETUNE_STEPS) + rng.uniform(0, 2000)
        plan = fit_budget(budget, costs, expand_share=rng.uniform(0, 0.9))
        spent = fixed + expanding_seconds(costs, plan.expand_steps or 0) + costs.steps_s(plan.finetune_steps)
        assert spent <= budget + 1e-9 and abs(plan.total_s - spent) < 1e-6
        assert spent + costs.steps_s(plan.finetune_steps + 1) - costs.steps_s(plan.finetune_steps) > budget - 1e-9


@pytest.mark.parametrize("value", ["abc", "0", "-5m", "5d"])
def test_the_cli_refuses_a_wrong_budget_in_one_line(tmp_path, value):
    res = cli_run("build", "--profile", _profile(tmp_path, "dev"), "--out", tmp_path / "out", "--time-budget", value)
    one_line_exit_2(res, "--time-budget")
    assert "90s, 45m, 1.5h" in res.output and not (tmp_path / "out").exists()


def test_a_budget_below_the_least_work_is_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "out"
    res = cli_run(
        "build", "--profile", _profile(tmp_path, "dev"), "--out", out, "--data", "synthetic", "--time-budget", "1s"
    )
    one_line_exit_2(res, "give at least")
    assert "--time-budget" in res.output and "time budget 1s is below" in res.output  # the budget the user gave
    assert not (out / "manifest.json").exists() and not leftovers(out)
    assert not [p for p in out.rglob("*") if p.is_file() and p.suffix != ".lock"], list(out.rglob("*"))


def test_a_budgeted_build_fits_and_records_planned_against_measured(tmp_path):
    prof = load_profile(_profile(tmp_path, "dev", 0.2))
    base = BuildConfig(data="synthetic", batch_size=16, init="peg", objective="capacity")
    dry = build([prof], tmp_path / "dry", base.__class__(**{**base.__dict__, "time_budget_s": 1000}), dry_run=True)
    least = dry["time_budget"]["plans"]["first"]["minimum_s"]
    # the least work and some fine-tuning on top: 8 s of spare went to fixed stages that ran slower than the dry run
    # measured them on a loaded 2-core runner (CI: the second plan left exactly the minimum 10 steps)
    budget = least + 30
    cfg = BuildConfig(**{**base.__dict__, "time_budget_s": budget})
    lines: list[str] = []
    out = tmp_path / "out"
    try:
        manifest = build([prof], out, cfg, log=lines.append)
    except FactoryError as exc:  # a shared runner slower now than during the dry run: the build names its least
        found = re.search(r"give at least (\d+)s", str(exc))
        assert found is not None, str(exc)
        budget = int(found.group(1)) + 30
        cfg = BuildConfig(**{**base.__dict__, "time_budget_s": budget})
        lines.clear()
        manifest = build([prof], out, cfg, log=lines.append)
    record, dev = manifest["time_budget"], manifest["devices"][0]
    assert dev["status"] == "ok" and record["budget_s"] == budget
    second = record["plans"]["second"]
    assert second["finetune_steps"] > MIN_FINETUNE_STEPS
    # the plan is what ran: its N, or where N is long enough to re-time, the steps that fit N's allotted seconds
    ran, label = dev["finetune"], DescendantShape.from_dict(dev["shape"]).label()
    assert second["step_s"][label] > 0
    if check_step(0, second["finetune_steps"]) is None:
        assert ran["steps"] == second["finetune_steps"] and "pace" not in ran
    else:
        pace = ran["pace"]
        assert pace["planned_steps"] == second["finetune_steps"] and ran["steps"] == pace["steps"]
        # one shape: its equal share of the time is the whole fine-tuning time, N of its steps
        assert pace["allotted_s"] == pytest.approx(second["finetune_steps"] * second["step_s"][label], rel=1e-3)
        assert pace["checks"] and all(c["pace_s"] > 0 for c in pace["checks"])
        card = (out / dev["model_card"]).read_text()
        assert f"{ran['steps']} (paced to the" in card, card[:400]
    assert set(record["measured_s"]["stages"]) == {"finetune", "measure", "export"}
    assert set(second["planned_s"]) >= {"finetune", "measure", "export"}
    # how close the build comes to its budget is timing, measured by bench/time_budget.py on a quiet machine (a
    # shared 2-core runner's steps vary 3x within a minute); here: the record adds up
    assert abs(record["ratio"] - record["seconds"] / budget) <= 1e-3 and record["seconds"] > 0
    assert abs(second["planned_total_s"] - sum(second["planned_s"].values())) < 0.5
    assert any(line.startswith("time budget: first plan") for line in lines)
    # a rerun of the killed build keeps the recorded plan (its cached stages stay valid)
    (out / "manifest.json").unlink()
    lines.clear()
    again = build([prof], out, cfg, log=lines.append)
    assert again["devices"][0]["finetune"]["cache_key"] == dev["finetune"]["cache_key"]
    assert any("as this build recorded it" in line for line in lines), lines


@pytest.mark.parametrize("least, expected", [(5, 12), (750, 0)])
def test_a_phase_that_must_run_is_planned_within_its_cap_where_it_pays(tmp_path, monkeypatch, least, expected):
    transfer_check_passes(monkeypatch)
    cfg = BuildConfig(
        data="synthetic",
        batch_size=16,
        expand_steps=12,
        expand_batch_size=8,
        expand_min_steps=least,
        expand_head_start=100_000,  # 12 tiny steps repay their time (the head start's own test is the planner's)
        objective="capacity",
        time_budget_s=600,
    )
    lines: list[str] = []
    plan = build([load_profile(_profile(tmp_path, "dev", 0.2))], tmp_path / "out", cfg, dry_run=True, log=lines.append)
    first = plan["time_budget"]["plans"]["first"]
    # 10 minutes hold far more than 12 tiny steps: the cap holds -- unless 12 steps are too few to pay
    assert first["expand_steps"] == expected and first["finetune_steps"] > 100
    assert first["planned_s"]["learngene"] > 0  # sampling it, at least
    assert any("no expanding phase: its share buys" in line for line in lines) is (not expected)
    assert any("the expanding phase pays: " in line and "repaid by" in line for line in lines) is bool(expected)
    # one measurement of the expanding step serves the plan and the dry run's estimate: the same figures
    assert sum("one expanding-phase step measured" in line for line in lines) == 1, lines
    stage = {row["stage"]: row for row in plan["stages"]}["learngene"]
    if expected:
        assert abs(stage["estimate_s"] - first["planned_s"]["learngene"]) <= 0.1 + 1e-9, (stage, first)
    assert json.dumps(plan)  # the dry run's --json


def test_a_phase_the_budget_drops_is_planned_again_with_the_probes_an_untrained_learngene_needs(tmp_path, monkeypatch):
    # the objective follows the learngene: trained -> capacity, untrained -> the accuracy probes. A budget whose
    # share buys too few expanding-phase steps leaves it untrained, so the plan must count the probes it brings
    transfer_check_passes(monkeypatch)
    # a cap at or above the bar (a cap below it leaves the learngene untrained from the first plan on), and a bar
    # the budget's share cannot buy (~2,000 steps of ~0.15 s here; at 7 ms a step it still would not)
    cfg = BuildConfig(
        data="synthetic",
        batch_size=16,
        expand_steps=50_000,
        expand_batch_size=8,
        expand_min_steps=40_000,
        time_budget_s=600,
    )
    lines: list[str] = []
    plan = build([load_profile(_profile(tmp_path, "dev", 0.2))], tmp_path / "out", cfg, dry_run=True, log=lines.append)
    first = plan["time_budget"]["plans"]["first"]
    assert first["expand_steps"] == 0 and first["planned_s"]["probes"] > 0  # planned again, with the probes
    assert "fewer than the 40000 that pay" in first["expand_why"]  # ... and the plan still says why it has no phase
    assert first["planned_total_s"] <= 600
    assert any(line.startswith("objective: accuracy") and "planned again" in line for line in lines), lines
    assert any("successive halving" in line and "at equal time" in line for line in lines), lines  # budget: equal time


def test_a_phase_too_short_to_pay_is_not_run():
    costs = _costs(first=2.0, each=1.0, expanding=True)
    assert fit_budget(60, costs, min_expand_steps=30).expand_steps == 0  # 21 steps would fit: fewer than pay
    assert fit_budget(60, costs, min_expand_steps=30).finetune_steps == 100  # ... so the fine-tune gets it all
    assert fit_budget(60, costs, min_expand_steps=21).expand_steps == 21


def test_the_head_start_ramps_from_the_bar_to_the_measured_recipe():
    assert head_start(750, head_start_steps=300, min_steps=750) == 0  # at the bar: no better than weight selection
    assert head_start(1125, head_start_steps=300, min_steps=750) == 150  # halfway to the recipe's 1,500 steps
    assert head_start(HEAD_START_PHASE_STEPS, head_start_steps=300, min_steps=750) == 300
    assert head_start(10_000, head_start_steps=300, min_steps=750) == 300  # no credit beyond what was measured
    assert head_start(5, head_start_steps=300, min_steps=0) == pytest.approx(1.0)


def test_a_phase_runs_at_a_budget_only_where_its_head_start_repays_its_time():
    """The phase's seconds are fine-tuning steps every shape loses (dN); it runs only where H(E) >= dN. One shape
    at 0.5 s a step, phase steps at 0.1 s: 1,500 steps cost 150 s = 300 fine-tuning steps."""
    costs = _costs(step=0.5, first=0.1, each=0.1, expanding=True)
    budget = 10 + 0.5 * MIN_FINETUNE_STEPS + 2 * 150 + 1  # the share (half the spare) buys all 1,500 steps
    paid = fit_budget(budget, costs, min_expand_steps=750, head_start_steps=300)
    assert paid.expand_steps == 1500 and "repaid by the ~300 steps" in paid.expand_why  # H = 300 >= dN = 300
    dropped = fit_budget(budget, costs, min_expand_steps=750, head_start_steps=299)
    assert dropped.expand_steps == 0 and dropped.finetune_steps == paid.finetune_steps + 300  # all to the fine-tune
    assert "cost every shape 300 fine-tuning steps" in dropped.expand_why and "~299 steps" in dropped.expand_why
    assert dropped.to_dict()["expand_why"] == dropped.expand_why  # recorded with the plan
    # a fleet of four such shapes: the same phase costs each of them a quarter of the steps, so it pays
    fleet = Costs({"export": 10.0}, lambda n: {"finetune": 4 * 0.5 * n}, 0.1, 0.1, True)
    budget = 10 + 2 * MIN_FINETUNE_STEPS + 2 * 150 + 1
    assert fit_budget(budget, fleet, min_expand_steps=750, head_start_steps=100).expand_steps == 1500
    # --init peg passes no head start: the phase gets its share whatever it costs
    assert fit_budget(budget, costs, head_start_steps=None).expand_steps > 0


def test_a_replanned_first_plan_is_the_one_a_resumed_build_finds(tmp_path, monkeypatch):
    import types

    import factory.pipeline.budget_costs as budget_costs

    def costs(ctx, devices, profiles, *, objective, expanding, probed):
        probes = {"probes": 0.25} if objective == "accuracy" else {}
        return Costs(
            {"export": 10.0},
            lambda n: {"finetune": 0.5 * n, **{k: v * n for k, v in probes.items()}},
            2.0,
            1.0,
            expanding,
        )

    monkeypatch.setattr(budget_costs, "build_costs", costs)
    cfg = BuildConfig(data="synthetic", time_budget_s=100, expand_steps=50, expand_min_steps=750)
    ctx = types.SimpleNamespace(cfg=cfg, out=tmp_path, log=lambda line: None, step_times={}, ancestry=None)

    def plan(objective, expanding, replan=False, elapsed=0.0):
        return budget_costs.plan_time(
            ctx,
            [],
            [],
            key="k",
            elapsed_s=elapsed,
            objective=objective,
            expanding=expanding,
            probed=False,
            replan=replan,
        )

    first = plan("capacity", True)  # 41 steps would fit the phase's share: fewer than the 750 that pay
    assert first.expand_steps == 0 and first.finetune_steps in (179, 180)  # (100 - 10) / 0.5
    again = plan("accuracy", False, replan=True)  # the untrained learngene is probed: 0.75 s a step
    assert again.expand_steps == 0 and again.finetune_steps in (119, 120) and again.planned_s["probes"] > 0
    for replan in (False, True):  # a resumed build, later and on a slower machine, finds the replanned one
        found = plan("capacity", True, replan=replan, elapsed=60.0)
        assert (found.expand_steps, found.finetune_steps) == (0, again.finetune_steps)


def test_a_measured_step_leaves_out_every_new_loaders_first_step(tmp_path, monkeypatch):
    """``step_seconds`` times real steps in two runs (a few, then enough for MEASURED_SECONDS); each run starts a
    new loader (a streamed folder's worker processes), so the first step of each is left out -- counted, it made
    a d12 step on an ImageFolder 1.27x its sustained pace, 1.11x without (d3: 1.06x, 1.00x)."""
    import types

    import factory.core.baselines as baselines
    import factory.training.train as training
    from factory.core.shapes import DescendantShape
    from factory.pipeline.context import BuildContext
    from factory.pipeline.finetune_facts import MEASURED_STEPS, _measure_steps

    calls: list[int] = []

    def fake_train(model, data, cfg, progress=False, carry=None):
        calls.append(cfg.steps)
        done = carry.get("step", 0) if carry else 0
        if carry is not None:
            carry["step"] = cfg.steps
        history = [{"seconds": 2.0}] + [{"seconds": 0.05}] * (cfg.steps - done - 1)  # a new loader's slow first
        return types.SimpleNamespace(history=history)

    monkeypatch.setattr(training, "train", fake_train)
    monkeypatch.setattr(baselines, "init_descendant", lambda *a, **k: None)
    ctx = BuildContext(tmp_path, BuildConfig(data="synthetic"), None, print, None, types.SimpleNamespace(train=None))
    per_step = _measure_steps(ctx, DescendantShape(depth=2, embed_dim=64, num_heads=2, mlp_ratio=4.0), 16)
    assert len(calls) == 2 and calls[0] == MEASURED_STEPS and calls[1] > MEASURED_STEPS  # the short steps: a second run
    assert per_step == pytest.approx(0.05)  # neither run's first step in the mean


def test_a_fleets_shapes_get_equal_fine_tuning_time_and_the_fast_one_more_steps(tmp_path, monkeypatch):
    """``--budget-split time`` (the default): two shapes whose steps take 1 s and 3 s (as the plan measures them,
    faked here) are each allotted ``N * 2`` seconds, so the fast one plans 3x the steps of the slow one; the
    first plan's time shares reach each device's probes (``time_shares``: 2 and 2/3 of ``N`` of their steps)."""
    import factory.pipeline.device_choice as device_choice
    import factory.pipeline.finetune_facts as facts

    shares = []
    real = device_choice.estimator

    def spy(ctx, init=None):
        shares.append(dict(ctx.time_shares))
        return real(ctx, init)

    monkeypatch.setattr(device_choice, "estimator", spy)
    profiles = [load_profile(_profile(tmp_path, name, params)) for name, params in (("big", 0.2), ("small", 0.05))]
    dry = build(profiles, tmp_path / "dry", BuildConfig(data="synthetic", init="scratch"), dry_run=True)
    depths = sorted({d["shape"]["depth"] for d in dry["devices"]})
    assert len(depths) == 2, depths  # two budgets, two shapes
    small = depths[0]
    monkeypatch.setattr(facts, "step_seconds", lambda ctx, shape, batch: 1.0 if shape.depth <= small else 3.0)
    # probed (the time shares reach the estimator), one candidate each: the capacity choices stay
    cfg = BuildConfig(data="synthetic", batch_size=16, init="scratch", objective="accuracy", candidates=1)
    lines: list[str] = []
    # 300 s at 4 s a step of both shapes: N ~ 70, enough that the slow shape's ~N * 2/3 steps are paced too
    built = build(profiles, tmp_path / "out", dataclasses.replace(cfg, time_budget_s=300), log=lines.append)
    second = built["time_budget"]["plans"]["second"]
    n, paces = second["finetune_steps"], {d["shape"]["depth"]: d["finetune"]["pace"] for d in built["devices"]}
    assert second["split"] == "time" and sorted(second["step_s"].values()) == [1.0, 3.0]
    assert paces[small]["allotted_s"] == pytest.approx(2 * n) == paces[depths[1]]["allotted_s"]
    assert (paces[small]["planned_steps"], paces[depths[1]]["planned_steps"]) == (2 * n, round(2 * n / 3))
    assert sorted(shares[0].values()) == pytest.approx([2 / 3, 2.0])  # the probes' horizons: N * g * s_ref / s_c
    assert any("of fine-tuning per shape" in line for line in lines), lines
    assert "an equal share of the fine-tuning time per shape" in (tmp_path / "out" / "report.md").read_text()


def test_a_shape_fine_tuned_from_two_starts_is_planned_and_timed_as_two_fine_tunes(monkeypatch):
    """Two devices whose joint choices put them at one shape but two starts fine-tune it twice (one
    :class:`ShapeTask` per (shape, init)), so the plan prices two fine-tunes of that shape, allots each its own
    share, and still measures and exports the architecture once per device, not once per start."""
    import types

    import factory.pipeline.budget_costs as budget_costs
    import factory.pipeline.finetune_facts as facts
    import factory.pipeline.stages as stages
    from factory.pipeline.device_choice import fine_tunes, finetune_key
    from factory.pipeline.device_result import DeviceResult

    d5, d2 = DescendantShape(depth=5, embed_dim=64, num_heads=2), DescendantShape(depth=2, embed_dim=64, num_heads=2)
    rows = [("a", d5, "peg"), ("b", d5, "weight_selection"), ("c", d5, "peg"), ("d", d2, None)]
    devices = [
        DeviceResult(name, {}, choice={"shape": s.to_dict(), **({"joint": {"init": i}} if i else {})})
        for name, s, i in rows
    ]
    keys = fine_tunes(devices)
    assert sorted(keys) == sorted([f"{d5.label()}+peg", f"{d5.label()}+weight_selection", d2.label()])
    assert finetune_key(d2, None) == d2.label()
    monkeypatch.setattr(facts, "step_seconds", lambda ctx, shape, batch: float(shape.depth))
    monkeypatch.setattr(facts, "evaluation_seconds", lambda ctx, shape: 0.0)
    measured: list[str] = []
    measure = dataclasses.replace(
        stages.MEASURE, estimate_s=lambda ctx, item: measured.append(item.shape.label()) or 1.0
    )
    monkeypatch.setattr(stages, "MEASURE", measure)
    monkeypatch.setattr(stages, "EXPORT", dataclasses.replace(stages.EXPORT, estimate_s=lambda ctx, item: 2.0))
    cfg = BuildConfig(data="synthetic", init="scratch")
    ctx = types.SimpleNamespace(cfg=cfg, inits={}, step_times={})
    profiles = [types.SimpleNamespace(name=name) for name, *_ in rows]
    costs = budget_costs.build_costs(ctx, devices, profiles, objective="capacity", expanding=False, probed=True)
    assert costs.steps_s(10) == 10 * (5 + 5 + 2)  # d5 twice (two starts), d2 once; device c shares a's fine-tune
    assert sorted(measured) == sorted([d5.label(), d2.label()]) and costs.fixed["export"] == 4 * 2.0
    plan = fit_budget(costs.fixed_s + costs.steps_s(100), costs)
    assert plan.finetune_steps == 100 and plan.finetune_s(f"{d5.label()}+weight_selection") == pytest.approx(400)
    assert plan.steps_for(f"{d5.label()}+peg") == 80 and plan.steps_for(d2.label()) == 200  # equal time: 400 s each
