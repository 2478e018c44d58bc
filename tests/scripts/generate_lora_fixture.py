#!/usr/bin/env python3
"""A LoRA adapter written by PEFT, and what PEFT computes with it, for tests/tests/lora.rs.

PEFT wraps the tiny cross-encoder (tests/fixtures/tiny-cross-encoder) with LoRA adapters of
rank 4 on query/key/value/dense (task SEQ_CLS, so the classifier is saved whole), initialised
randomly (init_lora_weights=False: B is not zero, so the adapters change the outputs), and saves
them with `save_pretrained` to tests/fixtures/tiny-lora-peft/. Beside them,
lora_reference.safetensors holds, for the fixed batch of the tiny fixture (outputs.safetensors)
and its labels (gradients.safetensors), with dropout off:
- `logits`: the adapted model's logits; `merged_logits`: after `merge_and_unload()`;
- `loss`: BCE-with-logits; `grad.NAME`: the gradient of every trainable parameter (NAME as the
  weight is called without PEFT's wrapper: `bert.encoder.layer.0.attention.self.query.lora_A.weight`,
  `classifier.weight`).

    .venv/bin/python tests/scripts/generate_lora_fixture.py   # peft==0.21.2, torch, transformers
"""

import json
from pathlib import Path

import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import BertForSequenceClassification

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "tests/fixtures/tiny-cross-encoder"
OUT = ROOT / "tests/fixtures/tiny-lora-peft"


def our_name(peft_name):
    name = peft_name.removeprefix("base_model.model.")
    return name.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.").replace(
        ".modules_to_save.default.", "."
    )


def main():
    torch.manual_seed(0)
    base = BertForSequenceClassification.from_pretrained(BASE, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=["query", "key", "value", "dense"],
        task_type="SEQ_CLS",
        init_lora_weights=False,
    )
    model = get_peft_model(base, config)
    model.train()  # dropout probabilities are 0, so train mode only enables gradients' bookkeeping

    batch = load_file(BASE / "outputs.safetensors")
    labels = load_file(BASE / "gradients.safetensors")["labels"]
    inputs = {k: batch[k].to(torch.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}
    logits = model(**inputs).logits.squeeze(-1)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
    loss.backward()

    tensors = {"logits": logits.detach().clone(), "loss": loss.detach().reshape(1)}
    for name, param in model.named_parameters():
        if param.requires_grad:
            tensors[f"grad.{our_name(name)}"] = param.grad.detach().clone()

    OUT.mkdir(exist_ok=True)
    model.save_pretrained(OUT)
    # Name the base relative to the adapter, so the fixture works from any checkout.
    adapter_config = json.loads((OUT / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = "../tiny-cross-encoder"
    (OUT / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
    (OUT / "README.md").unlink(missing_ok=True)

    merged = model.merge_and_unload().eval()
    with torch.no_grad():
        tensors["merged_logits"] = merged(**inputs).logits.squeeze(-1).clone()
    save_file({k: v.contiguous() for k, v in tensors.items()}, OUT / "lora_reference.safetensors")
    (OUT / "VERSIONS.json").write_text(
        json.dumps(
            {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
             "script": "tests/scripts/generate_lora_fixture.py"},
            indent=2,
        )
        + "\n"
    )
    print("loss", loss.item(), "trainable", sum(1 for k in tensors if k.startswith("grad.")))


if __name__ == "__main__":
    main()
