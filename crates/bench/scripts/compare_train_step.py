#!/usr/bin/env python3
"""Side-by-side training-step benchmark: this project (`bert-bench train-step`) against
PyTorch (transformers' BertForSequenceClassification, SDPA and eager attention), alternating
on the same machine, each run reporting the median of its timed steps after warm-up.

    python crates/bench/scripts/compare_train_step.py --model DIR [--rounds 3 --steps 10 \
        --batch 16 --seq 128 --threads 2] [--bench target/release/bert-bench]

DIR is the all-MiniLM-L6-v2 directory (`bert embed` fetches it into the cache). Both sides
run with the given thread count (RAYON_NUM_THREADS for ours, torch.set_num_threads for
PyTorch). Prints a Markdown table and, with --json, the raw runs.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def run(cmd, env=None):
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--bench", default=str(ROOT / "target/release/bert-bench"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    shape = ["--batch", str(a.batch), "--seq", str(a.seq), "--steps", str(a.steps), "--warmup", str(a.warmup)]
    env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads))
    torch_script = str(ROOT / "crates/bench/scripts/train_step_torch.py")
    runs = {"bert-rs": [], "pytorch-sdpa": [], "pytorch-eager": []}
    for _ in range(a.rounds):
        runs["bert-rs"].append(run([a.bench, "train-step", "--model", a.model, *shape], env))
        for attn in ("sdpa", "eager"):
            runs[f"pytorch-{attn}"].append(
                run([sys.executable, torch_script, "--model", a.model, "--attn", attn, "--threads", str(a.threads), *shape])
            )
    print(f"MiniLM-L6 (6 x 384) pair-classifier training step, batch {a.batch} x seq {a.seq}, {a.threads} threads, "
          f"{a.rounds} alternating rounds x {a.steps} timed steps (median of round medians); {platform.processor() or platform.machine()}")
    print()
    print("| implementation | step (s) | forward (s) | backward (s) | optimizer (s) | pairs/s |")
    print("|---|---|---|---|---|---|")
    best_torch = None
    for name, rs in runs.items():
        med = lambda k: statistics.median(r[k] for r in rs)
        pairs = a.batch / med("median_step_s")
        if name.startswith("pytorch"):
            best_torch = max(best_torch or 0, pairs)
        print(f"| {name} | {med('median_step_s'):.3f} | {med('median_forward_s'):.3f} | {med('median_backward_s'):.3f} "
              f"| {med('median_update_s'):.3f} | {pairs:.2f} |")
    ours = a.batch / statistics.median(r["median_step_s"] for r in runs["bert-rs"])
    print()
    print(f"bert-rs / best PyTorch: {ours / best_torch:.2f}x")
    if a.json:
        print(json.dumps(runs))


if __name__ == "__main__":
    main()
