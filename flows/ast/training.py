"""Training AST as the official code does: features pre-extracted once from the frozen network, the
teacher trained first by NLL, then the student to regress the teacher's output; Adam lr 2e-4, eps 1e-8,
weight decay 1e-5, batch 8. Reproducible from a seed. Not imported by the daemon.

Everything here works on feature tensors (N, C, h, w); `extract_features` turns uint8 images into them in
batches with the extractor.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from flows.ast.features import FeatureExtractor, frames_to_tensor
from flows.ast.model import AST, image_score, upsample

Phase = Literal["teacher", "student"]


@dataclass(frozen=True)
class ASTTrainConfig:
    teacher_epochs: int = 240
    student_epochs: int = 240
    batch_size: int = 8
    learning_rate: float = 2e-4
    weight_decay: float = 1e-5
    eps: float = 1e-8
    seed: int = 0

    def __post_init__(self) -> None:
        if self.teacher_epochs < 1 or self.student_epochs < 1:
            raise ValueError(
                f"epochs must be >= 1, got teacher {self.teacher_epochs}, student {self.student_epochs}"
            )
        if self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning rate must be > 0, got {self.learning_rate}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ASTHistory:
    teacher_loss: list[float] = field(default_factory=list)
    student_loss: list[float] = field(default_factory=list)
    seconds: float = 0.0


def extract_features(
    extractor: FeatureExtractor,
    images: Iterable[np.ndarray],
    *,
    batch_size: int = 16,
    on_batch: Callable[[int], None] | None = None,
) -> Tensor:
    """Features (N, C, h, w) float32 on the CPU of uint8 images, read lazily from any iterable (so a large
    folder never sits in memory at full resolution). Images of any size: the extractor resizes; a batch
    is cut where the size changes."""
    device = extractor.mean.device
    parts: list[Tensor] = []
    pending: list[np.ndarray] = []

    def flush() -> None:
        if pending:
            parts.append(extractor.extract(frames_to_tensor(pending).to(device)).float().cpu())
            if on_batch is not None:
                on_batch(len(pending))
            pending.clear()

    for image in images:
        image = np.asarray(image)
        if pending and (len(pending) >= batch_size or pending[0].shape[:2] != image.shape[:2]):
            flush()
        pending.append(image)
    flush()
    if not parts:
        return torch.zeros(0, extractor.channels, *extractor.feature_size)
    return torch.cat(parts)


def _epochs(
    phase: Phase,
    step: Callable[[Tensor], Tensor],
    params: list[torch.nn.Parameter],
    features: Tensor,
    epochs: int,
    config: ASTTrainConfig,
    device: torch.device,
    on_batch: Callable[[Phase, float], None] | None,
    on_epoch: Callable[[Phase, int, float], None] | None,
) -> list[float]:
    optimizer = torch.optim.Adam(
        params, lr=config.learning_rate, eps=config.eps, weight_decay=config.weight_decay
    )
    generator = torch.Generator(device="cpu").manual_seed(config.seed + (0 if phase == "teacher" else 1))
    losses = []
    for epoch in range(epochs):
        order = torch.randperm(len(features), generator=generator).to(device)
        total, batches = 0.0, 0
        for start in range(0, len(features), config.batch_size):
            batch = features[order[start : start + config.batch_size]]
            optimizer.zero_grad(set_to_none=True)
            loss = step(batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{phase} loss became {loss.item()} in epoch {epoch + 1}")
            loss.backward()
            optimizer.step()
            value = float(loss.detach())
            total += value
            batches += 1
            if on_batch is not None:
                on_batch(phase, value)
        losses.append(total / batches)
        if on_epoch is not None:
            on_epoch(phase, epoch, losses[-1])
    return losses


def train_ast(
    model: AST,
    features: Tensor,
    config: ASTTrainConfig,
    device: torch.device,
    *,
    on_batch: Callable[[Phase, float], None] | None = None,
    on_epoch: Callable[[Phase, int, float], None] | None = None,
) -> ASTHistory:
    """Teacher by NLL, then the student on the frozen teacher; `features` (N, C, h, w) of normal images."""
    if len(features) < 1:
        raise ValueError("no training features")
    model.teacher.check_input(features[:1])
    torch.manual_seed(config.seed)
    model.to(device)
    data = features.to(device, torch.float32)
    history = ASTHistory()
    started = time.perf_counter()

    model.teacher.train()
    teacher_params = [p for p in model.teacher.parameters() if p.requires_grad]
    history.teacher_loss = _epochs(
        "teacher",
        model.teacher.loss,
        teacher_params,
        data,
        config.teacher_epochs,
        config,
        device,
        on_batch,
        on_epoch,
    )
    model.teacher.eval()
    for param in teacher_params:  # the student regresses a fixed teacher
        param.requires_grad_(False)
    try:
        model.student.train()
        history.student_loss = _epochs(
            "student",
            model.student_loss,
            list(model.student.parameters()),
            data,
            config.student_epochs,
            config,
            device,
            on_batch,
            on_epoch,
        )
    finally:
        for param in teacher_params:
            param.requires_grad_(True)
    model.eval()
    history.seconds = time.perf_counter() - started
    return history


@torch.no_grad()
def feature_maps(
    map_fn: Callable[[Tensor], Tensor],
    features: Tensor,
    device: torch.device,
    *,
    batch_size: int = 32,
) -> Tensor:
    """`map_fn` (features -> (B, h, w)) over `features` in batches, as float32 on the CPU."""
    out = [
        map_fn(features[start : start + batch_size].to(device, torch.float32)).float().cpu()
        for start in range(0, len(features), batch_size)
    ]
    if not out:
        return torch.zeros(0, *features.shape[2:])
    return torch.cat(out)


def scores_from_maps(
    maps: Tensor,
    size: tuple[int, int],
    *,
    reduce: Literal["mean", "max"] = "mean",
    sigma: float | None = None,
    batch_size: int = 64,
) -> tuple[np.ndarray, Tensor]:
    """Upsample (and smooth) feature-resolution maps to `size`; returns (image scores, upsampled maps)."""
    scores, full = [], []
    for start in range(0, len(maps), batch_size):
        up = upsample(maps[start : start + batch_size], size, sigma=sigma)
        scores.append(image_score(up, reduce))
        full.append(up)
    if not full:
        return np.zeros(0), torch.zeros(0, *size)
    return torch.cat(scores).double().numpy(), torch.cat(full)
