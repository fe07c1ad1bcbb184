"""Real-scale inputs (issue 21): streamed ImageFolder data, CPU bf16, lower-resolution distillation."""

import subprocess
import sys

import pytest
import torch

from factory import FactoryError, load_ancestry, sample_learngene
from factory.core.expanding_phase import ExpandingConfig, default_shapes, distill_pos_embed, recipe_fields
from factory.data import in_memory, load_dataset
from factory.data.generate import write_image_folder
from factory.data.stream import ImageFiles
from factory.training.batches import training_batches
from factory.training.expanding_loop import train_learngene
from factory.training.precision import precision_for
from factory.training.train import TrainConfig, train

from .helpers import make_vit


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_image_folder(
        tmp_path_factory.mktemp("photos"), classes=3, size=48, per_class={"train": 12, "val": 4, "test": 4}
    )


def test_a_folder_is_streamed_not_decoded_at_load(folder):
    ds = load_dataset(str(folder), img_size=32, in_chans=3, min_side=8)
    assert isinstance(ds.train, ImageFiles) and len(ds.train) == 36 and ds.in_chans == 3
    assert ds.train.cache is None and ds.train.labels.tolist() == sorted(ds.train.labels.tolist())
    x = ds.test.tensors().images
    assert x.shape == (12, 3, 32, 32) and abs(float(x.mean())) < 3  # normalised with ImageNet's mean/std
    capped = in_memory(ds, cap_bytes=4 * 3 * 32 * 32 * 5, train_images=6)
    assert capped.val.images.shape[0] == 5  # bounded by the cap
    # a sample spread over the split, which a folder lists by class: every class, never the first files only
    assert set(capped.val.labels.tolist()) == {0, 1, 2} and set(capped.train.labels.tolist()) == {0, 1, 2}


def test_streamed_batches_are_a_pure_function_of_seed_and_step(folder):
    ds = load_dataset(str(folder), img_size=32, in_chans=3)
    one = list(training_batches(ds.train, 8, range(0, 3), seed=1, shift=0))
    again = list(training_batches(ds.train, 8, range(2, 3), seed=1, shift=0))  # a resume at step 2
    other = list(training_batches(ds.train, 8, range(0, 1), seed=2, shift=0))
    assert torch.equal(one[2][0], again[0][0]) and torch.equal(one[2][1], again[0][1])
    assert not torch.equal(one[0][0], other[0][0])
    assert one[0][0].shape == (8, 3, 32, 32)


def test_the_uint8_cache_is_built_only_under_its_cap(folder):
    ds = load_dataset(str(folder), img_size=32, in_chans=3)
    side = round(32 / 0.875)
    said = []
    assert ds.train.cached(cap_bytes=10, log=said.append).cache is None and "not used" in said[0]
    cached = ds.train.cached(cap_bytes=1 << 30)
    assert cached.cache.dtype == torch.uint8 and tuple(cached.cache.shape) == (36, 3, side, side)
    x = next(training_batches(cached, 4, range(0, 1), seed=0, shift=0))[0]
    assert x.shape == (4, 3, 32, 32)


def test_training_on_a_streamed_folder_learns(folder):
    ds = load_dataset(str(folder), img_size=32, in_chans=3)
    model = make_vit(img_size=32, patch_size=8, num_classes=3, in_chans=3)
    result = train(
        model, ds.train, TrainConfig(steps=30, batch_size=12, lr=2e-3, warmup_steps=3), val_data=ds.val, progress=False
    )
    assert result.val_accuracy >= 0.6  # three hues: chance is 0.33


def test_bad_folders_get_one_line(folder, tmp_path):
    with pytest.raises(FactoryError, match=r"is \d+x\d+ pixels, smaller than one 16-px patch"):
        tiny = write_image_folder(tmp_path / "tiny", classes=2, size=4, per_class={"train": 2, "val": 1}, fmt="PNG")
        load_dataset(str(tiny), img_size=32, in_chans=3, min_side=16)


def test_a_greyscale_folder_is_repeated_into_an_rgb_models_channels_and_says_so(tmp_path):
    """X-rays for an ImageNet ViT: each grey image read as three equal channels (timm's loader converts to RGB),
    said in the data's notes; the same folder for a 1-channel model is read as it is."""
    grey = write_image_folder(tmp_path / "grey", classes=2, size=32, per_class={"train": 2, "val": 1}, mode="L")
    ds = load_dataset(str(grey), img_size=32, in_chans=3)
    x = ds.train.tensors().images
    assert x.shape[1] == 3 and ds.notes and "greyscale (mode L)" in ds.notes[0]
    raw = x * torch.tensor(ds.std).view(1, 3, 1, 1) + torch.tensor(ds.mean).view(1, 3, 1, 1)
    assert torch.allclose(raw[:, 0], raw[:, 1], atol=1e-5) and torch.allclose(raw[:, 1], raw[:, 2], atol=1e-5)
    one = load_dataset(str(grey), img_size=32, in_chans=1)
    assert one.in_chans == 1 and one.notes == () and load_dataset(str(tmp_path / "grey"), 32, 3).identity == ds.identity


