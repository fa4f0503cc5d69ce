#!/usr/bin/env bash
# Round 4 (the narrower speed99, the CPU backend's overhead work, PyTorch with augmentation): ours and
# PyTorch (2 threads) alternated on the 2-core machine; outputs beside this script as r4-*.json.
set -u
cd "$(dirname "$0")/../../../.."
B=target/release/mnist-wgpu
out=docs/results/speedrun/side-by-side
for round in 1 2 3; do
  $B speedrun --target 99.0 --model fast-recipe --seeds $round --backend cpu --json > $out/r4-ours-anchor-$round.json
  python3 scripts/torch_speedrun.py --seeds $round --json > $out/r4-torch-anchor-$round.json
  $B speedrun --target 99.0 --seeds $((10 + round)) --backend cpu --json > $out/r4-ours-speed99-$round.json
  python3 scripts/torch_speedrun.py --model models/speed99.toml --seeds $((10 + round)) --json > $out/r4-torch-speed99-$round.json
  $B speedrun --target 99.4 --seeds $((10 + round)) --backend cpu --json > $out/r4-ours-speed994-$round.json
  python3 scripts/torch_speedrun.py --model models/speed994.toml --seeds $((10 + round)) --json \
    > $out/r4-torch-speed994-$round.json
done
$B speedrun --target 99.0 --seeds 14-20 --backend cpu --json > $out/r4-ours-speed99-more.json
$B speedrun --target 99.4 --seeds 14-15 --backend cpu --json > $out/r4-ours-speed994-more.json
