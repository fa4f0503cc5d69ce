#!/usr/bin/env python3
"""Time to accuracy in PyTorch, beside `mnist-wgpu speedrun`: a model file's network trained with its
[train] recipe on all 60,000 normalized training images held in memory, once per seed, then tested on
the 10,000 test images. Prints per seed the training seconds (first step to the end of the last), the
test's seconds and the accuracy, then the mean accuracy and the median training seconds; --json prints
them as `speedrun --json` does.

    python3 scripts/torch_speedrun.py                                  # the anchor: models/fast-recipe.toml
    python3 scripts/torch_speedrun.py --model models/speed99.toml --seeds 1-5 --threads 2

The default model file is the best-known fast MNIST recipe (tuomaso/train_mnist_fast, final notebook):
its network, Adam (lr 0.01, betas 0.7, 0.9), one-cycle without momentum cycling, batch 256, one epoch,
no augmentation. The recipe keys read: epochs, batch_size, max_lr, pct_start, div_factor,
final_div_factor, optimizer (sgd with momentum cycling 0.85-0.95, as mnist-wgpu; adam; adamw), betas,
eps, weight_decay, and the augmentation's translate (a random shift of whole pixels, up to that many each
way, zeros coming in) and rotate (a random turn of up to that many degrees either way, nearest pixel):
both as mnist-wgpu's loader draws them per image, here on each batch at once (`affine_grid` and
`grid_sample` on the [0, 1] pixels, then normalized), inside the timed training. A recipe with other
augmentations (jitter, cutout, swell, darken, squeeze) is refused. Needs torch and numpy.
"""
import argparse
import json
import os
import statistics
import sys
import time
import tomllib

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_model import MEAN, ROOT, STD, FileNet, find, read_idx  # noqa: E402


def seeds_of(text):
    seeds = []
    for part in text.split(","):
        a, _, b = part.partition("-")
        seeds.extend(range(int(a), int(b or a) + 1))
    return seeds


def load(data_dir, images, labels):
    """The [0, 1] pixels (N x 1 x 28 x 28) and the labels."""
    x = read_idx(find(data_dir, images)).astype(np.float32) / 255.0
    y = read_idx(find(data_dir, labels)).astype(np.int64)
    return torch.from_numpy(x).unsqueeze(1), torch.from_numpy(y)


def normalized(x):
    return (x - MEAN) / STD


def augmented(x, translate, rotate):
    """Each image of the batch x ([0, 1] pixels) shifted by whole pixels (up to `translate` each way)
    and turned (up to `rotate` degrees either way) about its centre, nearest pixel, zeros coming in."""
    n, side = len(x), x.shape[-1]
    angle = (torch.rand(n) * 2 - 1) * (rotate * torch.pi / 180)
    shift = torch.randint(-translate, translate + 1, (n, 2)).float() * (2 / side)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def recipe_of(train):
    # mnist-wgpu's strengths where the file leaves them out are its recipe's (`Augment::default`).
    for key, default in (("jitter", 0.4), ("cutout", 0.3)):
        if train.get(key, default):
            sys.exit(f"the model file's [train] has {key} = {train.get(key, default)} (a missing key is mnist-wgpu's "
                     f"default): this script runs translate and rotate only")
    for key in ("swell", "darken", "squeeze"):
        if train.get(key):
            sys.exit(f"the model file's [train] has {key}: this script runs translate and rotate only")
    kind = train.get("optimizer", "sgd")
    defaults = {"sgd": 1e-5, "adam": 0.0, "adamw": 0.01}
    return {
        "epochs": train.get("epochs", 20),
        "batch": train.get("batch_size", 100),
        "max_lr": train.get("max_lr", 0.1),
        "pct_start": train.get("pct_start", 0.3),
        "div_factor": train.get("div_factor", 10.0),
        "final_div_factor": train.get("final_div_factor", 100.0),
        "optimizer": kind,
        "betas": tuple(train.get("betas", (0.9, 0.999))),
        "eps": train.get("eps", 1e-8),
        "weight_decay": train.get("weight_decay", defaults[kind]),
        "translate": train.get("translate", 4),
        "rotate": train.get("rotate", 15.0),
    }


def optimizer_of(net, r):
    if r["optimizer"] == "sgd":
        return torch.optim.SGD(net.parameters(), lr=r["max_lr"], momentum=0.9, weight_decay=r["weight_decay"])
    cls = torch.optim.Adam if r["optimizer"] == "adam" else torch.optim.AdamW
    return cls(net.parameters(), lr=r["max_lr"], betas=r["betas"], eps=r["eps"], weight_decay=r["weight_decay"])


def one_seed(layers, r, seed, train, test):
    torch.manual_seed(seed)
    net = FileNet(layers)
    opt = optimizer_of(net, r)
    (x, y), n = train, len(train[1])
    steps = -(-n // r["batch"])
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=r["max_lr"], total_steps=r["epochs"] * steps, pct_start=r["pct_start"],
        div_factor=r["div_factor"], final_div_factor=r["final_div_factor"], cycle_momentum=r["optimizer"] == "sgd",
    )
    net.train()
    started = time.perf_counter()
    for _ in range(r["epochs"]):
        order = torch.randperm(n)
        for i in range(0, n, r["batch"]):
            take = order[i : i + r["batch"]]
            batch = x[take]
            if r["translate"] or r["rotate"]:
                batch = augmented(batch, r["translate"], r["rotate"])
            opt.zero_grad()
            F.cross_entropy(net(normalized(batch)), y[take]).backward()
            opt.step()
            sched.step()
    train_seconds = time.perf_counter() - started
    net.eval()
    started = time.perf_counter()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(test[1]), 1000):
            correct += (net(normalized(test[0][i : i + 1000])).argmax(1) == test[1][i : i + 1000]).sum().item()
    eval_seconds = time.perf_counter() - started
    return {"seed": seed, "train_seconds": train_seconds, "eval_seconds": eval_seconds,
            "accuracy": 100.0 * correct / len(test[1])}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.path.join(ROOT, "models", "fast-recipe.toml"))
    parser.add_argument("--seeds", default="1-5", help="a range (1-5), a list (1,4,9) or both")
    parser.add_argument("--threads", type=int, default=2, help="PyTorch's threads")
    parser.add_argument("--data", default=os.path.join(ROOT, "data", "mnist"), help="the IDX files' folder")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with open(args.model, "rb") as f:
        spec = tomllib.load(f)
    r = recipe_of(spec.get("train", {}))
    train = load(args.data, "train-images-idx3-ubyte", "train-labels-idx1-ubyte")
    test = load(args.data, "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    runs = []
    for seed in seeds_of(args.seeds):
        runs.append(one_seed(spec["layer"], r, seed, train, test))
        if not args.json:
            run = runs[-1]
            print(f"seed {seed}: train {run['train_seconds']:.2f} s, test {run['eval_seconds']:.2f} s, "
                  f"accuracy {run['accuracy']:.2f}%", flush=True)
    mean = statistics.mean(run["accuracy"] for run in runs)
    median = statistics.median(run["train_seconds"] for run in runs)
    if args.json:
        print(json.dumps({"model": args.model, "torch": torch.__version__, "threads": args.threads, "runs": runs,
                          "mean_accuracy": mean, "median_train_seconds": median}))
    else:
        print(f"{args.model}: mean accuracy {mean:.2f}%, median training {median:.2f} s "
              f"(torch {torch.__version__}, {args.threads} threads)")


if __name__ == "__main__":
    main()
