"""Failures mid-run -- a diverged loss, a damaged cache entry or checkpoint, Ctrl-C -- stop cleanly and a rerun
resumes or rebuilds instead of failing forever."""

import fcntl
import json
import signal
import subprocess
import time

import pytest
import torch

from factory.device.profile import load_profile
from factory.errors import FactoryError
from factory.pipeline.build import build
from factory.pipeline.config import BuildConfig
from factory.training.checkpoints import resume_or_restart

from .helpers import build_cmd as _build_cmd
from .helpers import leftovers as _leftovers
from .test_build import _profile

CFG = BuildConfig(data="synthetic", finetune_steps=4, batch_size=16)


def test_diverged_training_stops_with_one_line(tmp_path):
    from factory.data import ImageTensors
    from factory.training.train import TrainConfig, train

    from .helpers import make_vit

    x = torch.randn(8, 3, 32, 32)
    x[0] = float("nan")
    with pytest.raises(FactoryError, match="training diverged"):
        train(
            make_vit(),
            ImageTensors(x, torch.arange(8) % 10, [str(i) for i in range(10)]),
            TrainConfig(steps=3, batch_size=8, warmup_steps=0, shift=0),
            progress=False,
        )


def test_damaged_cache_entries_are_rebuilt_not_trusted(tmp_path):
    prof = load_profile(_profile(tmp_path, "tiny"))
    out = tmp_path / "out"
    first = build([prof], out, CFG, log=lambda *_: None)
    model = next(out.glob(".cache/finetune/*/model.safetensors"))
    good = model.read_bytes()
    model.write_bytes(good[: len(good) // 2])  # truncated, as by a full disk or a killed copy
    (out / "manifest.json").unlink()
    lines = []
    second = build([prof], out, CFG, log=lines.append)
    assert any("finetune cache entry" in line and "damaged" in line for line in lines), lines
    assert model.read_bytes() == good  # rebuilt, bit-identical (deterministic per seed)
    assert second["devices"][0]["artifacts"]["model"]["sha256"] == first["devices"][0]["artifacts"]["model"]["sha256"]


def test_damaged_checkpoint_starts_over_instead_of_failing_forever(tmp_path):
    from factory.io import seal

    work = tmp_path / "w.partial"
    (work / "checkpoint").mkdir(parents=True)
    (work / "checkpoint" / "state.json").write_text("{}")
    seal(work / "checkpoint", {"step": 1})
    assert resume_or_restart(work, "x", lambda *_: None)
    (work / "checkpoint" / "state.json").write_text("{ truncated")
    (work / "notes.txt").write_text("not the run's")  # only the damaged checkpoint goes (issue 34's rule)
    assert not resume_or_restart(work, "x", lambda *_: None) and not (work / "checkpoint").exists()
    assert (work / "notes.txt").read_text() == "not the run's"


def test_ctrl_c_stops_within_seconds_and_cleans_up(tmp_path):
    prof, out = _profile(tmp_path, "tiny"), tmp_path / "out"
    # a background CI job may run us with SIGINT ignored, which children inherit: give the build the default
    # capacity: straight to the fine-tune (the accuracy objective would first probe for 12% of 100k steps)
    proc = subprocess.Popen(
        _build_cmd(prof, out, 100_000, "--objective", "capacity"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 240
    while not list(out.glob(".cache/finetune/*.partial/metrics.jsonl")):
        if time.time() > deadline or proc.poll() is not None:
            proc.kill()
            pytest.fail("fine-tuning never started")
        time.sleep(0.1)
    time.sleep(0.5)
    t0 = time.perf_counter()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 130, err
    assert elapsed < 5, elapsed  # the fine-tune stops at its next step; the rest is interpreter teardown
    assert "Interrupted: stopped cleanly" in err and "Traceback" not in err, err
    assert _leftovers(out) == []
    state = json.loads(next(out.glob(".cache/finetune/*.partial/checkpoint/state.json")).read_text())
    assert state["step"] > 0  # the steps done are kept for the rerun
    with open(out / ".peg-factory.lock") as fh:  # the lock was released
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_a_killed_writers_temporaries_are_swept_by_the_next_run(tmp_path):
    """Issue 34, 23: SIGKILL left `.NAME.xxxx.tmp` beside --out and `.peg-factory-tmp-*` inside it for good; the next
    run removes those of dead writers of this host, never a live writer's or another host's."""
    import subprocess

    from factory.io import owned_directory
    from factory.io.atomic import owner_tag

    gone = subprocess.Popen(["true"])
    gone.wait()
    host = owner_tag().rsplit("-", 1)[0]
    out = tmp_path / "out"
    out.mkdir()
    stale_inside = out / f".peg-factory-tmp-{host}-{gone.pid}-abc"
    stale_beside = tmp_path / f".out.{host}-{gone.pid}.xyz.tmp"
    other_host = out / f".peg-factory-tmp-pf-elsewhere-{gone.pid}-q"
    for d in (stale_inside, stale_beside, other_host):
        d.mkdir()
        (d / "half.onnx").write_bytes(b"x" * 1000)
    with owned_directory(out, writer="export") as tmp:
        (tmp / "model.onnx").write_text("new")
    assert not stale_inside.exists() and other_host.exists()
    from factory.io import atomic_directory

    with atomic_directory(out) as tmp:
        (tmp / "f").write_text("x")
    assert not stale_beside.exists()


def test_out_may_be_a_link_to_a_folder(tmp_path):
    """Issue 34, 24: --out as a symlink to a directory was refused for export and calibrate."""
    from factory.io import owned_directory

    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    with owned_directory(link, writer="export") as tmp:
        (tmp / "model.onnx").write_text("x")
    assert (real / "model.onnx").read_text() == "x" and link.is_symlink()


def test_a_resumed_builds_report_counts_the_earlier_runs_time(tmp_path):
    """Issue 34, 23: a resumed build's report said only the resumed run's time."""
    import json

    from factory.device.profile import load_profile
    from factory.pipeline.build import BuildConfig, build

    from .test_build import _profile

    prof = load_profile(_profile(tmp_path, "tiny"))
    cfg = BuildConfig(data="synthetic", finetune_steps=60, batch_size=16)  # a fine-tune longer than a cached rerun
    first = build([prof], tmp_path / "out", cfg, log=lambda *_: None)
    (tmp_path / "out" / "manifest.json").unlink()  # killed after its stages: the rerun finds them cached
    again = build([prof], tmp_path / "out", cfg, log=lambda *_: None)
    assert again["stage_seconds"] == first["stage_seconds"] >= first["devices"][0]["finetune"]["seconds"]
    assert again["seconds"] < again["stage_seconds"]  # the rerun itself was short ...
    report = (tmp_path / "out" / "report.md").read_text()
    assert "earlier runs of a resumed or cached build included" in report  # ... and the report says so
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["stage_seconds"] == again["stage_seconds"]
