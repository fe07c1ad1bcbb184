"""Core ML artifacts for iPhones, iPads and Macs: an FP16 ML Program, ``model.mlpackage``.

- **Conversion**: ``torch.export`` of the model at batch 1 (the path coremltools 9 supports for torch 2.x; its
  ``jit.trace`` path fails on timm's ViT), decomposed to core ATen, then ``coremltools.convert`` to an ML
  Program (``convert_to="mlprogram"``) with ``compute_precision=FLOAT16`` for
  ``minimum_deployment_target`` :data:`DEPLOYMENT_TARGET`: input ``images`` (1, C, H, W, float32), output
  ``logits``. timm's fused attention is turned off for the trace (the explicit ``q @ k^T, softmax, @ v`` form,
  the same math), as for ExecuTorch: it converts to plain ``matmul``/``softmax`` ops every Core ML compute
  unit has.
- **coremltools' own checks**: the conversion runs MIL's type inference and validation passes on every op;
  the written package is loaded back (``MLModel(..., skip_model_load=True)``: the spec, no runtime) and its
  input and output names and shapes must be the model's, or the format fails.
- **Ops** (AI Hub's layer counts): the ML Program's operations by type, ``const`` excluded. Which compute unit
  (Neural Engine, GPU, CPU) runs each one Core ML decides on the device; ``MLComputePlan`` reports it only on
  macOS 14.4+, so the entry says ``compute_units: "decided on the device"`` and counts no delegated share.
- **It cannot run here.** Core ML's runtime exists only on Apple platforms. The accuracy recorded is the same
  PyTorch model's **at FP16** (weights and activations cast to half) on the task's test images -- Core ML's
  FP16 rounding of the same graph, not the artifact itself; ``checked_on`` says so and ``runs_here`` is
  false. The deploy rule treats it as any reduced precision (:data:`export.context.MAX_ACCURACY_DROP`). On a
  Mac, :func:`mlpackage_logits` runs the package itself (``verify_on_mac``: the check then uses it).

Core ML is an optional extra (``pip install 'peg-factory[coreml]'``: coremltools 9); without it the format is
refused in one line naming the extra.
"""

from __future__ import annotations

import hashlib
import platform
from pathlib import Path
from typing import Any

import numpy as np

from export.context import attention_form, check_images
from factory.errors import FactoryError

EXTRA_HINT = "pip install 'peg-factory[coreml]'"
#: The oldest OS the package loads on: iOS 17 / macOS 14 (ML Program, FP16, the SDPA-free attention ops).
DEPLOYMENT_TARGET = "iOS17"
PACKAGE = "model.mlpackage"
#: Operation types that are not compute (constants feeding the ops): left out of the op counts.
NOT_OPS = ("const",)


def require_coreml():
    """The ``coremltools`` package, or a one-line :class:`FactoryError` naming the extra. Its import-time
    warnings off Apple platforms (no ``libcoremlpython``: the runtime is absent, as the entry says; untested
    torch and scikit-learn versions) are held back for the import only."""
    import logging

    quiet = logging.getLogger("coremltools")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        import coremltools  # noqa: F401
    except ImportError as exc:
        raise FactoryError(f"the coreml format needs the coreml extra: {EXTRA_HINT} ({exc})") from exc
    finally:
        quiet.setLevel(level)


def convert(net, example, *, precision: str = "fp16"):
    """The ``coremltools.models.MLModel`` of ``net`` traced at ``example``'s shape (see module docstring)."""
    import coremltools as ct
    import torch

    with attention_form(net, False):
        exported = torch.export.export(net, (example,)).run_decompositions({})
    return ct.convert(
        exported,
        inputs=[ct.TensorType(name="images", shape=tuple(example.shape))],
        outputs=[ct.TensorType(name="logits")],
        convert_to="mlprogram",
        compute_precision=ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32,
        minimum_deployment_target=getattr(ct.target, DEPLOYMENT_TARGET),
    )


