#!/usr/bin/env bash
# The browser test: builds the page (scripts/web.sh) and the native binary, then drives the page in
# headless Chromium with WebGPU on SwiftShader (web/test/browser.test.mjs): verify, 10 steps against
# the CPU reference, training against the native CPU backend, a checkpoint's round trip through
# native eval, drawn digits, a picture file predicted, Stop, errors shown. Needs Debian's chromium, Node.js and npm.
#
#   scripts/web-test.sh [--only webgpu,verify,steps,train,draw,predict,stop,errors] [--train-run QUERY]
set -euo pipefail
cd "$(dirname "$0")/.."

page=target/web-test
scripts/web.sh --out "$page" --no-serve
# The binary as the test suite builds it (its dev-dependencies change naga's features, so a plain
# `cargo build` after `cargo test` would build it again: 2 minutes of CI).
cargo test --release --no-run
(cd web/test && npm ci --no-audit --no-fund --loglevel=error)
node web/test/browser.test.mjs --page "$page" --bin target/release/mnist-wgpu "$@"
