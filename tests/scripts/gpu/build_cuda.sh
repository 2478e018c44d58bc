#!/usr/bin/env bash
# Builds `bert` and `bert-bench` with the `cuda` feature on a machine without a GPU, stripped and xz-compressed to
# carry to a lent GPU machine (the device tool carries at most 64 MiB; each is ~12 MB).
# Needs the CUDA 13.0 toolkit made by ../shared/gpu/setup-cuda-toolkit.sh (after `cargo fetch`).
# Usage: tests/scripts/gpu/build_cuda.sh [OUT_DIR]   (default target/gpu-carry, ignored by git)
# CUDA_HOME (/opt/cuda13/nvidia/cu13), CUDA_COMPUTE_CAP (90: H100/H200), CARGO_TARGET_DIR
# (target/cuda, apart from the CPU build's target/ so neither rebuilds the other).
# On the GPU machine: bash tests/scripts/gpu/visit.sh OUT_DIR (checks, then the benchmark).
set -euo pipefail
root=$(cd "$(dirname "$0")/../../.." && pwd)
cd "$root"
out=${1:-target/gpu-carry}
export CUDA_HOME=${CUDA_HOME:-/opt/cuda13/nvidia/cu13}
if [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
  echo "no nvcc in $CUDA_HOME/bin: run bash ../shared/gpu/setup-cuda-toolkit.sh /opt/cuda13 first" >&2
  exit 1
fi
export PATH="$CUDA_HOME/bin:$PATH" CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export CUDAFORGE_THREADS=${CUDAFORGE_THREADS:-2} CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target/cuda}
cargo build --release -p bert-cli -p bert-bench --features bert-cli/cuda,bert-bench/cuda
mkdir -p "$out"
for bin in bert bert-bench; do
  strip -o "$out/$bin" "$CARGO_TARGET_DIR/release/$bin"
  xz -T2 -6 -f "$out/$bin"
  echo "$out/$bin.xz ($(du -h "$out/$bin.xz" | cut -f1)), built at $(git rev-parse --short HEAD)"
done
