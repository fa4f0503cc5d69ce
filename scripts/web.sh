#!/usr/bin/env bash
# The trainer as a web page: builds web/ for WebAssembly, writes a static folder (index.html at its
# root, the MNIST files under data/, the documented run's network) and serves it on 127.0.0.1.
#
#   scripts/web.sh [--out DIR] [--no-serve] [--port N]
#
# --out DIR    the folder to write (default target/web); any static host can serve it
# --no-serve   only write the folder
# --port N     the port to serve on (default 8080)
#
# Needs the wasm32-unknown-unknown target and wasm-bindgen-cli at the version of Cargo.lock's
# wasm-bindgen; both are installed when missing (wasm-bindgen-cli builds from crates.io in about 1.5 min).
set -euo pipefail
cd "$(dirname "$0")/.."

out=target/web
serve=1
port=8080
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="${2:?--out needs a folder}"; shift 2 ;;
    --no-serve) serve=0; shift ;;
    --port) port="${2:?--port needs a number}"; shift 2 ;;
    -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "scripts/web.sh: unknown argument $1 (try --help)" >&2; exit 2 ;;
  esac
done

if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-unknown-unknown; then
  rustup target add wasm32-unknown-unknown
fi
version=$(grep -A1 '^name = "wasm-bindgen"$' Cargo.lock | sed -n 's/^version = "\(.*\)"$/\1/p')
if [ "$(wasm-bindgen --version 2>/dev/null | cut -d' ' -f2)" != "$version" ]; then
  echo "Installing wasm-bindgen-cli $version (the version of Cargo.lock's wasm-bindgen)..."
  # Without --locked: its lock file names a webpki-roots version that crates.io no longer has. A debug
  # build: it installs in about 1.3 minutes instead of 4.5, and writes the same files (2 s instead of
  # 0.5 s for this page; measured here, 2026-12-06).
  cargo install wasm-bindgen-cli --version "$version" --debug
fi

cargo build -p mnist-web --target wasm32-unknown-unknown --release
rm -rf "$out"
mkdir -p "$out/pkg" "$out/data"
wasm-bindgen --target web --no-typescript --out-dir "$out/pkg" target/wasm32-unknown-unknown/release/mnist_web.wasm
cp web/static/* "$out/"
cp data/mnist/*.gz "$out/data/"
# The network Draw starts with: the documented run's (README, docs/results/cpu-20-epochs, 99.49%).
cp docs/results/cpu-20-epochs/best.safetensors "$out/net3.safetensors"
echo "Wrote the page to $out ($(du -sh "$out" | cut -f1))"

if [ "$serve" = 1 ]; then
  echo "Serving it at http://127.0.0.1:$port/ (Ctrl-C stops)"
  exec python3 -m http.server --bind 127.0.0.1 "$port" --directory "$out"
fi
