"""Hostile pass, round three: new cases over every command and the options and files the structure, joint-choice
and hardening issues added -- FIFOs, forged or edited records, the user's files where a command writes, torchrun's
variables, reserved names, YAML oddities, unregistered formats and runtimes, names too long.

A case *holds* as in ``bench/hostile_pass.py`` -- exit code 2, exactly one ``Error`` line, no traceback, and no
file in the case's folder created, changed or removed -- and, since round four, when its error is the one the case
is about (:data:`NEEDLES`: a case refused for another fault, e.g. an ambiguous ``--data digits`` before the
``--out`` it meant to try, tested nothing). Each case runs the real CLI in-process in a fresh folder (with its own
environment variables where it sets some).

    python bench/hostile_pass3.py --json bench/out/hostile_pass3.json --md bench/out/hostile_pass3.md
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from click.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import write_outputs  # noqa: E402
from hostile_pass import TINY, snapshot, summary  # noqa: E402

from factory.cli import cli  # noqa: E402


def _images(root: Path, classes=("a", "b"), splits=("train", "val")) -> Path:
    from PIL import Image

    for split in splits:
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(3):
                Image.new("L", (28, 28), 60 * i).save(root / split / c / f"{i}.png")
    return root


def setup(root: Path) -> dict[str, str]:
    """The files the cases point at (built once per case, in the case's own folder)."""
    from factory.core.ancestry import load_ancestry
    from factory.core.checkpoint import save_descendant
    from factory.core.demo import load_demo_learngene

    p: dict[str, str] = {}
    (root / "tiny.yaml").write_text(TINY)
    p["profile"] = str(root / "tiny.yaml")
    for name, text in {
        "reserved": TINY.replace("name: tiny", "name: manifest.json"),
        "reserved_dir": TINY.replace("name: tiny", "name: report_files"),
        "complex": TINY + "? [a, b]\n: 1\n",
        "tabs": TINY.replace("precision: fp32", "precision:\tfp32\n\t- x"),
        "tiny_mem": TINY.replace("memory_mb: 512", "memory_mb: 1"),
        "bogus_runtime": TINY.replace("runtime: onnxruntime", "runtime: bogus"),
        "pytorch_runtime": TINY.replace("runtime: onnxruntime", "runtime: pytorch"),
        "bogus_format": TINY.replace("export: [onnx]", "export: [onnx, tflite-magic]"),
        "tables_openvino": TINY.replace("runtime: onnxruntime", "runtime: openvino") + "latency_tables: host\n",
        "recorded_only_format": TINY.replace("export: [onnx]", "export: [onnx, openvino-bf16]"),
    }.items():
        (root / f"{name}.yaml").write_text(text)
        p[name] = str(root / f"{name}.yaml")
    os.mkfifo(root / "fifo.yaml")
    p["fifo_yaml"] = str(root / "fifo.yaml")
    (root / "fleet_dir.yaml").write_text("profiles: [user]\n")
    p["fleet_dir"] = str(root / "fleet_dir.yaml")
    (root / "fleet_complex.yaml").write_text("profiles: [tiny.yaml]\n? [x]\n: 1\n")
    p["fleet_complex"] = str(root / "fleet_complex.yaml")
    (root / "user").mkdir()
    (root / "user" / "mine.txt").write_text("mine")
    p["user"] = str(root / "user")
    (root / "afile").write_text("x")
    p["file"] = str(root / "afile")
    anc = load_ancestry("demo")
    save_descendant(anc.model, anc.arch, root / "demo.safetensors", {"method": "ancestry"})
    p["model"] = str(root / "demo.safetensors")
    os.mkfifo(root / "fifo.safetensors")
    p["fifo_model"] = str(root / "fifo.safetensors")
    (root / "nomodel").mkdir()
    p["nomodel"] = str(root / "nomodel")
    load_demo_learngene().save(root / "lg_clean")
    p["lg_clean"] = str(root / "lg_clean")
    load_demo_learngene().save(root / "lg_edited")
    meta = json.loads((root / "lg_edited" / "learngene.json").read_text())
    meta["ancestry"] = {**(meta.get("ancestry") or {}), "spec": "someone-else"}
    (root / "lg_edited" / "learngene.json").write_text(json.dumps(meta))
    p["lg_edited"] = str(root / "lg_edited")
    data = _images(root / "data_fifo")
    os.mkfifo(data / "train" / "a" / "pipe.png")
    p["data_fifo"] = str(data)
    p["data_other_test"] = str(_images(_images(root / "data_other_test"), ("a", "c"), ("test",)))
    p["data_extra_test"] = str(_images(_images(root / "data_extra_test"), ("a", "b", "z"), ("test",)))
    _images(root / "digits")
    for name in ("out_manifest", "out_report", "out_report_files", "out_model", "out_ckpt", "partial_user.partial"):
        (root / name).mkdir()
    (root / "out_manifest" / "manifest.json").write_text("the user's")
    (root / "out_report" / "report.html").write_text("the user's")
    (root / "out_report_files" / "report_files").mkdir()
    (root / "out_report_files" / "report_files" / "mine.png").write_bytes(b"png")
    (root / "out_model" / "model.safetensors").write_bytes(b"the user's model")
    (root / "out_ckpt" / "checkpoint").mkdir()
    (root / "out_ckpt" / "checkpoint" / "mine.txt").write_text("mine")
    (root / "partial_user.partial" / "notes.txt").write_text("mine")
    p["long"] = str(root / ("n" * 300))
    return p


#: what each case's one error line must say: the check the case is about fired, not another one before it
NEEDLES = {
    "build: profile named manifest.json": "'manifest.json' is a file the build writes into --out",
    "build: profile named report_files": "'report_files' is a file the build writes into --out",
    "build: profile with a list as a key": "a key that is not a plain value",
    "build: profile with tabs": "unreadable YAML",
    "build: profile is a FIFO": "fifo.yaml is a FIFO, not a regular file",
    "build: fleet is a FIFO": "fifo.yaml is a FIFO, not a regular file",
    "build: fleet lists a directory": "user is a directory, not a regular file",
    "build: fleet with a list as a key": "a key that is not a plain value",
    "build: profile is a directory": "user is a directory, not a regular file",
    "build: data holds a FIFO image": "pipe.png is a FIFO",
    "build: test/ classes not train/'s": "has other class folders than",
    "build: an extra test/ class": "(extra z)",
    "build: --data digits with ./digits here": "is both a built-in set and a folder here",
    "build: --data builtin:nope": "unknown built-in dataset 'nope'",
    "build: inside torchrun's variables": "build does not run under torchrun",
    "build: WORLD_SIZE=abc": "WORLD_SIZE='abc' is not an integer",
    "build: WORLD_SIZE=2 without MASTER_ADDR": "MASTER_ADDR is not set",
    "build: RANK outside the world": "do not make a process group",
    "build: --expand-img-size not a patch multiple": "must be a multiple of the ancestry's patch size",
    "build: --expand-img-size above the ancestry's": "is larger than the ancestry's input size",
    "build: --out name over 255 bytes": "file name is too long",
    "build: --out holds the user's manifest.json": "manifest.json exists and was not written by peg-factory",
    "build: --out holds the user's report.html": "report.html exists and was not written by peg-factory",
    "build: --out holds the user's report_files/": "report_files exists and was not written by peg-factory",
    "build: --learngene with an edited json": "was edited or damaged",
    "build: --learngene is a file": "is not a learngene directory",
    "search: device memory of 1 MB": "needs memory_mb",
    "search: unregistered runtime": "hardware.runtime: Input should be",
    "search: a cost-model-only runtime": "hardware.runtime: Input should be",
    "search: unregistered format in export": "export.1: Input should be",
    "search: a recorded-only format in export": "export.1: Input should be",
    "search: kernel tables on openvino": "latency_tables are measured with onnxruntime",
    "export: trt for an onnxruntime profile": "runs onnxruntime, not tensorrt",
    "export: openvino-bf16 requested": "unknown export format 'openvino-bf16'",
    "export: --model is a FIFO": "fifo.safetensors is a FIFO, not a regular file",
    "export: --model a folder without a model": "not found: pass a run directory",
    "export: --out is a file": "exists and is not a directory",
    "train: --out holds the user's model": "model.safetensors exists and was not written by peg-factory",
    "train: --out holds the user's checkpoint/": "checkpoint exists and was not written by peg-factory",
    "train: WORLD_SIZE=abc": "WORLD_SIZE='abc' is not an integer",
    "train: WORLD_SIZE=2 without MASTER_ADDR": "MASTER_ADDR is not set",
    "train: --out name over 255 bytes": "file name is too long",
    "train: data holds a FIFO image": "pipe.png is a FIFO",
    "learngene train: --learngene with an edited json": "was edited or damaged",
    "learngene train: --work-dir holds the user's files": "user holds files peg-factory did not make",
    "learngene train: OUT.partial holds the user's files": "partial_user.partial holds files peg-factory did not make",
    "learngene train: --work-dir is a file": "exists and is not a directory",
    "expand: --learngene with an edited json": "was edited or damaged",
    "learngene: --out name over 255 bytes": "file name is too long",
    "profiles show: a reserved name": "'manifest.json' is a file the build writes into --out",
    "profiles show: a list as a key": "a key that is not a plain value",
    "profiles show: a FIFO": "fifo.yaml is a FIFO, not a regular file",
    "flops: --model is a FIFO": "fifo.safetensors is a FIFO, not a regular file",
    "calibrate: a cost-model-only runtime": "hardware.runtime: Input should be",
}


def cases(p: dict[str, str]) -> list[tuple[str, list[str], dict[str, str], str]]:
    """``(name, arguments, environment, needle)`` of every case."""
    return [(name, args, env, NEEDLES[name]) for name, args, env in _cases(p)]


def _cases(p: dict[str, str]) -> list[tuple[str, list[str], dict[str, str]]]:
    prof = p["profile"]
    build = ["build", "--profile", prof, "--data", "synthetic", "--steps", "1", "--out"]
    # builtin:digits: the case folder also holds a ./digits folder (the ambiguity case's), which plain "digits"
    # would be refused for before the check a case is about
    train = ["train", "--model", p["model"], "--data", "builtin:digits", "--steps", "1", "--batch-size", "4", "--out"]
    learngene_train = ["learngene", "train", "--data", "builtin:digits", "--steps", "1", "--batch-size", "4"]
    lgt = [*learngene_train, "--learngene", p["lg_edited"]]
    clean = [*learngene_train, "--learngene", p["lg_clean"]]
    torchrun = {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29533"}
    return [
        ("build: profile named manifest.json", ["build", "--profile", p["reserved"], "--out", "o"], {}),
        ("build: profile named report_files", ["build", "--profile", p["reserved_dir"], "--out", "o"], {}),
        ("build: profile with a list as a key", ["build", "--profile", p["complex"], "--out", "o"], {}),
        ("build: profile with tabs", ["build", "--profile", p["tabs"], "--out", "o"], {}),
        ("build: profile is a FIFO", ["build", "--profile", p["fifo_yaml"], "--out", "o"], {}),
        ("build: fleet is a FIFO", ["build", "--fleet", p["fifo_yaml"], "--out", "o"], {}),
        ("build: fleet lists a directory", ["build", "--fleet", p["fleet_dir"], "--out", "o"], {}),
        ("build: fleet with a list as a key", ["build", "--fleet", p["fleet_complex"], "--out", "o"], {}),
        ("build: profile is a directory", ["build", "--profile", p["user"], "--out", "o"], {}),
        ("build: data holds a FIFO image", ["build", "--profile", prof, "--data", p["data_fifo"], "--out", "o"], {}),
        (
            "build: test/ classes not train/'s",
            ["build", "--profile", prof, "--data", p["data_other_test"], "--out", "o"],
            {},
        ),
        ("build: an extra test/ class", ["build", "--profile", prof, "--data", p["data_extra_test"], "--out", "o"], {}),
        ("build: --data digits with ./digits here", ["build", "--profile", prof, "--data", "digits", "--out", "o"], {}),
        ("build: --data builtin:nope", ["build", "--profile", prof, "--data", "builtin:nope", "--out", "o"], {}),
        ("build: inside torchrun's variables", [*build, "o"], torchrun),
        ("build: WORLD_SIZE=abc", [*build, "o"], {"WORLD_SIZE": "abc"}),
        ("build: WORLD_SIZE=2 without MASTER_ADDR", [*build, "o"], {"WORLD_SIZE": "2", "RANK": "0"}),
        ("build: RANK outside the world", [*build, "o"], {"WORLD_SIZE": "2", "RANK": "5", "MASTER_ADDR": "x"}),
        (
            "build: --expand-img-size not a patch multiple",
            [*build, "o", "--expand-steps", "2", "--expand-img-size", "65535"],
            {},
        ),
        (
            "build: --expand-img-size above the ancestry's",
            [*build, "o", "--expand-steps", "2", "--expand-img-size", "2800"],
            {},
        ),
        ("build: --out name over 255 bytes", [*build, p["long"]], {}),
        ("build: --out holds the user's manifest.json", [*build, "out_manifest"], {}),
        ("build: --out holds the user's report.html", [*build, "out_report"], {}),
        ("build: --out holds the user's report_files/", [*build, "out_report_files"], {}),
        ("build: --learngene with an edited json", [*build, "o", "--learngene", p["lg_edited"]], {}),
        ("build: --learngene is a file", [*build, "o", "--learngene", p["file"]], {}),
        ("search: device memory of 1 MB", ["search", "--profile", p["tiny_mem"]], {}),
        ("search: unregistered runtime", ["search", "--profile", p["bogus_runtime"]], {}),
        ("search: a cost-model-only runtime", ["search", "--profile", p["pytorch_runtime"]], {}),
        ("search: unregistered format in export", ["search", "--profile", p["bogus_format"]], {}),
        ("search: a recorded-only format in export", ["search", "--profile", p["recorded_only_format"]], {}),
        ("search: kernel tables on openvino", ["search", "--profile", p["tables_openvino"]], {}),
        (
            "export: trt for an onnxruntime profile",
            ["export", "--model", p["model"], "--format", "trt", "--profile", prof, "--out", "o"],
            {},
        ),
        (
            "export: openvino-bf16 requested",
            ["export", "--model", p["model"], "--format", "openvino-bf16", "--out", "o"],
            {},
        ),
        ("export: --model is a FIFO", ["export", "--model", p["fifo_model"], "--out", "o"], {}),
        ("export: --model a folder without a model", ["export", "--model", p["nomodel"], "--out", "o"], {}),
        ("export: --out is a file", ["export", "--model", p["model"], "--format", "onnx", "--out", p["file"]], {}),
        ("train: --out holds the user's model", [*train, "out_model"], {}),
        ("train: --out holds the user's checkpoint/", [*train, "out_ckpt"], {}),
        ("train: WORLD_SIZE=abc", [*train, "o"], {"WORLD_SIZE": "abc"}),
        ("train: WORLD_SIZE=2 without MASTER_ADDR", [*train, "o"], {"WORLD_SIZE": "2", "RANK": "0"}),
        ("train: --out name over 255 bytes", [*train, p["long"]], {}),
        (
            "train: data holds a FIFO image",
            ["train", "--model", p["model"], "--data", p["data_fifo"], "--out", "o"],
            {},
        ),
        ("learngene train: --learngene with an edited json", [*lgt, "--out", "lg2"], {}),
        ("learngene train: --work-dir holds the user's files", [*clean, "--out", "lg2", "--work-dir", p["user"]], {}),
        ("learngene train: OUT.partial holds the user's files", [*clean, "--out", "partial_user"], {}),
        ("learngene train: --work-dir is a file", [*clean, "--out", "lg2", "--work-dir", p["file"]], {}),
        (
            "expand: --learngene with an edited json",
            ["expand", "--learngene", p["lg_edited"], "--depth", "2", "--out", "o.safetensors"],
            {},
        ),
        ("learngene: --out name over 255 bytes", ["learngene", "--out", p["long"], "--layers", "2"], {}),
        ("profiles show: a reserved name", ["profiles", "show", p["reserved"]], {}),
        ("profiles show: a list as a key", ["profiles", "show", p["complex"]], {}),
        ("profiles show: a FIFO", ["profiles", "show", p["fifo_yaml"]], {}),
        ("flops: --model is a FIFO", ["flops", "--model", p["fifo_model"]], {}),
        ("calibrate: a cost-model-only runtime", ["calibrate", "--profile", p["pytorch_runtime"], "--out", "kit"], {}),
    ]


def run_case(index: int, make_cases=None) -> dict:
    """Case ``index`` of ``make_cases`` (default :func:`cases`) in a fresh folder: the row of the table."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        name, args, env, needle = (make_cases or cases)(setup(root))[index]
        before = snapshot(root)
        cwd = os.getcwd()
        os.chdir(root)
        t0 = time.perf_counter()
        try:
            res = CliRunner().invoke(cli, args, env=env)
        finally:
            os.chdir(cwd)
        seconds = time.perf_counter() - t0
        output = res.output or ""
        errors = [line for line in output.splitlines() if line.startswith("Error")]
        traceback = "Traceback" in output or (res.exception is not None and not isinstance(res.exception, SystemExit))
        after = snapshot(root)
        changed = sorted(set(after) ^ set(before)) + sorted(k for k in before if k in after and before[k] != after[k])
        aimed = len(errors) == 1 and needle in errors[0]
        held = res.exit_code == 2 and len(errors) == 1 and not traceback and not changed and aimed
        error = errors[0][:160] if errors else (output.strip().splitlines()[-1:] or [repr(res.exception)])[0][:160]
        return {
            "case": name,
            "exit_code": res.exit_code,
            "held": held,
            "aimed": aimed,
            "needle": needle,
            "seconds": round(seconds, 2),
            "error": error,
            "traceback": traceback,
            "changed": changed[:5],
        }


def main(make_cases=None, what: str = "new hostile cases") -> None:
    """Run every case of ``make_cases`` (default :func:`cases`) and write the table (``--md``) and JSON."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--md", type=Path, default=None)
    args = parser.parse_args()
    make_cases = make_cases or cases
    count = len(make_cases(setup(Path(tempfile.mkdtemp()))))
    rows = []
    for i in range(count):
        rows.append(run_case(i, make_cases))
        print(f"{'held' if rows[-1]['held'] else 'FAILED':6s} {rows[-1]['case']}: {rows[-1]['error']}", flush=True)
    aimed = sum(r["aimed"] for r in rows)
    text = summary(rows, what).replace(
        "no file changed).", f"no file changed, and the error the case is about: {aimed} of {len(rows)}).", 1
    )
    write_outputs({"held": sum(r["held"] for r in rows), "cases": len(rows), "rows": rows}, text, args.json, args.md)


if __name__ == "__main__":
    main()
