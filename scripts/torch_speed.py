#!/usr/bin/env python3
"""PyTorch's CPU speed for a model file's network, to compare with `mnist-wgpu bench` on the same machine.

Times training steps (forward, cross-entropy, backward, SGD with momentum and weight decay) and
evaluation (eval() mode under no_grad: forward and cross-entropy) on random normalized inputs, with
torch's default thread count (all cores); prints for each the median images/s of 5 repeats of 20
batches after a warm-up, as `mnist-wgpu bench` does. The network is built from the model file by
`torch_model.py` (net3 by default; a name without a path is a preset in models/). Needs `pip install
torch`.

    python3 scripts/torch_speed.py [--model FILE|PRESET] [--batch-size N] [--json]
"""
import argparse
import json
import os
import statistics
import sys
import time
import tomllib

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_model import ROOT, FileNet  # noqa: E402

STEPS, REPEATS = 20, 5


def model_file(name):
    """A model file's path: the name itself, or the preset models/NAME.toml."""
    if os.path.exists(name):
        return name
    preset = os.path.join(ROOT, "models", name + ".toml")
    if os.path.exists(preset):
        return preset
    sys.exit(f"--model {name}: no such file and no preset models/{name}.toml")


def rate(work, images):
    """Median, min and max images/s of REPEATS runs of work after one warm-up."""
    work()
    rates = []
    for _ in range(REPEATS):
        t = time.perf_counter()
        work()
        rates.append(images / (time.perf_counter() - t))
    return statistics.median(rates), min(rates), max(rates)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="net3", help="a model file, or a preset name (default net3)")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    with open(model_file(args.model), "rb") as f:
        layers = tomllib.load(f)["layer"]
    torch.manual_seed(0)
    model = FileNet(layers)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-5)
    x = torch.randn(STEPS, args.batch_size, 1, 28, 28)
    y = torch.randint(0, 10, (STEPS, args.batch_size))

    def train():
        for i in range(STEPS):
            opt.zero_grad()
            F.cross_entropy(model(x[i]), y[i]).backward()
            opt.step()

    def evaluate():
        model.eval()
        with torch.no_grad():
            for i in range(STEPS):
                F.cross_entropy(model(x[i]), y[i])
        model.train()

    results = {what: rate(work, STEPS * args.batch_size) for what, work in (("training", train), ("evaluation", evaluate))}
    if args.json:
        out = {"torch": torch.__version__, "threads": torch.get_num_threads(), "model": args.model,
               "batch_size": args.batch_size}
        out.update({what: {"median": m, "min": lo, "max": hi} for what, (m, lo, hi) in results.items()})
        print(json.dumps(out))
        return
    for what, (m, lo, hi) in results.items():
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads: {what}, batch {args.batch_size}: "
              f"{m:.0f} images/s (min {lo:.0f}, max {hi:.0f})")


if __name__ == "__main__":
    main()
