#!/usr/bin/env python3
"""Check a TensorRT engine against the reference outputs peg-factory recorded (runs on the device).

Usage: python3 check_engine.py model.fp16.engine [--reference reference.npz] [--atol 0.05]

Needs the device's ``tensorrt`` and ``torch`` (CUDA) Python packages. Passes when, for every
reference batch, the max abs difference to onnxruntime's FP32 logits is <= atol and the top-1
classes agree on >= 99% of images. Exit code 0 on pass, 1 on fail.
"""

import argparse
import sys
from pathlib import Path

import numpy as np


def run_engine(engine_path, images):
    """Run a serialised engine on ``images`` (float32 NCHW) and return its logits."""
    import tensorrt as trt
    import torch

    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
    context = engine.create_execution_context()
    inp, out = engine.get_tensor_name(0), engine.get_tensor_name(1)
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).cuda()
    context.set_input_shape(inp, tuple(x.shape))
    y = torch.empty(tuple(context.get_tensor_shape(out)), dtype=torch.float32, device="cuda")
    context.set_tensor_address(inp, x.data_ptr())
    context.set_tensor_address(out, y.data_ptr())
    stream = torch.cuda.Stream()
    if not context.execute_async_v3(stream.cuda_stream):
        raise RuntimeError("TensorRT execution failed")
    stream.synchronize()
    return y.cpu().numpy()


def compare(got, expected, atol):
    diff = float(np.abs(got - expected).max())
    agree = float((got.argmax(-1) == expected.argmax(-1)).mean())
    return diff, agree, diff <= atol and agree >= 0.99


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("engine")
    parser.add_argument("--reference", default=str(Path(__file__).with_name("reference.npz")))
    parser.add_argument("--atol", type=float, default=0.05)
    args = parser.parse_args()
    ref = np.load(args.reference)
    ok = True
    for key in sorted(k for k in ref.files if k.startswith("input_")):
        batch = key.split("_", 1)[1]
        diff, agree, passed = compare(run_engine(args.engine, ref[key]), ref["output_" + batch], args.atol)
        print(f"batch {batch}: max abs diff {diff:.4g}, top-1 agreement {agree:.2%}: {'PASS' if passed else 'FAIL'}")
        ok &= passed
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
