"""The MVTec AD protocol on scored test images: image AUROC per defect type against all good test images
and their unweighted mean; where masks exist, pixel AUROC and AU-PRO (up to 30 % FPR) over the good
images and the defect images that have a mask, overall and per defect type.

Arrays in, numbers out: reading images and scoring them is the caller's job.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from flows.localization_metrics import au_pro, pixel_auroc
from flows.metrics import CategoryAUROC, per_category_auroc

GOOD = "good"


@dataclass(frozen=True)
class ImageMetrics:
    image: CategoryAUROC  # image AUROC per defect type and mean
    pixel_auroc: float | None  # None when no defect image has a mask
    au_pro: float | None
    pixel_per_defect: dict[str, float]  # pixel AUROC per defect type (its images + the good ones)
    pro_per_defect: dict[str, float]
    masked_images: int  # defect images with a mask (used by the pixel metrics)

    def to_json(self) -> dict[str, Any]:
        return {
            "image_auroc": self.image.mean,
            "pixel_auroc": self.pixel_auroc,
            "au_pro": self.au_pro,
            "per_defect": dict(self.image.per_category),
            "pixel_auroc_per_defect": dict(self.pixel_per_defect),
            "au_pro_per_defect": dict(self.pro_per_defect),
            "counts": dict(self.image.counts),
            "normals": self.image.normals,
            "masked_images": self.masked_images,
        }


def evaluate_images(
    scores: Sequence[float] | np.ndarray,
    labels: Sequence[str],
    maps: Sequence[np.ndarray] | np.ndarray | None = None,
    masks: Sequence[np.ndarray | None] | None = None,
) -> ImageMetrics:
    """`labels`: "good" or the defect type per image; `maps` and `masks` (None = no mask) per image, each
    map the shape of its mask. Needs at least one good and one defect image."""
    labels = list(labels)
    anomaly = np.array([label != GOOD for label in labels], dtype=bool)
    if anomaly.all() or not anomaly.any():
        raise ValueError(
            f"evaluation needs good and defect test images, got {int((~anomaly).sum())} good "
            f"and {int(anomaly.sum())} defect"
        )
    image = per_category_auroc(np.asarray(scores, dtype=float), labels, anomaly)
    pixel: float | None = None
    pro: float | None = None
    pixel_per: dict[str, float] = {}
    pro_per: dict[str, float] = {}
    masked = 0
    if maps is not None and masks is not None:
        if len(maps) != len(labels) or len(masks) != len(labels):
            raise ValueError(f"{len(labels)} labels but {len(maps)} maps and {len(masks)} masks")
        good = [i for i, label in enumerate(labels) if label == GOOD]
        with_mask = [i for i, label in enumerate(labels) if label != GOOD and masks[i] is not None]
        masked = len(with_mask)

        def truth(i: int) -> np.ndarray:
            m = masks[i]
            return np.zeros(np.shape(maps[i]), dtype=bool) if m is None else np.asarray(m, dtype=bool)

        def pair(index: list[int]) -> tuple[list[np.ndarray], list[np.ndarray]]:
            return [np.asarray(maps[i]) for i in index], [truth(i) for i in index]

        if with_mask and any(truth(i).any() for i in with_mask):
            pixel = pixel_auroc(*pair(good + with_mask))
            pro = au_pro(*pair(good + with_mask))
            for defect in image.per_category:
                own = [i for i in with_mask if labels[i] == defect]
                if own and any(truth(i).any() for i in own):
                    pixel_per[defect] = pixel_auroc(*pair(good + own))
                    pro_per[defect] = au_pro(*pair(good + own))
    return ImageMetrics(
        image=image,
        pixel_auroc=pixel,
        au_pro=pro,
        pixel_per_defect=pixel_per,
        pro_per_defect=pro_per,
        masked_images=masked,
    )
