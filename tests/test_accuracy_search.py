"""Accuracy-aware search: the proxy fine-tune estimator, candidate choice, objective switch, fallback."""

import dataclasses
import json

import pytest
from click.testing import CliRunner

from factory import load_ancestry
from factory.device.accuracy import EstimatorConfig, ProxyFinetune, candidates, choose_by_accuracy
from factory.pipeline.build import BuildConfig, build
from factory.cli import cli
from factory.device.cost import CostModel
from factory.training.data import make_synthetic
from factory.pipeline.demo import load_demo_learngene
from factory.device.profile import load_profile
from factory.device.search import SearchSpace, search
from factory.training.train import TrainConfig

from .test_build import _profile


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    anc = load_ancestry("demo")
    ds = make_synthetic(img_size=28, num_classes=4, n_train=128, n_val=64)
    prof = load_profile(_profile(tmp_path_factory.mktemp("p"), "tiny", params=0.6))
    result = search(prof, SearchSpace.from_arch(anc.arch, num_classes=4), CostModel.for_profile(prof, arch=anc.arch))
    return anc, load_demo_learngene(anc), ds, result


def test_candidates_spread_along_the_front_and_keep_the_capacity_choice(setting):
    *_, result = setting
    picked = candidates(result, 4)
    assert len(picked) == 4 and result.feasible[0] in picked
    assert all(c in result.pareto or c is result.feasible[0] for c in picked)
    lat = [c.latency_ms for c in picked]
    assert lat[0] == min(c.latency_ms for c in result.pareto)  # the cheapest end of the front is tried too


def test_estimator_is_deterministic_for_a_seed_and_cached_by_content(setting, tmp_path):
    anc, lg, ds, result = setting
    shapes = [c.shape for c in candidates(result, 3)]
    cfg = EstimatorConfig(candidates=3, min_steps=3)

    def predictor(seed, cache=None):
        recipe = TrainConfig(steps=16, batch_size=16, seed=seed, device="cpu", warmup_steps=1)
        return ProxyFinetune(anc, lg, ds, recipe, config=cfg, cache_dir=cache)

    a, b = predictor(0), predictor(0)
    first = [a(s) for s in shapes]
    assert first == [b(s) for s in shapes]
    assert a.describe()["steps"] == 3 and a.computed == 3 and a.seconds > 0
    cached = predictor(0, tmp_path)
    assert [cached(s) for s in shapes] == first and cached.computed == 3
    again = predictor(0, tmp_path)
    assert [again(s) for s in shapes] == first and again.reused == 3 and again.computed == 0
    other = predictor(0, tmp_path)
    other.recipe = dataclasses.replace(other.recipe, steps=32)  # a different fine-tuning budget is a different estimate
    assert other.key(shapes[0]) != again.key(shapes[0])


def test_choice_is_the_best_predicted_and_ties_go_to_capacity(setting):
    *_, result = setting
    picked = candidates(result, 4)
    scores = {c.shape: 0.1 * i for i, c in enumerate(sorted(picked, key=lambda c: c.latency_ms))}
    fastest = min(picked, key=lambda c: c.latency_ms)
    scores[fastest.shape] = 0.9
    chosen, rows = choose_by_accuracy(result, lambda s: scores[s], 4)
    assert chosen is fastest and rows[0]["chosen"] and rows[0]["predicted_accuracy"] == 0.9
    flat, _ = choose_by_accuracy(result, lambda s: 0.5, 4)
    assert flat.score == max(c.score for c in picked)


def test_build_objective_switch(tmp_path):
    prof = load_profile(_profile(tmp_path, "tiny", params=0.6))
    base = dict(data="synthetic", finetune_steps=16, batch_size=8, candidates=3)
    cap = build([prof], tmp_path / "cap", BuildConfig(**base), log=lambda *_: None)["devices"][0]  # the default
    acc = build([prof], tmp_path / "acc", BuildConfig(objective="accuracy", **base), log=lambda *_: None)["devices"][0]
    assert cap["selection"]["objective"] == "capacity"
    sel = acc["selection"]
    assert sel["objective"] == "accuracy" and sel["estimator"]["method"] == "proxy-finetune" and sel["estimator"]["steps"] == 4
    assert sel["capacity_choice"] == DescendantShapeLabel(cap)
    best = max(r["predicted_accuracy"] for r in sel["candidates"])
    chosen = [r for r in sel["candidates"] if r["chosen"]]
    assert len(chosen) == 1 and chosen[0]["label"] == sel["chosen"] and chosen[0]["predicted_accuracy"] >= best - 1 / 64
    assert acc["predicted"]["accuracy"] == best
    card = (tmp_path / "acc" / "tiny" / "MODEL_CARD.md").read_text()
    assert "Chosen by predicted accuracy" in card and "proxy fine-tune" in card
    assert "chosen by (pred. acc)" in (tmp_path / "acc" / "report.md").read_text()
    # estimates are cached by content: a rebuild that changes nothing they depend on re-uses them
    lines = []
    build([prof], tmp_path / "acc", BuildConfig(objective="accuracy", **base, jobs=2), log=lines.append)
    assert any("chose" in line and "in 0.0s" in line for line in lines), lines


def DescendantShapeLabel(dev):
    from factory import DescendantShape

    return DescendantShape.from_dict(dev["shape"]).label()


def test_search_without_data_falls_back_to_capacity_with_a_reason(tmp_path):
    prof = _profile(tmp_path, "tiny", params=0.6)
    res = CliRunner().invoke(cli, ["search", "--profile", str(prof), "--objective", "accuracy", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["selection"]["objective"] == "capacity" and "needs --data" in out["selection"]["reason"]
    assert "fell back to capacity" in res.stderr


def test_search_with_data_ranks_by_predicted_accuracy(tmp_path):
    prof = _profile(tmp_path, "tiny", params=0.6)
    res = CliRunner().invoke(cli, ["search", "--profile", str(prof), "--data", "synthetic", "--steps", "16", "--objective", "accuracy",
                                   "--work", str(tmp_path / "w"), "--json"])
    assert res.exit_code == 0, res.output
    sel = json.loads(res.stdout)["selection"]
    assert sel["objective"] == "accuracy" and len(sel["candidates"]) >= 2 and sel["seconds_total"] >= sel["seconds"]
    assert (tmp_path / "w" / ".cache" / "estimate").is_dir()
