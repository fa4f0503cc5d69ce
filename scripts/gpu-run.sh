#!/usr/bin/env bash
# dist/run.sh OUTDIR [--quick]: the GPU proof kit's runner (scripts/gpu-bundle.sh copies it into dist/).
#
# On a machine with a GPU driver (no Rust, no internet needed) it finds the Vulkan driver, then runs, in order:
#   adapters; verify (every kernel and whole steps against the CPU reference); bench --backends gpu,cpu --host-only;
#   profile --json; when the bundle holds an older build (gpu-bundle.sh --baseline REV), that build's
#   profile --json, beside this one's; train --backend gpu (the recipe, 20 epochs); and, when python3
#   has PyTorch with CUDA and torchvision, scripts/torch_recipe.py --device cuda with the same recipe
#   (workers = cores).
# --quick does 1 epoch of each and shorter benchmarks.
#
# OUTDIR receives at most 8 files: run.log (every command and its output), verify.json, bench.json,
# profile.json, metrics.jsonl (our training run), torch.jsonl (PyTorch's), best.safetensors (our best
# weights) and summary.txt, the table printed last (the baseline's profile goes into run.log and the
# table). A step that fails is reported and the next one runs.
# In a full run each step has a time limit (Ctrl-C, then a kill) so the whole stays within 9 minutes. The exit
# status is 1 when any step failed or stopped at its limit.
set -uo pipefail

