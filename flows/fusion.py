"""The fused signal detector: MVT-Flow's likelihood next to two linear detectors, each normalized on
normal data only; the fused score is the most anomalous part.

Components (see benchmarks/detector_bench.py for the evidence that chose them):

- ``nll``: MVT-Flow's negative log-likelihood of the whole cycle or window (the published score);
- ``linres``: the local linear-relation residual (flows.residual): per signal and time step, the part
  of the standardized, lag-embedded signal vector outside the principal subspace of normal steps,
  log-scaled, averaged over ``event_s`` seconds and standardized per step against normal cycles;
  the score is its highest value over signals and time. It catches short events (collisions) and
  broken instantaneous relations that the cycle-wide NLL dilutes;
- ``pca``: the squared reconstruction error of the whole flattened cycle from its principal
  components (the paper's PCA baseline): a broken linear relation that lasts the whole cycle
  (a miscommutated motor) adds up over every step.

Each component's score is standardized with the median and the scaled median absolute deviation of
its scores on the calibration split (normal training cycles never trained on); the fused score is
their maximum ("max", the default: the part furthest above normal decides, and it is the part that
fired) or their sum ("sum"). A threshold calibrated on the fused score of the same split then sets the
alarm rate.

Everything here is tensors and plain numbers: ``state()`` goes into a safetensors file and
``meta()`` into model.json.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from flows.residual import LinearResidual, StepProfile

COMPONENTS = ("nll", "linres", "pca")
_MAD_TO_SD = 1.4826


@dataclass(frozen=True)
class FusionConfig:
    """What the fused detector is made of; defaults are the benchmarked configuration."""

    components: tuple[str, ...] = COMPONENTS
    #: moving-average width of the local residual, seconds (the length of the events to catch)
    event_s: float = 0.3
    #: steps of the past appended to each step's signal vector
    lags: int = 4
    #: share of the normal steps' variance inside the principal subspace
    variance: float = 0.99999
    #: principal components of the whole-cycle PCA (fewer when there are fewer training cycles)
    pca_components: int = 90
    #: how the normalized parts make the score: "max" (the furthest above normal) or "sum"
    rule: str = "max"

    def __post_init__(self) -> None:
        unknown = [c for c in self.components if c not in COMPONENTS]
        if unknown or not self.components or len(set(self.components)) != len(self.components):
            raise ValueError(
                f"fusion components must be distinct names of {COMPONENTS}, got {self.components}"
            )
        if not self.event_s > 0:
            raise ValueError(f"event_s must be > 0, got {self.event_s}")
        if self.lags < 0:
            raise ValueError(f"lags must be >= 0, got {self.lags}")
        if not 0 < self.variance < 1:
            raise ValueError(f"variance must be in (0, 1), got {self.variance}")
        if self.pca_components < 1:
            raise ValueError(f"pca_components must be >= 1, got {self.pca_components}")
        if self.rule not in ("max", "sum"):
            raise ValueError(f"rule must be 'max' or 'sum', got {self.rule!r}")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["components"] = list(self.components)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FusionConfig:
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown fusion config keys: {sorted(unknown)}")
        values = dict(data)
        if "components" in values:
            values["components"] = tuple(values["components"])
        return cls(**values)


@dataclass(frozen=True)
class Normalizer:
    """(score − center) / scale, from a component's scores on normal calibration data."""

    center: float
    scale: float

    @classmethod
    def fit(cls, scores: Tensor) -> Normalizer:
        s = scores.double().flatten()
        if len(s) < 2 or not bool(torch.isfinite(s).all()):
            raise ValueError("a fusion normalizer needs at least two finite calibration scores")
        center = float(torch.quantile(s, 0.5))
        mad = float(torch.quantile((s - center).abs(), 0.5)) * _MAD_TO_SD
        spread = mad if mad > 0 else float(s.std())
        return cls(center=center, scale=spread if spread > 0 else 1.0)

    def __call__(self, scores: Tensor) -> Tensor:
        return (scores - self.center) / self.scale


class PCAResidual:
    """Whole-sample PCA reconstruction error (the paper's PCA baseline) with stored components."""

    def __init__(self, mean: Tensor, components: Tensor) -> None:
        self.mean = mean.float()  # (D,)
        self.components = components.float()  # (k, D)

    def score(self, x: Tensor) -> Tensor:
        """Squared reconstruction error of each sample (B,), summed in float64."""
        flat = x.reshape(len(x), -1).float() - self.mean.to(x.device)
        comps = self.components.to(x.device)
        return (flat - (flat @ comps.T) @ comps).square().sum(1, dtype=torch.float64)

    def state(self, prefix: str) -> dict[str, Tensor]:
        return {f"{prefix}.mean": self.mean, f"{prefix}.components": self.components}

    @classmethod
    def from_state(cls, state: dict[str, Tensor], prefix: str) -> PCAResidual:
        return cls(state[f"{prefix}.mean"], state[f"{prefix}.components"])


