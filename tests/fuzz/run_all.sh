#!/usr/bin/env bash
# Fuzzes every target for RUNS inputs (default 1,000,000), one after the other, starting from
# the hand-written seeds (tests/fuzz/seeds/TARGET) and the corpus earlier runs kept
# (tests/fuzz/corpus/TARGET, where new inputs go), then minimises the corpus (cargo fuzz cmin)
# so what is committed stays small.
# Needs a nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`). Logs: LOG_DIR/TARGET.log
# (libFuzzer's own summary, "Done N runs in S second(s)", is the last stats line).
# Usage: tests/fuzz/run_all.sh [LOG_DIR]      RUNS=N TARGETS="a b" to narrow it.
# LEAN=1 builds without AddressSanitizer and comparison tracing (into tests/fuzz/target-lean):
# both cost more than the model itself on tokenize_forward (~40 inputs/s with them on 2 busy
# cores), whose code under test has no unsafe of its own beyond the kernels the parity tests
# cover; coverage-guided mutation still runs.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
logs=${1:-$root/tests/fuzz/logs}
runs=${RUNS:-1000000}
mkdir -p "$logs"
cd "$root"
flags=(--fuzz-dir tests/fuzz -O --debug-assertions)
if [ -n "${LEAN:-}" ]; then
  flags+=(--sanitizer none --no-trace-compares --target-dir tests/fuzz/target-lean)
fi
for target in ${TARGETS:-config_json pair_file safetensors_header tokenize_forward}; do
  max_len=()
  # The safetensors seeds include the tiny model (84 KB): keep inputs that long.
  if [ "$target" != safetensors_header ]; then max_len=(-max_len=4096); fi
  echo "$target: $(date -u +%FT%TZ)" >&2
  start=$(date +%s)
  mkdir -p "tests/fuzz/corpus/$target"
  cargo +nightly fuzz run "${flags[@]}" "$target" "tests/fuzz/corpus/$target" "tests/fuzz/seeds/$target" \
    -- -runs="$runs" -timeout=20 \
    -rss_limit_mb=4096 "${max_len[@]}" > "$logs/$target.log" 2>&1
  echo "$target: $runs runs, no crash, $(( $(date +%s) - start )) s" | tee -a "$logs/summary.txt" >&2
  cargo +nightly fuzz cmin "${flags[@]}" "$target" >> "$logs/$target.cmin.log" 2>&1
done
