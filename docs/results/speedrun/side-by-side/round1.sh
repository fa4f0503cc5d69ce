#!/usr/bin/env bash
# Side by side on the 2-core machine: ours and PyTorch (2 threads) alternated, round by round.
set -u
B=/work/dev/target/release/mnist-wgpu
out=/tmp/sbs; mkdir -p $out
cd /work/dev
for round in 1 2 3; do
  $B speedrun --target 99.0 --model fast-recipe --seeds $round --backend cpu --json > $out/ours-anchor-$round.json
  python3 scripts/torch_speedrun.py --seeds $round --json > $out/torch-anchor-$round.json
  $B speedrun --target 99.0 --seeds $((10 + round)) --backend cpu --json > $out/ours-speed99-$round.json
  python3 scripts/torch_speedrun.py --model models/speed99.toml --seeds $((10 + round)) --json > $out/torch-speed99-$round.json
done
$B speedrun --target 99.0 --seeds 14-20 --backend cpu --json > $out/ours-speed99-more.json
$B speedrun --target 99.4 --seeds 11-15 --backend cpu --json > $out/ours-speed994.json
echo finished > $out/finished
