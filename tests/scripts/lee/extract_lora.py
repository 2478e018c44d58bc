#!/usr/bin/env python3
"""Compress a fully fine-tuned pair classifier into a LoRA adapter on its base model.

Full fine-tuning (what the Lee two-stage recipe runs) changes every weight, so its checkpoint
is the size of the model (~90 MB for all-MiniLM-L6-v2). This script writes the change as an
adapter in PEFT's layout instead: every targeted linear layer's change `W_tuned - W_base` is
cut to its best rank-`r` approximation (truncated SVD, so `B A` is the closest rank-`r`
matrix in the Frobenius norm), and the small modules are saved whole (`modules_to_save`: the
classifier always; the LayerNorms, the token-type and position embeddings and the biases when
asked). What is neither targeted nor saved falls back to the base weights: that, and the
SVD's remainder, is what the compression loses, and the script reports both.

    extract_lora.py --base BASE_DIR --tuned TUNED_DIR --out OUT_DIR --rank 32 [--dtype f16]
        [--keep layernorm,token_type,position,bias] [--merged-out DIR]

`--merged-out` also writes the reconstruction as a plain checkpoint (base + what the adapter
keeps), for evaluating what the compression costs with `bert eval` before shipping.
Needs numpy and safetensors.
"""

import argparse
import json
import os
import shutil
from pathlib import Path

# One BLAS thread: the products here are small, and OpenBLAS's spinning threads ran ~40x
# slower on a 2-core machine that had other work on it.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

PEFT_PREFIX = "base_model.model."
TARGETS = ("query", "key", "value", "dense")
KEEPABLE = {
    # name in --keep: (PEFT modules_to_save entry, predicate on a weight name)
    "layernorm": ("LayerNorm", lambda k: ".LayerNorm." in k),
    "token_type": ("token_type_embeddings", lambda k: ".token_type_embeddings." in k),
    "position": ("position_embeddings", lambda k: ".position_embeddings." in k),
}


def base_name(base, name):
    """The base checkpoint's name for a tuned weight (with or without the `bert.` prefix)."""
    for candidate in (name, name.removeprefix("bert."), "bert." + name):
        if candidate in base:
            return candidate
    return None


def best_low_rank(delta, rank):
    """`(B, A)` with `B A` the best rank-`rank` approximation of `delta` (`[out, in]`):
    `B = U_r S_r`, `A = V_r^T` of its SVD, so LoRA's scaling is 1. Computed from the
    eigenvectors of the smaller Gram matrix (in float64), which is the SVD's right (or left)
    singular basis and several times faster than a full SVD of the tall matrix."""
    out_dim, in_dim = delta.shape
    r = min(rank, out_dim, in_dim)
    if out_dim >= in_dim:
        eigenvalues, vectors = np.linalg.eigh(delta.T @ delta)
        v = vectors[:, np.argsort(eigenvalues)[::-1][:r]]
        return delta @ v, v.T
    eigenvalues, vectors = np.linalg.eigh(delta @ delta.T)
    u = vectors[:, np.argsort(eigenvalues)[::-1][:r]]
    return u, u.T @ delta


