"""Tables and plots of the paper's experiments, from evaluate/ensemble output directories.

Used by ``scripts/table1.sh`` and ``scripts/data_fraction.sh``; also runnable on its own::

    python -m mri_keras.experiments --report=table1 --eval_root=OUT/eval --output_dir=OUT
    python -m mri_keras.experiments --report=data_fraction --eval_root=OUT/eval --output_dir=OUT

``table1`` reads ``EVAL_ROOT/<row>/<split>/metrics.json`` (or, for runs over several training
seeds, ``EVAL_ROOT/<row>/seed_<S>/<split>/metrics.json``) for the seven input variants
(``t0 t1 t2 t3 t1sub t2sub t3sub``) and the ensembles (``mean_sub``: mean of the three
subtraction models; ``caruana_all``: Caruana selection over all seven), and writes
``table1.md`` / ``table1.csv`` in the paper's layout (image, benign AUC, malignant AUC, each
with its 95% CI). Rows beyond the paper (``TABLE1_EXTRA_ROWS``: one network on several input
images stacked as channels, ``configs/three_channel.flags`` and ``configs/subtractions.flags``)
follow under their own heading when they were evaluated, and are left out otherwise; they are
members of neither ensemble, which stay the paper's. ``data_fraction`` reads
``EVAL_ROOT/frac_<percent>/<split>/metrics.json`` and draws ``data_fraction.png`` (AUC
against the percentage of training patients, log x axis, CI band; with seeds: the mean over
seeds with +-1 sd error bars) and ``data_fraction.csv``.
Every report also writes ``report.html`` beside its files: the same tables and the figure in
one self-contained page (`mri_keras.report`).
``seeds`` reads ``EVAL_ROOT/seed_<S>/{val,test}/metrics.json`` (``scripts/seeds.sh``) and
reports each seed, the mean +- sd and the lowest seed.

With several seeds a figure is reported as mean +- sd over seeds (sample standard deviation),
with the lowest seed named: one seed's figure is an anecdote.
"""

from __future__ import annotations

from tfrecords_tools import quiet_tf  # noqa: F401  # isort: skip (first: quiets TF's start-up)

import csv
import dataclasses
import glob
import json
import os
import re
from collections.abc import Sequence

import numpy as np

from mri_keras import evaluate as evaluate_lib
from mri_keras import metrics as metrics_lib

TABLE1_VARIANTS = ("t0", "t1", "t2", "t3", "t1sub", "t2sub", "t3sub")
TABLE1_ENSEMBLES = (
    ("mean_sub", "Mean of t1-t0, t2-t0, t3-t0"),
    ("caruana_all", "Caruana ensemble of all seven"),
)
# Beyond the paper: multi-channel inputs (the row name is its flagfile, configs/<row>.flags).
TABLE1_EXTRA_ROWS = ("three_channel", "subtractions")
IMAGE_NAMES = {
    "t0": "t0 (pre-contrast)",
    "t1": "t1 (1st post-contrast)",
    "t2": "t2 (2nd post-contrast)",
    "t3": "t3 (3rd post-contrast)",
    "t1sub": "t1 - t0",
    "t2sub": "t2 - t0",
    "t3sub": "t3 - t0",
    "three_channel": "t0, t1, t2 as 3 channels of one network",
    "subtractions": "t1 - t0, t2 - t0, t3 - t0 as 3 channels of one network",
}
EXTRA_ROWS_HEADING = "*Beyond the paper* (not in Gong et al.)"
FRACTION_DIR = re.compile(r"^frac_(\d+(?:\.\d+)?)$")
SEED_DIR = re.compile(r"^seed_(\d+)$")
REPORTS = ("table1", "data_fraction", "seeds")
# Gong et al., "Large-scale classification of breast MRI exams using deep convolutional
# networks", Medical Imaging meets NeurIPS 2019, Table 1 (test split): (benign, malignant).
PAPER_TABLE1 = {
    "t0": (0.6304, 0.6714),
    "t1": (0.6055, 0.6999),
    "t2": (0.6766, 0.7620),
    "t3": (0.7038, 0.7809),
    "t1sub": (0.7011, 0.8135),
    "t2sub": (0.7267, 0.8486),
    "t3sub": (0.7227, 0.8418),
    "mean_sub": (None, 0.8497),
    "caruana_all": (None, 0.8459),
}
PAPER_CITATION = "Gong et al. 2019, Table 1"


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


