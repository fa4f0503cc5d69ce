#!/usr/bin/env bash
# Fuzzes the readers of what a user hands the program, each for SECONDS (default 30):
#   idx         the IDX reader, gzipped or raw (--data DIR)
#   checkpoint  the checkpoint loader: the model file inside, the weights and the momenta
#   model_file  the model-file parser (--model FILE), and the file a model writes back
#   image       predict's picture decoding and MNIST-style preprocessing
# Usage: scripts/fuzz.sh [SECONDS] [TARGET...]
# Needs cargo-fuzz (`cargo install cargo-fuzz`); builds on the stable toolchain with RUSTC_BOOTSTRAP=1.
# Each target starts from its committed seeds in fuzz/corpus/TARGET and adds what it finds to
# fuzz/work/TARGET (ignored by git). A crash, a hang (10 s per input) or more than 2 GiB of memory
# stops the target with its input in fuzz/artifacts/TARGET; the script then exits 1. Turn such an
# input into a regression test in tests/fuzz_regressions.rs.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-30}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(idx checkpoint model_file image)
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "error: cargo-fuzz is not installed: cargo install cargo-fuzz" >&2
    exit 2
fi
export RUSTC_BOOTSTRAP=1

cargo fuzz build >/dev/null
status=0
summary=""
for t in "${targets[@]}"; do
    mkdir -p "fuzz/work/$t"
    log="fuzz/work/$t.log"
    echo "== $t: ${seconds} s"
    if cargo fuzz run "$t" "fuzz/work/$t" "fuzz/corpus/$t" -- \
        -max_total_time="$seconds" -max_len=8192 -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1; then
        result=ok
    else
        result=FAILED
        status=1
        tail -40 "$log" >&2
    fi
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo '?')
    rate=$(grep -o 'exec/s: *[0-9]*' "$log" | tail -1 | grep -o '[0-9]*$' || echo '?')
    summary+=$(printf '%-12s %-7s %12s executions  %8s exec/s' "$t" "$result" "$runs" "$rate")$'\n'
done
echo
echo "target       result    executions"
printf '%s' "$summary"
exit $status
