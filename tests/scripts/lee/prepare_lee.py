#!/usr/bin/env python3
"""The Lee et al. (2005) document-similarity data as train/test pair files, split by documents.

Source: PyPI gensim==4.4.0 (wheel sha256 pinned below), gensim/test/test_data/lee.cor (50 news
documents, one per line) and similarities0-1.txt (the mean human similarity rating of every pair,
upper triangle, scaled to [0, 1]); lee_background.cor (300 further news documents of the same source,
unlabelled: the text that tests/scripts/lee/distill_lee.py draws teacher-labelled pairs from). License: the data ships in gensim (LGPL-2.1) for testing; it is
fetched here, never committed.

Split: a seeded choice of TEST_DOCS documents; test pairs have both documents in it, train pairs
have neither, pairs that straddle are dropped. So no document of a test pair is seen in training.
K-fold: with --folds F the seeded permutation of the 50 documents is cut into F folds and --fold K
takes fold K as the test documents. The first fold of a seed is the single split of that seed with
10 test documents (the seeded choice takes the permutation's first ones), so fold 0 of 5 at seed 0
is the split reported before k-fold was added.

    python3 tests/scripts/lee/prepare_lee.py OUT_DIR [--seed 0] [--test-docs 10 | --folds 5 --fold K]
        [--background-passage-words N]

With --background-passage-words N, background.txt holds passages instead of whole documents: each
background document cut at sentence ends into as few runs of consecutive sentences as N words a
run allow, the cuts then moved so that the runs are of about equal length (a run may pass N by
part of a sentence; N=100 gives 798 passages of 35-111 words, median 75). Background documents
are about twice as long as Lee's (median 162 against 78 words), so a pair of whole ones overflows
a 256-token pair and the student sees only part of what its teacher label was computed on;
passages of Lee's length fit.

Writes OUT_DIR/train.tsv, OUT_DIR/test.tsv (text_a, text_b, label), OUT_DIR/split.json and
OUT_DIR/background.txt (one unlabelled document per line).
"""

import argparse
import hashlib
import json
import random
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "gensim==4.4.0"
WHEEL_SHA256 = "91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8"
FILES = (
    "gensim/test/test_data/lee.cor",
    "gensim/test/test_data/similarities0-1.txt",
    "gensim/test/test_data/lee_background.cor",
)


def fetch() -> tuple[list[str], list[list[float]], list[str]]:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
             "--python-version", "3.11", "--platform", "manylinux_2_28_x86_64", "-d", tmp, PACKAGE],
            check=True, stdout=sys.stderr,
        )
        wheel = next(Path(tmp).glob("*.whl"))
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if digest != WHEEL_SHA256:
            sys.exit(f"{wheel.name}: sha256 {digest}, expected {WHEEL_SHA256}")
        with zipfile.ZipFile(wheel) as zf:
            # lee.cor is Latin-1 (a pound sign, 0xA3, would not decode as UTF-8).
            docs_text, sims_text, background_text = (zf.read(name).decode("latin-1") for name in FILES)
    docs = [line.strip() for line in docs_text.splitlines() if line.strip()]
    # Tabs would split a TSV row; the documents are prose, so a space loses nothing.
    background = [" ".join(line.split()) for line in background_text.splitlines() if line.strip()]
    sims = [[float(x) for x in line.split()] for line in sims_text.splitlines() if line.strip()]
    assert len(docs) == 50 and len(sims) == 50 and all(len(r) == 50 for r in sims)
    assert len(background) == 300
    return docs, sims, background


SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")


def passages(document: str, max_words: int) -> list[str]:
    """Consecutive sentences of `document`, in as many runs as greedy packing into `max_words`
    words a run needs, then balanced: the words are shared out over that many passages as evenly
    as the sentence ends allow, so no passage is a short leftover."""
    sentences = [s for s in SENTENCE_END.split(document) if s.strip()]
    words = [len(s.split()) for s in sentences]
    count = 0
    run = max_words + 1
    for w in words:
        if run + w > max_words:
            count += 1
            run = 0
        run += w
    target = sum(words) / count
    out, current, done = [], [], 0
    for sentence, w in zip(sentences, words):
        # Close a passage when this sentence would take it past its even share of the words.
        if current and len(out) < count - 1 and done + w / 2 > target * (len(out) + 1):
            out.append(" ".join(current))
            current = []
        current.append(sentence)
        done += w
    out.append(" ".join(current))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test-docs", type=int, default=10)
    parser.add_argument("--folds", type=int, help="cut the documents into this many folds")
    parser.add_argument("--fold", type=int, help="with --folds: which fold (0-based) is the test set")
    parser.add_argument("--background-passage-words", type=int, default=0,
                        help="cut background documents into passages of about this many words (0: whole documents)")
    args = parser.parse_args()
    if (args.folds is None) != (args.fold is None):
        parser.error("--folds and --fold go together")
    if args.folds is not None and not (2 <= args.folds <= 50 and 0 <= args.fold < args.folds):
        parser.error("need 2 <= --folds <= 50 and 0 <= --fold < --folds")
    if args.background_passage_words < 0:
        parser.error("--background-passage-words must be >= 0 (0: whole documents)")
    docs, sims, background = fetch()
    rng = random.Random(args.seed)
    if args.folds is None:
        test_docs = sorted(rng.sample(range(len(docs)), args.test_docs))
    else:
        # random.sample draws its pool sequentially, so a permutation's prefix equals the
        # smaller sample of the same seed: fold 0 of 5 is the 10-document split of that seed.
        order = rng.sample(range(len(docs)), len(docs))
        lo, hi = (len(docs) * k // args.folds for k in (args.fold, args.fold + 1))
        test_docs = sorted(order[lo:hi])
    test_set = set(test_docs)
    args.out.mkdir(parents=True, exist_ok=True)
    counts = {"train": 0, "test": 0, "dropped": 0}
    with open(args.out / "train.tsv", "w") as train, open(args.out / "test.tsv", "w") as test:
        for f in (train, test):
            f.write("text_a\ttext_b\tlabel\n")
        for i in range(len(docs)):
            for j in range(i + 1, len(docs)):
                row = f"{docs[i]}\t{docs[j]}\t{sims[i][j]}\n"
                if i in test_set and j in test_set:
                    test.write(row)
                    counts["test"] += 1
                elif i not in test_set and j not in test_set:
                    train.write(row)
                    counts["train"] += 1
                else:
                    counts["dropped"] += 1
    if args.background_passage_words > 0:
        background = [p for doc in background for p in passages(doc, args.background_passage_words)]
    (args.out / "background.txt").write_text("".join(doc + "\n" for doc in background))
    split = {"seed": args.seed, "folds": args.folds, "fold": args.fold, "test_docs": test_docs, "pairs": counts, "source": PACKAGE, "wheel_sha256": WHEEL_SHA256}
    if args.background_passage_words > 0:
        split["background_passages"] = {"max_words": args.background_passage_words, "count": len(background)}
    (args.out / "split.json").write_text(json.dumps(split, indent=2) + "\n")
    print(json.dumps(split))


if __name__ == "__main__":
    main()
