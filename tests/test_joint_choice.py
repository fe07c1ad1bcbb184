"""One decision, not two: --init auto chooses the pair (shape, initialisation); the expanding phase runs only
where the ancestry transfers."""

from __future__ import annotations

import json

import pytest

import factory.core.transfer as transfer
from factory.device.profile import load_profile
from factory.pipeline.build import BuildConfig, build

from .test_build import _profile

CFG = BuildConfig(data="synthetic", finetune_steps=6, batch_size=16, candidates=3)


def test_a_start_other_than_peg_gets_its_own_shape_search(tmp_path, monkeypatch):
    """Where the transfer probe prefers scratch at the shape searched for PEG, the shape is searched again for
    scratch (probes from scratch over the Pareto candidates, that shape among them) and the pair is fine-tuned."""
    monkeypatch.setattr(transfer, "choose_init", lambda scores, probe, **_: ("scratch", "forced by the test"))
    lines: list[str] = []
    manifest = build([load_profile(_profile(tmp_path, "dev", 0.2))], tmp_path / "out", CFG, log=lines.append)
    dev = manifest["devices"][0]
    joint = dev["joint"]
    assert dev["status"] == "ok" and dev["init"] == joint["init"] == "scratch"
    assert joint["shape"] == _label(dev["shape"]) and joint["searched_for_peg"]  # the pair that was fine-tuned
    pairs = {(p["shape"], p["init"]) for p in joint["pairs"]}
    assert (joint["searched_for_peg"], "peg") in pairs and (joint["searched_for_peg"], "scratch") in pairs
    probed = [p for p in joint["pairs"] if p.get("val_nll") is not None]
    assert len(probed) >= 2 and sum(p["chosen"] for p in probed) == 1  # compared on the same footing
    assert {p["init"] for p in probed} == {"scratch"}
    assert joint["searched_for_peg"] in {p["shape"] for p in probed}  # the first shape is a finalist
    assert dev["init_decision"]["chosen"] == "scratch" and "fine-tuned from scratch" in dev["init_decision"]["reason"]
    assert any("searching the shape again for scratch" in line for line in lines)
    report = (tmp_path / "out" / "report.md").read_text()
    assert "Pairs compared:" in report and r", scratch\) \(chosen\)" in report  # escaped Markdown text
    assert "fine-tuned from scratch" in (tmp_path / "out" / "dev" / "MODEL_CARD.md").read_text()
    ft = json.loads((tmp_path / "out" / "dev" / "export" / "export.json").read_text())
    assert ft["artifacts"]["onnx"]["sha256"]


def test_peg_kept_is_one_pair_at_the_searched_shape(tmp_path, monkeypatch):
    monkeypatch.setattr(transfer, "choose_init", lambda scores, probe, **_: ("peg", "forced by the test"))
    manifest = build([load_profile(_profile(tmp_path, "dev", 0.2))], tmp_path / "out", CFG, log=lambda *_: None)
    dev = manifest["devices"][0]
    assert dev["init"] == dev["joint"]["init"] == "peg"
    assert [(p["shape"], p["init"]) for p in dev["joint"]["pairs"]] == [(_label(dev["shape"]), "peg")]


@pytest.mark.parametrize("transfers", [False, True])
def test_the_expanding_phase_runs_only_where_the_ancestry_transfers(tmp_path, monkeypatch, transfers):
    scores = {"weight_selection": 0.9, "scratch": 0.2} if transfers else {"weight_selection": 0.2, "scratch": 0.9}
    real = transfer.check_transfer

    def fixed(*args, **kwargs):
        return transfer.TransferCheck(**{**real(*args, **kwargs).__dict__, "scores": scores})

    monkeypatch.setattr(transfer, "check_transfer", fixed)
    cfg = BuildConfig(
        data="synthetic", finetune_steps=4, batch_size=16, expand_steps=2, expand_batch_size=8, expand_min_steps=1
    )
    lines: list[str] = []
    out = tmp_path / "out"
    plan = build([load_profile(_profile(tmp_path, "dev", 0.2))], out, cfg, log=lines.append, dry_run=True)
    assert plan["expanding_phase_check"]["skipped_phase"] is (not transfers)
    manifest = build([load_profile(_profile(tmp_path, "dev", 0.2))], out, cfg, log=lines.append)
    check = manifest["expanding_phase_check"]
    assert check["transfers"] is transfers and check["knn_accuracy"] == scores
    ran = any("expanding-phase steps" in line and "learngene:" in line for line in lines)
    assert ran is transfers, lines
    assert any(("skipped" in line) is (not transfers) for line in lines if line.startswith("expanding phase:"))
    assert manifest["devices"][0]["status"] == "ok"


