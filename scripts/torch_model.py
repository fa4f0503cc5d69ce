#!/usr/bin/env python3
"""Build the network of an mnist-wgpu model file in PyTorch, load a checkpoint into it with
strict=True, and evaluate it on the test set, printing mnist-wgpu eval's `Test set:` line.

    python3 scripts/torch_model.py models/net3.toml runs/X/best.safetensors
    python3 scripts/torch_model.py runs/X/best.safetensors          # the model file the checkpoint holds

The model file format is mnist-wgpu's (see models/net3.toml): one [[layer]] table per layer, types conv
(out, kernel, padding, bias), linear (out, bias; over the flattened input), batchnorm, relu, dropout
(p), maxpool, avgpool2 (2x2 average pooling), gap (global average pooling; avgpool in older files); they are named conv1.., fc1.., bn1.. in order, as in the checkpoint's
state_dict. The input (1 x 28 x 28) and the 10 classes come from the data, as in mnist-wgpu. Activations
stay N x C x H x W throughout (a linear layer's output is N x out x 1 x 1), so a batchnorm after a linear
layer is BatchNorm2d over 1 x 1 planes, which normalizes as BatchNorm1d does, with the same state_dict
names. Needs torch, numpy and safetensors.
"""
import argparse
import gzip
import os
import struct
import sys
import tomllib

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEAN, STD = 0.1307, 0.3081


class FileNet(nn.Module):
    """The layers of a model file, in order, named as mnist-wgpu names them."""

    def __init__(self, layers, shape=(1, 28, 28)):
        super().__init__()
        self.steps = []
        (channels, height, width), convs, norms, linears = shape, 0, 0, 0
        for i, spec in enumerate(layers):
            kind = spec.get("type")
            if kind == "conv":
                convs += 1
                name = f"conv{convs}"
                k, pad = spec["kernel"], spec.get("padding", 0)
                conv = nn.Conv2d(channels, spec["out"], k, padding=pad, bias=spec.get("bias", False))
                self.add_module(name, conv)
                self.steps.append(("module", name))
                channels, height, width = spec["out"], height + 2 * pad + 1 - k, width + 2 * pad + 1 - k
            elif kind == "linear":
                linears += 1
                name = f"fc{linears}"
                self.add_module(name, nn.Linear(channels * height * width, spec["out"], bias=spec.get("bias", True)))
                self.steps.append(("linear", name))
                channels, height, width = spec["out"], 1, 1
            elif kind == "batchnorm":
                norms += 1
                name = f"bn{norms}"
                self.add_module(name, nn.BatchNorm2d(channels))
                self.steps.append(("module", name))
            elif kind == "relu":
                self.steps.append(("relu", None))
            elif kind == "dropout":
                self.steps.append(("dropout", spec["p"]))
            elif kind == "maxpool":
                self.steps.append(("maxpool", None))
                height, width = height // 2, width // 2
            elif kind == "avgpool2":
                self.steps.append(("avgpool2", None))
                height, width = height // 2, width // 2
            elif kind in ("gap", "avgpool"):
                self.steps.append(("gap", None))
                height, width = 1, 1
            else:
                sys.exit(f"layer {i + 1}: unknown layer type {kind!r}")

    def forward(self, x):
        for kind, arg in self.steps:
            if kind == "module":
                x = getattr(self, arg)(x)
            elif kind == "linear":
                x = getattr(self, arg)(x.flatten(1))[:, :, None, None]
            elif kind == "relu":
                x = F.relu(x)
            elif kind == "dropout":
                x = F.dropout(x, arg, self.training)
            elif kind == "maxpool":
                x = F.max_pool2d(x, 2)
            elif kind == "avgpool2":
                x = F.avg_pool2d(x, 2)
            else:
                x = F.adaptive_avg_pool2d(x, 1)
        return x.flatten(1)


def read_idx(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def find(data_dir, name):
    for candidate in (name + ".gz", name):
        path = os.path.join(data_dir, candidate)
        if os.path.exists(path):
            return path
    sys.exit(f"{data_dir}: no {name}[.gz]")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", help="[MODEL_FILE] CHECKPOINT")
    parser.add_argument("--data", default=os.path.join(ROOT, "data", "mnist"), help="the IDX files' folder")
    args = parser.parse_args()
    if len(args.files) > 2:
        parser.error("give a model file and a checkpoint, or a checkpoint alone")
    checkpoint = args.files[-1]
    if len(args.files) == 2:
        with open(args.files[0], "rb") as f:
            spec = tomllib.load(f)
    else:
        with safe_open(checkpoint, "pt") as f:
            text = (f.metadata() or {}).get("model")
        if text is None:
            sys.exit(f"{checkpoint} holds no model file (an older checkpoint): give the model file first")
        spec = tomllib.loads(text)
    net = FileNet(spec["layer"])
    net.load_state_dict(load_file(checkpoint), strict=True)
    net.eval()
    images = read_idx(find(args.data, "t10k-images-idx3-ubyte")).astype(np.float32) / 255.0
    labels = torch.from_numpy(read_idx(find(args.data, "t10k-labels-idx1-ubyte")).astype(np.int64))
    x = (torch.from_numpy(images).unsqueeze(1) - MEAN) / STD
    loss, correct = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(x), 1000):
            logits = net(x[i : i + 1000])
            loss += F.cross_entropy(logits, labels[i : i + 1000], reduction="sum").item()
            correct += (logits.argmax(1) == labels[i : i + 1000]).sum().item()
    n = len(x)
    print(f"Test set: Average loss: {loss / n:.4f}, Accuracy: {correct}/{n} ({100.0 * correct / n:.2f}%)")


if __name__ == "__main__":
    main()
