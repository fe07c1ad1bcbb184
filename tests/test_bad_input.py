"""Hostile and malformed input -- profiles, fleets, calibration rows and tables, data folders, checkpoints,
manifests, Ray settings -- gets one line naming what is wrong and exit 2, before anything is written."""

import json
import time
from pathlib import Path

import pytest

from factory.device.profile import load_profile, parse_profile
from factory.errors import FactoryError
from factory.pipeline.fleet import load_fleet

from .helpers import cli_run as _cli
from .helpers import image_folder as _folder
from .helpers import one_line_exit_2 as _one_line_exit_2
from .test_build import _profile

SHIPPED = Path(__file__).resolve().parent.parent / "profiles" / "demo" / "jetson_orin.yaml"


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


HEADER = "depth,embed_dim,num_heads,mlp_ratio,img_size,patch_size,num_classes,batch,runtime,latency_ms\n"


def _calibrated(tmp_path, body: bytes | str, profile="demo/raspberry_pi5"):

    csv = tmp_path / "cal.csv"
    csv.write_bytes(body if isinstance(body, bytes) else body.encode())
    prof = tmp_path / "p.yaml"
    prof.write_text(open(load_profile(profile).path).read() + "calibration: cal.csv\n")
    return prof


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

    path = tmp_path / "p.yaml"
    path.write_text(open(load_profile("demo/raspberry_pi5").path).read() + "batch: 4\n")
    _one_line_exit_2(_cli("profiles", "show", path), "key 'batch' appears twice")


def test_profiles_measure_refuses_a_directory_before_measuring(tmp_path):
    t0 = time.perf_counter()
    _one_line_exit_2(_cli("profiles", "measure", "--out", tmp_path), "is a directory")
    assert time.perf_counter() - t0 < 10


def test_profile_text_and_data_paths_land_in_markdown_inert(tmp_path):
    """Issue 34, 5: a profile's description and use and the data path are escaped in report.md and MODEL_CARD.md."""
    from .helpers import image_folder

    data = image_folder(tmp_path / "d`ata <img src=x onerror=alert(1)>", n=4, size=28)
    prof = tmp_path / "evil.yaml"
    prof.write_text(
        _profile(tmp_path, "evil").read_text()
        + 'description: "<script>alert(1)</script>\\n# Owned | col"\nuse: "*bold* [link](http://x) <b>"\n'
    )
    out = tmp_path / "out"
    res = _cli("build", "--profile", prof, "--out", out, "--data", data, "--steps", "1", "--init", "scratch")
    assert res.exit_code == 0, res.output
    import re

    for page in (out / "report.md", out / "evil" / "MODEL_CARD.md"):
        text = re.sub(r"`[^`\n]*`", "", page.read_text())  # inside a code span, "<img" is literal text
        assert "<script>" not in text and "<img" not in text and "<b>" not in text, page
        assert not any(line.startswith("# Owned") for line in text.splitlines()), page
        assert "](http://x)" not in text and "d`ata" not in text, page


@pytest.mark.parametrize("name", ["manifest.json", "report.html", "Report.md", "report_files"])
def test_a_profile_may_not_be_named_like_a_file_the_build_writes(tmp_path, name):
    """Issue 34, 13: refused when the profile is read, not after the build's work."""
    from factory.device.profile import RESERVED_NAMES
    from factory.pipeline.build import OUTPUT_FILES

    assert set(OUTPUT_FILES) <= set(RESERVED_NAMES)
    prof = tmp_path / "p.yaml"
    prof.write_text(_profile(tmp_path, "x").read_text().replace("name: x", f"name: {name}"))
    _one_line_exit_2(_cli("profiles", "show", prof), "is a file the build writes into --out")


