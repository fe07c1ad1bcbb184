#!/usr/bin/env python3
"""Check a TensorRT engine against the reference outputs peg-factory recorded (runs on the device).

Usage: python3 check_engine.py model.fp16.engine [--reference reference.npz] [--atol 0.05]

Needs the device's ``tensorrt`` and ``torch`` (CUDA) Python packages. Passes when, for every
reference batch, the max abs difference to onnxruntime's FP32 logits is <= atol and the top-1
classes agree on >= 99% of images. Exit code 0 on pass, 1 on a failed check, 2 on a usage error
(no engine or reference file, a reference with nothing to check, tensorrt not installed).
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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("engine")
    parser.add_argument("--reference", default=str(Path(__file__).with_name("reference.npz")))
    parser.add_argument("--atol", type=float, default=0.05)
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
            usage(f"a package the check needs is missing ({exc})")
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
