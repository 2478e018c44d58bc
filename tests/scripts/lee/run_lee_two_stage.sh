#!/usr/bin/env bash
# The Lee comparison with a fold-independent distillation stage, both sides alike:
#   stage 1 (once): each side learns the zero-shot bi-encoder's cosine (clipped to [0, 1], no Lee
#     label read) on DISTILL_PAIRS pairs of lee_background.cor documents (none of them a Lee
#     document), drawn across bands of teacher cosine by distill_lee.py; OUT/stage1/{ours,pytorch}
#   stage 2: run_lee_kfold.sh into OUT/foldK, each side fine-tuning its own stage-1 model on that
#     fold's training pairs only (START_OURS / START_PYTORCH), held-out pairs as before.
# Stage 1 spends the long training once instead of once per fold, and no fold's test documents or
# labels reach it, so every fold's held-out pairs stay unseen.
# Usage: tests/scripts/lee/run_lee_two_stage.sh OUT_DIR [PYTHON]
# Recipe: DISTILL_PAIRS (5000), STAGE1_EPOCHS (1), STAGE1_LR (8e-5); stage 2: EPOCHS (2), LR (2e-5);
# both: BATCH (16), SEED (42), MAX_LENGTH (256: the teacher's embeddings, stage 2 and the test pairs);
# STAGE1_MAX_LENGTH (MAX_LENGTH) truncates the students' stage-1 pairs alone, to make a larger stage 1
# affordable. A finished stage-1 side (its JSON written) is kept. STAGE1_SAVE_STEPS=N checkpoints each
# side's stage 1 every N steps (same arithmetic), and a rerun then resumes it (ours from
# OUT/stage1/ours/last, PyTorch from OUT/stage1/pytorch_checkpoints): a stage 1 of hours survives an
# interrupted session.
# SIDES=ours runs only this project's side (no PyTorch in either stage).
# BACKGROUND_PASSAGE_WORDS=N draws stage 1's pairs from passages of the background documents (cut
# at sentence ends, about N words each: prepare_lee.py) instead of the whole documents.
# DISTILL_DRAW=natural draws them uniformly instead of by bands of teacher cosine (distill_lee.py).
# STAGE1_ONLY=1 stops after stage 1 (then score_stage1.sh scores the students on all 1225 Lee pairs,
# none of which stage 1 reads): a cheaper look at a stage-1 recipe than five folds of stage 2.
set -euo pipefail
out=${1:?usage: run_lee_two_stage.sh OUT_DIR [PYTHON]}
python=${2:-python3}
root=$(cd "$(dirname "$0")/../../.." && pwd)
pairs=${DISTILL_PAIRS:-5000}; s1_epochs=${STAGE1_EPOCHS:-1}; s1_lr=${STAGE1_LR:-8e-5}
batch=${BATCH:-16}; seed=${SEED:-42}; max_length=${MAX_LENGTH:-256}
s1_max_length=${STAGE1_MAX_LENGTH:-$max_length}
stage="$out/stage1"
mkdir -p "$stage"
cd "$root"
if [ -z "${BERT:-}" ]; then cargo build -q -p bert-cli; fi
bert=${BERT:-target/debug/bert}
# Any fold's directory has the same background.txt; only it is read here.
python3 tests/scripts/lee/prepare_lee.py "$stage/data" --folds 5 --fold 0 \
  --background-passage-words "${BACKGROUND_PASSAGE_WORDS:-0}" > /dev/null
$bert embed --normalize --device cpu --max-length "$max_length" --input "$stage/data/background.txt" > "$stage/background_bi.jsonl"
python3 tests/scripts/lee/distill_lee.py "$stage/data" --embeddings "$stage/background_bi.jsonl" \
  --pairs "$pairs" --draw "${DISTILL_DRAW:-bands}" --seed 0 > "$stage/distill.json"
model_dir=$(tests/scripts/lee/base_model_dir.sh)
if [ ! -s "$stage/ours.json" ]; then
  s1_save=(); [ -n "${STAGE1_SAVE_STEPS:-}" ] && s1_save=(--eval-steps "$STAGE1_SAVE_STEPS")
  if [ -n "${STAGE1_SAVE_STEPS:-}" ] && [ -d "$stage/ours/last" ]; then s1_save+=(--resume); else rm -rf "$stage/ours"; fi
  echo "stage 1, ours: $(date -u +%H:%M:%S) ${s1_save[*]}" >&2
  $bert finetune --train "$stage/data/distill.tsv" --out "$stage/ours" --epochs "$s1_epochs" \
    --batch-size "$batch" --lr "$s1_lr" --seed "$seed" --max-length "$s1_max_length" --device cpu \
    "${s1_save[@]}" > "$stage/ours.json.part"
  mv "$stage/ours.json.part" "$stage/ours.json"
fi
if [ "${SIDES:-both}" != ours ] && [ ! -s "$stage/pytorch.json" ]; then
  s1_save=(); [ -n "${STAGE1_SAVE_STEPS:-}" ] && s1_save=(--save-steps "$STAGE1_SAVE_STEPS" --checkpoints "$stage/pytorch_checkpoints")
  echo "stage 1, PyTorch: $(date -u +%H:%M:%S) ${s1_save[*]}" >&2
  "$python" tests/scripts/lee/crossencoder_fit.py --model "$model_dir" --train "$stage/data/distill.tsv" \
    --epochs "$s1_epochs" --batch-size "$batch" --lr "$s1_lr" --seed "$seed" --max-length "$s1_max_length" \
    --threads 2 --save "$stage/pytorch" "${s1_save[@]}" > "$stage/pytorch.json.part"
  mv "$stage/pytorch.json.part" "$stage/pytorch.json"
fi
if [ -n "${STAGE1_ONLY:-}" ]; then exit 0; fi
START_OURS="$stage/ours" START_PYTORCH="$stage/pytorch" DISTILL_PAIRS=0 BERT="$bert" SIDES="${SIDES:-both}" \
  EPOCHS=${EPOCHS:-2} LR=${LR:-2e-5} BATCH=$batch SEED=$seed MAX_LENGTH=$max_length \
  tests/scripts/lee/run_lee_kfold.sh "$out" "$python"
