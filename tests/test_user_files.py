"""A command replaces only what it wrote and writes nowhere outside its output folder; an interrupted or
failed write leaves nothing half-written; a build folder's models are checked before they are re-exported."""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from factory.device.profile import load_profile
from factory.errors import FactoryError
from factory.io import OWNED_FILE, directory_lock, owned_directory
from factory.pipeline.build import build
from factory.pipeline.config import BuildConfig

from .helpers import build_cmd as _build_cmd
from .helpers import cli_run as _cli
from .helpers import leftovers as _leftovers
from .helpers import one_line_exit_2 as _one_line_exit_2
from .test_build import _profile

CFG = BuildConfig(data="synthetic", finetune_steps=4, batch_size=16)


def test_full_disk_is_one_line_and_leaves_nothing_half_written(tmp_path):
    prof, out = _profile(tmp_path, "tiny"), tmp_path / "out"

    def small_files():  # a file-size limit fails writes the way a full disk does, without needing a small disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))

    done = subprocess.run(_build_cmd(prof, out, 2), capture_output=True, text=True, timeout=300, preexec_fn=small_files)
    assert done.returncode == 2, done.stdout + done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and "File too large" in errors[0] and "Traceback" not in done.stderr, done.stderr
    assert _leftovers(out) == [] and not (out / "manifest.json").exists()
    assert not list(out.glob(".cache/*/*/done.json"))  # nothing is marked complete
    shutil.rmtree(out)


def test_export_into_a_build_directory_waits_for_no_build(tmp_path, monkeypatch):
    from factory.io import directory_lock

    out = tmp_path / "out"
    build([load_profile(_profile(tmp_path, "tiny"))], out, CFG, log=lambda *_: None)
    monkeypatch.chdir(out)
    script = (
        f"import fcntl, time; fh = open({str(out / '.peg-factory.lock')!r}, 'a+'); fcntl.flock(fh, fcntl.LOCK_EX); "
        "print('locked', flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        _one_line_exit_2(_cli("export", "--format", "onnx"), "is in use by another build")
    finally:
        holder.kill()
        holder.wait()
    with directory_lock(out):
        pass  # free again
    assert _cli("export", "--format", "onnx").exit_code == 0


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


# -- issue 34, 1-4: a command deletes or replaces only files it recorded writing, each record inside its folder --


def test_learngene_train_refuses_a_work_dir_holding_the_users_files(tmp_path):
    lg = tmp_path / "lg"
    assert _cli("learngene", "--out", lg, "--layers", "2", "--heads", "3").exit_code == 0
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    args = ["learngene", "train", "--learngene", lg, "--data", "digits", "--steps", "1", "--batch-size", "4"]
    res = _cli(*args, "--out", tmp_path / "trained", "--work-dir", mine)
    _one_line_exit_2(res, "holds files peg-factory did not make")
    assert (mine / "thesis.tex").read_text() == "years of work"
    partial = tmp_path / "trained.partial"  # the default work dir, when it is the user's folder
    partial.mkdir()
    (partial / "notes.txt").write_text("mine")
    _one_line_exit_2(_cli(*args, "--out", tmp_path / "trained"), "holds files peg-factory did not make")
    assert (partial / "notes.txt").read_text() == "mine"
    partial.joinpath("notes.txt").unlink()  # empty: adopted, and removed with what the run put there
    res = _cli(*args, "--out", tmp_path / "trained")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "trained" / "learngene.json").is_file() and not partial.exists()


def test_a_work_dir_a_peer_rank_just_marked_is_adopted_not_refused(tmp_path, monkeypatch):
    """Under torchrun every rank makes the work folder at once: a rank that looked for the mark just before a peer
    wrote it must not take the peer's fresh mark for a file of the user's (a race that exited rank 1 with 2)."""
    from factory.io import publish

    work = tmp_path / "w.partial"
    work.mkdir()
    real_iterdir = Path.iterdir

    def peer_marks_first(self):  # the peer's mark appears between this rank's look and its listing
        (work / publish.WORK_MARK).touch()
        return real_iterdir(self)

    monkeypatch.setattr(Path, "iterdir", peer_marks_first)
    assert publish.work_directory(work) == work
    monkeypatch.setattr(Path, "iterdir", real_iterdir)
    (work / "notes.txt").write_text("mine")
    (work / publish.WORK_MARK).unlink()
    with pytest.raises(publish.FactoryError, match="holds files peg-factory did not make"):
        publish.work_directory(work)


