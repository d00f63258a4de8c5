"""Pixel AUROC and AU-PRO (the MVTec AD localization metric): checked against hand-computed cases and a
brute-force implementation that labels the regions and sweeps every threshold one by one."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from flows.localization_metrics import au_pro, pixel_auroc, pro_curve
from flows.metrics import roc_auc


def brute_force_au_pro(maps: list[np.ndarray], masks: list[np.ndarray], max_fpr: float = 0.3) -> float:
    regions = []
    for i, mask in enumerate(masks):
        labels, count = ndimage.label(mask)
        regions += [(i, labels == r) for r in range(1, count + 1)]
    normal = np.concatenate([(~m).ravel() for m in masks])
    scores = np.concatenate([m.ravel() for m in maps])
    points = [(0.0, 0.0)]
    for t in np.unique(scores)[::-1]:
        fpr = float((scores[normal] >= t).mean())
        pro = float(np.mean([(maps[i][region] >= t).mean() for i, region in regions]))
        points.append((fpr, pro))
    fpr_a, pro_a = np.array(points).T
    grid_x = [x for x in fpr_a if x <= max_fpr] + [max_fpr]
    grid_y = [*pro_a[fpr_a <= max_fpr], float(np.interp(max_fpr, fpr_a, pro_a))]
    return float(np.trapezoid(grid_y, grid_x) / max_fpr)


def test_a_perfect_map_scores_one_and_an_inverted_one_zero() -> None:
    mask = np.zeros((20, 20), bool)
    mask[3:7, 3:9] = True
    mask[12:15, 10:18] = True
    assert au_pro([mask.astype(float)], [mask]) == pytest.approx(1.0)
    assert au_pro([(~mask).astype(float)], [mask]) == pytest.approx(0.0)
    assert pixel_auroc([mask.astype(float)], [mask]) == pytest.approx(1.0)


def test_every_region_counts_the_same_however_large() -> None:
    """A small region found and a large one missed: PRO is 1/2 at FPR 0, where pixel AUROC, weighting
    by pixels, is low. Hand computation: the curve runs (0, 0) -> (0, 0.5) -> (1, 1), so the area
    up to 0.3 is 0.3 * (0.5 + 0.65) / 2, divided by 0.3."""
    mask = np.zeros((30, 30), bool)
    mask[2:4, 2:4] = True  # 4 pixels, scored high
    mask[10:20, 10:20] = True  # 100 pixels, scored like the background
    score = np.zeros((30, 30))
    score[2:4, 2:4] = 1.0
    assert au_pro([score], [mask]) == pytest.approx((0.5 + 0.65) / 2)
    fpr, pro = pro_curve([score], [mask])
    assert fpr.tolist() == [0.0, 0.0, 1.0]
    assert pro.tolist() == pytest.approx([0.0, 0.5, 1.0])


def test_equals_a_brute_force_sweep_over_several_images() -> None:
    rng = np.random.default_rng(3)
    maps, masks = [], []
    for shape in ((16, 16), (12, 20), (18, 9)):
        mask = np.zeros(shape, bool)
        for _ in range(3):
            y, x = rng.integers(0, shape[0] - 4), rng.integers(0, shape[1] - 4)
            mask[y : y + rng.integers(1, 4), x : x + rng.integers(1, 4)] = True
        score = rng.normal(size=shape) + 1.5 * mask
        maps.append(np.round(score, 1))  # ties between normal and defect pixels too
        masks.append(mask)
    for max_fpr in (0.3, 0.05, 1.0):
        assert au_pro(maps, masks, max_fpr) == pytest.approx(
            brute_force_au_pro(maps, masks, max_fpr), abs=1e-9
        )
    pixels = np.concatenate([m.ravel() for m in maps])
    truth = np.concatenate([g.ravel() for g in masks])
    assert pixel_auroc(maps, masks) == pytest.approx(roc_auc(pixels[~truth], pixels[truth]))


def test_a_random_map_gives_about_half_the_fpr_limit() -> None:
    """PRO(FPR) ~ FPR for a map that knows nothing: the normalized area up to 0.3 is about 0.15."""
    rng = np.random.default_rng(0)
    masks = [rng.random((64, 64)) < 0.02 for _ in range(8)]
    maps = [rng.random((64, 64)) for _ in range(8)]
    assert au_pro(maps, masks) == pytest.approx(0.15, abs=0.02)
    assert pixel_auroc(maps, masks) == pytest.approx(0.5, abs=0.03)


def test_bad_inputs_name_the_problem() -> None:
    mask = np.zeros((4, 4), bool)
    with pytest.raises(
        ValueError, match=r"image 0: anomaly map of shape \(4, 5\) and mask of shape \(4, 4\)"
    ):
        au_pro([np.zeros((4, 5))], [mask])
    with pytest.raises(ValueError, match="at least one defect region"):
        au_pro([np.zeros((4, 4))], [mask])
    with pytest.raises(ValueError, match="2 anomaly maps but 1 masks"):
        pixel_auroc([np.zeros((4, 4))] * 2, [mask])
    with pytest.raises(ValueError, match="max_fpr"):
        au_pro([np.zeros((4, 4))], [mask], max_fpr=0)
    with pytest.raises(ValueError, match="non-finite"):
        pixel_auroc([np.full((4, 4), np.nan)], [mask])
