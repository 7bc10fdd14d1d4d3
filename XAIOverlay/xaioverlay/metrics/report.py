"""An evaluation's files: ``metrics.json``, ``metrics.csv`` and a self-contained ``report.html``.

The page needs nothing but itself: plots are inline SVG, the montage an inline base64 PNG, styles
inline; no script, font or stylesheet is fetched. The maps, ``explanation.json`` and ``montage.png``
are written beside it by :func:`xaioverlay.outputs.write_outputs`. Every file goes through a staging
folder and is renamed into place, ``metrics.json`` last: its presence means the set is complete.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ..outputs import prepare_output_folder, write_json, write_outputs
from .evaluate import LOCALISATION_KEYS, Column, Evaluation, best_rows, columns

#: Colours of the methods in every plot (matplotlib's tab10), in method order.
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
#: Background of the best cell in each column.
BEST_COLOUR = "#b9f0c0"


def format_number(value, digits: int) -> str:
    """A table cell: "–" when missing, "n/a" when undefined (NaN), else ``digits`` decimals."""
    if value is None:
        return "–"
    if isinstance(value, str):
        return value
    if isinstance(value, float) and not math.isfinite(value):
        return "n/a"
    if digits == 0:
        return f"{int(round(value))}"
    return f"{value:.{digits}f}"


def table_rows(evaluation: Evaluation) -> tuple[list[Column], list[dict]]:
    rows = evaluation.rows()
    return columns(rows), rows


def write_csv(evaluation: Evaluation, path: Path) -> Path:
    """One row per method; localisation chance levels as extra columns."""
    table, rows = table_rows(evaluation)
    chance = (evaluation.reference or {}).get("chance", {})
    fields = [c.key for c in table] + [f"{key}_chance" for key in LOCALISATION_KEYS if key in chance]
    with open(path, "w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, **{f"{key}_chance": value for key, value in chance.items()}})
    return path


def _svg(figure) -> str:
    """A matplotlib figure as an inline ``<svg>`` element (text kept as text)."""
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg")
    text = buffer.getvalue()
    return text[text.index("<svg"):]


def _figure(width: float, height: float):
    from matplotlib.backends.backend_svg import FigureCanvasSVG
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=72)
    FigureCanvasSVG(figure)
    return figure


def curves_svg(evaluation: Evaluation, baseline: str) -> str:
    """Deletion and insertion curves (normalised score vs fraction perturbed) of every method."""
    import matplotlib

    with matplotlib.rc_context({"svg.fonttype": "none"}):
        figure = _figure(10, 3.6)
        for column, kind in enumerate(("deletion", "insertion")):
            axes = figure.add_subplot(1, 2, column + 1)
            for index, method in enumerate(evaluation.methods):
                curve = method.curves.get(baseline, {}).get(kind)
                if curve is None:
                    continue
                axes.plot(curve.fractions * 100, curve.normalised_scores, color=PALETTE[index % len(PALETTE)],
                          lw=1.6, label=f"{method.spec} (AUC {format_number(curve.normalised_auc, 3)})")
            axes.set_xlabel("voxels " + ("deleted" if kind == "deletion" else "inserted") + " (%, most relevant first)")
            axes.set_ylabel("score (original = 1, baseline = 0)")
            axes.set_title(f"{kind} · {baseline} baseline · {'lower' if kind == 'deletion' else 'higher'} AUC is better", fontsize=10)
            axes.grid(alpha=0.3)
            axes.legend(fontsize=8)
        figure.tight_layout()
        return _svg(figure)


def road_svg(evaluation: Evaluation) -> str | None:
    """ROAD MoRF and LeRF curves (normalised score vs fraction removed) of every method."""
    import matplotlib

    if not any(m.road for m in evaluation.methods):
        return None
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        figure = _figure(10, 3.6)
        for column, (order, words) in enumerate((("morf", "most relevant first · lower is better"), ("lerf", "least relevant first · higher is better"))):
            axes = figure.add_subplot(1, 2, column + 1)
            for index, method in enumerate(evaluation.methods):
                curve = (method.road or {}).get(order)
                if curve is not None:
                    axes.plot(curve.fractions * 100, curve.normalised_scores, marker="o", ms=3, lw=1.6, color=PALETTE[index % len(PALETTE)],
                              label=f"{method.spec} (mean {format_number(curve.mean_normalised, 3)})")
            axes.set_xlabel("voxels removed and imputed (%)")
            axes.set_ylabel("score (original = 1, blurred = 0)")
            axes.set_title(f"ROAD {order.upper()} · {words}", fontsize=10)
            axes.grid(alpha=0.3)
            axes.legend(fontsize=8)
        figure.tight_layout()
        return _svg(figure)


def randomisation_svg(evaluation: Evaluation) -> str | None:
    """Spearman(|map|, |original map|) after each cascading randomisation step, per method."""
    import matplotlib

    measured = [m for m in evaluation.methods if m.randomisation is not None and m.randomisation.correlations]
    if not measured:
        return None
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        figure = _figure(10, 4.2)
        axes = figure.add_subplot(1, 1, 1)
        longest = max(measured, key=lambda m: len(m.randomisation.blocks)).randomisation
        for index, method in enumerate(evaluation.methods):
            if method not in measured:
                continue
            values = method.randomisation.correlations
            axes.plot(range(len(values) + 1), [1.0, *values], marker="o", ms=3, lw=1.6,
                      color=PALETTE[index % len(PALETTE)], label=f"{method.spec} ({'pass' if method.randomisation.passed else 'fail'})")
        axes.axhline(longest.threshold, color="black", ls="--", lw=1, label=f"pass below {longest.threshold}")
        axes.set_xticks(range(len(longest.blocks) + 1))
        axes.set_xticklabels(["none", *longest.blocks], rotation=35, ha="right", fontsize=7)
        axes.set_xlabel("blocks randomised, cumulatively from the output side")
        axes.set_ylabel("Spearman |map| vs original")
        axes.set_ylim(-1.05, 1.05)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
        figure.tight_layout()
        return _svg(figure)


def _table_html(evaluation: Evaluation) -> str:
    table, rows = table_rows(evaluation)
    chance = (evaluation.reference or {}).get("chance", {})
    best = {column.key: best_rows(rows, column) for column in table}
    head = "".join(
        f"<th>{html.escape(c.title)}{' ↓' if c.direction < 0 else ' ↑' if c.direction > 0 else ''}</th>" for c in table
    )
    body = []
    for index, row in enumerate(rows):
        cells = []
        for column in table:
            text = html.escape(format_number(row.get(column.key), column.digits))
            if index in best[column.key]:
                cells.append(f'<td class="best" title="best in this column">{text} ★</td>')
            else:
                cells.append(f"<td>{text}</td>")
        body.append(f'<tr class="method-row">{"".join(cells)}</tr>')
    if chance:
        cells = []
        for column in table:
            if column.key == "method":
                cells.append("<td><i>chance level</i></td>")
            else:
                cells.append(f"<td><i>{format_number(chance[column.key], column.digits)}</i></td>" if column.key in chance else "<td></td>")
        body.append(f'<tr class="chance-row">{"".join(cells)}</tr>')
    return f'<div class="scroll"><table id="metrics"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def _agreement_html(evaluation: Evaluation) -> str:
    names = evaluation.agreement["methods"]
    matrix = evaluation.agreement["spearman"]
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    rows = []
    for name, line in zip(names, matrix):
        cells = "".join(
            f'<td style="background: rgba(31,119,180,{max(0.0, v) * 0.6:.2f})">{v:.2f}</td>' for v in line
        )
        rows.append(f"<tr><th>{html.escape(name)}</th>{cells}</tr>")
    return f'<table id="agreement"><thead><tr><th></th>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _cost_html(evaluation: Evaluation) -> str:
    rows = []
    for method in evaluation.methods:
        parts = []
        for family, cost in method.metric_cost.items():
            passes = cost["passes"]
            parts.append(f"{family}: {cost['runtime_s']:.2f} s, {passes['forward']} fwd / {passes['backward']} bwd")
        rows.append(f"<li><b>{html.escape(method.spec)}</b> — {html.escape('; '.join(parts)) or 'nothing measured'}</li>")
    return f"<ul>{''.join(rows)}</ul>"


STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 22px; } h2 { font-size: 17px; margin-top: 28px; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 12px; }
th, td { border: 1px solid #ccc; padding: 4px 7px; text-align: right; }
th { background: #f2f2f2; } td:first-child, th:first-child { text-align: left; }
td.best { background: %s; font-weight: bold; }
.meta { font-size: 13px; color: #444; } .note { font-size: 12px; color: #555; max-width: 1100px; }
.scroll { overflow-x: auto; }
img.montage { max-width: 100%%; border: 1px solid #ccc; }
""" % BEST_COLOUR


