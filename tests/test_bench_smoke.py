import json
import subprocess
import sys


def test_peg_vs_baselines_quick_mode_runs(tmp_path):
    """Smoke run of the benchmark (asserts the report is complete, not who wins)."""
    proc = subprocess.run(
        [sys.executable, "bench/peg_vs_baselines.py", "--quick", "--steps", "4", "--eval-every", "2",
         "--expand-steps", "2", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((tmp_path / "peg_vs_baselines.json").read_text())
    methods = {r["method"] for r in data["results"]}
    assert methods == {"scratch", "weight_selection", "tleg", "peg", "peg-trained"}
    assert all(set(r["curve"]) == {"0", "2", "4"} for r in data["results"])
    assert (tmp_path / "peg_vs_baselines.png").stat().st_size > 1000
    assert "steps to scratch final" in (tmp_path / "peg_vs_baselines.md").read_text()
