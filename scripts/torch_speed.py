#!/usr/bin/env python3
"""PyTorch's CPU speed for the spec's network, to compare with `mnist-wgpu bench` on the same machine.

Times training steps (forward, cross-entropy, backward, SGD with momentum and weight decay) and
evaluation (eval() mode under no_grad: forward and cross-entropy) at batch 100 on random normalized
inputs, with torch's default thread count (all cores); prints for each the median images/s of 5 repeats
of 20 batches after a warm-up, as `mnist-wgpu bench` does. Needs `pip install torch`.

    python3 scripts/torch_speed.py
"""
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_reference import Net3  # noqa: E402

BATCH, STEPS, REPEATS = 100, 20, 5


def main():
    torch.manual_seed(0)
    model = Net3()
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-5)
    x = torch.randn(STEPS, BATCH, 1, 28, 28)
    y = torch.randint(0, 10, (STEPS, BATCH))

    def run():
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

    for what, work in (("training step", run), ("evaluation", evaluate)):
        work()
        rates = []
        for _ in range(REPEATS):
            t = time.perf_counter()
            work()
            rates.append(STEPS * BATCH / (time.perf_counter() - t))
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads: {what}, batch {BATCH}: "
              f"{statistics.median(rates):.0f} images/s (min {min(rates):.0f}, max {max(rates):.0f})")


if __name__ == "__main__":
    main()
