"""A device's ``MODEL_CARD.md``, rendered from the manifest alone (its head and the device's entry)."""

from __future__ import annotations

from typing import Any

from factory.core.shapes import DescendantShape
from factory.device.accuracy import describe_decision


def selection_text(sel: dict[str, Any]) -> str:
    """How the device's shape was chosen, in one sentence (its entry's ``selection``)."""
    if sel.get("objective") != "accuracy":
        return "Chosen by the searcher as the highest-capacity shape (log FLOPs + 0.5 log params)"
    est = sel["estimator"]
    best = next(r for r in sel["candidates"] if r["chosen"])
    return (f"Chosen by a successive-halving probe (validation NLL {best.get('val_nll', float('nan')):.3f}, accuracy "
            f"{best['predicted_accuracy']:.3f} after {best.get('probe_steps', '?')} of the {est['budget_steps']} steps; rungs "
            f"{'/'.join(map(str, est['rungs']))}, {est['val_images']} validation images) among {len(sel['candidates'])} "
            f"Pareto-front candidates; {describe_decision(best.get('decision', {}))}")


def render(head: dict[str, Any], dev: dict[str, Any]) -> str:
    """The card of device entry ``dev`` of a manifest whose build-wide part is ``head``."""
    s, anc, lg, recipe, target = dev["shape"], head["ancestry"], head["learngene"], head["recipe"], dev["target"]
    in_chans = head["ancestry_arch"]["in_chans"]
    label = DescendantShape.from_dict(s).label()
    deploy = dev.get("deploy") or {}
    return f"""# {dev['name']}: {label}

**What it is.** A timm `VisionTransformer` (depth {s['depth']}, width {s['embed_dim']}, {s['num_heads']} heads, MLP ratio
{s['mlp_ratio']:g}, {s['img_size']}x{s['img_size']} input, patch {s['patch_size']}, {s['num_classes']} classes) for
{target['description']}.

**How it was made.** Initialised by `{recipe['init']}` from learngene `{(lg['sha256'] or '')[:12]}` ({lg['layers']} gene layers,
{lg['heads']} heads) of ancestry `{anc['spec']}` (`{anc['sha256'][:12]}`, weights: {anc['weights']}); fine-tuned
{recipe['finetune_steps']} steps on `{recipe['data']}` (seed {recipe['seed']}). {selection_text(dev.get('selection', {}))}, within the budgets
{dev['budgets']}.

**Numbers.** Test accuracy {dev['accuracy']['test']:.4f}; {dev['flops']['fvcore'] / 1e9:.4f} GFLOPs (fvcore);
{dev['params'] / 1e6:.3f} M parameters; predicted {dev['latency_ms']['predicted_target']:.4f} ms and
{dev['memory_mb']['predicted_target']:.1f} MB on the target ({target['precision']}, batch {target['batch']});
{dev['latency_ms']['host_onnxruntime']:.4f} ms with onnxruntime on the build host.
Deploy with **{deploy.get('format', 'onnx')}** ({deploy.get('reason', 'the only artifact')}; see `export/export.json`).

**How to run it.**
```python
import onnxruntime as ort, numpy as np
sess = ort.InferenceSession("export/model.onnx")
logits = sess.run(None, {{"images": np.zeros((1, {in_chans}, {s['img_size']}, {s['img_size']}), np.float32)}})[0]
```
or in PyTorch: `factory.core.checkpoint.load_descendant("model.safetensors")`. Preprocessing (size, mean, std) and class
names are in the ONNX metadata. For TensorRT see `export/export.json` (engine, or `trt_kit/build_engine.sh` on the device).
"""
