#!/usr/bin/env bash
# The GPU check, in two halves.
#
#   bash scripts/gpu-check.sh build [ML_TARFLOW_DIR]
#       Here (no GPU, no CUDA toolkit needed): installs CUDA 13.0's compiler and libraries from
#       PyPI into target/cuda-venv, makes a build-time stub of the driver library (soname
#       libcuda.so.1: the real driver is on the GPU machine), builds the `cuda` binary and the
#       composed-path test binary, strips them and puts them, the reference fixtures, this
#       script, the PyTorch peer script and (when ML_TARFLOW_DIR, a checkout of apple/ml-tarflow,
#       is given) upstream's transformer_flow.py into target/gpu-check/bundle (< 64 MiB).
#
#   bash target/gpu-check/bundle/gpu-check.sh run [cuda|cpu]
#       There (an NVIDIA GPU with its driver, CUDA libraries and PyTorch; no cargo): the
#       reference vectors on cuda in f32 and bf16, 200 training steps of the quickstart model,
#       `tarflow bench` (training step, scoring, sampling sequential and --solver jacobi), and
#       ml-tarflow's PyTorch model on the same GPU for a same-run ratio. Results go to
#       $OUT (or ./gpu-check-out): one log per step and summary.json. `run cpu` does the same on
#       the CPU with the CPU build (the local rehearsal of the script).
#
# Environment of `run`: LD_LIBRARY_PATH must reach libcublas, libcublasLt, libcurand, libnvrtc
# and libcudart of CUDA 13 (the script adds the ones PyTorch's wheels ship, when it finds them).
set -euo pipefail