@pytest.mark.parametrize(
    "env, needle",
    [
        (
            {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29512", "RANK": "0"},
            "does not run under torchrun",
        ),
        ({"WORLD_SIZE": "abc"}, "WORLD_SIZE='abc' is not an integer"),
        ({"WORLD_SIZE": "2", "RANK": "0"}, "MASTER_ADDR is not set"),
    ],
)
def test_a_torchrun_environment_is_one_line_not_a_hang(tmp_path, monkeypatch, env, needle):
    """Issue 34, 8 and 22: a build inside torchrun's variables refuses at once; malformed ones are one line."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    t0 = time.perf_counter()
    res = _cli("build", "--profile", _profile(tmp_path, "tiny"), "--out", tmp_path / "out", "--data", "synthetic")
    _one_line_exit_2(res, needle)
    assert time.perf_counter() - t0 < 30 and not (tmp_path / "out").exists()


def test_fifos_as_data_or_fleet_are_one_line_not_a_hang(tmp_path):
    """Issue 34, 6 and 7: PIL and the fleet reader would wait on a FIFO forever."""
    import os

    from .helpers import image_folder

    data = image_folder(tmp_path / "data", n=4, size=28)
    os.mkfifo(data / "train" / "a" / "pipe.png")
    t0 = time.perf_counter()
    res = _cli("build", "--profile", "demo/jetson_orin", "--data", data, "--out", tmp_path / "o", "--dry-run")
    _one_line_exit_2(res, "pipe.png is a FIFO, not a regular file")
    fleet = tmp_path / "fleet.yaml"
    os.mkfifo(fleet)
    _one_line_exit_2(_cli("build", "--fleet", fleet, "--dry-run"), "fleet.yaml is a FIFO, not a regular file")
    assert time.perf_counter() - t0 < 60


@pytest.mark.parametrize("text, needle", [("name: x\n? [a, b]\n: 1\n", "a key that is not a plain value")])
def test_yaml_complex_keys_are_one_line_and_merge_keys_work(tmp_path, text, needle):
    """Issue 34, 18 and 24."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    _one_line_exit_2(_cli("profiles", "show", bad), needle)
    merged = tmp_path / "merged.yaml"
    body = _profile(tmp_path, "m").read_text()
    merged.write_text(body.replace("hardware: {", "hardware: {<<: {memory_mb: 128}, ", 1))
    res = _cli("profiles", "show", merged)
    assert res.exit_code == 0 and "unreadable YAML" not in res.output, res.output


def test_train_with_no_step_to_run_reports_instead_of_failing(tmp_path, demo_file):
    """Issue 34, 19: --steps 0 (and a resume of a finished run) ended in NoneType.__format__."""
    res = _cli("train", "--model", demo_file, "--data", "digits", "--steps", "0", "--out", tmp_path / "run")
    assert res.exit_code == 0 and "not measured (no step ran)" in res.output, res.output


def test_the_devices_own_memory_caps_the_search(tmp_path):
    """Issue 34, 11: hardware.memory_mb was never enforced (1 MB picked a shape predicted at 20.8 MB)."""
    prof = tmp_path / "small.yaml"
    prof.write_text(_profile(tmp_path, "small").read_text().replace("memory_mb: 512", "memory_mb: 1"))
    res = _cli("search", "--profile", prof)
    _one_line_exit_2(res, "no shape fits the budgets")
    assert "memory_mb" in res.output and "hardware.memory_mb" in res.output


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m["ancestry"].update(spec="someone-else"),  # issue 34, 12: a block outside the tensors' hash
        lambda m: m.pop("depth_maps"),  # issue 34, 20: hand-edited keys were KeyErrors and reshape errors
        lambda m: m.update(num_heads=7),
    ],
)
def test_an_edited_learngene_json_is_refused_in_one_line(tmp_path, edit):
    import json

    from factory.core.demo import load_demo_learngene
    from factory.core.learngene import Learngene

    load_demo_learngene().save(tmp_path / "lg")
    meta_path = tmp_path / "lg" / "learngene.json"
    meta = json.loads(meta_path.read_text())
    meta.setdefault("ancestry", {})
    edit(meta)
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(FactoryError, match="was edited or damaged since it was written"):
        Learngene.load(tmp_path / "lg")
    _one_line_exit_2(
        _cli("expand", "--learngene", tmp_path / "lg", "--depth", "3", "--out", tmp_path / "d.safetensors"),
        "was edited or damaged",
    )


@pytest.mark.parametrize("test_classes, needle", [(("a", "c"), "missing b; extra c"), (("a", "b", "z"), "extra z")])
def test_test_class_folders_must_be_the_training_ones(tmp_path, test_classes, needle):
    """Issue 34, 10: test/{a,c} beside train/{a,b} scored c as b (0.75 reported); an extra test/z was a traceback."""
    import re

    from factory.data import load_dataset

    from .helpers import image_folder

    data = image_folder(tmp_path / "data", n=3, size=28)
    image_folder(tmp_path / "t", classes=test_classes, n=3, size=28)
    (tmp_path / "t" / "train").rename(data / "test")
    with pytest.raises(FactoryError, match=re.escape(f"train ({needle})")):
        load_dataset(str(data), img_size=28, in_chans=1)


