"""Evaluation metrics (numpy only)."""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike
from scipy.stats import rankdata


def roc_auc(normal_scores: ArrayLike, anomaly_scores: ArrayLike) -> float:
    """Area under the ROC curve of anomaly vs normal scores (higher = more anomalous).

    Computed as the Mann-Whitney U statistic with ties counted half, which equals the trapezoidal
    area under the empirical ROC curve.
    """
    neg = np.asarray(normal_scores, dtype=float).ravel()
    pos = np.asarray(anomaly_scores, dtype=float).ravel()
    if neg.size == 0 or pos.size == 0:
        raise ValueError(f"AUROC needs both classes, got {neg.size} normal and {pos.size} anomalous scores")
    if not (np.isfinite(neg).all() and np.isfinite(pos).all()):
        raise ValueError("AUROC scores must be finite")
    ranks = rankdata(np.concatenate([neg, pos]))
    u = ranks[neg.size :].sum() - pos.size * (pos.size + 1) / 2.0
    return float(u / (neg.size * pos.size))
