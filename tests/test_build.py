import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from html.parser import HTMLParser

import jsonschema
import pytest
import yaml
from click.testing import CliRunner

from factory.cli import cli
from factory.device.profile import load_profile
from factory.pipeline.build import BuildConfig, build
from factory.pipeline.config import finetune_recipe

TINY = """name: {name}
hardware: {{kind: cpu, peak_tflops: {{fp32: 0.2}}, memory_bandwidth_gbs: 20, memory_mb: 512, runtime: onnxruntime,
           source: test}}
precision: fp32
batch: 1
budgets: {{params_m: {params}}}
export: [onnx]
"""


def _profile(tmp_path, name, params=0.2):
    path = tmp_path / f"{name}.yaml"
    path.write_text(TINY.format(name=name, params=params))
    return path


CFG = BuildConfig(data="synthetic", finetune_steps=4, batch_size=16)


def test_end_to_end_build_and_cache_hit(tmp_path):
    prof = load_profile(_profile(tmp_path, "tiny"))
    out = tmp_path / "out"
    t0 = time.perf_counter()
    manifest = build([prof], out, CFG, log=lambda *_: None)
    cold = time.perf_counter() - t0
    dev = manifest["devices"][0]
    assert dev["status"] == "ok" and dev["params"] <= 0.2e6
    assert dev["margins"]["params_m"] >= 0
    # the manifest records the TrainConfig that ran, not a copy of the build's settings
    assert dev["finetune"]["config"] == dataclasses.asdict(finetune_recipe(CFG))
    assert dev["finetune"]["steps"] == dev["finetune"]["config"]["steps"] == CFG.finetune_steps
    for name, art in dev["artifacts"].items():
        assert (out / art["path"]).exists(), name
    card = (out / "tiny" / "MODEL_CARD.md").read_text()
    assert card.startswith("---\n") and card.split("\n---\n", 1)[1].lstrip().startswith(
        "# tiny:"
    )  # HF front matter first
    schema = json.loads((out / "manifest.schema.json").read_text())
    jsonschema.validate(json.loads((out / "manifest.json").read_text()), schema)
    perf = yaml.safe_load((out / dev["perf_card"]).read_text())  # the performance card, beside the model card
    assert perf["ships"] == dev["deploy"]["format"] and perf["artifacts"][perf["ships"]]["ships"]
    assert perf["verdicts"]["params_m"]["within"] and "Performance card" in (out / "report.md").read_text()
    lines = []
    t0 = time.perf_counter()
    again = build([prof], out, CFG, log=lines.append)
    warm = time.perf_counter() - t0
    assert any("build is up to date" in line for line in lines)
    assert again == manifest
    assert warm < 0.2 * cold
    # without the manifest (a build killed after its last stage), every stage is a cache hit
    (out / "manifest.json").unlink()
    lines.clear()
    rebuilt = build([prof], out, CFG, log=lines.append)
    assert any(line.startswith("learngene: cached") for line in lines)
    assert any("finetune" in line and "cached" in line for line in lines)
    assert any("export cached" in line for line in lines)
    assert rebuilt["devices"][0]["accuracy"] == dev["accuracy"]
    # a changed recipe is not a cache hit
    lines.clear()
    build([prof], out, BuildConfig(data="synthetic", finetune_steps=5, batch_size=16), log=lines.append)
    assert any(line.startswith("learngene: cached") for line in lines)
    assert not any("finetune" in line and "cached" in line for line in lines)


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])