def render_report(evaluation: Evaluation, montage_png: bytes | None) -> str:
    """The whole ``report.html`` as one string."""
    record = evaluation.explanation.record()
    model, target, options = record["model"], record["target"], evaluation.options
    meta = [
        f"model: <b>{html.escape(str(model.get('id') or model['source']))}</b> ({html.escape(model['format'])}, {model['task']}) on {html.escape(model['device'])}",
        f"input: {html.escape(', '.join(v['name'] for v in record['inputs']))} · model grid {'×'.join(map(str, record['model_grid']['size']))}",
        f"target: {html.escape(str(target.get('spec', '')))} ({html.escape(str(target.get('name', '')))}, {target.get('score')}) = {target.get('value', float('nan')):.4g}",
        f"created {html.escape(record['created'])} · xaioverlay {html.escape(record['xaioverlay_version'])}",
    ]
    reference = evaluation.reference
    localisation_note = (
        f"Reference mask <b>{html.escape(reference['name'])}</b>: {reference['voxels']} of {reference['grid_voxels']} model-grid voxels; "
        f"pointing-game tolerance {reference['tolerance_mm']:g} mm. The last row gives each localisation score's chance level."
        if reference else "No reference mask given: localisation metrics were not computed (use --reference-mask)."
    )
    sections = [f"<h1>XAIOverlay evaluation</h1><p class='meta'>{'<br>'.join(meta)}</p>"]
    if montage_png:
        encoded = base64.b64encode(montage_png).decode("ascii")
        sections.append(f"<h2>Maps</h2><img class='montage' alt='montage of the maps' src='data:image/png;base64,{encoded}'>")
    step = f"{options.step_fraction * 100:g} % of the {'voxels' if options.block is None else f'{options.block}³-voxel blocks'} per step"
    sections.append(
        "<h2>Metrics</h2>"
        f"<p class='note'>One row per method; ★ marks the best value of each column (↑ higher is better, ↓ lower). "
        f"Deletion/insertion AUCs are normalised (original input 1, baseline 0), {step}. {localisation_note} "
        f"Randomisation: Spearman of |map| after the deepest step with the original; <i>pass</i> below {options.randomisation_threshold:g}. "
        "Random logit: Spearman of the map for another class with the target's map (lower: more class-specific). "
        "Runtime, passes and memory are those of making the map.</p>"
        + _table_html(evaluation)
    )
    for baseline in options.baselines:
        sections.append(f"<h2>Deletion and insertion curves ({html.escape(baseline)} baseline)</h2><figure class='plot curves'>{curves_svg(evaluation, baseline)}</figure>")
    road = road_svg(evaluation)
    if road:
        sections.append(f"<h2>ROAD: removal with noisy linear imputation</h2><figure class='plot road'>{road}</figure>")
    randomisation = randomisation_svg(evaluation)
    if randomisation:
        sections.append(f"<h2>Cascading model-parameter randomisation</h2><figure class='plot randomisation'>{randomisation}</figure>")
    sections.append(
        f"<h2>Agreement between methods</h2><p class='note'>Spearman rank correlation of the maps ({html.escape(evaluation.agreement['region'])}).</p>"
        + _agreement_html(evaluation)
    )
    sections.append(f"<h2>Cost of the metrics</h2>{_cost_html(evaluation)}")
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>XAIOverlay evaluation</title>"
        f"<style>{STYLE}</style></head><body>{''.join(sections)}</body></html>\n"
    )


