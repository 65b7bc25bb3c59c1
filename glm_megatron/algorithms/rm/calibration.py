"""Calibration of a reward model's pairwise predictions, and its plot.

The model predicts that chosen beats rejected with probability ``p = sigmoid(r_c - r_r)``. Its
*prediction* is the side it favours, with confidence ``max(p, 1 - p)`` in [0.5, 1]; it is right
when ``p > 0.5``. Bins of confidence are compared with the observed accuracy in each; the
expected calibration error is ``sum_b (n_b / N) |accuracy_b - confidence_b|``. A calibrated
reward model is right 80 % of the time when it is 80 % confident, which is what PPO assumes when
it treats reward differences as log-odds.
"""

from __future__ import annotations

import numpy as np


def calibration_table(chosen: np.ndarray, rejected: np.ndarray, num_bins: int = 10) -> dict:
    diff = np.asarray(chosen, dtype=np.float64) - np.asarray(rejected, dtype=np.float64)
    p = 1.0 / (1.0 + np.exp(-diff))
    confidence = np.maximum(p, 1.0 - p)
    correct = diff > 0
    edges = np.linspace(0.5, 1.0, num_bins + 1)
    # The top edge belongs to the last bin.
    which = np.clip(np.searchsorted(edges, confidence, side="right") - 1, 0, num_bins - 1)
    bins, ece = [], 0.0
    n = len(diff)
    for b in range(num_bins):
        sel = which == b
        count = int(sel.sum())
        row = {"lower": float(edges[b]), "upper": float(edges[b + 1]), "count": count,
               "mean_confidence": float(confidence[sel].mean()) if count else None,
               "accuracy": float(correct[sel].mean()) if count else None}
        if count:
            ece += count / n * abs(row["accuracy"] - row["mean_confidence"])
        bins.append(row)
    return {"bins": bins, "expected_calibration_error": float(ece) if n else None}


def plot_calibration(table: dict, path: str, title: str = "reward model calibration") -> str:
    """Reliability diagram as PNG (matplotlib, imported lazily with the Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in table["bins"] if r["count"]]
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0.5, 1.0], [0.5, 1.0], "--", color="gray", label="perfect calibration")
    if rows:
        centers = [(r["lower"] + r["upper"]) / 2 for r in rows]
        width = rows[0]["upper"] - rows[0]["lower"]
        ax.bar(centers, [r["accuracy"] for r in rows], width=width * 0.9, alpha=0.6,
               label="observed accuracy")
        ax.plot([r["mean_confidence"] for r in rows], [r["accuracy"] for r in rows], "o-",
                color="C1", label="accuracy at mean confidence")
    ece = table.get("expected_calibration_error")
    ax.set_title(f"{title}\nECE = {ece:.3f}" if ece is not None else title)
    ax.set_xlabel("predicted confidence max(p, 1-p)\np = sigmoid(r_chosen - r_rejected)")
    ax.set_ylabel("observed accuracy")
    ax.set_xlim(0.5, 1.0)
    ax.set_ylim(0.0, 1.0)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
