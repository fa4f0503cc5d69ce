#!/usr/bin/env bash
set -u
B=/work/dev/target/release/mnist-wgpu
out=/tmp/sbs
cd /work/dev
for round in 1 2 3; do
  $B speedrun --target 99.0 --seeds $((10 + round)) --backend cpu --json > $out/ours-speed99-$round.json
  python3 scripts/torch_speedrun.py --model models/speed99.toml --seeds $((20 + round)) --json > $out/torch-speed99-b$round.json
done
$B speedrun --target 99.0 --seeds 14-20 --backend cpu --json > $out/ours-speed99-more.json
$B speedrun --target 99.4 --seeds 11-15 --backend cpu --json > $out/ours-speed994.json
echo finished > $out/finished2
