#!/usr/bin/env bash
# The likelihood tables of the README for the shipped MNIST model (or CHECKPOINT): test-set
# bits/dim under the ELBO average and the IW bound for K = 1, 4, 16, 64, OOD AUROCs, and
# Bayes-rule classification with its confusion matrix. Writes experiments/results/mnist-bpd/.
# Usage: bash scripts/mnist-bpd-tables.sh [CHECKPOINT]   (after `cargo build --release`)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/tarflow}
OUT=experiments/results/mnist-bpd
mkdir -p "$OUT"
CK=()
if [ $# -ge 1 ]; then CK=(--checkpoint "$1"); fi
TEST=data/mnist/t10k-images-idx3-ubyte.gz
# K = 1, 4, 16 on all 10,000 test digits; K = 1 … 64 on the first 2,000 (K = 64 on all of them
# is 640,000 forward passes: about 20 minutes on 2 cores).
for k in 1 4 16; do
  "$BIN" score "${CK[@]}" --source mnist-idx --path "$TEST" --draws "$k" --bound iw \
    --summary "$OUT/score-k$k.json" > /dev/null
done
for k in 1 4 16 64; do
  "$BIN" score "${CK[@]}" --source mnist-idx --path "$TEST" --limit 2000 --draws "$k" --bound iw \
    --summary "$OUT/score-2000-k$k.json" > /dev/null
done
"$BIN" score "${CK[@]}" --source mnist-idx --path "$TEST" --true-labels \
  --summary "$OUT/score-true-labels.json" > /dev/null
"$BIN" score "${CK[@]}" --source mnist-idx --path "$TEST" --marginal \
  --summary "$OUT/score-marginal.json" > /dev/null
"$BIN" ood "${CK[@]}" --in "mnist-idx:$TEST" --train mnist-idx:data/mnist/train-images-idx3-ubyte.gz \
  --ood mnist-idx:data/fashion-mnist/t10k-images-idx3-ubyte.gz --ood inverted --ood noise \
  --limit 10000 --typical-batch 1,10 | tee "$OUT/ood.md"
"$BIN" ood "${CK[@]}" --in "mnist-idx:$TEST" --train mnist-idx:data/mnist/train-images-idx3-ubyte.gz \
  --ood mnist-idx:data/fashion-mnist/t10k-images-idx3-ubyte.gz --ood inverted --ood noise \
  --limit 10000 --typical-batch 1,10 --json > "$OUT/ood.json"
"$BIN" classify "${CK[@]}" --data "mnist-idx:$TEST" --confusion "$OUT/confusion.png" --json \
  > "$OUT/classify.json"
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
rows = ["| K draws | ELBO average, 10,000 test digits | IW bound, 10,000 | ELBO average, first 2,000 | IW bound, first 2,000 |", "|---|---|---|---|---|"]
f = lambda d: f"{d['mean']:.4f} ± {d['stderr']:.4f}"
for k in (1, 4, 16, 64):
    try:
        s = json.load(open(f"{out}/score-k{k}.json"))
        full = f"{f(s['elbo_bits_per_dim'])} | {f(s['iw_bits_per_dim'])}"
    except FileNotFoundError:
        full = "– | –"
    p = json.load(open(f"{out}/score-2000-k{k}.json"))
    rows.append(f"| {k} | {full} | {f(p['elbo_bits_per_dim'])} | {f(p['iw_bits_per_dim'])} |")
s = json.load(open(f"{out}/score-k1.json"))
rows.append("")
rows.append(f"{s['count']} test images (sha256 {s['data']['sha256'][:16]}…), {s['excluded']} excluded, model {s['model']}")
t = json.load(open(f"{out}/score-true-labels.json"))
rows.append(f"with each digit's own label (K = 1): {t['bits_per_dim']['mean']:.4f} ± {t['bits_per_dim']['stderr']:.4f}")
m = json.load(open(f"{out}/score-marginal.json"))
rows.append(f"class mixture (1/10) Σ_k p(x | k) (K = 1): {m['bits_per_dim']['mean']:.4f} ± {m['bits_per_dim']['stderr']:.4f}")
c = json.load(open(f"{out}/classify.json"))
rows.append(f"Bayes-rule classification: {100*c['accuracy']:.2f} % of {c['classified']} ({c['excluded']} excluded)")
open(f"{out}/bounds.md", "w").write("\n".join(rows) + "\n")
print("\n".join(rows))
PY
