"""The cohort report ``DIR/report.html``, built from a cohort folder alone (so it can be rebuilt any time).

What it reads: ``cohort.csv`` (the rows, in manifest order), each done case's ``explanation.json``
(the model's full output and class names, the map files) and ``metrics.json`` when the run measured
the maps, ``similar_cases.csv`` and, when present, ``strategies.json``. What it shows:

- **Performance against the labels.** A classifier: each case's label is matched to a class (by name or
  number); ROC AUC of the class's probability (logit without an output activation), sensitivity and
  specificity at the model's own decision rule (the class of the highest output), and the confusion
  matrix; for a two-class model the second class is the positive one. A segmenter: the label is the
  case's ``reference_mask``, and the performance is the Dice overlap of the predicted foreground with
  it (the table's ``dice`` column; cases whose mask and prediction are both empty have none).
- **Each metric per method**: box plots, means and 95 % percentile bootstrap intervals (seeded).
- **Where methods disagree most**: per case, the mean Spearman correlation between every pair of its
  methods' maps (``metrics.json``'s agreement when measured, else computed from the maps over the
  voxels where any map is non-zero); the lowest first.
- **Strategies** (``strategies.json``), **each case** with links to its own files and its similar cases.

The page needs nothing but itself: inline CSS, images as base64 PNG data URIs, no script.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import logging
import math
import os
from pathlib import Path
from urllib.parse import quote

import numpy as np

from ..metrics.report import _figure
from .performance import bootstrap_mean, class_performance, confusion_matrix, label_index
from .table import LEADING, _replace_atomically

log = logging.getLogger(__name__)

REPORT = "report.html"
STRATEGIES = "strategies.json"
#: Cases listed under "where methods disagree most".
DISAGREEING = 10
#: Table columns that describe the case or the run rather than measure a map.
NOT_METRICS = set(LEADING) - {"runtime_s"}

STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 22px; } h2 { font-size: 17px; margin-top: 28px; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 12px; margin: 6px 0; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: right; vertical-align: top; }
th { background: #f2f2f2; } td:first-child, th:first-child { text-align: left; }
td.text { text-align: left; } tr.failed td { color: #a00; }
.meta, .note { font-size: 13px; color: #444; max-width: 1100px; }
img.plot { max-width: 100%; } img.cluster { max-width: 520px; border: 1px solid #ccc; }
"""


def _float(text) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return float("nan")


def _number(value: float, digits: int = 3) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _link(path: str, text: str) -> str:
    return f"<a href='{html.escape(quote(path))}'>{html.escape(text)}</a>"


def _png(figure) -> str:
    """A matplotlib figure as an ``<img>`` with a base64 PNG data URI."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90)
    encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f"<img class='plot' alt='plot' src='data:image/png;base64,{encoded}'>"


class CohortData:
    """What the report shows, read from a cohort folder."""

    def __init__(self, out: Path):
        self.out = out
        with open(out / "cohort.csv", newline="", encoding="utf-8") as stream:
            self.rows = list(csv.DictReader(stream))
        self.case_ids = list(dict.fromkeys(row["case_id"] for row in self.rows))
        self.by_case: dict[str, list[dict]] = {}
        for row in self.rows:
            self.by_case.setdefault(row["case_id"], []).append(row)
        self.methods = list(dict.fromkeys(row["method"] for row in self.rows if row["status"] == "done"))
        self.explanations = {case: _read_json(out / "cases" / case / "explanation.json") for case in self.case_ids
                             if any(row["status"] == "done" for row in self.by_case[case])}
        self.similar: dict[str, list[dict]] = {}
        if (out / "similar_cases.csv").exists():
            with open(out / "similar_cases.csv", newline="", encoding="utf-8") as stream:
                for row in csv.DictReader(stream):
                    self.similar.setdefault(row["case_id"], []).append(row)
        self.settings = (_read_json(out / "cohort.json") or {}).get("settings", {})
        self.strategies = _read_json(out / STRATEGIES) if (out / STRATEGIES).exists() else None

    def model(self) -> dict:
        """The model's description from the first done case (task, class names)."""
        return next((record["model"] for record in self.explanations.values() if record), {})

    def case_row(self, case: str) -> dict:
        return self.by_case[case][0]


