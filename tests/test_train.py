import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from factory import DescendantShape, FactoryError, sample_learngene
from factory.core.expanding_phase import ExpandingConfig, default_shapes
from factory.core.timm_vit import build_vit
from factory.data import make_synthetic
from factory.training.batches import augment, batch_indices
from factory.training.expanding_loop import train_learngene
from factory.training.train import TrainConfig, lr_at, train

from .helpers import make_vit

ARCH_SHAPE = DescendantShape(2, 32, 2, 2.0, 16, 4, 4)


def _tiny_model(seed=0):
    from factory.core.ancestry import DEMO_ARCH

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_vit(DEMO_ARCH, ARCH_SHAPE)


@pytest.fixture(scope="module")
def synthetic():
    return make_synthetic(img_size=16, num_classes=4, n_train=256, n_val=64)


def test_loss_decreases_on_the_synthetic_set(synthetic):
    model = _tiny_model()
    result = train(
        model,
        synthetic.train,
        TrainConfig(steps=60, batch_size=32, lr=3e-3, warmup_steps=5),
        val_data=synthetic.val,
        progress=False,
    )
    first = sum(h["loss"] for h in result.history[:5]) / 5
    last = sum(h["loss"] for h in result.history[-5:]) / 5
    assert last < 0.7 * first
    assert result.val_accuracy > 0.5  # 4 classes: chance is 0.25


def test_resume_is_bit_exact(synthetic, tmp_path):
    cfg = TrainConfig(steps=10, batch_size=16, lr=1e-3, warmup_steps=3, ckpt_every=5)
    straight = _tiny_model()
    train(straight, synthetic.train, cfg, progress=False)

    # run 5 of the 10 steps, stopping as a killed job would, then resume in a fresh model
    partial = _tiny_model()
    _train_first_steps(partial, synthetic, cfg, 5, tmp_path / "run")
    resumed = _tiny_model(seed=123)  # different init: everything must come from the checkpoint
    train(resumed, synthetic.train, cfg, out_dir=tmp_path / "run", resume=True, progress=False)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 11))


def _train_first_steps(model, synthetic, cfg, n, out):
    """Train ``cfg`` but stop after ``n`` steps, like a process killed after a checkpoint."""
    import factory.training.train as tr

    class Stop(Exception):
        pass

    original = tr.save_checkpoint

    def save_then_maybe_stop(directory, m, opt, step, c, **kwargs):
        original(directory, m, opt, step, c, **kwargs)
        if step >= n:
            raise Stop

    tr.save_checkpoint = save_then_maybe_stop
    try:
        with pytest.raises(Stop):
            train(model, synthetic.train, cfg, out_dir=out, progress=False)
    finally:
        tr.save_checkpoint = original
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == n


def test_schedule_and_batches_are_pure_functions():
    cfg = TrainConfig(steps=100, lr=1e-3, warmup_steps=10, min_lr=0.0)
    assert lr_at(0, cfg) == pytest.approx(1e-4) and lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(55, cfg) == pytest.approx(5e-4) and lr_at(100, cfg) == pytest.approx(0.0)
    a = batch_indices(10, 4, 2, seed=1)
    assert torch.equal(a, batch_indices(10, 4, 2, seed=1)) and len(a) == 4
    epoch = torch.cat([batch_indices(10, 5, s, seed=3) for s in range(2)])
    assert sorted(epoch.tolist()) == list(range(10))  # one epoch = a permutation
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    shifted = augment(x, 1, torch.Generator().manual_seed(0))
    assert shifted.shape == x.shape


def test_the_warm_up_ends_inside_the_run():
    """The default warm-up of 20 is at most half a short run; one asked for longer than the run is refused (the
    rate would never reach its peak), and on the command line before anything is loaded or written."""
    from factory.training.loop import warmup_for

    assert [warmup_for(n, None) for n in (0, 1, 10, 39, 40, 5000)] == [0, 0, 5, 19, 20, 20]
    assert warmup_for(10, 10) == 10 and warmup_for(10, 0) == 0
    cfg = TrainConfig(steps=10, lr=1e-3, warmup_steps=warmup_for(10, None), min_lr=0.0)
    assert max(lr_at(s, cfg) for s in range(10)) == pytest.approx(1e-3)  # the peak is reached
    with pytest.raises(FactoryError, match="warm-up of 11 steps is longer than the run of 10.*at most 10") as err:
        warmup_for(10, 11)
    assert err.value.param == "warmup_steps"


