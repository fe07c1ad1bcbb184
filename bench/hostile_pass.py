"""A hostile pass over every command: bad input must give one ``Error:`` line, exit 2, no traceback,
and leave ``--out`` (or the user's files) as they were.

Each case runs the real CLI in-process (click's runner) in a fresh temporary folder. A case *holds*
when the exit code is 2, the output has exactly one line starting with ``Error`` and no traceback,
and the case's own check of the folder passes (nothing created where the command failed; the
user's files unchanged). Writes a Markdown table (``--md``) and JSON (``--json``).

    python bench/hostile_pass.py --json bench/out/hostile_pass.json --md bench/out/hostile_pass.md
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from click.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import write_outputs  # noqa: E402

from factory.cli import cli  # noqa: E402

TINY = """name: tiny
hardware: {kind: cpu, peak_tflops: {fp32: 0.2}, memory_bandwidth_gbs: 20, memory_mb: 512, runtime: onnxruntime, source: test}
precision: fp32
batch: 1
budgets: {params_m: 0.2}
export: [onnx]
"""


def setup(root: Path) -> dict[str, Path]:
    """Files the cases point at: a profile, a user folder with a file, a plain file, a model."""
    (root / "tiny.yaml").write_text(TINY)
    (root / "user").mkdir()
    (root / "user" / "mine.txt").write_text("mine")
    (root / "afile").write_text("x")
    (root / "notamodel.safetensors").write_bytes(b"not safetensors")
    (root / "bad.csv").write_bytes(b"\xff\xfe\x00")
    return {"profile": root / "tiny.yaml", "user": root / "user", "file": root / "afile"}


def cases(p: dict[str, Path]) -> list[tuple[str, list[str]]]:
    prof, user, file = str(p["profile"]), str(p["user"]), str(p["file"])
    build = ["build", "--profile", prof, "--data", "synthetic", "--out"]
    return [
        ("build: no profile", ["build", "--out", "o"]),
        ("build: missing profile file", ["build", "--profile", "missing.yaml", "--out", "o"]),
        ("build: missing fleet file", ["build", "--fleet", "missing.yaml", "--out", "o"]),
        ("build: unknown data set", ["build", "--profile", prof, "--data", "nodata", "--out", "o"]),
        ("build: unknown ancestry", [*build, "o", "--ancestry", "no-such-model"]),
        ("build: --steps 0", [*build, "o", "--steps", "0"]),
        ("build: --lr nan", [*build, "o", "--lr", "nan"]),
        ("build: --lr inf", [*build, "o", "--lr", "inf"]),
        ("build: --batch-size 10^30", [*build, "o", "--batch-size", str(10**30)]),
        ("build: --jobs 0", [*build, "o", "--jobs", "0"]),
        ("build: --seed 2^64", [*build, "o", "--seed", str(2**64)]),
        ("build: --gene-layers 0", [*build, "o", "--gene-layers", "0"]),
        ("build: --expand-steps -1", [*build, "o", "--expand-steps", "-1"]),
        ("build: --init bogus", [*build, "o", "--init", "bogus"]),
        ("build: --objective bogus", [*build, "o", "--objective", "bogus"]),
        ("build: --out is a file", [*build, file]),
        ("build: --out under a file", [*build, file + "/o"]),
        ("build: --ray-address without ray", [*build, "o", "--ray-address", "auto"]),
        ("build: --ray-address nonsense", [*build, "o", "--executor", "ray", "--ray-address", "nonsense"]),
        ("build: --ray-address refused", [*build, "o", "--executor", "ray", "--ray-address", "127.0.0.1:1"]),
        ("build: --task-cpus 0", [*build, "o", "--executor", "ray", "--task-cpus", "0"]),
        ("build: --expand-data bogus", [*build, "o", "--expand-steps", "2", "--expand-data", "nodata"]),
        ("search: missing profile", ["search", "--profile", "missing.yaml"]),
        ("search: --top 0", ["search", "--profile", prof, "--top", "0"]),
        ("search: --snap 0", ["search", "--profile", prof, "--snap", "0"]),
        ("search: --max-depth 0", ["search", "--profile", prof, "--max-depth", "0"]),
        ("search: --img-size 0", ["search", "--profile", prof, "--img-size", "0"]),
        ("search: --num-classes -1", ["search", "--profile", prof, "--num-classes", "-1"]),
        ("search: unknown data", ["search", "--profile", prof, "--data", "nodata"]),
        (
            "search: impossible budget",
            ["search", "--profile", prof.replace("tiny.yaml", "tiny.yaml"), "--max-depth", "1", "--img-size", "4096"],
        ),
        ("export: missing model", ["export", "--model", "missing.safetensors", "--out", "o"]),
        ("export: not a model", ["export", "--model", "notamodel.safetensors", "--out", "o"]),
        ("export: unknown format", ["export", "--model", "notamodel.safetensors", "--format", "bogus", "--out", "o"]),
        ("export: no build here", ["export", "--format", "onnx"]),
        (
            "export: missing profile",
            ["export", "--model", "notamodel.safetensors", "--profile", "missing", "--out", "o"],
        ),
        ("expand: no --out", ["expand", "--method", "scratch", "--depth", "2", "--embed-dim", "64", "--heads", "2"]),
        (
            "expand: peg without learngene",
            ["expand", "--depth", "2", "--embed-dim", "64", "--heads", "2", "--out", "o.safetensors"],
        ),
        (
            "expand: missing learngene dir",
            [
                "expand",
                "--learngene",
                "missing",
                "--depth",
                "2",
                "--embed-dim",
                "64",
                "--heads",
                "2",
                "--out",
                "o.safetensors",
            ],
        ),
        (
            "expand: heads do not divide",
            [
                "expand",
                "--method",
                "scratch",
                "--depth",
                "2",
                "--embed-dim",
                "64",
                "--heads",
                "3",
                "--out",
                "o.safetensors",
            ],
        ),
        (
            "expand: missing --depth",
            ["expand", "--method", "scratch", "--embed-dim", "64", "--heads", "2", "--out", "o.safetensors"],
        ),
        (
            "expand: --out not .safetensors",
            ["expand", "--method", "scratch", "--depth", "2", "--embed-dim", "64", "--heads", "2", "--out", "o.bin"],
        ),
        ("flops: missing model", ["flops", "--model", "missing.safetensors"]),
        ("flops: missing --depth", ["flops", "--embed-dim", "64", "--heads", "2"]),
        ("flops: not a model", ["flops", "--model", "notamodel.safetensors"]),
        ("train: no --out", ["train", "--model", "missing.safetensors"]),
        ("train: missing model", ["train", "--model", "missing.safetensors", "--out", "o"]),
        ("train: not a model", ["train", "--model", "notamodel.safetensors", "--out", "o"]),
        ("train: --steps -1", ["train", "--model", "notamodel.safetensors", "--steps", "-1", "--out", "o"]),
        ("train: --amp bogus", ["train", "--model", "notamodel.safetensors", "--amp", "bogus", "--out", "o"]),
        ("learngene: no --out", ["learngene", "--ancestry", "demo"]),
        ("learngene: unknown ancestry", ["learngene", "--ancestry", "nope", "--out", "lg"]),
        ("learngene: --layers 0", ["learngene", "--layers", "0", "--out", "lg"]),
        ("learngene: --tau 0", ["learngene", "--tau", "0", "--out", "lg"]),
        ("learngene: --out is a file", ["learngene", "--out", file]),
        ("learngene train: no --out", ["learngene", "train", "--learngene", "missing"]),
        ("learngene train: missing learngene", ["learngene", "train", "--learngene", "missing", "--out", "lg2"]),
        (
            "learngene train: --depths not numbers",
            ["learngene", "train", "--learngene", "missing", "--depths", "a,b", "--out", "lg2"],
        ),
        ("profiles show: missing", ["profiles", "show", "missing"]),
        ("profiles measure: --out a directory", ["profiles", "measure", "--out", user]),
        ("profiles measure: --points 1", ["profiles", "measure", "--points", "1"]),
        ("profiles measure: --batch 0", ["profiles", "measure", "--batch", "0"]),
        ("calibrate: no --out", ["calibrate", "--profile", prof]),
        ("calibrate: missing profile", ["calibrate", "--profile", "missing", "--out", "kit"]),
        ("calibrate: --shapes 1", ["calibrate", "--profile", prof, "--shapes", "1", "--out", "kit"]),
        ("calibrate: --out is a file", ["calibrate", "--profile", prof, "--shapes", "3", "--out", file]),
        ("ancestry train: --steps 0", ["ancestry", "train", "--steps", "0"]),
        ("ancestry train: --out under a file", ["ancestry", "train", "--steps", "1", "--out", file + "/w.safetensors"]),
    ]


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def run_case(name: str, make_args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        args = make_args(setup(root))
        before = snapshot(root)
        cwd = os.getcwd()
        os.chdir(root)
        t0 = time.perf_counter()
        try:
            res = CliRunner().invoke(cli, args)
        finally:
            os.chdir(cwd)
        seconds = time.perf_counter() - t0
        output = res.output or ""
        errors = [line for line in output.splitlines() if line.startswith("Error")]
        traceback = "Traceback" in output or (res.exception is not None and not isinstance(res.exception, SystemExit))
        after = snapshot(root)
        changed = sorted(set(after) ^ set(before)) + sorted(k for k in before if k in after and before[k] != after[k])
        held = res.exit_code == 2 and len(errors) == 1 and not traceback and not changed
        return {
            "case": name,
            "exit_code": res.exit_code,
            "held": held,
            "seconds": round(seconds, 2),
            "error": errors[0][:160] if errors else output.strip().splitlines()[-1:] or "",
            "traceback": traceback,
            "changed": changed[:5],
        }


def summary(rows: list[dict], what: str) -> str:
    """The Markdown table of a pass's rows: how many held, then one line per case."""
    held = sum(r["held"] for r in rows)
    lines = [
        f"{held} of {len(rows)} {what} held (exit 2, one `Error:` line, no traceback, no file changed).",
        "",
        "| case | exit | held | error (first 160 characters) |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['case']} | {r['exit_code']} | {'yes' if r['held'] else '**no**'} | {str(r['error']).replace('|', '/')} |"
        for r in rows
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--md", type=Path, default=None)
    args = parser.parse_args()
    names = [name for name, _ in cases(setup(Path(tempfile.mkdtemp())))]
    rows = []
    for i, name in enumerate(names):
        rows.append(run_case(name, lambda files, i=i: cases(files)[i][1]))
        print(f"{'held' if rows[-1]['held'] else 'FAILED':6s} {name}: {rows[-1]['error']}", flush=True)
    write_outputs(
        {"held": sum(r["held"] for r in rows), "cases": len(rows), "rows": rows},
        summary(rows, "hostile cases"),
        args.json,
        args.md,
    )


if __name__ == "__main__":
    main()