def write_evaluation(evaluation: Evaluation, out: str | os.PathLike) -> dict[str, Path]:
    """Write the maps (see :func:`write_outputs`), ``metrics.csv``, ``report.html`` and ``metrics.json``
    (last: its presence means the set is complete)."""
    out = prepare_output_folder(out)
    (out / "metrics.json").unlink(missing_ok=True)  # a previous run's record must not vouch for new maps
    written = write_outputs(evaluation.explanation, out)
    montage = out / "montage.png"
    montage_png = montage.read_bytes() if montage.exists() else None
    staging = Path(tempfile.mkdtemp(prefix=".xaioverlay-staging-", dir=out))
    try:
        write_csv(evaluation, staging / "metrics.csv")
        (staging / "report.html").write_text(render_report(evaluation, montage_png), encoding="utf-8")
        record = evaluation.record()
        record["files"] = {"csv": "metrics.csv", "report": "report.html", "explanation": "explanation.json"}
        write_json(_finite(record), staging / "metrics.json")
        moved: list[Path] = []
        try:
            for name in ("metrics.csv", "report.html", "metrics.json"):  # metrics.json last
                os.replace(staging / name, out / name)
                moved.append(out / name)
        except BaseException:  # interrupted half-way: take back what was moved
            for path in moved:
                path.unlink(missing_ok=True)
            raise
        written.update({path.name: path for path in moved})
        return written
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _finite(value):
    """JSON has no NaN: undefined values become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, np.generic):
        return _finite(value.item())
    return value
