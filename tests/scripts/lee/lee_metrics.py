#!/usr/bin/env python3
"""Correlations of Lee test scores with the human ratings, per split and pooled over k folds.

    python3 tests/scripts/lee/lee_metrics.py pair TEST_TSV SCORES_JSONL NAME [REFERENCE_JSONL]
        one JSON line: Pearson and Spearman of one model's scores (one {"score": x} line per row);
        with REFERENCE_JSONL also the Spearman between the model's scores and those (a student's
        agreement with its teacher)
    python3 tests/scripts/lee/lee_metrics.py kfold OUT_DIR [--markdown]
        reads OUT_DIR/fold*/ (tests/scripts/lee/run_lee_kfold.sh) and prints, per model, each fold's
        Spearman and Pearson, their mean and standard deviation over folds, and the correlations of
        all held-out pairs pooled (every pair is scored by the model that did not see its documents);
        as JSON, or with --markdown as the table of the model card

Standard library only (CI's python3 has no scipy). Spearman is Pearson of average ranks (ties
share their mean rank), as scipy.stats.spearmanr computes it.
"""

import csv
import json
import statistics
import sys
from pathlib import Path

# (file of per-pair scores in a run directory, the name reported)
MODELS = (
    ("bi_scores.jsonl", "zero-shot bi-encoder (cosine of mean-pooled all-MiniLM-L6-v2)"),
    ("pytorch_scores.jsonl", "sentence-transformers CrossEncoder.fit"),
    ("ours_scores.jsonl", "bert finetune (ours)"),
    # run_lee_two_stage.sh's first stage alone, scored by score_stage1.sh (when present)
    ("stage1_pytorch_scores.jsonl", "CrossEncoder.fit, distillation stage only"),
    ("stage1_ours_scores.jsonl", "bert finetune (ours), distillation stage only"),
)


def ranks(values):
    order = sorted(range(len(values)), key=lambda i: values[i])
    result = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in order[i:j + 1]:
            result[k] = (i + j) / 2 + 1
        i = j + 1
    return result


def pearson(x, y):
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    return sxy / (sxx * syy) ** 0.5


def spearman(x, y):
    return pearson(ranks(x), ranks(y))


def labels(test_tsv):
    with open(test_tsv, newline="") as f:
        return [float(r["label"]) for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]


def scores(path):
    with open(path) as f:
        return [json.loads(line)["score"] for line in f if line.strip()]


def checked(test_tsv, scores_path):
    y, s = labels(test_tsv), scores(scores_path)
    if len(y) != len(s):
        sys.exit(f"{scores_path}: {len(s)} scores for {len(y)} pairs of {test_tsv}")
    return y, s


def pair(test_tsv, scores_path, name, reference_path=None):
    y, s = checked(test_tsv, scores_path)
    result = {"implementation": name, "test_pairs": len(y), "pearson": pearson(s, y), "spearman": spearman(s, y)}
    if reference_path is not None:
        _, r = checked(test_tsv, reference_path)
        result["spearman_vs_reference"] = spearman(s, r)
    print(json.dumps(result))


def kfold(out, markdown=False):
    folds = sorted(p for p in Path(out).glob("fold*") if p.is_dir())
    if not folds:
        sys.exit(f"no fold*/ directories in {out}")
    summary = {"folds": [p.name for p in folds], "models": {}}
    for file, name in MODELS:
        runs = [p for p in folds if (p / file).exists()]
        if not runs:
            continue
        per_fold, all_y, all_s = [], [], []
        for run in runs:
            y, s = checked(run / "data/test.tsv", run / file)
            per_fold.append({"fold": run.name, "pairs": len(y), "spearman": spearman(s, y), "pearson": pearson(s, y)})
            all_y += y
            all_s += s
        sp = [f["spearman"] for f in per_fold]
        pe = [f["pearson"] for f in per_fold]
        summary["models"][name] = {
            "per_fold": per_fold,
            "mean_spearman": statistics.fmean(sp),
            "sd_spearman": statistics.stdev(sp) if len(sp) > 1 else None,
            "mean_pearson": statistics.fmean(pe),
            "pooled_pairs": len(all_y),
            "pooled_spearman": spearman(all_s, all_y),
            "pooled_pearson": pearson(all_s, all_y),
        }
    if not markdown:
        print(json.dumps(summary, indent=2))
        return
    folds = summary["folds"]
    print("| model | " + " | ".join(f"{f} Spearman / Pearson" for f in folds)
          + " | mean Spearman (sd) | mean Pearson | pooled Spearman / Pearson |")
    print("|---" * (len(folds) + 4) + "|")
    for name, m in summary["models"].items():
        cells = {f["fold"]: f"{f['spearman']:.3f} / {f['pearson']:.3f}" for f in m["per_fold"]}
        sd = f" ({m['sd_spearman']:.3f})" if m["sd_spearman"] is not None else ""
        print(f"| {name} | " + " | ".join(cells.get(f, "-") for f in folds)
              + f" | {m['mean_spearman']:.3f}{sd} | {m['mean_pearson']:.3f}"
              + f" | {m['pooled_spearman']:.3f} / {m['pooled_pearson']:.3f} ({m['pooled_pairs']} pairs) |")


if __name__ == "__main__":
    if len(sys.argv) in (5, 6) and sys.argv[1] == "pair":
        pair(*sys.argv[2:])
    elif len(sys.argv) in (3, 4) and sys.argv[1] == "kfold" and sys.argv[3:] in ([], ["--markdown"]):
        kfold(sys.argv[2], markdown=len(sys.argv) == 4)
    else:
        sys.exit(__doc__)