def _cell(result: dict | None) -> str:
    return "not run" if result is None else metrics_lib.format_auc(result)


def seed_runs(eval_root: str, key: str, split: str) -> list:
    """``[(seed or None, metrics)]`` of one row: ``key/seed_<S>/<split>/metrics.json`` for
    every seed (by seed), else ``key/<split>/metrics.json`` as one run (seed None)."""
    runs = []
    for path in glob.glob(
        os.path.join(eval_root, key, "seed_*", split, evaluate_lib.METRICS_FILENAME)
    ):
        match = SEED_DIR.match(os.path.basename(os.path.dirname(os.path.dirname(path))))
        if match:
            runs.append((int(match.group(1)), evaluate_lib.read_metrics(path)))
    if runs:
        return sorted(runs, key=lambda r: r[0])
    single = os.path.join(eval_root, key, split, evaluate_lib.METRICS_FILENAME)
    return [(None, evaluate_lib.read_metrics(single))] if os.path.isfile(single) else []


def spread(values, seeds=None) -> dict:
    """Mean, sample sd, min and max of per-seed figures, and which seed is lowest.

    Args:
      values: sequence of floats (NaN where a figure is undefined; left out).
      seeds: optional sequence of the seeds, same order.

    Returns:
      dict ``n``, ``mean``, ``sd`` (ddof=1; 0 for one value), ``min``, ``max``, ``values``,
      ``seeds`` and ``lowest_seed`` (None without seeds). NaNs when no value is defined.
    """
    seeds = list(seeds) if seeds is not None else [None] * len(values)
    pairs = [(float(v), s) for v, s in zip(values, seeds) if v is not None and not np.isnan(v)]
    if not pairs:
        nan = float("nan")
        return {
            "n": 0,
            "mean": nan,
            "sd": nan,
            "min": nan,
            "max": nan,
            "values": [],
            "seeds": [],
            "lowest_seed": None,
        }
    arr = np.array([v for v, _ in pairs])
    lowest = min(pairs, key=lambda p: p[0])
    return {
        "n": len(pairs),
        "mean": float(arr.mean()),
        "sd": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0,
        "min": float(arr.min()),
        "max": float(arr.max()),
        "values": [v for v, _ in pairs],
        "seeds": [s for _, s in pairs],
        "lowest_seed": lowest[1],
    }


def format_spread(stats: dict, digits: int = 3) -> str:
    """``0.934 +- 0.012 (n=3)``; ``not run`` when there is no figure."""
    if not stats["n"]:
        return "not run"
    if stats["n"] == 1:
        return f"{stats['mean']:.{digits}f} (1 seed)"
    return f"{stats['mean']:.{digits}f} ± {stats['sd']:.{digits}f} (n={stats['n']})"


def _per_seed(stats: dict, digits: int = 3) -> str:
    parts = [f"s{s}: {v:.{digits}f}" for v, s in zip(stats["values"], stats["seeds"])]
    if stats["n"] > 1 and stats["lowest_seed"] is not None:
        parts.append(f"lowest seed {stats['lowest_seed']}")
    return ", ".join(parts)


def _task_spread(runs, task: str) -> dict:
    return spread([m["breast_level"][task]["auc"] for _, m in runs], [s for s, _ in runs])


def _table1_entries(eval_root: str, split: str) -> list:
    """``[(key, image)]``: the paper's rows and ensembles, then the extra rows evaluated."""
    entries = [(v, IMAGE_NAMES[v]) for v in TABLE1_VARIANTS] + list(TABLE1_ENSEMBLES)
    return entries + [
        (key, IMAGE_NAMES[key]) for key in TABLE1_EXTRA_ROWS if seed_runs(eval_root, key, split)
    ]


def _heading(i: int, key: str, rows: Sequence[dict], columns: int) -> list:
    """The section heading line to print before row ``i`` (``key``), if any."""
    cells = " |" * (columns - 1)
    if i == len(TABLE1_VARIANTS):
        return [f"| *Ensembles* |{cells}"]
    if key in TABLE1_EXTRA_ROWS and rows[i - 1]["key"] not in TABLE1_EXTRA_ROWS:
        return [f"| {EXTRA_ROWS_HEADING} |{cells}"]
    return []


