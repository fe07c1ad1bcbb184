import pytest
import torch
from safetensors.torch import save_file

from factory import FactoryError, load_ancestry
from factory.core.ancestry import DEMO_ARCH

from .helpers import make_vit


def test_module_ancestry_reads_arch_and_hash(vit, ancestry):
    arch = ancestry.arch
    assert (arch.depth, arch.embed_dim, arch.num_heads, arch.mlp_hidden) == (4, 64, 4, 256)
    assert (arch.img_size, arch.patch_size, arch.num_classes, arch.class_token) == (32, 8, 10, True)
    assert load_ancestry(make_vit()).sha256 == ancestry.sha256
    assert load_ancestry(make_vit(seed=1)).sha256 != ancestry.sha256


def test_random_timm_name_and_demo():
    anc = load_ancestry("random:vit_tiny_patch16_224")
    assert anc.arch.embed_dim == 192 and anc.arch.depth == 12 and anc.weights == "random"
    demo = load_ancestry("demo")
    assert demo.arch == DEMO_ARCH


@pytest.mark.parametrize("wrapper", [None, "model", "state_dict"])
def test_pth_checkpoint_with_arch_name(tmp_path, wrapper):
    src = load_ancestry("random:vit_tiny_patch16_224", seed=3)
    state = src.model.state_dict()
    path = tmp_path / "ckpt.pth"
    torch.save({wrapper: state, "epoch": 3} if wrapper else state, path)
    anc = load_ancestry(f"{path}@vit_tiny_patch16_224")
    assert anc.sha256 == src.sha256 and anc.weights == "checkpoint"


def test_safetensors_checkpoint(tmp_path):
    src = load_ancestry("random:vit_tiny_patch16_224", seed=3)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.model.state_dict().items()}, str(path))
    assert load_ancestry(f"{path}@vit_tiny_patch16_224").sha256 == src.sha256
    with pytest.raises(FactoryError, match="does not name its architecture"):
        load_ancestry(path)


def test_pth_with_code_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path.write_bytes(pickle.dumps({"model": Evil()}))
    with pytest.raises(FactoryError, match="contains code or objects other than tensors and was refused"):
        load_ancestry(f"{path}@vit_tiny_patch16_224")
    assert "pwned" not in capsys.readouterr().out
    torch.save({"model": Evil()}, tmp_path / "evil2.pth")  # a real torch checkpoint carrying code
    with pytest.raises(FactoryError, match="contains code or objects other than tensors and was refused") as info:
        load_ancestry(f"{tmp_path / 'evil2.pth'}@vit_tiny_patch16_224")
    assert "weights_only" not in str(info.value) and "pwned" not in capsys.readouterr().out


def test_mismatched_checkpoints_are_rejected(tmp_path):
    src = load_ancestry("random:vit_tiny_patch16_224")
    path = tmp_path / "ckpt.pth"
    torch.save(src.model.state_dict(), path)
    with pytest.raises(FactoryError, match="does not fit architecture 'vit_small_patch16_224'.*shape"):
        load_ancestry(f"{path}@vit_small_patch16_224")
    state = src.model.state_dict()
    del state["blocks.3.attn.qkv.weight"]
    torch.save(state, path)
    with pytest.raises(FactoryError, match="missing 'blocks.3.attn.qkv.weight'"):
        load_ancestry(f"{path}@vit_tiny_patch16_224")
    with pytest.raises(FactoryError, match="does not exist"):
        load_ancestry(f"{tmp_path}/nope.pth@vit_tiny_patch16_224")


@pytest.mark.parametrize(
    "spec,match",
    [
        ("random:resnet18", "ResNet, not a timm VisionTransformer"),
        ("resnet18", "ResNet, not a timm VisionTransformer"),  # rejected before any download
        ("random:vit_small_patch16_18x2_224", "not expand"),  # parallel blocks
        ("random:vit_tiny_r_s16_p8_224", "hybrid ViT .* CNN backbone"),  # a ResNet stem: named, not a stray tensor
        ("random:deit_tiny_distilled_patch16_224", "distillation token"),
        ("random:vit_not_a_model", "unknown timm model"),
        ("no_such_thing", "neither 'demo'"),
        ("", "empty ancestry spec"),
    ],
)
def test_bad_specs(spec, match):
    with pytest.raises(FactoryError, match=match):
        load_ancestry(spec)


def test_qk_norm_vit_is_rejected():
    with pytest.raises(FactoryError, match="qk-norm"):
        load_ancestry(make_vit(qk_norm=True))


def test_a_model_folder_reads_as_its_model_file(tmp_path, demo_file):
    """A `train` run's folder (or a build's device folder) holds model.safetensors: export took it, flops, train
    --model and --ancestry said "is a directory, not a regular file". Every reader takes it now, and the build's
    cache fingerprints the file's weights, not the folder's name."""
    import shutil

    from factory.core.assets import ancestry_fingerprint

    run = tmp_path / "run"
    run.mkdir()
    shutil.copyfile(demo_file, run / "model.safetensors")
    assert load_ancestry(run).sha256 == load_ancestry(demo_file).sha256
    assert ancestry_fingerprint(str(run)) == ancestry_fingerprint(str(run / "model.safetensors"))
    with pytest.raises(FactoryError, match=r"is a folder without model.safetensors; pass a checkpoint file, or a"):
        load_ancestry(tmp_path)