def test_fleet_shares_the_learngene_and_a_failing_profile_keeps_the_others(tmp_path):
    _profile(tmp_path, "a", 0.2)
    _profile(tmp_path, "b", 0.2)  # same budget: same shape, one shared fine-tuned model
    _profile(tmp_path, "impossible", 0.00001)
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text("profiles: [a.yaml, b.yaml, impossible.yaml]\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(
        cli,
        ["build", "--fleet", str(fleet), "--out", str(out), "--data", "synthetic", "--steps", "3", "--batch-size", "8"],
    )
    assert result.exit_code == 2, result.output
    assert "1 of 3 profiles failed: impossible: profile impossible: no shape fits" in result.output
    assert result.output.count("learngene: the shipped demo learngene") == 1
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["learngene"]["sampled_once_for"] == ["a", "b", "impossible"]
    a, b, c = manifest["devices"]
    assert a["status"] == b["status"] == "ok" and c["status"] == "failed" and "relax budgets.params_m" in c["error"]
    assert a["finetune"]["cache_key"] == b["finetune"]["cache_key"]
    assert a["learngene_sha256"] == b["learngene_sha256"] == manifest["learngene"]["sha256"]
    assert (out / "a" / "export" / "model.onnx").is_file() and (out / "b" / "export" / "model.onnx").is_file()
    jsonschema.validate(manifest, json.loads((out / "manifest.schema.json").read_text()))
    parser = _Images()
    parser.feed((out / "report.html").read_text())
    assert parser.images and parser.images[0].startswith("data:image/png;base64,")
    assert len(parser.images[0]) > 2000
    assert "| impossible | FAILED |" in (out / "report.md").read_text()


def test_resume_after_a_killed_build(tmp_path):
    prof = _profile(tmp_path, "tiny", 0.2)
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "factory.cli",
        "build",
        "--profile",
        str(prof),
        "--out",
        str(out),
        "--data",
        "synthetic",
        "--steps",
        "400",
        "--batch-size",
        "8",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline:
        if list(out.glob(".cache/finetune/*.partial/checkpoint/state.json")):
            break
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("no fine-tuning checkpoint appeared")
    os.killpg(proc.pid, signal.SIGKILL)  # mid-fine-tune, like a lost machine
    proc.wait()
    assert not (out / "manifest.json").exists()
    state = json.loads(next(out.glob(".cache/finetune/*.partial/checkpoint/state.json")).read_text())
    assert 0 < state["step"] < 400
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "learngene: cached" in done.stdout and "resuming from its last checkpoint" in done.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["devices"][0]["status"] == "ok"


