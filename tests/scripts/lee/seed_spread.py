#!/usr/bin/env python3
"""The spread over seeds of the bundled cross-encoder's recipe (issue #5): a markdown table of the
held-out metrics of several runs of `train_lee_cross_encoder.sh`, one per seed, beside the
zero-shot bi-encoder on the same pairs.

    python3 tests/scripts/lee/seed_spread.py SEED=DIR [SEED=DIR ...]

DIR is a run's OUT_DIR (adapter_test.json, fold0/ours_test.json, fold0/bi_encoder.json) or a
committed run folder of models/minilm-lee-cross-encoder (adapter_test.json, full_test.json,
bi_encoder.json). Standard library only.
"""

import json
import statistics
import sys
from pathlib import Path


def first_existing(run, *names):
    for name in names:
        path = run / name
        if path.exists():
            return path
    sys.exit(f"{run}: none of {', '.join(names)}")


def metrics(path):
    """(Spearman, Pearson) of a `bert eval` JSON or of the bi-encoder's."""
    data = json.loads(path.read_text())
    data = data.get("metrics", data)
    return data["spearman"], data["pearson"]


def main(argv):
    if not argv or any("=" not in arg for arg in argv):
        sys.exit(__doc__)
    rows = []
    for arg in argv:
        seed, run = arg.split("=", 1)
        run = Path(run)
        rows.append((seed,
                     metrics(first_existing(run, "adapter_test.json")),
                     metrics(first_existing(run, "fold0/ours_test.json", "full_test.json")),
                     metrics(first_existing(run, "fold0/bi_encoder.json", "bi_encoder.json"))))
    # Same pairs give the same bi-encoder correlations up to float noise (builds differ in the
    # last bits of a pooled embedding): compared to 6 decimals.
    bi = {tuple(round(v, 6) for v in row[3]) for row in rows}
    if len(bi) != 1:
        sys.exit(f"the runs' bi-encoder metrics differ ({sorted(bi)}): not the same held-out pairs")
    print("| seed | adapter Spearman / Pearson | full fine-tune Spearman / Pearson |")
    print("|---|---|---|")
    for seed, adapter, full, _ in rows:
        print(f"| {seed} | {adapter[0]:.3f} / {adapter[1]:.3f} | {full[0]:.3f} / {full[1]:.3f} |")
    if len(rows) > 1:
        cells = []
        for which in (1, 2):
            spearman = [row[which][0] for row in rows]
            pearson = [row[which][1] for row in rows]
            cells.append(f"{statistics.mean(spearman):.3f} ({min(spearman):.3f}-{max(spearman):.3f}, "
                         f"sd {statistics.stdev(spearman):.3f}) / {statistics.mean(pearson):.3f}")
        print(f"| mean (range, sd) | {cells[0]} | {cells[1]} |")
    (spearman, pearson), = bi
    print(f"\nZero-shot bi-encoder on the same pairs: Spearman {spearman:.3f} / Pearson {pearson:.3f}.")


if __name__ == "__main__":
    main(sys.argv[1:])
