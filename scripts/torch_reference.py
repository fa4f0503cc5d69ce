#!/usr/bin/env python3
"""Golden fixture for the CPU reference (and later the GPU kernels), in the spirit of llm.c's test_gpt2.

Builds the spec's network "Net3" (docs/recipe.md) in PyTorch with seeded default weights, takes
the first 16 real MNIST training images (normalized only, no augmentation), and records:

  weights.<name>        the initial state_dict (conv weights, bn weight/bias/running stats)
  input, labels         the batch, NCHW float32, and int64 labels
  step0.logits          training-mode logits of the first forward pass
  step0.loss            the mean cross-entropy loss of that pass
  step0.grad.<name>     every trainable parameter's gradient from that pass
  step0.running.<name>  batchnorm running_mean / running_var after that forward pass
  train.losses          the loss before each of 10 SGD steps on the same batch
  train.lr, train.momentum   the lr and momentum each of those steps used
  final.<name>          the state_dict after the 10 steps (weights and running statistics)
  final.eval_logits     evaluation-mode logits (running statistics) after the 10 steps
  schedule.steps, schedule.lr, schedule.momentum
                        OneCycleLR's values at selected steps of the full 12,000-step schedule

Everything from `step0.` on is computed twice: in float32 (PyTorch's own run, as the names above) and in
float64 (the same names behind `f64.`), from the same float32 initial weights and inputs. The float64
run is the ground truth; the float32 run shows how far PyTorch's own rounding goes.

Dropout is off for the fixture (p = 0), so the fixture needs no mask.
SGD: lr/momentum from torch.optim.lr_scheduler.OneCycleLR (max_lr 0.1, 12,000 total steps, div_factor 10,
final_div_factor 100 as the spec says, otherwise defaults),
weight_decay 1e-5.

Run once, by a developer with `pip install torch safetensors numpy`, from the repository root:

    python3 scripts/torch_reference.py
    python3 scripts/torch_reference.py --model tests/fixtures/bias_linear.toml
    python3 scripts/torch_reference.py --optimizer adam      (and adamw)

The first writes tests/fixtures/torch_reference.safetensors. The second builds the network of an
mnist-wgpu model file instead (scripts/torch_model.py's FileNet, named as mnist-wgpu names it), with
PyTorch's default initialization from the same seed, and writes the same records except the schedule to
tests/fixtures/torch_reference_<file name>.safetensors. Both are committed: the tests never need Python.

With --optimizer adam or adamw, Net3 takes ten steps of torch.optim.Adam / AdamW instead (foreach off:
the single-tensor code, as our update is written), betas (0.7, 0.9), eps 1e-8, weight_decay 0.01, lr from
OneCycleLR(max_lr 0.01, total_steps 10, cycle_momentum False, otherwise defaults: pct_start 0.3,
div_factor 25, final_div_factor 1e4), and tests/fixtures/torch_reference_<optimizer>.safetensors holds
weights., input, labels, train.losses, train.lr, final.<name> and the moments final.exp_avg.<name> and
final.exp_avg_sq.<name> (each also in float64, behind f64.), and final.step.
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
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = 16
STEPS = 10
TOTAL_STEPS = 12000


class Net3(nn.Module):
    def __init__(self, dropout=0.05):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.drop = nn.Dropout(dropout)
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(16)
        self.conv4 = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.bn4 = nn.BatchNorm2d(32)
        self.conv5 = nn.Conv2d(32, 32, 3, padding=0, bias=False)
        self.bn5 = nn.BatchNorm2d(32)
        self.conv6 = nn.Conv2d(32, 10, 1, bias=False)
        self.bn6 = nn.BatchNorm2d(10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.max_pool2d(self.drop(x), 2)
        x = F.relu(self.bn3(self.conv3(x)))
        x = F.relu(self.bn4(self.conv4(x)))
        x = F.max_pool2d(x, 2)
        x = F.relu(self.bn5(self.conv5(x)))
        x = F.relu(self.bn6(self.conv6(x)))
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


def read_idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def state(model, prefix):
    # num_batches_tracked is an integer counter, not part of the float state the tests compare.
    return {
        prefix + k: v.detach().clone().contiguous()
        for k, v in model.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }


def fresh(make, initial, dtype):
    """The network `make()` builds, in `dtype`, holding `initial`, in training mode."""
    model = make().to(dtype)
    model.load_state_dict(initial, strict=False)
    model.train()
    return model


def ten_steps(model, opt, sched, x, y, hyper=None):
    """STEPS steps of `opt` on one batch: each step's loss and lr (and the group's `hyper`, if named),
    then the state after them."""
    out, losses, lrs, hypers = {}, [], [], []
    for _ in range(STEPS):
        lrs.append(opt.param_groups[0]["lr"])
        if hyper:
            hypers.append(opt.param_groups[0][hyper])
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        losses.append(loss.item())
        loss.backward()
        opt.step()
        sched.step()
    out["train.losses"] = torch.tensor(losses, dtype=torch.float64)
    out["train.lr"] = torch.tensor(lrs, dtype=torch.float64)
    if hyper:
        out["train." + hyper] = torch.tensor(hypers, dtype=torch.float64)
    out.update(state(model, "final."))
    return out


def run(make, initial, x, y, dtype):
    """One forward/backward pass, then ten SGD steps, from `initial` weights, computed in `dtype`;
    `make()` builds the network."""
    out = {}
    x = x.to(dtype)
    model = fresh(make, initial, dtype)
    logits = model(x)
    loss = F.cross_entropy(logits, y)
    loss.backward()
    out["step0.logits"] = logits.detach().clone()
    out["step0.loss"] = loss.detach().reshape(1).clone()
    for name, p in model.named_parameters():
        out["step0.grad." + name] = p.grad.detach().clone()
    for name, b in model.named_buffers():
        if not name.endswith("num_batches_tracked"):
            out["step0.running." + name] = b.detach().clone()

    # Ten SGD steps on the same batch, from the initial weights, with the spec's one-cycle schedule.
    model = fresh(make, initial, dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-5)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=0.1, total_steps=TOTAL_STEPS, div_factor=10, final_div_factor=100
    )
    out.update(ten_steps(model, opt, sched, x, y, "momentum"))
    model.eval()
    with torch.no_grad():
        out["final.eval_logits"] = model(x).clone()
    return out


ADAM = dict(betas=(0.7, 0.9), eps=1e-8, weight_decay=0.01, max_lr=0.002)


def adam_run(make, initial, x, y, dtype, kind):
    """Ten Adam or AdamW steps on one batch from `initial` weights, computed in `dtype`."""
    model = fresh(make, initial, dtype)
    cls = torch.optim.Adam if kind == "adam" else torch.optim.AdamW
    opt = cls(model.parameters(), lr=ADAM["max_lr"], betas=ADAM["betas"], eps=ADAM["eps"],
              weight_decay=ADAM["weight_decay"], foreach=False)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=ADAM["max_lr"], total_steps=STEPS, cycle_momentum=False)
    out = ten_steps(model, opt, sched, x.to(dtype), y)
    for name, p in model.named_parameters():
        st = opt.state[p]
        out["final.exp_avg." + name] = st["exp_avg"].detach().clone()
        out["final.exp_avg_sq." + name] = st["exp_avg_sq"].detach().clone()
        out["final.step"] = torch.tensor([float(st["step"])], dtype=torch.float64)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="an mnist-wgpu model file (default: Net3, with the schedule)")
    parser.add_argument("--optimizer", choices=["adam", "adamw"], help="Net3's ten steps with Adam or AdamW")
    args = parser.parse_args()
    make = lambda: Net3(dropout=0.0)
    path = os.path.join(ROOT, "tests/fixtures/torch_reference.safetensors")
    if args.optimizer:
        path = os.path.join(ROOT, f"tests/fixtures/torch_reference_{args.optimizer}.safetensors")
    if args.model:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from torch_model import FileNet

        with open(args.model, "rb") as f:
            layers = tomllib.load(f)["layer"]
        if any(layer.get("type") == "dropout" for layer in layers):
            sys.exit(f"{args.model}: the fixture runs without dropout; give a model file without one")
        make = lambda: FileNet(layers)
        name = os.path.splitext(os.path.basename(args.model))[0]
        path = os.path.join(ROOT, f"tests/fixtures/torch_reference_{name}.safetensors")
    torch.manual_seed(1234)
    torch.use_deterministic_algorithms(True)
    images = read_idx(os.path.join(ROOT, "data/mnist/train-images-idx3-ubyte.gz"))[:BATCH]
    labels = read_idx(os.path.join(ROOT, "data/mnist/train-labels-idx1-ubyte.gz"))[:BATCH]
    x = ((torch.from_numpy(images.astype(np.float32)) / 255.0 - 0.1307) / 0.3081).unsqueeze(1).contiguous()
    y = torch.from_numpy(labels.astype(np.int64))

    model = make()
    out = state(model, "weights.")
    out["input"] = x
    out["labels"] = y
    initial = {k[len("weights."):]: v for k, v in out.items() if k.startswith("weights.")}
    # PyTorch's own float32 run, and the same computation in float64: the ground truth that tells
    # which part of a float32 difference is whose rounding.
    for dtype, prefix in [(torch.float32, ""), (torch.float64, "f64.")]:
        if args.optimizer:
            results = adam_run(make, initial, x, y, dtype, args.optimizer)
        else:
            results = run(make, initial, x, y, dtype)
        for k, v in results.items():
            out[prefix + k] = v
    if args.model or args.optimizer:
        save_file({k: v.contiguous() for k, v in out.items()}, path, metadata={"torch": torch.__version__})
        print(f"wrote {path} ({len(out)} tensors), torch {torch.__version__}, losses {out['train.losses'][0].item():.6f} "
              f"-> {out['train.losses'][-1].item():.6f}")
        return

    # The full schedule at selected steps, straight from OneCycleLR.
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.OneCycleLR(probe, max_lr=0.1, total_steps=TOTAL_STEPS, div_factor=10, final_div_factor=100)
    wanted = {0, 1, 2, 100, 599, 600, 1800, 3000, 3598, 3599, 3600, 4000, 6000, 8000, 10000, 11000, 11998, 11999}
    steps, lr, mom = [], [], []
    for k in range(TOTAL_STEPS):
        if k in wanted:
            steps.append(k)
            lr.append(probe.param_groups[0]["lr"])
            mom.append(probe.param_groups[0]["momentum"])
        probe.step()
        if k < TOTAL_STEPS - 1:
            sched.step()
    out["schedule.steps"] = torch.tensor(steps, dtype=torch.int64)
    out["schedule.lr"] = torch.tensor(lr, dtype=torch.float64)
    out["schedule.momentum"] = torch.tensor(mom, dtype=torch.float64)

    save_file({k: v.contiguous() for k, v in out.items()}, path, metadata={"torch": torch.__version__})
    print(f"wrote {path} ({len(out)} tensors), torch {torch.__version__}, step-0 loss {out['step0.loss'].item():.6f}")


if __name__ == "__main__":
    main()
