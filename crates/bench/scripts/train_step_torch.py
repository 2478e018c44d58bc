#!/usr/bin/env python3
"""PyTorch's side of `bert-bench train-step`: one fine-tuning step of a one-label pair
classifier (forward in train mode, BCE-with-logits, backward, clip to norm 1.0, AdamW with the
decay groups), on a random batch of the same shape, with transformers' BertForSequenceClassification.
Prints one JSON line like bert-bench's.

    python train_step_torch.py --model DIR [--batch 16 --seq 128 --steps 10 --warmup 2 --threads 2]
        [--device cuda --autocast bf16]

On a GPU each phase is timed to the device's end (synchronised); --autocast runs the forward
and backward in bf16/f16 over f32 weights (torch.autocast), as `bert-bench train-step
--compute-dtype` does.
"""

import argparse
import json
import statistics
import time

import torch
import transformers
from transformers import BertForSequenceClassification


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--autocast", choices=["bf16", "f16"])
    a = p.parse_args()
    device = torch.device(a.device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    autocast_dtype = {"bf16": torch.bfloat16, "f16": torch.float16}.get(a.autocast)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(a.model, num_labels=1, attn_implementation=a.attn)
    model.to(device).train()
    vocab = model.config.vocab_size
    ids = torch.randint(1000, vocab, (a.batch, a.seq))
    ids[:, 0] = 101
    ids[:, a.seq // 2] = 102
    ids[:, -1] = 102
    types = (torch.arange(a.seq) > a.seq // 2).long().expand(a.batch, a.seq)
    mask = torch.ones(a.batch, a.seq, dtype=torch.long)
    labels = (torch.arange(a.batch) % 2).float()
    ids, types, mask, labels = (t.to(device) for t in (ids, types, mask, labels))
    no_decay = ("bias", "LayerNorm.weight")
    groups = [
        {"params": [p for n, p in model.named_parameters() if not any(k in n for k in no_decay)], "weight_decay": 0.01},
        {"params": [p for n, p in model.named_parameters() if any(k in n for k in no_decay)], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=2e-5)
    fwd, bwd, upd, tot = [], [], [], []
    for step in range(a.warmup + a.steps):
        sync()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(input_ids=ids, attention_mask=mask, token_type_ids=types).logits.squeeze(-1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), labels)
        loss.item()
        t1 = time.perf_counter()
        loss.backward()
        sync()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        t3 = time.perf_counter()
        if step >= a.warmup:
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
            upd.append(t3 - t2)
            tot.append(t3 - t0)
    step_s = statistics.median(tot)
    print(json.dumps({
        "impl": f"pytorch-{a.attn}", "bench": "train-step", "device": a.device, "autocast": a.autocast,
        "model": f"{model.config.num_hidden_layers}x{model.config.hidden_size}",
        "batch": a.batch, "seq": a.seq, "steps": a.steps, "threads": a.threads,
        "median_step_s": step_s, "median_forward_s": statistics.median(fwd),
        "median_backward_s": statistics.median(bwd), "median_update_s": statistics.median(upd),
        "pairs_per_s": a.batch / step_s, "torch": torch.__version__, "transformers": transformers.__version__,
    }))


if __name__ == "__main__":
    main()
