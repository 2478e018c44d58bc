#!/usr/bin/env python3
"""Side-by-side CPU inference benchmark (issue #7): this project against PyTorch (eager and SDPA,
torch.inference_mode), ONNX Runtime (default session, and the file its BERT graph optimizer
writes: fused attention, SkipLayerNorm, fused GELU) and candle-transformers' BertModel, on the
same weights and the same machine, in one invocation.

    python crates/bench/scripts/compare_inference.py --model DIR [--grid 1x16,1x128,8x128,32x128,8x512] \
        [--threads 1,2] [--rounds 2 --runs 5 --warmup 2] [--bench target/release/bert-bench] \
        [--work /tmp/bert-infer-bench] [--json results.json]

Every measurement runs in its own process (`bert-bench infer` for the Rust implementations,
infer_worker.py for the Python ones), which reports its own peak RSS (VmHWM: interpreter,
libraries, weights and activations). For each thread
count and (batch, seq) cell, every implementation runs once per round, the order rotating from
round to round; the reported time is the median of all its timed runs (rounds x runs >= 10 by
default), after `--warmup` untimed passes in each process. Thread counts are set for each peer
(RAYON_NUM_THREADS; torch.set_num_threads; ORT's intra_op_num_threads with one inter-op thread;
OMP_NUM_THREADS and MKL_NUM_THREADS as well). Every implementation's last hidden states are
checked against PyTorch eager's (the first token's first 8 values and the mean |h|). Before
each round `bert-bench fma-peak` measures the CPU's multiply-add peak on that many threads at
once; the table gives its range over the cell's rounds (on a shared VM the second vCPU's share
moves from minute to minute, and every implementation's time with it).

Also measures time to first score: `bert score A B` (release build, warm model cache), process
start to printed score, median of 5 after one untimed call.

DIR is all-MiniLM-L6-v2 (`bert embed x` fetches it into ~/.cache/bert-rs). Needs torch,
transformers, onnx, onnxscript and onnxruntime; never run by CI.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
WORKER = ROOT / "crates/bench/scripts/infer_worker.py"
IMPLS = ["bert-rs", "torch-eager", "torch-sdpa", "ort-default", "ort-bert", "candle-transformers"]
PEERS = ["torch-eager", "torch-sdpa", "ort-default", "ort-bert"]  # the 1.2x goal is against the best of these


def export_onnx(model_dir, work):
    """The model as ONNX (TorchScript exporter, opset 17, dynamic batch and sequence), and the
    BERT-optimized copy ONNX Runtime's transformers optimizer writes from it."""
    plain, fused = work / "model.onnx", work / "model-bert-optimized.onnx"
    if plain.exists() and fused.exists():
        return plain, fused, json.loads((work / "fusion.json").read_text())
    import torch
    from onnxruntime.transformers import optimizer
    from transformers import BertModel

    model = BertModel.from_pretrained(model_dir, attn_implementation="eager").eval()

    class LastHiddenState(torch.nn.Module):
        """Positional inputs for the exporter (BertModel.forward's order has moved between versions)."""

        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask,
                             token_type_ids=token_type_ids).last_hidden_state

    ids = torch.tensor([[101, 2000, 2001, 102]])
    dynamic = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
               "token_type_ids": {0: "batch", 1: "seq"}, "last_hidden_state": {0: "batch", 1: "seq"}}
    with torch.no_grad():
        torch.onnx.export(LastHiddenState(model), (ids, torch.ones_like(ids), torch.zeros_like(ids)), str(plain),
                          input_names=["input_ids", "attention_mask", "token_type_ids"],
                          output_names=["last_hidden_state"], dynamic_axes=dynamic,
                          opset_version=17, dynamo=False)
    config = model.config
    optimized = optimizer.optimize_model(str(plain), model_type="bert", num_heads=config.num_attention_heads,
                                         hidden_size=config.hidden_size)
    optimized.save_model_to_file(str(fused))
    stats = {k: v for k, v in optimized.get_fused_operator_statistics().items() if v}
    (work / "fusion.json").write_text(json.dumps(stats))
    return plain, fused, stats


