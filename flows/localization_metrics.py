"""Localization metrics for anomaly maps against ground-truth masks (MVTec AD protocol, numpy + scipy).

- `pixel_auroc`: AUROC of every pixel's anomaly score, defect pixels against all the others.
- `au_pro`: the per-region overlap (Bergmann et al., "The MVTec Anomaly Detection Dataset", IJCV 2021):
  each connected defect region of the ground truth counts the same, however large. At a threshold t,
  PRO(t) is the mean over regions of the share of the region's pixels scoring >= t; FPR(t) is the share
  of defect-free pixels scoring >= t. The curve PRO(FPR) is integrated from FPR 0 up to `max_fpr`
  (0.3 as published) and divided by `max_fpr`, so a perfect map gives 1 and a random one about
  max_fpr / 2.

Both take the maps and masks of a whole test set at once (any number of images, each its own size),
computed in one pass over the pixels sorted by score (exact: ties share one threshold).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike
from scipy import ndimage

from flows.metrics import roc_auc


def _pairs(maps: Sequence[ArrayLike], masks: Sequence[ArrayLike]) -> list[tuple[np.ndarray, np.ndarray]]:
    if len(maps) != len(masks):
        raise ValueError(f"got {len(maps)} anomaly maps but {len(masks)} masks")
    out = []
    for i, (m, g) in enumerate(zip(maps, masks, strict=True)):
        score = np.asarray(m, dtype=np.float64)
        truth = np.asarray(g).astype(bool)
        if score.ndim != 2 or score.shape != truth.shape:
            raise ValueError(
                f"image {i}: anomaly map of shape {score.shape} and mask of shape {truth.shape}; "
                "expected two equal (H, W) shapes (resize the map to the mask first)"
            )
        if not np.isfinite(score).all():
            raise ValueError(f"image {i}: the anomaly map holds non-finite values")
        out.append((score, truth))
    if not out:
        raise ValueError("no images")
    return out


def pixel_auroc(maps: Sequence[ArrayLike], masks: Sequence[ArrayLike]) -> float:
    """AUROC over all pixels of all images: defect pixels (mask true) against defect-free ones."""
    pairs = _pairs(maps, masks)
    scores = np.concatenate([s.ravel() for s, _ in pairs])
    truth = np.concatenate([g.ravel() for _, g in pairs])
    return roc_auc(scores[~truth], scores[truth])


def pro_curve(maps: Sequence[ArrayLike], masks: Sequence[ArrayLike]) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, pro) at every distinct threshold, from the highest score down; starts at (0, 0)."""
    pairs = _pairs(maps, masks)
    scores_parts, weight_parts, normal_parts = [], [], []
    regions = 0
    for score, truth in pairs:
        labels, count = ndimage.label(truth)  # 4-connected regions of one image
        sizes = np.bincount(labels.ravel(), minlength=count + 1)
        flat = labels.ravel()
        weight = np.where(flat > 0, 1.0 / np.maximum(sizes[flat], 1), 0.0)  # each region sums to 1
        scores_parts.append(score.ravel())
        weight_parts.append(weight)
        normal_parts.append(flat == 0)
        regions += count
    scores = np.concatenate(scores_parts)
    weights = np.concatenate(weight_parts)
    normal = np.concatenate(normal_parts)
    if regions == 0:
        raise ValueError("AU-PRO needs at least one defect region in the masks")
    if not normal.any():
        raise ValueError("AU-PRO needs defect-free pixels")
    order = np.argsort(-scores, kind="stable")
    s = scores[order]
    pro = np.cumsum(weights[order]) / regions
    fpr = np.cumsum(normal[order]) / normal.sum()
    last = np.r_[s[1:] != s[:-1], True]  # the last pixel of each group of equal scores
    return np.r_[0.0, fpr[last]], np.r_[0.0, pro[last]]


def au_pro(maps: Sequence[ArrayLike], masks: Sequence[ArrayLike], max_fpr: float = 0.3) -> float:
    """Area under the PRO curve up to `max_fpr`, divided by `max_fpr` (1 = perfect)."""
    if not 0 < max_fpr <= 1:
        raise ValueError(f"max_fpr must be in (0, 1], got {max_fpr}")
    fpr, pro = pro_curve(maps, masks)
    cut = int(np.searchsorted(fpr, max_fpr, side="right"))
    x, y = fpr[:cut], pro[:cut]
    if cut < len(fpr) and x[-1] < max_fpr:  # the curve at exactly max_fpr, on the segment that crosses it
        x0, x1, y0, y1 = fpr[cut - 1], fpr[cut], pro[cut - 1], pro[cut]
        y_end = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)
        x, y = np.r_[x, max_fpr], np.r_[y, y_end]
    return float(np.trapezoid(y, x) / max_fpr)
