#!/usr/bin/env bash
# The data a GPU visit's fine-tuning run needs, put beside the CUDA binaries in the carry (the GPU
# machine reaches no registry): the Lee pairs of tests/scripts/lee/prepare_lee.py's seed-0 split
# (the first 320 training pairs and the 45 test pairs, ~0.5 MB) and all-MiniLM-L6-v2's tokenizer
# files (the random-weight checkpoints written there have none).
# Usage: tests/scripts/gpu/carry_data.sh [OUT_DIR]   (default target/gpu-carry)
# Needs python3 with pip (prepare_lee.py fetches the pinned gensim wheel) and the default model in
# the cache (any `bert` command that uses it fetches it first).
set -euo pipefail
root=$(cd "$(dirname "$0")/../../.." && pwd)
cd "$root"
out=${1:-target/gpu-carry}
model=$(bash tests/scripts/lee/base_model_dir.sh)
[ -f "$model/tokenizer.json" ] || { echo "no tokenizer in $model: run any bert command once" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 tests/scripts/lee/prepare_lee.py "$work" --seed 0 > "$work/prepare.log"
mkdir -p "$out/lee" "$out/tokenizer"
head -n 321 "$work/train.tsv" > "$out/lee/train320.tsv"   # the header and 320 pairs
cp "$work/test.tsv" "$out/lee/test.tsv"
for f in tokenizer.json vocab.txt tokenizer_config.json special_tokens_map.json; do
  cp "$model/$f" "$out/tokenizer/"
done
echo "$out/lee: $(($(wc -l < "$out/lee/train320.tsv") - 1)) train, $(($(wc -l < "$out/lee/test.tsv") - 1)) test pairs; $out/tokenizer: $(ls "$out/tokenizer" | wc -l) files"