mode=${1:-}
case "$mode" in
build)
  cd "$(dirname "$0")/.."
  root=$PWD
  venv=$root/target/cuda-venv
  out=$root/target/gpu-check
  bundle=$out/bundle
  if [ ! -x "$venv/bin/pip" ]; then python3 -m venv "$venv"; fi
  # CUDA 13.0 throughout: the H200's driver is 13.0, and cudarc 0.19 refuses newer toolkits.
  "$venv/bin/pip" install -q nvidia-cuda-nvcc==13.0.88 nvidia-cuda-runtime==13.0.96 \
    nvidia-cuda-cccl==13.0.85 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
    nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35 nvidia-cuda-nvrtc==13.0.88
  cu=$(ls -d "$venv"/lib/python3*/site-packages/nvidia/cu13)
  # The wheels ship versioned sonames only; the linker wants the plain names.
  for l in cublas cublasLt curand nvrtc cudart; do
    f=$(ls "$cu"/lib/lib$l.so.* 2>/dev/null | head -1)
    [ -n "$f" ] || { echo "gpu-check: lib$l missing from the CUDA wheels in $cu/lib" >&2; exit 1; }
    ln -sf "$(basename "$f")" "$cu/lib/lib$l.so"
  done
  export PATH=$cu/bin:$PATH CUDA_ROOT=$cu CUDA_PATH=$cu CUDA_HOME=$cu CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
  export CUDAFORGE_THREADS=${CUDAFORGE_THREADS:-$(nproc)}
  # The same target folder and flags as CI's `cargo check --features cuda`, so candle's kernels
  # (~10 min on 2 cores) compile once; the linker finds the stub and the wheels' libraries
  # through LIBRARY_PATH, which leaves cargo's fingerprints alone.
  export CARGO_TARGET_DIR=$root/target
  # Compile first (the link fails without a driver library), then make the stub from the
  # driver symbols cudarc references, then link.
  cargo build --release --features cuda 2>/dev/null || true
  mkdir -p "$out/stub"
  rlib=$(ls -t "$CARGO_TARGET_DIR"/release/deps/libcudarc-*.rlib | head -1)
  nm -u --format=just-symbols "$rlib" 2>/dev/null | grep -E '^cu[A-Z]' | sort -u >"$out/stub/symbols.txt"
  [ -s "$out/stub/symbols.txt" ] || { echo "gpu-check: no driver symbols found in $rlib" >&2; exit 1; }
  sed 's/.*/void &(void) {}/' "$out/stub/symbols.txt" >"$out/stub/cuda_stub.c"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$out/stub/libcuda.so.1" "$out/stub/cuda_stub.c"
  ln -sf libcuda.so.1 "$out/stub/libcuda.so"
  export LIBRARY_PATH=$out/stub:$cu/lib${LIBRARY_PATH:+:$LIBRARY_PATH}
  cargo build --release --features cuda
  cargo test --release --features cuda --test composed --no-run
  test_bin=$(ls -t "$CARGO_TARGET_DIR"/release/deps/composed-* | grep -v '\.d$' | head -1)
  rm -rf "$bundle"
  mkdir -p "$bundle/fixtures"
  cp "$CARGO_TARGET_DIR/release/tarflow" "$bundle/tarflow"
  cp "$test_bin" "$bundle/composed-tests"
  strip "$bundle/tarflow" "$bundle/composed-tests"
  cp -r tests/fixtures/tarflow-small "$bundle/fixtures/"
  cp scripts/gpu-check.sh scripts/gpu_peer.py experiments/quickstart.toml "$bundle/"
  if [ -n "${2:-}" ]; then
    [ -f "$2/transformer_flow.py" ] || { echo "gpu-check: $2 has no transformer_flow.py" >&2; exit 1; }
    mkdir -p "$bundle/ml-tarflow"
    cp "$2/transformer_flow.py" "$bundle/ml-tarflow/"
  fi
  # The CPU build (relinked over the CUDA one in target/release), for the local rehearsal.
  cargo build --release
  cp "$root/target/release/tarflow" "$bundle/tarflow-cpu"
  strip "$bundle/tarflow-cpu"
  # The CUDA binaries each hold candle's PTX and sm_90 kernels (~60 MB stripped); xz makes that
  # ~8 MB, so both fit in what travels. `run` unpacks them.
  xz -T0 -6 -f "$bundle/tarflow" "$bundle/composed-tests" "$bundle/tarflow-cpu"
  du -sh "$bundle"
  size=$(du -sm "$bundle" | cut -f1)
  if [ "$size" -ge 64 ]; then echo "gpu-check: the bundle is ${size} MiB, over the 64 MiB that travels" >&2; exit 1; fi
  echo "bundle ready: $bundle (carry it; run: bash target/gpu-check/bundle/gpu-check.sh run)"
  ;;
