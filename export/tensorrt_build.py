"""TensorRT engine building (TensorRT 10 Python API), isolated so nothing else imports tensorrt.

``build_engine`` parses the ONNX file, sets FP16 or INT8 (with an entropy calibrator over real
images and a calibration cache), one optimisation profile (min/opt/max batch), and a timing cache,
and serialises the engine. ``run_engine`` executes it on the GPU (torch tensors as device
buffers) so its outputs can be compared with onnxruntime's. Both need the ``tensorrt`` package and
a CUDA GPU; :func:`tensorrt_available` says which is missing.

An engine only runs on the GPU model and TensorRT version that built it: for any other target,
:mod:`export.kit` writes the exact ``trtexec`` command to run on the device instead.
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


def _calibrator(images: np.ndarray, cache: Path, batch: int):
    import tensorrt as trt
    import torch

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            super().__init__()
            self.data = images.astype(np.float32)
            self.index = 0
            self.device = torch.empty((batch, *self.data.shape[1:]), dtype=torch.float32, device="cuda")

        def get_batch_size(self):
            return batch

        def get_batch(self, names):
            if self.index + batch > len(self.data):
                return None
            self.device.copy_(torch.from_numpy(self.data[self.index : self.index + batch]))
            self.index += batch
            return [int(self.device.data_ptr())]

        def read_calibration_cache(self):
            return cache.read_bytes() if cache.is_file() else None

        def write_calibration_cache(self, data):
            cache.write_bytes(bytes(data))

    return EntropyCalibrator()


def build_engine(onnx_path: Path, engine_path: Path, *, precision: str, batch: tuple[int, int, int],
                 input_shape: tuple[int, int, int], calibration: np.ndarray | None = None,
                 calibration_cache: Path | None = None, timing_cache: Path | None = None,
                 workspace_mb: int = 2048) -> Path:
    """Build and serialise an engine (``batch`` = min/opt/max of the dynamic batch axis)."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(Path(onnx_path).read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    if precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
        if calibration is not None and calibration_cache is not None:
            config.int8_calibrator = _calibrator(calibration, calibration_cache, batch[1])
    profile = builder.create_optimization_profile()
    name = network.get_input(0).name
    profile.set_shape(name, *[(b, *input_shape) for b in batch])
    config.add_optimization_profile(profile)
    if precision == "int8" and calibration is not None:
        config.set_calibration_profile(profile)
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
