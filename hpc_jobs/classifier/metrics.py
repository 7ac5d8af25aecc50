"""Binary classification metrics in numpy (scikit-learn is not a dependency here).

``roc_auc`` is the Mann-Whitney statistic (ties count one half), ``pr_auc`` the average
precision (scikit-learn's ``average_precision_score``: sum over thresholds of
``(R_n - R_{n-1}) P_n``), F1 and the confusion matrix at ``score >= threshold``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np


def _arrays(y: Any, score: Any) -> tuple[np.ndarray, np.ndarray]:
    import numpy as np

    y = np.asarray(y).astype(bool).ravel()
    s = np.asarray(score, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"{y.size} labels but {s.size} scores")
    return y, s


def roc_auc(y: Any, score: Any) -> float | None:
    """Area under the ROC curve (None when one class is absent)."""
    from scipy.stats import rankdata

    y, s = _arrays(y, score)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if not n_pos or not n_neg:
        return None
    ranks = rankdata(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def pr_auc(y: Any, score: Any) -> float | None:
    """Average precision (None without positives)."""
    import numpy as np

    y, s = _arrays(y, score)
    n_pos = int(y.sum())
    if not n_pos:
        return None
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s_sorted)), y.size - 1]  # end of each tie group
    tp = np.cumsum(y_sorted)[last]
    fp = (last + 1) - tp
    precision = tp / (tp + fp)
    recall = tp / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def confusion(y: Any, score: Any, threshold: float) -> dict[str, int]:
    """``{"tp", "fp", "tn", "fn"}`` at ``score >= threshold``."""
    y, s = _arrays(y, score)
    pred = s >= threshold
    return {"tp": int((pred & y).sum()), "fp": int((pred & ~y).sum()),
            "tn": int((~pred & ~y).sum()), "fn": int((~pred & y).sum())}


def f1(cm: dict[str, int]) -> float:
    """F1 of a confusion matrix (0 when there is no true or predicted positive)."""
    denom = 2 * cm["tp"] + cm["fp"] + cm["fn"]
    return 2 * cm["tp"] / denom if denom else 0.0


def best_f1_threshold(y: Any, score: Any) -> float:
    """The score threshold with the highest F1 (ties: the higher threshold)."""
    import numpy as np

    y, s = _arrays(y, score)
    best, best_t = -1.0, float("inf")
    for t in np.unique(s)[::-1]:
        v = f1(confusion(y, s, float(t)))
        if v > best:
            best, best_t = v, float(t)
    return best_t


def summary(y: Any, score: Any, threshold: float) -> dict[str, Any]:
    """All metrics of one scorer on one set of cells."""
    y_arr, _ = _arrays(y, score)
    cm = confusion(y, score, threshold)
    auc, ap = roc_auc(y, score), pr_auc(y, score)
    return {
        "n": int(y_arr.size), "positives": int(y_arr.sum()),
        "roc_auc": None if auc is None else round(auc, 4),
        "pr_auc": None if ap is None else round(ap, 4),
        "threshold": threshold, "f1": round(f1(cm), 4), "confusion": cm,
    }