def test_dry_run_prints_the_plan_without_running(tmp_path):
    prof = _profile(tmp_path, "tiny", 0.2)
    out = tmp_path / "out"
    result = CliRunner().invoke(
        cli,
        [
            "build",
            "--profile",
            str(prof),
            "--out",
            str(out),
            "--data",
            "synthetic",
            "--dry-run",
            "--objective",
            "accuracy",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "learngene: the shipped demo learngene" in result.output and "finetune will run (~" in result.output
    assert (
        "accuracy estimate of up to 8 Pareto candidates by successive halving (rungs 3/6/12 steps, 48 steps in all) will run"
        in result.output
    )  # and its time
    assert not out.exists()
    other = CliRunner().invoke(
        cli,
        [
            "build",
            "--profile",
            str(prof),
            "--out",
            str(out),
            "--data",
            "synthetic",
            "--dry-run",
            "--expand-steps",
            "50",
            "--expand-min-steps",  # 50 steps count as trained (else --init auto skips a phase that short)
            "1",
            "--objective",
            "capacity",
        ],
    )
    assert "learngene: will be sampled and trained for 50 expanding-phase steps" in other.output
    assert "accuracy estimate" not in other.output and not out.exists()


def test_build_bad_input(tmp_path):
    def run(*args):
        return CliRunner().invoke(cli, ["build", *map(str, args)])

    r = run()
    assert r.exit_code == 2 and "no profile" in r.output
    r = run("--profile", tmp_path / "missing.yaml")
    assert r.exit_code == 2 and "not found" in r.output
    r = run("--fleet", tmp_path / "missing.yaml")
    assert r.exit_code == 2 and "fleet" in r.output
    r = run("--profile", _profile(tmp_path, "t"), "--ancestry", "no-such-model", "--out", tmp_path / "o")
    assert r.exit_code == 2 and "neither 'demo'" in r.output
    r = run("--profile", _profile(tmp_path, "t"), "--data", tmp_path / "nodata", "--out", tmp_path / "o")
    assert r.exit_code == 2 and "unknown dataset" in r.output
    assert not (tmp_path / "o").exists()


def test_a_second_build_into_the_same_out_fails_fast_or_waits(tmp_path):
    import threading

    from factory.errors import FactoryError
    from factory.io import directory_lock

    prof = load_profile(_profile(tmp_path, "tiny"))
    out = tmp_path / "out"
    cfg = BuildConfig(data="synthetic", finetune_steps=2, batch_size=8, objective="capacity")
    with directory_lock(out):
        with pytest.raises(FactoryError, match=r"is in use by another build \(pid \d+\).*--wait-lock"):
            build([prof], out, cfg, log=lambda *_: None)
        assert not (out / "manifest.json").exists()
    released = threading.Event()

    def hold():
        with directory_lock(out):
            started.set()
            time.sleep(1.0)
            released.set()

    started = threading.Event()
    t = threading.Thread(target=hold)
    t.start()
    started.wait()
    lines = []
    manifest = build([prof], out, cfg, log=lines.append, wait_lock=True)
    t.join()
    assert released.is_set() and lines[0].startswith("waiting for the build holding")
    assert manifest["devices"][0]["status"] == "ok"


def test_paths_from_a_manifest_or_profile_stay_inside_out(tmp_path):
    from factory.errors import FactoryError
    from factory.io import confined

    out = tmp_path / "out"
    out.mkdir()
    assert confined(out, "dev/model.safetensors") == (out / "dev" / "model.safetensors").resolve()
    (out / "link").symlink_to(tmp_path)
    for bad in ("../victim", "/etc/passwd", ".", "", "a/../../x", "link/escaped"):
        with pytest.raises(FactoryError, match="points outside"):
            confined(out, bad, "device name")


def test_export_refuses_a_manifest_path_outside_the_build(tmp_path, monkeypatch):
    out = tmp_path / "b"
    out.mkdir()
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("mine")
    manifest = {
        "format_version": 1,
        "devices": [
            {
                "name": "d",
                "status": "ok",
                "profile": "host",
                "artifacts": {"model": {"path": "../victim/model.safetensors"}},
            }
        ],
    }
    (out / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.chdir(out)
    res = CliRunner().invoke(cli, ["export", "--format", "onnx"])
    assert res.exit_code == 2 and "points outside" in res.output, res.output
    assert (victim / "keep.txt").read_text() == "mine" and sorted(p.name for p in victim.iterdir()) == ["keep.txt"]


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--gene-layers", "0"], "'--gene-layers': 0 is not in the range"),
        (["--lr", "inf"], "'--lr': inf is not in the range"),
        (["--lr", "nan"], "--lr: invalid build setting: learning rate nan: it must be a finite number > 0"),
        (["--steps", "0"], "'--steps': 0 is not in the range"),
        (["--jobs", "0"], "'--jobs': 0 is not in the range"),
        (["--expand-steps", "-1"], "'--expand-steps': -1 is not in the range"),
        (["--batch-size", str(10**30)], "'--batch-size'"),
        (["--seed", str(2**64)], "'--seed'"),
    ],
)
def test_build_refuses_settings_it_would_silently_misuse(tmp_path, flags, needle):
    res = CliRunner().invoke(
        cli,
        [
            "build",
            "--profile",
            str(_profile(tmp_path, "t")),
            "--out",
            str(tmp_path / "o"),
            "--data",
            "synthetic",
            *flags,
        ],
    )
    assert res.exit_code == 2 and needle in res.output, res.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "field, value, needle",
    [
        ("gene_layers", 0, "gene layers"),
        ("lr", float("inf"), "learning rate"),
        ("finetune_steps", 0, "fine-tuning steps"),
        ("jobs", 0, "jobs"),
        ("expand_steps", -1, "expand steps"),
        ("objective", "size", "objective"),
    ],
)
def test_build_config_refuses_what_the_api_would_misuse(field, value, needle):
    from factory.errors import FactoryError

    with pytest.raises(FactoryError, match=f"invalid build setting: {needle}"):
        BuildConfig(**{field: value})


