"""One self-contained HTML page per evaluation or experiment: ``report.html``.

Every figure is embedded as a base64 ``data:`` URI and the style sheet is inline, so the page
has no external resource: it can be mailed, archived or opened offline. Nothing identifying
goes in: the page is built from metrics (``metrics.json``) and figures, never from
``predictions.csv``.

- `write_evaluation_report`: an ``evaluate`` output directory's page: counts, AUCs with CIs,
  partial AUC, operating points, the threshold chosen on val applied to test, calibration
  (and the calibrated figures with ``--calibrate``), and the ROC, reliability and decision-curve
  figures.
- `write_experiment_report`: the experiment drivers' page (Table 1, data-size): markdown
  tables as written to ``table1.md`` / ``data_fraction.md`` and their figures.
"""

from __future__ import annotations

import base64
import html
import math
import os

from tfrecords_tools import fileio

FILENAME = "report.html"

_STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 60em; color: #222; line-height: 1.4; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { display: inline-block; margin: 0.5em; vertical-align: top; }
figure img { max-width: 28em; border: 1px solid #eee; }
.note { color: #555; font-size: 0.9em; }
"""


def png_data_uri(path: str) -> str:
    """``data:image/png;base64,...`` of a PNG file.

    Raises:
      ValueError: the file is not a PNG (the message names it).
    """
    with open(path, "rb") as f:
        data = f.read()
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        raise ValueError(f"{path} is not a PNG file")
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _num(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}f}"


def _with_ci(value, low, high, digits: int = 3) -> str:
    text = _num(value, digits)
    if text != "n/a" and low is not None and not (isinstance(low, float) and math.isnan(low)):
        text += f" ({_num(low, digits)}–{_num(high, digits)})"
    return text


def _table(header, rows) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header) if header else ""
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="num">{_e(c)}</td>' if i else f"<td>{_e(c)}</td>" for i, c in enumerate(r)
        )
        + "</tr>"
        for r in rows
    )
    head = f"<thead><tr>{head}</tr></thead>" if head else ""
    return f"<table>{head}<tbody>{body}</tbody></table>"


def _figures(figures) -> str:
    parts = []
    for caption, path in figures:
        if path and os.path.isfile(path):
            parts.append(
                f'<figure><img src="{png_data_uri(path)}" alt="{_e(caption)}">'
                f"<figcaption>{_e(caption)}</figcaption></figure>"
            )
    return "<div>" + "".join(parts) + "</div>" if parts else ""


def _page(title: str, body: str) -> str:
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{_e(title)}</title><style>{_STYLE}</style></head>"
        f"<body><h1>{_e(title)}</h1>{body}</body></html>\n"
    )


def _auc_section(summary: dict) -> str:
    rows = []
    for level in ("breast_level", "exam_level"):
        for task in ("malignant", "benign"):
            r = (summary.get(level) or {}).get(task)
            if r:
                rows.append(
                    [
                        f"{level.split('_')[0]}-level {task}",
                        _with_ci(r["auc"], r["ci_low"], r["ci_high"]),
                        f"{r.get('positives', '')} / {r.get('negatives', '')}",
                    ]
                )
    for task, r in (summary.get("partial_auc") or {}).items():
        rows.append(
            [
                f"breast-level {task} partial AUC, specificity ≥ {r['min_specificity']:.2f} "
                f"({r['standardization']}-standardised)",
                _with_ci(**{k: r["standardized"][v] for k, v in _CI_KEYS}),
                "",
            ]
        )
        rows.append(
            [
                f"breast-level {task} partial AUC, raw area (max {r['max_fpr']:.2f})",
                _with_ci(**{k: r["raw"][v] for k, v in _CI_KEYS}),
                "",
            ]
        )
    b = summary.get("bootstrap", {})
    note = (
        f"{int(round(100 * b.get('confidence', 0.95)))}% CIs: {b.get('method', 'percentile')} "
        f"bootstrap, {b.get('n_bootstrap', '?')} resamples of {b.get('resample_unit', 'patient')}s"
        f", seed {b.get('seed', '?')}. Breast level pools both breasts of every exam."
    )
    return (
        "<h2>Discrimination</h2>"
        + _table(["Figure", "Value (CI)", "Positives / negatives"], rows)
        + f"<p class='note'>{_e(note)}</p>"
    )


_CI_KEYS = (("value", "value"), ("low", "ci_low"), ("high", "ci_high"))


def _operating_section(summary: dict) -> str:
    parts = []
    points = summary.get("operating_points") or {}
    rows = []
    for task, r in points.items():
        for target, v in r["sensitivity_at_specificity"].items():
            rows.append([f"{task}: sensitivity at specificity ≥ {target}", _ci(v)])
        for target, v in r["specificity_at_sensitivity"].items():
            rows.append([f"{task}: specificity at sensitivity ≥ {target}", _ci(v)])
    if rows:
        parts.append(_table(["Operating point (this split's own ROC curve)", "Value (CI)"], rows))
    chosen = summary.get("validation_threshold") or {}
    for task, r in chosen.items():
        if not isinstance(r, dict) or "threshold" not in r:
            continue
        rows = []
        for split in ("val", "test"):
            c = r.get(split)
            if not c:
                continue
            ci = c.get("ci", {})
            rows.append(
                [split]
                + [_ci({"value": c[k], **ci.get(k, {})}) for k in ("sensitivity", "specificity")]
                + [_ci({"value": c[k], **ci.get(k, {})}) for k in ("ppv", "npv")]
                + [_num(c[k], 0) for k in ("tp", "fp", "tn", "fn")]
            )
        parts.append(
            f"<p>{_e(task)}: threshold <b>{_e(_num(r['threshold'], 4))}</b> chosen on val at "
            f"{_e(r['operating_point'])}, applied unchanged (positive when probability ≥ "
            "threshold).</p>"
            + _table(
                ["Split", "Sensitivity", "Specificity", "PPV", "NPV", "TP", "FP", "TN", "FN"],
                rows,
            )
        )
    note = summary.get("validation_threshold_note")
    if note:
        parts.append(f"<p class='note'>{_e(note)}</p>")
    return "<h2>Operating points</h2>" + "".join(parts) if parts else ""


def _ci(v: dict) -> str:
    return _with_ci(v.get("value"), v.get("ci_low"), v.get("ci_high"))


def _calibration_section(summary: dict) -> str:
    calib = summary.get("calibration")
    if not calib:
        return ""
    calibrated = summary.get("calibrated") or {}
    after = calibrated.get("calibration") or {}
    header = ["Task", "ECE", "Brier", "Mean probability", "Observed rate"]
    if after:
        header += ["ECE calibrated", "Brier calibrated", "Temperature"]
    rows = []
    for task in ("malignant", "benign"):
        r = calib.get(task)
        if not r:
            continue
        row = [task, _num(r["ece"]), _num(r["brier"]), _num(r["mean_probability"])]
        row.append(_num(r["observed_rate"]))
        if after:
            row += [_num(after[task]["ece"]), _num(after[task]["brier"])]
            row.append(_num(calibrated.get("temperature", {}).get(task)))
        rows.append(row)
    bins = calib.get("bins", {})
    note = (
        f"ECE over {bins.get('n_bins', '?')} equal-width bins of [0, 1]; Brier score = mean "
        "squared error of the probability; breast level."
    )
    if after:
        fitted = calibrated.get("fitted_on") or {}
        note += (
            f" Calibrated: temperature scaling fitted on the {fitted.get('split')} split "
            f"({fitted.get('n_breasts')} breasts)"
            + (", so in-sample here." if calibrated.get("in_sample") else ".")
        )
        for warning in calibrated.get("warnings") or []:
            note += f" Warning: {warning}"
    return "<h2>Calibration</h2>" + _table(header, rows) + f"<p class='note'>{_e(note)}</p>"


def _decision_section(summary: dict) -> str:
    dc = summary.get("decision_curve")
    if not dc:
        return ""
    runs = dc.get("useful_range") or []
    where = ", ".join(f"{a:.2f}–{b:.2f}" for a, b in runs)
    where = f"at threshold probabilities {where}" if where else "at no threshold probability"
    return (
        "<h2>Decision curve</h2>"
        f"<p>Breast-level {_e(dc.get('task', 'malignant'))}: the model's net benefit exceeds "
        f"both treat-all and treat-none {_e(where)} "
        f"(prevalence {_num(dc.get('prevalence'))}).</p>"
    )


def evaluation_html(summary: dict, figures=(), title: str | None = None) -> str:
    """The HTML text of an evaluation page.

    Args:
      summary: dict as written to ``metrics.json`` by ``mri_keras.evaluate``; sections whose
        keys are absent are left out.
      figures: sequence of ``(caption, png_path)``; missing files are left out.
      title: page title. Defaults to "<name> (<split>)".
    """
    title = title or f"{summary.get('name', 'model')} ({summary.get('split', '')})"
    c = summary.get("counts", {})
    facts = [
        ["Split", summary.get("split", "")],
        ["Input", summary.get("input_variant", "")],
        ["Test-time augmentation", summary.get("tta", "")],
        [
            "Exams / patients / breasts",
            f"{c.get('exams')} / {c.get('patients')} / {c.get('breasts')}",
        ],
        ["Malignant / benign breasts", f"{c.get('malignant_breasts')} / {c.get('benign_breasts')}"],
    ]
    body = (
        _table(None, [f for f in facts if f[1] not in ("", None)])
        + _auc_section(summary)
        + _operating_section(summary)
        + _calibration_section(summary)
        + _decision_section(summary)
        + ("<h2>Figures</h2>" + _figures(figures) if figures else "")
    )
    return _page(title, body)


def write_evaluation_report(output_dir: str, summary: dict, title: str | None = None) -> str:
    """Writes ``output_dir/report.html`` from a summary and the PNGs beside it; returns it."""
    candidates = (
        ("Breast-level ROC", "roc.png"),
        ("Reliability diagram", "reliability.png"),
        ("Reliability diagram, calibrated", "reliability_calibrated.png"),
        ("Decision curve (malignant)", "decision_curve.png"),
    )
    figures = [(cap, os.path.join(output_dir, name)) for cap, name in candidates]
    path = os.path.join(output_dir, FILENAME)
    fileio.atomic_write_text(path, evaluation_html(summary, figures, title))
    return path


def markdown_to_html(text: str) -> str:
    """The small markdown subset the experiment tables use: pipe tables, ``- `` lists,
    paragraphs, ``*emphasis*`` in cells. Everything is escaped."""
    out, table, items, para = [], [], [], []

    def flush():
        if table:
            rows = [
                [c.strip() for c in line.strip().strip("|").split("|")]
                for line in table
                if not set(line.replace("|", "").strip()) <= set("-: ")
            ]
            out.append(_table(rows[0], rows[1:]) if rows else "")
            table.clear()
        if items:
            out.append("<ul>" + "".join(f"<li>{_e(i)}</li>" for i in items) + "</ul>")
            items.clear()
        if para:
            out.append(f"<p>{_e(' '.join(para))}</p>")
            para.clear()

    for line in text.splitlines():
        stripped = line.strip()
        kind = "table" if stripped.startswith("|") else "item" if stripped.startswith("- ") else ""
        if not stripped or (kind != "table" and table) or (kind != "item" and items):
            flush()
        if kind == "table":
            table.append(stripped)
        elif kind == "item":
            items.append(stripped[2:])
        elif stripped:
            para.append(stripped)
    flush()
    return "".join(out).replace("<td>*", "<td><i>").replace("*</td>", "</i></td>")


def write_experiment_report(output_dir: str, title: str, sections, figures=()) -> str:
    """Writes ``output_dir/report.html`` for an experiment (Table 1, data size...).

    Args:
      output_dir: str. Where table1.md / data_fraction.md were written.
      title: str. Page title.
      sections: sequence of ``(heading, markdown_text)``.
      figures: sequence of ``(caption, png_path)``.

    Returns:
      The path written.
    """
    body = "".join(f"<h2>{_e(h)}</h2>{markdown_to_html(md)}" for h, md in sections)
    if figures:
        body += "<h2>Figures</h2>" + _figures(figures)
    path = os.path.join(output_dir, FILENAME)
    fileio.atomic_write_text(path, _page(title, body))
    return path
