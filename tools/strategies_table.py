#!/usr/bin/env python
"""Cross-tabulate a cohort's strategies (``DIR/strategies.json``) against a column of its manifest.

    python tools/strategies_table.py DIR MANIFEST [--column shortcut_tag] [--mask-column tag_mask]

Prints one row per cluster: its count of cases for each value of the column, the labels of its
members, how many the model called the target class, the share of its relevance inside the reference
masks, and (``--mask-column``) inside the masks another manifest column names (mean over the members
that have one). With the shortcut cohort of
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

import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "XAIOverlay")]

from xaioverlay.cohort.strategies import map_of, share_inside_mask  # noqa: E402


def share_inside(cohort: Path, method: str, row: dict, mask: Path) -> float:
    """Share of the case's absolute relevance inside ``mask``."""
    share = share_inside_mask(map_of(cohort / "cases" / row["case_id"], method), str(mask))
    return 0.0 if share is None else share


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cohort", type=Path, help="the cohort folder (--out of xaioverlay cohort)")
    parser.add_argument("manifest", type=Path, help="its manifest (cases.csv)")
    parser.add_argument("--column", default="shortcut_tag", help="manifest column to cross-tabulate")
    parser.add_argument("--mask-column", default=None, help="manifest column of masks: share of relevance inside")
    parser.add_argument("--predicted", default="tumour", help="class counted in the 'called' column")
    args = parser.parse_args()
    with open(args.cohort / "cohort.csv", newline="", encoding="utf-8") as stream:
        table = list(csv.DictReader(stream))
    strategies = json.loads((args.cohort / "strategies.json").read_text(encoding="utf-8"))
    with open(args.manifest, newline="", encoding="utf-8-sig") as stream:
        rows = {row["case_id"]: row for row in csv.DictReader(stream)}
    values = sorted({row.get(args.column, "") for row in rows.values()})
    print(f"strategies of {strategies['method']} ({strategies['descriptor']} descriptor, k = {strategies['chosen_k']} "
          f"by the eigengap); columns: {args.column}")
    header = ["cluster", *(f"{args.column}={v}" for v in values), "labels", f"called {args.predicted}",
              "relevance in reference mask", *([f"relevance in {args.mask_column}"] if args.mask_column else [])]
    lines = [header]
    for cluster in strategies["clusters"]:
        members = [rows[case_id] for case_id in cluster["members"]]
        counts = Counter(row.get(args.column, "") for row in members)
        labels = Counter(row.get("label", "") for row in members)
        inside = cluster.get("relevance_inside")
        called = sum(row["predicted"] == args.predicted for row in table
                     if row["case_id"] in cluster["members"] and row["method"] == strategies["method"])
        line = [str(cluster["id"]), *(str(counts[v]) for v in values),
                " ".join(f"{k}:{n}" for k, n in sorted(labels.items())), f"{called}/{len(members)}",
                "-" if inside is None else f"{inside:.2f} ({cluster.get('cases_with_mask', '?')} cases)"]
        if args.mask_column:
            shares = [share_inside(args.cohort, strategies["method"], row,
                                   args.manifest.parent / row[args.mask_column])
                      for row in members if row.get(args.mask_column)]
            line.append(f"{np.mean(shares):.2f} ({len(shares)} cases)" if shares else "-")
        lines.append(line)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        print("  ".join(cell.rjust(width) for cell, width in zip(line, widths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
