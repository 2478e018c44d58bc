#!/usr/bin/env python3
"""Copies a LoRA cross-encoder (a `bert finetune --lora` output directory, or an adapter written
by extract_lora.py) into models/NAME/ as a bundled model: adapter_config.json,
adapter_model.safetensors and the classifier's config.json, plus a manifest.json pinning each
by sha256. The library compiles these files in (crates/bert/src/manifest.rs) and loads them on
the pinned base model.

    python3 tests/scripts/lee/bundle_adapter.py RUN_DIR models/minilm-lee-cross-encoder
"""

import hashlib
import json
import shutil
import sys
from pathlib import Path

FILES = ("adapter_config.json", "adapter_model.safetensors", "config.json")


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    run, dest = Path(sys.argv[1]), Path(sys.argv[2])
    dest.mkdir(parents=True, exist_ok=True)
    adapter = json.loads((run / "adapter_config.json").read_text())
    if adapter.get("base_model_name_or_path") != "all-MiniLM-L6-v2":
        sys.exit(f"{run}: the adapter's base must be the shipped all-MiniLM-L6-v2, "
                 f"not {adapter.get('base_model_name_or_path')!r}")
    digests = {}
    for name in FILES:
        shutil.copyfile(run / name, dest / name)
        digests[name] = hashlib.sha256((dest / name).read_bytes()).hexdigest()
    manifest = {
        "name": dest.name,
        "description": (
            "A sentence-pair cross-encoder (pooled [CLS] -> linear -> sigmoid) trained by this "
            "project's fine-tuning harness from all-MiniLM-L6-v2, stored as LoRA adapters (rank "
            f"{adapter['r']}, alpha {adapter['lora_alpha']}) and a head, bundled with the library "
            "and loaded on the pinned base. Model card: README.md beside this manifest."
        ),
        "architecture": "BertForSequenceClassification",
        "license": "Apache-2.0",
        "source": {"type": "bundled"},
        "files": digests,
    }
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(json.dumps({"bundled": str(dest), "files": digests}))


if __name__ == "__main__":
    main()
