"""MVT-Flow: a normalizing flow directly on multivariate time series (voraus-AD paper, thesis ch. 8).

Input x ∈ R^{S×T}: S standardized signals as channels, T time steps. Each of the coupling blocks is a
fixed random permutation of the signals followed by a GLOW-style affine coupling (FrEIA): the signals
are split in two halves and each half is scaled and shifted by a 1-D convolutional network of the other
half. The scales are soft-clamped with σ_α(s) = (2α/π)·arctan(s/α). The latent z is standard normal.

Score (per sample, higher = more anomalous) is the negative log-likelihood without its constant,
    score(x) = ½‖z‖² − log|det ∂z/∂x|,
and the training loss is the same quantity per dimension, so the ½ is used consistently in both
(the official code omits it in the loss). Training code lives in ``flows.training``; this module is the
plain model.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import FrEIA.framework as Ff
import FrEIA.modules as Fm
import numpy as np
import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class MVTFlowConfig:
    """Architecture of MVT-Flow. Defaults are the published configuration."""

    signals: int
    time_steps: int
    coupling_blocks: int = 4
    clamp: float = 1.2
    #: signal scaling r: hidden channels = signals × r
    hidden_scale: int = 2
    #: kernel sizes and dilations of the internal network's convolutions (first, hidden..., last)
    kernel_sizes: tuple[int, ...] = (13, 1, 1)
    dilations: tuple[int, ...] = (2, 1, 1)
    #: seed of the fixed random signal permutations
    permutation_seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        checks = {
            "signals": self.signals >= 2,
            "time_steps": self.time_steps >= 1,
            "coupling_blocks": self.coupling_blocks >= 1,
            "clamp": self.clamp > 0,
            "hidden_scale": self.hidden_scale >= 1,
            "kernel_sizes": len(self.kernel_sizes) >= 2 and all(k >= 1 for k in self.kernel_sizes),
            "dilations": len(self.dilations) == len(self.kernel_sizes)
            and all(d >= 1 for d in self.dilations),
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"MVTFlowConfig.{name} is invalid: {getattr(self, name)!r}")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["kernel_sizes"] = list(self.kernel_sizes)
        out["dilations"] = list(self.dilations)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MVTFlowConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown MVT-Flow config keys: {sorted(unknown)}")
        values = dict(data)
        values["kernel_sizes"] = tuple(values.get("kernel_sizes", cls.kernel_sizes))
        values["dilations"] = tuple(values.get("dilations", cls.dilations))
        return cls(**values)


class InternalNetwork(nn.Module):
    """Conv1d stack over time (ReLU between), predicting [s, t] for one half of the signals."""

    def __init__(self, channels_in: int, channels_out: int, config: MVTFlowConfig) -> None:
        super().__init__()
        hidden = config.signals * config.hidden_scale
        widths = [channels_in] + [hidden] * (len(config.kernel_sizes) - 1) + [channels_out]
        layers: list[nn.Module] = []
        for i, (k, d) in enumerate(zip(config.kernel_sizes, config.dilations, strict=True)):
            if i:
                layers.append(nn.ReLU())
            layers.append(
                nn.Conv1d(
                    widths[i],
                    widths[i + 1],
                    kernel_size=k,
                    dilation=d,
                    padding="same",
                    padding_mode="replicate",
                )
            )
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class MVTFlow(nn.Module):
    """The flow as a plain module: ``log_prob``, ``score``, ``localize`` and the exact inverse."""

    def __init__(self, config: MVTFlowConfig) -> None:
        super().__init__()
        self.config = config
        shape = (config.signals, config.time_steps)
        self.inn = Ff.SequenceINN(*shape)
        # PermuteRandom reseeds numpy's global RNG: keep the caller's RNG state untouched
        saved = np.random.get_state()
        try:
            for block in range(config.coupling_blocks):
                self.inn.append(Fm.PermuteRandom, seed=config.permutation_seed + block)
                self.inn.append(
                    Fm.GLOWCouplingBlock,
                    subnet_constructor=self._subnet,
                    clamp=config.clamp,
                    clamp_activation="ATAN",
                )
        finally:
            np.random.set_state(saved)

    def _subnet(self, channels_in: int, channels_out: int) -> nn.Module:
        return InternalNetwork(channels_in, channels_out, self.config)

    @property
    def dims(self) -> int:
        return self.config.signals * self.config.time_steps

    def check_input(self, x: Tensor) -> None:
        expected = (self.config.signals, self.config.time_steps)
        if x.dim() != 3 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"MVT-Flow expects input of shape (batch, signals={expected[0]}, time_steps={expected[1]}), "
                f"got {tuple(x.shape)}"
            )

    def transform(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x -> (z, log|det ∂z/∂x|) with z of the same shape as x and one log-det per sample."""
        self.check_input(x)
        z, log_det = self.inn(x)
        return z, log_det

    def inverse(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """z -> (x, log|det ∂x/∂z|)."""
        self.check_input(z)
        x, log_det = self.inn(z, rev=True)
        return x, log_det

    def score(self, x: Tensor) -> Tensor:
        """Anomaly score per sample: ½‖z‖² − log|det J| (the NLL without its constant)."""
        z, log_det = self.transform(x)
        return 0.5 * z.pow(2).flatten(1).sum(1) - log_det

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact log-density of x under the flow (standard normal base)."""
        return -self.score(x) - 0.5 * self.dims * math.log(2 * math.pi)

    def loss(self, x: Tensor) -> Tensor:
        """Training loss: the mean score per dimension (same ½ as the score)."""
        return self.score(x).mean() / self.dims

    def localize(self, x: Tensor) -> Tensor:
        """Temporal analysis (thesis Eq. 8.6): |∂score/∂x| per signal and time step, shape (B, S, T).

        Sum over signals for the per-time-step curve; sum over time for each signal's contribution.
        """
        self.check_input(x)
        with torch.enable_grad():
            xg = x.detach().clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.score(xg).sum(), xg)
        return grad.abs()