def test_a_fixed_init_and_a_given_learngene_are_not_checked(tmp_path):
    from factory.pipeline.context import BuildContext
    from factory.pipeline.joint_choice import expanding_phase_check

    ctx = BuildContext(tmp_path, BuildConfig(init="peg", expand_steps=5), None, print, None, None)
    assert expanding_phase_check(ctx, []) is None  # --init peg forces the phase: no check


def _label(shape: dict) -> str:
    from factory.core.shapes import DescendantShape

    return DescendantShape.from_dict(shape).label()


def test_an_explicit_capacity_objective_keeps_the_largest_shape_for_any_start(tmp_path, monkeypatch):
    monkeypatch.setattr(transfer, "choose_init", lambda scores, probe, **_: ("scratch", "forced by the test"))
    cfg = BuildConfig(data="synthetic", finetune_steps=6, batch_size=16, objective="capacity")
    manifest = build([load_profile(_profile(tmp_path, "dev", 0.2))], tmp_path / "out", cfg, log=lambda *_: None)
    dev = manifest["devices"][0]
    assert dev["init"] == "scratch" and dev["selection"]["objective"] == "capacity"
    assert dev["joint"]["shape"] == _label(dev["shape"]) and "not searched again" in dev["joint"]["why"]


@pytest.mark.parametrize("start", ["scratch", "peg"])
def test_an_untrained_learngene_decides_the_start_first_and_probes_one_round(tmp_path, monkeypatch, start):
    """No expanding phase trained the learngene (``--expand-steps 0``): the start is decided at the largest shape
    that fits, before any probe, and the shapes are probed once, fine-tuned from that start -- not first for
    PEG's descendants and again for the start."""
    monkeypatch.setattr(transfer, "choose_init", lambda scores, probe, **_: (start, "forced by the test"))
    rounds = _probe_rounds(monkeypatch)
    cfg = BuildConfig(data="synthetic", finetune_steps=6, batch_size=16, candidates=3, expand_steps=0)
    lines: list[str] = []
    out = tmp_path / "out"
    plan = build([load_profile(_profile(tmp_path, "dev", 0.2))], out, cfg, log=lines.append, dry_run=True)
    capacity = _label(plan["devices"][0]["shape"])
    assert any("decides the start at" in line and "searched once" in line for line in lines), lines
    assert not any("searched again" in line for line in lines)
    manifest = build([load_profile(_profile(tmp_path, "dev", 0.2))], out, cfg, log=lines.append)
    dev = manifest["devices"][0]
    joint = dev["joint"]
    assert rounds == [start]  # one probe round, for the start that is fine-tuned
    assert dev["init"] == joint["init"] == start and joint["start_decided_at"] == capacity
    assert "searched_for_peg" not in joint and joint["shape"] == _label(dev["shape"])
    probed = [p for p in joint["pairs"] if p.get("val_nll") is not None]
    assert {p["init"] for p in probed} == {start} and sum(p["chosen"] for p in probed) == 1
    assert capacity in {p["shape"] for p in probed}  # the capacity choice is one of the probed candidates
    assert dev["selection"]["objective"] == "accuracy" and dev["init_decision"]["chosen"] == start
    assert not any("searching the shape again" in line for line in lines)
    again: list[str] = []  # a dry run over the finished build: the start is cached, still one search
    build([load_profile(_profile(tmp_path, "dev", 0.2))], out, cfg, log=again.append, dry_run=True)
    assert any(f"({start}, cached)" in line and "searched once" in line for line in again), again
    assert not any("searched again" in line for line in again)


def test_a_trained_learngene_still_probes_for_peg_and_searches_again_for_another_start(tmp_path, monkeypatch):
    """With ``--objective accuracy`` and the shipped (trained) learngene the shape is probed for PEG's descendants
    and, where the transfer probe then prefers another start, searched again: the start-first path is only for an
    untrained learngene."""
    monkeypatch.setattr(transfer, "choose_init", lambda scores, probe, **_: ("scratch", "forced by the test"))
    rounds = _probe_rounds(monkeypatch)
    cfg = BuildConfig(data="synthetic", finetune_steps=6, batch_size=16, candidates=3, objective="accuracy")
    manifest = build([load_profile(_profile(tmp_path, "dev", 0.2))], tmp_path / "out", cfg, log=lambda *_: None)
    joint = manifest["devices"][0]["joint"]
    assert rounds == [None, "scratch"] and joint["init"] == "scratch" and "searched_for_peg" in joint


def _probe_rounds(monkeypatch) -> list[str | None]:
    """The ``init`` of every round of shape probes the joint choice runs, in order (None: the build's own)."""
    import factory.pipeline.joint_choice as joint_choice
    from factory.pipeline import device_choice

    rounds: list[str | None] = []

    def counted(ctx, devices, results, reason="", init=None, fleet=None):
        rounds.append(init)
        return device_choice.choose_by_probes(ctx, devices, results, reason=reason, init=init, fleet=fleet)

    monkeypatch.setattr(joint_choice, "choose_by_probes", counted)
    return rounds
