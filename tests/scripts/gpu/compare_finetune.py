#!/usr/bin/env python3
"""Compares a GPU visit's fine-tuning losses (finetune.jsonl, written by visit.sh) with the same
runs on a CPU (crates/bench/results/finetune-lee320-cpu-*.jsonl, written by `bert finetune` with
the settings visit.sh uses, from the checkpoint whose sha256 visit.log records).

    python3 tests/scripts/gpu/compare_finetune.py VISIT/finetune.jsonl \
        [--cpu crates/bench/results/finetune-lee320-cpu-f32.jsonl ...]

Prints, for every run, the mean loss over each tenth of its steps and its evaluations; and for
each GPU run against each CPU run of the same compute dtype, the largest per-step loss
difference. The dropout masks are the same on both devices (one seeded stream), so f32 runs
should agree to rounding; bf16 runs to bf16's.
"""

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
DEFAULT_CPU = sorted((ROOT / "crates" / "bench" / "results").glob("finetune-lee320-cpu-*.jsonl"))


def runs_of(path, name=None):
    runs = {}
    for line in Path(path).read_text().splitlines():
        if not line.startswith("{"):
            continue
        row = json.loads(line)
        runs.setdefault(row.get("run", name or Path(path).stem), []).append(row)
    return runs


def summary(name, rows):
    losses = [r["loss"] for r in rows if "loss" in r]
    tenth = max(1, len(losses) // 10)
    means = [sum(losses[i:i + tenth]) / len(losses[i:i + tenth]) for i in range(0, len(losses), tenth)]
    evals = [(r["step"], round(r["eval"]["spearman"], 3)) for r in rows if "eval" in r]
    print(f"{name}: {len(losses)} steps; mean loss by tenth: {' '.join(f'{m:.4f}' for m in means)}; "
          f"Spearman at evaluations: {evals}")
    return losses


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("visit", type=Path)
    parser.add_argument("--cpu", type=Path, nargs="*", default=DEFAULT_CPU)
    args = parser.parse_args()
    gpu = {name: summary(name, rows) for name, rows in runs_of(args.visit).items()}
    cpu = {}
    for path in args.cpu:
        for name, rows in runs_of(path).items():
            cpu[name] = summary(name, rows)
    for g_name, g_losses in gpu.items():
        for c_name, c_losses in cpu.items():
            if g_name.split("-")[-1] != c_name.split("-")[-1]:
                continue
            n = min(len(g_losses), len(c_losses))
            worst = max(abs(a - b) for a, b in zip(g_losses[:n], c_losses[:n])) if n else float("nan")
            print(f"{g_name} vs {c_name}: {n} steps, max |loss difference| {worst:.2e}")


if __name__ == "__main__":
    main()
