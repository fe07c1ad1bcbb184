"""``--hflip auto``: the build flips a folder's training views only where a mirror keeps the label
(:mod:`factory.core.mirror`), decided once before anything is planned, and recorded."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from factory.cli import cli
from factory.core.ancestry import load_demo_ancestry
from factory.core.mirror import MirrorProbe, check_mirror, choose_hflip, mcnemar_z
from factory.core.transfer import knn_loo_accuracy, knn_loo_predict
from factory.data import load_dataset
from factory.errors import FactoryError
from factory.pipeline.config import BuildConfig, finetune_recipe


def _draw(kind: str, label: int, g: torch.Generator) -> torch.Tensor:
    """A 28-px image of class ``label``. ``sided``: bright on the left (0) or on the right (1) -- each class the
    other's mirror image, as a 2 and a mirrored 2. ``symmetric``: a vertical bar, a horizontal bar or a hollow
    square, each centred (a mirror keeps the class); both with noise, so no image is its own mirror."""
    x = torch.rand(28, 28, generator=g) * 60
    w = int(torch.randint(9, 13, (1,), generator=g))
    if kind == "sided":
        cols = slice(0, w) if label == 0 else slice(28 - w, 28)
        x[:, cols] += 170
    elif label == 0:
        x[:, 14 - w // 3 : 14 + w // 3] += 170
    elif label == 1:
        x[14 - w // 3 : 14 + w // 3, :] += 170
    else:
        x[6:22, 6:22] += 170
        x[9:19, 9:19] -= 170
    return x.clamp(0, 255).to(torch.uint8)


def _folder(root, kind: str, per_class: int = 24):
    g = torch.Generator().manual_seed(0)
    classes = 2 if kind == "sided" else 3
    for split, n in (("train", per_class), ("val", 4), ("test", 4)):
        for label in range(classes):
            folder = root / split / str(label)
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(_draw(kind, label, g).numpy(), "L").save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def ancestry():
    return load_demo_ancestry()


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return {kind: _folder(tmp_path_factory.mktemp(kind), kind) for kind in ("sided", "symmetric")}


def test_the_rule_flips_only_where_a_mirror_keeps_the_class():
    probe = MirrorProbe()
    # digits (measured with the demo ancestry): mirrored queries fall to other classes, significantly
    assert choose_hflip(0.90, 0.29, 0.12, 512, 317, 3, probe)[0] == 0.0
    # textures: kept ~0.92, but the shortfall is noise (z 1.3): a symmetric task's kept moves about 1.0
    assert choose_hflip(0.50, 0.47, 0.12, 512, 83, 67, probe)[0] == probe.flip
    # a material loss that is significant is refused; the same kept on few discordant images is not
    assert choose_hflip(0.80, 0.60, 0.10, 400, 90, 10, probe)[0] == 0.0
    assert choose_hflip(0.80, 0.60, 0.10, 400, 3, 1, probe)[0] == probe.flip
    flip, why = choose_hflip(0.14, 0.10, 0.12, 200, 10, 2, probe)  # features at chance: cannot tell
    assert flip == 0.0 and "too little to tell" in why
    flip, why = choose_hflip(0.12, 0.10, 0.12, 200, 4, 0, MirrorProbe(min_signal_se=0))  # at chance: no division
    assert flip == 0.0 and "too little to tell" in why
    assert mcnemar_z(0, 0) == 0.0 and mcnemar_z(9, 0) == pytest.approx(3.0)
    with pytest.raises(FactoryError, match="invalid mirror probe"):
        MirrorProbe(min_kept=float("nan"))


def test_mirrored_queries_leave_their_own_image_out_of_the_vote():
    g = torch.Generator().manual_seed(1)
    f, y = torch.randn(40, 8, generator=g), torch.arange(40) % 4
    assert torch.equal(knn_loo_predict(f, y, 5, queries=f), knn_loo_predict(f, y, 5))
    right = float((knn_loo_predict(f, y, 5) == y).double().mean())
    assert right == pytest.approx(knn_loo_accuracy(f, y, 5))


@pytest.mark.parametrize(("kind", "flip"), [("sided", 0.0), ("symmetric", 0.5)])
def test_the_check_on_the_ancestrys_features(folders, ancestry, kind, flip):
    ds = load_dataset(str(folders[kind]), img_size=28, in_chans=1)
    data = ds.train.tensors()
    check = check_mirror(ancestry.model, data.images, data.labels)
    assert check.hflip == flip, check.reason
    assert check.accuracy > 0.9  # the classes are easy; what differs is the mirror
    if kind == "sided":
        assert check.mirrored_accuracy < 0.2 and check.lost > 30 and check.loss_z > 5
    else:
        assert check.kept > 0.9
    assert check.to_dict()["images"] == len(data.labels)


def test_the_build_decides_once_records_it_and_trains_with_the_number(folders, tmp_path):
    from factory.pipeline.build import build
    from factory.pipeline.context import BuildContext
    from factory.pipeline.view_choice import decide_hflip

    anc = load_demo_ancestry()
    for kind, flip in (("sided", 0.0), ("symmetric", 0.5)):
        ds = load_dataset(str(folders[kind]), img_size=28, in_chans=1)
        lines: list[str] = []
        ctx = BuildContext(tmp_path, BuildConfig(data=str(folders[kind])), None, lines.append, anc, ds)
        check = decide_hflip(ctx)
        assert ctx.cfg.hflip == flip and finetune_recipe(ctx.cfg).hflip == flip  # the recipe the keys hold
        assert lines and lines[0].startswith(f"training view: --hflip auto -> {flip:g}")
        assert check.images == len(ds.train)
    ctx = BuildContext(tmp_path, BuildConfig(data=str(folders["sided"]), hflip=0.3), None, lines.append, anc, ds)
    assert decide_hflip(ctx) is None and ctx.cfg.hflip == 0.3  # the user's number is kept, nothing measured
    digits = load_dataset("digits", img_size=28)
    ctx = BuildContext(tmp_path, BuildConfig(), None, lines.append, anc, digits)
    assert decide_hflip(ctx) is None and ctx.cfg.hflip == 0.0  # in memory: no flipped views exist
    from factory.device.profile import load_profile

    from .test_build import _profile

    profile = [load_profile(_profile(tmp_path, "dev", 0.2))]
    cfg = BuildConfig(data=str(folders["sided"]), finetune_steps=4, batch_size=8, candidates=2)
    plan = build(profile, tmp_path / "dry", cfg, log=lambda *_: None, dry_run=True)
    assert plan["hflip_check"]["hflip"] == 0.0 and plan["hflip_check"]["lost"] > 0
    cfg = BuildConfig(data=str(folders["symmetric"]), finetune_steps=4, batch_size=8, candidates=2)
    manifest = build(profile, tmp_path / "out", cfg, log=lambda *_: None)
    assert manifest["hflip_check"]["hflip"] == 0.5
    assert manifest["devices"][0]["finetune"]["config"]["hflip"] == 0.5  # what the fine-tune drew its views with
    assert "(--hflip auto: mirrored images keep their class" in (tmp_path / "out" / "report.md").read_text()


def test_the_cli_takes_auto_or_a_probability():
    result = CliRunner().invoke(cli, ["build", "--profile", "demo/jetson_orin", "--hflip", "sometimes", "--dry-run"])
    assert result.exit_code == 2 and "--hflip" in result.output and "or auto" in result.output
    result = CliRunner().invoke(cli, ["train", "--model", "x.safetensors", "--hflip", "auto", "--out", "o"])
    assert result.exit_code == 2 and "--hflip" in result.output  # train has no ancestry to decide with
    assert BuildConfig().hflip == "auto" and finetune_recipe(BuildConfig()).hflip == 0.0
    with pytest.raises(FactoryError, match="hflip"):
        BuildConfig(hflip="always")
