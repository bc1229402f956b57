#!/usr/bin/env bash
# The Apple-silicon check: what CI cannot run (it type-checks the `metal` build, no more).
#
#   cargo build --release --features metal && bash scripts/metal-check.sh
#       On a Mac (Apple silicon, macOS 14+ for bf16): runs every step below on `--device metal`
#       and compares it with the CPU in the same run.
#
#   bash scripts/metal-check.sh rehearse
#       Here, and in CI: the same steps on this machine's CPU through candle's composed ops (the
#       path the GPU runs, TARFLOW_CPU_KERNELS=0), so the script cannot rot.
#
# Steps (each one line in the table and in $OUT/summary.json):
#   reference   the PyTorch reference vectors in f32 and bf16 (tests/composed.rs), the loading
#               paths (f64/f16/bf16 checkpoints, an f64 noise file), one device selection per
#               command, the EMA's starting values (tests/devices.rs), both on the device
#   resume      20 quickstart steps, then --resume for 10 more, against 30 uninterrupted steps
#   ema         the average after one step is 2/11·w0 + 9/11·w1 (f32); it differs from the
#               weights and from w0 after 20
#   score       bits/dim of the sample digits on the device (f32, bf16) against the CPU
#   sample      samples from the same noise on the device against the CPU; an f64 noise file
#               gives exactly what its f32 twin gives
#   bench       `tarflow bench` in f32 and bf16 on the device and on the CPU, same run
# Results: $OUT (default ./metal-check-out): a log per command, steps.jsonl, summary.json.
# Exit status 0 when every step passed.
set -uo pipefail

mode=${1:-metal}
cd "$(dirname "$0")/.."
root=$PWD
out=${OUT:-$root/metal-check-out}
rm -rf "$out"
mkdir -p "$out"
py=${PYTHON:-python3}
helper=$root/scripts/metal_check.py
case "$mode" in
metal)
  dev=metal
  features=(--features metal)
  bench_args=(--config small)
  ;;
rehearse)
  dev=cpu
  features=()
  bench_args=(--config tiny --iters 1)
  export TARFLOW_CPU_KERNELS=0
  ;;
*)
  echo "usage: bash scripts/metal-check.sh [rehearse]" >&2
  exit 2
  ;;
esac
bin=${TARFLOW_BIN:-$root/target/release/tarflow}
if [ ! -x "$bin" ]; then
  echo "metal-check: $bin missing; build it first: cargo build --release ${features[*]}" >&2
  exit 2
fi
"$bin" --version >"$out/version.txt" 2>&1
git rev-parse HEAD >"$out/commit.txt" 2>/dev/null || true
: >"$out/steps.jsonl"

