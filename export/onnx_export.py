"""ONNX export of a descendant, with metadata and onnxruntime verification.

``export_onnx`` writes ``model.onnx`` through a temporary file and a rename (nothing
half-written), with:

- a dynamic batch axis on input ``images`` ``(batch, C, H, W)`` and output ``logits``;
- opset :data:`OPSET` (17: LayerNormalization is a native op, and TensorRT 8.6+/10 and
  onnxruntime >= 1.14 all read it) through the TorchScript exporter by default, which is fast and
  yields the plain MatMul/Softmax graph TensorRT's MHA fusion recognises; ``exporter="dynamo"``
  uses ``torch.export`` instead;
- ``metadata_props`` from ``metadata`` (values JSON-encoded unless already strings);
- simplified by ``onnxslim`` (constant folding, dead and duplicate nodes, shape-op chains folded:
  the demo descendant goes from 240 to 108 nodes), metadata and the dynamic batch kept, the node
  counts before and after in the result; without onnxslim installed the graph is kept as exported;
- ``onnx.checker`` validation, then (``verify=True``) onnxruntime vs PyTorch on fresh random
  inputs at batch 1 and ``verify_batch``: max abs difference must be <= ``atol`` (1e-4 fp32) or
  the export fails with the measured difference and no file is left behind.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from factory.errors import FactoryError

OPSET = 17
INPUT_NAME, OUTPUT_NAME = "images", "logits"


def _export_graph(model: nn.Module, x: torch.Tensor, path: Path, opset: int, exporter: str) -> None:
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            batch = torch.export.Dim("batch", min=1, max=4096)
            torch.onnx.export(
                model,
                (x,),
                str(path),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                opset_version=max(opset, 18),
                dynamo=True,
                external_data=False,
                dynamic_shapes={"x": {0: batch}},
            )
        elif exporter == "torchscript":
            torch.onnx.export(
                model,
                (x,),
                str(path),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                opset_version=opset,
                dynamo=False,
                do_constant_folding=True,
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            )
        else:
            raise FactoryError(f"unknown exporter {exporter!r}; use torchscript or dynamo")


def verify_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    img_size: int,
    in_chans: int,
    batches=(1, 4),
    atol: float = 1e-4,
    seed: int = 0,
    providers=("CPUExecutionProvider",),
) -> dict[str, float]:
    """Max abs difference between onnxruntime and PyTorch per batch size (raises past ``atol``)."""
    from .runtime import ort_session

    sess = ort_session(path, providers)
    gen = torch.Generator().manual_seed(seed)
    diffs = {}
    for batch in batches:
        x = torch.randn(batch, in_chans, img_size, img_size, generator=gen)
        with torch.no_grad():
            expected = model(x).float().numpy()
        got = sess.run(None, {INPUT_NAME: x.numpy()})[0]
        diff = float(abs(got - expected).max())
        diffs[f"batch{batch}"] = diff
        if not diff <= atol:
            raise FactoryError(
                f"ONNX output differs from PyTorch by {diff:.3g} at batch {batch} (limit {atol:g}); "
                "the export is wrong, not saved"
            )
    return diffs


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    img_size: int,
    in_chans: int,
    metadata: dict[str, Any] | None = None,
    opset: int = OPSET,
    exporter: str = "torchscript",
    verify: bool = True,
    verify_batch: int = 4,
    atol: float = 1e-4,
    simplify: bool = True,
) -> dict[str, Any]:
    """Export, simplify, check and (optionally) verify the simplified graph; returns ``{"path", "opset",
    "max_abs_diff", "nodes"}`` (``nodes``: ``{"exported": n, "simplified": m}``, or only ``exported``)."""
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval().cpu().float()
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp.onnx", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        x = torch.zeros(1, in_chans, img_size, img_size)
        _export_graph(model, x, tmp, opset, exporter)
        proto = onnx.load(str(tmp))
        for key, value in (metadata or {}).items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        nodes = {"exported": len(proto.graph.node)}
        if simplify:
            proto, slimmed = simplify_graph(proto)
            if slimmed:
                nodes["simplified"] = len(proto.graph.node)
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))
        diffs = (
            verify_onnx(model, tmp, img_size=img_size, in_chans=in_chans, batches=(1, verify_batch), atol=atol)
            if verify
            else {}
        )
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return {"path": str(path), "opset": opset, "exporter": exporter, "max_abs_diff": diffs, "nodes": nodes}


def simplify_graph(proto):
    """``(proto simplified by onnxslim, True)``, or ``(proto, False)`` where onnxslim is not installed."""
    try:
        import onnxslim
    except ImportError:
        return proto, False
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        return onnxslim.slim(proto), True
