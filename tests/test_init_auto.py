"""``--init auto``: the transfer probe's math, its decision, and what a build records of it."""

import json

import pytest
import torch
from click.testing import CliRunner

from factory.cli import cli
from factory.core.transfer import TransferProbe, choose_init, decide_init, knn_loo_accuracy
from factory.errors import FactoryError

from .test_build import _profile


def _clusters(n_per_class=40, classes=4, dim=32, spread=0.1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=gen) * 3
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    return centres[labels] + spread * torch.randn(len(labels), dim, generator=gen), labels


def test_knn_separates_clustered_features_and_not_noise():
    feats, labels = _clusters()
    assert knn_loo_accuracy(feats, labels, k=10) == 1.0
    noise = torch.randn(feats.shape, generator=torch.Generator().manual_seed(1))
    chance = knn_loo_accuracy(noise, labels, k=10)
    assert chance < 0.45  # 4 classes: chance is 0.25
    # leave-one-out: a point is never its own neighbour (with k=1 and duplicated points it would be perfect)
    one_each = torch.eye(4)
    assert knn_loo_accuracy(one_each, torch.arange(4), k=1) < 1.0
    assert knn_loo_accuracy(feats[:1], labels[:1]) != knn_loo_accuracy(feats[:1], labels[:1])  # nan for one row


def test_choose_init_rule():
    probe = TransferProbe(scratch_margin=0.05, inherit_margin=0.03)
    # features that transfer: peg kept
    assert choose_init({"peg": 0.9, "weight_selection": 0.88, "tleg": 0.7, "scratch": 0.5}, probe)[0] == "peg"
    # random features beat every inherited start by more than the margin: scratch
    chosen, why = choose_init({"peg": 0.55, "weight_selection": 0.6, "tleg": 0.62, "scratch": 0.75}, probe)
    assert chosen == "scratch" and "0.750" in why and "tleg" in why
    # ... but not within the margin
    assert choose_init({"peg": 0.70, "weight_selection": 0.6, "tleg": 0.62, "scratch": 0.74}, probe)[0] == "peg"
    # another inherited start replaces peg only past the inherit margin ...
    assert choose_init({"peg": 0.80, "weight_selection": 0.82, "scratch": 0.3}, probe)[0] == "peg"
    assert choose_init({"peg": 0.80, "weight_selection": 0.90, "scratch": 0.3}, probe)[0] == "weight_selection"
    # ... and by default never (the study: k-NN among inherited starts does not predict their fine-tune)
    assert choose_init({"peg": 0.50, "weight_selection": 0.90, "scratch": 0.3})[0] == "peg"
    assert choose_init({"scratch": 0.3}, probe)[0] == "scratch"


def test_a_shape_label_reads_back_as_its_shape():
    from factory import DescendantShape

    for shape in (DescendantShape(6, 96, 2, 2.0, 28, 7, 10), DescendantShape(7, 192, 3, 3.5, 224, 16, 10)):
        assert DescendantShape.from_label(shape.label(), 10) == shape
    with pytest.raises(FactoryError, match="not a shape label"):
        DescendantShape.from_label("d6-w96")


def test_shapes_the_learngene_never_trained_prefer_weight_selection():
    from factory import DescendantShape
    from factory.core.demo import load_demo_learngene
    from factory.core.transfer import trained_by

    lg = load_demo_learngene()  # trained at 3 heads, depths 1..12
    assert trained_by(DescendantShape(3, 192, 3, 4.0, 28, 7, 10), lg)
    assert trained_by(DescendantShape(3, 192, 3, 2.0, 28, 7, 10), lg)  # a cut MLP: still the trained attention
    assert not trained_by(DescendantShape(6, 96, 2, 2.0, 28, 7, 10), lg)  # re-headed
    assert not trained_by(DescendantShape(13, 192, 3, 4.0, 28, 7, 10), lg)  # deeper than any trained depth
    # no expanding phase: an untrained learngene's descendants start below weight selection, which is preferred
    assert not trained_by(DescendantShape(3, 192, 3, 4.0, 28, 7, 10), object())
    scores = {"peg": 0.80, "weight_selection": 0.79, "tleg": 0.7, "scratch": 0.4}
    assert choose_init(scores, trained=True)[0] == "peg"
    chosen, why = choose_init(scores, trained=False)
    assert chosen == "weight_selection" and "never trained" in why
    assert choose_init(scores, TransferProbe(untrained_shape_init="peg"), trained=False)[0] == "peg"
    # scratch still wins where nothing transfers
    assert choose_init({**scores, "scratch": 0.95}, trained=False)[0] == "scratch"


