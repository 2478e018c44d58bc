#!/usr/bin/env bash
# Scores every fold's held-out pairs with each side's stage-1 (distillation only) model of a
# run_lee_two_stage.sh run: OUT/foldK/stage1_{ours,pytorch}_scores.jsonl, which
# `lee_metrics.py kfold OUT` then reports beside the two-stage models. Tells whether a gap
# between the sides comes from the first stage or the second. No training.
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
for fold in "$out"/fold*/; do
  test="$fold/data/test.tsv"
  $bert score --mode cross --model "$out/stage1/ours" --input "$test" --max-length "$max_length" \
    --device cpu > "$fold/stage1_ours_scores.jsonl"
  if [ "${SIDES:-both}" != ours ]; then
    "$python" tests/scripts/lee/crossencoder_fit.py --model "$out/stage1/pytorch" --train "$test" \
      --test "$test" --epochs 0 --max-length "$max_length" --threads 2 \
      --predictions "$fold/stage1_pytorch_scores.jsonl" > /dev/null
  fi
done
python3 tests/scripts/lee/lee_metrics.py kfold "$out" > "$out/kfold.json"
