"""The export formats, named once: the profile schema and the exporter both read them here."""

from __future__ import annotations

from typing import Literal, get_args

Format = Literal["onnx", "onnx-fp16", "onnx-int8", "openvino", "openvino-int8", "trt"]
FORMATS: tuple[str, ...] = get_args(Format)
OPENVINO_FORMATS = ("openvino", "openvino-int8")