@pytest.mark.parametrize(
    "kw",
    [
        {"images": 1},
        {"k": 0},
        {"scratch_margin": -0.1},
        {"inherit_margin": 1.5},
        {"candidates": ("peg", "bogus")},
        {"candidates": ()},
        {"untrained_shape_init": "scratch"},
        {"max_fraction": 0},
        {"min_images": 1},
    ],
)
def test_bad_probe_settings_are_refused(kw):
    with pytest.raises(FactoryError, match="invalid transfer probe"):
        TransferProbe(**kw)


def test_decide_init_on_the_demo_ancestry():
    """Real models: the demo ancestry's MNIST features transfer to digits-like images (its own task), so a
    descendant of the trained learngene scores far above random features and is kept."""
    from factory import DescendantShape, load_ancestry
    from factory.core.demo import load_demo_learngene
    from factory.data import load_dataset

    anc = load_ancestry("demo")
    ds = load_dataset("mnist", img_size=28)
    shape = DescendantShape(2, 96, 3, 2.0, 28, 7, 10)
    d = decide_init(
        shape,
        ds.val.images[:200],
        ds.val.labels[:200],
        ancestry=anc,
        learngene=load_demo_learngene(anc),
        seed=0,
        probe=TransferProbe(images=200),
    )
    assert d.chosen == "peg" and d.images == 200
    assert set(d.scores) == {"peg", "weight_selection", "tleg", "scratch"}
    assert d.scores["peg"] > d.scores["scratch"] + 0.2
    record = d.to_dict()
    assert record["knn_accuracy"]["peg"] == round(d.scores["peg"], 4) and record["seconds"] > 0


def test_the_init_decision_reuses_the_transfer_checks_scores_only_where_it_measured_the_same_thing(monkeypatch):
    """Weight selection's and scratch's scores do not depend on the learngene: where the expanding-phase check
    scored them at this shape, seed and sample, the decision takes them (the same numbers) instead of building
    and scoring those two models again; anywhere else it scores all four."""
    from factory import DescendantShape, load_ancestry
    from factory.core import baselines, transfer
    from factory.core.demo import load_demo_learngene
    from factory.data import load_dataset

    anc = load_ancestry("demo")
    lg = load_demo_learngene(anc)
    ds = load_dataset("mnist", img_size=28)
    x, y = ds.val.images[:120], ds.val.labels[:120]
    shape, other = DescendantShape(2, 96, 3, 2.0, 28, 7, 10), DescendantShape(3, 96, 3, 2.0, 28, 7, 10)
    probe = TransferProbe(images=120)
    check = transfer.check_transfer(shape, x, y, ancestry=anc, seed=0, probe=probe)
    fresh = decide_init(shape, x, y, ancestry=anc, learngene=lg, seed=0, probe=probe)
    built = []
    real = baselines.init_descendant
    monkeypatch.setattr(
        baselines, "init_descendant", lambda method, *a, **k: built.append(method) or real(method, *a, **k)
    )
    known = check.known_at(shape, 120, 0)
    reused = decide_init(shape, x, y, ancestry=anc, learngene=lg, seed=0, probe=probe, known=known)
    assert sorted(built) == ["peg", "tleg"] and reused.reused == ("weight_selection", "scratch")
    assert reused.scores == fresh.scores and reused.chosen == fresh.chosen  # the same figures, the same choice
    assert reused.to_dict()["reused_from_transfer_check"] == ["weight_selection", "scratch"]
    assert "reused_from_transfer_check" not in fresh.to_dict()
    # another shape, another sample size or another seed: nothing to reuse
    assert (
        check.known_at(other, 120, 0) == {}
        and check.known_at(shape, 100, 0) == {}
        and check.known_at(shape, 120, 1) == {}
    )