def table1_rows(eval_root: str, split: str = "test") -> list:
    """Rows ``{key, image, benign, malignant, n_exams}`` (results dicts, None when missing)."""
    rows = []
    for key, image in _table1_entries(eval_root, split):
        path = os.path.join(eval_root, key, split, evaluate_lib.METRICS_FILENAME)
        row = {"key": key, "image": image, "benign": None, "malignant": None, "n_exams": None}
        if os.path.isfile(path):
            m = evaluate_lib.read_metrics(path)
            row.update(
                benign=m["breast_level"]["benign"],
                malignant=m["breast_level"]["malignant"],
                n_exams=m["counts"]["exams"],
            )
            if "ensemble" in m:
                chosen = {k: v for k, v in m["ensemble"]["chosen"].items() if v}
                row["chosen"] = chosen
                members = m["ensemble"]["members"]
                if key == "caruana_all" and len(members) != len(TABLE1_VARIANTS):
                    row["image"] = f"Caruana ensemble of {len(members)} models"
                if key == "mean_sub" and len(members) != 3:
                    row["image"] = f"Mean of {', '.join(members)}"
            row["vs_best"] = vs_best_member(eval_root, key)
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
        lines += _heading(i, row["key"], rows, 3)
        lines.append(f"| {row['image']} | {_cell(row['benign'])} | {_cell(row['malignant'])} |")
    compared = [r for r in rows if r.get("vs_best")]
    if compared:
        lines += [
            "",
            "Ensemble minus its best member (highest val malignant AUC), test malignant AUC: "
            "paired patient bootstrap, and DeLong's test (breasts as independent samples):",
            "",
        ]
        lines += [f"- {r['image']} {format_vs_best(r['vs_best'])}" for r in compared]
    chosen = [r for r in rows if r.get("chosen")]
    for row in chosen:
        if row["key"] == "caruana_all":
            picks = ", ".join(f"{k} x{v}" for k, v in row["chosen"].items())
            lines += ["", f"Caruana selection (on val): {picks}"]
    return "\n".join(lines) + "\n"


def _is_seeded(eval_root: str, split: str) -> bool:
    keys = list(TABLE1_VARIANTS) + [k for k, _ in TABLE1_ENSEMBLES] + list(TABLE1_EXTRA_ROWS)
    return any(r[0] is not None for k in keys for r in seed_runs(eval_root, k, split))


