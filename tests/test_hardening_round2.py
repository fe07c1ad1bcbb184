"""Hardening, round two: no folder of the user's is replaced, no write outside --out, no hang, no traceback."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from factory.cli import cli
from factory.errors import FactoryError
from factory.io import OWNED_FILE, directory_lock, owned_directory

from .test_build import _profile
from .test_hardening import _cli, _one_line_exit_2

# -- owned_directory: the user's files are never replaced ----------------------------------------------------


def test_owned_directory_keeps_user_files_and_replaces_only_its_own(tmp_path):
    out = tmp_path / "d"
    with owned_directory(out) as tmp:
        (tmp / "a.txt").write_text("1")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.txt").write_text("1")
    assert json.loads((out / OWNED_FILE).read_text())["files"] == {"a.txt": "peg-factory", "sub/b.txt": "peg-factory"}
    (out / "mine.txt").write_text("user")
    (out / "sub" / "notes.txt").write_text("user")
    with owned_directory(out) as tmp:
        (tmp / "a.txt").write_text("2")  # ours: replaced; sub/b.txt ours and not written again: removed
    assert (out / "a.txt").read_text() == "2" and not (out / "sub" / "b.txt").exists()
    assert (out / "mine.txt").read_text() == "user" and (out / "sub" / "notes.txt").read_text() == "user"
    with pytest.raises(FactoryError, match="mine.txt exists and was not written by peg-factory"):
        with owned_directory(out) as tmp:
            (tmp / "mine.txt").write_text("ours?")
    assert (out / "mine.txt").read_text() == "user" and (out / "a.txt").read_text() == "2"  # nothing changed
    assert not [p for p in out.iterdir() if p.name.startswith(".peg-factory-tmp")]


def test_owned_directory_can_publish_into_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.txt").write_text("user")
    with owned_directory(Path(".")) as tmp:
        (tmp / "x.txt").write_text("1")
    assert (tmp_path / "x.txt").read_text() == "1" and (tmp_path / "keep.txt").read_text() == "user"
    assert not [p for p in tmp_path.parent.iterdir() if p.name.startswith(f".{tmp_path.name}")]  # nothing beside it


def test_owned_directory_refuses_a_link_in_the_way(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    out = tmp_path / "d"
    out.mkdir()
    (out / "sub").symlink_to(outside)
    with pytest.raises(FactoryError, match="in the way"):
        with owned_directory(out) as tmp:
            (tmp / "sub").mkdir()
            (tmp / "sub" / "f.txt").write_text("x")
    assert list(outside.iterdir()) == []


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("built")
    prof = _profile(root, "tiny")
    out = root / "out"
    res = CliRunner().invoke(
        cli,
        [
            "build",
            "--profile",
            str(prof),
            "--out",
            str(out),
            "--data",
            "synthetic",
            "--steps",
            "2",
            "--batch-size",
            "8",
        ],
    )
    assert res.exit_code == 0, res.output
    return out


def test_export_into_the_models_own_folder_keeps_the_model_and_the_users_files(built, tmp_path):
    import shutil

    d = tmp_path / "D"
    shutil.copytree(built / "tiny", d)
    (d / "notes.md").write_text("mine")
    res = _cli("export", "--model", d / "model.safetensors", "--out", d, "--format", "onnx")
    assert res.exit_code == 0, res.output
    assert (
        (d / "model.safetensors").is_file() and (d / "notes.md").read_text() == "mine" and (d / "model.onnx").is_file()
    )
    again = _cli(
        "export", "--model", d / "model.safetensors", "--out", d, "--format", "onnx"
    )  # its own files: replaced
    assert again.exit_code == 0, again.output


def test_export_into_dot_writes_only_its_files(built, tmp_path, monkeypatch):
    import shutil

    shutil.copy(built / "tiny" / "model.safetensors", tmp_path / "m.safetensors")
    (tmp_path / "keep.txt").write_text("mine")
    monkeypatch.chdir(tmp_path)
    res = _cli("export", "--model", "m.safetensors", "--out", ".", "--format", "onnx")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "keep.txt").read_text() == "mine" and (tmp_path / "model.onnx").is_file()
    assert not [
        p for p in tmp_path.parent.iterdir() if p.name.startswith(f".{tmp_path.name}")
    ]  # no ..xxxx.old beside it


def test_calibrate_into_a_folder_with_user_files_keeps_them(tmp_path):
    kit = tmp_path / "kit"
    kit.mkdir()
    (kit / "mine.txt").write_text("user")
    res = _cli("calibrate", "--profile", "host", "--shapes", "3", "--out", kit)
    assert res.exit_code == 0, res.output
    assert (kit / "mine.txt").read_text() == "user" and (kit / "measure.py").is_file()
    (tmp_path / "k2").mkdir()
    (tmp_path / "k2" / "README.md").write_text("my readme")
    _one_line_exit_2(
        _cli("calibrate", "--profile", "host", "--shapes", "3", "--out", tmp_path / "k2"),
        "README.md exists and was not written by peg-factory",
    )
    assert (tmp_path / "k2" / "README.md").read_text() == "my readme" and sorted(os.listdir(tmp_path / "k2")) == [
        "README.md"
    ]


def test_a_rebuild_keeps_a_user_file_in_a_device_folder(built):
    (built / "tiny" / "deploy-notes.txt").write_text("mine")
    (built / "manifest.json").unlink()
    res = _cli(
        "build",
        "--profile",
        built.parent / "tiny.yaml",
        "--out",
        built,
        "--data",
        "synthetic",
        "--steps",
        "2",
        "--batch-size",
        "8",
    )
    assert res.exit_code == 0, res.output
    assert (built / "tiny" / "deploy-notes.txt").read_text() == "mine"


# -- the lock ---------------------------------------------------------------------------------------------------


def test_a_lock_that_is_a_link_is_not_followed(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    out = tmp_path / "out"
    out.mkdir()
    (out / ".peg-factory.lock").symlink_to(victim)
    with pytest.raises(FactoryError, match="cannot be opened as a regular file"):
        with directory_lock(out):
            pass
    assert victim.read_text() == "keep"
    (out / ".peg-factory.lock").unlink()
    (out / ".peg-factory.lock").mkdir()
    _one_line_exit_2(
        _cli("build", "--profile", _profile(tmp_path, "t"), "--out", out, "--data", "synthetic"),
        "cannot be opened as a regular file",
    )


# -- Ray: checked up front, one line, nothing in --out ------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--ray-address", "127.0.0.1:1"], "Connection refused"),
        (["--ray-address", "ray://127.0.0.1:1"], "Connection refused"),
        (["--ray-address", "nonsense"], "is not 'auto', HOST:PORT or ray://HOST:PORT"),
    ],
)
def test_ray_addresses_are_checked_before_anything_is_written(tmp_path, flags, needle):
    pytest.importorskip(
        "ray", reason="the Ray executor needs the ray extra: pip install 'peg-factory[ray]' (CI installs it)"
    )
    t0 = time.perf_counter()
    res = _cli(
        "build",
        "--profile",
        _profile(tmp_path, "t"),
        "--out",
        tmp_path / "o",
        "--data",
        "synthetic",
        "--executor",
        "ray",
        *flags,
    )
    _one_line_exit_2(res, needle)
    assert time.perf_counter() - t0 < 30 and not (tmp_path / "o").exists()


def test_ray_tasks_no_node_can_run_are_refused_up_front():
    ray = pytest.importorskip(
        "ray", reason="the Ray executor needs the ray extra: pip install 'peg-factory[ray]' (CI installs it)"
    )
    from factory.pipeline.executor import RayExecutor

    class Cluster:  # what ray.nodes() reports for a 2-CPU machine without a GPU
        @staticmethod
        def nodes():
            return [
                {"Alive": True, "Resources": {"CPU": 2.0}},
                {"Alive": False, "Resources": {"CPU": 64.0, "GPU": 8.0}},
            ]

    with pytest.raises(FactoryError, match="task_cpus: 1024: no Ray node has that many CPUs"):
        RayExecutor(task_cpus=1024).check_resources(Cluster)
    with pytest.raises(FactoryError, match="task_gpus: 1: no Ray node has that many GPUs"):
        RayExecutor(task_gpus=1).check_resources(Cluster)
    RayExecutor(task_cpus=2).check_resources(Cluster)
    assert ray is not None


# -- export trusts nothing it can check ------------------------------------------------------------------------


def test_export_refuses_a_changed_or_swapped_model(built, tmp_path, monkeypatch):
    import shutil

    out = tmp_path / "b"
    shutil.copytree(built, out)
    model = out / "tiny" / "model.safetensors"
    data = bytearray(model.read_bytes())
    data[-5] ^= 0xFF  # one flipped bit pattern in the last tensor
    model.write_bytes(bytes(data))
    monkeypatch.chdir(out)
    _one_line_exit_2(_cli("export", "--format", "onnx"), "is not the model the build made")


def test_export_in_a_build_folder_works_from_any_directory(built, tmp_path, monkeypatch):
    import shutil

    out = tmp_path / "b"
    shutil.copytree(built, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["devices"][0]["profile"] = "relative/to/nowhere.yaml"  # what a relative --profile looks like elsewhere
    (out / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.chdir(out)
    res = _cli("export", "--format", "onnx")
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize(
    "devices, needle",
    [
        ([1], "devices[0] is not a device entry"),
        ([{"name": "d", "status": "ok"}], "names no model artifact"),
        ("x", "no devices list"),
    ],
)
def test_malformed_manifests_are_one_line(tmp_path, monkeypatch, devices, needle):
    (tmp_path / "manifest.json").write_text(json.dumps({"devices": devices}))
    monkeypatch.chdir(tmp_path)
    _one_line_exit_2(_cli("export", "--format", "onnx"), needle)


# -- latency tables: sealed and validated --------------------------------------------------------------------------


def _tables_profile(tmp_path, data):
    from .test_latency_kernels import _host_profile

    (tmp_path / "tables.json").write_text(json.dumps(data) if not isinstance(data, str) else data)
    return _host_profile(tmp_path, "latency_tables: tables.json\n").path


def _saved_tables(tmp_path):
    from .test_latency_kernels import _power_law_tables

    _power_law_tables().save(tmp_path / "good.json")
    return json.loads((tmp_path / "good.json").read_text())


def _resealed(data):
    from factory.device.tables import _digest

    data = {k: v for k, v in data.items() if k != "sha256"}
    return {**data, "sha256": _digest(data)}


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda d: d.update(empty_ms=-1.0), "changed since measured"),  # hand-edited: the seal no longer matches
        (lambda d: d.pop("sha256"), "unsealed"),
    ],
)
def test_hand_edited_tables_are_refused(tmp_path, edit, needle):
    data = _saved_tables(tmp_path)
    edit(data)
    _one_line_exit_2(_cli("search", "--profile", _tables_profile(tmp_path, data)), needle)


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda d: d["tables"]["linear"]["ms"].pop(), "linear.ms must have"),
        (lambda d: d["tables"]["add"]["axes"][0].reverse(), "strictly ascending"),
        (lambda d: d["tables"]["layernorm"].update(ms="fast"), "layernorm.ms must have"),
        (lambda d: d.update(tables=[1, 2]), "tables must be a dict"),
        (lambda d: d["terms"].update({"0": [1.0, 0.0, 0.0]}), "batch '0' must be an integer >= 1"),
        (lambda d: d.update(empty_ms=float("nan")), "empty_ms must be finite"),
        (lambda d: d["arch"].update(patch_size=14), "measured for patch_size 14"),
    ],
)
def test_malformed_tables_are_one_line_even_when_resealed(tmp_path, edit, needle):
    data = _saved_tables(tmp_path)
    edit(data)
    res = _cli("search", "--profile", _tables_profile(tmp_path, json.dumps(_resealed(data))))
    _one_line_exit_2(res, needle)
    assert "relax" not in res.output  # never "relax ... to at least nan"


# -- calibration CSVs ---------------------------------------------------------------------------------------------

HEADER = "depth,embed_dim,num_heads,mlp_ratio,img_size,patch_size,num_classes,batch,runtime,latency_ms\n"


def _calibrated(tmp_path, body: bytes | str, profile="demo/raspberry_pi5"):
    from factory.device.profile import load_profile

    csv = tmp_path / "cal.csv"
    csv.write_bytes(body if isinstance(body, bytes) else body.encode())
    prof = tmp_path / "p.yaml"
    prof.write_text(open(load_profile(profile).path).read() + "calibration: cal.csv\n")
    return prof


@pytest.mark.parametrize(
    "body, needle",
    [
        (HEADER + "4,96,2,4,28,7,10,1,openvino,0.5\n", "measured with openvino, but the profile runs onnxruntime"),
        (HEADER + "99999999,96,2,4,28,7,10,1,onnxruntime,0.5\n", "depth 99999999 is outside 1..4096"),
        (HEADER.encode() + b"4,96,2,4,28,7,10,1,onnxruntime,\xff\xfe\n", "not UTF-8 text"),
        (HEADER + "4,96,2,4,28,7,10,1,onnxruntime," + "9" * 140_000 + "\n", "not a CSV file"),
        (HEADER, "no rows"),
    ],
)
def test_bad_calibration_csvs_are_one_line(tmp_path, body, needle):
    _one_line_exit_2(_cli("search", "--profile", _calibrated(tmp_path, body)), needle)


def test_a_calibration_json_tags_untagged_rows(tmp_path):
    prof = _calibrated(
        tmp_path,
        HEADER.replace("runtime,", "") + "4,96,2,4,28,7,10,1,0.5\n6,192,3,4,28,7,10,1,1.5\n",
        "demo/jetson_orin",
    )
    (tmp_path / "cal.json").write_text(json.dumps({"runtime": "openvino"}))
    _one_line_exit_2(_cli("search", "--profile", prof), "measured with openvino, but the profile runs tensorrt")


# -- fleet files, profiles measure ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, needle",
    [
        ("profiles: [a.yaml]\nprofiles: [b.yaml]\n", "appears twice"),
        ("profiles: [a.yaml]\nextra: 1\n", "unknown key 'extra'"),
    ],
)
def test_fleet_files_refuse_unknown_and_repeated_keys(tmp_path, text, needle):
    (tmp_path / "fleet.yaml").write_text(text)
    _one_line_exit_2(_cli("build", "--fleet", tmp_path / "fleet.yaml", "--out", tmp_path / "o"), needle)
    assert not (tmp_path / "o").exists()


def test_profiles_refuse_a_repeated_key(tmp_path):
    from factory.device.profile import load_profile

    path = tmp_path / "p.yaml"
    path.write_text(open(load_profile("demo/raspberry_pi5").path).read() + "batch: 4\n")
    _one_line_exit_2(_cli("profiles", "show", path), "key 'batch' appears twice")


def test_profiles_measure_refuses_a_directory_before_measuring(tmp_path):
    t0 = time.perf_counter()
    _one_line_exit_2(_cli("profiles", "measure", "--out", tmp_path), "is a directory")
    assert time.perf_counter() - t0 < 10


# -- the kit's scripts: usage errors (2) apart from failed checks (1) ----------------------------------------------


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    kit = tmp_path_factory.mktemp("kit") / "kit"
    res = CliRunner().invoke(cli, ["calibrate", "--profile", "demo/jetson_orin", "--shapes", "3", "--out", str(kit)])
    assert res.exit_code == 0, res.output
    return kit


def _run(script, *args, env=None, cwd=None):
    return subprocess.run(
        [sys.executable, str(script), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )


def test_measure_py_usage_errors_exit_2_in_one_line(kit, tmp_path):
    bare = {"PATH": str(tmp_path), "TRTEXEC": ""}  # no trtexec anywhere
    for args, env, needle in [
        ((), bare, "no trtexec found"),
        (("--repeats", "0"), None, "--repeats must be >= 1"),
        (("--repeats", "-5"), None, "--repeats must be >= 1"),
    ]:
        done = _run(kit / "measure.py", *args, env=env)
        assert done.returncode == 2 and needle in done.stderr and "Traceback" not in done.stderr, done.stderr
    import shutil

    empty = tmp_path / "empty"
    shutil.copytree(kit, empty)
    (empty / "shapes.csv").write_text((kit / "shapes.csv").read_text().splitlines()[0] + "\n")
    done = _run(empty / "measure.py", "--runtime", "onnxruntime")
    assert done.returncode == 2 and "lists no models" in done.stderr, done.stderr


def test_measure_py_a_bad_model_is_a_failed_measurement(kit, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(kit, broken)
    first = sorted(p for p in (broken / "models").glob("*.onnx") if not p.name.endswith(".fp16.onnx"))[
        0
    ]  # a timed model
    first.write_bytes(b"not an onnx model")
    done = _run(broken / "measure.py", "--runtime", "onnxruntime", "--repeats", "1")
    assert done.returncode == 1 and f"failed: models/{first.name}" in done.stderr and "Traceback" not in done.stderr, (
        done.stderr
    )
    assert not (broken / "calibration.csv").exists()


def test_check_engine_usage_errors_are_distinct_from_a_failed_check(tmp_path):
    import numpy as np

    script = Path(__file__).resolve().parents[1] / "export" / "templates" / "check_engine.py"
    done = _run(script, tmp_path / "missing.engine")
    assert done.returncode == 2 and "no engine at" in done.stderr
    (tmp_path / "m.engine").write_bytes(b"x")
    done = _run(script, tmp_path / "m.engine", "--reference", tmp_path / "missing.npz")
    assert done.returncode == 2 and "cannot read the reference" in done.stderr
    np.savez(tmp_path / "empty.npz", other=np.zeros(2))
    done = _run(script, tmp_path / "m.engine", "--reference", tmp_path / "empty.npz")
    assert done.returncode == 2 and "nothing to check" in done.stderr
    np.savez(tmp_path / "ref.npz", input_1=np.zeros((1, 1, 4, 4), np.float32), output_1=np.zeros((1, 2), np.float32))
    done = _run(script, tmp_path / "m.engine", "--reference", tmp_path / "ref.npz")
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        assert done.returncode == 2 and "tensorrt Python package is not installed" in done.stderr, done.stderr
    else:
        assert done.returncode == 1, done.stdout + done.stderr  # a garbage engine is a failed check


@pytest.mark.parametrize(
    "args",
    [
        ["expand", "--method", "scratch", "--depth", "2", "--embed-dim", "64", "--heads", "2"],
        ["train", "--model", "x.safetensors"],
        ["calibrate", "--profile", "host"],
        ["learngene", "train", "--learngene", "x"],
    ],
)
def test_a_required_out_is_required(args):
    _one_line_exit_2(_cli(*args), "Missing option '--out'")
