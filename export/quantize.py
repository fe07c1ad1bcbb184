"""Reduced-precision ONNX: FP16 (GPU targets) and INT8 (CPU targets) with onnxruntime tools.

- FP16: ``onnxruntime.transformers.float16.convert_float_to_float16`` with ``keep_io_types``
  (inputs/outputs stay float32, so callers don't change) and :data:`FP32_OPS` (LayerNormalization,
  Softmax: their reductions) kept in FP32 by the converter's block list, casts around them. The
  result is *typed*: what runs in which precision is in the graph, which is what a strongly typed
  TensorRT network (TensorRT 10's ``--stronglyTyped``, TensorRT 11's only mode) builds from.
- INT8: ``onnxruntime.quantization.quantize_static`` (QDQ format, per-channel weights, MinMax
  calibration over real images from the task's data) -- the format TensorRT and onnxruntime both
  execute as INT8. ``quantize_dynamic`` (int8 weights, activations quantised at run time) is the
  fallback when no calibration images are given.

Both write through a temporary file and a rename.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import numpy as np

from factory.errors import FactoryError

from .onnx_export import INPUT_NAME

#: Only the compute-heavy ops are quantised; LayerNorm, Softmax and GELU stay in float, as in
#: TensorRT's and onnxruntime's own ViT recipes (quantising them costs accuracy for no speed).
QUANTIZED_OPS = ["MatMul", "Gemm", "Conv"]
#: Ops an FP16 graph keeps in FP32 (their mean/variance and exp-sum reductions overflow or lose
#: precision in FP16), as NVIDIA's mixed-precision ViT recipes do.
FP32_OPS = ["LayerNormalization", "Softmax"]


def _tmp_sibling(path: Path) -> Path:
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp.onnx", dir=path.parent)
    os.close(fd)
    return Path(name)


def to_fp16(src: str | Path, dst: str | Path) -> Path:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    dst = Path(dst)
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST

    model = convert_float_to_float16(
        onnx.load(str(src)), keep_io_types=True, op_block_list=[*DEFAULT_OP_BLOCK_LIST, *FP32_OPS]
    )
    tmp = _tmp_sibling(dst)
    try:
        onnx.save(model, str(tmp))
        os.chmod(tmp, 0o644)
        os.replace(tmp, dst)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return dst


class ImageReader:
    """``CalibrationDataReader`` over a float32 image array, in batches, with a progress bar (and ETA)
    over the calibration images. It has a length and ``set_range`` (in batches), so onnxruntime's
    ``CalibStridedMinMax`` collects one batch at a time and merges its ranges: the calibrator's
    intermediate outputs are one batch's, not all of them (``CalibMaxIntermediateOutputs`` discards what
    it collected). Batches of 4: the calibration session's arena grows with the batch (a d24 at 224 px peaked
    at 3.9 GB in batches of 16, 1.8 GB in batches of 4 over 256 images, in the same time)."""

    def __init__(self, images: np.ndarray, batch: int = 4, progress: bool = True):
        from tqdm.auto import tqdm

        self._all = [{INPUT_NAME: images[i : i + batch]} for i in range(0, len(images), batch)]
        self._batches = iter(self._all)
        self._bar = tqdm(
            total=len(images), desc="int8 calibration", unit="img", disable=not progress, dynamic_ncols=True
        )

    def __len__(self) -> int:
        return len(self._all)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._batches = iter(self._all[start_index:end_index])

    def get_next(self):
        batch = next(self._batches, None)
        if batch is not None:
            self._bar.update(len(batch[INPUT_NAME]))
            if self._bar.n >= self._bar.total:
                self._bar.close()
        return batch

    def rewind(self):  # onnxruntime calls it for some calibrators; one pass is enough for MinMax
        pass


def to_int8(src: str | Path, dst: str | Path, calibration: np.ndarray | None = None) -> tuple[Path, str]:
    """INT8 ONNX; static (QDQ, calibrated) when ``calibration`` images are given, else dynamic."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    dst = Path(dst)
    tmp, pre = _tmp_sibling(dst), _tmp_sibling(dst)
    try:
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        if calibration is not None and len(calibration):
            quantize_static(
                str(pre),
                str(tmp),
                ImageReader(calibration.astype(np.float32)),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                op_types_to_quantize=QUANTIZED_OPS,
                extra_options={"CalibStridedMinMax": 1},  # one batch at a time, ranges merged (ImageReader)
            )
            mode = "static"
        else:
            quantize_dynamic(str(pre), str(tmp), weight_type=QuantType.QInt8, op_types_to_quantize=QUANTIZED_OPS)
            mode = "dynamic"
        os.chmod(tmp, 0o644)
        os.replace(tmp, dst)
    except Exception as exc:  # noqa: BLE001 - surface quantiser failures as one line
        if isinstance(exc, FactoryError):
            raise
        raise FactoryError(
            f"INT8 quantisation of {src} failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from exc
    finally:
        for p in (tmp, pre):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
    return dst, mode
