#!/usr/bin/env python3
"""The CPU backend against PyTorch on every shipped network: images/s of training steps and of
evaluation, side by side on this machine, and their ratio.

For each network and batch size it runs `mnist-wgpu bench --backends cpu` and `torch_speed.py` (PyTorch
on its default threads, the same network built from the model file, SGD with momentum as bench's
default) one after the other, PAIRS times alternately, and reports the medians of each side's medians
(each of 5 repeats of 20 batches). Needs a release build (`cargo build --release`) and `pip install torch`.

    python3 scripts/cpu_speed.py                          # every shipped network at batch 100 and 256
    python3 scripts/cpu_speed.py --models fast-recipe --batch-sizes 256 --pairs 1 --json out.json
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NETWORKS = ["net3", "small8k", "small5k", "best20k", "net3-avgpool2", "fast-recipe", "speed99", "mlp3"]
BINARY = os.path.join(ROOT, "target", "release", "mnist-wgpu")


def run_json(cmd, env=None):
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{out.stderr}")
    return json.loads(out.stdout)


def ours(model, batch, env):
    rows = run_json([BINARY, "bench", "--backends", "cpu", "--model", model, "--batch-size", str(batch), "--json"], env)
    rate = {}
    for r in rows["results"]:
        if r["what"].startswith("training steps"):
            rate["training"] = r["images_per_sec_median"]
        elif r["what"].startswith("evaluation"):
            rate["evaluation"] = r["images_per_sec_median"]
        if r["device"].startswith("cpu ("):
            rate["device"] = r["device"]
    return rate


def torch_side(model, batch, env):
    return run_json([sys.executable, os.path.join(ROOT, "scripts", "torch_speed.py"), "--model", model,
                     "--batch-size", str(batch), "--json"], env)


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(NETWORKS), help="comma-separated model files or presets")
    parser.add_argument("--batch-sizes", default="100,256", help="comma-separated batch sizes")
    parser.add_argument("--pairs", type=int, default=3, help="alternated runs of each side (default 3)")
    parser.add_argument("--avx2", action="store_true",
                        help="limit both sides to AVX2: MNIST_WGPU_CPU_ISA=avx2; ATEN_CPU_CAPABILITY=avx2, "
                             "ONEDNN_MAX_CPU_ISA=AVX2 and MKL_ENABLE_INSTRUCTIONS=AVX2 for PyTorch")
    parser.add_argument("--json", metavar="FILE", help="also write every run's figures to FILE")
    args = parser.parse_args()
    if args.pairs < 1:
        parser.error("--pairs must be at least 1")
    try:
        batches = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError:
        parser.error(f"--batch-sizes {args.batch_sizes!r}: give whole numbers separated by commas")
    if not os.access(BINARY, os.X_OK):
        sys.exit(f"{BINARY} is missing: run `cargo build --release` first")
    env = dict(os.environ)
    if args.avx2:
        env.update(MNIST_WGPU_CPU_ISA="avx2", ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2",
                   MKL_ENABLE_INSTRUCTIONS="AVX2")
    results = []
    print(f"| network | batch | training, ours / PyTorch images/s | ratio | evaluation, ours / PyTorch | ratio |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for model in args.models.split(","):
        for batch in batches:
            runs = {"ours": [], "torch": []}
            for _ in range(args.pairs):
                runs["ours"].append(ours(model, batch, env))
                runs["torch"].append(torch_side(model, batch, env))
            med = {side: {what: statistics.median(r[what]["median"] if side == "torch" else r[what] for r in rs)
                          for what in ("training", "evaluation")} for side, rs in runs.items()}
            ratio = {what: med["ours"][what] / med["torch"][what] for what in ("training", "evaluation")}
            results.append({"model": model, "batch_size": batch, "runs": runs, "medians": med, "ratios": ratio})
            print(f"| {model} | {batch} | {med['ours']['training']:,.0f} / {med['torch']['training']:,.0f} | "
                  f"{ratio['training']:.2f}x | {med['ours']['evaluation']:,.0f} / {med['torch']['evaluation']:,.0f} | "
                  f"{ratio['evaluation']:.2f}x |", flush=True)
    device = results[0]["runs"]["ours"][0].get("device", "cpu") if results else "cpu"
    torch_info = results[0]["runs"]["torch"][0] if results else {}
    print(f"\n{cpu_model()}; ours: {device}; PyTorch {torch_info.get('torch')} on {torch_info.get('threads')} "
          f"threads{' (both limited to AVX2)' if args.avx2 else ''}; medians of {args.pairs} alternated pairs, "
          f"each the median of 5 repeats of 20 batches")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": cpu_model(), "avx2": args.avx2, "pairs": args.pairs, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