def test_probe_images_keep_the_decision_under_a_quarter_of_the_fine_tune():
    from factory.core.transfer import images_for

    probe = TransferProbe()
    assert images_for(probe, 100, 32) == 512  # 4 candidates x 512 / 3 = 683 image-steps <= 25% of 3,200
    n = images_for(probe, 100, 16)
    assert n < 512 and 4 * n / 3 <= 0.25 * 100 * 16
    assert images_for(probe, 2, 8) == probe.min_images  # a tiny fine-tune: never fewer than the floor
    assert images_for(TransferProbe(images=64), 2, 8) == 64
    # at 224 px the decoded sample is capped by bytes (160 MB: 272 images), the same for any data set's size
    import dataclasses

    from factory.core.ancestry import DEMO_ARCH

    photos = dataclasses.replace(DEMO_ARCH, img_size=224, in_chans=3)  # 602,112 bytes an image in fp32
    assert images_for(probe, 100, 32, photos) == 278 == (160 << 20) // (4 * 3 * 224 * 224)
    assert images_for(probe, 100, 32, DEMO_ARCH) == 512  # 28-px digits: 512 fit easily
    assert images_for(probe, 100, 32, dataclasses.replace(photos, img_size=448)) == probe.min_images


def test_spread_sample_covers_a_class_sorted_split():
    from factory.data import ImageTensors, spread_sample

    split = ImageTensors(torch.zeros(100, 1, 4, 4), torch.arange(10).repeat_interleave(10), [str(i) for i in range(10)])
    picked = spread_sample(split, 20)
    assert len(picked) == 20 and set(picked.labels.tolist()) == set(range(10))
    assert len(spread_sample(split, 500)) == 100


def test_build_records_the_decision_and_the_override(tmp_path):
    from factory.device.profile import load_profile
    from factory.pipeline.build import BuildConfig, build

    prof = load_profile(_profile(tmp_path, "tiny"))
    lines = []
    cfg = BuildConfig(data="synthetic", finetune_steps=4, batch_size=16, init_probe=TransferProbe(images=64))
    dev = build([prof], tmp_path / "auto", cfg, log=lines.append)["devices"][0]
    d = dev["init_decision"]
    assert dev["init_requested"] == "auto" and dev["init"] == d["chosen"] in (
        "peg",
        "weight_selection",
        "tleg",
        "scratch",
    )
    assert d["images"] == 64 and set(d["knn_accuracy"]) == {"peg", "weight_selection", "tleg", "scratch"}
    assert 0 < d["fraction_of_finetune"] and "files" not in d
    # the recorded figures reproduce the choice
    assert choose_init(d["knn_accuracy"], cfg.init_probe, trained=d["shape_trained"])[0] == d["chosen"]
    assert any(line.startswith("init ") and f"auto -> {d['chosen']}" in line for line in lines)
    card = (tmp_path / "auto" / "tiny" / "MODEL_CARD.md").read_text()
    assert dev["latency_band"].startswith("none stated") and "error band none stated" in card  # basis and band, said
    assert f"Initialised by `{d['chosen']}` (chosen by `--init auto`" in card
    saved = json.loads((tmp_path / "auto" / "manifest.json").read_text())["devices"][0]
    assert saved["init_decision"]["reason"] == d["reason"]
    # the decision is a cached stage: a rebuild without the manifest reuses it (and the fine-tune keyed by it)
    (tmp_path / "auto" / "manifest.json").unlink()
    lines.clear()
    again = build([prof], tmp_path / "auto", cfg, log=lines.append)["devices"][0]
    assert again["init_decision"] == d and any("finetune" in line and "cached" in line for line in lines)
    # the dry run of a decided build says what was chosen
    lines.clear()
    build([prof], tmp_path / "auto", cfg, log=lines.append, dry_run=True)
    assert any(f"--init auto chose {d['chosen']}" in line for line in lines)
    # a fixed --init overrides: no probe, no decision recorded
    lines.clear()
    fixed = build(
        [prof],
        tmp_path / "fixed",
        BuildConfig(data="synthetic", finetune_steps=4, batch_size=16, init="scratch"),
        log=lines.append,
    )["devices"][0]
    assert fixed["init"] == "scratch" and fixed["init_requested"] == "scratch" and "init_decision" not in fixed
    assert not any(line.startswith("init ") for line in lines)


def test_dry_run_of_auto_says_it_will_probe(tmp_path):
    from factory.device.profile import load_profile
    from factory.pipeline.build import BuildConfig, build

    lines = []
    plan = build(
        [load_profile(_profile(tmp_path, "tiny"))],
        tmp_path / "out",
        BuildConfig(data="synthetic", finetune_steps=4),
        log=lines.append,
        dry_run=True,
    )
    row = plan["devices"][0]
    assert row["init"].startswith("auto") and row["init_estimate_s"] > 0
    assert any("--init auto will probe peg, weight_selection, tleg, scratch" in line for line in lines)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_cli_init_default_and_bad_value(tmp_path):
    from factory.cli.build import build_cmd

    init = next(p for p in build_cmd.params if p.name == "init")
    assert init.default == "auto" and "auto" in init.type.choices
    res = CliRunner().invoke(
        cli, ["build", "--profile", str(_profile(tmp_path, "tiny")), "--init", "bogus", "--out", str(tmp_path / "o")]
    )
    assert res.exit_code == 2 and "--init" in res.output and "auto" in res.output
    assert not (tmp_path / "o").exists()


