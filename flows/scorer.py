"""One scorer API for both scoring modes.

- cycle mode (as published): a whole cycle, standardized, zero-padded or truncated to the model's T;
- window mode: fixed-length windows cut every `hop` steps from a continuous stream, so live data
  without cycle markers can be scored and a cycle gets an early score.

`score()` takes a batch of windows from any number of robots at once (micro-batching) and runs on
the GPU when there is one. A fusion model (flows.fusion) scores with the flow's NLL and its two linear
detectors, each normalized on normal data, combined by the model's rule (by default: the most anomalous
part); `Scores.components` then says how far above normal each part is.
Explanations (`localize`) are |∂NLL/∂x| relative to each signal's normal attribution when the model
has that profile (every model trained by this version), so a signal that always carries a large
gradient does not crowd out the one that really changed.

Extreme inputs are bounded, never fatal: standardized values are clipped to ±`CLIP_SIGMA` (counted in
`Scorer.clipped`), so one glitching sample (1e20 from an integer overflow in a gateway) still gives a
finite, very high score. A score that is nevertheless not finite is replaced by `SCORE_CAP`, flagged
anomalous and marked in `Scores.capped`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from flows.artifact import LoadedModel
from flows.preprocess import cut_windows, pad_or_truncate
from flows.training import autocast, resolve_device

CLIP_SIGMA = 100.0  # standardized inputs are clipped to ±100 standard deviations of the training data
SCORE_CAP = 1e30  # the raw score that stands in for a non-finite one (normalized: NORMALIZED_CAP)
NORMALIZED_CAP = 1e30


@dataclass(frozen=True)
class Scores:
    raw: NDArray[np.float64]  # NLL score, higher = more anomalous
    normalized: NDArray[np.float64]  # threshold -> 1.0, typical normal -> ~0
    is_anomaly: NDArray[np.bool_]
    capped: NDArray[np.bool_]  # the score was not finite: stored as SCORE_CAP, always anomalous
    #: fusion models: each component's score in normal spreads above its normal median (nll, linres, pca)
    components: dict[str, NDArray[np.float64]] | None = None


@dataclass(frozen=True)
class Localization:
    per_time: NDArray[np.float64]  # (B, T) Σ_s |∂score/∂x(t, s)|
    per_signal: NDArray[np.float64]  # (B, S) Σ_t |∂score/∂x(t, s)|
    top_signals: list[list[tuple[str, float]]]  # per window: (signal, share of the total) best first
    maps: NDArray[np.float32] | None = None  # (B, S, T) |∂score/∂x|: the full temporal-analysis map


class Scorer:
    def __init__(
        self, model: LoadedModel, *, device: str = "auto", bf16: bool = False, max_batch: int | None = None
    ) -> None:
        """`max_batch` defaults to 256 on a GPU and 32 on a CPU, where bigger batches are memory-bound
        and slower per window (see benchmarks/mvtflow_inference.py)."""
        self.card = model.card
        self.device = resolve_device(device)
        if max_batch is None:
            max_batch = 256 if self.device.type == "cuda" else 32
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.flow = model.flow.to(self.device).eval()
        self.fusion = model.fusion
        ref = model.card.attribution_reference
        self.reference = None if ref is None else torch.tensor(ref, dtype=torch.float32, device=self.device)
        self.bf16 = bf16
        self.max_batch = max_batch
        self.clipped = 0  # standardized input values clipped to ±CLIP_SIGMA so far

    def _standardize(self, signals: NDArray[np.floating[Any]]) -> NDArray[np.float32]:
        z = np.asarray(self.card.scaler.transform(signals), dtype=np.float32)
        out_of_range = ~(np.abs(z) <= CLIP_SIGMA)  # NaN counts too
        if out_of_range.any():
            self.clipped += int(out_of_range.sum())
            z = np.clip(np.nan_to_num(z, nan=0.0), -CLIP_SIGMA, CLIP_SIGMA)
        return z

    @property
    def time_steps(self) -> int:
        return self.card.time_steps

    @property
    def signals(self) -> tuple[str, ...]:
        return self.card.signals

    def prepare_cycle(self, signals: NDArray[np.floating[Any]]) -> NDArray[np.float32]:
        """(T_i, S) raw cycle -> (S, T) model input (standardized, padded or truncated)."""
        self._check_signals(signals)
        return pad_or_truncate(self._standardize(signals), self.card.time_steps)

    def prepare_stream(
        self, signals: NDArray[np.floating[Any]], hop: int | None = None
    ) -> NDArray[np.float32]:
        """(T, S) raw stream -> (n, S, window) model inputs, one every `hop` steps."""
        self._check_signals(signals)
        if self.card.mode != "window":
            raise ValueError("this model scores whole cycles; train with --mode window to score streams")
        window, default_hop = self.card.window, self.card.hop
        if window is None or default_hop is None:
            raise ValueError("window-mode model without window/hop in model.json")
        return cut_windows(self._standardize(signals), window, hop or default_hop)

    def _check_signals(self, signals: NDArray[np.floating[Any]]) -> None:
        if signals.ndim != 2 or signals.shape[1] != len(self.card.signals):
            raise ValueError(
                f"expected a (time, {len(self.card.signals)}) array of the model's signals, "
                f"got shape {signals.shape}"
            )

    def _batches(self, windows: Sequence[NDArray[np.float32]] | NDArray[np.float32]) -> list[torch.Tensor]:
        arr = np.asarray(windows, dtype=np.float32)
        expected = (len(self.card.signals), self.card.time_steps)
        if arr.ndim != 3 or arr.shape[1:] != expected:
            raise ValueError(
                f"expected windows of shape (batch, {expected[0]}, {expected[1]}), got {arr.shape}"
            )
        tensor = torch.from_numpy(arr)
        return [tensor[i : i + self.max_batch] for i in range(0, len(tensor), self.max_batch)]

    @torch.no_grad()
    def score(self, windows: Sequence[NDArray[np.float32]] | NDArray[np.float32]) -> Scores:
        """Scores of prepared windows (B, S, T), from any mix of robots, in micro-batches."""
        parts = []
        component_parts: dict[str, list[torch.Tensor]] = {}
        for batch in self._batches(windows):
            x = batch.to(self.device, non_blocking=True)
            with autocast(self.device, self.bf16):
                nll = self.flow.score(x).float()
            if self.fusion is None:
                parts.append(nll.cpu())
                continue
            in_spreads = self.fusion.normalized(self.fusion.components(x, nll))
            parts.append(self.fusion.combine(in_spreads).cpu())
            for name, value in in_spreads.items():
                component_parts.setdefault(name, []).append(value.cpu())
        raw = torch.cat(parts).double().numpy() if parts else np.zeros(0)
        component_scores = None
        if self.fusion is not None:
            component_scores = {
                name: np.nan_to_num(
                    torch.cat(values).double().numpy() if values else np.zeros(0), nan=NORMALIZED_CAP
                )
                for name, values in component_parts.items()
            } or {name: np.zeros(0) for name in self.fusion.config.components}
        capped = ~np.isfinite(raw)
        raw = np.where(capped, SCORE_CAP, raw)
        normalized = np.asarray(self.card.threshold.normalize(raw), dtype=np.float64)
        normalized = np.where(np.isfinite(normalized), normalized, NORMALIZED_CAP)
        return Scores(
            raw=raw,
            normalized=normalized,
            is_anomaly=(raw > self.card.threshold.value) | capped,
            capped=capped,
            components=component_scores,
        )

    def localize(
        self, windows: Sequence[NDArray[np.float32]] | NDArray[np.float32], top: int = 5
    ) -> Localization:
        """Temporal analysis (Eq. 8.6) and the top contributing signals of each window; relative to
        the normal attribution profile when the model has one.

        For a fusion model with the local residual, `per_time` is the mean of two curves, each scaled
        to sum 1: the gradient's and the local residual's (its part above normal, summed over signals),
        which pinpoints short events that the gradient smears (benchmarks/localization_check.py);
        which signals (`per_signal`, `top_signals`, `maps`) stays the gradient's, which names the
        faulty axis of local faults."""
        grads, residual_curves = [], []
        use_residual = self.fusion is not None and self.fusion.linres is not None
        for batch in self._batches(windows):
            x = batch.to(self.device)
            grad = self.flow.localize(x)
            if self.reference is not None:
                grad = grad / self.reference[None, :, None]
            grads.append(grad.double().cpu())
            if use_residual:
                assert self.fusion is not None
                with torch.no_grad():
                    above = self.fusion.linres_map(x).clamp_min(0.0).sum(1)
                residual_curves.append(above.double().cpu())
        g = torch.cat(grads).numpy() if grads else np.zeros((0, len(self.card.signals), self.card.time_steps))
        g = np.nan_to_num(g, nan=0.0, posinf=float(np.finfo(np.float32).max), neginf=0.0)  # an extreme input
        per_time = g.sum(axis=1)
        if residual_curves:
            r = np.nan_to_num(
                torch.cat(residual_curves).numpy(), nan=0.0, posinf=float(np.finfo(np.float32).max)
            )
            per_time = 0.5 * (_unit_sum(per_time) + _unit_sum(r))
        per_signal = g.sum(axis=2)
        shares = per_signal / np.maximum(per_signal.sum(axis=1, keepdims=True), 1e-300)
        order = np.argsort(-shares, axis=1)[:, :top]
        tops = [[(self.card.signals[j], float(shares[i, j])) for j in row] for i, row in enumerate(order)]
        return Localization(
            per_time=per_time, per_signal=per_signal, top_signals=tops, maps=g.astype(np.float32)
        )


def _unit_sum(curves: NDArray[np.float64]) -> NDArray[np.float64]:
    """Each row scaled to sum 1 (an all-zero row stays zero)."""
    total = curves.sum(axis=1, keepdims=True)
    return np.asarray(np.where(total > 0, curves / np.where(total > 0, total, 1.0), 0.0), dtype=np.float64)
