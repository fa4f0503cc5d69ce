#!/usr/bin/env bash
# Builds dist/: what proves and measures mnist-wgpu on a machine that has a GPU driver but no Rust toolchain
# and no internet. Run on a development machine (Debian or Ubuntu, the same CPU architecture as the GPU
# machine), from anywhere:
#
#   scripts/gpu-bundle.sh
#
# dist/ then holds the stripped release binary, the Vulkan loader library (Debian's libvulkan1, unpacked,
# with glvnd's dispatch libraries),
# the bundled MNIST, the PyTorch baseline scripts and run.sh. Copy dist/ to the GPU machine and run
# `dist/run.sh OUTDIR` there (`--quick` for one epoch of each); see run.sh's header and the README.
set -euo pipefail
cd "$(dirname "$0")/.."

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
trap 'rm -rf "$tmp"' EXIT
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

echo "dist/ ($(du -sh dist | cut -f1)): $(ls dist | tr '\n' ' ')"
echo "On the GPU machine: dist/run.sh OUTDIR [--quick]"
