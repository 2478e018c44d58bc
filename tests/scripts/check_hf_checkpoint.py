#!/usr/bin/env python3
"""Scripted check: a checkpoint written by `bert finetune` loads in HF transformers
(`BertForSequenceClassification.from_pretrained`) and gives the logits `bert` gives, within 1e-4.
With `--lora R`, the run trains LoRA adapters and the check loads them with PEFT
(`PeftModel.from_pretrained` on the base) instead. With `--adapter DIR --base BASE_DIR`, nothing is
trained: an adapter already written (a bundled model, or one from tests/scripts/lee/extract_lora.py)
is loaded with PEFT on BASE_DIR and compared with `bert score --model DIR`.

    .venv/bin/python tests/scripts/check_hf_checkpoint.py [--model tests/fixtures/tiny-cross-encoder] [--lora 4]
    .venv/bin/python tests/scripts/check_hf_checkpoint.py --adapter models/minilm-lee-cross-encoder --base MINILM_DIR

It fine-tunes MODEL for a few steps on generated pairs with the CLI (`cargo run -p bert-cli`),
loads the result with transformers, and compares logits on pairs the model has not seen
(ours: the CLI's probabilities turned back into logits). Exits non-zero on any mismatch.
"""

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import BertForSequenceClassification, PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parents[2]
WORDS = ["the", "a", "man", "woman", "is", "playing", "guitar", "someone", "an", "instrument", "slicing", "onion"]


def pairs(n, salt):
    rows = []
    for i in range(n):
        pick = lambda k: WORDS[(i * 7 + k * 5 + salt) % len(WORDS)]
        a = f"{pick(1)} {pick(2)} {pick(i % 3 + 3)}"
        b = a if i % 2 == 0 else f"{pick(4)} {pick(6)}"
        rows.append((a, b, 1 if i % 2 == 0 else 0))
    return rows


def bert(*args):
    return subprocess.run(["cargo", "run", "-q", "-p", "bert-cli", "--", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=str(ROOT / "tests/fixtures/tiny-cross-encoder"))
    parser.add_argument("--tolerance", type=float, default=1e-4)
    parser.add_argument("--lora", type=int, help="train LoRA adapters of this rank and load them with PEFT")
    parser.add_argument("--adapter", type=Path, help="check this adapter directory instead of training one")
    parser.add_argument("--base", type=Path, help="with --adapter: the base model directory PEFT loads it on")
    args = parser.parse_args()
    if args.adapter and not args.base:
        parser.error("--adapter needs --base")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with open(tmp / "train.tsv", "w") as f:
            f.write("text_a\ttext_b\tlabel\n" + "".join(f"{a}\t{b}\t{y}\n" for a, b, y in pairs(32, 0)))
        out = args.adapter or tmp / "out"
        if not args.adapter:
            bert("finetune", "--model", args.model, "--train", str(tmp / "train.tsv"), "--out", str(out),
                 "--epochs", "2", "--batch-size", "8", "--lr", "1e-3", "--device", "cpu",
                 *(["--lora", str(args.lora), "--lora-alpha", str(2 * args.lora), "--lora-dropout", "0.1"] if args.lora else []))
        test = pairs(12, 5)
        with open(tmp / "test.jsonl", "w") as f:
            f.write("".join(json.dumps({"text_a": a, "text_b": b}) + "\n" for a, b, _ in test))
        ours = [json.loads(line)["score"] for line in bert("score", "--model", str(out), "--device", "cpu", "--input", str(tmp / "test.jsonl")).splitlines()]
        ours = [math.log(p / (1 - p)) for p in ours]

        if args.lora or args.adapter:
            from peft import PeftModel

            adapter = json.loads((out / "adapter_config.json").read_text())
            base_dir = args.base or adapter["base_model_name_or_path"]
            base = BertForSequenceClassification.from_pretrained(base_dir, num_labels=1)
            model = PeftModel.from_pretrained(base, out).eval()
        else:
            base_dir = out
            model = BertForSequenceClassification.from_pretrained(out).eval()
        tokenizer_file = out / "tokenizer.json"
        if not tokenizer_file.exists():
            tokenizer_file = Path(base_dir) / "tokenizer.json"
        tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file), pad_token="[PAD]")
        # A bare fast tokenizer leaves token_type_ids out unless asked; BERT needs the segments.
        batch = tokenizer(
            [a for a, _, _ in test], [b for _, b, _ in test], padding=True, return_token_type_ids=True, return_tensors="pt"
        )
        with torch.no_grad():
            theirs = model(**batch).logits.squeeze(-1).tolist()
    worst = max(abs(a - b) for a, b in zip(ours, theirs))
    print(json.dumps({"model": str(args.adapter or args.model), "lora": args.lora, "pairs": len(test), "max_abs_logit_diff": worst, "tolerance": args.tolerance}))
    if worst > args.tolerance:
        sys.exit(f"logits differ by {worst} > {args.tolerance}")


if __name__ == "__main__":
    main()
