#!/usr/bin/env bash
# same-bits-cpu.sh BEFORE_BIN AFTER_BIN OUT: the CPU backend's half of scripts/same-bits.sh, for
# changes to the fused executor only: short training runs of net3 and of the fast recipe's network
# (2,000 images, seed 1) with both builds; every tensor of the checkpoints and optimizer state must be
# byte-identical.
set -euo pipefail
before=$(realpath "$1"); after=$(realpath "$2"); out=$3
for side in before after; do
  bin=${!side}
  for model in net3 fast-recipe; do
    "$bin" train --backend cpu --model "$model" --train-images 2000 --test-images 500 --epochs 2 --seed 1 \
      --out "$out/$side/$model" >"$out/$side-$model.log" 2>&1
  done
done
python3 - "$out" <<'PY'
import json, struct, sys
def tensors(path):
    data = open(path, "rb").read()
    n = struct.unpack("<Q", data[:8])[0]
    header, body = json.loads(data[8 : 8 + n]), data[8 + n :]
    return {k: body[v["data_offsets"][0] : v["data_offsets"][1]] for k, v in header.items() if k != "__metadata__"}
out, same = sys.argv[1], True
for model in ["net3", "fast-recipe"]:
    for name in ["last.safetensors", "best.safetensors", "last.optim.safetensors"]:
        a, b = tensors(f"{out}/before/{model}/{name}"), tensors(f"{out}/after/{model}/{name}")
        differ = sorted(set(a) ^ set(b)) + [k for k in a if k in b and a[k] != b[k]]
        same &= not differ
        print(f"{model} {name}: {len(a)} tensors, " + ("byte-identical" if not differ else "DIFFER: " + ", ".join(differ)))
sys.exit(0 if same else 1)
PY
