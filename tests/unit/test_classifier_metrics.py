"""numpy metrics against hand computations (scikit-learn is not installed here)."""

from __future__ import annotations

import pytest

from hpc_jobs.classifier import metrics


def test_roc_auc_counts_pairs_and_ties_half() -> None:
    y = [1, 1, 0, 0, 0]
    s = [0.9, 0.4, 0.4, 0.2, 0.8]
    # positive-negative pairs: (0.9 > all 3) = 3; 0.4 vs 0.4 tie = 0.5, vs 0.2 = 1 -> 4.5 / 6
    assert metrics.roc_auc(y, s) == pytest.approx(4.5 / 6)
    assert metrics.roc_auc([1, 1], [0.1, 0.2]) is None


def test_average_precision_by_hand() -> None:
    y = [1, 0, 1, 0]
    s = [0.9, 0.8, 0.7, 0.1]
    # ranks: P@1 = 1 (R 0.5), P@3 = 2/3 (R 1.0) -> 0.5 * 1 + 0.5 * 2/3
    assert metrics.pr_auc(y, s) == pytest.approx(0.5 + 1 / 3)
    # a tie between a positive and a negative counts as one step: P = 1/2 at R = 1
    assert metrics.pr_auc([1, 0], [0.5, 0.5]) == pytest.approx(0.5)


def test_confusion_f1_and_best_threshold() -> None:
    y = [1, 1, 0, 0, 1]
    s = [0.9, 0.3, 0.6, 0.1, 0.7]
    cm = metrics.confusion(y, s, 0.5)
    assert cm == {"tp": 2, "fp": 1, "tn": 1, "fn": 1}
    assert metrics.f1(cm) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    # threshold 0.3 catches all 3 positives with 1 false positive: F1 = 6 / 7, the best
    assert metrics.best_f1_threshold(y, s) == 0.3
    out = metrics.summary(y, s, 0.5)
    assert out["n"] == 5 and out["positives"] == 3 and out["confusion"] == cm