def test_model_card_names_where_the_weights_came_from():
    from factory.pipeline.model_card import source_text

    lg = {"sha256": "ab" * 32, "layers": 3, "heads": 3}
    assert "nothing inherited" in source_text({"init": "scratch"}, lg)
    assert source_text({"init": "peg"}, lg).startswith("from learngene `abababababab`")
    assert source_text({"init": "weight_selection"}, lg) == "from the layers"


def test_a_learngene_trained_fewer_steps_than_pay_counts_as_untrained():
    """``--expand-steps 30`` on mnist-unseen: counted as trained, the d12 descendant (k-NN 0.393 against weight
    selection's 0.826) was kept and shipped 0.7615 against 0.9525 (bench/short_phase.py): a phase below the bar
    where it pays is no phase for the decision."""
    import copy

    from factory import DescendantShape
    from factory.core.demo import load_demo_learngene
    from factory.core.transfer import PHASE_PAYS_FROM_STEPS, expanding_steps, trained_by

    shape = DescendantShape(3, 192, 3, 4.0, 28, 7, 10)
    lg = load_demo_learngene()
    assert expanding_steps(lg) == 1500 >= PHASE_PAYS_FROM_STEPS and trained_by(shape, lg)
    short = copy.copy(lg)
    short.meta = copy.deepcopy(lg.meta)
    short.meta["expanding_phase"]["config"]["steps"] = 30
    assert expanding_steps(short) == 30 and not trained_by(shape, short)
    assert trained_by(shape, short, min_steps=30) and not trained_by(shape, short, min_steps=31)
    del short.meta["expanding_phase"]["config"]  # no record of its steps: not counted as trained
    assert expanding_steps(short) == 0 and not trained_by(shape, short, min_steps=0)


def test_the_build_treats_a_short_phase_as_no_phase_for_the_objective_and_the_start():
    from factory.core.ancestry import load_ancestry
    from factory.pipeline.config import BuildConfig, learngene_trained, objective_for, untrained_why

    anc = load_ancestry("demo")
    assert learngene_trained(BuildConfig(), anc)  # the shipped recipe: 1,500 steps
    assert not learngene_trained(BuildConfig(expand_steps=30), anc)
    assert learngene_trained(BuildConfig(expand_steps=30, expand_min_steps=30), anc)
    assert objective_for(BuildConfig(expand_steps=30), anc)[0] == "accuracy"
    assert objective_for(BuildConfig(), anc)[0] == "capacity"
    assert untrained_why(BuildConfig(expand_steps=30), anc) == "30 expanding-phase steps, fewer than the 750 that pay"
    assert untrained_why(BuildConfig(expand_steps=0), anc) == "no expanding phase"


@pytest.mark.parametrize(("init", "runs"), [("auto", False), ("peg", True)])
def test_a_phase_below_the_bar_is_not_paid_for_by_init_auto(tmp_path, init, runs):
    """``--expand-steps 300``: the phase would leave a learngene auto does not start from (bench/short_phase.py:
    the default trained it for 104 s and shipped weight selection anyway), so auto skips it and says why;
    ``--init peg`` asked for the learngene and still runs it."""
    from factory.device.profile import load_profile
    from factory.pipeline.build import BuildConfig, build

    lines: list[str] = []
    cfg = BuildConfig(data="synthetic", batch_size=16, finetune_steps=20, expand_steps=300, init=init)
    plan = build([load_profile(_profile(tmp_path, "dev", 0.2))], tmp_path / "out", cfg, dry_run=True, log=lines.append)
    skipped = [line for line in lines if line.startswith("expanding phase: not run: --expand-steps 300 is below")]
    assert bool(skipped) is not runs, lines
    learngene = {row["stage"]: row for row in plan["stages"]}["learngene"]
    assert (learngene["estimate_s"] > 1.0) is runs, learngene  # 300 steps, or sampling only
    # trained or not, 300 steps do not make the learngene's descendants the capacity objective's: probed
    assert any(line.startswith("objective: accuracy") for line in lines), lines
