#!/usr/bin/env python3
"""Time to first score of the CLI (issue #7): process start, load by mmap, tokenise, one forward
pass, print. Each variant scores the same pair with `bert score --device cpu A B` from a warm cache:

  default      the bundled cross-encoder (`minilm-lee-cross-encoder`): the base model plus a 3.5 MB
               LoRA adapter, merged into the base's weights at every load
  merged       the same model stored whole (`bert merge` of the adapter into --work, made anew each call):
               what the default would cost with no merge at load
  bi           `--mode bi`: the base all-MiniLM-L6-v2 by the cosine of its embeddings (two passes)
  baseline     with --baseline B: the default again, run by another build B (an earlier commit's), so
               a change to loading is timed against its predecessor in the same rounds

Variants alternate within each round (so a slow spell of a shared machine hits all of them), after
one untimed run of each to warm the page cache. Prints the per-variant medians and JSON (--json).
Usage: time_to_first_score.py [--bert target/release/bert] [--baseline B] [--rounds 10] [--work DIR] [--json F]
"""
import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
PAIR = ["A man is playing a guitar.", "Someone is playing an instrument."]


def run(cmd):
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr}")
    return done


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bert", default=str(ROOT / "target/release/bert"))
    p.add_argument("--baseline", help="another `bert` build whose default is timed alongside")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--work", default="/tmp/bert-ttfs")
    p.add_argument("--json")
    args = p.parse_args()
    if args.rounds < 1:
        sys.exit("--rounds must be at least 1")
    bert = args.bert
    # Merged anew on every call, so the whole copy is always the adapter this binary bundles.
    merged = Path(args.work) / "minilm-lee-cross-encoder-merged"
    shutil.rmtree(merged, ignore_errors=True)
    run([bert, "merge", "--model", "minilm-lee-cross-encoder", "--out", str(merged)])
    variants = {
        "default": [bert, "score", "--device", "cpu", *PAIR],
        "merged": [bert, "score", "--device", "cpu", "--model", str(merged), *PAIR],
        "bi": [bert, "score", "--device", "cpu", "--mode", "bi", *PAIR],
    }
    if args.baseline:
        variants["baseline"] = [args.baseline, "score", "--device", "cpu", *PAIR]
    scores = {name: run(cmd).stdout.strip() for name, cmd in variants.items()}  # warm-up
    for other in ("merged", "baseline"):
        # The merge must not change the model: the stored-whole copy (and an earlier build of
        # the same default) has to print the same score.
        if other in scores and scores[other] != scores["default"]:
            print(f"note: default printed {scores['default']!r}, {other} {scores[other]!r}", file=sys.stderr)
    times = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, cmd in variants.items():
            t0 = time.perf_counter()
            run(cmd)
            times[name].append(time.perf_counter() - t0)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    print(f"Time to first score, `bert score --device cpu` of one pair, warm cache, commit {commit}, "
          f"{args.rounds} alternating rounds" + (f"; baseline {args.baseline}" if args.baseline else "") + ":\n")
    print("| variant | median ms | min-max ms | printed score |")
    print("|---|---|---|---|")
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(ts) * 1e3:.0f} | {min(ts) * 1e3:.0f}-{max(ts) * 1e3:.0f} | {scores[name]} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"commit": commit, "bert": bert, "baseline": args.baseline, "rounds": args.rounds,
                                               "runs_s": times, "scores": scores}, indent=1) + "\n")


if __name__ == "__main__":
    main()
