#!/usr/bin/env python3
"""Side-by-side GPU inference benchmark (issue #6): this project's `bert-bench infer --device
cuda` against PyTorch (transformers' BertModel with eager attention, with SDPA, and SDPA under
torch.compile), on the same card, in one invocation.

    python crates/bench/scripts/compare_gpu.py --bench /tmp/bert-bench --models DIR [DIR ...] \
        [--dtypes bf16,f16,f32] [--batches 1,32,128,512] [--seqs 128,512] \
        [--compile-cells bert-base-random:bf16:128x128] [--deadline-s 420] [--json OUT.json]

DIR: checkpoints written by tests/scripts/gpu/random_checkpoints.py (random weights with the
shapes of all-MiniLM-L6-v2 and bert-base; no real bert-base exists offline). Every batch has its
odd rows padded by a quarter (`bert-bench infer --padded`; the same ids and mask here). Ours runs
them padding-free (`--skip-padding`: the layers see the real tokens only; attention takes packed
rows where the fused GPU kernel does, else runs alone in the padded grid), as a user of this
library would; --padded-ours runs every position instead, and for the dtypes of --padded-too
(bf16 by default) ours also runs every position, so the table shows what skipping the padding
bought. transformers' BertModel has no padding-free path: PyTorch runs every
position. For each model and dtype, ours runs the whole grid in one process, then each PyTorch
variant in this one, every cell timed as the median of its runs after warm-up, each pass
synchronised with the device. The last hidden states of ours are compared with PyTorch eager's
(the first token's first 8 values and the mean |h| over real tokens) so every row is known to
compute the same thing.

Reported per cell: seq/s, real tokens/s, our ratio to each PyTorch variant, and the fraction of
the card's dense bf16 tensor peak that our pass reached (--peak-tflops, else by card name),
counting the matmul FLOPs of the real tokens only (the work the batch needs; padded positions
would flatter whoever computes them). f32 runs exact f32 on both sides (no TF32: PyTorch's and
candle's defaults). torch.compile compiles per shape, which
takes minutes a cell: it runs only in --compile-cells. Sections stop being started once
--deadline-s has passed (GPU time is lent in minutes), and what finished is written.

LD_LIBRARY_PATH for the bench binary comes from BERT_GPU_LIBS when set (tests/scripts/gpu/visit.sh
sets it from ../shared/gpu/run-on-gpu.sh). Needs torch and transformers; never run by CI.
"""

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import BertModel

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, from NVIDIA's data sheets.
PEAKS = {"H100 SXM": 989.4, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H200": 989.4}


def load_torch(model_dir, attention, dtype, device):
    # transformers 5 renamed torch_dtype to dtype.
    key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    model = BertModel.from_pretrained(model_dir, attn_implementation=attention, **{key: dtype})
    return model.to(device).eval()


def synchronize(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def benchmark_batch(batch, seq, padded):
    """`bert-bench`'s benchmark_batch: [CLS] pieces [SEP], odd rows ending at 3/4 when padded."""
    ids, mask = [], []
    for i in range(batch):
        length = seq - seq // 4 if padded and i % 2 == 1 else seq
        row = []
        for j in range(seq):
            if j == 0:
                row.append(101)
            elif j == length - 1:
                row.append(102)
            elif j >= length:
                row.append(0)
            else:
                row.append(1000 + (i * 131 + j * 7919) % 28000)
        ids.append(row)
        mask.append([int(j < length) for j in range(seq)])
    return torch.tensor(ids), torch.tensor(mask)


def forward_flops(config, lengths):
    """Matmul FLOPs of one encoder pass over sequences of `lengths` real tokens (no padding)."""
    h, i, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    tokens = sum(lengths)
    projections = 2 * tokens * (4 * h * h + 2 * h * i)
    attention = sum(4 * n * n * h for n in lengths)
    return layers * (projections + attention)


def card_peak(name, override):
    if override:
        return override
    for key, peak in PEAKS.items():
        if all(part in name for part in key.split()):
            return peak
    return None


def run_ours(args, model_dir, dtype, padded=None):
    env = dict(os.environ)
    if os.environ.get("BERT_GPU_LIBS"):
        env["LD_LIBRARY_PATH"] = os.environ["BERT_GPU_LIBS"]
    command = [
        args.bench, "infer", "--model", str(model_dir), "--device", args.device, "--dtype", dtype,
        "--batch", args.batches, "--seq", args.seqs, "--padded",
        "--warmup", str(args.warmup), "--runs", str(args.runs),
    ] + ([] if (args.padded_ours if padded is None else padded) else ["--skip-padding"])
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        print(done.stderr[-3000:], file=sys.stderr)
        return {"error": done.stderr[-2000:]}
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return {(r["batch"], r["seq"]): r for r in rows}


def time_torch(model, ids, mask, warmup, runs, device):
    types = torch.zeros_like(ids)
    times = []
    with torch.inference_mode():
        for run in range(warmup + runs):
            synchronize(device)
            start = time.perf_counter()
            out = model(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
            synchronize(device)
            if run >= warmup:
                times.append(time.perf_counter() - start)
    out = out.float()
    real = mask.unsqueeze(-1).to(out.dtype)
    mean_abs = ((out.abs() * real).sum() / (real.sum() * out.shape[-1])).item()
    return statistics.median(times), out[0, 0, :8].tolist(), mean_abs


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bench", required=True, help="the CUDA build of bert-bench")
    parser.add_argument("--models", nargs="+", required=True, type=Path)
    parser.add_argument("--dtypes", default="bf16,f16,f32")
    parser.add_argument("--batches", default="1,32,128,512")
    parser.add_argument("--seqs", default="128,512")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--compile-cells", default="bert-base-random:bf16:128x128",
                        help="MODEL:DTYPE:BxS list (comma-separated) where torch.compile also runs")
    parser.add_argument("--deadline-s", type=float, default=420.0)
    parser.add_argument("--peak-tflops", type=float)
    parser.add_argument("--padded-ours", action="store_true",
                        help="run ours over every position (no --skip-padding)")
    parser.add_argument("--padded-too", default="bf16",
                        help="dtypes (comma-separated) where ours also runs every position")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run of the script")
    args = parser.parse_args()

    started = time.time()
    torch.backends.cuda.matmul.allow_tf32 = False
    card = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{args.device} (dry run)"
    peak = card_peak(card, args.peak_tflops)
    compile_cells = set(filter(None, args.compile_cells.split(",")))
    batches = [int(b) for b in args.batches.split(",")]
    seqs = [int(s) for s in args.seqs.split(",")]
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "card": card, "peak_bf16_tflops": peak, "torch": torch.__version__,
        "cuda": torch.version.cuda, "command": sys.argv, "rows": [], "skipped": [],
    }

    def save():
        if args.json:
            args.json.write_text(json.dumps(report, indent=1) + "\n")

    for model_dir in args.models:
        config = json.loads((model_dir / "config.json").read_text())
        for dtype in args.dtypes.split(","):
            section = f"{model_dir.name} {dtype}"
            if time.time() - started > args.deadline_s:
                report["skipped"].append(section)
                continue
            ours = run_ours(args, model_dir, dtype)
            padded_too = set(filter(None, args.padded_too.split(",")))
            ours_padded = (run_ours(args, model_dir, dtype, padded=True)
                           if dtype in padded_too and not args.padded_ours else {})
            variants = {}
            for name, attention in [("torch-eager", "eager"), ("torch-sdpa", "sdpa")]:
                variants[name] = load_torch(model_dir, attention, DTYPES[dtype], args.device)
            for batch in batches:
                for seq in seqs:
                    ids, mask = benchmark_batch(batch, seq, padded=True)
                    ids, mask = ids.to(args.device), mask.to(args.device)
                    lengths = [int(n) for n in mask.sum(dim=1).tolist()]
                    row = {"model": model_dir.name, "dtype": dtype, "batch": batch, "seq": seq,
                           "real_tokens": sum(lengths), "flops": forward_flops(config, lengths),
                           "skip_padding": not args.padded_ours}
                    mine = ours.get((batch, seq)) if "error" not in ours else None
                    row["bert-rs"] = mine["median_s"] if mine else None
                    mine_padded = ours_padded.get((batch, seq)) if "error" not in ours_padded else None
                    if mine_padded:
                        row["bert-rs-every-position"] = mine_padded["median_s"]
                        if mine:
                            row["padding-free-gain"] = mine_padded["median_s"] / mine["median_s"]
                    for name, model in variants.items():
                        try:
                            row[name], first, mean_abs = time_torch(model, ids, mask, args.warmup, args.runs, args.device)
                        except torch.OutOfMemoryError:
                            row[name] = None
                            if torch.cuda.is_available():
                                torch.cuda.empty_cache()
                            continue
                        if name == "torch-eager" and mine:
                            row["first_token_max_diff"] = max(abs(a - b) for a, b in zip(first, mine["first_token"]))
                            row["mean_abs"] = [mine["mean_abs"], mean_abs]
                    if f"{model_dir.name}:{dtype}:{batch}x{seq}" in compile_cells:
                        compiled = torch.compile(variants["torch-sdpa"])
                        compile_start = time.time()
                        time_torch(compiled, ids, mask, 0, 1, args.device)
                        row["torch-compile-build-s"] = time.time() - compile_start
                        row["torch-compile"], _, _ = time_torch(compiled, ids, mask, args.warmup, args.runs, args.device)
                    for name in ["bert-rs", "torch-eager", "torch-sdpa", "torch-compile"]:
                        if row.get(name):
                            row[f"{name}-seq/s"] = batch / row[name]
                    if row["bert-rs"]:
                        row["real-tokens/s"] = row["real_tokens"] / row["bert-rs"]
                        for peer in ["torch-eager", "torch-sdpa", "torch-compile"]:
                            if row.get(peer):
                                row[f"ours/{peer}"] = row[peer] / row["bert-rs"]
                        if peak:
                            row["bf16-peak-fraction"] = row["flops"] / row["bert-rs"] / (peak * 1e12)
                    report["rows"].append(row)
                    print(json.dumps(row), flush=True)
                    save()
            del variants
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    save()

    ours_mode = "every position" if args.padded_ours else "padding-free"
    print(f"\n{card}, torch {torch.__version__}, {report['date']}; odd rows padded by a quarter; "
          f"ours {ours_mode}\n")
    print("| model | dtype | batch x seq | ours seq/s | eager | SDPA | compile | ours/eager | ours/SDPA | ours/compile | peak frac | padding-free gain |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    fmt = lambda v, f="{:.0f}": f.format(v) if v else "-"
    for r in report["rows"]:
        print(f"| {r['model']} | {r['dtype']} | {r['batch']}x{r['seq']} | {fmt(r.get('bert-rs-seq/s'))} | "
              f"{fmt(r.get('torch-eager-seq/s'))} | {fmt(r.get('torch-sdpa-seq/s'))} | {fmt(r.get('torch-compile-seq/s'))} | "
              f"{fmt(r.get('ours/torch-eager'), '{:.2f}')} | {fmt(r.get('ours/torch-sdpa'), '{:.2f}')} | "
              f"{fmt(r.get('ours/torch-compile'), '{:.2f}')} | {fmt(r.get('bf16-peak-fraction'), '{:.2f}')} | "
              f"{fmt(r.get('padding-free-gain'), '{:.2f}')} |")
    if report["skipped"]:
        print(f"\nnot run (deadline): {', '.join(report['skipped'])}")


if __name__ == "__main__":
    main()