run)
  here=$(cd "$(dirname "$0")" && pwd)
  dev=${2:-cuda}
  out=${OUT:-$PWD/gpu-check-out}
  mkdir -p "$out"
  py=${PYTHON:-python3}
  # Unpack the binaries (xz, or Python's lzma where xz is missing) next to the results.
  bins=$out/bin
  mkdir -p "$bins"
  for f in tarflow tarflow-cpu composed-tests; do
    [ -f "$here/$f.xz" ] || continue
    if command -v xz >/dev/null; then
      xz -dc "$here/$f.xz" >"$bins/$f"
    else
      "$py" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
        "$here/$f.xz" "$bins/$f"
    fi
    chmod +x "$bins/$f"
  done
  bin=$bins/tarflow
  if [ "$dev" = cpu ]; then bin=$bins/tarflow-cpu; fi
  # PyTorch's CUDA wheels carry the libraries candle links against; add them when present.
  extra=$("$py" - <<'EOF' 2>/dev/null || true
import glob, os, site
dirs = set()
for sp in site.getsitepackages():
    for f in glob.glob(os.path.join(sp, 'nvidia', '**', 'lib', 'lib*.so*'), recursive=True):
        dirs.add(os.path.dirname(f))
print(':'.join(sorted(dirs)))
EOF
)
  export LD_LIBRARY_PATH=${extra:+$extra:}${LD_LIBRARY_PATH:-}
  status=0
  step() { # NAME COMMAND...: runs, logs, records pass/fail and seconds
    local name=$1; shift
    local t0 r
    t0=$(date +%s%N)
    if "$@" >"$out/$name.log" 2>&1; then r=ok; else r=FAILED; status=1; fi
    printf '%-28s %-6s %6d ms\n' "$name" "$r" $((($(date +%s%N) - t0) / 1000000)) | tee -a "$out/steps.txt"
  }
  [ -x "$bin" ] || { echo "gpu-check: $bin missing; run the build half first" >&2; exit 1; }
  command -v nvidia-smi >/dev/null && nvidia-smi -L | tee "$out/gpu.txt" || true
  "$bin" --version >"$out/version.txt" 2>&1 || { cat "$out/version.txt"; ldd "$bin" || true; exit 1; }
  export TARFLOW_FIXTURES=$here/fixtures TARFLOW_TEST_DEVICE=$dev
  # The tests that start the binary find the copy through TARFLOW_BIN.
  if [ -x "$bins/composed-tests" ]; then
    step reference-f32-bf16 env TARFLOW_BIN="$bin" "$bins/composed-tests" --test-threads 1
  fi
  step train-200 "$bin" --composed train --config "$here/quickstart.toml" --device "$dev" \
    --set train.max_steps=200 --set eval.every=200 --set eval.sample_every=200 \
    --set train.checkpoint_every=200 --set output.dir="$out/runs"
  step bench-f32 "$bin" bench --config small --device "$dev" --json
  step bench-bf16 "$bin" bench --config small --device "$dev" --dtype bf16 --json
  step sample-jacobi "$bin" bench sample --config small --device "$dev" --jacobi
  if ! "$py" -c 'import torch' 2>/dev/null; then
    echo "torch peer skipped: $py cannot import torch" | tee -a "$out/steps.txt"
  elif [ -f "$here/ml-tarflow/transformer_flow.py" ]; then
    step torch-f32 env TARFLOW_SRC="$here/ml-tarflow" "$py" "$here/gpu_peer.py" --device "$dev"
    step torch-bf16 env TARFLOW_SRC="$here/ml-tarflow" "$py" "$here/gpu_peer.py" --device "$dev" --dtype bf16
  else
    echo "torch peer skipped: no ml-tarflow/transformer_flow.py in the bundle" | tee -a "$out/steps.txt"
  fi
  # One summary: ours and PyTorch's figures side by side.
  "$py" - "$out" <<'EOF' || true
import json, sys, os
out = sys.argv[1]
def last_json(name):
    p = os.path.join(out, name + '.log')
    if not os.path.exists(p):
        return None
    for line in reversed(open(p).read().splitlines()):
        line = line.strip()
        if line.startswith('{'):
            try:
                return json.loads(line)
            except ValueError:
                pass
    return None
s = {k: last_json(k) for k in ['bench-f32', 'bench-bf16', 'torch-f32', 'torch-bf16']}
for ours, theirs in [('bench-f32', 'torch-f32'), ('bench-bf16', 'torch-bf16')]:
    a, b = s[ours], s[theirs]
    if a and b:
        s['ratio-' + ours[6:]] = {
            'train (torch/ours time)': b['train_step_s'] / a['train_step_s'],
            'score (ours/torch img/s)': a['score_images_per_s'] / b['score_images_per_s'],
            'sample16 (torch/ours time)': b['sample16_s'] / a['sample16_s'],
            'sample16_cfg (torch/ours time)': b['sample16_cfg_s'] / a['sample16_cfg_s'],
        }
json.dump(s, open(os.path.join(out, 'summary.json'), 'w'), indent=1)
print(json.dumps(s, indent=1))
EOF
  exit $status
  ;;
*)
  echo "usage: bash scripts/gpu-check.sh build [ML_TARFLOW_DIR] | run [cuda|cpu]" >&2
  exit 2
  ;;
esac
