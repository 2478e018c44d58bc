#!/usr/bin/env bash
# The Lee comparison over k document folds (default 5): run_lee.sh once per fold into OUT/foldK
# (same recipe environment variables: DISTILL_PAIRS, LR, EPOCHS, SEED, ...), then
# lee_metrics.py kfold OUT > OUT/kfold.json (per fold, mean over folds, and all held-out pairs pooled).
# Every pair of the 50 documents whose two documents share a fold is held out exactly once:
# 5 folds x 45 = 225 pairs. A fold whose directory already has bi_encoder.json (run_lee.sh's last
# output) is not rerun; an interrupted fold is rerun from the start.
# Usage: tests/scripts/lee/run_lee_kfold.sh OUT_DIR [PYTHON]   FOLD_ORDER="1 2 3 4 0" picks the order.
set -euo pipefail
out=${1:?usage: run_lee_kfold.sh OUT_DIR [PYTHON]}
python=${2:-python3}
root=$(cd "$(dirname "$0")/../../.." && pwd)
folds=${FOLDS:-5}
mkdir -p "$out"
for fold in ${FOLD_ORDER:-$(seq 0 $((folds - 1)))}; do
  if [ -f "$out/fold$fold/bi_encoder.json" ]; then continue; fi
  echo "fold $fold of $folds: $(date -u +%H:%M:%S)" >&2
  FOLDS=$folds FOLD=$fold "$root/tests/scripts/lee/run_lee.sh" "$out/fold$fold" "$python"
done
python3 "$root/tests/scripts/lee/lee_metrics.py" kfold "$out" > "$out/kfold.json"
cat "$out/kfold.json"
