"""Training on several processes equals one process at the same global batch (factory.training.distributed):
two gloo CPU processes under torchrun against one, for fine-tuning and for the expanding phase."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from factory.errors import FactoryError

from .helpers import cli_run, one_line_exit_2, small_descendant

#: |loss(2 processes) - loss(1 process)| per step: float32 reduction order only (gloo all-reduce vs one sum).
LOSS_TOLERANCE = 2e-4


def _run(args, cwd, *, world: int = 1, env=None):
    prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"]
    cmd = [*(prefix if world > 1 else [sys.executable]), "-m", "factory.cli", *map(str, args)]
    clean = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR")}
    return subprocess.run(
        cmd, cwd=cwd, capture_output=True, text=True, timeout=300, env={**clean, "OMP_NUM_THREADS": "1", **(env or {})}
    )


def _losses(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    return small_descendant(tmp_path_factory.mktemp("model") / "d2.safetensors", 48, 2)


def test_two_processes_fine_tune_as_one_at_the_global_batch(tmp_path, small_model):
    common = ["train", "--model", small_model, "--data", "digits", "--steps", 5, "--batch-size", 16, "--amp", "off"]
    common += ["--warmup-steps", 1, "--ckpt-every", 0]
    one = _run([*common, "--out", tmp_path / "one"], tmp_path)
    two = _run([*common, "--out", tmp_path / "two"], tmp_path, world=2)
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("trained ") == 1 and "on 2 processes" in two.stdout  # one result line, from rank 0
    assert "global batch 16 (8 per process)" in two.stdout
    a, b = _losses(tmp_path / "one" / "metrics.jsonl"), _losses(tmp_path / "two" / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4, 5]  # one line per step
    for ra, rb in zip(a, b):
        assert abs(ra["loss"] - rb["loss"]) <= LOSS_TOLERANCE, (ra, rb)
        assert rb["world_size"] == 2 and rb["global_batch"] == 16 and "world_size" not in ra
    from safetensors.torch import load_file

    wa, wb = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-3


def test_each_rank_gets_the_augmentation_its_slice_has_in_the_global_batch():
    from factory.data import ImageTensors
    from factory.training.batches import step_batch

    data = ImageTensors(torch.randn(40, 1, 12, 12), torch.arange(40) % 4, ["a", "b", "c", "d"])
    whole = step_batch(data, 8, 3, seed=1, shift=2)
    halves = [step_batch(data, 8, 3, seed=1, shift=2, rank=r, world=2) for r in (0, 1)]
    assert torch.equal(torch.cat([h[0] for h in halves]), whole[0])
    assert torch.equal(torch.cat([h[1] for h in halves]), whole[1])


def test_two_processes_run_the_expanding_phase_as_one(tmp_path):
    lg = tmp_path / "lg"
    assert cli_run("learngene", "--ancestry", "demo", "--out", lg).exit_code == 0
    common = ["learngene", "train", "--learngene", lg, "--data", "digits", "--steps", 3, "--batch-size", 8]
    common += ["--depths", "1,2", "--widths", "96"]  # a small sandwich: the reduction, not the shapes, is tested
    common += ["--amp", "off"]
    one = _run([*common, "--out", tmp_path / "one"], tmp_path)
    two = _run([*common, "--out", tmp_path / "two"], tmp_path, world=2)
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count(f"learngene {tmp_path / 'two'}:") == 1 and "on 2 processes" in two.stdout
    a = [json.loads(x) for x in (tmp_path / "one" / "expanding_log.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "two" / "expanding_log.jsonl").read_text().splitlines()]
    assert len(a) == len(b) == 3
    for ra, rb in zip(a, b):
        assert abs(ra["loss"] - rb["loss"]) <= LOSS_TOLERANCE * max(1.0, ra["loss"]), (ra, rb)


@pytest.mark.parametrize("batch, needle", [(15, "not divisible by the 2 processes"), (1, "smaller than the 2")])
def test_a_batch_the_processes_cannot_split_is_one_line_before_anyone_waits(tmp_path, small_model, batch, needle):
    env = {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:  # no peer ever comes: a hang here would time the test out
        res = cli_run(
            "train",
            "--model",
            small_model,
            "--data",
            "digits",
            "--steps",
            2,
            "--batch-size",
            batch,
            "--out",
            tmp_path / "r",
        )
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    one_line_exit_2(res, needle)
    assert "--batch-size" in res.output and not (tmp_path / "r").exists()


def test_a_resume_on_another_number_of_processes_is_refused(tmp_path):
    from factory.training.checkpoints import open_checkpoint, save_checkpoint
    from factory.training.train import TrainConfig

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    save_checkpoint(tmp_path / "checkpoint", model, opt, 4, TrainConfig(), world=1)
    assert open_checkpoint(tmp_path, True, model, opt, "training", world=1)[1] == 4
    with pytest.raises(FactoryError, match=r"written by 1 process\(es\), this run has 2.*--nproc_per_node 1") as err:
        open_checkpoint(tmp_path, True, model, opt, "training", world=2)
    assert err.value.param == "resume"


def test_under_torchrun_a_bad_input_is_said_once_not_once_per_rank(tmp_path, small_model):
    """Every rank refuses the same input in the same check; rank 0's line says it for both, each rank exits 2."""
    args = ["train", "--model", small_model, "--data", "digits", "--steps", 2, "--batch-size", 15]
    res = _run([*args, "--out", tmp_path / "r"], tmp_path, world=2)
    assert res.returncode != 0
    lines = [line for line in res.stderr.splitlines() if line.startswith("Error: ")]
    assert len(lines) == 1 and "not divisible by the 2 processes" in lines[0], res.stderr[-2000:]
    assert not (tmp_path / "r").exists()
    args = ["train", "--model", small_model, "--steps", 4, "--warmup-steps", 9, "--out", tmp_path / "w"]
    res = _run(args, tmp_path, env={"RANK": "1"})
    assert res.returncode == 2 and res.stderr == "" and res.stdout == ""  # a rank other than 0: silent, exit 2