def test_distillation_needs_a_teacher_and_runs(synthetic):
    model = _tiny_model()
    with pytest.raises(FactoryError, match="needs a teacher"):
        train(model, synthetic.train, TrainConfig(steps=1, distill_alpha=0.5), progress=False)
    teacher = _tiny_model(seed=5)
    result = train(
        model, synthetic.train, TrainConfig(steps=3, batch_size=8, distill_alpha=0.5), teacher=teacher, progress=False
    )
    assert len(result.history) == 3


def test_ddp_two_processes_hold_identical_weights(tmp_path, synthetic):
    script = tmp_path / "ddp.py"
    script.write_text(
        textwrap.dedent(f"""
        import os, sys, torch
        sys.path.insert(0, {os.getcwd()!r})
        from factory.data import make_synthetic
        from factory.training.train import TrainConfig, train
        from tests.test_train import _tiny_model
        torch.set_num_threads(1)
        data = make_synthetic(img_size=16, num_classes=4, n_train=64, n_val=8)
        model = _tiny_model(seed=int(os.environ["RANK"]))  # DDP broadcasts rank 0's init
        train(model, data.train, TrainConfig(steps=3, batch_size=8, device="cpu"), progress=False)
        torch.save(model.state_dict(), {str(tmp_path)!r} + f"/rank{{os.environ['RANK']}}.pt")
        torch.distributed.destroy_process_group()
    """)
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517", str(script)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    a = torch.load(tmp_path / "rank0.pt")
    b = torch.load(tmp_path / "rank1.pt")
    init = _tiny_model(seed=0).state_dict()
    assert any(not torch.equal(a[k], init[k]) for k in a)  # it trained
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU: CUDA autocast (bf16, or fp16 with a GradScaler) runs only there",
)
def test_amp_training_step_on_cuda(synthetic):
    model = _tiny_model()
    result = train(
        model, synthetic.train, TrainConfig(steps=5, batch_size=16, device="cuda", amp="auto"), progress=False
    )
    assert all(h["loss"] == h["loss"] for h in result.history)


def test_expanding_phase_reduces_distillation_loss():
    teacher = make_vit(img_size=16, patch_size=4, num_classes=4)
    lg = sample_learngene(teacher, 2, 4)
    data = make_synthetic(img_size=16, num_classes=4, n_train=128, n_val=32, in_chans=3)
    shapes = default_shapes(lg, [1, 4, 6])
    from factory import load_ancestry

    trained, report = train_learngene(
        lg,
        load_ancestry(teacher),
        data.train,
        shapes,
        ExpandingConfig(steps=25, batch_size=32, lr=2e-3),
        eval_data=data.val,
        progress=False,
    )
    first = sum(h["loss"] for h in report["history"][:3]) / 3
    last = sum(h["loss"] for h in report["history"][-3:]) / 3
    assert last < 0.8 * first
    assert set(trained.depth_maps) == {1, 4, 6}
    assert set(report["zero_shot_before"]) == set(report["zero_shot_after"]) == {s.label() for s in shapes}
    assert not torch.equal(trained.genes["mlp.fc1.weight"], lg.genes["mlp.fc1.weight"])


@pytest.mark.parametrize(
    "kw, needle",
    [
        ({"lr": float("nan")}, "lr: learning rate must be a finite number > 0 (e.g. 1e-3), got nan"),
        ({"lr": 0.0}, "lr: learning rate must be"),
        ({"steps": -1}, "steps: steps must be >= 0, got -1"),
        ({"batch_size": 0}, "batch_size: batch size must be >= 1, got 0"),
    ],
)
def test_a_bad_recipe_names_the_field_at_fault(kw, needle):
    """One message named which of three fields was wrong; the CLI maps the field to its flag (--lr)."""
    with pytest.raises(FactoryError) as err:
        TrainConfig(**kw)
    assert str(err.value) == needle or str(err.value).startswith(needle)
