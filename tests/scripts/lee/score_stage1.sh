#!/usr/bin/env bash
# Scores every fold's held-out pairs with each side's stage-1 (distillation only) model of a
# run_lee_two_stage.sh run: OUT/foldK/stage1_{ours,pytorch}_scores.jsonl, which
# `lee_metrics.py kfold OUT` then reports beside the two-stage models. Tells whether a gap
# between the sides comes from the first stage or the second. No training.
# Stage 1 reads no Lee document or label, so all 1225 Lee pairs are held out from it: they are
# scored too (OUT/stage1/all_pairs/), five times the folds' 225 pairs, and OUT/stage1/all_pairs.jsonl
# gets each model's correlations with the human ratings there, the students' with the agreement
# (Spearman) with their teacher, the zero-shot bi-encoder.
# Usage: tests/scripts/lee/score_stage1.sh OUT_DIR [PYTHON]   (BERT=PATH: a built bert binary;
# SIDES=ours: this project's model only)
set -euo pipefail
out=${1:?usage: score_stage1.sh OUT_DIR [PYTHON]}
python=${2:-python3}
root=$(cd "$(dirname "$0")/../../.." && pwd)
cd "$root"
if [ -z "${BERT:-}" ]; then cargo build -q -p bert-cli; fi
bert=${BERT:-target/debug/bert}
max_length=${MAX_LENGTH:-256}
# Writes DEST/stage1_{ours,pytorch}_scores.jsonl: each side's stage-1 model's scores of TEST's pairs.
score_students() {
  local test=$1 dest=$2
  $bert score --mode cross --model "$out/stage1/ours" --input "$test" --max-length "$max_length" \
    --device cpu > "$dest/stage1_ours_scores.jsonl"
  if [ "${SIDES:-both}" != ours ]; then
    "$python" tests/scripts/lee/crossencoder_fit.py --model "$out/stage1/pytorch" --train "$test" \
      --test "$test" --epochs 0 --max-length "$max_length" --threads 2 \
      --predictions "$dest/stage1_pytorch_scores.jsonl" > /dev/null
  fi
}
shopt -s nullglob  # a STAGE1_ONLY run has no folds: only the all-pairs scoring below runs
folds=("$out"/fold*/)
for fold in "${folds[@]}"; do
  score_students "$fold/data/test.tsv" "$fold"
done
all="$out/stage1/all_pairs"
python3 tests/scripts/lee/prepare_lee.py "$all/data" --test-docs 50 > /dev/null
$bert score --mode bi --device cpu --max-length "$max_length" --input "$all/data/test.tsv" > "$all/bi_scores.jsonl"
score_students "$all/data/test.tsv" "$all"
metrics=(python3 tests/scripts/lee/lee_metrics.py pair "$all/data/test.tsv")
{
  "${metrics[@]}" "$all/bi_scores.jsonl" "zero-shot bi-encoder (cosine of mean-pooled all-MiniLM-L6-v2)"
  "${metrics[@]}" "$all/stage1_ours_scores.jsonl" "bert finetune (ours), distillation stage only" "$all/bi_scores.jsonl"
  if [ "${SIDES:-both}" != ours ]; then
    "${metrics[@]}" "$all/stage1_pytorch_scores.jsonl" "CrossEncoder.fit, distillation stage only" "$all/bi_scores.jsonl"
  fi
} > "$out/stage1/all_pairs.jsonl"
if [ ${#folds[@]} -gt 0 ]; then python3 tests/scripts/lee/lee_metrics.py kfold "$out" > "$out/kfold.json"; fi
