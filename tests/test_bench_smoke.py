"""Smoke runs of the benchmarks: each writes a complete report (they assert nothing about who wins)."""

import json
import math
import subprocess
import sys

import pytest


def _run(*args, timeout=600):
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def test_peg_vs_baselines_quick_mode_runs(tmp_path):
    _run(
        "bench/peg_vs_baselines.py",
        "--quick",
        "--steps",
        "4",
        "--eval-every",
        "2",
        "--out",
        str(tmp_path),
        "--methods",
        "scratch",
        "weight_selection",
        "tleg",
        "peg-untrained",
        "peg",
    )
    data = json.loads((tmp_path / "peg_vs_baselines.json").read_text())
    methods = {r["method"] for r in data["results"]}
    assert methods == {"scratch", "weight_selection", "tleg", "peg", "peg-untrained"}
    assert all(set(r["curve"]) == {"0", "2", "4"} for r in data["results"])
    assert data["learngene"]["expanding_phase"]["config"]["steps"] > 0  # the default is the trained learngene
    assert (tmp_path / "peg_vs_baselines.png").stat().st_size > 1000
    assert "steps to scratch final" in (tmp_path / "peg_vs_baselines.md").read_text()


def test_learngene_study_quick_mode_runs(tmp_path):
    _run(
        "bench/learngene_study.py",
        "--quick",
        "--largest",
        "--steps",
        "4",
        "--json",
        str(tmp_path / "s.json"),
        "--md",
        str(tmp_path / "s.md"),
    )
    data = json.loads((tmp_path / "s.json").read_text())
    assert {r["variant"] for r in data["results"]} >= {
        "weight_selection",
        "tleg",
        "paper (untrained, tau 1)",
        "expand 3 steps",
    }
    assert {r["shape"] for r in data["results"]} == {"d3-w192-h3-r4-i28-p7", "d12-w192-h3-r4-i28-p7"}  # --largest
    table = (tmp_path / "s.md").read_text()
    assert "| variant | knobs |" in table and "{" not in table.split("\n")[0]
    assert "| variant | d3-w192-h3-r4-i28-p7 | d12-w192-h3-r4-i28-p7 |" in table  # the per-shape table
    assert "| weight_selection | 0." in table.split("Per shape")[1] and "(+0.000)" in table.split("Per shape")[1]


def test_search_quality_quick_mode_runs(tmp_path):
    _run("bench/search_quality.py", "--quick", "--json", str(tmp_path / "q.json"), "--md", str(tmp_path / "q.md"))
    row = json.loads((tmp_path / "q.json").read_text())["rows"][0]
    assert row["shapes"] >= 3 and row["oracle_acc"] >= row["chosen_acc"] and row["oracle_acc"] >= row["capacity_acc"]
    assert set(row["predicted"]) == set(row["measured"])
    assert "gap to oracle" in (tmp_path / "q.md").read_text()
    # the estimator study probes the same candidates and scores each estimator against the same fine-tunes
    _run(
        "bench/estimator_study.py",
        "--from",
        str(tmp_path / "q.json"),
        "--json",
        str(tmp_path / "e.json"),
        "--md",
        str(tmp_path / "e.md"),
        "--rungs",
        "1",
        "2",
        "3",
        "--cosine",
        "2",
    )
    study = json.loads((tmp_path / "e.json").read_text())
    assert len(study["probes"]) == row["shapes"]
    assert all(
        len(p["nll_per_image"]["const-3"]) == len(p["nll_per_image"]["const-1"]) > 0 for p in study["probes"].values()
    )
    table = (tmp_path / "e.md").read_text()
    capacity_row = next(line for line in table.splitlines() if line.startswith("| capacity |"))
    assert "+0.00 pt" in capacity_row  # the baseline against itself
    assert "| anchored halving 1/2/3 z=2 |" in table and "| cosine-2 nll |" in table
    # an estimator variant scored on the same fine-tunes: --reuse repeats none of them
    out = _run(
        "bench/search_quality.py",
        "--quick",
        "--anchor",
        "--reuse",
        str(tmp_path / "q.json"),
        "--json",
        str(tmp_path / "a.json"),
    )
    again = json.loads((tmp_path / "a.json").read_text())["rows"][0]
    assert again["measured"] == row["measured"] and " test " not in out.stdout
    assert next(p for p in again["probes"] if p["chosen"])["decision"]["rule"].startswith("paired NLL gain")
    # and the runs side by side, one line each
    _run(
        "bench/search_quality.py",
        "--summarise",
        str(tmp_path / "q.json"),
        str(tmp_path / "a.json"),
        "--json",
        str(tmp_path / "s.json"),
        "--md",
        str(tmp_path / "s.md"),
    )
    lines = [
        line
        for line in (tmp_path / "s.md").read_text().splitlines()
        if line.startswith("| q |") or line.startswith("| a |")
    ]
    assert len(lines) == 2 and "| anchored calibrated |" in lines[1] and "| calibrated |" in lines[0]


