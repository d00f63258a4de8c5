"""Scoring camera frames with a trained AST model: any batch of uint8 frames in, one score, a normalized
score (threshold = 1), an anomaly flag and an anomaly map per frame out. Runs on the GPU when there is one.

Frames of any size are resized to the model's input size; the maps come back at that input size (the
resolution the model sees), not the frame's. A frame that is not a uint8 image raises ValueError naming
the shape or dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from flows.artifact import ModelFormatError
from flows.ast.artifact import ASTCard, LoadedAST
from flows.ast.features import FeatureExtractor, frames_to_tensor
from flows.ast.model import image_score, upsample
from flows.training import resolve_device


@dataclass(frozen=True)
class ImageScores:
    raw: np.ndarray  # (B,) float64: the image score from the map (mean or max, per the model card)
    normalized: np.ndarray  # (B,) float64: threshold = 1, typical normal ≈ 0
    is_anomaly: np.ndarray  # (B,) bool: raw > threshold
    maps: np.ndarray  # (B, H, W) float32 at the model's input size

    def __len__(self) -> int:
        return len(self.raw)


class ImageScorer:
    """Extractor + AST of a loaded model, on one device, in eval mode."""

    def __init__(
        self, loaded: LoadedAST, *, device: str | torch.device = "auto", batch_size: int = 16
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.card: ASTCard = loaded.card
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        self.batch_size = batch_size
        self.extractor = FeatureExtractor(self.card.features).to(self.device)
        if (
            self.extractor.channels != self.card.channels
            or self.extractor.feature_size != self.card.feature_size
        ):
            raise ModelFormatError(
                f"the extractor gives {self.extractor.channels} channels at {self.extractor.feature_size} "
                f"for block {self.card.features.block}, the model was trained on {self.card.channels} at "
                f"{self.card.feature_size}"
            )
        self.model = loaded.model.to(self.device).eval()

    @torch.inference_mode()
    def maps_of(self, images: Tensor) -> Tensor:
        """Feature-resolution maps (B, h, w) of float images (B, 3, H, W) in [0, 1]."""
        return self.model.anomaly_map(self.extractor.extract(images.to(self.device)))

    @torch.inference_mode()
    def score(self, frames: np.ndarray | list[np.ndarray]) -> ImageScores:
        """Score uint8 frames: one (H, W[, C]), a batch (B, H, W[, C]) or a list of equal-sized frames."""
        images = frames_to_tensor(frames)
        scoring = self.card.scoring
        raw, maps = [], []
        for start in range(0, len(images), self.batch_size):
            fmap = self.maps_of(images[start : start + self.batch_size])
            full = upsample(fmap, self.card.input_size, sigma=scoring.sigma)
            raw.append(image_score(full, scoring.reduce).double().cpu())
            maps.append(full.float().cpu())
        raw_np = torch.cat(raw).numpy()
        threshold = self.card.threshold
        return ImageScores(
            raw=raw_np,
            normalized=np.asarray(threshold.normalize(raw_np), dtype=np.float64),
            is_anomaly=raw_np > threshold.value,
            maps=torch.cat(maps).numpy(),
        )
