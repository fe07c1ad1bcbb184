"""Device placement of the expanding phase's tensors, checked without a GPU.

The expanding phase runs where the genes are (CUDA on a GPU machine). An index chosen on the CPU and applied
to CUDA genes fails only there: the first GPU run of ``bench/gpu_check.py`` found ``_head_view_take`` doing so
("index is on cpu, different from other tensors on cuda:0"). PyTorch's fake tensors propagate devices without
allocating any, so a fake ``cuda`` learngene expanded and run forward here raises on every such mix.
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorDeviceMismatchError, FakeTensorMode

from factory import load_ancestry, sample_learngene
from factory.core.expand import expand_tensors
from factory.core.expanding_phase import (
    ExpandingConfig,
    GeneParameters,
    default_shapes,
    distill_loss,
    distill_pos_embed,
)
from factory.core.timm_vit import skeleton_vit


def fake_to(module: torch.nn.Module, device: str) -> torch.nn.Module:
    """``module.to(device)`` for fake tensors (``nn.Module.to`` swaps tensors, which fake ones refuse)."""
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is not None:
                m._parameters[name] = torch.nn.Parameter(p.detach().to(device), requires_grad=p.requires_grad)
        for name, b in list(m._buffers.items()):
            if b is not None:
                m._buffers[name] = b.to(device)
    return module


@pytest.fixture(scope="module")
def demo_learngene():
    anc = load_ancestry("demo")
    return anc, sample_learngene(anc, anc.arch.depth // 2, seed=0, rescale="std")


def test_fake_cuda_catches_a_cpu_index_on_cuda_genes():
    """The check itself can fail: a CPU index applied to a fake CUDA tensor raises."""
    with FakeTensorMode(allow_non_fake_inputs=True):
        genes = torch.empty(4, 3, device="cuda")
        with pytest.raises(FakeTensorDeviceMismatchError):
            genes.index_select(0, torch.tensor([0, 2]))


@pytest.mark.parametrize("selection", ["even", "importance"])
def test_an_expanding_step_on_cuda_genes_keeps_every_tensor_on_cuda(demo_learngene, selection):
    """Every default sandwich shape (narrower widths included, where heads and residual channels are cut) and
    the distillation at a smaller grid: expanded from CUDA genes, run forward, the loss on CUDA too."""
    anc, lg = demo_learngene
    arch = lg.arch
    shapes = default_shapes(lg)
    assert any(s.embed_dim < arch.embed_dim for s in shapes), "the sandwich cuts widths: the path that failed"
    small = arch.img_size - arch.patch_size  # one patch fewer a side, as distill_img_size would ask
    skeletons = {s: skeleton_vit(arch, s) for s in shapes}
    grid = (arch.img_size // arch.patch_size,) * 2
    with FakeTensorMode(allow_non_fake_inputs=True):
        work = fake_to(GeneParameters(lg, {s.depth for s in shapes}, ExpandingConfig()), "cuda")
        current = work.learngene(lg)
        x = torch.randn(2, arch.in_chans, arch.img_size, arch.img_size, device="cuda")
        for shape in shapes:
            state = expand_tensors(current, shape, selection=selection)
            assert {t.device.type for t in state.values()} == {"cuda"}, shape.label()
            logits = torch.func.functional_call(skeletons[shape], state, (x,))
            loss = distill_loss(logits.float(), torch.randn_like(logits), 2.0)
            assert loss.device.type == "cuda"
        resampled = distill_pos_embed(state["pos_embed"], grid, (small // arch.patch_size,) * 2, 1)
        assert resampled.device.type == "cuda"
