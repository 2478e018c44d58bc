#!/usr/bin/env python3
"""Tokenizer fixtures for the pair-scoring tests, made with HF's tokenizer (transformers' fast
BertTokenizer over the model's tokenizer.json).

Writes tests/fixtures/tokenization.json: for sentence pairs and single texts (accents, CJK, emoji,
an empty second text, texts past 512 tokens under each truncation strategy) the input_ids and
token_type_ids transformers produces with `truncation=STRATEGY, max_length=512`. Also writes a small
WordPiece tokenizer.json for the tiny random-weight CLI fixtures (tests/fixtures/tiny-*).

    .venv/bin/python tests/scripts/generate_tokenizer_fixtures.py
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate_fixtures import FIXTURES, fetch_minilm  # noqa: E402

import tempfile  # noqa: E402

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, decoders  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

LONG_A = " ".join(["The committee reviewed the proposal carefully before voting."] * 80)
LONG_B = " ".join(["Résumé naïve café, 東京 and 🤗 emoji appear again and again."] * 70)

PAIRS = [
    # (text_a, text_b, truncation strategy)
    ("A man is playing a guitar.", "Someone is playing an instrument.", "longest_first"),
    ("Crème brûlée à la française, naïve façade.", "ÉCOLE élève Ångström", "longest_first"),
    ("東京タワーは高い。", "北京是中国的首都。", "longest_first"),
    ("I love it 🤗🔥👍🏽", "emoji: 😀😃😄", "longest_first"),
    ("The second text is empty.", "", "longest_first"),
    ("", "", "longest_first"),
    (LONG_A, LONG_B, "longest_first"),
    (LONG_A, "Short second text.", "longest_first"),
    (LONG_A, "Short second text.", "only_first"),
    ("Short first text.", LONG_B, "only_second"),
    ("Short first text.", LONG_B, "longest_first"),
]

SINGLES = ["Hello world!", "Café 東京 🤗", "", LONG_A]

TINY_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'") + [
    "##" + c for c in "abcdefghijklmnopqrstuvwxyz"
] + ["the", "a", "man", "woman", "is", "playing", "guitar", "someone", "an", "instrument", "slicing", "onion"]


def tiny_tokenizer() -> Tokenizer:
    vocab = {token: i for i, token in enumerate(TINY_VOCAB)}
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=None, clean_text=True, handle_chinese_chars=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tokenizer.decoder = decoders.WordPiece()
    return tokenizer


def main() -> None:
    folder = fetch_minilm(Path(tempfile.gettempdir()) / "bert-fixture-cache")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.is_fast
    cases = []
    for a, b, strategy in PAIRS:
        # Batched, as pair scorers (sentence-transformers' CrossEncoder) call it. A single call
        # treats an empty second text as no pair at all ([CLS] A [SEP]); a batch keeps the pair
        # ([CLS] A [SEP] [SEP]), which is what a model trained on batches has seen.
        enc = tokenizer([a], [b], truncation=strategy, max_length=512)
        cases.append(
            {
                "text_a": a,
                "text_b": b,
                "truncation": strategy,
                "input_ids": enc["input_ids"][0],
                "token_type_ids": enc["token_type_ids"][0],
            }
        )
    singles = []
    for text in SINGLES:
        enc = tokenizer([text], truncation=True, max_length=512)
        singles.append({"text": text, "input_ids": enc["input_ids"][0]})
    (FIXTURES / "tokenization.json").write_text(json.dumps({"max_length": 512, "pairs": cases, "singles": singles}, ensure_ascii=False, indent=1) + "\n")

    tiny = tiny_tokenizer()
    assert tiny.get_vocab_size() < 99, tiny.get_vocab_size()
    for name in ("tiny-absolute-gelu", "tiny-cross-encoder"):
        tiny.save(str(FIXTURES / name / "tokenizer.json"))
    print("tokenizer fixtures written")


if __name__ == "__main__":
    main()