def test_cli_trains_an_rgb_ancestry_on_a_greyscale_folder_and_says_it_repeats_the_grey(tmp_path):
    grey = write_image_folder(tmp_path / "grey", classes=2, size=32, per_class={"train": 2, "val": 1}, mode="L")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "factory.cli",
            "train",
            "--model",
            "random:vit_tiny_patch16_224",
            "--data",
            str(grey),
            "--steps",
            "1",
            "--batch-size",
            "2",
            "--out",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "data: the images are greyscale (mode L): each is repeated into the model's 3 channels" in proc.stdout
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_cpu_precision_follows_the_hardware(monkeypatch):
    cpu = torch.device("cpu")
    assert precision_for(cpu, "off") == "fp32" and precision_for(cpu, "bf16") == "bf16"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert precision_for(cpu, "auto") == "fp32"
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    assert precision_for(cpu, "auto") == "bf16"
    with pytest.raises(FactoryError, match="fp16 autocast needs a CUDA device"):
        precision_for(cpu, "fp16")


def test_bf16_training_stays_close_to_fp32(folder):
    from factory.data import make_synthetic

    data = make_synthetic(img_size=16, num_classes=4, n_train=128, n_val=64, in_chans=3)
    accs = {}
    for amp in ("off", "bf16"):
        model = make_vit(img_size=16, patch_size=4, num_classes=4, in_chans=3)
        res = train(
            model, data.train, TrainConfig(steps=40, batch_size=32, amp=amp, seed=0), val_data=data.val, progress=False
        )
        accs[amp] = res.val_accuracy
        assert res.precision == ("fp32" if amp == "off" else "bf16")
    assert abs(accs["off"] - accs["bf16"]) <= 0.1 and accs["bf16"] > 0.5


def test_pos_embed_resampling_is_differentiable_and_exact_at_the_same_grid():
    pos = torch.randn(1, 1 + 16, 8, requires_grad=True)
    assert distill_pos_embed(pos, (4, 4), (4, 4), 1) is pos
    small = distill_pos_embed(pos, (4, 4), (2, 2), 1)
    assert small.shape == (1, 1 + 4, 8) and torch.equal(small[:, :1], pos[:, :1])
    small.sum().backward()
    assert pos.grad is not None and float(pos.grad[:, 1:].abs().sum()) > 0


def test_lower_resolution_distillation_trains_the_full_size_learngene():
    teacher = make_vit(img_size=16, patch_size=4, num_classes=4)
    lg = sample_learngene(teacher, 2, 4)
    from factory.data import make_synthetic

    data = make_synthetic(img_size=16, num_classes=4, n_train=64, n_val=16, in_chans=3)
    shapes = default_shapes(lg, [1, 2], [lg.arch.embed_dim])
    anc = load_ancestry(teacher)
    trained, report = train_learngene(
        lg, anc, data.train, shapes, ExpandingConfig(steps=8, batch_size=16, distill_img_size=8), progress=False
    )
    assert report["distill_img_size"] == 8 and report["loss_last"] < report["loss_first"]
    assert trained.stem["pos_embed"].shape == lg.stem["pos_embed"].shape  # still the ancestry's grid
    assert not torch.equal(trained.stem["pos_embed"], lg.stem["pos_embed"])  # and it trained
    with pytest.raises(FactoryError, match="multiple of the ancestry's patch size 4"):
        train_learngene(lg, anc, data.train, shapes, ExpandingConfig(steps=1, distill_img_size=10), progress=False)


def test_precision_is_not_part_of_the_learngene_recipe():
    assert "amp" not in recipe_fields(ExpandingConfig(amp="bf16"))
    assert recipe_fields(ExpandingConfig(amp="bf16")) == recipe_fields(ExpandingConfig(amp="off"))
    assert recipe_fields(ExpandingConfig(distill_img_size=14)) != recipe_fields(ExpandingConfig())


def test_the_default_build_still_uses_the_shipped_learngene():
    from factory.core.ancestry import load_ancestry
    from factory.pipeline.config import BuildConfig, build_learngene_recipe
    from factory.pipeline.stages import shipped_learngene

    anc = load_ancestry("demo")
    assert shipped_learngene(build_learngene_recipe(BuildConfig(), anc)) is not None
    assert shipped_learngene(build_learngene_recipe(BuildConfig(amp="off"), anc)) is not None
    assert shipped_learngene(build_learngene_recipe(BuildConfig(expand_img_size=21), anc)) is None


