"""Preparing signals for the flow: standardization (fitted on training data only), padding and
truncation to the model's T, down-sampling, and cutting windows from a stream."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

FloatArray = NDArray[np.floating[Any]]


@dataclass(frozen=True, eq=False)
class Standardizer:
    """Per-signal mean and std. Signals that never vary get std 1 (they carry no information)."""

    mean: NDArray[np.float64]
    std: NDArray[np.float64]

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Standardizer)
            and np.array_equal(self.mean, other.mean)
            and np.array_equal(self.std, other.std)
        )

    __hash__ = None  # type: ignore[assignment]

    @classmethod
    def fit(cls, cycles: Iterable[FloatArray]) -> Standardizer:
        """Fit on (T_i, S) arrays, counting every time step of every cycle once (float64 sums)."""
        count = 0
        total: NDArray[np.float64] | None = None
        total_sq: NDArray[np.float64] | None = None
        for cycle in cycles:
            x = np.asarray(cycle, dtype=np.float64)
            if x.ndim != 2:
                raise ValueError(f"expected a (time, signals) array, got shape {x.shape}")
            if total is None:
                total = np.zeros(x.shape[1])
                total_sq = np.zeros(x.shape[1])
            elif x.shape[1] != total.shape[0]:
                raise ValueError(f"cycles have {total.shape[0]} and {x.shape[1]} signals")
            assert total_sq is not None
            count += len(x)
            total += x.sum(axis=0)
            total_sq += np.square(x).sum(axis=0)
        if total is None or total_sq is None or count < 2:
            raise ValueError("standardization needs at least two time steps of training data")
        mean = total / count
        var = np.maximum(total_sq / count - mean**2, 0.0)
        std = np.sqrt(var)
        tiny = std <= 1e-9 * np.maximum(np.abs(mean), 1.0)
        std[tiny] = 1.0
        return cls(mean=mean, std=std)

    def transform(self, x: FloatArray) -> NDArray[np.float32]:
        """(T, S) -> standardized (T, S) float32."""
        if x.shape[-1] != self.mean.shape[0]:
            raise ValueError(f"expected {self.mean.shape[0]} signals, got {x.shape[-1]}")
        return ((np.asarray(x, dtype=np.float64) - self.mean) / self.std).astype(np.float32)

    def to_dict(self) -> dict[str, list[float]]:
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Standardizer:
        mean = np.asarray(data["mean"], dtype=np.float64)
        std = np.asarray(data["std"], dtype=np.float64)
        if mean.shape != std.shape or mean.ndim != 1:
            raise ValueError("scaler mean and std must be 1-D lists of equal length")
        if not (np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()):
            raise ValueError("scaler mean/std must be finite and std positive")
        return cls(mean=mean, std=std)


def downsample(x: FloatArray, divider: int) -> FloatArray:
    """Keep every `divider`-th time step (as the published code's frequency divider)."""
    if divider < 1:
        raise ValueError(f"rate divider must be >= 1, got {divider}")
    return x[::divider] if divider > 1 else x


def pad_or_truncate(x: NDArray[np.float32], time_steps: int) -> NDArray[np.float32]:
    """(T_i, S) standardized -> (S, time_steps): zero-padded at the end, or truncated."""
    out = np.zeros((x.shape[1], time_steps), dtype=np.float32)
    n = min(len(x), time_steps)
    out[:, :n] = x[:n].T
    return out


def window_starts(length: int, window: int, hop: int) -> range:
    """Start indices of the full windows of a sequence (the last partial window is not scored)."""
    if window < 1 or hop < 1:
        raise ValueError(f"window and hop must be >= 1, got window={window}, hop={hop}")
    return range(0, max(length - window + 1, 0), hop)


def cut_windows(x: NDArray[np.float32], window: int, hop: int) -> NDArray[np.float32]:
    """(T, S) standardized -> (n, S, window) windows starting every `hop` steps."""
    starts = window_starts(len(x), window, hop)
    if len(starts) == 0:
        return np.zeros((0, x.shape[1], window), dtype=np.float32)
    return np.stack([x[s : s + window].T for s in starts]).astype(np.float32, copy=False)
