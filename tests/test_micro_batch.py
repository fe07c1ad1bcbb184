"""Micro-batches (issue 32): bounded activations, the same update as the whole batch."""

import dataclasses

import pytest
import torch

from factory import load_ancestry, sample_learngene
from factory.core.expanding_phase import ExpandingConfig, default_shapes
from factory.data import ImageTensors
from factory.training.expanding_loop import train_learngene
from factory.training.micro_batch import activation_mb_per_image, chunks, micro_batch_size, model_activation_mb
from factory.training.train import TrainConfig, train

from .helpers import make_vit, transfer_check_passes


def test_chunks_are_balanced_and_cover_the_batch():
    assert chunks(64, 24) == [22, 21, 21]
    assert chunks(64, 64) == [64] and chunks(64, 100) == [64] and chunks(5, 1) == [1] * 5
    for batch in (1, 7, 32, 63, 64):
        for micro in (1, 3, 12, 64):
            parts = chunks(batch, micro)
            assert sum(parts) == batch and max(parts) <= micro and max(parts) - min(parts) <= 1
    with pytest.raises(ValueError):
        chunks(0, 4)


def test_the_estimate_matches_what_was_measured_and_sets_the_micro_batch():
    # d24-w192-r4 at 224 px (197 tokens): measured 41.5 MB per image in bf16, 63 MB in fp32 (module docstring)
    bf16 = activation_mb_per_image(24, 197, 192, 768, "bf16")
    fp32 = activation_mb_per_image(24, 197, 192, 768, "fp32")
    assert 38 < bf16 < 46 and 58 < fp32 < 70
    assert activation_mb_per_image(12, 197, 192, 768, "bf16") == pytest.approx(bf16 / 2)
    assert micro_batch_size(64, bf16, 512) == 12 and micro_batch_size(64, bf16, 0) == 64
    assert micro_batch_size(64, bf16, 1) == 1  # never below one image
    vit = make_vit()  # 16 patches + the class token, width 64, 4 blocks
    assert model_activation_mb(vit, "fp32") == pytest.approx(activation_mb_per_image(4, 17, 64, 256, "fp32"))
    assert model_activation_mb(torch.nn.Linear(3, 3), "fp32") == 0.0  # no estimate: the whole batch


def _data(n: int = 16, classes: int = 10) -> ImageTensors:
    gen = torch.Generator().manual_seed(0)
    return ImageTensors(
        torch.randn(n, 3, 32, 32, generator=gen), torch.arange(n) % classes, [str(i) for i in range(10)]
    )


def test_a_fine_tune_in_micro_batches_makes_the_whole_batchs_update():
    cfg = TrainConfig(steps=3, batch_size=16, amp="off", warmup_steps=1, shift=0, memory_mb=0)
    whole, pieces = make_vit(seed=1), make_vit(seed=1)
    seen: list[int] = []
    pieces.register_forward_hook(lambda _m, args, _out: seen.append(len(args[0])))
    res_whole = train(whole, _data(), cfg, progress=False)
    tiny = model_activation_mb(pieces, "fp32") * 6.5  # 6 images per micro-batch: 16 = 6 + 5 + 5
    res_pieces = train(pieces, _data(), dataclasses.replace(cfg, memory_mb=tiny), progress=False)
    assert seen == [6, 5, 5] * 3
    for (name, a), b in zip(whole.state_dict().items(), pieces.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), name
    for h1, h2 in zip(res_whole.history, res_pieces.history, strict=True):
        assert h1["loss"] == pytest.approx(h2["loss"], abs=1e-4) and h1["acc"] == h2["acc"]


