#!/usr/bin/env python3
"""Random-weight BERT checkpoints for the GPU visit, and transformers' reference outputs.

The GPU machine reaches no registry, and all-MiniLM-L6-v2's weights (91 MB) do not fit what a
visit carries, so the checks and the benchmark there run on seeded random weights written by
transformers on that machine:

  OUT/minilm-random/     all-MiniLM-L6-v2's shapes (6 layers, hidden 384, 12 heads of 32)
  OUT/bert-base-random/  bert-base-uncased's shapes (12 layers, hidden 768, 12 heads of 64)

each `config.json` + `model.safetensors` (BertModel, save_pretrained), and in each
`reference.safetensors`: transformers' f32 outputs (CPU, eager attention) on the input ids,
masks and token types of tests/fixtures/minilm/outputs.safetensors, under the same tensor names
(`single.last_hidden_state`, `pair.pooler_output`, ...), which `bert selftest --model DIR
--reference DIR/reference.safetensors` checks against. Default initialisation (std 0.02), with
LayerNorm weights and biases moved off 1 and 0 so their use is checked too.

Usage: python3 tests/scripts/gpu/random_checkpoints.py OUT [--only minilm-random]
Needs torch, transformers (4.x or 5.x) and safetensors.
"""

import argparse
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertModel

ROOT = Path(__file__).resolve().parents[3]
FIXTURE = ROOT / "tests" / "fixtures" / "minilm" / "outputs.safetensors"

SHAPES = {
    "minilm-random": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
    "bert-base-random": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
}


def write(name: str, out: Path, seed: int) -> None:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30522, max_position_embeddings=512, type_vocab_size=2, **SHAPES[name])
    model = BertModel(config, add_pooling_layer=True).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.add_(0.1 * torch.randn_like(module.weight))
                module.bias.add_(0.1 * torch.randn_like(module.bias))
    folder = out / name
    model.save_pretrained(folder, safe_serialization=True)

    inputs = load_file(FIXTURE)
    reference = {}
    model = BertModel.from_pretrained(folder, attn_implementation="eager").eval()
    with torch.no_grad():
        for batch in ("single", "pair"):
            feed = {key: inputs[f"{batch}.{key}"] for key in ("input_ids", "attention_mask", "token_type_ids")}
            result = model(**feed)
            reference.update({f"{batch}.{key}": value for key, value in feed.items()})
            reference[f"{batch}.last_hidden_state"] = result.last_hidden_state
            reference[f"{batch}.pooler_output"] = result.pooler_output
    save_file({k: v.contiguous() for k, v in reference.items()}, folder / "reference.safetensors")
    print(f"{folder}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--only", choices=sorted(SHAPES), action="append")
    args = parser.parse_args()
    for seed, name in enumerate(args.only or list(SHAPES)):
        write(name, args.out, seed)


if __name__ == "__main__":
    main()