def test_search_quality_measures_mnist_unseen_on_its_own_splits(tmp_path):
    _run("bench/search_quality.py", "--quick", "--tasks", "mnist-unseen", "--json", str(tmp_path / "m.json"))
    row = json.loads((tmp_path / "m.json").read_text())["rows"][0]
    assert row["task"] == "mnist-unseen" and row["test_images"] == 2000  # MNIST's test images 500-2500
    assert row["shapes"] >= 3 and row["oracle_acc"] >= row["chosen_acc"]


def test_precision_bench_quick_mode_runs(tmp_path):
    _run(
        "bench/precision.py",
        "--quick",
        "--threads",
        "1",
        "--json",
        str(tmp_path / "p.json"),
        "--md",
        str(tmp_path / "p.md"),
    )
    data = json.loads((tmp_path / "p.json").read_text())
    assert {r["amp"] for r in data["rows"]} == {"off", "auto"} and all(0 <= r["accuracy"] <= 1 for r in data["rows"])
    assert "| digits |" in (tmp_path / "p.md").read_text()


def test_gpu_check_without_a_gpu_says_so_in_one_line():
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: bench/gpu_check.py runs for real there (not in tests)")
    proc = subprocess.run([sys.executable, "bench/gpu_check.py"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no CUDA GPU here" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_init_study_quick_mode_runs_and_renders(tmp_path):
    _run(
        "bench/init_study.py",
        "--quick",
        "--threads",
        "1",
        "--json",
        str(tmp_path / "i.json"),
        "--md",
        str(tmp_path / "i.md"),
    )
    data = json.loads((tmp_path / "i.json").read_text())
    [row] = data["rows"]
    assert set(row["finetune"]["5"]) == {"peg", "weight_selection", "tleg", "scratch"}
    assert set(row["decision"]["knn_accuracy"]) == set(row["finetune"]["5"]) and row["decision"]["chosen"]
    table = (tmp_path / "i.md").read_text()
    assert "| digits | d6-w96-h2-r2-i28-p7 | 5 |" in table and "Margins swept" in table
    _run("bench/init_study.py", "--render", "--json", str(tmp_path / "i.json"), "--md", str(tmp_path / "r.md"))
    assert (tmp_path / "r.md").read_text() == table


def test_profile_budgets_bench_lists_every_shipped_budget(tmp_path):
    _run("bench/profile_budgets.py", "--json", str(tmp_path / "b.json"), "--md", str(tmp_path / "b.md"))
    rows = {r["profile"]: r for r in json.loads((tmp_path / "b.json").read_text())["rows"]}
    assert {"raspberry_pi5", "demo/raspberry_pi5", "jetson_orin"} <= set(rows)
    assert rows["raspberry_pi5"]["input_size"] == 224 and rows["demo/raspberry_pi5"]["input_size"] == 28
    assert "published ViT latencies" in rows["raspberry_pi5"]["band"] and "none stated" in rows["jetson_orin"]["band"]


def test_latency_threads_bench_times_both_thread_counts(tmp_path):
    _run(
        "bench/latency_threads.py",
        "--shapes",
        "2",
        "--repeats",
        "2",
        "--json",
        str(tmp_path / "t.json"),
        "--md",
        str(tmp_path / "t.md"),
    )
    data = json.loads((tmp_path / "t.json").read_text())
    assert set(data["per_threads"]) == {"1", "2"} and len(data["rows"]) == 2
    for row in data["rows"]:
        assert all(row["measured_ms"][t] > 0 and row["predicted_ms"][t] > 0 for t in ("1", "2"))
    from factory.device.host_datasheet import host_datasheet_profile

    hw = host_datasheet_profile().hardware  # this machine's own datasheet, whatever VM type runs the test
    assert f"| 2 | {round(hw.peak_tflops['fp32'] / hw.cores * 1000, 2) * 2:.1f} |" in (tmp_path / "t.md").read_text()


def test_joint_choice_bench_quick_mode_runs(tmp_path):
    _run(
        "bench/joint_choice.py",
        "--quick",
        "--profile",
        "demo/jetson_orin",
        "--json",
        str(tmp_path / "j.json"),
        "--md",
        str(tmp_path / "j.md"),
    )
    data = json.loads((tmp_path / "j.json").read_text())
    assert {r["strategy"] for r in data["rows"]} == {"auto (joint, default)", "scratch"}
    assert all(0 <= r["accuracy"] <= 1 and r["se"] > 0 for r in data["rows"])
    assert "gap to best (SE)" in (tmp_path / "j.md").read_text()


def test_expanding_step_quick_mode_runs(tmp_path):
    _run("bench/expanding_step.py", "--quick", "--json", str(tmp_path / "e.json"), "--md", str(tmp_path / "e.md"))
    data = json.loads((tmp_path / "e.json").read_text())
    assert [r["variant"] for r in data["steps"]][0] == "default" and len(data["steps"]) == 7
    assert {r["variant"]: r["memory_mb"] for r in data["steps"]}["memory 192: a dry run's"] == 192  # the dry run's cap
    assert all(r["s_per_step"] > 0 for r in data["steps"]) and data["steps"][0]["vs_default"] == 1.0
    assert 0 < data["flops"]["roofline_fraction"] < 1.5 and data["profile"]
    assert "% of this machine's" in (tmp_path / "e.md").read_text()
    sandwich = {r["sandwich"]: r for r in data["sandwich"]}
    assert len(sandwich) == 4 and data["sandwich"][0]["speedup"] == 1.0
    # FLOPs: dropping the largest shape (most of a step) must predict a speed-up, every 3rd step less than never
    every3, never = sandwich["largest every 3rd step"], sandwich["no largest, 2 random"]
    assert 1.0 < every3["flops_speedup"] and 1.0 < never["flops_speedup"]
    assert all(r["s_per_step"] > 0 for r in data["sandwich"]) and "FLOPs predict" in (tmp_path / "e.md").read_text()
    assert (
        every3["drawn_gmac"] < sandwich["largest every step (the default): smallest + largest + 1 random"]["drawn_gmac"]
    )


def _quality_run(path, seed, measured, chosen, capacity):
    best = max(measured, key=measured.get)
    row = {
        "task": "digits",
        "profile": "p",
        "seed": seed,
        "measured": measured,
        "chosen": chosen,
        "chosen_acc": measured[chosen],
        "capacity_acc": measured[capacity],
        "oracle_acc": measured[best],
        "test_images": 400,
    }
    path.write_text(json.dumps({"args": {"init": "peg", "steps": 100}, "rows": [row]}))
    return path


def test_selection_ceiling_separates_the_chooser_from_the_seed_noise(tmp_path):
    # a shape 10 points ahead at both seeds: any noise of ~1 point leaves the expected-best within one SE
    a = _quality_run(tmp_path / "s0.json", 0, {"d1": 0.80, "d2": 0.90, "d3": 0.79}, "d1", "d2")
    b = _quality_run(tmp_path / "s1.json", 1, {"d1": 0.82, "d2": 0.90, "d3": 0.80}, "d1", "d2")
    out = tmp_path / "c.json"
    proc = _run("bench/selection_ceiling.py", "--runs", str(a), str(b), "--json", str(out), "--draws", "200")
    row = json.loads(out.read_text())["rows"][0]
    assert row["cells"] == 2 and row["pairs"] == 1
    assert row["within_one_se"] == {"shipped": 0, "capacity": 2, "other seed's oracle": 2, "seed-averaged shipped": 0}
    assert row["perfect_chooser_rate"] == 1.0 and row["seed_noise_pt"]["digits"] == 0.58  # sd(-2, 0, -1 pt) / sqrt 2
    assert "| peg | 100 | 2 |" in proc.stdout
    # one seed alone has no ceiling to measure: refused in one line
    res = subprocess.run(
        [sys.executable, "bench/selection_ceiling.py", "--runs", str(a)], capture_output=True, text=True
    )
    assert res.returncode == 2 and "two seeds" in res.stderr


def test_time_budget_scores_each_device_of_a_fleet_build_against_the_same_device(monkeypatch):
    monkeypatch.syspath_prepend("bench")
    import time_budget

    def row(device, strategy, acc, ratio):
        return {
            "task": "digits", "device": device, "strategy": strategy, "seed": 0, "budget_s": 600.0,
            "shape": "d4-w96", "init": "scratch", "expand_steps": 0, "finetune_steps": 900, "accuracy": acc,
            "se": 0.01, "test_images": 400, "seconds": 600 * ratio, "ratio": ratio,
        }  # fmt: skip

    rows = [row("a", "auto (default)", 0.90, 0.95), row("b", "auto (default)", 0.80, 0.95)]
    rows += [row("a", "scratch", 0.95, 1.20), row("b", "scratch", 0.70, 1.20)]
    rows[1].update(finetune_steps=950, finetune_planned_steps=900, finetune_allotted_s=310.4, finetune_s=300.2)
    rows[0]["shared"] = {"shared": "d4-w96", "best": "d6-w96", "nll_gap": 0.0123, "se": 0.0150}
    rows[1]["not_shared"] = {"considered": [{"shape": "d2-w96", "nll_gap": 0.2, "se": 0.01}, {"shape": "d1-w32"}]}
    md = time_budget.summarise(
        {"machine": "x", "profile": "demo-fleet", "expand_cap": 400, "ancestry": "demo", "plan": [], "equal": rows}
    )
    assert "| digits | 600s | a | auto (default) | 0 | d4-w96 | scratch | 0 | 900 | 0.9000 (0.0100) | -5.0 |" in md
    paced = "950/900 (300/310s)"  # a paced fine-tune: the steps that ran of those planned, its time of its allotment
    assert f"| digits | 600s | b | auto (default) | 0 | d4-w96 | scratch | 0 | {paced} | 0.8000 (0.0100) | +0.0 |" in md
    assert "| b | scratch | 0 | d4-w96 | scratch | 0 | 900 | 0.7000 (0.0100) | -10.0 |" in md
    # a fleet build is one build, however many devices it ships: its time is counted once
    assert "Builds within 1.15x their budget: 1 of 2 (max 1.20x)." in md
    assert "- digits 600s auto (default) seed 0, a: took d4-w96 over its own best d6-w96 (NLL +0.0123, SE 0.0150)" in md
    assert "b: kept its own best; other devices' shapes: d2-w96 NLL +0.2000 (SE 0.0100), d1-w32 dropped" in md


def test_mirror_check_bench_quick_mode_runs(tmp_path):
    _run("bench/mirror_check.py", "--quick", "--json", str(tmp_path / "m.json"), "--md", str(tmp_path / "m.md"))
    rows = {r["task"]: r for r in json.loads((tmp_path / "m.json").read_text())["rows"]}
    assert rows["sided"]["flipped"] == 0 and rows["sided"]["draws"] == 2  # each class the other's mirror
    assert rows["digits"]["flipped"] == 0 and rows["digits"]["kept"] < 0.6
    assert "| sided | demo | 100 |" in (tmp_path / "m.md").read_text()


def test_phase_payoff_reads_the_head_start_off_weight_selection_s_curve(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend("bench")
    import phase_payoff

    ws = {100: 0.80, 300: 0.90, 1000: 0.88, 3000: 0.95}  # the 1000-step dip is noise: the curve only rises
    assert phase_payoff.steps_to_reach(ws, 0.80) == (100.0, "")
    assert phase_payoff.steps_to_reach(ws, 0.85)[0] == pytest.approx(math.sqrt(100 * 300))  # halfway in log N
    assert phase_payoff.steps_to_reach(ws, 0.90) == (pytest.approx(300), "")  # not the dip's 1000
    assert phase_payoff.steps_to_reach(ws, 0.97) == (3000.0, ">")  # above every run: a lower bound
    assert phase_payoff.steps_to_reach(ws, 0.70) == (100.0, "<")  # below the shortest: an upper bound
    rows = [
        {"task": "t", "steps": n, "init": init, "accuracy": acc, "seconds": 1.0, "test_images": 400}
        for n, init, acc in [(100, "weight_selection", 0.80), (300, "weight_selection", 0.90), (100, "peg", 0.85)]
    ]
    (h,) = phase_payoff.head_starts(rows)
    assert h["head_start"] == pytest.approx(math.sqrt(100 * 300) - 100) and h["bound"] == ""
    # the quick run writes the table
    _run("bench/phase_payoff.py", "--quick", "--json", str(tmp_path / "p.json"), "--md", str(tmp_path / "p.md"))
    assert len(json.loads((tmp_path / "p.json").read_text())["rows"]) == 4  # 2 lengths x (PEG, weight selection)
    assert "| task | N | PEG | weight selection |" in (tmp_path / "p.md").read_text()


def test_keep_weights_bench_scores_the_last_and_the_kept_weights_of_one_run(tmp_path):
    out = tmp_path / "kw"
    _run(
        "bench/keep_weights.py",
        "--tasks",
        "digits",
        "--seeds",
        "0",
        "--max-steps",
        "20",
        "--json",
        f"{out}.json",
        "--md",
        f"{out}.md",
    )
    rows = json.loads((tmp_path / "kw.json").read_text())["rows"]
    assert [(r["task"], r["steps"]) for r in rows] == [("digits", 20), ("digits", 20)]
    assert all(1 <= r["kept_step"] <= 20 and 0 <= r["test_last"] <= 1 and 0 <= r["test_best_val"] <= 1 for r in rows)
    assert all(
        (r["kept_step"] == 20) <= (r["test_last"] == r["test_best_val"]) for r in rows
    )  # the last kept: one model
    # 20 steps are too few for the build's rule to evaluate 397 images: the bench evaluates every 2 steps, and says so
    assert all(r["forced"] and r["evaluations"] == 10 for r in rows)
    assert "| all | 2 |" in (tmp_path / "kw.md").read_text()


def test_time_budget_takes_the_demo_fleet_a_fleet_file_or_one_profile(monkeypatch):
    from pathlib import Path

    monkeypatch.syspath_prepend("bench")
    import time_budget

    root = Path(time_budget.ROOT)

    assert [Path(p).stem for p in time_budget._profile_specs("demo-fleet")] == [
        "jetson_orin",
        "jetson_orin_nano",
        "raspberry_pi5",
    ]
    assert len(time_budget._profile_specs(str(root / "profiles/demo/fleet_all.yaml"))) == 9
    assert time_budget._profile_specs("jetson_orin") == ["jetson_orin"]
    one = str(root / "profiles/demo/pixel8.yaml")  # a profile file, not a fleet
    assert time_budget._profile_specs(one) == [one]


def test_step_estimate_quick_mode_runs(tmp_path):
    _run("bench/step_estimate.py", "--quick", "--json", str(tmp_path / "s.json"), "--md", str(tmp_path / "s.md"))
    data = json.loads((tmp_path / "s.json").read_text())
    rows = {r["measurement"]: r for r in data["rows"]}
    assert set(rows) == {"probe", "build's step", "real step at 192 MB"} and rows["build's step"]["vs_build"] == 1.0
    assert all(len(r["per_step"]) == 2 and r["peak_rss_mb"] > 0 for r in rows.values())
    assert 0 < rows["probe"]["long_run_mean"] and 0.3 < rows["probe"]["vs_build"] < 3
    assert "/ build's step" in (tmp_path / "s.md").read_text()


def test_the_hostile_pass_counts_a_case_refused_for_another_fault_as_not_held(tmp_path):
    """Round three's train cases were refused for an ambiguous --data before the --out they were about and still
    counted as held; a case now holds only with its own error (its needle)."""
    sys.path.insert(0, "bench")
    try:
        import hostile_pass3
        import hostile_pass4
    finally:
        sys.path.remove("bench")

    def aimed_at_out(p):  # round three's old train case: plain "digits" with a ./digits folder in the case's folder
        args = ["train", "--model", p["model"], "--data", "digits", "--steps", "1", "--out", "out_model"]
        return [("train: --out holds the user's model", args, {}, "model.safetensors exists and was not written")]

    row = hostile_pass3.run_case(0, aimed_at_out)
    assert row["exit_code"] == 2 and "both a built-in set and a folder" in row["error"]
    assert not row["aimed"] and not row["held"]
    names = [c[0] for c in hostile_pass4.cases(hostile_pass3.setup(tmp_path))]
    first = hostile_pass3.run_case(names.index("learngene: --layers deeper than the ancestry"), hostile_pass4.cases)
    assert first["held"] and first["aimed"], first


def test_round_five_cases_hold_with_their_own_errors(tmp_path):
    sys.path.insert(0, "bench")
    try:
        import hostile_pass3
        import hostile_pass5
    finally:
        sys.path.remove("bench")
    names = [c[0] for c in hostile_pass5.cases(hostile_pass3.setup(tmp_path))]
    for name in ("train: --resume without a checkpoint", "search: a profile's calibration CSV is a folder"):
        row = hostile_pass3.run_case(names.index(name), hostile_pass5.cases)
        assert row["held"] and row["aimed"], row