def performance_html(data: CohortData) -> str:
    model = data.model()
    if not model:
        return "<p class='note'>No done case: no model output to measure.</p>"
    if model.get("task") == "classification":
        return _classifier_html(data, model)
    dice = [_float(data.case_row(case).get("dice")) for case in data.case_ids]
    dice = [value for value in dice if math.isfinite(value)]
    if not dice:
        return ("<p class='note'>No performance: a segmenter is measured by the Dice overlap with each case's "
                "<code>reference_mask</code>, and no case has one.</p>")
    mean, low, high = bootstrap_mean(dice)
    figure = _figure(2.6, 3.2)
    axes = figure.add_subplot()
    axes.boxplot([dice])
    axes.set_xticks([1], ["Dice"])
    axes.set_ylim(0, 1)
    figure.tight_layout()
    return (f"<p class='note'>Dice overlap of the predicted foreground (any non-background class) with each case's "
            f"<code>reference_mask</code>, on the input grid: <b>{mean:.3f}</b> (95 % bootstrap interval "
            f"{low:.3f}–{high:.3f}) over <b>{len(dice)}</b> cases (cases whose mask and prediction are both empty "
            f"have no Dice).</p>{_png(figure)}")


def _classifier_html(data: CohortData, model: dict) -> str:
    names = model.get("class_names") or []
    truth, predicted, scores, unmatched, unlabelled = [], [], [], 0, 0
    for case, record in data.explanations.items():
        if not record:
            continue
        label = data.case_row(case).get("label") or None
        index = label_index(label, names)
        if label is None:
            unlabelled += 1
            continue
        if index is None:
            unmatched += 1
            continue
        output = record["output"]
        truth.append(index)
        predicted.append(output["predicted_index"])
        scores.append(output["probabilities"] or output["logits"])
    if not truth:
        return ("<p class='note'>No performance: no done case has a <code>label</code> naming one of the classes "
                f"({html.escape(', '.join(names))}) by name or number.</p>")
    score_name = "probability" if data.explanations and any(
        r and r["output"].get("probabilities") for r in data.explanations.values()) else "logit"
    rows = class_performance(np.array(truth), np.array(predicted), np.array(scores), names)
    body = "".join(f"<tr><td>{html.escape(r.name)}</td><td>{r.positives}</td><td>{r.negatives}</td>"
                   f"<td>{_number(r.auc)}</td><td>{_number(r.sensitivity)}</td><td>{_number(r.specificity)}</td></tr>"
                   for r in rows)
    matrix = confusion_matrix(truth, predicted, len(names))
    head = "".join(f"<th>predicted {html.escape(n)}</th>" for n in names)
    cells = "".join(f"<tr><th>label {html.escape(n)}</th>{''.join(f'<td>{v}</td>' for v in line)}</tr>"
                    for n, line in zip(names, matrix))
    skipped = []
    if unlabelled:
        skipped.append(f"{unlabelled} done cases have no label")
    if unmatched:
        skipped.append(f"{unmatched} have a label that names no class")
    accuracy = float(np.mean(np.array(truth) == np.array(predicted)))
    return (f"<p class='note'>{len(truth)} labelled done cases; decision rule: the class of the highest output "
            f"(accuracy {accuracy:.3f}). ROC AUC of each class's {score_name}"
            + (", the second class as the positive one" if len(names) == 2 else ", each class against the rest")
            + (f"; not counted: {'; '.join(skipped)}" if skipped else "") + ".</p>"
            "<table id='performance'><thead><tr><th>class</th><th>positives</th><th>negatives</th><th>ROC AUC</th>"
            f"<th>sensitivity</th><th>specificity</th></tr></thead><tbody>{body}</tbody></table>"
            f"<table id='confusion'><thead><tr><th></th>{head}</tr></thead><tbody>{cells}</tbody></table>")


def metric_columns(data: CohortData) -> list[str]:
    """Columns of the table holding a number per map (a metric, or the runtime)."""
    columns = [key for key in (data.rows[0] if data.rows else {}) if key not in NOT_METRICS
               and not key.startswith("predicted_volume_ml_")]
    done = [row for row in data.rows if row["status"] == "done"]
    return [key for key in columns if any(math.isfinite(_float(row.get(key))) for row in done)]


