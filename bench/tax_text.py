"""Plain text for `heed simulate --tax-text`: TruthfulQA's questions with their best answers, one
{"text": ...} per line, in a fixed shuffled order (the simulation uses the first half as the
PPO-ptx mix and measures the NLL on the second). Reads ../shared/data, for benchmarks only.

    .venv/bin/python bench/tax_text.py > /tmp/tax.jsonl
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
from pathlib import Path

DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "data" / "truthfulqa" / "TruthfulQA.csv"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv", type=Path, nargs="?", default=DEFAULT, help=f"TruthfulQA.csv (default: {DEFAULT})")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with open(args.csv, encoding="utf-8-sig", newline="") as fh:
        rows = [f"Q: {r['Question'].strip()}\nA: {r['Best Answer'].strip().rstrip('.')}." for r in csv.DictReader(fh)]
    random.Random(args.seed).shuffle(rows)
    for text in rows:
        sys.stdout.write(json.dumps({"text": text}) + "\n")
    print(f"{len(rows)} texts from {args.csv}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
