"""A folder's training view: the random crop's least area and the horizontal flip are the fine-tune's to set
(``TrainConfig.hflip``/``crop_scale``, ``--hflip``/``--crop-scale``), not timm's ImageNet recipe by default."""

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from factory.cli import cli
from factory.data import load_dataset
from factory.data.stream import TrainView
from factory.errors import FactoryError
from factory.pipeline.config import BuildConfig, finetune_recipe
from factory.training.batches import training_batches
from factory.training.train import TrainConfig


@pytest.fixture(scope="module")
def sided(tmp_path_factory):
    """Two classes that are each other's mirror image: bright on the left (class 0) or on the right (class 1),
    as a 2 and a mirrored 2 -- the data a flip mislabels."""
    root = tmp_path_factory.mktemp("sided")
    for split, n in (("train", 8), ("val", 2), ("test", 2)):
        for label, bright in ((0, slice(0, 16)), (1, slice(16, 32))):
            folder = root / split / str(label)
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = torch.full((32, 32), 20, dtype=torch.uint8)
                pixels[:, bright] = 235
                Image.fromarray(pixels.numpy(), "L").save(folder / f"{i}.png")
    return load_dataset(str(root), img_size=32, in_chans=1)


def _bright_side_kept(ds, view: TrainView, steps: int = 6) -> float:
    """The fraction of training views whose bright half is the side their label says."""
    kept = total = 0
    for x, y in training_batches(ds.train, 16, range(steps), seed=0, shift=0, view=view):
        left, right = x[..., :16].mean(dim=(1, 2, 3)), x[..., 16:].mean(dim=(1, 2, 3))
        kept += int(((left > right) == (y == 0)).sum())
        total += len(y)
    return kept / total


def test_the_fine_tunes_view_never_mirrors_and_timms_does(sided):
    assert _bright_side_kept(sided, TrainConfig().view()) == 1.0  # hflip 0: every view keeps its side
    timm = _bright_side_kept(sided, TrainView())  # timm's ImageNet recipe: a flip at p = 0.5
    assert 0.25 < timm < 0.75  # about half the views now show the other class's picture under this label
    assert _bright_side_kept(sided, TrainView(hflip=1.0, crop_scale=1.0)) == 0.0


def test_the_crop_scale_bounds_how_much_of_the_image_a_view_keeps(sided):
    """A view of at least the whole area (crop scale 1) keeps both halves; at 0.08 some views hold only one."""

    def spread(view):
        xs = torch.cat([x for x, _ in training_batches(sided.train, 16, range(4), seed=0, shift=0, view=view)])
        left, right = xs[..., :16].mean(dim=(1, 2, 3)), xs[..., 16:].mean(dim=(1, 2, 3))
        return float((left - right).abs().min())  # a view of one half only: both halves alike

    assert spread(TrainView(hflip=0.0, crop_scale=1.0)) > 1.0
    assert spread(TrainView(hflip=0.0, crop_scale=0.08)) < spread(TrainView(hflip=0.0, crop_scale=1.0))


def test_the_build_passes_its_view_to_every_fine_tune_and_refuses_a_bad_one():
    assert (TrainConfig().hflip, TrainConfig().crop_scale) == (0.0, 0.5)
    recipe = finetune_recipe(BuildConfig(hflip=0.5, crop_scale=0.08))
    assert recipe.view() == TrainView(0.5, 0.08)  # what probes and fine-tunes train with, and the cache key holds
    for bad in ({"hflip": 1.5}, {"crop_scale": 0.0}, {"crop_scale": 2.0}):
        with pytest.raises(FactoryError, match="training view needs hflip in"):
            TrainConfig(**bad)
    result = CliRunner().invoke(cli, ["build", "--profile", "demo/jetson_orin", "--hflip", "2", "--dry-run"])
    assert result.exit_code == 2 and "--hflip" in result.output
    with pytest.raises(FactoryError, match="invalid build setting: hflip"):
        BuildConfig(hflip=float("nan"))  # a range check lets NaN through; the config does not
    result = CliRunner().invoke(cli, ["build", "--profile", "demo/jetson_orin", "--hflip", "nan", "--dry-run"])
    assert result.exit_code == 2 and "hflip" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(cli, ["train", "--model", "x.safetensors", "--crop-scale", "0", "--out", "o"])
    assert result.exit_code == 2 and "--crop-scale" in result.output
