"""A fine-tune that keeps the weights of its best validation evaluation (``TrainConfig.keep_best``,
``--keep-weights best-val``): which weights come back, across a resume, and where the build uses it."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import factory.training.train as tr
from factory.data import make_synthetic
from factory.errors import Interrupted
from factory.pipeline.config import BuildConfig, finetune_stage_recipe
from factory.training.best_weights import BEST_FILE, BestWeights, evaluations
from factory.training.train import TrainConfig, train

from .test_train import _tiny_model


@pytest.fixture(scope="module")
def synthetic():
    return make_synthetic(img_size=16, num_classes=4, n_train=128, n_val=32)


def _scripted(monkeypatch, scores):
    """``evaluate`` answers ``scores`` in turn and records a copy of the weights it was shown each time."""
    shown = []

    def fake(model, data, **kwargs):
        shown.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return scores[len(shown) - 1]

    monkeypatch.setattr(tr, "evaluate", fake)
    return shown


def _same(model, state):
    return all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_the_weights_of_the_best_evaluation_come_back_ties_to_the_later(synthetic, monkeypatch):
    shown = _scripted(monkeypatch, [0.5, 0.8, 0.6, 0.8, 0.7])  # evaluations at steps 2, 4, 6, 8, 10
    cfg = TrainConfig(steps=10, batch_size=16, warmup_steps=2, eval_every=2, keep_best=True)
    model = _tiny_model()
    result = train(model, synthetic.train, cfg, val_data=synthetic.val, progress=False)
    assert result.kept_step == 8 and result.val_accuracy == 0.8  # 0.8 twice: the later one
    assert _same(model, shown[3]) and not _same(model, shown[4])
    assert [h.get("best", False) for h in result.history if "val_acc" in h] == [True, True, False, True, False]


def test_without_keep_best_or_when_the_last_is_best_the_last_weights_come_back(synthetic, monkeypatch):
    for keep, scores, kept in ((False, [0.9, 0.1], None), (True, [0.4, 0.6], 4)):
        shown = _scripted(monkeypatch, scores)
        cfg = TrainConfig(steps=4, batch_size=16, warmup_steps=1, eval_every=2, keep_best=keep)
        model = _tiny_model()
        result = train(model, synthetic.train, cfg, val_data=synthetic.val, progress=False)
        assert result.kept_step == kept and result.val_accuracy == scores[-1] and _same(model, shown[-1])


def test_the_best_survives_a_resume_and_a_best_from_later_steps_is_not_trusted(synthetic, monkeypatch, tmp_path):
    """Stopped after step 5 (evaluations at 2 and 4: the best is step 2's), resumed to 10 with worse scores:
    step 2's weights come back, read from ``best.safetensors``."""
    cfg = TrainConfig(steps=10, batch_size=16, warmup_steps=2, eval_every=2, ckpt_every=5, keep_best=True)
    shown = _scripted(monkeypatch, [0.9, 0.5])
    stops = iter([False] * 5 + [True])
    with pytest.raises(Interrupted):
        train(
            _tiny_model(),
            synthetic.train,
            cfg,
            val_data=synthetic.val,
            out_dir=tmp_path,
            progress=False,
            should_stop=lambda: next(stops),
        )
    first = shown[0]
    _scripted(monkeypatch, [0.4, 0.3, 0.2])  # steps 6, 8, 10
    model = _tiny_model(seed=7)
    result = train(model, synthetic.train, cfg, val_data=synthetic.val, out_dir=tmp_path, resume=True, progress=False)
    assert result.kept_step == 2 and result.val_accuracy == 0.9 and _same(model, first)
    # a record from after the step a run resumes at was made by steps that run again: dropped
    assert BestWeights.open(tmp_path, 1).step == 0 and BestWeights.open(tmp_path, 5).step == 2
    assert BestWeights.open(tmp_path, None).state is None and not (tmp_path / BEST_FILE).exists()  # a fresh start


def test_a_nan_or_a_lower_score_is_never_kept():
    best, model = BestWeights(), torch.nn.Linear(2, 2)
    assert best.offer(1, 0.5, model) and not best.offer(2, math.nan, model) and not best.offer(3, 0.4, model)
    assert best.offer(4, 0.5, model) and best.step == 4
    assert best.restore(model, 4) == 4 and BestWeights().restore(model, 9) == 9


def test_the_build_keeps_the_best_only_where_the_test_split_is_its_own():
    """Choosing on the validation split would inflate a test accuracy read from that same split."""
    own = make_synthetic(img_size=16, num_classes=4, n_train=32, n_val=8)
    assert own.test_from != "test"  # the synthetic set tests on its validation split
    cfg = BuildConfig(data="synthetic", finetune_steps=200)
    assert not finetune_stage_recipe(cfg, own).keep_best
    separate = dataclasses.replace(own, test_from="test")
    recipe = finetune_stage_recipe(cfg, separate)
    assert recipe.keep_best and recipe.eval_every == 20  # 10 evaluations of 8 images: far below a tenth of 200 steps
    assert not finetune_stage_recipe(dataclasses.replace(cfg, keep_weights="last"), separate).keep_best
    big = dataclasses.replace(separate, val=make_synthetic(img_size=16, num_classes=4, n_train=8, n_val=4000).val)
    assert not finetune_stage_recipe(cfg, big).keep_best  # 2 evaluations of 4,000 images would cost > 10% of 200 steps


@pytest.mark.parametrize(
    "steps, batch, images, n",
    [(1500, 32, 397, 10), (200, 32, 4000, 0), (200, 32, 960, 2), (20, 8, 8, 6), (1000, 32, 50_000, 0), (1, 32, 8, 0)],
)
def test_the_evaluations_cost_at_most_a_tenth_of_the_training(steps, batch, images, n):
    """``min(10, floor(0.1 * 3 * batch * steps / images))``: a forward of an image is a third of a training one."""
    assert evaluations(steps, batch, images) == n


def test_a_build_ships_the_best_evaluations_weights_and_says_so(tmp_path, monkeypatch):
    """A folder with its own test split; the fine-tune's validation scores are made to fall after its first
    evaluation, so the build must ship step 3's weights: the manifest, the log and the model card say so, and
    the test accuracy it records is that model's (read back from the written folder)."""
    import sys

    from factory.core.checkpoint import load_descendant
    from factory.data import load_dataset
    from factory.device.profile import load_profile
    from factory.pipeline.build import build

    from .test_build import _profile
    from .test_client_fidelity import _folder

    real = tr.evaluate

    def falling(model, data, **kwargs):  # the trainer's validation passes only; the test split is real
        if sys._getframe(1).f_code.co_name != "step_fn":
            return real(model, data, **kwargs)
        falling.calls += 1
        return 1.0 - 0.01 * falling.calls

    falling.calls = 0
    monkeypatch.setattr(tr, "evaluate", falling)
    data = _folder(tmp_path / "data")
    cfg = BuildConfig(data=str(data), finetune_steps=20, batch_size=8, init="weight_selection", objective="capacity")
    lines: list[str] = []
    manifest = build([load_profile(_profile(tmp_path, "dev", 0.2))], tmp_path / "out", cfg, log=lines.append)
    dev = manifest["devices"][0]
    # 8 validation images, 20 steps of 8: 6 evaluations fit a tenth of the training, every 3 steps and the last
    assert dev["finetune"]["config"]["keep_best"] and dev["finetune"]["config"]["eval_every"] == 3
    assert dev["finetune"]["kept_step"] == 3 and falling.calls == 7 and dev["accuracy"]["val"] == pytest.approx(0.99)
    assert any("kept the weights of step 3 of 20" in line for line in lines), lines
    card = (tmp_path / "out" / "dev" / "MODEL_CARD.md").read_text()
    assert "shipped: the weights of step 3, the best of its evaluations on the validation split" in card
    model = load_descendant(tmp_path / "out" / "dev" / "model.safetensors")
    ds = load_dataset(str(data), dev["shape"]["img_size"], 1)
    assert real(model, ds.test) == pytest.approx(dev["accuracy"]["test"])


def test_the_train_command_keeps_the_best_where_the_data_has_a_test_split_and_guards_the_users_file(
    tmp_path, demo_file
):
    import json

    from .helpers import cli_run, one_line_exit_2

    def evaluated(out):
        return [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "val_acc" in r]

    from .test_client_fidelity import _folder

    data = _folder(tmp_path / "data")  # 8 validation images: 6 evaluations of 20 steps of 8 fit a tenth
    args = ["train", "--model", demo_file, "--data", data, "--steps", "20", "--batch-size", "8", "--amp", "off"]
    assert cli_run(*args, "--out", tmp_path / "best").exit_code == 0
    assert evaluated(tmp_path / "best") == [3, 6, 9, 12, 15, 18, 20] and (tmp_path / "best" / BEST_FILE).is_file()
    assert cli_run(*args, "--keep-weights", "last", "--out", tmp_path / "last").exit_code == 0
    assert evaluated(tmp_path / "last") == [20] and not (tmp_path / "last" / BEST_FILE).exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / BEST_FILE).write_bytes(b"the user's")
    one_line_exit_2(cli_run(*args, "--out", mine), "was not written by peg-factory")
    assert (mine / BEST_FILE).read_bytes() == b"the user's"
