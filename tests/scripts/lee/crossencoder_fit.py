#!/usr/bin/env python3
"""The PyTorch reference of the Lee fine-tuning comparison: sentence-transformers'
CrossEncoder.fit with the same recipe and split as `bert finetune`, on this machine's CPU.

    python tests/scripts/lee/crossencoder_fit.py --model MODEL_DIR --train train.tsv [--test test.tsv] \
        [--epochs 4 --batch-size 16 --lr 2e-5 --warmup-ratio 0.1 --seed 42 --max-length 256] [--save DIR] \
        [--save-steps N --checkpoints DIR]

Prints one JSON line: test Pearson and Spearman of the predicted probabilities (with --test),
training time and throughput (pairs/s over the fit call, evaluation excluded). --save writes the
trained cross-encoder (HF layout) for a later stage to start from; --epochs 0 only scores --test
with the model as loaded. --save-steps N --checkpoints DIR make a long fit survive an interrupted
session: fit's own trainer writes its state (model, optimiser, scheduler, RNG, step) to DIR every N
steps, and a rerun with the same arguments resumes from the latest one there. Everything else is
CrossEncoder.fit's own code path: only the TrainingArguments it builds get the folder (a temporary
one without --checkpoints) and the save settings, and its trainer.train() call the checkpoint to
resume from. Needs torch, transformers,
sentence-transformers and datasets (tests/scripts/lee/requirements-lee.txt); never run by CI.
"""

import argparse
import contextlib
import csv
import json
import math
import os
import re
import sys
import tempfile
import time

import torch
from scipy.stats import pearsonr, spearmanr
import sentence_transformers.cross_encoder.fit_mixin as fit_mixin
from sentence_transformers import CrossEncoder, InputExample
from sentence_transformers.cross_encoder.trainer import CrossEncoderTrainer
from torch.utils.data import DataLoader


def read(path):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [(r["text_a"], r["text_b"], float(r["label"])) for r in rows]


def latest_checkpoint(folder):
    """The newest `checkpoint-STEP` folder the trainer wrote in `folder`, or None."""
    if not os.path.isdir(folder):
        return None
    steps = [int(m.group(1)) for name in os.listdir(folder) if (m := re.fullmatch(r"checkpoint-(\d+)", name))]
    return os.path.join(folder, f"checkpoint-{max(steps)}") if steps else None


def direct_fit(folder, save_steps, run):
    """Points CrossEncoder.fit's trainer at `folder` (fit's own default is `checkpoints/model` in
    the working directory, which it creates even when it saves nothing). With `save_steps`, the
    trainer also checkpoints every `save_steps` steps there and resumes from the newest checkpoint;
    `run` then records its first and last step of this call."""
    make_args = fit_mixin.CrossEncoderTrainingArguments
    train = CrossEncoderTrainer.train

    def args_in_folder(**kwargs):
        kwargs.update(output_dir=folder)
        if save_steps:
            kwargs.update(save_strategy="steps", save_steps=save_steps, save_total_limit=1)
        return make_args(**kwargs)

    fit_mixin.CrossEncoderTrainingArguments = args_in_folder
    if not save_steps:
        return

    def train_resuming(trainer, *args, **kwargs):
        resume = latest_checkpoint(folder)
        run["resumed_from_step"] = int(resume.rsplit("-", 1)[1]) if resume else 0
        result = train(trainer, *args, resume_from_checkpoint=resume, **kwargs)
        run["last_step"] = trainer.state.global_step
        return result

    # fit imports the trainer class inside the call, so the class itself is patched.
    CrossEncoderTrainer.train = train_resuming


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
    p.add_argument("--save-steps", type=int, help="checkpoint the training state every N steps (with --checkpoints)")
    p.add_argument("--checkpoints", help="folder of the training-state checkpoints; a rerun resumes from the newest")
    args = p.parse_args()
    if (args.save_steps is None) != (args.checkpoints is None):
        p.error("--save-steps and --checkpoints go together")
    if args.save_steps is not None and args.save_steps < 1:
        p.error("--save-steps must be at least 1")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train = read(args.train)
    test = read(args.test) if args.test else []
    model = CrossEncoder(args.model, num_labels=1, max_length=args.max_length, device="cpu")
    examples = [InputExample(texts=[a, b], label=y) for a, b, y in train]
    loader = DataLoader(examples, shuffle=True, batch_size=args.batch_size)
    steps = math.ceil(len(examples) / args.batch_size) * args.epochs
    run = {}
    scratch = tempfile.TemporaryDirectory(prefix="crossencoder-fit-")
    direct_fit(args.checkpoints or scratch.name, args.save_steps, run)
    start = time.perf_counter()
    # --epochs 0: no training, the model is scored as loaded (an earlier stage's checkpoint).
    if args.epochs > 0:
        # The trainer prints its summary to stdout; stdout is kept for this script's JSON line.
        with contextlib.redirect_stdout(sys.stderr):
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
    # Only this call's steps were timed: a resumed fit counts the pairs after its checkpoint.
    steps_per_epoch = math.ceil(len(examples) / args.batch_size)
    done = run.get("resumed_from_step", 0)
    pairs_before = (done // steps_per_epoch) * len(examples) + min((done % steps_per_epoch) * args.batch_size, len(examples))
    trained_pairs = len(examples) * args.epochs - pairs_before
    print(json.dumps({
        "implementation": "sentence-transformers CrossEncoder.fit",
        "test_pairs": len(test),
        **metrics,
        "train_seconds": seconds,
        "pairs_per_s": trained_pairs / seconds if args.epochs else None,
        **run,
        "torch": torch.__version__,
        "threads": args.threads,
        **{k: v for k, v in vars(args).items() if k not in ("train", "test", "predictions", "save", "checkpoints")},
    }))


if __name__ == "__main__":
    main()