def metrics_html(data: CohortData) -> str:
    sections = []
    for key in metric_columns(data):
        values = {method: [_float(row.get(key)) for row in data.rows
                           if row["method"] == method and row["status"] == "done"] for method in data.methods}
        values = {method: [v for v in line if math.isfinite(v)] for method, line in values.items()}
        values = {method: line for method, line in values.items() if line}
        body = ""
        for method, line in values.items():
            mean, low, high = bootstrap_mean(line)
            body += (f"<tr><td>{html.escape(method)}</td><td>{len(line)}</td><td>{_number(mean, 4)}</td>"
                     f"<td>{_number(low, 4)} – {_number(high, 4)}</td></tr>")
        figure = _figure(1.5 + 1.1 * len(values), 3.2)
        axes = figure.add_subplot()
        axes.boxplot(list(values.values()))
        axes.set_xticks(range(1, len(values) + 1), list(values), rotation=20)
        axes.set_ylabel(key)
        figure.tight_layout()
        sections.append(f"<h3 id='metric-{html.escape(key)}'>{html.escape(key)}</h3>"
                        "<table class='metric'><thead><tr><th>method</th><th>cases</th><th>mean</th>"
                        f"<th>95 % bootstrap interval</th></tr></thead><tbody>{body}</tbody></table>{_png(figure)}")
    if not sections:
        return "<p class='note'>No done case: nothing measured.</p>"
    return ("<p class='note'>Each box: the cases' values of one method (median, quartiles, whiskers to 1.5 × the "
            "interquartile range). Intervals: percentile bootstrap of the mean, 2000 resamples, seed 0.</p>"
            + "".join(sections))


def case_agreement(data: CohortData, case: str) -> float | None:
    """Mean Spearman correlation over every pair of the case's methods' maps (None with fewer than 2 maps)."""
    import torch

    from ..metrics.agreement import agreement_matrix
    from ..volumes import read_volume

    measured = _read_json(data.out / "cases" / case / "metrics.json") if (
        data.out / "cases" / case / "metrics.json").exists() else None
    if measured and measured.get("agreement"):
        matrix = np.array(measured["agreement"]["spearman"], dtype=np.float64)
    else:
        record = data.explanations.get(case) or {}
        files = [entry["file"] for entry in record.get("methods", []) if entry.get("file")]
        if len(files) < 2:
            return None
        maps = {name: torch.from_numpy(read_volume(data.out / "cases" / case / name).array.astype(np.float32))
                for name in files}
        region = torch.stack([m != 0 for m in maps.values()]).any(0)
        if not region.any():
            return None
        _, matrix = agreement_matrix(maps, region)
        matrix = matrix.numpy()
    if len(matrix) < 2:
        return None
    pairs = matrix[np.triu_indices(len(matrix), 1)]
    return float(pairs.mean())


def disagreement_html(data: CohortData) -> str:
    if len(data.methods) < 2:
        return "<p class='note'>One method only: nothing to compare.</p>"
    scored = [(value, case) for case in data.explanations if (value := case_agreement(data, case)) is not None]
    if not scored:
        return "<p class='note'>No case has two maps to compare.</p>"
    scored.sort()
    rows = "".join(f"<tr><td><a href='#case-{html.escape(case)}'>{html.escape(case)}</a></td>"
                   f"<td>{value:.3f}</td><td class='text'>{_case_links(data, case)}</td></tr>"
                   for value, case in scored[:DISAGREEING])
    mean = float(np.mean([value for value, _ in scored]))
    return (f"<p class='note'>Per case, the mean Spearman rank correlation between every pair of its methods' maps "
            "(from <code>metrics.json</code> when the run measured the maps, else from the maps over the voxels "
            f"where any is non-zero). Mean over {len(scored)} cases: {mean:.3f}. The {min(DISAGREEING, len(scored))} "
            "lowest:</p><table id='disagreement'><thead><tr><th>case</th><th>mean Spearman</th><th>files</th></tr>"
            f"</thead><tbody>{rows}</tbody></table>")


def _case_links(data: CohortData, case: str) -> str:
    folder = data.out / "cases" / case
    links = [_link(f"cases/{case}/{name}", name) for name in ("report.html", "montage.png", "explanation.json")
             if (folder / name).exists()]
    return " · ".join(links) or "–"