def is_target(name):
    parts = name.split(".")
    return name.endswith(".weight") and len(parts) >= 2 and parts[-2] in TARGETS


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, type=Path, help="base model directory")
    parser.add_argument("--tuned", required=True, type=Path, help="fine-tuned checkpoint dir")
    parser.add_argument("--out", required=True, type=Path, help="adapter directory to write")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--dtype", choices=["f32", "f16"], default="f32",
                        help="storage of the LoRA factors (modules saved whole keep float32)")
    parser.add_argument(
        "--keep",
        default="",
        help="comma list of small parts saved whole: " + ",".join([*KEEPABLE, "bias"])
        + " (bias writes PEFT's bias: \"all\", which `bert` does not load: for --merged-out only)",
    )
    parser.add_argument("--base-name", default="all-MiniLM-L6-v2",
                        help="base_model_name_or_path written into adapter_config.json")
    parser.add_argument("--merged-out", type=Path, help="also write the reconstruction here")
    args = parser.parse_args()

    keep = {k for k in args.keep.split(",") if k}
    unknown = keep - set(KEEPABLE) - {"bias"}
    if unknown:
        parser.error(f"--keep: unknown part(s) {sorted(unknown)}")
    base = load_file(str(args.base / "model.safetensors"))
    tuned = load_file(str(args.tuned / "model.safetensors"))
    store = np.float16 if args.dtype == "f16" else np.float32

    adapter, merged, report = {}, {}, []
    lost_sq, change_sq = 0.0, 0.0
    for name in sorted(tuned):
        tuned_w = tuned[name].astype(np.float64)
        b_name = base_name(base, name)
        if b_name is None:
            # New in the classifier (the head): saved whole.
            if not name.startswith("classifier."):
                raise SystemExit(f"{name} is in neither the base nor the head")
            adapter[PEFT_PREFIX + name] = tuned[name]
            merged[name] = tuned[name]
            continue
        base_w = base[b_name].astype(np.float64)
        delta = tuned_w - base_w
        change = float(np.sum(delta**2))
        change_sq += change
        kept = np.zeros_like(delta)
        if is_target(name):
            lora_b, lora_a = best_low_rank(delta, args.rank)
            r = lora_a.shape[0]
            if r != args.rank:
                raise SystemExit(f"--rank {args.rank} exceeds {name}'s shape {delta.shape}")
            # C order: LAPACK's eigenvectors come in Fortran order, and safetensors writes a
            # numpy array's buffer as it lies, so a transposed layout would be saved scrambled.
            lora_b = np.ascontiguousarray(lora_b, dtype=store)
            lora_a = np.ascontiguousarray(lora_a, dtype=store)
            module = name.removesuffix(".weight")
            adapter[f"{PEFT_PREFIX}{module}.lora_A.weight"] = lora_a
            adapter[f"{PEFT_PREFIX}{module}.lora_B.weight"] = lora_b
            kept = lora_b.astype(np.float64) @ lora_a.astype(np.float64)
            how = f"rank {r}"
        elif any(pred(name) for part, (_, pred) in KEEPABLE.items() if part in keep) or (
            "bias" in keep and name.endswith(".bias")
        ):
            adapter[PEFT_PREFIX + name] = tuned[name]
            kept = delta
            how = "whole"
        else:
            how = "dropped"
        lost = float(np.sum((delta - kept) ** 2))
        lost_sq += lost
        merged[name] = np.ascontiguousarray(base_w + kept, dtype=np.float32)
        report.append({
            "weight": name,
            "kept_as": how,
            "change_norm": change**0.5,
            "lost_norm": lost**0.5,
            "lost_fraction": lost / change if change > 0 else 0.0,
        })

    modules_to_save = ["classifier", "score"] + [KEEPABLE[k][0] for k in sorted(keep) if k in KEEPABLE]
    config = {
        "peft_type": "LORA",
        "task_type": "SEQ_CLS",
        "r": args.rank,
        "lora_alpha": float(args.rank),
        "lora_dropout": 0.0,
        "target_modules": list(TARGETS),
        "modules_to_save": modules_to_save,
        "bias": "all" if "bias" in keep else "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "base_model_name_or_path": args.base_name,
        "alpha_pattern": {},
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "rank_pattern": {},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    save_file(adapter, str(args.out / "adapter_model.safetensors"))
    (args.out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    shutil.copy(args.tuned / "config.json", args.out / "config.json")
    summary = {
        "rank": args.rank,
        "dtype": args.dtype,
        "keep": sorted(keep),
        "adapter_bytes": (args.out / "adapter_model.safetensors").stat().st_size,
        "change_norm": change_sq**0.5,
        "lost_norm": lost_sq**0.5,
        "lost_fraction": lost_sq / change_sq if change_sq > 0 else 0.0,
        "weights": report,
    }
    (args.out / "extraction.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "weights"}))

    if args.merged_out:
        args.merged_out.mkdir(parents=True, exist_ok=True)
        save_file(merged, str(args.merged_out / "model.safetensors"))
        for f in args.tuned.iterdir():
            if f.is_file() and f.name != "model.safetensors" and not f.name.endswith(".svg") \
                    and f.name != "metrics.jsonl":
                shutil.copy(f, args.merged_out / f.name)


if __name__ == "__main__":
    main()
