"""A device's ``MODEL_CARD.md``, rendered from the manifest alone (its head and the device's entry).

The card is a Hugging Face model card: YAML front matter (``library_name: timm``, tags, license,
datasets, ``model-index`` with the measured test accuracy) that ``huggingface_hub.ModelCard.load``
reads, then what the model is, its lineage, numbers, how to run it (timm, onnxruntime), its
intended use and its limitations.
"""

from __future__ import annotations

from typing import Any

import yaml

from factory.core.shapes import DescendantShape
from factory.device.accuracy import describe_decision
from factory.pipeline.markdown import md_code, md_text


def shipped_text(dev: dict[str, Any]) -> str:
    """The card's clause on the shipped artifact's latency when it is not the profile-precision prediction."""
    shipped = dev["latency_ms"].get("shipped")
    if not shipped or shipped["ms"] == dev["latency_ms"]["predicted_target"]:
        return ""
    return f"; the shipped `{shipped['format']}`: {shipped['ms']:.4f} ms ({shipped['basis']}), what the budget verdicts use"


def not_written_text(dev: dict[str, Any]) -> str:
    """The card's line on the profile's formats the export could not write (empty when it wrote them all), and
    on the artifacts whose delegate leaves ops on the slow path (``warning``: below the coverage threshold)."""
    skipped = dev.get("formats_not_written") or {}
    warned = {k: a["warning"] for k, a in dev.get("artifacts", {}).items() if a.get("warning")}
    text = " **Not written:** " + "; ".join(f"`{k}`: {md_text(v)}" for k, v in skipped.items()) + "." if skipped else ""
    if warned:
        text += " **Warning:** " + "; ".join(f"`{k}`: {md_text(v)}" for k, v in warned.items()) + "."
    return text


def selection_text(sel: dict[str, Any]) -> str:
    """How the device's shape was chosen, in one sentence (its entry's ``selection``)."""
    if sel.get("objective") != "accuracy":
        return "Chosen by the searcher as the highest-capacity shape (log FLOPs + 0.5 log params)"
    est = sel["estimator"]
    best = next(r for r in sel["candidates"] if r["chosen"])
    return (
        f"Chosen by a successive-halving probe (validation NLL {best.get('val_nll', float('nan')):.3f}, accuracy "
        f"{best['predicted_accuracy']:.3f} after {best.get('probe_steps', '?')} of the {est['budget_steps']} steps; rungs "
        f"{'/'.join(map(str, est['rungs']))}, {est['val_images']} validation images) among {len(sel['candidates'])} "
        f"Pareto-front candidates; {describe_decision(best.get('decision', {}))}"
        + (
            f"; one fine-tune with {', '.join(sel['shares_fine_tune_with'])}"
            if sel.get("shares_fine_tune_with")
            else ""
        )
    )


def front_matter(head: dict[str, Any], dev: dict[str, Any]) -> dict[str, Any]:
    """The card's metadata block (the Hugging Face model card fields)."""
    data = head["recipe"]["data"]
    dataset = data if "/" not in data else "custom-imagefolder"
    base = head["ancestry"].get("base_model")  # a named pretrained ancestry: the Hub id of its weights
    return {
        **({"base_model": base, "base_model_relation": "finetune"} if base else {}),
        "library_name": "timm",
        "license": head.get("license", "other"),
        "pipeline_tag": "image-classification",
        "tags": ["image-classification", "timm", "vision-transformer", "peg-factory", "learngene", dev["name"]],
        "datasets": [dataset],
        "metrics": ["accuracy"],
        "model-index": [
            {
                "name": f"{dev['name']}-{DescendantShape.from_dict(dev['shape']).label()}",
                "results": [
                    {
                        "task": {"type": "image-classification", "name": "Image Classification"},
                        "dataset": {"name": dataset, "type": dataset, "split": "test"},
                        "metrics": [
                            {
                                "type": "accuracy",
                                "value": round(float(dev["accuracy"]["test"]), 4),
                                "name": "Test accuracy",
                            }
                        ],
                    }
                ],
            }
        ],
    }


def use_text(dev: dict) -> str:
    """The real use the profile's budgets are sized for, and the input size when it is not the model's."""
    target = dev.get("target", {})
    text = f" (budgets for: {md_text(target['use'])})" if target.get("use") else ""
    return text + (f"; note: {dev['input_size_note']}" if dev.get("input_size_note") else "")


def source_text(dev: dict, lg: dict) -> str:
    """Where the initial weights came from: the learngene (peg), the ancestry itself, or nowhere (scratch)."""
    init = dev.get("init", "peg")
    if init == "scratch":
        return "(timm's random initialisation, seeded; nothing inherited) with the architecture"
    if init in ("weight_selection", "tleg"):
        return "from the layers"
    return f"from learngene `{(lg['sha256'] or '')[:12]}` ({lg['layers']} gene layers, {lg['heads']} heads)"


