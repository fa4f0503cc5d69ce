#!/usr/bin/env python3
"""Checks an ONNX model written by `mnist-wgpu export` with onnxruntime, on the 10,000 MNIST test images:
its logits against mnist-wgpu's own (`mnist-wgpu eval CHECKPOINT --logits FILE`), and its accuracy.

    mnist-wgpu export runs/X/best.safetensors --onnx net.onnx
    mnist-wgpu eval runs/X/best.safetensors --logits logits.safetensors
    python3 scripts/check_onnx.py net.onnx logits.safetensors [--data data/mnist]

Needs onnxruntime, onnx, numpy and safetensors (pip install onnxruntime onnx numpy safetensors). Exits
non-zero when a logit differs by more than 1e-5 of the largest logit, or the accuracy differs.

The tolerance is relative, as verify's are: both sides compute in float32 with their own summation
orders, so their logits part by rounding in proportion to the logits' size. Measured against the
float64 truth (PyTorch in float64) on the 10,000 test images, 2026-12-06: for Net3's documented
checkpoint (largest logit 24.2) mnist-wgpu is off by 1.0e-5, onnxruntime by 6.2e-6, PyTorch's float32 by
7.2e-6; for models/net3-avgpool2.toml's seed-1 run (largest 24.8), 1.9e-5, 7.7e-6 and 1.1e-5. That is
under 1e-6 of the largest logit; a wrong node is off by far more than 1e-5 of it.
"""
import argparse
import gzip
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
from safetensors.numpy import load_file

MEAN, STD = 0.1307, 0.3081
TOLERANCE = 1e-5


def read_idx(folder, stem):
    for name, opener in ((stem + ".gz", gzip.open), (stem, open)):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            with opener(path, "rb") as f:
                raw = f.read()
            dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(raw[3])]
            return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * len(dims)).reshape(dims)
    sys.exit(f"{folder}: no {stem} or {stem}.gz")


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="the ONNX file mnist-wgpu export wrote")
    parser.add_argument("logits", help="the safetensors file mnist-wgpu eval --logits wrote")
    parser.add_argument("--data", default=os.path.join(here, "..", "data", "mnist"))
    args = parser.parse_args()

    onnx.checker.check_model(onnx.load(args.model), full_check=True)
    images = read_idx(args.data, "t10k-images-idx3-ubyte").astype(np.float32) / 255.0
    labels = read_idx(args.data, "t10k-labels-idx1-ubyte").astype(np.int64)
    x = ((images - MEAN) / STD).reshape(-1, 1, 28, 28).astype(np.float32)
    session = ort.InferenceSession(args.model, providers=["CPUExecutionProvider"])
    got = np.concatenate([session.run(["logits"], {"input": x[i:i + 500]})[0] for i in range(0, len(x), 500)])
    want = load_file(args.logits)["logits"]
    if got.shape != want.shape:
        sys.exit(f"shapes differ: onnxruntime {got.shape}, mnist-wgpu {want.shape}")
    diff = float(np.abs(got - want).max())
    scale = max(float(np.abs(want).max()), 1e-6)
    # The first maximum on ties, as mnist-wgpu counts.
    ours, theirs = int((want.argmax(1) == labels).sum()), int((got.argmax(1) == labels).sum())
    print(f"onnxruntime {ort.__version__}, opset {onnx.load(args.model).opset_import[0].version}: "
          f"largest logit difference {diff:.2e}, {diff / scale:.1e} of the largest logit {scale:.1f} "
          f"(tolerance {TOLERANCE:.0e} of it); "
          f"accuracy {theirs}/{len(labels)} (mnist-wgpu: {ours}/{len(labels)})")
    if diff > TOLERANCE * scale or ours != theirs:
        sys.exit("FAIL")
    print("OK")


if __name__ == "__main__":
    main()
