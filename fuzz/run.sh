#!/usr/bin/env bash
# Runs the libFuzzer targets (tarflow::fuzzing) one after another and prints, per target, the
# executions, the time and whether it crashed, leaked past the memory limit or timed out.
#
#   bash fuzz/run.sh                 # every target, 600 s each
#   SECONDS_PER_TARGET=60 bash fuzz/run.sh idx npz
#
# cargo-fuzz needs nightly-only compiler flags; RUSTC_BOOTSTRAP=1 lets the stable toolchain take
# them, and `-s none` skips the sanitizers (the code under test is safe Rust; libFuzzer's own
# -rss_limit_mb/-malloc_limit_mb bound memory). The hdf5 target is built when libhdf5 is
# installed. Seeds: fuzz/seeds/ plus fixtures (ml-tarflow .pth/.safetensors, the malicious
# pickle, a converted tarflow checkpoint); the growing corpus stays in fuzz/corpus/ (ignored),
# crashes in fuzz/artifacts/, logs in fuzz/logs/.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${SECONDS_PER_TARGET:-600}
export RUSTC_BOOTSTRAP=1
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
features=()
if pkg-config --exists hdf5 2>/dev/null || [ -e /usr/lib/x86_64-linux-gnu/hdf5/serial/libhdf5.so ]; then
    features=(--features hdf5)
fi
(cd fuzz && cargo fuzz build -s none -O "${features[@]}")
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(idx cifar npz image config checkpoint pth noise)
    [ ${#features[@]} -gt 0 ] && targets+=(hdf5)
fi

mkdir -p fuzz/logs
for t in "${targets[@]}"; do mkdir -p "fuzz/corpus/$t"; done
# Seeds that live elsewhere in the repository.
cp -n tests/fixtures/tiny-pth/tiny.pth tests/fixtures/malicious/os-system.pth fuzz/corpus/pth/ 2>/dev/null || true
cp -n tests/fixtures/tiny-pth/tiny.safetensors fuzz/corpus/checkpoint/mltarflow.safetensors 2>/dev/null || true
if [ -d fuzz/corpus/checkpoint ] && [ ! -f fuzz/corpus/checkpoint/tarflow.safetensors ]; then
    cargo run --release -q -- import tests/fixtures/tiny-pth/tiny.pth --img-size 8 --patch-size 2 \
        -o fuzz/corpus/checkpoint/tarflow.safetensors >/dev/null
fi

status=0
for t in "${targets[@]}"; do
    log="fuzz/logs/$t.log"
    seeds=()
    [ -d "fuzz/seeds/$t" ] && seeds=("fuzz/seeds/$t")
    set +e
    (cd fuzz && cargo fuzz run -s none -O "${features[@]}" "$t" "corpus/$t" "${seeds[@]/#fuzz\//}" -- \
        -max_total_time="$secs" -rss_limit_mb=2048 -malloc_limit_mb=1024 -timeout=20 \
        -max_len=1048576 -print_final_stats=1) >"$log" 2>&1
    rc=$?
    set -e
    rm -rf /dev/shm/tarflow-fuzz-* 2>/dev/null || true # the harness's scratch files
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo 0)
    took=$(grep -o 'Done [0-9]* runs in [0-9]* second' "$log" | grep -o 'in [0-9]*' | grep -o '[0-9]*' || echo "?")
    units=$(ls "fuzz/corpus/$t" | wc -l)
    if [ $rc -eq 0 ]; then
        echo "fuzz $t: ${runs} executions in ${took} s, corpus ${units} inputs, no crash, leak or timeout"
    else
        echo "fuzz $t: FAILED (exit $rc) after ${runs} executions; see $log and fuzz/artifacts/$t/"
        grep -m3 -E "panicked|ERROR: libFuzzer|SUMMARY" "$log" || true
        status=1
    fi
done
exit $status
