#!/usr/bin/env bash
# One visit to a lent GPU machine (issue #6), prepared on this side: the checks, then the
# benchmark, within one device call. Run from the repository root on the GPU machine:
#
#   device run, carrying target/gpu-carry (made by tests/scripts/gpu/build_cuda.sh and
#   tests/scripts/gpu/carry_data.sh):
#     bash tests/scripts/gpu/visit.sh target/gpu-carry
#
# Writes six files to $OUT (the device tool's folder that comes back, at most 8 files;
# ./gpu-visit without it):
#   visit.log              the card, driver and libraries found (../shared/gpu/run-on-gpu.sh),
#                          the random-weight checkpoints and transformers' references written on
#                          that machine (it reaches no registry, and MiniLM's real weights do not
#                          fit the carry: tests/scripts/gpu/random_checkpoints.py) with their
#                          sha256, and every step's stderr
#   selftest.txt           `bert selftest --device cuda` on both shapes (MiniLM's 32-wide heads,
#                          bert-base's 64-wide): f32 vs transformers, f16/bf16 vs f32, batched
#                          vs alone, padding-free vs padded, the fused attention kernel (padded
#                          and packed rows) vs the exact attention
#   train-step.jsonl       one fine-tuning step, ours and PyTorch's, f32 and bf16 compute
#   finetune.jsonl         `bert finetune` on 320 Lee pairs (the carry's lee/) from the random
#                          MiniLM-shaped checkpoint, on the GPU in f32 and with bf16 compute:
#                          every step's loss, each line tagged with its run; the same runs on a
#                          CPU are in crates/bench/README.md (GPU section) for the same sha256
#   gpu-bench.json / .md   crates/bench/scripts/compare_gpu.py, bf16 first, until the deadline
# BUDGET_S (default 480) bounds the whole visit: the benchmark starts no section after it.
# For a dry run of the plumbing on a machine without a GPU (with a libcuda stub on the path):
#   DEVICE=cpu BATCHES=1,2 SEQS=16 DTYPES=f32 TRAIN_BATCH=2 TRAIN_SEQ=16 FINETUNE_PAIRS=32 \
#     PYTHON=.venv/bin/python bash tests/scripts/gpu/visit.sh
set -u
device=${DEVICE:-cuda}
carry=${1:-target/gpu-carry}
out=${OUT:-gpu-visit}
budget=${BUDGET_S:-480}
mkdir -p "$out"
log=$out/visit.log
start=$(date +%s)
runner=""
for candidate in ../shared/gpu/run-on-gpu.sh shared/gpu/run-on-gpu.sh; do
  [ -f "$candidate" ] && runner=$candidate && break
done
[ -n "$runner" ] || { echo "run-on-gpu.sh not found (../shared/gpu or shared/gpu)" >&2; exit 1; }
# PyTorch's Python there (PYTHON overrides).
python=${PYTHON:-python3}
[ -z "${PYTHON:-}" ] && [ -x /opt/torch/.venv/bin/python ] && python=/opt/torch/.venv/bin/python

for bin in bert bert-bench; do
  xz -dc "$carry/$bin.xz" > "/tmp/$bin" && chmod +x "/tmp/$bin" || { echo "cannot unpack $carry/$bin.xz" >&2; exit 1; }
done
# The runner finds the driver's and CUDA's libraries; keep its LD_LIBRARY_PATH for our binaries
# only (PyTorch brings its own).
libs=$(bash "$runner" /usr/bin/env sh -c 'echo "BERT_GPU_LIBS=$LD_LIBRARY_PATH"' 2>&1 \
  | tee -a "$log" | sed -n 's/^BERT_GPU_LIBS=//p')
export BERT_GPU_LIBS=$libs
echo "== $(date -u +%T) libraries: $libs"

"$python" tests/scripts/gpu/random_checkpoints.py /tmp/bert-gpu-checkpoints >> "$log" 2>&1 \
  || { echo "random_checkpoints.py failed:"; tail -20 "$log"; exit 1; }
