#!/usr/bin/env python
"""Cross-tabulate a cohort's strategies (``DIR/strategies.json``) against a column of its manifest.

    python tools/strategies_table.py DIR MANIFEST [--column shortcut_tag]

Prints one row per cluster: its count of cases for each value of the column, the labels of its
members, and the share of its relevance inside the reference masks. With the shortcut cohort of
``tools/train_shortcut_classifier.py`` it shows whether the clusters separate the cases whose
relevance sits on the tag from those whose relevance sits on the tumour.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import Counter
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cohort", type=Path, help="the cohort folder (--out of xaioverlay cohort)")
    parser.add_argument("manifest", type=Path, help="its manifest (cases.csv)")
    parser.add_argument("--column", default="shortcut_tag", help="manifest column to cross-tabulate")
    args = parser.parse_args()
    strategies = json.loads((args.cohort / "strategies.json").read_text(encoding="utf-8"))
    with open(args.manifest, newline="", encoding="utf-8-sig") as stream:
        rows = {row["case_id"]: row for row in csv.DictReader(stream)}
    values = sorted({row.get(args.column, "") for row in rows.values()})
    print(f"strategies of {strategies['method']} ({strategies['descriptor']} descriptor, k = {strategies['chosen_k']} "
          f"by the eigengap); columns: {args.column}")
    header = ["cluster", *(f"{args.column}={v}" for v in values), "labels", "relevance in tumour mask"]
    lines = [header]
    for cluster in strategies["clusters"]:
        members = [rows[case_id] for case_id in cluster["members"]]
        counts = Counter(row.get(args.column, "") for row in members)
        labels = Counter(row.get("label", "") for row in members)
        inside = cluster.get("relevance_inside")
        lines.append([str(cluster["id"]), *(str(counts[v]) for v in values),
                      " ".join(f"{k}:{n}" for k, n in sorted(labels.items())),
                      "-" if inside is None else f"{inside:.2f} ({cluster.get('cases_with_mask', '?')} cases)"])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        print("  ".join(cell.rjust(width) for cell, width in zip(line, widths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