def test_a_builtin_name_that_is_also_a_folder_here_is_ambiguous(tmp_path, monkeypatch):
    """Issue 34, 14: --data digits silently meant the built-in set when ./digits was the user's folder."""
    from factory.data import dataset_identity, load_dataset

    from .helpers import image_folder

    monkeypatch.chdir(tmp_path)
    image_folder(tmp_path / "digits", n=3, size=28)
    with pytest.raises(FactoryError, match="both a built-in set and a folder here; pass ./digits"):
        dataset_identity("digits", 28, 1)
    assert load_dataset("./digits", 28, 1).num_classes == 2
    assert load_dataset("builtin:digits", 28, 1).num_classes == 10


def test_a_flops_budget_is_per_image_whatever_the_batch(tmp_path):
    """Issue 34, 15: a batch-32 profile's flops_g was read per batch (the H100 got the fleet's smallest model)."""
    from factory.core.ancestry import DEMO_ARCH
    from factory.device.resolve import latency_model_for
    from factory.device.search import SearchSpace, search

    prof = tmp_path / "batched.yaml"
    prof.write_text(
        _profile(tmp_path, "batched")
        .read_text()
        .replace("batch: 1", "batch: 32")
        .replace("{params_m: 0.2}", "{flops_g: 0.2}")
    )
    profile = load_profile(prof)
    best = search(
        profile, SearchSpace.from_arch(DEMO_ARCH), latency_model_for(profile, arch=DEMO_ARCH)
    ).require_feasible()
    assert 0.2 / 32 < best.flops_g <= 0.2  # per image: a model near 0.2 GFLOPs, not one under 0.2 / 32


def test_a_disk_full_checkpoint_and_a_name_too_long_are_one_line(tmp_path, demo_file, monkeypatch):
    """Issue 34, 16 and 17: safetensors' own error type for a failed write, and ENAMETOOLONG, were tracebacks."""
    import safetensors.torch

    def full(*args, **kwargs):
        raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    args = ["train", "--model", demo_file, "--data", "digits", "--steps", "2", "--batch-size", "4"]
    _one_line_exit_2(_cli(*args, "--out", tmp_path / "run"), "No space left on device")
    monkeypatch.undo()
    _one_line_exit_2(_cli("learngene", "--out", tmp_path / ("x" * 300), "--layers", "2"), "file name is too long")


@pytest.mark.parametrize(
    "size, needle", [("65535", "must be a multiple"), ("28000", "larger than the ancestry's input")]
)
def test_a_huge_distillation_size_is_refused_before_allocating(tmp_path, size, needle):
    """Issue 34, 21: --expand-img-size 65534 --dry-run tried to allocate 67 GB."""
    res = _cli(
        "build",
        "--profile",
        "demo/jetson_orin",
        "--expand-steps",
        "5",
        "--expand-img-size",
        size,
        "--dry-run",
        "--out",
        tmp_path / "o",
    )
    _one_line_exit_2(res, f"--expand-img-size: {size}")
    assert needle in res.output


def test_a_learngene_larger_than_its_ancestry_is_refused_before_anything_runs(tmp_path):
    """`learngene --layers 999` from the 6-layer demo wrote a 999-layer "learngene"; `build --gene-layers 9` got as
    far as the transfer check. Both refuse in one line naming the flag and the most they may give."""
    from factory import load_ancestry, sample_learngene

    anc = load_ancestry("demo")
    assert sample_learngene(anc, anc.arch.depth, seed=0).num_layers == anc.arch.depth  # as deep as it: allowed
    with pytest.raises(FactoryError, match=r"layers 7 exceed the ancestry's 6:.* give at most 6") as err:
        sample_learngene(anc, 7, seed=0)
    assert err.value.param == "layers"
    _one_line_exit_2(_cli("learngene", "--layers", "999", "--out", tmp_path / "lg"), "--layers: learngene layers 999")
    assert not (tmp_path / "lg").exists()
    res = _cli("build", "--profile", "demo/jetson_orin", "--gene-layers", "9", "--dry-run", "--out", tmp_path / "o")
    _one_line_exit_2(res, "--gene-layers: learngene layers 9 exceed the ancestry's 6")
    assert "transfer" not in res.output
    _one_line_exit_2(_cli("learngene", "--heads", "4", "--out", tmp_path / "lg"), "--heads: learngene heads 4 exceed")
    from factory.device.profile import load_profile
    from factory.pipeline.build import BuildConfig, build

    with pytest.raises(FactoryError, match="learngene heads 9 exceed the ancestry's 3") as err:  # the API's gene_heads
        build([load_profile("demo/jetson_orin")], tmp_path / "o", BuildConfig(gene_heads=9), dry_run=True)
    assert err.value.param == "gene_heads" and not [
        p for p in tmp_path.rglob("*") if p.suffix != ".lock" and p.is_file()
    ]


