"""Build inputs a real user brings: a learngene made beforehand, the expanding phase's batch, an
ImageFolder without test/, a task whose labels are not the ancestry's."""

import dataclasses
import json

from click.testing import CliRunner

from factory.cli import cli
from factory.core.assets import PACKAGED_LEARNGENE

from .helpers import image_folder as _folder
from .helpers import one_line_exit_2 as _one_line_exit_2
from .test_build import _profile


def _run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_build_reuses_a_given_learngene_and_refuses_one_from_another_ancestry(tmp_path):
    prof = _profile(tmp_path, "tiny")
    res = _run(
        "build",
        "--profile",
        prof,
        "--out",
        tmp_path / "o",
        "--data",
        "synthetic",
        "--steps",
        "2",
        "--batch-size",
        "8",
        "--learngene",
        PACKAGED_LEARNGENE,
    )
    assert res.exit_code == 0, res.output
    assert f"learngene: the given learngene {PACKAGED_LEARNGENE}" in res.output
    assert "learngene expanding phase" not in res.output and "expanding-phase steps" not in res.output  # none ran
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    shipped = json.loads((PACKAGED_LEARNGENE / "learngene.json").read_text())["tensors_sha256"]
    assert manifest["learngene"]["sha256"] == shipped and manifest["learngene"]["recipe"]["given"] == shipped
    assert "objective: capacity (auto: descendants of a trained learngene" in res.output  # it had an expanding phase
    other = tmp_path / "lg"
    assert (
        _run("learngene", "--ancestry", "random:vit_tiny_patch16_224", "--layers", "2", "--out", other).exit_code == 0
    )
    _one_line_exit_2(
        _run("build", "--profile", prof, "--out", tmp_path / "p", "--data", "synthetic", "--learngene", other),
        "was made from another ancestry",
    )
    assert not (tmp_path / "p").exists()
    _one_line_exit_2(
        _run(
            "build",
            "--profile",
            prof,
            "--out",
            tmp_path / "q",
            "--data",
            "synthetic",
            "--learngene",
            tmp_path / "missing",
        ),
        "not a learngene directory",
    )


def test_the_expanding_phase_batch_is_a_build_option(tmp_path):
    prof = _profile(tmp_path, "tiny")
    res = _run(
        "build",
        "--profile",
        prof,
        "--out",
        tmp_path / "o",
        "--data",
        "synthetic",
        "--expand-steps",
        "3",
        "--expand-min-steps",  # 3 steps count as trained (else --init auto skips a phase that short)
        "1",
        "--expand-batch-size",
        "4",
        "--dry-run",
    )
    assert res.exit_code == 0, res.output
    assert "learngene: will be sampled and trained for 3 expanding-phase steps (~" in res.output
    from factory.pipeline.config import BuildConfig, expanding_config

    assert expanding_config(BuildConfig(expand_batch_size=4)).batch_size == 4


def test_a_folder_without_test_split_says_so(tmp_path):
    data = _folder(tmp_path / "data", n=4, size=28)
    res = _run(
        "build",
        "--profile",
        _profile(tmp_path, "tiny"),
        "--out",
        tmp_path / "o",
        "--data",
        data,
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--ancestry",
        "demo",
    )
    assert "data: test accuracy is measured on val (no test/ folder" in res.output, res.output


def test_learngene_train_reports_zero_shot_only_for_the_ancestrys_labels(tmp_path):
    lg = tmp_path / "lg"
    assert _run("learngene", "--ancestry", "demo", "--layers", "2", "--out", lg).exit_code == 0
    res = _run(
        "learngene",
        "train",
        "--learngene",
        lg,
        "--data",
        "synthetic",
        "--steps",
        "1",
        "--batch-size",
        "4",
        "--depths",
        "2",
        "--out",
        tmp_path / "t",
    )
    assert res.exit_code == 0, res.output
    assert "zero-shot accuracy not reported: synthetic has 4 classes, the ancestry's classifier 10" in res.output
    assert "zero-shot accuracy 0." not in res.output


def test_the_expanding_phase_data_is_loaded_once_per_build(tmp_path, monkeypatch):
    """The set-up's batch check and the phase itself read one loaded copy of ``--expand-data`` (a second load of
    a large folder or MNIST cost seconds and its memory twice)."""
    import factory.data
    from factory.core.ancestry import load_ancestry
    from factory.data import load_dataset
    from factory.pipeline.cache import Cache
    from factory.pipeline.config import BuildConfig
    from factory.pipeline.context import BuildContext
    from factory.pipeline.learngene_stage import expanding_dataset, fit_expanding_batch

    loads = []

    def counting(spec, **kw):
        loads.append(spec)
        return load_dataset(spec, **kw)

    monkeypatch.setattr(factory.data, "load_dataset", counting)
    cfg = BuildConfig(data="synthetic", expand_data="digits", expand_batch_size=5000)
    ctx = BuildContext(tmp_path, cfg, Cache(tmp_path / ".cache", print), print, load_ancestry("demo"), None)
    fit_expanding_batch(ctx)
    assert ctx.cfg.expand_batch_size == 1000  # capped at digits' training split
    spec, first = expanding_dataset(ctx)
    assert (spec, loads) == ("digits", ["digits"])
    assert expanding_dataset(ctx)[1] is first and loads == ["digits"]
    same = BuildContext(
        tmp_path, dataclasses.replace(cfg, expand_data="synthetic"), ctx.cache, print, ctx.ancestry, first
    )
    assert expanding_dataset(same) == ("synthetic", first) and loads == ["digits"]  # the build's own data: no load
