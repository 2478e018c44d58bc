#!/usr/bin/env python3
"""The PyTorch reference of the Lee fine-tuning comparison: sentence-transformers'
CrossEncoder.fit with the same recipe and split as `bert finetune`, on this machine's CPU.

    python tests/scripts/lee/crossencoder_fit.py --model MODEL_DIR --train train.tsv [--test test.tsv] \
        [--epochs 4 --batch-size 16 --lr 2e-5 --warmup-ratio 0.1 --seed 42 --max-length 256] [--save DIR]

Prints one JSON line: test Pearson and Spearman of the predicted probabilities (with --test),
training time and throughput (pairs/s over the fit call, evaluation excluded). --save writes the
trained cross-encoder (HF layout) for a later stage to start from; --epochs 0 only scores --test
with the model as loaded. Needs torch, transformers,
sentence-transformers and datasets (tests/scripts/requirements-lee.txt); never run by CI.
"""

import argparse
import csv
import json
import math
import time

import torch
from scipy.stats import pearsonr, spearmanr
from sentence_transformers import CrossEncoder, InputExample
from torch.utils.data import DataLoader


def read(path):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [(r["text_a"], r["text_b"], float(r["label"])) for r in rows]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--train", required=True)
    p.add_argument("--test")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--warmup-ratio", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--predictions", help="also write each test pair's score, one JSON line per pair")
    p.add_argument("--save", help="write the trained model to this directory")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train = read(args.train)
    test = read(args.test) if args.test else []
    model = CrossEncoder(args.model, num_labels=1, max_length=args.max_length, device="cpu")
    examples = [InputExample(texts=[a, b], label=y) for a, b, y in train]
    loader = DataLoader(examples, shuffle=True, batch_size=args.batch_size)
    steps = math.ceil(len(examples) / args.batch_size) * args.epochs
    start = time.perf_counter()
    # --epochs 0: no training, the model is scored as loaded (an earlier stage's checkpoint).
    if args.epochs > 0:
        model.fit(
            train_dataloader=loader,
            epochs=args.epochs,
            warmup_steps=math.ceil(steps * args.warmup_ratio),
            optimizer_params={"lr": args.lr},
            weight_decay=0.01,
            max_grad_norm=1.0,
            show_progress_bar=False,
        )
    seconds = time.perf_counter() - start
    if args.save:
        model.save(args.save)
    metrics = {}
    if test:
        scores = model.predict([(a, b) for a, b, _ in test], batch_size=32, show_progress_bar=False)
        labels = [y for _, _, y in test]
        if args.predictions:
            with open(args.predictions, "w") as f:
                f.writelines(json.dumps({"score": float(s)}) + "\n" for s in scores)
        metrics = {
            "pearson": float(pearsonr(scores, labels)[0]),
            "spearman": float(spearmanr(scores, labels)[0]),
        }
    print(json.dumps({
        "implementation": "sentence-transformers CrossEncoder.fit",
        "test_pairs": len(test),
        **metrics,
        "train_seconds": seconds,
        "pairs_per_s": len(examples) * args.epochs / seconds if args.epochs else None,
        "torch": torch.__version__,
        "threads": args.threads,
        **{k: v for k, v in vars(args).items() if k not in ("train", "test", "predictions", "save")},
    }))


if __name__ == "__main__":
    main()