def test_a_dry_run_in_which_a_device_cannot_be_built_exits_2_as_the_build_would(tmp_path):
    """A dry run said 'FAILS at search' and exited 0, so `--dry-run && build` ran a build that exits 2."""
    res = _cli(
        "build",
        *("--profile", _profile(tmp_path, "fits"), "--profile", _profile(tmp_path, "none", 1e-6)),
        *("--data", "synthetic", "--dry-run", "--out", tmp_path / "o"),
    )
    _one_line_exit_2(res, "1 of 2 profiles would fail: none: profile none: no shape fits the budgets")
    assert "fits: shape" in res.output and not (tmp_path / "o").exists()  # the other device's plan still printed


def test_a_dry_run_refuses_an_out_the_build_could_not_write(tmp_path):
    """A dry run into a file, or into a folder holding the user's own manifest.json, planned and exited 0; the
    build then refused. Both refuse now, in the build's words, and change nothing."""
    args = ("build", "--profile", _profile(tmp_path, "fits"), "--data", "synthetic", "--dry-run", "--out")
    (tmp_path / "model.bin").write_bytes(b"mine")
    _one_line_exit_2(
        _cli(*args, tmp_path / "model.bin"), "model.bin exists and is not a directory; choose another --out"
    )
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "manifest.json").write_text("{}")
    _one_line_exit_2(_cli(*args, tmp_path / "o"), "manifest.json exists and was not written by peg-factory")
    assert (tmp_path / "model.bin").read_bytes() == b"mine" and [p.name for p in (tmp_path / "o").iterdir()] == [
        "manifest.json"
    ]


def test_export_on_data_of_other_classes_names_data_and_writes_nothing(tmp_path):
    model = tmp_path / "m.safetensors"
    args = ("expand", "--method", "scratch", "--ancestry", "demo", "--depth", "1", "--embed-dim", "32", "--heads", "1")
    assert _cli(*args, "--num-classes", "7", "--out", model).exit_code == 0
    res = _cli("export", "--model", model, "--format", "onnx-int8", "--data", "digits", "--out", tmp_path / "e")
    _one_line_exit_2(res, "--data: data 'digits' has 10 classes but the model predicts 7; pass --data the images")
    assert not (tmp_path / "e").exists()


def test_a_fifo_or_folder_where_a_file_belongs_is_named_as_one(tmp_path):
    """A FIFO profile, checkpoint or model read 'not found' / 'does not exist' while it was there (a fleet and an
    image said what it was); every reader now says what it is."""
    import os

    os.mkfifo(tmp_path / "p.yaml")
    os.mkfifo(tmp_path / "m.safetensors")
    (tmp_path / "folder.yaml").mkdir()
    _one_line_exit_2(_cli("search", "--profile", tmp_path / "p.yaml"), "p.yaml is a FIFO, not a regular file")
    _one_line_exit_2(_cli("flops", "--model", tmp_path / "m.safetensors"), "m.safetensors is a FIFO, not a regular")
    res = _cli("export", "--model", tmp_path / "m.safetensors", "--out", tmp_path / "e")
    _one_line_exit_2(res, "model ")
    assert "m.safetensors is a FIFO" in res.output and not (tmp_path / "e").exists()
    res = _cli("search", "--profile", tmp_path / "folder.yaml")
    _one_line_exit_2(res, "folder.yaml is a directory, not a regular file; pass a file")


