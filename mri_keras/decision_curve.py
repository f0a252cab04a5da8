"""Decision-curve analysis (Vickers & Elkin 2006) of the breast-level malignant probability.

At a threshold probability ``pt`` (the risk at which a reader would act, e.g. biopsy), acting
on every breast with ``p >= pt`` has net benefit ``TP/n - FP/n * pt / (1 - pt)``: true
positives, less false positives weighted by the odds of ``pt``. The model is compared with
acting on every breast (``prevalence - (1 - prevalence) * pt / (1 - pt)``) and on none (0).
A model is useful at ``pt`` where its curve lies above both.
"""

from __future__ import annotations

import csv
import io

import numpy as np

from mri_keras import metrics as metrics_lib

CSV_FILENAME = "decision_curve.csv"
PNG_FILENAME = "decision_curve.png"
DEFAULT_THRESHOLDS = tuple(round(0.01 * i, 2) for i in range(1, 100))  # 0.01 .. 0.99


def net_benefit(y_true, y_score, thresholds=DEFAULT_THRESHOLDS) -> dict:
    """Net benefit of the model, of treating all and of treating none, per threshold.

    Args:
      y_true: array-like (n,) of 0/1.
      y_score: array-like (n,) of probabilities.
      thresholds: threshold probabilities in (0, 1). Defaults to 0.01, 0.02, ..., 0.99.

    Returns:
      dict of lists ``threshold``, ``model``, ``treat_all``, ``treat_none``,
      ``true_positives``, ``false_positives``; plus ``n`` and ``prevalence``.
    """
    y = np.asarray(y_true).astype(bool).reshape(-1)
    s = np.asarray(y_score, np.float64).reshape(-1)
    t = np.asarray(thresholds, np.float64)
    if y.size == 0:
        raise ValueError("net_benefit needs at least one sample")
    if np.any((t <= 0) | (t >= 1)):
        raise ValueError(f"thresholds must lie in (0, 1). Received: {t.min()}..{t.max()}")
    n = y.size
    called = s[None, :] >= t[:, None]  # (thresholds, samples)
    tp = (called & y[None, :]).sum(axis=1)
    fp = (called & ~y[None, :]).sum(axis=1)
    odds = t / (1.0 - t)
    prevalence = float(y.mean())
    return {
        "threshold": [float(v) for v in t],
        "model": [float(v) for v in tp / n - fp / n * odds],
        "treat_all": [float(v) for v in prevalence - (1.0 - prevalence) * odds],
        "treat_none": [0.0] * len(t),
        "true_positives": [int(v) for v in tp],
        "false_positives": [int(v) for v in fp],
        "n": int(n),
        "prevalence": prevalence,
    }


def decision_curve(labels, probs, task: str = "malignant", thresholds=DEFAULT_THRESHOLDS):
    """`net_benefit` of the breast-level ``task`` probabilities (the paper's pooling)."""
    y, s = metrics_lib.breast_level_arrays(labels, probs, task)
    return {"task": task, "level": "breast", **net_benefit(y, s, thresholds)}


def useful_range(curve: dict) -> list:
    """``[[low, high], ...]``: runs of thresholds where the model beats treat-all and -none."""
    runs, start, prev = [], None, None
    for t, m, a in zip(curve["threshold"], curve["model"], curve["treat_all"]):
        better = m > max(a, 0.0)
        if better and start is None:
            start = t
        if not better and start is not None:
            runs.append([start, prev])
            start = None
        prev = t
    if start is not None:
        runs.append([start, prev])
    return runs


def to_csv(curve: dict) -> str:
    """The curve as CSV text: ``threshold,model,treat_all,treat_none,true_positives,...``."""
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    columns = ("threshold", "model", "treat_all", "treat_none", "true_positives", "false_positives")
    w.writerow(columns)
    for row in zip(*(curve[c] for c in columns)):
        w.writerow([f"{v:.6g}" if isinstance(v, float) else v for v in row])
    return buf.getvalue()


def plot_decision_curve(curve: dict, path: str, title: str = "") -> None:
    """Net benefit of the model, treat-all and treat-none against the threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    t = np.asarray(curve["threshold"])
    ax.plot(t, curve["model"], color="tab:red", linewidth=1.5, label="model")
    ax.plot(t, curve["treat_all"], color="0.4", linewidth=1, label="treat all")
    ax.plot(t, curve["treat_none"], color="0.7", linestyle="--", linewidth=1, label="treat none")
    prevalence = curve["prevalence"]
    ax.set_ylim(min(-0.05, -0.25 * prevalence), max(0.05, 1.1 * prevalence))
    ax.set_xlim(0, 1)
    ax.set_xlabel("threshold probability")
    ax.set_ylabel("net benefit")
    ax.set_title(
        (title or f"Decision curve, breast-level {curve.get('task', 'malignant')}")
        + f"\n{curve['n']} breasts, prevalence {prevalence:.3f}",
        fontsize=9,
    )
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
