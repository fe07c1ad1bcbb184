"""The Ray executor on a real local Ray instance (2 CPUs): same manifest as local threads, and a
killed task is retried and resumes from its checkpoint."""

import os
import signal
import threading
import time

import pytest
from click.testing import CliRunner

from factory.cli import cli
from factory.device.profile import load_profile
from factory.errors import FactoryError
from factory.pipeline.build import BuildConfig, build
from factory.pipeline.executor import LocalExecutor, RayExecutor, available_cpus, make_executor

from .test_build import _profile

# local threads with one intra-op thread per fine-tune, like 1-CPU Ray tasks, on any machine size
ONE_THREAD_EACH = LocalExecutor(jobs=available_cpus())

ray = pytest.importorskip(
    "ray", reason="the Ray executor needs the ray extra: pip install 'peg-factory[ray]' (CI installs it)"
)


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    yield
    ray.shutdown()


def _fleet(tmp_path):
    # three profiles, two distinct shapes: the two loose budgets pick the same shape
    return [load_profile(_profile(tmp_path, name, params)) for name, params in (("a", 0.2), ("b", 0.2), ("c", 0.05))]


def _hashes(manifest):
    return [
        (d["name"], d["shape"], d["artifacts"]["model"]["sha256"], d["artifacts"]["onnx"]["sha256"])
        for d in manifest["devices"]
    ]


def test_ray_fleet_matches_local_threads(cluster, tmp_path):
    cfg = BuildConfig(data="synthetic", finetune_steps=6, batch_size=8)
    profiles = _fleet(tmp_path)
    lines = []
    on_ray = build(profiles, tmp_path / "ray", cfg, executor=RayExecutor(), log=lines.append)
    local = build(profiles, tmp_path / "local", cfg, executor=ONE_THREAD_EACH, log=lambda *_: None)
    assert [d["status"] for d in on_ray["devices"]] == ["ok"] * 3
    assert on_ray["executor"]["kind"] == "ray" and local["executor"]["threads_per_finetune"] == 1
    assert _hashes(on_ray) == _hashes(local)  # same shapes, same model and ONNX bytes
    assert on_ray["devices"][0]["shape"] == on_ray["devices"][1]["shape"] != on_ray["devices"][2]["shape"]
    assert len(list((tmp_path / "ray" / ".cache" / "finetune").iterdir())) == 2  # shapes deduplicated
    assert len(list((tmp_path / "ray" / ".cache" / "learngene").iterdir())) == 1  # learngene once
    assert (tmp_path / "ray" / "report.md").is_file() and (tmp_path / "ray" / "a" / "MODEL_CARD.md").is_file()


def _kill_first_shape_task(out, killed):
    import psutil

    deadline = time.time() + 120
    while time.time() < deadline and not killed:
        if list(out.glob(".cache/finetune/*.partial/checkpoint/done.json")):
            for proc in psutil.process_iter(["pid", "cmdline"]):
                if "ray::_ray_task" in " ".join(proc.info["cmdline"] or []):
                    os.kill(proc.info["pid"], signal.SIGKILL)  # like a lost node: no cleanup, no exception
                    killed.append(proc.info["pid"])
                    return
        time.sleep(0.05)


def test_a_killed_ray_task_is_retried_and_resumes(cluster, tmp_path):
    cfg = BuildConfig(data="synthetic", finetune_steps=300, batch_size=8)
    profiles = _fleet(tmp_path)[:1]
    killed: list[int] = []
    watcher = threading.Thread(target=_kill_first_shape_task, args=(tmp_path / "ray", killed))
    watcher.start()
    lines = []
    manifest = build(profiles, tmp_path / "ray", cfg, executor=RayExecutor(), log=lines.append)
    watcher.join()
    assert killed, "the fine-tune finished before a checkpoint could be killed"
    assert manifest["devices"][0]["status"] == "ok", manifest["devices"][0]
    uninterrupted = build(profiles, tmp_path / "local", cfg, executor=ONE_THREAD_EACH, log=lambda *_: None)
    assert _hashes(manifest) == _hashes(uninterrupted)  # the retry resumed bit-exactly from the checkpoint


def test_cli_ray_executor_and_its_errors(cluster, tmp_path, monkeypatch):
    prof = _profile(tmp_path, "a", 0.2)
    res = CliRunner().invoke(
        cli,
        [
            "build",
            "--profile",
            str(prof),
            "--out",
            str(tmp_path / "o"),
            "--data",
            "synthetic",
            "--steps",
            "2",
            "--executor",
            "ray",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "a: " in res.output and (tmp_path / "o" / "manifest.json").is_file()
    res = CliRunner().invoke(
        cli, ["build", "--profile", str(prof), "--out", str(tmp_path / "p"), "--ray-address", "auto"]
    )
    assert res.exit_code == 2 and "need --executor ray" in res.output
    monkeypatch.setitem(__import__("sys").modules, "ray", None)  # as if the extra were not installed
    with pytest.raises(FactoryError, match=r"pip install 'peg-factory\[ray\]'"):
        make_executor("ray")