def test_infinite_budgets_are_refused(tmp_path):
    from factory.errors import FactoryError

    path = tmp_path / "inf.yaml"
    path.write_text(TINY.format(name="inf", params=".inf"))
    with pytest.raises(FactoryError, match=r"budgets.params_m: .*finite"):
        load_profile(path)


def test_a_build_hashes_loads_and_counts_once(tmp_path, monkeypatch):
    """The ancestry is hashed once per build, the data set loaded once, and FLOPs counted once per shape (by
    the measure stage): shape tasks and exports reuse them."""
    import factory.core.assets as assets
    import factory.core.flops as flops
    import factory.data as data
    import factory.pipeline.build as build_module
    import factory.pipeline.shape_task as shape_task

    calls = {"hash": 0, "load": 0, "flops": 0}

    def counting(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapped

    hashed = counting("hash", assets.ancestry_fingerprint)
    monkeypatch.setattr(build_module, "ancestry_fingerprint", hashed)
    monkeypatch.setattr(shape_task, "ancestry_fingerprint", hashed)
    monkeypatch.setattr(data, "load_dataset", counting("load", data.load_dataset))
    monkeypatch.setattr(flops, "count_flops", counting("flops", flops.count_flops))
    import export.api

    monkeypatch.setattr(export.api, "count_flops", counting("flops", flops.count_flops))
    shape_task._load.cache_clear()
    profiles = [load_profile(_profile(tmp_path, "a", 0.2)), load_profile(_profile(tmp_path, "b", 0.1))]
    manifest = build(profiles, tmp_path / "out", CFG, log=lambda *_: None)
    shapes = {json.dumps(d["shape"], sort_keys=True) for d in manifest["devices"]}
    assert all(d["status"] == "ok" for d in manifest["devices"]) and len(shapes) == 2
    assert calls == {"hash": 1, "load": 1, "flops": 2}, calls


def test_dry_run_walks_the_stage_table_and_counts_a_shared_shape_once(tmp_path):
    from factory.pipeline.stages import STAGES

    profiles = [load_profile(_profile(tmp_path, "a", 0.2)), load_profile(_profile(tmp_path, "b", 0.2))]
    lines = []
    plan = build(profiles, tmp_path / "out", CFG, dry_run=True, log=lines.append)
    # the table's stages in order, between the setup this dry run measured and the devices' assembly
    assert [row["stage"] for row in plan["stages"]] == ["setup", *(spec.name for spec in STAGES), "assemble"]
    rows = {row["stage"]: row for row in plan["stages"]}
    assert rows["setup"]["estimate_s"] > 0 and rows["assemble"]["items"] == 2
    assert rows["finetune"]["items"] == rows["finetune"]["will_run"] == 1  # one shape, two devices
    assert rows["export"]["items"] == rows["export"]["will_run"] == 2
    assert rows["learngene"]["will_run"] == 0 and plan["learngene_source"] == "shipped"
    assert plan["total_estimate_s"] == pytest.approx(sum(row["estimate_s"] for row in plan["stages"]), abs=0.2)
    assert any(line.startswith("plan: total ~") for line in lines) and not (tmp_path / "out").exists()


def test_the_build_runs_its_stages_in_the_tables_order(tmp_path):
    """The dry run walks STAGES (above); the build runs them in the same order: fleet-scoped first, then per shape,
    then per device."""
    from factory.pipeline.stages import STAGES

    lines = []
    build([load_profile(_profile(tmp_path, "a", 0.2))], tmp_path / "out", CFG, log=lines.append)
    marks = {"learngene": "learngene:", "init": "init ", "finetune": "finetune ", "export": "a: onnx:"}
    first = {name: next(i for i, line in enumerate(lines) if line.startswith(mark)) for name, mark in marks.items()}
    order = [spec.name for spec in STAGES if spec.name in first]
    assert sorted(order, key=first.get) == order, (first, lines)
    scopes = [spec.scope for spec in STAGES]
    assert scopes == sorted(scopes, key=["fleet", "shape", "device"].index)