def strategies_html(data: CohortData) -> str:
    strategies = data.strategies or {}
    facts = [f"{name}: <b>{html.escape(str(strategies[key]))}</b>" for key, name in (
        ("method", "method"), ("descriptor", "descriptor"), ("chosen_k", "clusters (eigengap)"),
        ("reference_case", "reference case")) if strategies.get(key) is not None]
    eigenvalues = strategies.get("eigenvalues")
    if eigenvalues:
        facts.append("eigenvalues: " + ", ".join(_number(_float(v)) for v in eigenvalues[:12]))
    parts = [f"<p class='note'>{' · '.join(facts)}</p>"]
    for number, cluster in enumerate(strategies.get("clusters") or []):
        members = [str(m) for m in cluster.get("members") or []]
        title = f"Cluster {html.escape(str(cluster.get('id', number)))} — {len(members)} cases"
        share = [f"relevance {where} the reference masks: {_number(_float(cluster.get(key)))}"
                 for key, where in (("relevance_inside", "inside"), ("relevance_outside", "outside"))
                 if cluster.get(key) is not None]
        image = ""
        png = cluster.get("mean_map_png")
        if png and (data.out / png).is_file():
            encoded = base64.b64encode((data.out / png).read_bytes()).decode("ascii")
            image = f"<img class='cluster' alt='{title}' src='data:image/png;base64,{encoded}'>"
        mean_map = cluster.get("mean_map")
        map_link = f" · mean map {_link(mean_map, mean_map)}" if mean_map else ""
        member_links = ", ".join(f"<a href='#case-{html.escape(m)}'>{html.escape(m)}</a>" for m in members)
        parts.append(f"<div class='cluster'><h3>{title}</h3><p class='note'>{' · '.join(share)}{map_link}</p>"
                     f"{image}<p class='note'>members: {member_links or '–'}</p></div>")
    return "".join(parts)


def cases_html(data: CohortData) -> str:
    model = data.model()
    output_head = "predicted</th><th>probability" if model.get("task") == "classification" else "Dice"
    rows = []
    for case in data.case_ids:
        row = data.case_row(case)
        failed = all(r["status"] == "failed" for r in data.by_case[case])
        output = (f"{html.escape(row.get('predicted') or '')}</td><td>{_number(_float(row.get('probability')))}"
                  if model.get("task") == "classification" else _number(_float(row.get("dice"))))
        similar = ", ".join(
            f"<a href='#case-{html.escape(s['similar_case_id'])}'>{html.escape(s['similar_case_id'])}</a> "
            f"({_number(_float(s['cosine_similarity']))}"
            f"{', label ' + html.escape(s['label']) if s.get('label') else ''})"
            for s in data.similar.get(case, []))
        status = f"failed: {html.escape(row.get('error') or '')}" if failed else "done"
        rows.append(f"<tr id='case-{html.escape(case)}'{' class=failed' if failed else ''}>"
                    f"<td>{html.escape(case)}</td><td>{html.escape(row.get('label') or '')}</td><td>{output}</td>"
                    f"<td class='text'>{status}</td><td class='text'>{_case_links(data, case)}</td>"
                    f"<td class='text'>{similar or '–'}</td></tr>")
    return ("<p class='note'>Links open each case's own files (relative to this page). Similar cases: the nearest "
            "cases in the model's feature space, with their cosine similarity and label.</p>"
            f"<table id='cases'><thead><tr><th>case</th><th>label</th><th>{output_head}</th><th>status</th>"
            f"<th>files</th><th>similar cases</th></tr></thead><tbody>{''.join(rows)}</tbody></table>")


def render_cohort_report(data: CohortData) -> str:
    """The whole ``report.html`` as one string."""
    done = sum(1 for case in data.case_ids if any(r["status"] == "done" for r in data.by_case[case]))
    model = data.settings.get("model") or data.model().get("source", "")
    meta = [f"{len(data.case_ids)} cases: {done} done, {len(data.case_ids) - done} failed",
            f"methods: {html.escape(', '.join(data.methods) or '–')}",
            f"model: {html.escape(str(model))} ({html.escape(str(data.model().get('task', '–')))})"]
    sections = [f"<h1>XAIOverlay cohort report</h1><p class='meta'>{'<br>'.join(meta)}</p>",
                f"<h2 id='section-performance'>Performance against the labels</h2>{performance_html(data)}",
                f"<h2 id='section-metrics'>Metrics per method</h2>{metrics_html(data)}",
                f"<h2 id='section-disagreement'>Where the methods disagree most</h2>{disagreement_html(data)}"]
    if data.strategies is not None:
        sections.append(f"<h2 id='section-strategies'>Strategies</h2>{strategies_html(data)}")
    sections.append(f"<h2 id='section-cases'>Cases</h2>{cases_html(data)}")
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>XAIOverlay cohort report</title>"
            f"<style>{STYLE}</style></head><body>{''.join(sections)}</body></html>\n")


def write_cohort_report(out: str | os.PathLike) -> Path:
    """Write ``out/report.html`` (atomically) from the cohort folder ``out``; returns its path."""
    from ..errors import InputError

    out = Path(out)
    if not (out / "cohort.csv").is_file():
        raise InputError(f"{out} holds no cohort.csv; give the --out folder of an 'xaioverlay cohort' run")
    page = render_cohort_report(CohortData(out))
    return _replace_atomically(out / REPORT, lambda path: Path(path).write_text(page, encoding="utf-8"))
