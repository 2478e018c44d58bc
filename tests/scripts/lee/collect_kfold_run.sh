#!/usr/bin/env bash
# Copies the raw outputs of one run_lee_two_stage.sh run (five folds, or STAGE1_ONLY) into a record
# folder of models/lee-cross-encoder/ (run-DATE-.../NAME): the small files that back the README's
# numbers, no model weights and no Lee text. The five-fold twin of collect_run.sh (the card's
# single-fold runs). Layout, all relative to DEST_DIR:
#   stage1/distill.json              the distillation draw (pairs per band of teacher cosine)
#   stage1/ours.json                 ours' stage-1 summary (steps, pairs/s); ours_metrics.jsonl: its loss log
#   stage1/pytorch.json              CrossEncoder.fit's stage-1 summary, when that side ran
#   stage1/all_pairs.jsonl, stage1/all_pairs/*_scores.jsonl
#                                    score_stage1.sh's look at the stage-1 models on all 1225 pairs
#   foldK/split.json                 the document folds; bi_encoder.json, bi_scores.jsonl: the
#                                    zero-shot bi-encoder on the 45 held-out pairs
#   foldK/ours.json, ours_test.json, ours_scores.jsonl
#                                    ours' stage 2 (training summary with pairs/s), its held-out
#                                    metrics and per-pair probabilities
#   foldK/pytorch.json, pytorch_scores.jsonl   the same for CrossEncoder.fit, when that side ran
#   foldK/stage1_{ours,pytorch}_scores.jsonl   score_stage1.sh's scores of the held-out pairs
#   kfold.json                       lee_metrics.py kfold: per fold, mean over folds, pooled
# Files of a side or step that did not run are left out; every file of ours' side is required, and
# with SIDE=pytorch every file of PyTorch's.
# SIDE=pytorch copies CrossEncoder.fit's side alone, plus ours' stage1/ours.json and per-fold
# ours.json (the training speeds to read PyTorch's against) and kfold.json: for a run that adds
# PyTorch to a recorded ours-only run whose stage 1 it reused.
# Usage: tests/scripts/lee/collect_kfold_run.sh OUT_DIR DEST_DIR
set -euo pipefail
out=${1:?usage: collect_kfold_run.sh OUT_DIR DEST_DIR}
dest=${2:?usage: collect_kfold_run.sh OUT_DIR DEST_DIR}
side=${SIDE:-all}
case "$side" in all | pytorch) ;; *) echo "SIDE must be all or pytorch, not '$side'" >&2; exit 2 ;; esac
[ -f "$out/stage1/ours.json" ] || { echo "$out: no stage1/ours.json (not a finished two-stage run)" >&2; exit 1; }
folds=$(cd "$out" && ls -d fold[0-9]* 2>/dev/null || true)
if [ -n "$folds" ] && [ ! -f "$out/kfold.json" ]; then
  echo "$out: folds but no kfold.json (stage 2 has not finished)" >&2; exit 1
fi
if [ "$side" = pytorch ] && [ ! -f "$out/stage1/pytorch.json" ]; then
  echo "$out: SIDE=pytorch but PyTorch's side did not run (no stage1/pytorch.json)" >&2; exit 1
fi
# copy FROM [TO]: required; copy_if FROM [TO]: only when it exists (a side or step that may not have run)
copy() { mkdir -p "$(dirname "$dest/${2:-$1}")"; cp "$out/$1" "$dest/${2:-$1}"; }
copy_if() { if [ -f "$out/$1" ]; then copy "$@"; fi; }
mkdir -p "$dest"
copy_if stage1/pytorch.json
copy stage1/ours.json
if [ "$side" = all ]; then
  copy stage1/distill.json
  copy stage1/ours/metrics.jsonl stage1/ours_metrics.jsonl
  copy_if stage1/all_pairs.jsonl
  for f in bi_scores stage1_ours_scores stage1_pytorch_scores; do copy_if "stage1/all_pairs/$f.jsonl"; done
fi
for fold in $folds; do
  copy "$fold/ours.json"
  if [ "$side" = pytorch ]; then pytorch_copy=copy; else pytorch_copy=copy_if; fi
  $pytorch_copy "$fold/pytorch.json"
  $pytorch_copy "$fold/pytorch_scores.jsonl"
  copy_if "$fold/stage1_pytorch_scores.jsonl"
  if [ "$side" = all ]; then
    for f in bi_encoder.json bi_scores.jsonl ours_scores.jsonl ours_test.json split.json; do copy "$fold/$f"; done
    copy_if "$fold/stage1_ours_scores.jsonl"
  fi
done
if [ -n "$folds" ]; then copy kfold.json; fi
echo "collected into $dest: $(find "$dest" -type f | wc -l) files"
