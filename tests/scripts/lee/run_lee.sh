#!/usr/bin/env bash
# The Lee fine-tuning comparison, end to end, on this machine's CPU (2 threads each side):
#   1. data: tests/scripts/lee/prepare_lee.py (document split, seeded); with DISTILL_PAIRS=N (> 0),
#      tests/scripts/lee/distill_lee.py adds N pairs of background documents labelled by the
#      zero-shot bi-encoder (calibrated on the training pairs) to the training file of both sides
#   2. ours: `bert finetune` from all-MiniLM-L6-v2, then `bert eval` on the held-out pairs
#   3. PyTorch: sentence-transformers' CrossEncoder.fit, same recipe and split
#   4. zero-shot bi-encoder: `bert score --mode bi` (cosine of mean-pooled embeddings)
# Each side's score of every test pair is kept (*_scores.jsonl) for pooling k-fold results.
# Usage: tests/scripts/lee/run_lee.sh OUT_DIR [PYTHON]   (PYTHON: one with requirements-lee.txt)
# FOLDS=F FOLD=K: the split is fold K of F (prepare_lee.py --folds); tests/scripts/lee/run_lee_kfold.sh
# runs every fold. START_OURS=DIR START_PYTORCH=DIR: each side fine-tunes from its own earlier
# checkpoint instead of all-MiniLM-L6-v2 (the second stage of run_lee_two_stage.sh).
# OURS_FLAGS="--uniform-batches ...": extra `bert finetune` flags; SIDES=ours skips PyTorch.
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
fold_args=()
if [ -n "${FOLDS:-}" ]; then fold_args=(--folds "$FOLDS" --fold "${FOLD:?FOLDS needs FOLD}"); fi
python3 tests/scripts/lee/prepare_lee.py "$out/data" --seed "${SPLIT_SEED:-0}" "${fold_args[@]}" > "$out/split.json"
$bert embed --device cpu "fetch the base model once" > /dev/null
train="$out/data/train.tsv"
if [ "$distill_pairs" -gt 0 ]; then
  $bert embed --normalize --device cpu --max-length "$max_length" --input "$out/data/background.txt" > "$out/background_bi.jsonl"
  $bert score --mode bi --device cpu --max-length "$max_length" --input "$out/data/train.tsv" > "$out/train_bi.jsonl"
  python3 tests/scripts/lee/distill_lee.py "$out/data" --embeddings "$out/background_bi.jsonl" \
    --train-scores "$out/train_bi.jsonl" --pairs "$distill_pairs" --seed "${SPLIT_SEED:-0}" > "$out/distill.json"
  train="$out/data/train_distill.tsv"
fi
model_dir=$(tests/scripts/lee/base_model_dir.sh)

start_ours=()
if [ -n "${START_OURS:-}" ]; then start_ours=(--model "$START_OURS"); fi
read -r -a ours_flags <<< "${OURS_FLAGS:-}"
rm -rf "$out/ours" # a fold reruns from the start (what an interrupted attempt left is not resumed)
$bert finetune "${start_ours[@]}" "${ours_flags[@]}" --train "$train" --out "$out/ours" --epochs "$epochs" --batch-size "$batch" \
  --lr "$lr" --seed "$seed" --max-length "$max_length" --device cpu > "$out/ours.json"
$bert eval --model "$out/ours" --data "$out/data/test.tsv" --max-length "$max_length" --device cpu > "$out/ours_test.json"
$bert score --mode cross --model "$out/ours" --input "$out/data/test.tsv" --max-length "$max_length" --device cpu > "$out/ours_scores.jsonl"

if [ "${SIDES:-both}" != ours ]; then
  "$python" tests/scripts/lee/crossencoder_fit.py --model "${START_PYTORCH:-$model_dir}" --train "$train" --test "$out/data/test.tsv" \
    --epochs "$epochs" --batch-size "$batch" --lr "$lr" --seed "$seed" --max-length "$max_length" --threads 2 \
    --predictions "$out/pytorch_scores.jsonl" > "$out/pytorch.json"
fi

$bert score --mode bi --device cpu --max-length "$max_length" --input "$out/data/test.tsv" > "$out/bi_scores.jsonl"
python3 tests/scripts/lee/lee_metrics.py pair "$out/data/test.tsv" "$out/bi_scores.jsonl" \
  "zero-shot bi-encoder (cosine of mean-pooled all-MiniLM-L6-v2)" > "$out/bi_encoder.json"
