#!/usr/bin/env bash
# Copies the raw outputs of one train_lee_cross_encoder.sh run into a folder of the model card
# (models/minilm-lee-cross-encoder/run-DATE-...): the small files that back the card's numbers,
# none of the weights. The layout is the one the committed runs use:
#   adapter_test.json      `bert eval` of the extracted adapter on the 45 held-out pairs
#   adapter_scores.jsonl   its probability for each of those pairs (`bert score --mode cross`)
#   full_test.json         the full fine-tune (both stages) on the same pairs, full_scores.jsonl
#   bi_encoder.json        the zero-shot bi-encoder on the same pairs, bi_scores.jsonl
#   split.json             the document folds; distill.json: the distillation draw
#   stage1.json, stage2.json and stage{1,2}_metrics.jsonl: each stage's summary and loss log
#   extraction.json        per weight, how much of the change the rank-R adapter keeps
# Usage: tests/scripts/lee/collect_run.sh OUT_DIR DEST_DIR
#   BERT: the binary that scores the adapter (target/debug/bert by default, built if missing).
set -euo pipefail
out=${1:?usage: collect_run.sh OUT_DIR DEST_DIR}
dest=${2:?usage: collect_run.sh OUT_DIR DEST_DIR}
root=$(cd "$(dirname "$0")/../../.." && pwd)
cd "$root"
if [ -z "${BERT:-}" ]; then cargo build -q -p bert-cli; fi
bert=${BERT:-target/debug/bert}
[ -f "$out/adapter_test.json" ] || { echo "$out: no adapter_test.json (the run has not finished)" >&2; exit 1; }
mkdir -p "$dest"
# source (under OUT_DIR) -> name in DEST_DIR
while read -r from to; do
  cp "$out/$from" "$dest/$to"
done <<'EOF'
adapter_test.json adapter_test.json
fold0/bi_encoder.json bi_encoder.json
fold0/bi_scores.jsonl bi_scores.jsonl
fold0/split.json split.json
stage1/distill.json distill.json
adapter/extraction.json extraction.json
fold0/ours_scores.jsonl full_scores.jsonl
fold0/ours_test.json full_test.json
stage1/ours.json stage1.json
stage1/ours/metrics.jsonl stage1_metrics.jsonl
fold0/ours.json stage2.json
fold0/ours/metrics.jsonl stage2_metrics.jsonl
EOF
"$bert" score --mode cross --model "$out/adapter" --input "$out/fold0/data/test.tsv" \
  --max-length 256 --device cpu > "$dest/adapter_scores.jsonl"
echo "collected into $dest: $(ls "$dest" | wc -l) files"