def op_counts(spec) -> dict[str, int]:
    """The ML Program's operations by type (``const`` excluded), most frequent first."""
    counts: dict[str, int] = {}
    for function in spec.mlProgram.functions.values():
        for block in function.block_specializations.values():
            for op in block.operations:
                if op.type not in NOT_OPS:
                    counts[op.type] = counts.get(op.type, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def check_package(path: Path, input_shape: tuple[int, ...], num_classes: int):
    """The package's spec, loaded back without a runtime; one line naming what differs from the model."""
    import coremltools as ct

    spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    inputs = {i.name: tuple(i.type.multiArrayType.shape) for i in spec.description.input}
    outputs = [o.name for o in spec.description.output]
    if inputs != {"images": tuple(input_shape)} or outputs != ["logits"]:
        raise FactoryError(
            f"coreml: the written package has inputs {inputs} and outputs {outputs}, not images{tuple(input_shape)} "
            f"-> logits[{num_classes}]; not exported"
        )
    if not spec.HasField("mlProgram"):
        raise FactoryError("coreml: the written package is not an ML Program; not exported")
    return spec


def tree_sha256(path: Path) -> str:
    """One digest of a package directory: each file's relative path and bytes, in sorted order."""
    digest = hashlib.sha256()
    for item in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(item.relative_to(path).as_posix().encode() + b"\0" + item.read_bytes())
    return digest.hexdigest()


def runs_here() -> bool:
    """Core ML's runtime is there: macOS (coremltools' ``libcoremlpython`` is built only for it)."""
    return platform.system() == "Darwin"


def mlpackage_logits(path: Path, images: np.ndarray) -> np.ndarray:
    """Logits of ``images`` run one at a time through the package (macOS only)."""
    import coremltools as ct

    model = ct.models.MLModel(str(path))
    return np.concatenate([model.predict({"images": images[i : i + 1]})["logits"] for i in range(len(images))])


def fp16_logits(net, images: np.ndarray, batch: int = 64) -> np.ndarray:
    """The PyTorch model's logits with weights and activations in FP16 (what an FP16 ML Program computes, up to
    Core ML's own kernels), on a copy: ``net`` stays FP32."""
    import copy

    import torch

    half = copy.deepcopy(net).half().eval()
    with torch.no_grad():
        return np.concatenate(
            [half(torch.from_numpy(images[i : i + batch]).half()).float().numpy() for i in range(0, len(images), batch)]
        )


def export_coreml(run) -> dict[str, dict[str, Any]]:
    """``model.mlpackage`` (FP16 ML Program) with its op counts and its check on the task's test images (see the
    module docstring for what runs here and what cannot)."""
    import torch

    require_coreml()
    example = torch.from_numpy(run.x1)
    try:
        model = convert(run.net, example)
    except Exception as exc:  # noqa: BLE001 - an op coremltools cannot lower: one line, the other formats go on
        raise FactoryError(
            f"coreml: coremltools could not convert the model: {' '.join(str(exc).split())[:300]}"
        ) from None
    path = run.tmp / PACKAGE
    model.save(str(path))
    spec = check_package(path, tuple(example.shape), run.arch.num_classes)
    ops = op_counts(spec)
    images, labels, what = check_images(run)
    with torch.no_grad():
        reference = run.net(torch.from_numpy(images)).numpy()
    if runs_here():
        logits, basis = mlpackage_logits(path, images), f"{what}, the .mlpackage run by Core ML on this Mac"
    else:
        logits = fp16_logits(run.net, images)
        basis = f"{what}, PyTorch FP16 emulation; the .mlpackage is not run here (Core ML needs macOS or iOS)"
    entry: dict[str, Any] = {
        "package": PACKAGE,
        "sha256": tree_sha256(path),
        "deployment_target": DEPLOYMENT_TARGET,
        "compute_precision": "fp16",
        "compute_units": "decided on the device (MLComputePlan reports them on macOS 14.4+)",
        "total_ops": sum(ops.values()),
        "op_types": ops,
        "runs_here": runs_here(),
        "checked_on": basis,
        "max_abs_diff_vs_pytorch": float(np.abs(logits - reference).max()),
        "top1_agreement": round(float((logits.argmax(-1) == reference.argmax(-1)).mean()), 4),
    }
    if labels is not None:
        entry["test_accuracy"] = round(float((logits.argmax(-1) == labels).mean()), 4)
        entry["accuracy_drop_vs_fp32"] = round(
            float((reference.argmax(-1) == labels).mean()) - entry["test_accuracy"], 4
        )
    run.log(
        f"coreml: {PACKAGE} ({entry['total_ops']} ops, {DEPLOYMENT_TARGET}), top-1 agreement "
        f"{entry['top1_agreement']:.4f}, max diff {entry['max_abs_diff_vs_pytorch']:.3g} on {basis}"
    )
    return {"coreml": entry}


def kit_model(onnx_path: Path, model, shape: tuple[int, ...]) -> Path:
    """The calibration kit's ``.mlpackage`` twin of a kit model (random weights), converted as the export
    converts it, for the kit's ``measure.py`` on a Mac (:attr:`factory.device.runtimes.RuntimeSpec.kit_model`)."""
    import torch

    require_coreml()
    path = onnx_path.with_suffix(".mlpackage")
    convert(model, torch.randn(*shape)).save(str(path))
    return path