def vs_best_member(eval_root: str, key: str, seed=None) -> dict | None:
    """The ensemble's ``test_vs_best_member`` from ``key[/seed_<S>]/ensemble.json``: the
    `metrics.paired_auc_difference` of the ensemble and its best member on val (paired
    patient bootstrap, with DeLong's test under ``delong``); None when absent."""
    path = os.path.join(eval_root, key, f"seed_{seed}" if seed is not None else "", "ensemble.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f).get("test_vs_best_member")


def format_vs_best(c: dict) -> str:
    """``vs t2sub: +0.012 (95% CI -0.004 to +0.029, bootstrap p=0.14, DeLong p=0.12)``."""
    delong = c.get("delong") or {}
    delong_p = delong.get("p_value")
    delong_text = f", DeLong p={delong_p:.3g}" if delong_p is not None else ""
    return (
        f"vs {c['member']}: {c['difference']:+.3f} (95% CI {c['ci_low']:+.3f} to "
        f"{c['ci_high']:+.3f}, bootstrap p={c['p_value']:.3g}{delong_text})"
    )


def table1_seed_rows(eval_root: str, split: str = "test") -> list:
    """Rows ``{key, image, runs, benign, malignant, vs_best}`` over training seeds.

    ``benign``/``malignant`` are ``spread`` dicts of the per-seed AUCs. ``vs_best`` (ensemble
    rows) is the ``spread`` of the per-seed paired differences ensemble - best member, the
    member chosen on val, with ``per_seed`` entries ``{seed, member, difference, ci_low,
    ci_high, p_value}``.
    """
    rows = []
    for key, image in _table1_entries(eval_root, split):
        runs = seed_runs(eval_root, key, split)
        row = {
            "key": key,
            "image": image,
            "runs": runs,
            "benign": _task_spread(runs, "benign"),
            "malignant": _task_spread(runs, "malignant"),
            "vs_best": None,
        }
        comparisons = []
        for seed, _ in runs:
            best = vs_best_member(eval_root, key, seed)
            if best:
                # The training seed wins over the bootstrap seed the comparison also records.
                comparisons.append({**best, "bootstrap_seed": best.get("seed"), "seed": seed})
        if comparisons:
            stats = spread([c["difference"] for c in comparisons], [c["seed"] for c in comparisons])
            row["vs_best"] = {**stats, "per_seed": comparisons}
        rows.append(row)
    return rows


def format_table1_seeds(rows: Sequence[dict], split: str = "test") -> str:
    """Markdown: mean +- sd over seeds, per-seed malignant AUCs, the paper's figures."""
    seeds = sorted({s for r in rows for s, _ in r["runs"] if s is not None})
    lines = [
        f"Breast-level AUC on the {split} split: mean ± sd over training seeds "
        f"{', '.join(str(s) for s in seeds)} (sample sd); the paper's figures for comparison "
        f"({PAPER_CITATION}, its own data, one run each).",
        "",
        "| Image | Benign AUC | Malignant AUC | Malignant AUC per seed "
        "| Paper benign / malignant |",
        "|---|---|---|---|---|",
    ]
    for i, row in enumerate(rows):
        lines += _heading(i, row["key"], rows, 5)
        benign, malignant = PAPER_TABLE1.get(row["key"], (None, None))
        paper = f"{benign:.4f}" if benign is not None else "-"
        paper += f" / {malignant:.4f}" if malignant is not None else " / -"
        lines.append(
            f"| {row['image']} | {format_spread(row['benign'])} | "
            f"{format_spread(row['malignant'])} | {_per_seed(row['malignant'])} | {paper} |"
        )
    compared = [r for r in rows if r["vs_best"]]
    if compared:
        lines += [
            "",
            "Ensemble minus its best member (the member with the highest val malignant "
            "AUC), test malignant AUC, per seed: paired patient bootstrap, and DeLong's test "
            "(breasts as independent samples):",
            "",
        ]
        for row in compared:
            parts = [f"seed {c['seed']} {format_vs_best(c)}" for c in row["vs_best"]["per_seed"]]
            lines.append(
                f"- {row['image']}: mean {row['vs_best']['mean']:+.3f}; " + "; ".join(parts)
            )
    return "\n".join(lines) + "\n"


def _write_table1_seeds(config: ExperimentsConfig) -> str:
    rows = table1_seed_rows(config.eval_root, config.split)
    text = format_table1_seeds(rows, config.split)
    os.makedirs(config.output_dir, exist_ok=True)
    with open(os.path.join(config.output_dir, "table1.md"), "w") as f:
        f.write(text)
    with open(os.path.join(config.output_dir, "table1.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["key", "image", "task", "seed", "auc", "ci_low", "ci_high", "n_exams"])
        for row in rows:
            for seed, m in row["runs"]:
                for task in ("benign", "malignant"):
                    r = m["breast_level"][task]
                    w.writerow(
                        [
                            row["key"],
                            row["image"],
                            task,
                            seed,
                            r["auc"],
                            r["ci_low"],
                            r["ci_high"],
                            m["counts"]["exams"],
                        ]
                    )
    return text


def write_table1(config: ExperimentsConfig) -> str:
    """Writes table1.md and table1.csv; returns the markdown."""
    if _is_seeded(config.eval_root, config.split):
        return _write_table1_seeds(config)
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
                w.writerow(
                    [
                        row["key"],
                        row["image"],
                        task,
                        r.get("auc", ""),
                        r.get("ci_low", ""),
                        r.get("ci_high", ""),
                        row["n_exams"] or "",
                    ]
                )
    return text


def fraction_points(eval_root: str, split: str = "test") -> list:
    """``[(percent, metrics dict)]`` for every ``frac_<percent>`` evaluation, by percent."""
    points = []
    for path in glob.glob(os.path.join(eval_root, "frac_*", split, evaluate_lib.METRICS_FILENAME)):
        match = FRACTION_DIR.match(os.path.basename(os.path.dirname(os.path.dirname(path))))
        if match:
            points.append((float(match.group(1)), evaluate_lib.read_metrics(path)))
    return sorted(points, key=lambda p: p[0])


def _finish_fraction_plot(fig, ax, x, path: str, split: str, title: str) -> None:
    """Axes, labels and saving shared by both data-size plots."""
    import matplotlib.pyplot as plt

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
        ax.fill_between(x, low, high, color=color, alpha=0.2, linewidth=0, label=f"{task} 95% CI")
    _finish_fraction_plot(fig, ax, x, path, split, title)


def fraction_seed_points(eval_root: str, split: str = "test") -> list:
    """``[(percent, [(seed, metrics)])]`` for every ``frac_<percent>/seed_<S>`` evaluation."""
    points = []
    for path in glob.glob(os.path.join(eval_root, "frac_*")):
        match = FRACTION_DIR.match(os.path.basename(path))
        if match:
            runs = [
                r for r in seed_runs(eval_root, os.path.basename(path), split) if r[0] is not None
            ]
            if runs:
                points.append((float(match.group(1)), runs))
    return sorted(points, key=lambda p: p[0])


def plot_data_fraction_seeds(points, path: str, split: str = "test", title: str = "") -> None:
    """Mean AUC over seeds vs percentage of training patients, +-1 sd bars, seeds as dots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.array([p for p, _ in points])
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for task, color, shift in (("malignant", "tab:red", 1.02), ("benign", "tab:blue", 0.98)):
        stats = [_task_spread(runs, task) for _, runs in points]
        mean = np.array([s["mean"] for s in stats])
        sd = np.array([s["sd"] for s in stats])
        ax.errorbar(
            x * shift,
            mean,
            yerr=sd,
            fmt="o-",
            color=color,
            capsize=3,
            label=f"{task} AUC, mean ± sd over seeds",
        )
        for xi, s in zip(x, stats):
            ax.plot([xi * shift] * len(s["values"]), s["values"], ".", color=color, alpha=0.4)
    _finish_fraction_plot(fig, ax, x, path, split, title)


def _write_data_fraction_seeds(config: ExperimentsConfig, points) -> str:
    os.makedirs(config.output_dir, exist_ok=True)
    plot_data_fraction_seeds(
        points, os.path.join(config.output_dir, "data_fraction.png"), config.split, config.title
    )
    lines = [
        "| Training patients | Benign AUC | Malignant AUC | Malignant AUC per seed |",
        "|---|---|---|---|",
    ]
    with open(os.path.join(config.output_dir, "data_fraction.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["percent", "task", "seed", "auc", "ci_low", "ci_high"])
        for percent, runs in points:
            for seed, m in runs:
                for task in ("benign", "malignant"):
                    r = m["breast_level"][task]
                    w.writerow([percent, task, seed, r["auc"], r["ci_low"], r["ci_high"]])
            malignant = _task_spread(runs, "malignant")
            lines.append(
                f"| {percent:g}% | {format_spread(_task_spread(runs, 'benign'))} | "
                f"{format_spread(malignant)} | {_per_seed(malignant)} |"
            )
    text = "\n".join(lines) + "\n"
    with open(os.path.join(config.output_dir, "data_fraction.md"), "w") as f:
        f.write(text)
    return text


def write_seeds(config: ExperimentsConfig) -> str:
    """``scripts/seeds.sh``'s report: every seed's val and test AUCs, mean +- sd, lowest seed.

    Writes ``seeds.md`` and ``seeds.csv`` (one row per seed, split and task).
    """
    runs = {split: seed_runs(config.eval_root, "", split) for split in ("val", "test")}
    runs = {k: [r for r in v if r[0] is not None] for k, v in runs.items()}
    if not runs[config.split]:
        raise FileNotFoundError(
            f"No {config.eval_root}/seed_<S>/{config.split}/metrics.json found; run "
            "scripts/seeds.sh (or mri_keras.evaluate per seed) first."
        )
    lines = [
        f"Breast-level AUCs per training seed ({config.split} split; val = the split the best "
        "epoch was chosen on)",
        "",
        f"| Seed | Val malignant AUC | {config.split.capitalize()} malignant AUC (95% CI) | "
        f"{config.split.capitalize()} benign AUC (95% CI) |",
        "|---|---|---|---|",
    ]
    val = {s: m for s, m in runs["val"]}
    rows = []
    for seed, m in runs[config.split]:
        v = val.get(seed)
        v_text = f"{v['breast_level']['malignant']['auc']:.3f}" if v else "-"
        lines.append(
            f"| {seed} | {v_text} | {metrics_lib.format_auc(m['breast_level']['malignant'])}"
            f" | {metrics_lib.format_auc(m['breast_level']['benign'])} |"
        )
        rows.append((seed, m))
    malignant = _task_spread(rows, "malignant")
    benign = _task_spread(rows, "benign")
    lines += [
        "",
        f"{config.split} malignant AUC: {format_spread(malignant)}, range "
        f"{malignant['min']:.3f}-{malignant['max']:.3f}, lowest seed {malignant['lowest_seed']}",
        f"{config.split} benign AUC:    {format_spread(benign)}, range "
        f"{benign['min']:.3f}-{benign['max']:.3f}, lowest seed {benign['lowest_seed']}",
    ]
    text = "\n".join(lines) + "\n"
    os.makedirs(config.output_dir, exist_ok=True)
    with open(os.path.join(config.output_dir, "seeds.md"), "w") as f:
        f.write(text)
    with open(os.path.join(config.output_dir, "seeds.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["seed", "split", "task", "auc", "ci_low", "ci_high"])
        for split, split_runs in runs.items():
            for seed, m in split_runs:
                for task in ("benign", "malignant"):
                    r = m["breast_level"][task]
                    w.writerow([seed, split, task, r["auc"], r["ci_low"], r["ci_high"]])
    return text


def write_data_fraction(config: ExperimentsConfig) -> str:
    """Writes data_fraction.png and data_fraction.csv; returns a text summary."""
    seeded = fraction_seed_points(config.eval_root, config.split)
    if seeded:
        return _write_data_fraction_seeds(config, seeded)
    points = fraction_points(config.eval_root, config.split)
    if not points:
        raise FileNotFoundError(
            f"No {config.eval_root}/frac_<percent>/{config.split}/metrics.json found; run "
            "scripts/data_fraction.sh (or mri_keras.evaluate) first."
        )
    os.makedirs(config.output_dir, exist_ok=True)
    plot_data_fraction(
        points, os.path.join(config.output_dir, "data_fraction.png"), config.split, config.title
    )
    lines = ["| Training patients | Benign AUC | Malignant AUC |", "|---|---|---|"]
    with open(os.path.join(config.output_dir, "data_fraction.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["percent", "task", "auc", "ci_low", "ci_high"])
        for percent, m in points:
            for task in ("benign", "malignant"):
                r = m["breast_level"][task]
                w.writerow([percent, task, r["auc"], r["ci_low"], r["ci_high"]])
            lines.append(
                f"| {percent:g}% | {metrics_lib.format_auc(m['breast_level']['benign'])} "
                f"| {metrics_lib.format_auc(m['breast_level']['malignant'])} |"
            )
    text = "\n".join(lines) + "\n"
    with open(os.path.join(config.output_dir, "data_fraction.md"), "w") as f:
        f.write(text)
    return text


REPORT_TITLES = {
    "table1": "Table 1: breast-level AUC by input image",
    "data_fraction": "AUC vs training-set size",
    "seeds": "AUC per training seed",
}


def run(config: ExperimentsConfig) -> str:
    """Builds the report (and ``report.html`` beside it: `mri_keras.report`); returns its text."""
    from mri_keras import report

    if config.report == "table1":
        text = write_table1(config)
    elif config.report == "seeds":
        text = write_seeds(config)
    else:
        text = write_data_fraction(config)
    title = REPORT_TITLES[config.report] + (f" - {config.title}" if config.title else "")
    figure = os.path.join(config.output_dir, "data_fraction.png")
    figures = [(REPORT_TITLES["data_fraction"], figure)] if config.report == "data_fraction" else []
    report.write_experiment_report(
        config.output_dir, title, [(f"{config.split} split", text)], figures
    )
    return text


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
    print(
        run(
            ExperimentsConfig(
                report=f.report,
                eval_root=f.eval_root,
                output_dir=f.output_dir,
                split=f.split,
                title=f.title,
            )
        ),
        end="",
    )


if __name__ == "__main__":
    from absl import app

    define_flags()
    app.run(main)