# record NAME OK DETAIL: one line of the summary.
record() {
  "$py" -c 'import json, sys; print(json.dumps({"name": sys.argv[1], "ok": sys.argv[2] == "1", "detail": sys.argv[3]}))' \
    "$1" "$2" "$3" >>"$out/steps.jsonl"
}
# run LOG COMMAND...: runs a command into $out/LOG.log; prints nothing, returns its status.
run() {
  local log=$1
  shift
  "$@" >"$out/$log.log" 2>&1
}
# check NAME HELPER-ARGS...: one comparison of metal_check.py as a step.
check() {
  local name=$1
  shift
  local detail
  if detail=$("$py" "$helper" "$@" 2>&1); then record "$name" 1 "$detail"; else record "$name" 0 "$detail"; fi
}
# fail NAME: a step whose command failed, with the last line of the newest log.
fail() {
  local last
  last=$(ls -t "$out"/*.log | head -1)
  record "$1" 0 "$(basename "$last") failed: $(tail -1 "$last")"
}

# 1. The device-generic test binaries on the device (reference vectors; loading paths, one
#    selection per command, the EMA's start).
if run reference env TARFLOW_TEST_DEVICE=$dev TARFLOW_BIN="$bin" \
  cargo test --release "${features[@]}" --test composed --test devices -- --test-threads 1; then
  record reference 1 "$(grep -E '^test result' "$out/reference.log" | awk '{p += $4} END {print p " tests passed (composed, devices)"}')"
else
  record reference 0 "$(grep -E 'FAILED|panicked' "$out/reference.log" | head -3 | tr '\n' ' ') (see $out/reference.log)"
fi

# 2. Resume: 30 steps at once against 20 + 10 resumed (the dtype train.dtype=auto picks).
q=(--config quickstart --device "$dev" --set "output.dir=$out/runs" --set train.log_every=1
  --set eval.every=0 --set eval.sample_every=0 --set train.checkpoint_every=10)
if run whole "$bin" train "${q[@]}" --set output.name=whole --set train.max_steps=30 &&
  run first "$bin" train "${q[@]}" --set output.name=resumed --set train.max_steps=20 &&
  run resumed "$bin" train --resume "$out/runs/resumed" --set train.max_steps=30; then
  tol=1e-3
  if grep -q 'in BF16' "$out/whole.log"; then tol=2e-2; fi
  check resume resume "$out/runs/whole" "$out/runs/resumed" 21 30 "$tol"
else
  fail resume
fi

# 3. The EMA in f32 (where Metal's shared copies bit): one step at lr = 1e-30 (the initial
#    weights, to f32 precision: the config takes no lr of 0), one at lr = 1e-2 without warm-up.
e=(--config quickstart --device "$dev" --set "output.dir=$out/runs" --set train.dtype=f32
  --set eval.every=0 --set eval.sample_every=0 --set train.checkpoint_every=1
  --set train.max_steps=1 --set optim.warmup_steps=0)
if run start "$bin" train "${e[@]}" --set output.name=start --set optim.lr=1e-30 --set optim.min_lr=1e-30 &&
  run one-step "$bin" train "${e[@]}" --set output.name=one-step --set optim.lr=1e-2; then
  check ema ema "$out/runs/start" "$out/runs/one-step" "$out/runs/resumed" 20 1e-5
else
  fail ema
fi

# 4. Scoring: the device against the CPU in the same dtype (f32: the CPU's kernels; bf16: its
#    composed ops). bf16 against f32 is no device check: the likelihood model's 1.7 bits/dim need
#    finer inputs than bf16's 2^-8 near 1 (one pixel bin), so bf16 scores it far worse anywhere.
digits=$root/data/mnist-samples
if run score-cpu env TARFLOW_CPU_KERNELS=1 "$bin" score "$digits" --json --device cpu &&
  run score-cpu-bf16 "$bin" score "$digits" --json --device cpu --dtype bf16 &&
  run score-f32 "$bin" score "$digits" --json --device "$dev" &&
  run score-bf16 "$bin" score "$digits" --json --device "$dev" --dtype bf16; then
  check score-f32 scores "$out/score-f32.log" "$out/score-cpu.log" 1e-4
  check score-bf16 scores "$out/score-bf16.log" "$out/score-cpu-bf16.log" 1e-2
else
  fail score
fi

# 5. Sampling from the same noise: the device against the CPU; an f64 noise file against f32.
"$bin" info --json >"$out/info.json" 2>/dev/null
"$py" "$helper" noise "$out/info.json" "$out/z64.safetensors" "$out/z32.safetensors" 8 0 >/dev/null
s=(sample --labels 0,1,2,3,4,5,6,7 --num 8)
if run sample-cpu env TARFLOW_CPU_KERNELS=1 "$bin" "${s[@]}" --device cpu --noise "$out/z32.safetensors" \
  --out "$out/cpu.png" --out-tensor "$out/x-cpu.safetensors" &&
  run sample-f32 "$bin" "${s[@]}" --device "$dev" --noise "$out/z32.safetensors" \
    --out "$out/f32.png" --out-tensor "$out/x-f32.safetensors" &&
  run sample-f64-noise "$bin" "${s[@]}" --device "$dev" --noise "$out/z64.safetensors" \
    --out "$out/f64.png" --out-tensor "$out/x-f64.safetensors"; then
  check sample samples "$out/x-f32.safetensors" "$out/x-cpu.safetensors" 1e-2
  check f64-noise samples "$out/x-f64.safetensors" "$out/x-f32.safetensors" 0
else
  fail sample
fi

# 6. Speed, same run: the device in f32 and bf16, the CPU (its kernels) in f32.
if run bench-f32 "$bin" bench "${bench_args[@]}" --device "$dev" --json &&
  run bench-bf16 "$bin" bench "${bench_args[@]}" --device "$dev" --dtype bf16 --json &&
  run bench-cpu env TARFLOW_CPU_KERNELS=1 "$bin" bench "${bench_args[@]}" --device cpu --json; then
  check bench bench "$out/bench-f32.log" "$out/bench-bf16.log" "$out/bench-cpu.log"
else
  fail bench
fi

"$py" "$helper" summary "$out" "$dev"
