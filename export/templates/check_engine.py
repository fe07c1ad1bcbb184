#!/usr/bin/env python3
"""Check a TensorRT engine against the reference outputs peg-factory recorded (runs on the device).

Usage: python3 check_engine.py model.fp16.engine [--reference reference.npz] [--atol 0.05]

Needs the device's ``tensorrt`` Python package and one of ``polygraphy``, ``cuda-python`` or a CUDA
build of ``torch`` (tried in that order). Passes when, for every
reference batch, the max abs difference to onnxruntime's FP32 logits is <= atol and the top-1
classes agree on >= 99% of images. Exit code 0 on pass, 1 on a failed check, 2 on a usage error
(no engine or reference file, a reference with nothing to check, tensorrt not installed).
"""

import argparse
import sys
from pathlib import Path

import numpy as np

INPUT, OUTPUT = "images", "logits"  # the tensor names peg-factory's ONNX export gives


def run_engine(engine_path, images):
    """Run a serialised engine on ``images`` (float32 NCHW) and return its logits: through polygraphy
    where it is installed, else cuda-python, else a CUDA build of torch (TensorRT 10 and 11 API)."""
    images = np.ascontiguousarray(images, dtype=np.float32)
    try:
        from polygraphy.backend.common import BytesFromPath
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner
    except ImportError:
        pass
    else:
        with TrtRunner(EngineFromBytes(BytesFromPath(str(engine_path)))) as runner:
            outputs = runner.infer({INPUT: images})
        return np.asarray(outputs[OUTPUT], dtype=np.float32)
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError:
            cudart = None
    if cudart is not None:
        return _run_cudart(cudart, engine_path, images)
    return _run_torch(engine_path, images)


def _engine_context(engine_path, shape):
    import tensorrt as trt

    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
    if engine is None:
        raise RuntimeError(f"TensorRT could not deserialise {engine_path} (built for another GPU or TensorRT version?)")
    context = engine.create_execution_context()
    context.set_input_shape(INPUT, tuple(shape))
    return engine, context


def _check(result):
    err = result[0] if isinstance(result, tuple) else result
    if int(err) != 0:
        raise RuntimeError(f"CUDA error {err}")
    return result[1] if isinstance(result, tuple) and len(result) > 1 else None


def _run_cudart(cudart, engine_path, images):
    engine, context = _engine_context(engine_path, images.shape)
    out = np.empty(tuple(context.get_tensor_shape(OUTPUT)), dtype=np.float32)
    d_in = _check(cudart.cudaMalloc(images.nbytes))
    d_out = _check(cudart.cudaMalloc(out.nbytes))
    stream = _check(cudart.cudaStreamCreate())
    try:
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        _check(cudart.cudaMemcpy(d_in, images.ctypes.data, images.nbytes, h2d))
        context.set_tensor_address(INPUT, int(d_in))
        context.set_tensor_address(OUTPUT, int(d_out))
        if not context.execute_async_v3(int(stream)):
            raise RuntimeError("TensorRT execution failed")
        _check(cudart.cudaStreamSynchronize(stream))
        _check(cudart.cudaMemcpy(out.ctypes.data, d_out, out.nbytes, d2h))
    finally:
        cudart.cudaFree(d_in)
        cudart.cudaFree(d_out)
        cudart.cudaStreamDestroy(stream)
    return out


def _run_torch(engine_path, images):
    import torch

    engine, context = _engine_context(engine_path, images.shape)
    x = torch.from_numpy(images).cuda()
    y = torch.empty(tuple(context.get_tensor_shape(OUTPUT)), dtype=torch.float32, device="cuda")
    context.set_tensor_address(INPUT, x.data_ptr())
    context.set_tensor_address(OUTPUT, y.data_ptr())
    stream = torch.cuda.Stream()
    if not context.execute_async_v3(stream.cuda_stream):
        raise RuntimeError("TensorRT execution failed")
    stream.synchronize()
    return y.cpu().numpy()


def compare(got, expected, atol):
    diff = float(np.abs(got - expected).max())
    agree = float((got.argmax(-1) == expected.argmax(-1)).mean())
    return diff, agree, diff <= atol and agree >= 0.99


def usage(message):
    """A usage error (a missing file, package or argument): one line, exit 2."""
    print(f"check_engine.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def load_reference(path):
    """``[(batch, inputs, expected outputs)]`` of a reference file; a usage error when it holds none."""
    try:
        ref = np.load(path)
    except (OSError, ValueError) as exc:
        usage(f"cannot read the reference {path} ({exc}); pass --reference PATH (the kit's reference.npz)")
    pairs = []
    for key in sorted(k for k in ref.files if k.startswith("input_")):
        batch = key.split("_", 1)[1]
        if "output_" + batch not in ref.files:
            usage(f"the reference {path} has {key} but no output_{batch}; re-create the kit")
        pairs.append((batch, ref[key], ref["output_" + batch]))
    if not pairs:
        usage(f"the reference {path} holds no input_<batch> arrays: nothing to check; re-create the kit")
    return pairs


def main():
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="exit codes: 0 pass, 1 the engine disagrees with the reference, 2 a usage error",
    )
    parser.add_argument("engine", help="the serialised engine build_engine.sh wrote (e.g. model.fp16.engine)")
    parser.add_argument(
        "--reference",
        default=str(Path(__file__).with_name("reference.npz")),
        help="inputs (input_<batch>) and onnxruntime's FP32 logits (output_<batch>) to compare with "
        "(default: the kit's reference.npz)",
    )
    parser.add_argument(
        "--atol",
        type=float,
        default=0.05,
        help="the largest absolute logit difference that passes (default 0.05; top-1 must also agree on >= 99%%)",
    )
    args = parser.parse_args()  # argparse exits 2 on a usage error too
    if not Path(args.engine).is_file():
        usage(f"no engine at {args.engine}; build it first (build_engine.sh)")
    pairs = load_reference(args.reference)
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        usage("the tensorrt Python package is not installed here (it comes with JetPack / pip install tensorrt)")
    ok = True
    for batch, inputs, expected in pairs:
        try:
            got = run_engine(args.engine, inputs)
        except ImportError as exc:
            usage(f"a package the check needs is missing ({exc}): pip install polygraphy (or cuda-python)")
        except Exception as exc:  # noqa: BLE001 - the engine could not be loaded or run: the check failed
            print(f"batch {batch}: FAIL ({type(exc).__name__}: {' '.join(str(exc).split())[:300]})")
            ok = False
            continue
        diff, agree, passed = compare(got, expected, args.atol)
        print(f"batch {batch}: max abs diff {diff:.4g}, top-1 agreement {agree:.2%}: {'PASS' if passed else 'FAIL'}")
        ok &= passed
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
