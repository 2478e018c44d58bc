#!/usr/bin/env python3
"""Reference optimisation trajectory for the fine-tuning harness, from PyTorch.

The tiny cross-encoder (tests/fixtures/tiny-cross-encoder) with dropout off trains for a few
steps on fixed batches with the harness's recipe written out in PyTorch: BCE-with-logits,
gradient clipping at global norm 1.0, AdamW (weight decay 0.01 except biases and LayerNorm
weights) on transformers' linear warm-up/decay schedule. The loss of every step, and every
parameter after the last step, go to tests/fixtures/tiny-cross-encoder/trajectory.safetensors.

    .venv/bin/python tests/scripts/generate_training_fixture.py
"""

from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import BertForSequenceClassification, PreTrainedTokenizerFast, get_linear_schedule_with_warmup

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "tests/fixtures/tiny-cross-encoder"
WORDS = ["the", "a", "man", "woman", "is", "playing", "guitar", "someone", "an", "instrument", "slicing", "onion"]
STEPS, BATCH, LR, WARMUP = 6, 4, 1e-3, 1


def main():
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(MODEL, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model.train()
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(MODEL / "tokenizer.json"), pad_token="[PAD]")
    texts_a, texts_b, labels = [], [], []
    for i in range(STEPS * BATCH):
        pick = lambda k: WORDS[(i * 7 + k * 5) % len(WORDS)]
        a = f"{pick(1)} {pick(2)} {pick(i % 3 + 3)}"
        texts_a.append(a)
        texts_b.append(a if i % 2 == 0 else f"{pick(4)} {pick(6)}")
        labels.append(0.9 if i % 2 == 0 else 0.1 + 0.05 * (i % 4))
    no_decay = ("bias", "LayerNorm.weight")
    groups = [
        {"params": [p for n, p in model.named_parameters() if not any(k in n for k in no_decay)], "weight_decay": 0.01},
        {"params": [p for n, p in model.named_parameters() if any(k in n for k in no_decay)], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.999), eps=1e-8)
    scheduler = get_linear_schedule_with_warmup(optimizer, WARMUP, STEPS)
    tensors = {}
    losses = []
    for step in range(STEPS):
        sl = slice(step * BATCH, (step + 1) * BATCH)
        batch = tokenizer(texts_a[sl], texts_b[sl], padding=True, return_token_type_ids=True, return_tensors="pt")
        for key in ("input_ids", "attention_mask", "token_type_ids"):
            tensors[f"step{step}.{key}"] = batch[key].to(torch.int64)
        tensors[f"step{step}.labels"] = torch.tensor(labels[sl])
        logits = model(**batch).logits.squeeze(-1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.tensor(labels[sl]))
        losses.append(loss.item())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    tensors["losses"] = torch.tensor(losses, dtype=torch.float64)
    for name, param in model.named_parameters():
        tensors[f"final.{name}"] = param.detach().clone()
    save_file({k: v.contiguous() for k, v in tensors.items()}, MODEL / "trajectory.safetensors")
    print("losses", losses)


if __name__ == "__main__":
    main()
