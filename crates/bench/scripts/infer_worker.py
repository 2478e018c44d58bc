#!/usr/bin/env python3
"""One inference measurement of a Python peer, in its own process (so that its peak RSS is its
own): BERT's forward pass, token ids to last hidden states, on the benchmark batch that
`bert-bench infer` builds with the same formula.

    python crates/bench/scripts/infer_worker.py --impl torch-eager|torch-sdpa|ort-default|ort-bert \
        --model DIR [--onnx FILE] --batch 8 --seq 128 --threads 2 --warmup 2 --runs 10

torch-*: transformers' BertModel under torch.inference_mode, eager or SDPA attention.
ort-*: an ONNX Runtime session on FILE (compare_inference.py exports it from the same weights;
ort-bert gets the file its BERT graph optimizer wrote). Imports only what the peer needs: an ORT
worker never loads torch. Prints one JSON line with the schema of `bert-bench infer`.
"""

import argparse
import json
import os
import resource
import statistics
import time


def benchmark_ids(batch, seq):
    """[CLS] word pieces [SEP], every position a real token: crates/bench/src/main.rs's formula."""
    return [[101 if j == 0 else 102 if j == seq - 1 else 1000 + (i * 131 + j * 7919) % 28000 for j in range(seq)]
            for i in range(batch)]


def torch_forward(args):
    import torch
    from transformers import BertModel

    torch.set_num_threads(args.threads)
    attn = args.impl.removeprefix("torch-")
    model = BertModel.from_pretrained(args.model, attn_implementation=attn).eval()
    ids = torch.tensor(benchmark_ids(args.batch, args.seq))
    mask, types = torch.ones_like(ids), torch.zeros_like(ids)

    def forward():
        with torch.inference_mode():
            return model(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state.numpy()

    return forward, {"torch": torch.__version__}


def ort_forward(args):
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(args.onnx, options, providers=["CPUExecutionProvider"])
    ids = np.array(benchmark_ids(args.batch, args.seq), dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    names = {i.name for i in session.get_inputs()}
    feeds = {k: v for k, v in feeds.items() if k in names}

    def forward():
        return session.run(["last_hidden_state"], feeds)[0]

    return forward, {"onnxruntime": ort.__version__}


def peak_rss_mb():
    """This process's peak resident set. VmHWM, not ru_maxrss: Linux carries ru_maxrss across
    execve, so a worker started by a parent that had loaded torch would report the parent's."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--impl", required=True, choices=["torch-eager", "torch-sdpa", "ort-default", "ort-bert"])
    p.add_argument("--model", required=True)
    p.add_argument("--onnx")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--runs", type=int, default=10)
    args = p.parse_args()
    if args.impl.startswith("ort-") and not args.onnx:
        p.error("ort-* needs --onnx")
    start = time.perf_counter()
    forward, versions = (torch_forward if args.impl.startswith("torch-") else ort_forward)(args)
    load_s = time.perf_counter() - start
    times = []
    for run in range(args.warmup + args.runs):
        t0 = time.perf_counter()
        hidden = forward()
        if run >= args.warmup:
            times.append(time.perf_counter() - t0)
    median_s = statistics.median(times)
    print(json.dumps({
        "impl": args.impl, "bench": "infer", "batch": args.batch, "seq": args.seq, "threads": args.threads,
        "load_s": load_s, "runs_s": times, "median_s": median_s, "seq_per_s": args.batch / median_s,
        "first_token": [float(x) for x in hidden[0, 0, :8]], "mean_abs": float(abs(hidden).mean()),
        "peak_rss_mb": peak_rss_mb(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), **versions,
    }))


if __name__ == "__main__":
    main()
