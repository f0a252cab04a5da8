"""Tables and plots of the paper's experiments, from evaluate/ensemble output directories.

Used by ``scripts/table1.sh`` and ``scripts/data_fraction.sh``; also runnable on its own::

    python -m mri_keras.experiments --report=table1 --eval_root=OUT/eval --output_dir=OUT
    python -m mri_keras.experiments --report=data_fraction --eval_root=OUT/eval --output_dir=OUT

``table1`` reads ``EVAL_ROOT/<row>/<split>/metrics.json`` for the seven input variants
(``t0 t1 t2 t3 t1sub t2sub t3sub``) and the ensembles (``mean_sub``: mean of the three
subtraction models; ``caruana_all``: Caruana selection over all seven), and writes
``table1.md`` / ``table1.csv`` in the paper's layout (image, benign AUC, malignant AUC, each
with its 95% CI). ``data_fraction`` reads ``EVAL_ROOT/frac_<percent>/<split>/metrics.json`` and
draws ``data_fraction.png`` (AUC against the percentage of training patients, log x axis, CI
band) and ``data_fraction.csv``.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import os
import re
from typing import Optional, Sequence

import numpy as np

from mri_keras import evaluate as evaluate_lib
from mri_keras import metrics as metrics_lib

TABLE1_VARIANTS = ("t0", "t1", "t2", "t3", "t1sub", "t2sub", "t3sub")
TABLE1_ENSEMBLES = (
    ("mean_sub", "Mean of t1-t0, t2-t0, t3-t0"),
    ("caruana_all", "Caruana ensemble of all seven"),
)
IMAGE_NAMES = {
    "t0": "t0 (pre-contrast)",
    "t1": "t1 (1st post-contrast)",
    "t2": "t2 (2nd post-contrast)",
    "t3": "t3 (3rd post-contrast)",
    "t1sub": "t1 - t0",
    "t2sub": "t2 - t0",
    "t3sub": "t3 - t0",
}
FRACTION_DIR = re.compile(r"^frac_(\d+(?:\.\d+)?)$")
REPORTS = ("table1", "data_fraction")


@dataclasses.dataclass(frozen=True)
class ExperimentsConfig:
    """Which report to build.

    Attributes:
      report: str. "table1" or "data_fraction".
      eval_root: str. Directory of evaluation outputs (one subdirectory per model/ensemble).
      output_dir: str. Where the table/plot files go.
      split: str. Split reported. Defaults to "test".
      title: str. Plot title suffix. Defaults to "".
    """

    report: str
    eval_root: str
    output_dir: str
    split: str = "test"
    title: str = ""

    def __post_init__(self):
        if self.report not in REPORTS:
            raise ValueError(f"report must be one of {REPORTS}. Received: {self.report!r}")


def _cell(result: Optional[dict]) -> str:
    return "not run" if result is None else metrics_lib.format_auc(result)


def table1_rows(eval_root: str, split: str = "test") -> list:
    """Rows ``{key, image, benign, malignant, n_exams}`` (results dicts, None when missing)."""
    rows = []
    entries = [(v, IMAGE_NAMES[v]) for v in TABLE1_VARIANTS] + list(TABLE1_ENSEMBLES)
    for key, image in entries:
        path = os.path.join(eval_root, key, split, evaluate_lib.METRICS_FILENAME)
        row = {"key": key, "image": image, "benign": None, "malignant": None, "n_exams": None}
        if os.path.isfile(path):
            m = evaluate_lib.read_metrics(path)
            row.update(benign=m["breast_level"]["benign"],
                       malignant=m["breast_level"]["malignant"],
                       n_exams=m["counts"]["exams"])
            if "ensemble" in m:
                chosen = {k: v for k, v in m["ensemble"]["chosen"].items() if v}
                row["chosen"] = chosen
                members = m["ensemble"]["members"]
                if key == "caruana_all" and len(members) != len(TABLE1_VARIANTS):
                    row["image"] = f"Caruana ensemble of {len(members)} models"
                if key == "mean_sub" and len(members) != 3:
                    row["image"] = f"Mean of {', '.join(members)}"
        rows.append(row)
    return rows


def format_table1(rows: Sequence[dict], split: str = "test") -> str:
    """Markdown table in the paper's layout."""
    level = "95%"
    lines = [
        f"Breast-level AUC on the {split} split ({level} bootstrap CI, resampled by patient)",
        "",
        "| Image | Benign AUC | Malignant AUC |",
        "|---|---|---|",
    ]
    for i, row in enumerate(rows):
        if i == len(TABLE1_VARIANTS):
            lines.append("| *Ensembles* | | |")
        lines.append(f"| {row['image']} | {_cell(row['benign'])} | {_cell(row['malignant'])} |")
    chosen = [r for r in rows if r.get("chosen")]
    for row in chosen:
        if row["key"] == "caruana_all":
            picks = ", ".join(f"{k} x{v}" for k, v in row["chosen"].items())
            lines += ["", f"Caruana selection (on val): {picks}"]
    return "\n".join(lines) + "\n"


