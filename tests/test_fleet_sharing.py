"""A fleet's devices share a fine-tune where a shape another device chose probes within noise of their own best:
the paired test, the candidates, the halving that carries such a shape, and a fleet build that ships one
fine-tune for two devices."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest

from factory import load_ancestry
from factory.core.shapes import DescendantShape
from factory.device.accuracy import (
    EstimatorConfig,
    Probe,
    SuccessiveHalving,
    candidates,
    describe_decision,
    paired_gap,
    shared_choice,
    within_noise,
)
from factory.device.profile import load_profile
from factory.device.resolve import latency_model_for
from factory.device.search import SearchSpace, search
from factory.errors import FactoryError
from factory.pipeline.build import BuildConfig, build
from factory.pipeline.device_choice import FleetChoices

from .helpers import cli_run, one_line_exit_2
from .test_build import _profile

A, B, C, D = (DescendantShape(depth, 64, 4, 2.0, 28, 4, 10) for depth in (1, 2, 3, 4))
N = 400


def _values(mean: float, wobble: float = 0.0) -> tuple[float, ...]:
    """Per-image NLLs around ``mean``: 1.0 +- 0.5 by image (shared by every probe: the images' own difficulty),
    plus ``wobble`` alternating in sign (the probe's own noise, paired SE = wobble / sqrt(N))."""
    return tuple(mean + 0.5 * ((i % 7) - 3) / 3 + wobble * (-1) ** i for i in range(N))


def _probe(shape, mean, wobble=0.0, rung=2, steps=12):
    values = _values(mean, wobble)
    return Probe(shape, steps, 0.5, sum(values) / N, values, rung=rung)


def test_the_paired_gap_is_the_mean_difference_and_its_standard_error():
    gap, se = paired_gap(_values(1.01, 0.1), _values(1.0))
    assert gap == pytest.approx(0.01) and se == pytest.approx(0.1 / N**0.5, rel=0.01)  # 0.005: the gap is 2 SE
    worse, best = _probe(B, 1.01, 0.1), _probe(A, 1.0)
    assert not within_noise(worse, best, 1.0) and within_noise(worse, best, 2.5)
    assert not within_noise(worse, best, 0.0)  # 0: never
    assert within_noise(_probe(B, 1.0), best, 1.0)  # the same NLL on every image: no gap at all
    assert not within_noise(Probe(B, 12, 0.5, 1.0, (1.0,) * 10), best, 1.0)  # other images: not comparable
    with pytest.raises(ValueError):
        paired_gap((), ())


def test_another_devices_choice_is_taken_within_noise_and_only_then():
    best, near, far = _probe(A, 1.0), _probe(B, 1.004, 0.1), _probe(C, 1.05, 0.1)  # 0.8 and 10 SE above
    assert shared_choice([best, near, far], best, [B, C], 1.0)[0] == B
    assert shared_choice([best, far], best, [C], 1.0) is None  # outside the noise: the device's own best
    assert shared_choice([best, near], best, [A, B], 1.0) is None  # its own best is another's choice already
    assert shared_choice([best, near], best, [], 1.0) is None  # nobody chose it
    big = _probe(D, 1.0)  # the device's own best is larger than the shape within noise: never traded down
    assert shared_choice([big, _probe(B, 1.004, 0.1)], big, [B], 1.0) is None
    shape, why = shared_choice([best, near], best, [B], 1.0)
    assert why["best"] == A.label() and why["shared"] == B.label() and why["within_se"] == 1.0
    assert why["nll_gap"] == pytest.approx(0.004, abs=1e-5) and why["nll_gap"] <= why["se"]


def test_decide_takes_the_shared_finalist_and_says_so():
    est = SuccessiveHalving(None, None, None, None)  # deciding reads only the estimator's config
    finalists = [_probe(A, 1.0), _probe(B, 1.004, 0.1)]
    assert est.decide(finalists)[0] == A
    chosen, why = est.decide(finalists, prefer=[B], share_z=1.0)
    assert chosen == B and why["shared"]["best"] == A.label() and why["rule"].startswith("lowest NLL")
    line = describe_decision(why)
    assert f"took {B.label()}, another device's choice, over its own best {A.label()}" in line
    assert "within 1 paired SE" in line
    assert est.decide(finalists, prefer=[B], share_z=0.0)[0] == A
    far = [_probe(A, 1.0), _probe(C, 1.05, 0.1), _probe(D, 1.3, rung=0, steps=3)]
    chosen, why = est.decide(far, prefer=[C, D], share_z=1.0)
    considered = why["not_shared"]["considered"]
    assert chosen == A and "shared" not in why and [r["shape"] for r in considered] == [C.label(), D.label()]
    assert considered[0]["nll_gap"] == pytest.approx(0.05, abs=1e-5) and "nll_gap" not in considered[1]
    assert f"{C.label()} 0.0500 higher" in describe_decision(why) and f"{D.label()} dropped at rung 0" in (
        describe_decision(why)
    )
    assert "not_shared" not in est.decide(far, prefer=[A, C], share_z=1.0)[1]  # its own best is another's choice
    down = [_probe(C, 1.0), _probe(A, 1.0)]  # within noise (no gap at all), but smaller than C
    chosen, why = est.decide(down, prefer=[A], share_z=1.0)
    assert chosen == C and why["not_shared"]["considered"][0]["smaller"]
    assert f"{A.label()} smaller than its own best" in describe_decision(why)


class _Scripted(SuccessiveHalving):
    """Successive halving over scripted probes: ``script[shape]`` is the mean NLL at every rung, ``wobble`` its
    noise; nothing trains."""

    def __init__(self, script, wobble):
        super().__init__(None, None, None, SimpleNamespace(steps=100), config=EstimatorConfig())
        self.script, self.wobble, self.trained = script, wobble, []

    def _probe(self, shape, steps, state):
        self.trained.append((shape.label(), steps))
        return _probe(shape, self.script[shape], self.wobble.get(shape, 0.0), steps=steps)


def test_the_halving_carries_another_devices_choice_while_it_is_within_noise():
    """Rungs 3, 6, 12 of 100 steps over four shapes: 4 -> 2 -> 1. C ranks third (dropped by the halving), within
    noise of the best; D is last and far. Carried, C reaches the last rung and is taken; D never is."""
    script = {A: 1.0, B: 1.001, C: 1.003, D: 1.2}
    est = _Scripted(script, {B: 0.1, C: 0.1, D: 0.1})
    probes = est.rank([A, B, C, D], prefer=[C, D], share_z=1.0)
    reached = {p.shape: p.steps for p in probes}
    assert reached == {A: 12, B: 6, C: 12, D: 3}  # the halving keeps A alone; C goes on beside it, D stops
    chosen, why = est.decide(probes, prefer=[C, D], share_z=1.0)
    assert chosen == C and why["shared"]["best"] == A.label()
    plain = _Scripted(script, {B: 0.1, C: 0.1, D: 0.1})
    assert {p.shape: p.steps for p in plain.rank([A, B, C, D])} == {A: 12, B: 6, C: 3, D: 3}
    assert len(plain.trained) == len(est.trained) - 2  # what carrying C cost: its two later rungs
    down = _Scripted({D: 1.0, C: 1.001, B: 1.003, A: 1.004}, {C: 0.1, B: 0.1, A: 0.1})
    assert {p.shape: p.steps for p in down.rank([D, C, B, A], prefer=[B], share_z=1.0)}[B] == 3  # smaller: dropped


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    anc = load_ancestry("demo")
    prof = load_profile(_profile(tmp_path_factory.mktemp("p"), "tiny", params=0.6))
    return search(prof, SearchSpace.from_arch(anc.arch, num_classes=4), latency_model_for(prof, arch=anc.arch))


def test_another_devices_choice_is_a_candidate_where_it_fits(result):
    picked = candidates(result, 4)
    other = next(c for c in result.feasible if c not in picked)  # fits here, not one of this device's picks
    shared = candidates(result, 4, prefer=[other.shape])
    assert len(shared) == 4 and other in shared and result.feasible[0] in shared  # the same cost; capacity kept
    assert len({c.shape for c in shared} & {c.shape for c in picked}) == 3  # it replaced one pick
    unfit = result.rejected[0].shape
    assert unfit not in {c.shape for c in candidates(result, 4, prefer=[unfit])}  # over this device's budgets
    assert candidates(result, 4, prefer=[result.feasible[0].shape]) == picked  # already a candidate: unchanged


def test_the_fleet_pool_offers_a_start_its_own_choices_and_zero_turns_it_off():
    fleet = FleetChoices(1.0)
    fleet.add("scratch", A, "pi")
    fleet.add("scratch", A, "orin")
    fleet.add("peg", B, "nano")
    assert fleet.prefer("scratch") == [A] and fleet.prefer("peg") == [B] and fleet.prefer("tleg") == []
    assert fleet.devices("scratch", A) == ["pi", "orin"]
    off = FleetChoices(0.0)
    off.add("scratch", A, "pi")
    assert off.prefer("scratch") == []


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_a_bad_share_within_is_refused(bad):
    with pytest.raises(FactoryError, match="share within"):
        BuildConfig(share_within=bad)


def test_a_fleet_build_ships_one_fine_tune_for_two_devices_that_probe_alike(tmp_path, monkeypatch):
    """Two devices, the smaller probed first. With --share-within wide open the larger takes the smaller's shape
    (its own best was another), the two ship one fine-tune, and the manifest, log and report say so. The rule that a
    device never takes a smaller shape is tested above; here every shape counts as one size, so that which shapes
    these probes happen to pick does not decide whether the plumbing is tested."""
    import factory.device.accuracy_choice as accuracy_choice

    monkeypatch.setattr(accuracy_choice, "vit_flops", lambda shape, *arch: 1)
    cfg = BuildConfig(data="synthetic", init="scratch", finetune_steps=12, batch_size=16, candidates=3)
    profiles = [load_profile(_profile(tmp_path, "big", 0.6)), load_profile(_profile(tmp_path, "small", 0.15))]
    lines: list[str] = []
    manifest = build(profiles, tmp_path / "out", dataclasses.replace(cfg, share_within=50.0), log=lines.append)
    big, small = manifest["devices"]
    assert big["status"] == small["status"] == "ok"
    assert big["shape"] == small["shape"]
    shared = next(r for r in big["selection"]["candidates"] if r["chosen"])["decision"]["shared"]
    assert shared["shared"] == small["selection"]["chosen"] != shared["best"]  # its own best was another shape
    assert big["selection"]["shares_fine_tune_with"] == ["small"] and "shares_fine_tune_with" not in small["selection"]
    assert big["finetune"]["seconds"] == small["finetune"]["seconds"]  # one fine-tune, recorded for both
    assert any(line.startswith("big: chose") and "one fine-tune with small" in line for line in lines)
    assert lines.index(next(x for x in lines if x.startswith("small: chose"))) < lines.index(
        next(x for x in lines if x.startswith("big: chose"))
    )  # the most constrained device is probed first
    report = (tmp_path / "out" / "report.md").read_text()
    assert "another device's choice" in report and "one fine\\-tune with small" in report
    assert "one fine-tune with small" in (tmp_path / "out" / "big" / "MODEL_CARD.md").read_text()
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["devices"][0]["shape"] == small["shape"]


@pytest.mark.parametrize("share, says", [("1", True), ("0", False)])
def test_the_dry_run_says_a_fleet_may_share_and_the_flag_turns_it_off(tmp_path, share, says):
    big, small = _profile(tmp_path, "big", 0.6), _profile(tmp_path, "small", 0.15)
    res = cli_run(
        "build", "--profile", big, "--profile", small, "--data", "synthetic", "--init", "scratch", "--steps", "6",
        "--out", tmp_path / "out", "--share-within", share, "--dry-run",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert ("fleet: devices are probed most constrained first" in res.output) is says
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_a_negative_share_within_is_one_line_and_exit_2(tmp_path):
    res = cli_run("build", "--profile", _profile(tmp_path, "p"), "--share-within", "-1", "--out", tmp_path / "o")
    one_line_exit_2(res, "--share-within")
    assert not (tmp_path / "o").exists()
