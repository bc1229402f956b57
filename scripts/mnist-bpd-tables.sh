#!/usr/bin/env bash
# The likelihood tables of the README for the shipped MNIST model (or CHECKPOINT): test-set
# bits/dim under the ELBO average and the IW bound, the class mixture, OOD AUROCs, and Bayes-rule
# classification with its confusion matrix. Writes experiments/results/mnist-bpd/.
# Usage: bash scripts/mnist-bpd-tables.sh [CHECKPOINT]   (after `cargo build --release`)
# N_BOUNDS (default 1000) test digits get K = 1, 4, 16, 64 draws; all 10,000 get K = 1 and 4;
# N_OTHER (default 2000) are used for the mixture, OOD and classification. About 8 minutes on
# 2 cores with the defaults; N_BOUNDS=10000 N_OTHER=10000 takes about an hour.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/tarflow}
OUT=experiments/results/mnist-bpd
NB=${N_BOUNDS:-1000}
NO=${N_OTHER:-2000}
mkdir -p "$OUT"
CK=()
if [ $# -ge 1 ]; then CK=(--checkpoint "$1"); fi
TEST=data/mnist/t10k-images-idx3-ubyte.gz
for k in 1 4; do
  [ -f "$OUT/score-k$k.json" ] && [ -z "${FORCE:-}" ] && continue  # FORCE=1 redoes them
  "$BIN" score "${CK[@]}" --source mnist-idx --path "$TEST" --draws "$k" --bound iw \
    --summary "$OUT/score-k$k.json" > /dev/null
done
for k in 1 4 16 64; do
  "$BIN" score "${CK[@]}" --source mnist-idx --path "$TEST" --limit "$NB" --draws "$k" --bound iw \
    --summary "$OUT/score-subset-k$k.json" > /dev/null
done
"$BIN" score "${CK[@]}" --source mnist-idx --path "$TEST" --true-labels \
  --summary "$OUT/score-true-labels.json" > /dev/null
"$BIN" score "${CK[@]}" --source mnist-idx --path "$TEST" --limit "$NO" --marginal \
  --summary "$OUT/score-marginal.json" > /dev/null
"$BIN" score "${CK[@]}" --source mnist-idx --path "$TEST" --limit "$NO" \
  --summary "$OUT/score-null-subset.json" > /dev/null
"$BIN" ood "${CK[@]}" --in "mnist-idx:$TEST" --train mnist-idx:data/mnist/train-images-idx3-ubyte.gz \
  --ood mnist-idx:data/fashion-mnist/t10k-images-idx3-ubyte.gz --ood inverted --ood noise \
  --limit "$NO" --typical-batch 1,10 --json > "$OUT/ood.json"
"$BIN" classify "${CK[@]}" --data "mnist-idx:$TEST" --limit "$NO" --confusion "$OUT/confusion.png" \
  --json > "$OUT/classify.json"
python3 - "$OUT" "$NB" "$NO" <<'PY'
import json, sys
out, nb, no = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
load = lambda n: json.load(open(f"{out}/{n}.json"))
f = lambda d: f"{d['mean']:.4f} ± {d['stderr']:.4f}"
rows = [f"| K draws | ELBO average, all 10,000 | IW bound, all 10,000 | ELBO average, first {nb} | IW bound, first {nb} |",
        "|---|---|---|---|---|"]
for k in (1, 4, 16, 64):
    try:
        s = load(f"score-k{k}")
        full = f"{f(s['elbo_bits_per_dim'])} | {f(s['iw_bits_per_dim'])}"
    except FileNotFoundError:
        full = "– | –"
    p = load(f"score-subset-k{k}")
    rows.append(f"| {k} | {full} | {f(p['elbo_bits_per_dim'])} | {f(p['iw_bits_per_dim'])} |")
s = load("score-k1")
rows += ["", f"Test set: {s['data']['count']} images, sha256 `{s['data']['sha256'][:16]}…`; {s['excluded']} excluded; no label (mean class embedding)."]
t, m, n = load("score-true-labels"), load("score-marginal"), load("score-null-subset")
rows += ["", "| condition (K = 1) | images | bits/dim |", "|---|---|---|",
         f"| no label (mean class embedding) | 10,000 | {f(s['bits_per_dim'])} |",
         f"| each digit's own label, p(x \\| y) | 10,000 | {f(t['bits_per_dim'])} |",
         f"| no label | first {no} | {f(n['bits_per_dim'])} |",
         f"| class mixture (1/10) Σ_y p(x \\| y) | first {no} | {f(m['bits_per_dim'])} |"]
o = load("ood")
rows += ["", f"| set | images | excluded | bits/dim | AUROC bits/dim | AUROC typicality M = 1 | AUROC typicality M = 10 |", "|---|---|---|---|---|---|---|"]
for r in o["rows"]:
    g = lambda k: f"{r[k]:.3f}" if k in r else "–"
    n = lambda v: f"{v:.3e}" if abs(v) >= 1e5 else f"{v:.3f}"
    rows.append(f"| {r['set']} | {r['count']} | {r['excluded']} | {n(r['bpd_mean'])} ± {n(r['bpd_stderr'])} | {g('auroc_bpd')} | {g('auroc_typicality_m1')} | {g('auroc_typicality_m10')} |")
rows.append(f"\nTypicality reference: {o['train_reference_bpd']:.4f} bits/dim, mean of {o['train']['count']} training digits.")
c = load("classify")
rows.append(f"\nBayes-rule classification: {100*c['accuracy']:.2f} % of the first {c['classified']} test digits ({c['excluded']} excluded).")
open(f"{out}/tables.md", "w").write("\n".join(rows) + "\n")
print("\n".join(rows))
PY
