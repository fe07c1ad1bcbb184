"""TensorRT engine building (the TensorRT 10 and 11 Python API), isolated so nothing else imports tensorrt.

``build_engine`` parses a typed ONNX file into a strongly typed network (precision comes from the
graph: FP16 casts, Q/DQ INT8), sets one optimisation profile (min/opt/max batch) and a timing
cache, and serialises the engine. ``run_engine`` executes it on the GPU (torch tensors as device
buffers) so its outputs can be compared with onnxruntime's. Both need the ``tensorrt`` package and
a CUDA GPU; :func:`tensorrt_available` says which is missing.

An engine only runs on the GPU model and TensorRT version that built it: for any other target,
:mod:`export.trt_kit` writes the exact ``trtexec`` command to run on the device instead.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def tensorrt_available() -> tuple[bool, str]:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False, "the tensorrt Python package is not installed (pip install tensorrt, NVIDIA's index)"
    import torch

    if not torch.cuda.is_available():
        return False, "no CUDA GPU is visible"
    return True, "tensorrt and a CUDA GPU are present"


def strongly_typed_flags(trt) -> int:
    """``create_network`` flags for a strongly typed network: the ``STRONGLY_TYPED`` bit on TensorRT 10
    (where it is opt-in), accepted and ignored on 11 (always strongly typed), 0 where the enum lacks it."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 1 << int(flag) if flag is not None else 0


def build_engine(
    onnx_path: Path,
    engine_path: Path,
    *,
    batch: tuple[int, int, int],
    input_shape: tuple[int, int, int],
    timing_cache: Path | None = None,
    workspace_mb: int = 2048,
) -> Path:
    """Build and serialise a strongly typed engine from a *typed* ONNX model (FP32, FP16 from
    :func:`export.quantize.to_fp16`, or Q/DQ INT8 from :func:`export.quantize.to_int8`): the graph says
    what runs in which precision, so no precision flag or calibrator is set -- the TensorRT 10 and 11
    API alike (11 removed ``BuilderFlag.FP16``/``INT8`` and calibrators). ``batch`` = min/opt/max of the
    dynamic batch axis."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(strongly_typed_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    profile = builder.create_optimization_profile()
    name = network.get_input(0).name
    profile.set_shape(name, *[(b, *input_shape) for b in batch])
    config.add_optimization_profile(profile)
    cache = None
    if timing_cache is not None:
        cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT failed to build the engine (see its log above)")
    engine_path.write_bytes(bytes(serialized))
    if cache is not None and timing_cache is not None:
        timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    return engine_path


def run_engine(engine_path: Path, images: np.ndarray) -> np.ndarray:
    """Run a serialised engine on ``images`` (float32, NCHW); the kit's checker does the same."""
    from .templates.check_engine import run_engine as _run

    return _run(engine_path, images)