def write_table1(config: ExperimentsConfig) -> str:
    """Writes table1.md and table1.csv; returns the markdown."""
    rows = table1_rows(config.eval_root, config.split)
    if all(r["malignant"] is None for r in rows):
        raise FileNotFoundError(
            f"No {config.split} metrics.json under {config.eval_root}/<{','.join(TABLE1_VARIANTS)}>"
            f"/{config.split}/; run scripts/table1.sh (or mri_keras.evaluate) first."
        )
    text = format_table1(rows, config.split)
    os.makedirs(config.output_dir, exist_ok=True)
    with open(os.path.join(config.output_dir, "table1.md"), "w") as f:
        f.write(text)
    with open(os.path.join(config.output_dir, "table1.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["key", "image", "task", "auc", "ci_low", "ci_high", "n_exams"])
        for row in rows:
            for task in ("benign", "malignant"):
                r = row[task] or {}
                w.writerow([row["key"], row["image"], task, r.get("auc", ""),
                            r.get("ci_low", ""), r.get("ci_high", ""), row["n_exams"] or ""])
    return text


def fraction_points(eval_root: str, split: str = "test") -> list:
    """``[(percent, metrics dict)]`` for every ``frac_<percent>`` evaluation, by percent."""
    points = []
    for path in glob.glob(os.path.join(eval_root, "frac_*", split, evaluate_lib.METRICS_FILENAME)):
        match = FRACTION_DIR.match(os.path.basename(os.path.dirname(os.path.dirname(path))))
        if match:
            points.append((float(match.group(1)), evaluate_lib.read_metrics(path)))
    return sorted(points, key=lambda p: p[0])


def plot_data_fraction(points, path: str, split: str = "test", title: str = "") -> None:
    """AUC vs percentage of training patients (log x), one line + CI band per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.array([p for p, _ in points])
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for task, color in (("malignant", "tab:red"), ("benign", "tab:blue")):
        res = [m["breast_level"][task] for _, m in points]
        auc = np.array([r["auc"] for r in res], float)
        low = np.array([r["ci_low"] for r in res], float)
        high = np.array([r["ci_high"] for r in res], float)
        ax.plot(x, auc, "o-", color=color, label=f"{task} AUC")
        ax.fill_between(x, low, high, color=color, alpha=0.2, linewidth=0,
                        label=f"{task} 95% CI")
    ax.set_xscale("log")
    ax.set_xticks(x)
    ax.set_xticklabels([f"{v:g}%" for v in x])
    ax.minorticks_off()
    ax.axhline(0.5, color="0.6", linestyle="--", linewidth=1)
    ax.set_xlabel("training patients used (% of the training split, log scale)")
    ax.set_ylabel(f"breast-level AUC ({split})")
    ax.set_ylim(0.0, 1.0)
    ax.set_title(f"AUC vs training-set size{' - ' + title if title else ''}", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_data_fraction(config: ExperimentsConfig) -> str:
    """Writes data_fraction.png and data_fraction.csv; returns a text summary."""
    points = fraction_points(config.eval_root, config.split)
    if not points:
        raise FileNotFoundError(
            f"No {config.eval_root}/frac_<percent>/{config.split}/metrics.json found; run "
            "scripts/data_fraction.sh (or mri_keras.evaluate) first."
        )
    os.makedirs(config.output_dir, exist_ok=True)
    plot_data_fraction(points, os.path.join(config.output_dir, "data_fraction.png"),
                       config.split, config.title)
    lines = ["| Training patients | Benign AUC | Malignant AUC |", "|---|---|---|"]
    with open(os.path.join(config.output_dir, "data_fraction.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["percent", "task", "auc", "ci_low", "ci_high"])
        for percent, m in points:
            for task in ("benign", "malignant"):
                r = m["breast_level"][task]
                w.writerow([percent, task, r["auc"], r["ci_low"], r["ci_high"]])
            lines.append(f"| {percent:g}% | {metrics_lib.format_auc(m['breast_level']['benign'])} "
                         f"| {metrics_lib.format_auc(m['breast_level']['malignant'])} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(config.output_dir, "data_fraction.md"), "w") as f:
        f.write(text)
    return text


def run(config: ExperimentsConfig) -> str:
    """Builds the report; returns its text."""
    if config.report == "table1":
        return write_table1(config)
    return write_data_fraction(config)


def define_flags():
    """Defines this entry point's flags."""
    from absl import flags

    flags.DEFINE_enum("report", None, list(REPORTS), "Which report to build.")
    flags.DEFINE_string("eval_root", None, "Directory of evaluation outputs.")
    flags.DEFINE_string("output_dir", None, "Where the table/plot go.")
    flags.DEFINE_enum("split", "test", ["val", "test"], "Split reported.")
    flags.DEFINE_string("title", "", "Plot title suffix.")
    flags.mark_flags_as_required(["report", "eval_root", "output_dir"])


def main(argv):
    from absl import app, flags

    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    print(run(ExperimentsConfig(report=f.report, eval_root=f.eval_root,
                                output_dir=f.output_dir, split=f.split, title=f.title)), end="")


if __name__ == "__main__":
    from absl import app

    define_flags()
    app.run(main)
