"""Training MVT-Flow: the paper's optimizer and schedule (Adam 8e-4, ×0.1 at epochs 11 and 61,
70 epochs, batch 32), reproducible from a seed, optional bf16 autocast. The data set lives on the
training device once, not copied per batch."""

from __future__ import annotations

import random
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from flows.fusion import FusionConfig, SignalFusion
from flows.mvtflow import MVTFlow


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 70
    batch_size: int = 32
    learning_rate: float = 8e-4
    milestones: tuple[int, ...] = (11, 61)
    gamma: float = 0.1
    seed: int = 177
    bf16: bool = False

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {self.batch_size}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning rate must be > 0, got {self.learning_rate}")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["milestones"] = list(self.milestones)
        return out


@dataclass
class TrainHistory:
    loss: list[float] = field(default_factory=list)
    seconds: float = 0.0


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA when available, else CPU; asking for CUDA without it is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(
            "device 'cuda' requested but torch has no CUDA device here (torch.cuda.is_available() is False)"
        )
    if name != "cpu" and not name.startswith("cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def autocast(device: torch.device, bf16: bool) -> Any:
    if not bf16:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def train_flow(
    model: MVTFlow,
    data: Tensor,
    config: TrainConfig,
    device: torch.device,
    *,
    on_epoch: Callable[[int, float], None] | None = None,
    on_batch: Callable[[float], None] | None = None,
) -> TrainHistory:
    """Train `model` on `data` (N, S, T) float32. Returns the mean loss per epoch."""
    import time

    model.check_input(data[:1])
    if len(data) < 1:
        raise ValueError("no training data")
    seed_everything(config.seed)
    model.to(device).train()
    data = data.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=config.learning_rate)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestones=list(config.milestones), gamma=config.gamma
    )
    generator = torch.Generator(device="cpu").manual_seed(config.seed)
    history = TrainHistory()
    started = time.perf_counter()
    for epoch in range(config.epochs):
        order = torch.randperm(len(data), generator=generator).to(device)
        total, batches = 0.0, 0
        for start in range(0, len(data), config.batch_size):
            batch = data[order[start : start + config.batch_size]]
            optimizer.zero_grad(set_to_none=True)
            with autocast(device, config.bf16):
                loss = model.loss(batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training loss became {loss.item()} in epoch {epoch + 1}")
            loss.backward()
            optimizer.step()
            value = float(loss.detach())
            total += value
            batches += 1
            if on_batch is not None:
                on_batch(value)
        scheduler.step()
        history.loss.append(total / batches)
        if on_epoch is not None:
            on_epoch(epoch, history.loss[-1])
    history.seconds = time.perf_counter() - started
    model.eval()
    return history


@torch.no_grad()
def batched_scores(
    model: MVTFlow, data: Tensor, device: torch.device, *, batch_size: int = 64, bf16: bool = False
) -> np.ndarray:
    """Scores of (N, S, T) data in batches, as float64 numpy."""
    model.to(device).eval()
    out = []
    for start in range(0, len(data), batch_size):
        batch = data[start : start + batch_size].to(device)
        with autocast(device, bf16):
            out.append(model.score(batch).float().cpu())
    if not out:
        return np.zeros(0)
    return torch.cat(out).double().numpy()


def normal_attribution(
    model: MVTFlow, data: Tensor, device: torch.device, *, samples: int = 64, batch_size: int = 16
) -> np.ndarray:
    """Mean |∂score/∂x| per signal over (up to `samples` of) normal data (N, S, T): the profile that
    explanations are measured against. Floored at 1e-6 of its mean, so no signal divides by ~0."""
    model.to(device).eval()
    picked = data[: max(1, samples)]
    total = torch.zeros(data.shape[1], dtype=torch.float64)
    for start in range(0, len(picked), batch_size):
        grad = model.localize(picked[start : start + batch_size].to(device))
        total += grad.double().sum(dim=(0, 2)).cpu()
    mean = total / (len(picked) * data.shape[2])
    floor = max(float(mean.mean()) * 1e-6, 1e-12)
    return mean.clamp_min(floor).numpy()


def fit_fusion(
    model: MVTFlow,
    fit: Tensor,
    fit_lengths: Tensor | None,
    calibration: Tensor,
    rate_hz: float,
    config: FusionConfig,
    device: torch.device,
    *,
    bf16: bool = False,
) -> tuple[SignalFusion, np.ndarray]:
    """Fit the fused detector's linear parts on the training samples and its normalizers on the
    calibration samples (normal data only); returns it and the fused calibration scores."""
    fusion = SignalFusion.fit_parts(config, fit, fit_lengths, rate_hz)
    nll = torch.from_numpy(batched_scores(model, calibration, device, bf16=bf16))
    components = fusion.components(calibration, nll)
    fusion.calibrate(components)
    return fusion, fusion.fuse(components).numpy()
