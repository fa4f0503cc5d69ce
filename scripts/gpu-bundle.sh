#!/usr/bin/env bash
# Builds dist/: what proves and measures mnist-wgpu on a machine that has a GPU driver but no Rust toolchain
# and no internet. Run on a development machine (Debian or Ubuntu, the same CPU architecture as the GPU
# machine), from anywhere:
#
#   scripts/gpu-bundle.sh [--baseline REV]
#
# dist/ then holds the stripped release binary, the Vulkan loader library (Debian's libvulkan1, unpacked,
# with glvnd's dispatch libraries),
# the bundled MNIST, the PyTorch baseline scripts and run.sh. Copy dist/ to the GPU machine and run
# `dist/run.sh OUTDIR` there (`--quick` for one epoch of each); see run.sh's header and docs/gpu-bundle.md.
#
# --baseline REV also builds the commit REV (in a temporary git worktree, its own target folder
# target/baseline) into dist/baseline/: run.sh then profiles it right after this build, on the same
# card in the same run, so one run on a borrowed GPU gives kernel times before and after a change.
set -euo pipefail
cd "$(dirname "$0")/.."

usage="usage: $0 [--baseline REV]"
baseline=
case $# in
  0) ;;
  2) [ "$1" = --baseline ] || { echo "$usage" >&2; exit 2; }
     baseline=$(git rev-parse --verify --quiet "$2^{commit}") || { echo "error: --baseline $2: no such commit" >&2; exit 2; } ;;
  *) echo "$usage" >&2; exit 2 ;;
esac

cargo build --release --locked
target_dir=${CARGO_TARGET_DIR:-target}
rm -rf dist
mkdir -p dist/lib dist/data
cp "$target_dir/release/mnist-wgpu" dist/mnist-wgpu
strip dist/mnist-wgpu
cp -r data/mnist dist/data/mnist
cp scripts/torch_recipe.py scripts/torch_reference.py dist/
cp scripts/gpu-run.sh dist/run.sh
chmod +x dist/run.sh dist/mnist-wgpu

# The Vulkan loader (libvulkan.so.1, Debian's libvulkan1): wgpu opens it at run time, and a GPU machine may
# have the driver without it. With it, glvnd's dispatch libraries (libglvnd0, libglx0, libegl1), which
# NVIDIA's Vulkan driver library links against; run.sh uses each only where the machine lacks it.
packages=(libvulkan1 libglvnd0 libglx0 libegl1)
tmp=$(mktemp -d)
worktree=
cleanup() {
  rm -rf "$tmp"
  [ -z "$worktree" ] || git worktree remove --force "$worktree" >/dev/null 2>&1 || true
}
trap cleanup EXIT
if ! (cd "$tmp" && apt-get download "${packages[@]}" >/dev/null 2>&1); then
  echo "apt-get download ${packages[*]} failed; refreshing the package lists (apt-get update)" >&2
  apt-get update -q >/dev/null || { echo "error: apt-get update failed (run as root, or fetch ${packages[*]} by hand)" >&2; exit 1; }
  (cd "$tmp" && apt-get download "${packages[@]}" >/dev/null)
fi
for deb in "$tmp"/*.deb; do
  dpkg-deb -x "$deb" "$tmp/root"
done
find "$tmp/root" -name '*.so.*' \( -type f -o -type l \) -exec cp -a {} dist/lib/ \;
[ -e dist/lib/libvulkan.so.1 ] || { echo "error: no libvulkan.so.1 in the libvulkan1 package" >&2; exit 1; }

if [ -n "$baseline" ]; then
  worktree="$tmp/baseline"
  git worktree add --detach --quiet "$worktree" "$baseline"
  baseline_target="$PWD/target/baseline"
  (cd "$worktree" && CARGO_TARGET_DIR="$baseline_target" cargo build --release --locked)
  mkdir -p dist/baseline
  cp "$baseline_target/release/mnist-wgpu" dist/baseline/mnist-wgpu
  strip dist/baseline/mnist-wgpu
  git log -1 --format='%h (%cs)' "$baseline" >dist/baseline/REV
  echo "baseline: $(cat dist/baseline/REV)"
fi

echo "dist/ ($(du -sh dist | cut -f1)): $(ls dist | tr '\n' ' ')"
echo "On the GPU machine: dist/run.sh OUTDIR [--quick]"
