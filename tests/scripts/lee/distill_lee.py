#!/usr/bin/env python3
"""Teacher-labelled pairs from the unlabelled Lee background corpus (distillation data).

The teacher is the zero-shot bi-encoder (cosine of mean-pooled all-MiniLM-L6-v2 embeddings). With
--train-scores, its cosines are put on the human rating scale by a least-squares line fitted on the
*training* pairs only (human label against teacher cosine), clipped to [0, 1]; without it no Lee
label is read at all and the label is the cosine clipped to [0, 1] (a fold-independent stage that
is fine-tuned on each fold's training pairs afterwards: run_lee_two_stage.sh). By default pairs are
drawn so that every band of teacher cosine is represented: the background's pairs are mostly
unrelated news, and a uniform draw would teach little but "dissimilar". `--draw natural` draws
them uniformly instead, so the teacher's cosines fall as they do between Lee's own documents
(most pairs unrelated: half of Lee's 1225 pairs are below 0.08), where the ranking is scored.

    python3 tests/scripts/lee/distill_lee.py DATA_DIR --embeddings background.jsonl \
        [--train-scores train_bi.jsonl] [--pairs 1200 --bands 10 --draw bands --seed 0]

Reads DATA_DIR/background.txt and DATA_DIR/train.tsv (from prepare_lee.py), the teacher's
embeddings of the background documents (`bert embed --normalize --input background.txt`, one JSON
line per document) and its scores of the training pairs (`bert score --mode bi --input train.tsv`).
Writes DATA_DIR/distill.tsv (the teacher-labelled pairs) and, with --train-scores,
DATA_DIR/train_distill.tsv (the training pairs followed by those), and prints the calibration and counts as one JSON line.
No test pair, test document or test label is read.
"""

import argparse
import csv
import json
import random
from pathlib import Path


def read_pairs(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def fit_line(x, y):
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxx = sum((a - mx) ** 2 for a in x)
    slope = sum((a - mx) * (b - my) for a, b in zip(x, y)) / sxx
    return slope, my - slope * mx


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", type=Path)
    p.add_argument("--embeddings", type=Path, required=True)
    p.add_argument("--train-scores", type=Path)
    p.add_argument("--pairs", type=int, default=1200)
    p.add_argument("--bands", type=int, default=10)
    p.add_argument("--draw", choices=("bands", "natural"), default="bands",
                   help="bands: equal shares of each band of teacher cosine; natural: uniform over all pairs")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    docs = [line.rstrip("\n") for line in open(args.data / "background.txt", encoding="utf-8")]
    vectors = [json.loads(line)["embedding"] for line in open(args.embeddings)]
    if len(vectors) != len(docs):
        raise SystemExit(f"{len(vectors)} embeddings for {len(docs)} background documents")

    if args.train_scores:
        train = read_pairs(args.data / "train.tsv")
        teacher = [json.loads(line)["score"] for line in open(args.train_scores)]
        if len(teacher) != len(train):
            raise SystemExit(f"{len(teacher)} teacher scores for {len(train)} training pairs")
        slope, intercept = fit_line(teacher, [float(r["label"]) for r in train])
        calibration = {"slope": slope, "intercept": intercept, "fitted_on": "train.tsv"}
    else:
        train, slope, intercept = [], 1.0, 0.0
        calibration = "none: the cosine clipped to [0, 1]"

    pairs = []
    for i in range(len(docs)):
        for j in range(i + 1, len(docs)):
            pairs.append((sum(a * b for a, b in zip(vectors[i], vectors[j])), i, j))
    lo, hi = min(c for c, _, _ in pairs), max(c for c, _, _ in pairs)
    width = (hi - lo) / args.bands
    bands = [[] for _ in range(args.bands)]
    for pair in pairs:
        bands[min(int((pair[0] - lo) / width), args.bands - 1)].append(pair)

    rng = random.Random(args.seed)
    if args.draw == "natural":
        chosen = rng.sample(pairs, min(args.pairs, len(pairs)))
    else:
        # Equal shares per band; what a sparse (high-cosine) band cannot fill goes to the others.
        chosen, budget = [], args.pairs
        for k, band in enumerate(sorted(bands, key=len)):
            share = budget // (args.bands - k)
            take = rng.sample(band, min(share, len(band)))
            chosen += take
            budget -= len(take)
        rng.shuffle(chosen)

    def label(cosine):
        return min(1.0, max(0.0, slope * cosine + intercept))

    header = "text_a\ttext_b\tlabel\n"
    distill_rows = [f"{docs[i]}\t{docs[j]}\t{label(c):.6f}\n" for c, i, j in chosen]
    (args.data / "distill.tsv").write_text(header + "".join(distill_rows))
    if args.train_scores:
        train_rows = [f"{r['text_a']}\t{r['text_b']}\t{r['label']}\n" for r in train]
        (args.data / "train_distill.tsv").write_text(header + "".join(train_rows + distill_rows))
    summary = {
        "teacher": "zero-shot bi-encoder (cosine of mean-pooled all-MiniLM-L6-v2)",
        "calibration": calibration,
        "background_documents": len(docs),
        "distill_pairs": len(chosen),
        "band_sizes": [len(b) for b in bands],
        "train_pairs": len(train),
        "seed": args.seed,
    }
    if args.draw == "natural":
        # (The banded draw's summary stays as it was, so earlier runs' distill.json still compare.)
        summary["draw"] = "natural"
        summary["drawn_per_band"] = [
            sum(min(int((c - lo) / width), args.bands - 1) == k for c, _, _ in chosen) for k in range(args.bands)
        ]
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