usage="usage: $0 OUTDIR [--quick]"
[ $# -ge 1 ] && [ $# -le 2 ] || { echo "$usage" >&2; exit 2; }
out=$1
quick=0
if [ $# -eq 2 ]; then
  [ "$2" = --quick ] || { echo "$usage" >&2; exit 2; }
  quick=1
fi
here=$(cd "$(dirname "$0")" && pwd)
bin="$here/mnist-wgpu"
[ -x "$bin" ] || { echo "error: $bin not found: build the bundle with scripts/gpu-bundle.sh" >&2; exit 2; }
mkdir -p "$out" || exit 2
out=$(cd "$out" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
log="$out/run.log"
: >"$log"

# NVIDIA's libraries where a container mounts them outside the linker's path, then the bundled Vulkan
# loader and glvnd libraries, each only where the machine has none of its own.
libs="$work/lib"
mkdir -p "$libs"
# The sonames (libvulkan.so.1, ...); each links to its versioned file beside it. The linker's cache is
# read once, whole (grep -q on a pipe could cut it short and fail under pipefail).
known=$(ldconfig -p 2>/dev/null || /sbin/ldconfig -p 2>/dev/null || true)
for f in "$here"/lib/*.so.[0-9]; do
  [ -e "$f" ] || continue
  name=$(basename "$f")
  grep -q "^[[:space:]]*$name " <<<"$known" || ln -sf "$f" "$libs/$name"
done
for d in /usr/local/nvidia/lib64 /usr/local/nvidia/lib; do
  [ -d "$d" ] && libs="$libs:$d"
done
export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"
# The Vulkan drivers (ICD manifests), unless the caller named them: the standard folders, and a driver
# installed under /usr/local/nvidia.
if [ -z "${VK_DRIVER_FILES:-}${VK_ICD_FILENAMES:-}" ]; then
  icds=$(find /usr/local/nvidia /etc/vulkan/icd.d /usr/share/vulkan/icd.d /usr/local/share/vulkan/icd.d \
    -name '*.json' -path '*icd.d*' 2>/dev/null | sort -u | paste -sd: -)
  if [ -n "$icds" ]; then
    # VK_DRIVER_FILES for current loaders, VK_ICD_FILENAMES for older ones.
    export VK_DRIVER_FILES="$icds" VK_ICD_FILENAMES="$icds"
  fi
fi

if [ $quick = 1 ]; then
  epochs=1 bench_args=(--steps 5 --repeats 3) profile_steps=3
else
  epochs=20 bench_args=() profile_steps=5
fi
cores=$(nproc 2>/dev/null || echo 1)

# step NAME LIMIT_S [--into FILE] COMMAND...: runs COMMAND with its output into run.log (and the terminal),
# or its standard output into FILE (its errors still reach run.log); records its exit status and seconds
# in $work/steps.tsv. LIMIT_S 0 means no limit (quick runs).
step() {
  local name=$1 limit=$2 into=
  shift 2
  if [ "$1" = --into ]; then
    into=$2
    shift 2
  fi
  echo "== $name: $*${into:+ > $into}" | tee -a "$log"
  local start end rc cmd=("$@")
  [ -n "$into" ] && cmd=(sh -c 'f=$1; shift; exec "$@" >"$f"' sh "$into" "$@")
  [ "$limit" -gt 0 ] && cmd=(timeout -s INT -k 15 "$limit" "${cmd[@]}")
  start=$(date +%s.%N)
  "${cmd[@]}" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  end=$(date +%s.%N)
  local seconds
  seconds=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')
  [ "$rc" = 124 ] && echo "== $name: stopped at its limit of $limit s" | tee -a "$log"
  echo "== $name: exit $rc after $seconds s" | tee -a "$log"
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$seconds" "$limit" >>"$work/steps.tsv"
}

# Limits (full runs), which add up to 9 minutes: the 20 epochs get the most.
lim() { [ $quick = 1 ] && echo 0 || echo "$1"; }

{
  echo "mnist-wgpu GPU run: $(date -u +%Y-%m-%dT%H:%M:%SZ), $(uname -srm), $cores cores, $([ $quick = 1 ] && echo quick || echo full)"
  echo "VK_DRIVER_FILES=${VK_DRIVER_FILES:-}"
  echo "bundled libraries used: $(ls "$work/lib" | tr '\n' ' ')"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
} 2>&1 | tee -a "$log"

step adapters "$(lim 20)" "$bin" adapters
step verify "$(lim 60)" --into "$out/verify.json" "$bin" verify --json
step bench "$(lim 60)" --into "$out/bench.json" "$bin" bench --backends gpu,cpu --host-only --json "${bench_args[@]}"
step profile "$(lim 40)" --into "$out/profile.json" "$bin" profile --json --steps "$profile_steps"
baseline_args=()
if [ -x "$here/baseline/mnist-wgpu" ]; then
  rev=$(cat "$here/baseline/REV" 2>/dev/null || echo "an older build")
  step profile-baseline "$(lim 30)" --into "$work/profile-baseline.json" \
    "$here/baseline/mnist-wgpu" profile --json --steps "$profile_steps"
  { echo "== profile-baseline.json ($rev):"; cat "$work/profile-baseline.json" 2>/dev/null; echo; } >>"$log"
  baseline_args=(--baseline-profile "$work/profile-baseline.json" --baseline-rev "$rev")
fi
step train "$(lim 140)" "$bin" train --backend gpu --epochs "$epochs" --out "$work/run"
[ -f "$work/run/metrics.jsonl" ] && cp "$work/run/metrics.jsonl" "$out/metrics.jsonl"
[ -f "$work/run/best.safetensors" ] && cp "$work/run/best.safetensors" "$out/best.safetensors"

# Time to accuracy on the card: each target's preset on all 60,000 images, a few seeds, their tables
# in run.log (a software adapter would take hours: quick runs leave them out).
if [ $quick = 0 ]; then
  step speedrun-99.0 "$(lim 35)" "$bin" speedrun --target 99.0 --seeds 1-3 --backend gpu
  step speedrun-99.4 "$(lim 40)" "$bin" speedrun --target 99.4 --seeds 1-2 --backend gpu
else
  echo "== speedrun: skipped in a quick run" | tee -a "$log"
fi

if python3 -c 'import sys, torch, torchvision; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; then
  step torch "$(lim 115)" env PYTHONUNBUFFERED=1 python3 "$here/torch_recipe.py" --device cuda --epochs "$epochs" \
    --workers "$cores" --metrics "$out/torch.jsonl"
else
  echo "== torch: skipped: python3 has no PyTorch with CUDA and torchvision here" | tee -a "$log"
fi

"$bin" bundle-summary "$out" --steps "$work/steps.tsv" "${baseline_args[@]}" 2>&1 | tee "$out/summary.txt" | tee -a "$log"
# Non-zero when any step failed or stopped at its limit (the summary above says which).
if awk -F'\t' '$2 != 0 { bad = 1 } END { exit !bad }' "$work/steps.tsv"; then
  exit 1
fi