def steps_text(dev: dict, recipe: dict) -> str:
    """The fine-tuning steps the model had: a time budget's paced count (factory.pipeline.pacing) says so."""
    finetune = dev.get("finetune") or {}
    pace, steps, kept = finetune.get("pace"), finetune.get("steps", recipe["finetune_steps"]), finetune.get("kept_step")
    notes = (
        [f"paced to the {pace['allotted_s']:.0f} s the time budget gave it; {pace['planned_steps']} planned"]
        if pace
        else []
    )
    if kept is not None and kept < steps:  # --keep-weights best-val (factory.training.best_weights)
        notes.append(f"shipped: the weights of step {kept}, the best of its evaluations on the validation split")
    return f"{steps} ({'; '.join(notes)})" if notes else str(steps)


def init_text(dev: dict) -> str:
    """Why ``--init auto`` chose the initialisation, with its measured figures ('' for a fixed ``--init``)."""
    d = dev.get("init_decision")
    if not d:
        return ""
    return (
        f" (chosen by `--init auto` at this shape: {d['reason']}; {d['images']} training images, "
        f"{d['seconds']:.1f} s = {d['fraction_of_finetune']:.0%} of the fine-tune)"
    )


def render(head: dict[str, Any], dev: dict[str, Any]) -> str:
    """The card of device entry ``dev`` of a manifest whose build-wide part is ``head``."""
    s, anc, lg, recipe, target = dev["shape"], head["ancestry"], head["learngene"], head["recipe"], dev["target"]
    in_chans = head["ancestry_arch"]["in_chans"]
    label = DescendantShape.from_dict(s).label()
    deploy = dev.get("deploy") or {}
    meta = yaml.safe_dump(front_matter(head, dev), sort_keys=False).strip()
    timm_call = (
        'timm.create_model("local-dir:.", pretrained=True)  # config.json + model.safetensors, this folder'
        if "timm_config" in dev.get("artifacts", {})
        else 'factory.core.checkpoint.load_descendant("model.safetensors")  # no config.json: see the build log'
    )
    method = dev.get("latency_method", "the profile's latency model")
    if dev.get("latency_band"):
        method += f", error band {dev['latency_band']}"
    return f"""---
{meta}
---

# {dev["name"]}: {label}

**What it is.** A timm `VisionTransformer` (depth {s["depth"]}, width {s["embed_dim"]}, {s["num_heads"]} heads, MLP ratio
{s["mlp_ratio"]:g}, {s["img_size"]}x{s["img_size"]} input, patch {s["patch_size"]}, {s["num_classes"]} classes) for
{md_text(target["description"])}{use_text(dev)}.

**Lineage.** Initialised by `{dev.get("init", recipe["init"])}`{init_text(dev)} {source_text(dev, lg)} of ancestry `{anc["spec"]}` (`{anc["sha256"][:12]}`, weights: {anc["weights"]}); fine-tuned
{steps_text(dev, recipe)} steps on `{md_code(recipe["data"])}` (seed {recipe["seed"]}, {dev.get("finetune", {}).get("precision", "fp32")} compute). {selection_text(dev.get("selection", {}))}, within the budgets
{dev["budgets"]}.

**Numbers.** Test accuracy {dev["accuracy"]["test"]:.4f}; {dev["flops"]["fvcore"] / 1e9:.4f} GFLOPs (fvcore);
{dev["params"] / 1e6:.3f} M parameters; predicted {dev["latency_ms"]["predicted_target"]:.4f} ms and
{dev["memory_mb"]["predicted_target"]:.1f} MB on the target ({target["precision"]}, batch {target["batch"]}; latency by {method}){shipped_text(dev)};
{dev["latency_ms"]["host_onnxruntime"]:.4f} ms with onnxruntime on the build host.
Deploy with **{deploy.get("format", "onnx")}** ({deploy.get("reason", "the only artifact")}; see `export/export.json`).{not_written_text(dev)}

**How to run it.**
```python
import timm
model = {timm_call}
```
or with onnxruntime:
```python
import onnxruntime as ort, numpy as np
sess = ort.InferenceSession("export/model.onnx")
logits = sess.run(None, {{"images": np.zeros((1, {in_chans}, {s["img_size"]}, {s["img_size"]}), np.float32)}})[0]
```
Preprocessing (size, mean, std, interpolation) and class names are in `config.json` (`pretrained_cfg`, `label_names`) and
in the ONNX metadata. For TensorRT see `export/export.json` (engine, or `trt_kit/build_engine.sh` on the device).

## Intended use

Classifying images like those of `{md_code(recipe["data"])}` ({len(head["data"].get("classes", []))} classes) on {md_text(target["description"])},
within the budgets above. A starting point for further fine-tuning on the same task.

## Limitations

- Fine-tuned for {steps_text(dev, recipe)} steps on `{md_code(recipe["data"])}` only: accuracy on other data is not measured.
- The test accuracy is measured on {md_text(head["data"].get("test_split", "test"))}.
- The target latency and memory are predictions ({method}), not measurements on the device; the host onnxruntime
  time says nothing about the target. Calibrate the profile (`peg-factory calibrate`) to predict from device timings.
- The ancestry's license and data terms (`{anc["spec"]}`) apply to this derivative.
"""
