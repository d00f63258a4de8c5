"""Evaluation metrics (numpy only)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

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


@dataclass(frozen=True)
class CategoryAUROC:
    """Per-category AUROC as in the voraus-AD paper; ``mean`` is the unweighted mean over categories."""

    per_category: dict[str, float]
    mean: float
    #: anomalous cycles per category
    counts: dict[str, int]
    #: normal cycles (shared by every category's ROC)
    normals: int


def per_category_auroc(
    scores: ArrayLike,
    categories: Sequence[str] | np.ndarray,
    anomaly: ArrayLike,
    order: Sequence[str] | None = None,
) -> CategoryAUROC:
    """AUROC of each anomaly category's cycles against all normal cycles, and their unweighted mean.

    ``scores``: one score per cycle (higher = more anomalous); ``categories``: the category name (str)
    per cycle, ignored for normal cycles; ``anomaly``: bool (or 0/1) per cycle. Categories are reported
    in the order they first appear among anomalous cycles, or in ``order``, which must name every
    category present; names in ``order`` without anomalous cycles are left out (AUROC is undefined).
    All categories are never pooled into one ROC.
    """
    s = np.asarray(scores, dtype=float)
    a = np.asarray(anomaly)
    cats = list(categories)
    if s.ndim != 1:
        raise ValueError(f"scores must be 1-D (one per cycle), got shape {s.shape}")
    if a.shape != s.shape or len(cats) != s.size:
        raise ValueError(
            f"scores, categories and anomaly must have the same length, got {s.size}, {len(cats)} and "
            f"{a.size} (anomaly shape {a.shape})"
        )
    if a.dtype != bool:
        if a.size and not np.isin(a, (0, 1)).all():
            raise ValueError("anomaly must be bool or 0/1")
        a = a.astype(bool)
    if not np.isfinite(s).all():
        bad = np.flatnonzero(~np.isfinite(s))
        raise ValueError(f"scores must be finite; {bad.size} are not (first at index {bad[0]})")
    bad_types = {type(c).__name__ for c in cats if not isinstance(c, str)}
    if bad_types:
        raise ValueError(f"categories must be str names, got {sorted(bad_types)}")
    normal = s[~a]
    if normal.size == 0:
        raise ValueError("per-category AUROC needs normal cycles, got none")
    if not a.any():
        raise ValueError("per-category AUROC needs anomalous cycles, got none")

    anomalous = [(c, v) for c, v, is_anomaly in zip(cats, s, a, strict=True) if is_anomaly]
    by_cat: dict[str, list[float]] = {}
    for c, v in anomalous:
        by_cat.setdefault(c, []).append(float(v))
    if order is None:
        names = list(by_cat)
    else:
        names = list(order)
        if len(set(names)) != len(names):
            raise ValueError(f"order has duplicate names: {names}")
        missing = [c for c in by_cat if c not in set(names)]
        if missing:
            raise ValueError(f"order does not name categories present among anomalies: {missing}")
        names = [c for c in names if c in by_cat]

    per_category = {c: roc_auc(normal, by_cat[c]) for c in names}
    counts = {c: len(by_cat[c]) for c in names}
    mean = float(np.mean(list(per_category.values())))
    return CategoryAUROC(per_category=per_category, mean=mean, counts=counts, normals=int(normal.size))


def _two_classes(normal_scores: ArrayLike, anomaly_scores: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    neg = np.asarray(normal_scores, dtype=float).ravel()
    pos = np.asarray(anomaly_scores, dtype=float).ravel()
    if neg.size == 0 or pos.size == 0:
        raise ValueError(f"ROC needs both classes, got {neg.size} normal and {pos.size} anomalous scores")
    if not (np.isfinite(neg).all() and np.isfinite(pos).all()):
        raise ValueError("ROC scores must be finite")
    return neg, pos


def roc_curve(
    normal_scores: ArrayLike, anomaly_scores: ArrayLike
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Empirical ROC curve (higher = more anomalous): ``(fpr, tpr, thresholds)``.

    Point i flags scores ``>= thresholds[i]``; thresholds are the distinct scores in decreasing order,
    preceded by ``+inf`` for the point (0, 0). Tied scores form one point, so the curve ends at (1, 1)
    and its trapezoidal area equals :func:`roc_auc`.
    """
    neg, pos = _two_classes(normal_scores, anomaly_scores)
    thresholds = np.unique(np.concatenate([neg, pos]))[::-1]
    neg_sorted, pos_sorted = np.sort(neg), np.sort(pos)
    fp = neg.size - np.searchsorted(neg_sorted, thresholds, side="left")
    tp = pos.size - np.searchsorted(pos_sorted, thresholds, side="left")
    fpr = np.concatenate([[0.0], fp / neg.size])
    tpr = np.concatenate([[0.0], tp / pos.size])
    return fpr, tpr, np.concatenate([[np.inf], thresholds])


def threshold_at_fpr(normal_scores: ArrayLike, fpr: float) -> float:
    """Score threshold with at most ``fpr`` of ``normal_scores`` strictly above it (flag ``score > t``).

    Rule: with n normal scores sorted ascending, t is the ``ceil(n·(1 − fpr))``-th of them (1-based),
    i.e. at most ``floor(n·fpr)`` normals exceed it (``n·fpr`` gets a 1e-9 tolerance so that e.g.
    100 × 0.29 counts as 29). When ``n·fpr < 1``, including ``fpr = 0``, t is the maximum normal score.
    ``fpr = 1`` gives the minimum.
    """
    neg = np.asarray(normal_scores, dtype=float).ravel()
    if neg.size == 0:
        raise ValueError("threshold_at_fpr needs at least one normal score")
    if not np.isfinite(neg).all():
        raise ValueError("normal scores must be finite")
    if not (math.isfinite(fpr) and 0.0 <= fpr <= 1.0):
        raise ValueError(f"fpr must be in [0, 1], got {fpr}")
    allowed_above = math.floor(neg.size * fpr + 1e-9)
    rank = max(neg.size - allowed_above, 1)  # 1-based order statistic
    return float(np.partition(neg, rank - 1)[rank - 1])
