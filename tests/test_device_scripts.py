"""The scripts shipped to devices (the calibration kit's measure.py, the TensorRT kit's check_engine.py): usage
errors exit 2 in one line, apart from a failed measurement or check (exit 1)."""

import shutil
from pathlib import Path

from .helpers import run_script as _run


def test_measure_py_usage_errors_exit_2_in_one_line(kit, tmp_path):
    bare = {"PATH": str(tmp_path), "TRTEXEC": ""}  # no trtexec anywhere
    for args, env, needle in [
        ((), bare, "no trtexec found"),
        (("--repeats", "0"), None, "--repeats must be >= 1"),
        (("--repeats", "-5"), None, "--repeats must be >= 1"),
    ]:
        done = _run(kit / "measure.py", *args, env=env)
        assert done.returncode == 2 and needle in done.stderr and "Traceback" not in done.stderr, done.stderr

    empty = tmp_path / "empty"
    shutil.copytree(kit, empty)
    (empty / "shapes.csv").write_text((kit / "shapes.csv").read_text().splitlines()[0] + "\n")
    done = _run(empty / "measure.py", "--runtime", "onnxruntime")
    assert done.returncode == 2 and "lists no models" in done.stderr, done.stderr


def test_measure_py_a_bad_model_is_a_failed_measurement(kit, tmp_path):

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
