#!/usr/bin/env bash
# One visit to a lent GPU machine (issue #6), prepared on this side: the checks, then the
# benchmark, within one device call. Run from the repository root on the GPU machine:
#
#   device run, carrying target/gpu-carry (made by tests/scripts/gpu/build_cuda.sh):
#     bash tests/scripts/gpu/visit.sh target/gpu-carry
#
# Writes to $OUT (the device tool's folder that comes back; ./gpu-visit without it):
#   runner.log             the card, driver and libraries found (../shared/gpu/run-on-gpu.sh)
#   checkpoints.log        random-weight checkpoints and transformers' references, written on
#                          that machine (it reaches no registry, and MiniLM's real weights do
#                          not fit the carry): tests/scripts/gpu/random_checkpoints.py
#   selftest-*.txt         `bert selftest --device cuda` on both shapes (MiniLM's 32-wide heads,
#                          bert-base's 64-wide): f32 vs transformers, f16/bf16 vs f32, batched
#                          vs alone, the fused attention kernel vs the exact attention
#   train-step.jsonl       one fine-tuning step, ours and PyTorch's, f32 and bf16 compute
#   gpu-bench.json / .md   crates/bench/scripts/compare_gpu.py, bf16 first, until the deadline
# BUDGET_S (default 480) bounds the whole visit: the benchmark starts no section after it.
# For a dry run of the plumbing on a machine without a GPU (with a libcuda stub on the path):
#   DEVICE=cpu BATCHES=1,2 SEQS=16 DTYPES=f32 TRAIN_BATCH=2 TRAIN_SEQ=16 PYTHON=.venv/bin/python \
#     bash tests/scripts/gpu/visit.sh
set -u
device=${DEVICE:-cuda}
carry=${1:-target/gpu-carry}
out=${OUT:-gpu-visit}
budget=${BUDGET_S:-480}
mkdir -p "$out"
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
  | tee "$out/runner.log" | sed -n 's/^BERT_GPU_LIBS=//p')
export BERT_GPU_LIBS=$libs
echo "== $(date -u +%T) libraries: $libs"

"$python" tests/scripts/gpu/random_checkpoints.py /tmp/bert-gpu-checkpoints > "$out/checkpoints.log" 2>&1 \
  || { echo "random_checkpoints.py failed:"; tail -20 "$out/checkpoints.log"; exit 1; }
echo "== $(date -u +%T) checkpoints written"

status=0
for model in minilm-random bert-base-random; do
  dir=/tmp/bert-gpu-checkpoints/$model
  LD_LIBRARY_PATH=$libs timeout 180 /tmp/bert selftest --device "$device" --model "$dir" \
    --reference "$dir/reference.safetensors" 2>&1 | tee "$out/selftest-$model.txt"
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
done
echo "== $(date -u +%T) selftest done (status $status)"

# A fine-tuning step (forward, backward, clipping, AdamW) on bert-base's shapes, batch 16 x 128,
# ours and PyTorch's, in f32 and with bf16 compute over f32 weights (autocast on their side).
dir=/tmp/bert-gpu-checkpoints/bert-base-random
shape=(--batch "${TRAIN_BATCH:-16}" --seq "${TRAIN_SEQ:-128}" --warmup 3 --steps 10)
for compute in "" bf16; do
  LD_LIBRARY_PATH=$libs timeout 120 /tmp/bert-bench train-step --model "$dir" --device "$device" \
    "${shape[@]}" ${compute:+--compute-dtype $compute} >> "$out/train-step.jsonl" 2>> "$out/train-step.stderr"
  timeout 120 "$python" crates/bench/scripts/train_step_torch.py --model "$dir" --device "$device" \
    "${shape[@]}" ${compute:+--autocast $compute} >> "$out/train-step.jsonl" 2>> "$out/train-step.stderr"
done
cat "$out/train-step.jsonl"
echo "== $(date -u +%T) training steps done"

left=$(( budget - ($(date +%s) - start) ))
"$python" crates/bench/scripts/compare_gpu.py --bench /tmp/bert-bench \
  --models /tmp/bert-gpu-checkpoints/bert-base-random /tmp/bert-gpu-checkpoints/minilm-random \
  --dtypes "${DTYPES:-bf16,f16,f32}" --batches "${BATCHES:-1,32,128,512}" --seqs "${SEQS:-128,512}" \
  --device "$device" --warmup 2 --runs 5 --deadline-s "$left" \
  --json "$out/gpu-bench.json" 2> "$out/gpu-bench.stderr" | tee "$out/gpu-bench.md"
echo "== $(date -u +%T) done in $(( $(date +%s) - start )) s"
exit $status
