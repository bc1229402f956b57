#!/usr/bin/env bash
# The quantisation tables of the README: for the shipped MNIST model (or CHECKPOINT), each
# recipe's file size, peak RSS while scoring, scoring speed, sampling time, test bits/dim and
# ΔBPD against f32 (paired), inversion error and FD of samples to the f32 model's; the per-part
# sensitivity with the mixed recipe it chooses; and the `small` bench config (random weights:
# sizes and speeds only). Writes experiments/results/quant/.
# Usage: bash scripts/quant-tables.sh [CHECKPOINT]   (after `cargo build --release`)
# N (default 2000) test digits are scored; about 10 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/tarflow}
OUT=experiments/results/quant
N=${N:-2000}
TEST=mnist-idx:data/mnist/t10k-images-idx3-ubyte.gz
FD=(--fd-config experiments/tarflow-mnist-bpd.toml --fd-num 500)
GG=target/quant  # the .gguf files (not committed)
mkdir -p "$OUT" "$GG"
CK=()
F32=models/mnist-bpd/model.safetensors
if [ $# -ge 1 ]; then CK=("$1"); F32=$1; fi
lscpu | grep "Model name" | sed 's/.*: *//' > "$OUT/cpu.txt"

# name | quantize arguments
rows=(
  "f16|--to f16"
  "bf16|--to bf16"
  "q8_0|--to q8_0"
  "q8_0-all|--to q8_0 --head q8_0"
  "q6k|--to q6k"
  "q5_1|--to q5_1"
  "q4_1|--to q4_1"
  "q4_0|--to q4_0"
  "q4k|--to q4k"
)
for row in "${rows[@]}"; do
  name=${row%%|*}; args=${row#*|}
  [ -f "$OUT/$name.json" ] && [ -z "${FORCE:-}" ] && continue  # FORCE=1 redoes them
  # shellcheck disable=SC2086
  "$BIN" quantize "${CK[@]}" $args -o "$GG/$name.gguf" --eval "$TEST" --limit "$N" "${FD[@]}" \
    --json "$OUT/$name.json" > "$OUT/$name.txt"
done
# Candle's integer matmul (activations quantised too) on the q8_0 file's recipe.
[ -f "$OUT/q8_0-native.json" ] && [ -z "${FORCE:-}" ] || "$BIN" --native-qmatmul quantize "${CK[@]}" --to q8_0 --eval "$TEST" --limit "$N" \
  --json "$OUT/q8_0-native.json" > "$OUT/q8_0-native.txt"
# Sensitivity: each part in q4_0 alone, and the mixed q4_0/q8_0 recipe within 0.01 bits/dim.
[ -f "$OUT/mixed.json" ] && [ -z "${FORCE:-}" ] || "$BIN" quantize "${CK[@]}" --to q4_0 --high q8_0 --budget 0.01 --sensitivity -o "$GG/mixed.gguf" \
  --eval "$TEST" --limit "$N" "${FD[@]}" --json "$OUT/mixed.json" > "$OUT/mixed.txt"
# Peak RSS while scoring and sampling time, each file in its own process.
for f in "$F32" "$GG"/*.gguf; do
  /usr/bin/time -f %M -o "$GG/rss" "$BIN" score --checkpoint "$f" --source mnist-idx \
    --path data/mnist/t10k-images-idx3-ubyte.gz --limit "$N" > /dev/null 2>&1
  rss=$(tail -1 "$GG/rss")
  samp=$("$BIN" bench sample --checkpoint "$f" --batch 16 --iters 5 --json 2>/dev/null)
  echo "{\"file\": \"$f\", \"bytes\": $(stat -c %s "$f"), \"score_peak_rss_kib\": $rss, \"sample\": $samp}"
done > "$OUT/files.jsonl"
# Reduced-precision compute (not storage): the f32 weights run in bf16 / f16.
for dt in bf16 f16; do
  "$BIN" score "${CK[@]/#/--checkpoint=}" --dtype "$dt" --source mnist-idx \
    --path data/mnist/t10k-images-idx3-ubyte.gz --limit "$N" \
    --summary "$OUT/compute-$dt.json" > /dev/null 2>&1
done
# Scoring at batch 256, where expanding each layer per batch is amortised.
for f in "$F32" "$GG/q8_0.gguf" "$GG/q4_0.gguf"; do
  "$BIN" bench score --checkpoint "$f" --batch 256 --iters 5 --json | sed "s|^{|{\"file\": \"$f\", |"
done > "$OUT/batch256.jsonl"
# The small config (3×32×32, C 256: rows of 256 fit the k-quants), random weights.
for q in none q8_0 q6k q4k q4_0; do
  extra=(); [ "$q" != none ] && extra=(--quantize "$q")
  "$BIN" bench score --config small --iters 5 --json "${extra[@]}"
  "$BIN" bench sample --config small --iters 5 --json "${extra[@]}"
done > "$OUT/small.jsonl"

python3 - "$OUT" "$F32" <<'PY'
import json, os, sys
out, f32 = sys.argv[1], sys.argv[2]
files = {os.path.basename(j["file"]): j for j in map(json.loads, open(f"{out}/files.jsonl"))}
ref = files[os.path.basename(f32)]
rows = ["f16", "bf16", "q8_0", "q8_0-all", "q6k", "q5_1", "q4_1", "q4_0", "q4k", "mixed"]
L = []
cpu = open(f"{out}/cpu.txt").read().strip()
L.append(f"Shipped MNIST model, first {json.load(open(out + '/q8_0.json'))['delta']['count']} test digits, CPU: {cpu}, 2 threads.\n")
L.append("| recipe | file | % of f32 | peak RSS scoring (MiB) | scoring img/s (f32 same run) | sample 16 (s) | bits/dim | ΔBPD ± se | max inversion error | FD to f32 samples (f32↔held-out) |")
L.append("|---|---|---|---|---|---|---|---|---|---|")
rss0 = ref["score_peak_rss_kib"] / 1024
L.append(f"| f32 (safetensors) | {ref['bytes']/1024:.0f} KiB | 100 | {rss0:.0f} | | {ref['sample']['seconds']:.3f} | | | | |")
for r in rows:
    j = json.load(open(f"{out}/{r}.json"))
    f = files[f"{r}.gguf"]
    d = j["delta"]
    fd = j.get("fd", {})
    L.append(
        f"| {r}: {j['recipe']['base']}{''.join(', ' + x['pattern'] + '=' + x['to'] for x in j['recipe']['rules'])} "
        f"| {f['bytes']/1024:.0f} KiB | {100*f['bytes']/ref['bytes']:.1f} | {f['score_peak_rss_kib']/1024:.0f} "
        f"| {j['images_per_s']:.0f} ({j['f32_images_per_s']:.0f}) | {f['sample']['seconds']:.3f} "
        f"| {d['other']:.4f} | {d['delta']:+.4f} ± {d['delta_se']:.4f} | {j['inversion_error']:.1e} "
        f"| {fd.get('to_f32_samples', float('nan')):.3f} ({fd.get('f32_to_held_out', float('nan')):.3f}) |")
n = json.load(open(f"{out}/q8_0-native.json"))
L.append(f"\nq8_0 on candle's integer matmul (`--native-qmatmul`): ΔBPD {n['delta']['delta']:+.4f} ± {n['delta']['delta_se']:.4f}, "
         f"max inversion error {n['inversion_error']:.1e}, {n['images_per_s']:.0f} img/s (f32 {n['f32_images_per_s']:.0f}).\n")
s = json.load(open(f"{out}/mixed.json"))["sensitivity"]
L.append("Sensitivity: each part in q4_0 on its own (heads f16, the rest f32):\n")
L.append("| part | ΔBPD | ± | bytes saved vs q8_0 |")
L.append("|---|---|---|---|")
for c in s["parts"]:
    L.append(f"| {c['part']['name']} | {c['delta']['delta']:+.5f} | {c['delta']['delta_se']:.5f} | {c['bytes_saved']} |")
L.append(f"\nChosen (budget 0.01): `{'`, `'.join([s['recipe']['base']] + [x['pattern'] + '=' + x['to'] for x in s['recipe']['rules']])}` "
         f"→ ΔBPD {s['delta']['delta']:+.5f} ± {s['delta']['delta_se']:.5f}, Linear weights {s['bytes']/1024:.0f} KiB.\n")
L.append("Scoring at batch 256 (`bench score --batch 256`, median of 5), where expanding each layer per batch is amortised:\n")
L.append("| file | img/s | peak RSS (MiB) |")
L.append("|---|---|---|")
for l in open(f"{out}/batch256.jsonl"):
    j = json.loads(l)
    L.append(f"| {os.path.basename(j['file'])} | {j['images_per_s']:.0f} | {j['peak_rss_mib']:.0f} |")
L.append("\nThe `small` bench config (3×32×32, C 256, random weights; its rows of 256 fit the k-quants): bytes of the weights in memory and speeds (`bench --quantize`, which quantises in memory, so its peak RSS includes the f32 weights and is not shown).\n")
L.append("| weights | bytes | score img/s (batch 64) | sample 16 (s) |")
L.append("|---|---|---|---|")
sm = [json.loads(l) for l in open(f"{out}/small.jsonl")]
for sc, sa in zip(sm[0::2], sm[1::2]):
    L.append(f"| {sc['quantize'] or 'f32'} | {sc['weight_bytes']/1024:.0f} KiB | {sc['images_per_s']:.0f} | {sa['seconds']:.3f} |")
open(f"{out}/tables.md", "w").write("\n".join(L) + "\n")
print("\n".join(L))
PY