def test_a_batch_larger_than_its_training_split_runs_the_whole_split_and_says_so(tmp_path, demo_file):
    """`build --batch-size 65536` on digits' 1,000 training images timed steps of 65 epochs each in its dry run,
    for minutes, printing nothing (and a build would have run them). The commands now run steps of the whole split
    and say so (the default 32 on a folder of 8 images likewise); the API's train() refuses such a batch."""
    from factory import load_ancestry
    from factory.data import load_dataset
    from factory.training.batches import check_batch_fits, fit_batch
    from factory.training.train import TrainConfig, train

    assert fit_batch(256, 256) == (256, "")
    assert fit_batch(300, 256, world=3, split="s") == (
        255,
        "a batch of 300 is more than the 256 images of s: steps of 255 images (the whole split) instead",
    )
    with pytest.raises(FactoryError, match="257 images a step is more than the 256 images of s: .* at most 256") as e:
        check_batch_fits(257, 256, split="s")
    assert e.value.param == "batch_size"
    ds = load_dataset("synthetic")
    with pytest.raises(FactoryError, match="300 images a step is more than the 256"):
        train(load_ancestry("demo").model, ds.train, TrainConfig(steps=1, batch_size=300), progress=False)

    build = ("build", "--profile", "demo/jetson_orin", "--data", "synthetic", "--dry-run", "--out", tmp_path / "o")
    started = time.perf_counter()
    res = _cli(
        *build,
        "--batch-size",
        "65536",
        "--init",
        "peg",
        "--expand-steps",
        "5",
        "--expand-data",
        "digits",
        "--expand-batch-size",
        "1001",
    )
    assert res.exit_code == 0, res.output
    assert (
        "fine-tuning: a batch of 65536 is more than the 256 images of the training split of synthetic: steps of 256 "
        "images" in res.output
    )
    assert "expanding phase: a batch of 1001 is more than the 1000 images of the training split of digits" in res.output
    assert time.perf_counter() - started < 120  # steps of 256 and 1000 images timed, not of 65536
    res = _cli(
        "train",
        "--model",
        demo_file,
        "--data",
        "synthetic",
        "--batch-size",
        "300",
        "--steps",
        "1",
        "--out",
        tmp_path / "t",
    )
    assert res.exit_code == 0, res.output
    assert "train: a batch of 300 is more than the 256 images" in res.output
    rows = [json.loads(line) for line in (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 1


def test_hidden_folders_and_files_are_neither_classes_nor_images(tmp_path):
    """torchvision's ImageFolder took `.ipynb_checkpoints/` for a class (a 3-class head for a 2-class task) and
    macOS's `._0.png` AppleDouble files for images (refused as unreadable); both are skipped now."""
    from factory.data import load_dataset

    from .helpers import image_folder

    root = image_folder(tmp_path / "d", n=3, size=28)
    for split in ("train", "val"):
        (root / split / ".ipynb_checkpoints").mkdir()
        (root / split / "a" / "._0.png").write_bytes(b"\0\5\26\7 AppleDouble")
    from PIL import Image

    Image.new("L", (28, 28)).save(root / "train" / ".ipynb_checkpoints" / "0.png")
    ds = load_dataset(str(root))
    assert (ds.num_classes, len(ds.train), len(ds.val)) == (2, 6, 6)


def test_a_folder_without_val_says_what_it_holds_and_what_to_do(tmp_path):
    from .helpers import image_folder

    root = image_folder(tmp_path / "d", n=3, size=28)
    (root / "val").rename(root / "test")
    res = _cli("search", "--profile", "demo/jetson_orin", "--data", root, "--objective", "accuracy")
    _one_line_exit_2(res, "has no val/ (it holds test/, train/): the ImageFolder layout is train/CLASS/*, val/CLASS/*")
    assert "move some training images of each class into val/" in res.output


def test_train_resume_without_a_checkpoint_writes_nothing(tmp_path, demo_file):
    res = _cli("train", "--model", demo_file, "--data", "synthetic", "--resume", "--out", tmp_path / "t")
    _one_line_exit_2(res, "cannot resume training (--resume): no checkpoint in")
    assert not (tmp_path / "t").exists()


def test_a_warm_up_longer_than_the_run_writes_nothing(tmp_path, demo_file):
    res = _cli("train", "--model", demo_file, "--steps", "5", "--warmup-steps", "6", "--out", tmp_path / "t")
    _one_line_exit_2(res, "--warmup-steps: a warm-up of 6 steps is longer than the run of 5")
    assert not (tmp_path / "t").exists()


def test_a_class_folder_without_images_names_the_class_and_the_fix(tmp_path):
    from factory.data import load_dataset

    from .helpers import image_folder

    root = image_folder(tmp_path / "d", n=2, size=28)
    for f in (root / "val" / "b").iterdir():
        f.unlink()
    (root / "val" / "b" / "notes.txt").write_text("not an image")
    with pytest.raises(FactoryError, match=r"d/val: Found no valid file for the classes b; every class folder needs"):
        load_dataset(str(root))


@pytest.mark.parametrize("field", ["calibration", "latency_tables"])
def test_a_profile_file_that_is_a_folder_is_named_as_one(tmp_path, field):
    """A profile's calibration CSV or latency tables given as a folder read "not found" while it was there."""
    (tmp_path / "kit").mkdir()
    prof = tmp_path / "p.yaml"
    prof.write_text(_profile(tmp_path, "p").read_text() + f"{field}: kit\n")
    _one_line_exit_2(_cli("search", "--profile", prof), f"{field.replace('calibration', 'calibration file')} ")
    assert "kit is a directory, not a regular file; pass a file" in _cli("search", "--profile", prof).output


def test_a_teacher_that_cannot_distil_into_the_student_is_one_line(tmp_path, demo_file):
    """`train --distill-from` a 224-px timm ViT or a model of other classes ended in a traceback at the first step
    (an AssertionError on the input size, a RuntimeError on the logits)."""
    five = tmp_path / "five.safetensors"
    args = ("expand", "--method", "scratch", "--ancestry", "demo", "--depth", "1", "--embed-dim", "32", "--heads", "1")
    assert _cli(*args, "--num-classes", "5", "--out", five).exit_code == 0
    train = ("train", "--model", demo_file, "--data", "digits", "--steps", "1", "--out", tmp_path / "t")
    res = _cli(*train, "--distill-from", five)
    _one_line_exit_2(res, "--distill-from: the teacher has classes 5 (the student's 10): it must take the student's")
    res = _cli(*train, "--distill-from", "random:vit_tiny_patch16_224")
    _one_line_exit_2(res, "input size 224 (the student's 28), input channels 3 (the student's 1), classes 1000")
    assert not (tmp_path / "t").exists()
    assert _cli(*train, "--distill-from", "demo").exit_code == 0  # the ancestry itself: same input, same classes


def test_an_option_that_applies_only_with_another_is_refused_without_it(tmp_path, demo_file):
    """`train --distill-alpha 0.9` without a teacher, `build --budget-split steps` or `--expand-head-start` without a
    --time-budget, `--task-cpus` without Ray: each was silently ignored, so the user believed it ran."""
    res = _cli("train", "--model", demo_file, "--data", "digits", "--distill-alpha", "0.9", "--out", tmp_path / "t")
    _one_line_exit_2(res, "--distill-alpha only applies with --distill-from: give --distill-from, or drop it")
    build = ("build", "--profile", "demo/jetson_orin", "--dry-run", "--out", tmp_path / "o")
    res = _cli(*build, "--budget-split", "steps", "--expand-head-start", "3")
    _one_line_exit_2(res, "--budget-split and --expand-head-start only apply with --time-budget")
    _one_line_exit_2(_cli(*build, "--task-cpus", "2"), "--task-cpus only applies with --executor ray")
    from factory.core.assets import PACKAGED_LEARNGENE

    res = _cli(*build, "--learngene", PACKAGED_LEARNGENE, "--expand-steps", "600", "--gene-layers", "2")
    _one_line_exit_2(res, "--gene-layers and --expand-steps only apply with a learngene the build makes: leave out")
    _one_line_exit_2(
        _cli(*build, "--init", "scratch", "--no-joint-choice"),
        "--joint-choice/--no-joint-choice only applies with --init auto",
    )
    res = _cli("learngene", "--mixing", "uniform", "--tau", "3", "--out", tmp_path / "lg")
    _one_line_exit_2(res, "--tau only applies with --mixing softmax")
    assert not (tmp_path / "t").exists() and not (tmp_path / "o").exists() and not (tmp_path / "lg").exists()
    assert _cli(*build, "--budget-split", "steps", "--time-budget", "10m").exit_code == 0
