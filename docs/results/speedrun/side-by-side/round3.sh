#!/usr/bin/env bash
# Round 3 (after issue 29's batched linear layers): round 1 again, ours and PyTorch (2 threads)
# alternated, on the 2-core machine; outputs beside this script as r3-*.json.
set -u
cd "$(dirname "$0")/../../../.."
B=target/release/mnist-wgpu
out=docs/results/speedrun/side-by-side
for round in 1 2 3; do
  $B speedrun --target 99.0 --model fast-recipe --seeds $round --backend cpu --json > $out/r3-ours-anchor-$round.json
  python3 scripts/torch_speedrun.py --seeds $round --json > $out/r3-torch-anchor-$round.json
  $B speedrun --target 99.0 --seeds $((10 + round)) --backend cpu --json > $out/r3-ours-speed99-$round.json
  python3 scripts/torch_speedrun.py --model models/speed99.toml --seeds $((10 + round)) --json > $out/r3-torch-speed99-$round.json
done
$B speedrun --target 99.0 --seeds 14-20 --backend cpu --json > $out/r3-ours-speed99-more.json
$B speedrun --target 99.4 --seeds 11-15 --backend cpu --json > $out/r3-ours-speed994.json