@pytest.mark.parametrize("entry", ["../outside.txt", "OUTSIDE_ABS"])
def test_a_forged_record_cannot_make_a_command_delete_outside_its_folder(tmp_path, entry):
    from factory.io import OWNED_FILE, owned_directory, owned_files

    outside = tmp_path / "outside.txt"
    outside.write_text("not yours")
    kit = tmp_path / "kit"
    kit.mkdir()
    name = str(outside) if entry == "OUTSIDE_ABS" else entry
    (kit / OWNED_FILE).write_text(json.dumps({"files": {name: "calibrate", "a.txt": "calibrate"}}))
    link = kit / "via"
    link.symlink_to(tmp_path)  # a link out of the folder is no way out either
    (kit / OWNED_FILE).write_text(json.dumps({"files": {name: "calibrate", "via/outside.txt": "calibrate"}}))
    assert owned_files(kit) == {}
    with owned_directory(kit, writer="calibrate") as tmp:
        (tmp / "b.txt").write_text("new")
    assert outside.read_text() == "not yours" and (kit / "b.txt").is_file()


def test_train_out_keeps_the_users_model_metrics_and_checkpoint(tmp_path, demo_file):
    out = tmp_path / "run"
    (out / "checkpoint").mkdir(parents=True)
    (out / "checkpoint" / "mine.txt").write_text("mine")
    (out / "model.safetensors").write_bytes(b"my model")
    args = ["train", "--model", demo_file, "--data", "digits", "--steps", "1", "--batch-size", "4", "--out", out]
    _one_line_exit_2(_cli(*args), "was not written by peg-factory")
    assert (out / "model.safetensors").read_bytes() == b"my model" and (out / "checkpoint" / "mine.txt").is_file()
    (out / "model.safetensors").unlink()
    _one_line_exit_2(_cli(*args), "checkpoint exists and was not written by peg-factory")
    (out / "checkpoint" / "mine.txt").unlink()
    (out / "checkpoint").rmdir()
    assert _cli(*args).exit_code == 0
    assert _cli(*args).exit_code == 0  # its own files: replaced on a rerun


def test_build_out_keeps_the_users_manifest_and_reports(tmp_path):
    from .test_build import _profile

    out = tmp_path / "out"
    out.mkdir()
    for name in ("manifest.json", "report.md"):
        (out / name).write_text("the user's")
    res = _cli("build", "--profile", _profile(tmp_path, "tiny"), "--out", out, "--data", "synthetic", "--steps", "1")
    _one_line_exit_2(res, "was not written by peg-factory")
    assert (out / "manifest.json").read_text() == "the user's" and not (out / "tiny").exists()


def test_re_export_in_a_build_folder_uses_the_builds_data_and_keeps_the_manifest_true(built, tmp_path, monkeypatch):
    """Issue 34, 9: class names "0".."n", null mean/std and a stale onnx sha256 after re-exporting in a build."""
    import shutil

    import onnx

    from factory.io import sha256_file

    build = tmp_path / "b"
    shutil.copytree(built, build)
    monkeypatch.chdir(build)
    res = _cli("export", "--format", "onnx")
    assert res.exit_code == 0, res.output
    manifest = json.loads((build / "manifest.json").read_text())
    dev = manifest["devices"][0]
    onnx_path = build / dev["artifacts"]["onnx"]["path"]
    assert dev["artifacts"]["onnx"]["sha256"] == sha256_file(onnx_path)
    meta = {p.key: p.value for p in onnx.load(str(onnx_path), load_external_data=False).metadata_props}
    assert json.loads(meta["peg_factory.class_names"]) == manifest["data"]["classes"]
    assert json.loads(meta["peg_factory.preprocessing"])["mean"] is not None


def test_a_model_trained_on_other_data_is_not_scored_on_digits(tmp_path):
    """Issue 34, 9: a 1-channel 10-class model trained on a folder was calibrated and scored on digits."""
    from export.api import _data_for
    from factory.core.ancestry import DEMO_ARCH

    assert _data_for(DEMO_ARCH, None, trained_on="folder:/data/mine:28:1") is None
    assert _data_for(DEMO_ARCH, None, trained_on="sklearn-digits:28") is not None
    assert _data_for(DEMO_ARCH, None, trained_on=None) is not None  # no provenance recorded: the demo's default
