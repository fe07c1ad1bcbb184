import json

import pytest
import torch
from click.testing import CliRunner

from factory import Learngene, count_flops, load_ancestry
from factory.cli import cli
from factory.core.checkpoint import load_descendant


@pytest.fixture()
def run():
    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(cli, [str(a) for a in args], catch_exceptions=False)

    return invoke


def test_learngene_expand_flops_round_trip(run, tmp_path):
    lg_dir, out = tmp_path / "lg", tmp_path / "d.safetensors"
    r = run(
        "learngene",
        "--ancestry",
        "random:vit_tiny_patch16_224",
        "--layers",
        "3",
        "--heads",
        "2",
        "--seed",
        "4",
        "--out",
        lg_dir,
    )
    assert r.exit_code == 0, r.output
    assert "3 layers x 2 heads" in r.output
    lg = Learngene.load(lg_dir)
    assert lg.num_layers == 3 and lg.meta["seed"] == 4
    r = run(
        "expand",
        "--learngene",
        lg_dir,
        "--depth",
        "5",
        "--embed-dim",
        "96",
        "--heads",
        "3",
        "--img-size",
        "64",
        "--num-classes",
        "7",
        "--out",
        out,
    )
    assert r.exit_code == 0, r.output
    model = load_descendant(out)
    assert len(model.blocks) == 5 and model.embed_dim == 96 and model.num_classes == 7
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 7)
    r = run("flops", "--model", out, "--json")
    data = json.loads(r.output)
    assert data["flops_fvcore"] == data["flops_closed_form"] == count_flops(model)
    assert data["params"] == data["params_closed_form"]


def test_baseline_expand_and_descendant_as_ancestry(run, tmp_path):
    out = tmp_path / "ws.safetensors"
    r = run(
        "expand",
        "--method",
        "weight_selection",
        "--ancestry",
        "demo",
        "--depth",
        "2",
        "--embed-dim",
        "96",
        "--heads",
        "2",
        "--out",
        out,
    )
    assert r.exit_code == 0, r.output
    anc = load_ancestry(out)  # descendants can be ancestries in turn
    assert anc.arch.depth == 2 and anc.arch.in_chans == 1


def test_flops_of_a_shape(run):
    r = run("flops", "--depth", "12", "--embed-dim", "768", "--heads", "12")
    assert r.exit_code == 0 and "17.5" in r.output