class SignalFusion:
    """The non-flow parts of the fused detector and the normalizers of every component."""

    def __init__(
        self,
        config: FusionConfig,
        normalizers: dict[str, Normalizer],
        linres: LinearResidual | None,
        profile: StepProfile | None,
        pca: PCAResidual | None,
    ) -> None:
        self.config = config
        self.normalizers = normalizers
        self.linres = linres
        self.profile = profile
        self.pca = pca

    # --- fitting ------------------------------------------------------------------------------------
    @classmethod
    def fit_parts(
        cls, config: FusionConfig, x_fit: Tensor, lengths: Tensor | None, rate_hz: float
    ) -> SignalFusion:
        """Fit the linear parts on the training samples (N, S, T); normalizers come from `calibrate`."""
        from flows.baselines import PCABaseline
        from flows.residual import window_steps

        linres = profile = pca = None
        if "linres" in config.components:
            linres = LinearResidual.fit(x_fit, lengths, variance=config.variance, lags=config.lags)
            width = window_steps(config.event_s, rate_hz)
            residuals = (linres.residual(x_fit[i : i + 32]) for i in range(0, len(x_fit), 32))
            profile = StepProfile.fit(residuals, width)
        if "pca" in config.components:
            base = PCABaseline(n_components=config.pca_components).fit(x_fit)
            assert base.mean_ is not None
            assert base.components_ is not None
            pca = PCAResidual(base.mean_, base.components_)
        return cls(config, {}, linres, profile, pca)

    def calibrate(self, components: dict[str, Tensor]) -> None:
        """Normalizers from each component's scores on the calibration split."""
        self.normalizers = {name: Normalizer.fit(components[name]) for name in self.config.components}

    # --- scoring ------------------------------------------------------------------------------------
    def linres_map(self, x: Tensor) -> Tensor:
        """Standardized local residual per signal and step (B, S, T)."""
        assert self.linres is not None
        assert self.profile is not None
        return self.profile.standardize(self.linres.residual(x))

    def components(self, x: Tensor, nll: Tensor | None) -> dict[str, Tensor]:
        """Raw score of every component for prepared samples (B, S, T); `nll` from the flow."""
        out: dict[str, Tensor] = {}
        for name in self.config.components:
            if name == "nll":
                if nll is None:
                    raise ValueError("the fused detector needs the flow's NLL")
                out[name] = nll.double()
            elif name == "linres":
                out[name] = self.linres_map(x).flatten(1).amax(1).double()
            else:
                assert self.pca is not None
                out[name] = self.pca.score(x)
        return out

    def fuse(self, components: dict[str, Tensor]) -> Tensor:
        """The fused score (B,) of raw component scores."""
        return self.combine(self.normalized(components))

    def normalized(self, components: dict[str, Tensor]) -> dict[str, Tensor]:
        """Each component's score in normal spreads above its normal median."""
        if not self.normalizers:
            raise RuntimeError("SignalFusion used before calibrate")
        return {name: self.normalizers[name](components[name].double()) for name in self.config.components}

    def combine(self, normalized: dict[str, Tensor]) -> Tensor:
        """Normalized component scores combined by the config's rule: their maximum or their sum."""
        stacked = torch.stack([normalized[name] for name in self.config.components])
        return stacked.amax(0) if self.config.rule == "max" else stacked.sum(0)

    # --- artifact -----------------------------------------------------------------------------------
    def check(self, signals: int, time_steps: int) -> None:
        """Raise ValueError unless every tensor fits `signals` × `time_steps` and is finite."""
        expected: dict[str, tuple[int, ...]] = {}
        if self.linres is not None and self.profile is not None:
            width = signals * (self.config.lags + 1)
            expected |= {
                "linres.mean": (width,),
                "linres.scale": (signals,),
                "profile.mean": (signals, time_steps),
                "profile.spread": (signals, time_steps),
            }
            k = self.linres.components.shape[0]
            expected["linres.components"] = (k, width) if 0 < k < width else (-1,)
        if self.pca is not None:
            k = self.pca.components.shape[0]
            expected |= {
                "pca.mean": (signals * time_steps,),
                "pca.components": (k, signals * time_steps) if k > 0 else (-1,),
            }
        state = self.state()
        for key, shape in expected.items():
            if tuple(state[key].shape) != shape:
                raise ValueError(f"{key} has shape {tuple(state[key].shape)}, expected {shape}")
            if not bool(torch.isfinite(state[key]).all()):
                raise ValueError(f"{key} has non-finite values")
        if set(state) != set(expected):
            raise ValueError(f"unexpected fusion tensors: {sorted(set(state) ^ set(expected))}")

    def state(self) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        if self.linres is not None and self.profile is not None:
            out |= self.linres.state("linres") | self.profile.state("profile")
        if self.pca is not None:
            out |= self.pca.state("pca")
        return out

    def meta(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "normalizers": {k: asdict(v) for k, v in self.normalizers.items()},
            "profile": self.profile.meta() if self.profile is not None else None,
        }

    @classmethod
    def from_artifact(cls, meta: dict[str, Any], state: dict[str, Tensor]) -> SignalFusion:
        config = FusionConfig.from_dict(meta["config"])
        normalizers = {
            k: Normalizer(float(v["center"]), float(v["scale"])) for k, v in meta["normalizers"].items()
        }
        if set(normalizers) != set(config.components):
            raise ValueError(
                f"fusion normalizers {sorted(normalizers)} do not match the components {config.components}"
            )
        linres = profile = pca = None
        if "linres" in config.components:
            linres = LinearResidual.from_state(state, "linres", config.lags)
            profile = StepProfile.from_state(state, "profile", meta["profile"])
        if "pca" in config.components:
            pca = PCAResidual.from_state(state, "pca")
        return cls(config, normalizers, linres, profile, pca)