def measure(impl, args, batch, seq, threads, onnx):
    shape = ["--batch", str(batch), "--seq", str(seq), "--warmup", str(args.warmup), "--runs", str(args.runs)]
    if impl in ("bert-rs", "candle-transformers"):
        cmd = [args.bench, "infer", "--model", args.model, "--implementation", impl, *shape]
    else:
        cmd = [sys.executable, str(WORKER), "--impl", impl, "--model", args.model, "--threads", str(threads), *shape]
        if impl.startswith("ort-"):
            cmd += ["--onnx", str(onnx[impl])]
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    proc = subprocess.run(cmd, capture_output=True, env=env, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def time_to_first_score(args, runs=5):
    bert = Path(args.bench).with_name("bert")
    cmd = [str(bert), "score", "--device", "cpu", "A man is playing a guitar.", "Someone is playing an instrument."]
    times = []
    for i in range(runs + 1):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        if i:
            times.append(time.perf_counter() - t0)
    return {"command": " ".join(cmd[1:]), "runs_s": times, "median_s": statistics.median(times)}


def fma_peak(args, threads):
    """The CPU's FMA peak right now (`bert-bench fma-peak`, GFLOP/s on `threads` threads at once),
    or None where it cannot be measured (no AVX2/AVX-512 unit): on a shared machine the peak two
    threads get moves from minute to minute, and a table is read against it."""
    done = subprocess.run([args.bench, "fma-peak", "--threads", str(threads), "--repeats", "3"],
                          capture_output=True, text=True)
    if done.returncode != 0:
        return None
    return json.loads(done.stdout.splitlines()[-1])["gflops_total"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--bench", default=str(ROOT / "target/release/bert-bench"))
    p.add_argument("--grid", default="1x16,1x128,8x128,32x128,8x512")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--work", default="/tmp/bert-infer-bench")
    p.add_argument("--json")
    args = p.parse_args()
    impls = args.impls.split(",")
    unknown = set(impls) - set(IMPLS)
    if unknown:
        p.error(f"unknown --impls {sorted(unknown)}; known: {IMPLS}")
    grid = [tuple(int(x) for x in cell.split("x")) for cell in args.grid.split(",")]
    thread_counts = [int(t) for t in args.threads.split(",")]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    fusion = {}
    onnx = {}
    if any(i.startswith("ort-") for i in impls):
        plain, fused, fusion = export_onnx(args.model, work)
        onnx = {"ort-default": plain, "ort-bert": fused}

    started = datetime.datetime.now(datetime.timezone.utc)
    results = []
    for threads in thread_counts:
        for batch, seq in grid:
            runs = {i: [] for i in impls}
            peaks = []
            for r in range(args.rounds):
                peaks.append(fma_peak(args, threads))
                for impl in impls[r % len(impls):] + impls[:r % len(impls)]:
                    runs[impl].append(measure(impl, args, batch, seq, threads, onnx))
                    print(f"{threads}t {batch}x{seq} round {r} {impl}: {runs[impl][-1]['median_s'] * 1e3:.1f} ms", file=sys.stderr)
            reference = runs.get("torch-eager")
            for impl, rs in runs.items():
                all_s = [t for run in rs for t in run["runs_s"]]
                median_s = statistics.median(all_s)
                row = {"impl": impl, "threads": threads, "batch": batch, "seq": seq, "timed_runs": len(all_s),
                       "median_ms": median_s * 1e3, "seq_per_s": batch / median_s,
                       "peak_rss_mb": max((run["peak_rss_mb"] or 0) for run in rs),
                       "fma_peak_gflops": peaks}
                if reference:
                    ref = reference[-1]
                    row["max_diff_vs_torch"] = max(abs(a - b) for a, b in zip(rs[-1]["first_token"], ref["first_token"]))
                    row["mean_abs_diff_vs_torch"] = abs(rs[-1]["mean_abs"] - ref["mean_abs"])
                results.append(row)
    ttfs = time_to_first_score(args) if Path(args.bench).with_name("bert").exists() else None

    import onnxruntime
    import torch
    import transformers
    meta = {
        "date": started.isoformat(timespec="seconds"), "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "onnxruntime": onnxruntime.__version__,
        "commit": subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "command": " ".join(sys.argv), "ort_bert_fusions": fusion, "time_to_first_score": ttfs,
    }
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    print_tables(meta, results, impls, thread_counts, grid)


def print_tables(meta, results, impls, thread_counts, grid):
    print(f"all-MiniLM-L6-v2 forward (token ids -> last hidden states), {meta['date']}, {meta['cpus']} CPUs, "
          f"commit {meta['commit']}; torch {meta['torch']}, transformers {meta['transformers']}, "
          f"onnxruntime {meta['onnxruntime']}")
    if meta["ort_bert_fusions"]:
        print(f"ORT BERT optimizer fusions: {meta['ort_bert_fusions']}")
    print()
    for threads in thread_counts:
        print(f"### {threads} thread{'s' if threads > 1 else ''}: sequences/s (median ms), peak RSS MB")
        print()
        print("| batch x seq | " + " | ".join(impls) + " | bert-rs / best PyTorch-ORT | FMA peak, GFLOP/s |")
        print("|---" * (len(impls) + 3) + "|")
        for batch, seq in grid:
            cells = {r["impl"]: r for r in results if r["threads"] == threads and (r["batch"], r["seq"]) == (batch, seq)}
            line = [f"{batch} x {seq}"]
            for impl in impls:
                r = cells[impl]
                flag = " (!)" if r.get("max_diff_vs_torch", 0) > 1e-4 else ""
                line.append(f"{r['seq_per_s']:.1f} ({r['median_ms']:.1f} ms), {r['peak_rss_mb']:.0f} MB{flag}")
            peers = [cells[i]["seq_per_s"] for i in PEERS if i in cells]
            ratio = f"{cells['bert-rs']['seq_per_s'] / max(peers):.2f}x" if peers and "bert-rs" in cells else "-"
            peaks = [g for g in next(iter(cells.values())).get("fma_peak_gflops", []) if g]
            peak = f"{min(peaks):.0f}-{max(peaks):.0f}" if peaks else "-"
            print("| " + " | ".join(line + [ratio, peak]) + " |")
        print()
    if meta["time_to_first_score"]:
        t = meta["time_to_first_score"]
        print(f"Time to first score (`bert {t['command']}`, warm cache): median {t['median_s'] * 1e3:.0f} ms of {len(t['runs_s'])}")


if __name__ == "__main__":
    main()