def test_an_expanding_phase_in_micro_batches_trains_the_same_learngene():
    anc = load_ancestry(make_vit())
    lg = sample_learngene(anc, 2, seed=0)
    shapes = default_shapes(lg, depths=[1, 4], widths=[64])
    data = _data()
    cfg = ExpandingConfig(steps=2, batch_size=16, amp="off", warmup_steps=1, memory_mb=0)
    whole, rep_whole = train_learngene(lg, anc, data, shapes, cfg, progress=False)
    small = dataclasses.replace(cfg, memory_mb=0.05)  # a d4 shape: 3 images at a time
    pieces, rep_pieces = train_learngene(lg, anc, data, shapes, small, progress=False)
    assert rep_pieces["micro_batches"][shapes[-1].label()] > 1 and rep_whole["micro_batches"][shapes[-1].label()] == 1
    for k, v in whole.genes.items():
        assert torch.allclose(v, pieces.genes[k], atol=1e-4, rtol=1e-4), k
    for d, m in whole.depth_maps.items():
        for a, b in zip(m.state_dict().values(), pieces.depth_maps[d].state_dict().values(), strict=True):
            assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    assert [h["loss"] for h in rep_whole["history"]] == pytest.approx(
        [h["loss"] for h in rep_pieces["history"]], abs=1e-4
    )


def test_int8_calibration_reads_one_batch_at_a_time():
    import numpy as np

    from export.quantize import ImageReader

    reader = ImageReader(np.zeros((10, 3, 8, 8), np.float32), batch=4, progress=False)
    assert len(reader) == 3  # onnxruntime's CalibStridedMinMax strides over batches
    reader.set_range(1, 2)
    assert reader.get_next()["images"].shape[0] == 4 and reader.get_next() is None
    reader.set_range(2, 3)
    assert reader.get_next()["images"].shape[0] == 2


def test_probe_features_run_in_batches_bounded_by_bytes():
    from factory.core.transfer import pooled_features

    vit, seen = make_vit(), []
    vit.forward_features = lambda x: (seen.append(len(x)), type(vit).forward_features(vit, x))[1]
    x = torch.randn(10, 3, 32, 32)  # 12 KB an image
    features = pooled_features(vit, x, batch_bytes=4 * 3 * 32 * 32 * 4)
    assert seen == [4, 4, 2] and features.shape == (10, 64)


def test_freed_memory_goes_back_to_the_os_on_linux():
    import platform

    from factory.io import release_freed_memory

    if platform.system() != "Linux":
        pytest.skip("malloc_trim is glibc's: elsewhere release_freed_memory does nothing and returns False")
    assert release_freed_memory() is True


def test_the_builds_memory_budget_reaches_both_trainings():
    from factory.pipeline.config import BuildConfig, expanding_config, finetune_recipe

    cfg = BuildConfig(train_memory_mb=128)
    assert expanding_config(cfg).memory_mb == 128 and finetune_recipe(cfg).memory_mb == 128
    assert expanding_config(BuildConfig()).memory_mb is None is finetune_recipe(BuildConfig()).memory_mb  # auto
    with pytest.raises(Exception, match="train memory"):
        BuildConfig(train_memory_mb=-1)


def test_the_automatic_budget_is_512_mb_on_the_cpu_and_half_the_free_gpu_memory_on_cuda():
    """On an H200 the 512-MB budget cut a DeiT-Tiny batch of 64 into 3-6 passes and the steps ran 2.1-2.7x
    longer (bench/RESULTS.md, GPU check): on CUDA the budget is the device's memory, not the host's RSS."""
    from factory.training.micro_batch import auto_memory_mb, resolve_memory_mb

    assert resolve_memory_mb(None, torch.device("cpu")) == 512.0
    assert resolve_memory_mb(128, torch.device("cpu")) == 128.0 and resolve_memory_mb(0, torch.device("cpu")) == 0
    assert auto_memory_mb("cuda", 140_000.0) == 70_000.0
    assert auto_memory_mb("cuda", 600.0) == 512.0  # a nearly full GPU: never below the CPU's budget
    assert auto_memory_mb("cuda", None) == 512.0 and auto_memory_mb("cpu", 140_000.0) == 512.0
    # a given number holds on CUDA too (a Jetson shares its memory with the host): read without a GPU
    assert resolve_memory_mb(256, torch.device("cuda")) == 256.0