sha256sum /tmp/bert-gpu-checkpoints/*/model.safetensors | tee -a "$log"
echo "== $(date -u +%T) checkpoints written"

status=0
for model in minilm-random bert-base-random; do
  dir=/tmp/bert-gpu-checkpoints/$model
  LD_LIBRARY_PATH=$libs timeout 180 /tmp/bert selftest --device "$device" --model "$dir" \
    --reference "$dir/reference.safetensors" 2>&1 | tee -a "$out/selftest.txt"
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
done
echo "== $(date -u +%T) selftest done (status $status)"

# A fine-tuning step (forward, backward, clipping, AdamW) on bert-base's shapes, batch 16 x 128,
# ours and PyTorch's, in f32 and with bf16 compute over f32 weights (autocast on their side).
dir=/tmp/bert-gpu-checkpoints/bert-base-random
shape=(--batch "${TRAIN_BATCH:-16}" --seq "${TRAIN_SEQ:-128}" --warmup 3 --steps 10)
for compute in "" bf16; do
  LD_LIBRARY_PATH=$libs timeout 120 /tmp/bert-bench train-step --model "$dir" --device "$device" \
    "${shape[@]}" ${compute:+--compute-dtype $compute} >> "$out/train-step.jsonl" 2>> "$log"
  timeout 120 "$python" crates/bench/scripts/train_step_torch.py --model "$dir" --device "$device" \
    "${shape[@]}" ${compute:+--autocast $compute} >> "$out/train-step.jsonl" 2>> "$log"
done
cat "$out/train-step.jsonl"
echo "== $(date -u +%T) training steps done"

# Fine-tuning on the Lee pairs (the loss must fall on the GPU as on the CPU): the random
# MiniLM-shaped checkpoint with MiniLM's tokenizer, 3 epochs over the carry's 320 pairs
# (60 steps), lr 5e-4, batch 16, max length 256, seed 0; f32, then bf16 compute over f32 weights.
# Dropout masks are the CPU's (same stream), so the f32 run should follow the CPU's step by step.
dir=/tmp/bert-gpu-checkpoints/minilm-random
cp "$carry"/tokenizer/* "$dir/"
train=$carry/lee/train320.tsv
if [ -n "${FINETUNE_PAIRS:-}" ]; then
  head -n $((FINETUNE_PAIRS + 1)) "$train" > /tmp/bert-finetune-train.tsv
  train=/tmp/bert-finetune-train.tsv
fi
for compute in f32 bf16; do
  run_dir=/tmp/bert-finetune-$compute
  LD_LIBRARY_PATH=$libs timeout 150 /tmp/bert finetune --model "$dir" --train "$train" \
    --eval "$carry/lee/test.tsv" --out "$run_dir" --epochs 3 --lr 5e-4 --batch-size 16 \
    --max-length 256 --seed 0 --device "$device" --overwrite \
    $([ "$compute" = bf16 ] && echo --compute-dtype bf16) >> "$log" 2>&1 || status=1
  [ -f "$run_dir/metrics.jsonl" ] && sed "s/^{/{\"run\":\"$device-$compute\",/" "$run_dir/metrics.jsonl" \
    >> "$out/finetune.jsonl"
done
grep -c '"loss"' "$out/finetune.jsonl"
echo "== $(date -u +%T) fine-tuning done"

left=$(( budget - ($(date +%s) - start) ))
"$python" crates/bench/scripts/compare_gpu.py --bench /tmp/bert-bench \
  --models /tmp/bert-gpu-checkpoints/bert-base-random /tmp/bert-gpu-checkpoints/minilm-random \
  --dtypes "${DTYPES:-bf16,f16,f32}" --batches "${BATCHES:-1,32,128,512}" --seqs "${SEQS:-128,512}" \
  --device "$device" --warmup 2 --runs 5 --deadline-s "$left" \
  --json "$out/gpu-bench.json" 2>> "$log" | tee "$out/gpu-bench.md"
echo "== $(date -u +%T) done in $(( $(date +%s) - start )) s"
exit $status
