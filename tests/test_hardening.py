"""Hostile and unlucky input: one line and exit 2 (or 130 for Ctrl-C), nothing half-written, no data loss."""

import fcntl
import json
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from factory.cli import cli
from factory.device.profile import load_profile, parse_profile
from factory.errors import FactoryError
from factory.pipeline.build import build
from factory.pipeline.config import BuildConfig
from factory.pipeline.fleet import load_fleet
from factory.training.train import resume_or_restart

from .test_build import _profile

SHIPPED = Path(__file__).resolve().parent.parent / "profiles" / "demo" / "jetson_orin.yaml"


def _cli(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _one_line_exit_2(res, needle):
    assert res.exit_code == 2, res.output
    assert needle in res.output, res.output
    assert "Traceback" not in res.output
    assert len([line for line in res.output.splitlines() if line.startswith("Error")]) == 1


# -- profiles and fleet files -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, needle",
    [
        ("name: a\nhardware: " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
        (SHIPPED.read_text().replace("batch: 1", "batch: 1" + "0" * 5000), "unreadable value"),
        (SHIPPED.read_text().replace("batch: 1", "batch: 100000000000000"), "batch"),
        ("# " + "x" * (1 << 20) + "\n" + SHIPPED.read_text(), "more than a profile needs"),
    ],
)
def test_hostile_profiles_get_one_line(tmp_path, text, needle):
    with pytest.raises(FactoryError, match=needle):
        parse_profile(text, "p.yaml")
    path = tmp_path / "p.yaml"
    path.write_text(text)
    _one_line_exit_2(_cli("search", "--profile", path), needle)


def test_hostile_fleet_files_get_one_line(tmp_path):
    deep = tmp_path / "deep.yaml"
    deep.write_text("profiles: " + "[" * 5000 + "]" * 5000)
    with pytest.raises(FactoryError, match="nested too deeply"):
        load_fleet(deep)
    ints = tmp_path / "ints.yaml"
    ints.write_text("profiles: [1, 2]")
    with pytest.raises(FactoryError, match="a list of paths"):
        load_fleet(ints)


@pytest.mark.parametrize("latency", ["nan", "inf", "-1", "0"])
def test_non_finite_calibration_rows_are_refused(tmp_path, latency):
    (tmp_path / "cal.csv").write_text(
        f"depth,embed_dim,num_heads,mlp_ratio,img_size,patch_size,latency_ms\n4,96,2,4,28,4,{latency}\n"
    )
    prof = tmp_path / "p.yaml"
    prof.write_text(SHIPPED.read_text() + "calibration: cal.csv\n")
    _one_line_exit_2(_cli("search", "--profile", prof), "latency_ms must be a finite number > 0")


# -- data ------------------------------------------------------------------------------------------


def _folder(root: Path, classes=("a", "b"), n=3, size=8) -> Path:
    from PIL import Image

    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.new("L", (size, size), 40 * i).save(root / split / c / f"{i}.png")
    return root


def test_symlink_loop_in_data_is_refused_quickly(tmp_path):
    from factory.data import dataset_identity, load_dataset

    root = _folder(tmp_path / "data")
    (root / "train" / "a" / "loop").symlink_to("..")
    t0 = time.perf_counter()
    for fn in (lambda: load_dataset(str(root)), lambda: dataset_identity(str(root))):
        with pytest.raises(FactoryError, match="symlink loop"):
            fn()
    assert time.perf_counter() - t0 < 5
    # the same folder linked twice side by side is not a loop
    (root / "train" / "a" / "loop").unlink()
    (root / "train" / "c").symlink_to(root / "train" / "a")
    (root / "val" / "c").symlink_to(root / "val" / "a")
    assert load_dataset(str(root)).num_classes == 3


def test_one_class_data_is_refused(tmp_path):
    from factory.data import load_dataset

    with pytest.raises(FactoryError, match="at least 2"):
        load_dataset(str(_folder(tmp_path / "d", classes=("only",))))


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    from PIL import Image

    from factory.data import MAX_IMAGE_PIXELS, load_dataset

    root = _folder(tmp_path / "d")
    side = int(MAX_IMAGE_PIXELS**0.5) + 8  # over our limit, under PIL's own warning threshold
    Image.new("1", (side, side)).save(root / "train" / "a" / "bomb.png")
    assert (root / "train" / "a" / "bomb.png").stat().st_size < 2_000_000
    with pytest.raises(FactoryError, match=r"bomb.png is \d+x\d+ pixels"):
        load_dataset(str(root))


# -- checkpoints ------------------------------------------------------------------------------------


def test_nan_checkpoint_is_refused(tmp_path, vit):
    from safetensors.torch import save_file

    from factory.core.ancestry import load_ancestry

    state = {k: v.clone().contiguous() for k, v in vit.state_dict().items()}
    state["blocks.1.attn.qkv.weight"][0, 0] = float("nan")
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(FactoryError, match="'blocks.1.attn.qkv.weight' holds NaN"):
        load_ancestry(f"{tmp_path / 'bad.safetensors'}@vit_tiny_patch16_224")


def test_safetensors_header_claiming_a_terabyte_is_one_line(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [1 << 18, 1 << 20], "data_offsets": [0, 1 << 40]}}).encode()
    path = tmp_path / "huge.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(16))
    _one_line_exit_2(_cli("learngene", "--ancestry", path, "--out", tmp_path / "lg"), "cannot read checkpoint")
    assert not (tmp_path / "lg").exists()


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


# -- the build cache --------------------------------------------------------------------------------

CFG = BuildConfig(data="synthetic", finetune_steps=4, batch_size=16)


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
    assert not resume_or_restart(work, "x", lambda *_: None) and not work.exists()


# -- Ctrl-C and a full disk, as a user meets them: a real process ------------------------------------


def _build_cmd(prof, out, steps, *extra):
    return [
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
        str(steps),
        "--batch-size",
        "8",
        *extra,
    ]


def _leftovers(out: Path) -> list[str]:
    return [str(p) for p in out.rglob("*") if p.name.endswith((".tmp", ".old"))]


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
