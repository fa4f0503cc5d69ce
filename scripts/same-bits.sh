#!/usr/bin/env bash
# same-bits.sh [--cpu-only] BEFORE_BIN AFTER_BIN [OUT]: the proof a refactor owes that it changes no
# result. Runs both builds of mnist-wgpu the same way, then compares what they wrote:
#   - short training runs (2,000 images, 2 epochs, seed 1) of net3 on the CPU backend and on
#     lavapipe's Vulkan, of the fast recipe's network (no batchnorm, Adam) and of mlp3 (linear layers
#     only, SGD) on the CPU backend:
#     every tensor of last.safetensors, best.safetensors and last.optim.safetensors must be
#     byte-identical (the files themselves may differ: their metadata is written in no fixed order);
#   - `verify --batch-size 16`: every row of BEFORE, with the same error, in the same order, among
#     AFTER's rows (a change that adds a kernel adds rows; those are listed).
# --cpu-only runs the CPU backend's runs alone (a change to the CPU executors only).
# Exits 1 on any difference, naming it. Build BEFORE_BIN from the old revision in a worktree, e.g.
#   git worktree add /tmp/before REV && (cd /tmp/before && cargo build --release)
set -euo pipefail
cpu_only=0
if [ "${1:-}" = "--cpu-only" ]; then
  cpu_only=1
  shift
fi
if [ $# -lt 2 ]; then
  echo "usage: $0 [--cpu-only] BEFORE_BIN AFTER_BIN [OUT]" >&2
  exit 2
fi
before=$(realpath "$1")
after=$(realpath "$2")
out="${3:-$(mktemp -d -t same-bits.XXXXXX)}"
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"
for side in before after; do
  bin=${!side}
  dir="$out/$side"
  rm -rf "$dir"
  mkdir -p "$dir"
  echo "$side: $bin"
  "$bin" train --backend cpu --train-images 2000 --test-images 500 --epochs 2 --seed 1 --out "$dir/cpu" >"$dir/cpu.log" 2>&1
  "$bin" train --backend cpu --model fast-recipe --train-images 2000 --test-images 500 --epochs 2 --seed 1 \
    --out "$dir/cpu-fast-recipe" >"$dir/cpu-fast-recipe.log" 2>&1
  "$bin" train --backend cpu --model mlp3 --train-images 2000 --test-images 500 --epochs 2 --seed 1 \
    --out "$dir/cpu-mlp3" >"$dir/cpu-mlp3.log" 2>&1
  [ $cpu_only = 1 ] && continue
  "$bin" train --backend gpu --adapter llvmpipe:vulkan --train-images 2000 --test-images 500 --epochs 2 --seed 1 \
    --out "$dir/gpu" >"$dir/gpu.log" 2>&1
  "$bin" verify --batch-size 16 --adapter llvmpipe:vulkan --json >"$dir/verify.json" 2>"$dir/verify.err"
done
python3 - "$out/before" "$out/after" $cpu_only <<'PY'
import json, struct, sys

def tensors(path):
    data = open(path, "rb").read()
    n = struct.unpack("<Q", data[:8])[0]
    header, body = json.loads(data[8 : 8 + n]), data[8 + n :]
    return {k: body[v["data_offsets"][0] : v["data_offsets"][1]] for k, v in header.items() if k != "__metadata__"}

before, after, cpu_only = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
same = True
for backend in ["cpu", "cpu-fast-recipe", "cpu-mlp3"] + ([] if cpu_only else ["gpu"]):
    for name in ["last.safetensors", "best.safetensors", "last.optim.safetensors"]:
        a, b = tensors(f"{before}/{backend}/{name}"), tensors(f"{after}/{backend}/{name}")
        differ = sorted(set(a) ^ set(b)) + [k for k in a if k in b and a[k] != b[k]]
        same &= not differ
        print(f"{backend} {name}: {len(a)} tensors, " + ("byte-identical" if not differ else "DIFFER: " + ", ".join(differ)))
if cpu_only:
    sys.exit(0 if same else 1)
rows = [json.load(open(f"{side}/verify.json"))["checks"] for side in (before, after)]
# Walk AFTER's rows in order, taking each of BEFORE's rows where it comes; what is left over is new.
found, added = 0, []
for row in rows[1]:
    if found < len(rows[0]) and row == rows[0][found]:
        found += 1
    else:
        added.append(row)
same &= found == len(rows[0])
print(f"verify --batch-size 16: {len(rows[0])} rows before, {len(rows[1])} after; "
      f"{found} of the before rows unchanged and in order, {len(added)} new")
if found < len(rows[0]):
    print("  first before row not found unchanged after it:", rows[0][found])
for row in added:
    print("  new:", row.get("kernel"), row.get("layer"), row.get("shape"))
sys.exit(0 if same else 1)
PY
echo "outputs in $out"
