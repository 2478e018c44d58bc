#!/usr/bin/env python3
"""Ours against sentence-transformers' CrossEncoder.fit over seeds of the five-fold Lee comparison.

Reads, for each seed, a run_lee_two_stage.sh run that ran both sides (SIDES=both), or its record
folder (collect_kfold_run.sh): kfold.json (lee_metrics.py kfold) for accuracy, foldK/{ours,pytorch}.json
for each fold's stage-2 training speed (both sides one after the other in that fold), and
stage1/{ours,pytorch}.json for stage 1's. Prints a markdown table, one row per seed and the mean of
the seeds, then the differences and the speeds. Standard library only (CI has no numpy).

Usage: compare_sides.py SEED=DIR [SEED=DIR ...]
"""
import json
import statistics
import sys
from pathlib import Path

from lee_metrics import MODELS  # the names kfold.json reports each model under

NAME_OF_SCORES = dict(MODELS)
OURS = NAME_OF_SCORES["ours_scores.jsonl"]
PYTORCH = NAME_OF_SCORES["pytorch_scores.jsonl"]
BI = NAME_OF_SCORES["bi_scores.jsonl"]
SUMMARIES = ("mean_spearman", "pooled_spearman", "mean_pearson", "pooled_pearson")


def load(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        sys.exit(f"{path}: {e}")


def read_run(run):
    models = load(run / "kfold.json")["models"]
    for name in (OURS, PYTORCH, BI):
        if name not in models:
            sys.exit(f"{run}/kfold.json: no '{name}' (did both sides run?)")
    folds = sorted(p for p in run.glob("fold*") if p.is_dir())
    if not folds:
        sys.exit(f"{run}: no fold directories")
    stage2 = []
    for fold in folds:
        ours, pytorch = load(fold / "ours.json"), load(fold / "pytorch.json")
        stage2.append((fold.name, ours["pairs_per_s"], pytorch["pairs_per_s"]))
    stage1 = {}
    for side in ("ours", "pytorch"):
        path = run / "stage1" / f"{side}.json"
        if path.exists():
            stage1[side] = load(path)["pairs_per_s"]
    return {"models": models, "stage2": stage2, "stage1": stage1}


def summary(model):
    return tuple(model[k] for k in SUMMARIES)


def fmt(values, sign=""):
    """The four summaries as two table cells; sign="+" for differences."""
    s_mean, s_pooled, p_mean, p_pooled = (f"{v:{sign}.3f}" for v in values)
    return f"{s_mean} / {s_pooled} | {p_mean} / {p_pooled}"


def main(argv):
    if not argv or any("=" not in a for a in argv):
        sys.exit(__doc__)
    runs = {}
    for arg in argv:
        seed, _, path = arg.partition("=")
        runs[seed] = read_run(Path(path))

    print("Spearman: mean of folds / pooled | Pearson: mean of folds / pooled\n")
    names = ("bi-encoder", "ours", "`CrossEncoder.fit`", "ours - `CrossEncoder.fit`")
    print("| seed | " + " | ".join(f"{n}: Spearman | {n}: Pearson" for n in names) + " |")
    print("|---" * (1 + 2 * len(names)) + "|")
    rows = {name: [] for name in (BI, OURS, PYTORCH)}
    for seed, run in runs.items():
        values = {name: summary(run["models"][name]) for name in rows}
        for name in rows:
            rows[name].append(values[name])
        diff = tuple(o - p for o, p in zip(values[OURS], values[PYTORCH]))
        print(f"| {seed} | {fmt(values[BI])} | {fmt(values[OURS])} | {fmt(values[PYTORCH])} | {fmt(diff, '+')} |")
    if len(runs) > 1:
        means = {name: tuple(statistics.mean(col) for col in zip(*vals)) for name, vals in rows.items()}
        diff = tuple(o - p for o, p in zip(means[OURS], means[PYTORCH]))
        print(f"| mean of {len(runs)} | {fmt(means[BI])} | {fmt(means[OURS])} | {fmt(means[PYTORCH])} | {fmt(diff, '+')} |")

    print("\nPer fold, Spearman / Pearson, ours - `CrossEncoder.fit`:\n")
    for seed, run in runs.items():
        ours = run["models"][OURS]["per_fold"]
        pytorch = run["models"][PYTORCH]["per_fold"]
        cells = []
        for o, p in zip(ours, pytorch):
            if o["fold"] != p["fold"]:
                sys.exit(f"seed {seed}: folds out of step ({o['fold']} against {p['fold']})")
            cells.append(f"{o['fold']} {o['spearman'] - p['spearman']:+.3f} / {o['pearson'] - p['pearson']:+.3f}")
        print(f"- seed {seed}: " + ", ".join(cells))

    print("\nTraining speed, pairs/s (stage 2: both sides in each fold, one after the other):\n")
    print("| seed | stage 2 ours | stage 2 `CrossEncoder.fit` | ratio per fold | stage 1 ours | stage 1 `CrossEncoder.fit` |")
    print("|---|---|---|---|---|---|")
    for seed, run in runs.items():
        ours = [o for _, o, _ in run["stage2"]]
        pytorch = [p for _, _, p in run["stage2"]]
        ratios = ", ".join(f"{o / p:.2f}" for _, o, p in run["stage2"])
        s1 = run["stage1"]
        s1_ours = f"{s1['ours']:.2f}" if "ours" in s1 else "-"
        s1_pytorch = f"{s1['pytorch']:.2f}" if "pytorch" in s1 else "-"
        print(f"| {seed} | {min(ours):.2f}-{max(ours):.2f} | {min(pytorch):.2f}-{max(pytorch):.2f} | {ratios} | {s1_ours} | {s1_pytorch} |")


if __name__ == "__main__":
    main(sys.argv[1:])