def test_streamed_peak_memory_does_not_grow_with_the_folder(tmp_path):
    """Peak RSS of a child that trains 3 steps on 40 vs 400 images of 160 px at 96 px: the same within 20 MB
    (decoded whole as float32 the 360 more images would add 40 MB)."""
    script = (
        "import resource, sys; from factory.data import load_dataset; from factory.training.train import TrainConfig, train; "
        "from tests.helpers import make_vit; ds = load_dataset(sys.argv[1], img_size=96, in_chans=3); "
        "train(make_vit(img_size=96, patch_size=16, num_classes=2, in_chans=3), ds.train, TrainConfig(steps=3, batch_size=8), "
        "progress=False); print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    peaks = []
    for n in (20, 200):
        root = write_image_folder(tmp_path / f"f{n}", classes=2, size=160, per_class={"train": n, "val": 2})
        proc = subprocess.run([sys.executable, "-c", script, str(root)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-1500:]
        peaks.append(int(proc.stdout.split()[-1]) / 1024)
    assert peaks[1] - peaks[0] < 20, peaks


def test_the_deploy_choice_for_another_device_comes_from_its_cost_model():
    from factory.core.ancestry import DEMO_ARCH
    from factory.device.deploy import chooser, predicted_deployment
    from factory.device.profile import load_profile

    pi = load_profile("demo/raspberry_pi5")
    # the Pi's FP32 time is its own cost model's; INT8's is that times INT8's speed-up measured on the build host
    # (0.2 / 0.1 ms here: 0.5x), never the datasheet's 4x peak ratio
    arts = {
        "onnx": {"latency_ms_b1": 0.2, "test_accuracy": 0.95},
        "onnx-int8": {"latency_ms_b1": 0.1, "test_accuracy": 0.949},
        "openvino": {"latency_ms_b1": 0.05},
    }
    d = predicted_deployment(pi, DEMO_ARCH, DEMO_ARCH.shape(), arts)
    assert d["format"] == "onnx-int8" and "cost model" in d["basis"] and "host timings do not transfer" in d["reason"]
    assert set(d["candidates_ms_predicted"]) == {"onnx", "onnx-int8"}  # openvino is not the Pi profile's runtime
    pred = d["candidates_ms_predicted"]
    assert (
        pred["onnx-int8"] == pytest.approx(pred["onnx"] * 0.5, rel=1e-3) and "measured on the build host" in d["basis"]
    )
    arts["onnx-int8"]["latency_ms_b1"] = 0.3  # INT8 slower than FP32 where it was measured: FP32 deploys
    assert predicted_deployment(pi, DEMO_ARCH, DEMO_ARCH.shape(), arts)["format"] == "onnx"
    arts["onnx-int8"]["latency_ms_b1"] = 0.1
    arts["onnx-int8"]["test_accuracy"] = 0.90  # 5 points worse: not verified, so not deployable
    assert predicted_deployment(pi, DEMO_ARCH, DEMO_ARCH.shape(), arts)["format"] == "onnx"
    assert chooser(load_profile("host")) is None and chooser(None) is None and chooser(pi) is not None


def test_a_streamed_decode_leaves_the_sigchld_handler_as_it_was(folder):
    import signal

    before = signal.getsignal(signal.SIGCHLD)
    ds = load_dataset(str(folder), img_size=32, in_chans=3)
    assert ds.val.tensors().images.shape[0] == 12  # decoded by a worker process
    assert (
        signal.getsignal(signal.SIGCHLD) == before
    )  # torch's own handler (which crashed a later child's exit) is gone


def test_evaluation_batches_are_bounded_by_bytes_not_by_count(folder):
    from factory.data import ImageTensors
    from factory.training.batches import EVAL_BATCH_BYTES, eval_batch_size, eval_batches

    small = ImageTensors(torch.zeros(600, 1, 28, 28), torch.zeros(600, dtype=torch.long))
    assert eval_batch_size(small, 512) == 512  # 3 KB images: the count binds
    big = ImageTensors(torch.zeros(2, 3, 224, 224), torch.zeros(2, dtype=torch.long))
    assert eval_batch_size(big, 512) == EVAL_BATCH_BYTES // (4 * 3 * 224 * 224) == 55  # 602 KB images: the bytes
    ds = load_dataset(str(folder), img_size=32, in_chans=3)
    assert eval_batch_size(ds.val, 512) == 512 and [len(x) for x in eval_batches(small, 512)] == [512, 88]