@pytest.mark.parametrize(
    ("arg", "expected"), [("auto", None), ("AUTO", None), ("0", 0), ("128", 128), ("-1", "error"), ("lots", "error")]
)
def test_train_memory_mb_takes_whole_mb_or_auto(arg, expected):
    import click

    from factory.cli.common import AUTO_OR_MB

    if expected == "error":
        with pytest.raises(click.BadParameter, match="whole number of MB"):
            AUTO_OR_MB.convert(arg, None, None)
    else:
        assert AUTO_OR_MB.convert(arg, None, None) == expected


def test_spans_are_the_chunks_as_consecutive_slices():
    from factory.training.micro_batch import spans

    assert spans(5, 2) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    assert [s.stop - s.start for s in spans(64, 24)] == chunks(64, 24) and spans(64, 64) == [slice(0, 64)]


def test_a_dry_run_caps_its_measured_steps_activations_on_the_cpu_only():
    """A 224-px dry run timed a d24 expanding step at the build's 512-MB micro-batches and peaked at 1.8-1.9 GB
    (bench/RESULTS.md); its measured steps hold at most 192 MB. A GPU's activations are not the dry run's RSS."""
    from factory.training.micro_batch import DRY_RUN_CPU_MEMORY_MB, dry_run_memory_mb

    assert DRY_RUN_CPU_MEMORY_MB == 192
    assert dry_run_memory_mb(None, "cpu") == 192.0  # the build's default is 512
    assert dry_run_memory_mb(1024, "cpu") == 192.0 and dry_run_memory_mb(0, "cpu") == 192.0  # 0: no limit
    assert dry_run_memory_mb(128, "cpu") == 128.0  # a smaller budget is the build's own
    assert dry_run_memory_mb(None, "cuda") is None and dry_run_memory_mb(1024, "cuda") == 1024


def test_a_dry_run_times_its_steps_within_the_cap_and_a_build_at_its_own_budget(tmp_path, monkeypatch):
    import factory.training.expanding_loop as expanding_loop
    import factory.training.train as train_module
    from factory.device.profile import load_profile
    from factory.pipeline.build import BuildConfig, build
    from factory.pipeline.context import BuildContext, measured_memory_mb

    from .test_build import _profile

    real_measure, real_train = expanding_loop.measure_step_seconds, train_module.train
    seen: dict[str, list] = {"expanding": [], "finetune": []}

    def measure(lg, anc, shapes, cfg, **kwargs):
        seen["expanding"].append(cfg.memory_mb)
        return real_measure(lg, anc, shapes, cfg, **kwargs)

    def train(model, data, cfg, **kwargs):
        seen["finetune"].append(cfg.memory_mb)
        return real_train(model, data, cfg, **kwargs)

    transfer_check_passes(monkeypatch)  # the phase is planned: the ancestry transfers
    monkeypatch.setattr(expanding_loop, "measure_step_seconds", measure)
    monkeypatch.setattr(train_module, "train", train)
    cfg = BuildConfig(
        data="synthetic",
        batch_size=16,
        expand_steps=12,
        expand_batch_size=8,
        expand_min_steps=5,
        train_memory_mb=1024,
        objective="capacity",
        device="cpu",
    )
    lines: list[str] = []
    build([load_profile(_profile(tmp_path, "dev", 0.2))], tmp_path / "out", cfg, dry_run=True, log=lines.append)
    assert seen["expanding"] == [192.0] and seen["finetune"] and set(seen["finetune"]) == {192.0}, seen
    assert any("micro-batches of at most 192 MB, an upper bound" in line for line in lines), lines
    ctx = BuildContext(tmp_path, cfg, None, print, None, None)  # the build itself measures at its own budget
    assert measured_memory_mb(ctx, 1024, "cpu") == 1024 and measured_memory_mb(ctx, None, "cpu") is None