@pytest.mark.parametrize(
    "args,message",
    [
        (
            [
                "expand",
                "--learngene",
                "nope",
                "--depth",
                "2",
                "--embed-dim",
                "96",
                "--heads",
                "2",
                "--out",
                "x.safetensors",
            ],
            "not a learngene directory",
        ),
        (
            [
                "expand",
                "--ancestry",
                "demo",
                "--method",
                "tleg",
                "--depth",
                "2",
                "--embed-dim",
                "999",
                "--heads",
                "3",
                "--out",
                "x.safetensors",
            ],
            "exceeds the ancestry",
        ),
        (
            [
                "expand",
                "--ancestry",
                "demo",
                "--method",
                "tleg",
                "--depth",
                "2",
                "--embed-dim",
                "96",
                "--heads",
                "5",
                "--out",
                "x.safetensors",
            ],
            "not divisible",
        ),
        (
            [
                "expand",
                "--method",
                "peg",
                "--depth",
                "2",
                "--embed-dim",
                "96",
                "--heads",
                "2",
                "--out",
                "x.safetensors",
            ],
            "needs --learngene",
        ),
        (
            ["expand", "--method", "scratch", "--depth", "2", "--embed-dim", "96", "--heads", "2", "--out", "x.pt"],
            "must end in .safetensors",
        ),
        (["learngene", "--ancestry", "random:resnet18", "--out", "lg"], "not a timm VisionTransformer"),
        (["learngene", "--ancestry", "demo"], "missing --out"),
        (["learngene", "--ancestry", "demo", "--layers", "0", "--out", "lg"], "'--layers': 0 is not in the range"),
        (["learngene", "--ancestry", "demo", "--seed", str(2**70), "--out", "lg"], "'--seed'"),
        (
            [
                "expand",
                "--method",
                "scratch",
                "--depth",
                "4000",
                "--embed-dim",
                "60000",
                "--heads",
                "4",
                "--out",
                "x.safetensors",
            ],
            "B parameters",
        ),
        (
            [
                "expand",
                "--method",
                "scratch",
                "--depth",
                "2",
                "--embed-dim",
                str(10**12),
                "--heads",
                "4",
                "--out",
                "x.safetensors",
            ],
            "'--embed-dim'",
        ),
        (["flops", "--depth", "2"], "missing --embed-dim"),
        (["expand", "--method", "nope"], "Invalid value"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_unwritable_output_is_a_clean_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")  # works as root too, unlike chmod
    result = CliRunner().invoke(cli, ["learngene", "--out", str(blocker / "lg")])
    assert result.exit_code == 2 and "cannot create directory" in result.output
    result = CliRunner().invoke(cli, ["learngene", "--out", str(blocker)])
    assert result.exit_code == 2 and "not a directory" in result.output
    assert blocker.read_text() == "not a directory"


@pytest.mark.parametrize("command", ["learngene", "expand", "flops"])
def test_every_command_has_help_with_an_example(run, command):
    r = run(command, "--help")
    assert r.exit_code == 0 and "Example:" in r.output and "peg-factory " + command in r.output


def test_profiles_list_show_and_search(run):
    r = run("profiles", "list")
    assert r.exit_code == 0 and "jetson_orin" in r.output and "raspberry_pi5" in r.output
    r = run("profiles", "show", "jetson_orin")
    assert r.exit_code == 0 and "tensorrt" in r.output
    r = run("search", "--profile", "profiles/demo/raspberry_pi5.yaml", "--top", "3")
    assert r.exit_code == 0, r.output
    assert "rejected:" in r.output and "broke latency_ms" in r.output
    r = run("search", "--profile", "demo/raspberry_pi5", "--json")
    data = json.loads(r.output)
    assert data["feasible_count"] > 0 and data["rejected"][0]["broken"]


def test_search_with_impossible_budgets_exits_2(tmp_path):
    prof = tmp_path / "tight.yaml"
    prof.write_text(open("profiles/demo/jetson_orin.yaml").read().replace("latency_ms: 1.0", "latency_ms: 0.00001"))
    result = CliRunner().invoke(cli, ["search", "--profile", str(prof)])
    assert result.exit_code == 2 and "relax budgets.latency_ms" in result.output
    result = CliRunner().invoke(cli, ["search", "--profile", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 2 and "not found" in result.output


def test_train_and_resume_from_the_cli(run, tmp_path):
    model = tmp_path / "d.safetensors"
    assert (
        run(
            "expand",
            "--method",
            "weight_selection",
            "--ancestry",
            "demo",
            "--depth",
            "2",
            "--embed-dim",
            "64",
            "--heads",
            "1",
            "--img-size",
            "28",
            "--out",
            model,
        ).exit_code
        == 0
    )
    r = run(
        "train",
        "--model",
        model,
        "--data",
        "synthetic",
        "--steps",
        "4",
        "--batch-size",
        "16",
        "--ckpt-every",
        "2",
        "--out",
        tmp_path / "run",
    )
    assert r.exit_code == 0, r.output
    assert "test accuracy" in r.output
    trained = load_descendant(tmp_path / "run" / "model.safetensors")
    assert trained.num_classes == 4  # the synthetic set has 4 classes: new head
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 4
    r = run(
        "train",
        "--model",
        model,
        "--data",
        "synthetic",
        "--steps",
        "6",
        "--batch-size",
        "16",
        "--resume",
        "--out",
        tmp_path / "run",
    )
    assert r.exit_code == 0, r.output
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 6
    result = CliRunner().invoke(
        cli, ["train", "--model", str(model), "--data", "synthetic", "--resume", "--out", str(tmp_path / "fresh")]
    )
    assert result.exit_code == 2 and "no checkpoint" in result.output


def test_training_commands_reject_unwritable_outputs_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = CliRunner().invoke(cli, ["ancestry", "train", "--steps", "1", "--out", str(blocker / "demo.safetensors")])
    assert result.exit_code == 2 and "cannot create directory" in result.output
    model = tmp_path / "d.safetensors"
    CliRunner().invoke(
        cli, ["expand", "--method", "scratch", "--depth", "1", "--embed-dim", "32", "--heads", "1", "--out", str(model)]
    )
    result = CliRunner().invoke(
        cli, ["train", "--model", str(model), "--data", "synthetic", "--steps", "1", "--out", str(blocker / "run")]
    )
    assert result.exit_code == 2 and "cannot create directory" in result.output
    result = CliRunner().invoke(cli, ["train", "--model", str(model), "--data", "nope", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "unknown dataset" in result.output


def test_api_errors_name_the_argument_and_the_cli_names_its_flag(tmp_path):
    """Code below the CLI words errors in API terms (FactoryError.param); the CLI prefixes the flag."""
    from factory.cli.common import flag_for
    from factory.errors import FactoryError

    err = FactoryError("directory /x is not writable; choose another", param="out")
    assert str(err) == "out: directory /x is not writable; choose another" and "--" not in str(err)
    assert flag_for(cli, "out") == "--out" and flag_for(cli, "require_engine") == "--require-engine"
    assert flag_for(cli, "distill_img_size") == "--expand-img-size" and flag_for(cli, "no_such_argument") is None
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = CliRunner().invoke(cli, ["build", "--profile", "demo/jetson_orin", "--out", str(blocker / "run")])
    assert result.exit_code == 2 and "--out: " in result.output, result.output


_TRITON_PROBE = """
import sys, torch
from factory.cli import skip_triton_without_cuda
if sys.argv[1] == "gpu":
    torch.cuda.is_available = lambda: True  # a machine with a GPU, as torch would see it
skip_triton_without_cuda()
import torchvision, timm  # torchvision's registrations import triton where it can be imported
from torch.utils._triton import has_triton_package
print("absent" if sys.modules.get("triton", 0) is None else "imported" if "triton" in sys.modules else "unused")
print(has_triton_package())
"""


@pytest.mark.parametrize("machine", ["cpu", "gpu"])
def test_the_console_script_leaves_triton_out_only_without_a_gpu(machine):
    """Without CUDA the console script marks Triton absent before torchvision is imported (84 MB a process); where
    a GPU is visible it is left alone, for torch.compile's GPU kernels."""
    import importlib.util
    import subprocess
    import sys

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed here (a CPU torch wheel): nothing to leave out")
    if machine == "cpu" and torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible: the CPU case cannot be run here")
    out = subprocess.run([sys.executable, "-c", _TRITON_PROBE, machine], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == (["absent", "False"] if machine == "cpu" else ["imported", "True"])
