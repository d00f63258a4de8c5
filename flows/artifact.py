"""Model artifacts: a directory with ``weights.safetensors`` and ``model.json``. No pickle anywhere.

model.json holds everything needed to score new data the way the model was trained: the format
version, the signal list in order, the sampling rate, the scoring mode with T (cycle) or window/hop,
the scaler, the calibrated threshold with its false-positive rate, the training-data fingerprint and
the architecture and training configuration. Loading checks the format version and the weights, and
optionally that the data to be scored has the same signals and rate.

Format version 2 adds the detector: ``"detector": "mvt-flow"`` (the flow's NLL alone, as version 1)
or ``"fusion"`` (flows.fusion: the NLL fused with two linear detectors, whose tensors are in
``detector.safetensors`` and whose settings and normalizers are under ``"fusion"``), and the normal
attribution profile (mean |∂score/∂x| per signal on normal training data) that explanations are
measured against. Version 1 models still load: as a plain MVT-Flow with the raw gradient attribution.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from safetensors.torch import load_file, save_file

from flows.mvtflow import MVTFlow, MVTFlowConfig
from flows.preprocess import Standardizer

if TYPE_CHECKING:
    from flows.fusion import SignalFusion

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
KIND = "mvt-flow"
WEIGHTS = "weights.safetensors"
DETECTOR_WEIGHTS = "detector.safetensors"
META = "model.json"
DETECTORS = ("fusion", "mvt-flow")
MAX_META_BYTES = 16 * 2**20

Mode = Literal["cycle", "window"]


class ModelFormatError(ValueError):
    """A model directory that cannot be used: the message says which field and why."""


@dataclass(frozen=True)
class Threshold:
    """Score threshold calibrated on held-out normal training data.

    ``reference`` is the median calibration score: normalized = (score − reference) / (value − reference),
    so a typical normal window scores ~0 and the threshold maps to 1.0.
    """

    value: float
    reference: float
    target_fpr: float
    calibration_fpr: float
    calibration_windows: int

    @classmethod
    def calibrate(cls, scores: Any, target_fpr: float) -> Threshold:
        """The threshold at `target_fpr` of held-out normal `scores` (flows.metrics.threshold_at_fpr)."""
        import numpy as np

        from flows.metrics import threshold_at_fpr

        scores = np.asarray(scores, dtype=float)
        value = threshold_at_fpr(scores, target_fpr)
        return cls(
            value=float(value),
            reference=float(np.median(scores)),
            target_fpr=target_fpr,
            calibration_fpr=float(np.mean(scores > value)),
            calibration_windows=len(scores),
        )

    def normalize(self, score: Any) -> Any:
        span = self.value - self.reference
        return (score - self.reference) / (span if span > 0 else 1.0)


@dataclass(frozen=True)
class ModelCard:
    """Everything about a trained model except its weights (model.json)."""

    signals: tuple[str, ...]
    rate_hz: float
    mode: Mode
    time_steps: int
    window: int | None
    hop: int | None
    scaler: Standardizer
    threshold: Threshold
    architecture: MVTFlowConfig
    training: dict[str, Any]
    #: "mvt-flow" (the flow's NLL) or "fusion" (flows.fusion)
    detector: str = "mvt-flow"
    #: flows.fusion.SignalFusion.meta() of a fusion model
    fusion: dict[str, Any] | None = None
    #: mean |∂NLL/∂x| per signal on normal training data; explanations are relative to it
    attribution_reference: tuple[float, ...] | None = None

    def to_json(self) -> dict[str, Any]:
        out = {
            "format_version": FORMAT_VERSION,
            "kind": KIND,
            "signals": list(self.signals),
            "rate_hz": self.rate_hz,
            "mode": self.mode,
            "time_steps": self.time_steps,
            "window": self.window,
            "hop": self.hop,
            "scaler": self.scaler.to_dict(),
            "threshold": self.threshold.__dict__,
            "architecture": self.architecture.to_dict(),
            "training": self.training,
            "detector": self.detector,
        }
        if self.fusion is not None:
            out["fusion"] = self.fusion
        if self.attribution_reference is not None:
            out["attribution_reference"] = list(self.attribution_reference)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelCard:
        version = data.get("format_version")
        if version not in READABLE_VERSIONS:
            raise ModelFormatError(
                f"model format_version is {version!r}, this cellwatch reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))}; retrain the model or use a matching cellwatch"
            )
        if data.get("kind") != KIND:
            raise ModelFormatError(f"model kind is {data.get('kind')!r}, expected {KIND!r}")
        try:
            signals = tuple(str(s) for s in data["signals"])
            scaler = Standardizer.from_dict(data["scaler"])
            card = cls(
                signals=signals,
                rate_hz=float(data["rate_hz"]),
                mode=data["mode"],
                time_steps=int(data["time_steps"]),
                window=None if data["window"] is None else int(data["window"]),
                hop=None if data["hop"] is None else int(data["hop"]),
                scaler=scaler,
                threshold=Threshold(**data["threshold"]),
                architecture=MVTFlowConfig.from_dict(data["architecture"]),
                training=dict(data.get("training", {})),
                detector=str(data.get("detector", "mvt-flow")),
                fusion=dict(data["fusion"]) if data.get("fusion") is not None else None,
                attribution_reference=_reference(data.get("attribution_reference"), len(signals)),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ModelFormatError(f"model.json is incomplete or invalid: {err}") from err
        if card.detector not in DETECTORS:
            raise ModelFormatError(f"model detector is {card.detector!r}, expected one of {DETECTORS}")
        if (card.detector == "fusion") != (card.fusion is not None):
            raise ModelFormatError(
                "model.json: a fusion model needs its 'fusion' settings, and only it has them"
            )
        if card.mode not in ("cycle", "window"):
            raise ModelFormatError(f"model mode must be 'cycle' or 'window', got {card.mode!r}")
        if len(scaler.mean) != len(signals) or card.architecture.signals != len(signals):
            raise ModelFormatError(
                f"model.json lists {len(signals)} signals but the scaler has {len(scaler.mean)} "
                f"and the network {card.architecture.signals}"
            )
        if card.architecture.time_steps != card.time_steps:
            raise ModelFormatError("model.json time_steps does not match the network's")
        return card


def _reference(value: Any, signals: int) -> tuple[float, ...] | None:
    if value is None:
        return None
    ref = tuple(float(v) for v in value)
    if len(ref) != signals or not all(math.isfinite(v) and v > 0 for v in ref):
        raise ValueError(f"attribution_reference must hold {signals} positive finite numbers")
    return ref


@dataclass
class LoadedModel:
    card: ModelCard
    flow: MVTFlow
    #: the linear parts and normalizers of a fusion model (None for a plain MVT-Flow)
    fusion: SignalFusion | None = None


def save_model(directory: Path, flow: MVTFlow, card: ModelCard, fusion: SignalFusion | None = None) -> None:
    """Write a signal model atomically (see `write_artifact`); a fusion model's linear parts go to
    ``detector.safetensors``."""
    if (card.detector == "fusion") != (fusion is not None):
        raise ValueError("save_model: a fusion card needs its SignalFusion, and only it")
    extra = {DETECTOR_WEIGHTS: fusion.state()} if fusion is not None else None
    write_artifact(directory, flow.state_dict(), card.to_json(), kind=KIND, extra=extra)


def write_artifact(
    directory: Path,
    state: dict[str, Any],
    meta: dict[str, Any],
    *,
    kind: str,
    extra: dict[str, dict[str, Any]] | None = None,
) -> None:
    """Write ``weights.safetensors`` and ``model.json`` atomically: a crash at any point leaves either the
    old model or the new one under `directory`, never a half-written one that loads.

    Both files are written into a temporary directory beside the target and fsynced, with the
    temporary directory itself; it is then renamed into place and the parent directory fsynced. An
    existing model is first renamed aside (to a unique ``.<name>.old-*`` name) and removed only once
    the new one is in place. A crash between those two renames leaves no model under `directory` (a
    clear "not a cellwatch model" on load) and the complete old one beside it."""
    directory = Path(directory)
    parent = directory.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=parent))
    try:
        tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt", "kind": kind})
        names = [WEIGHTS, META]
        for name, extra_state in (extra or {}).items():
            extra_tensors = {k: v.detach().cpu().contiguous() for k, v in extra_state.items()}
            save_file(extra_tensors, str(tmp / name), metadata={"format": "pt", "kind": kind})
            names.append(name)
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
        for name in names:
            _fsync_path(tmp / name)
        _fsync_path(tmp)
        if directory.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=parent))
            os.replace(directory, old)  # onto the empty directory mkdtemp made
            os.replace(tmp, directory)
            _fsync_path(parent)
            shutil.rmtree(old)
        else:
            os.replace(tmp, directory)
        _fsync_path(parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_model(
    directory: Path,
    *,
    expect_signals: tuple[str, ...] | list[str] | None = None,
    expect_rate_hz: float | None = None,
) -> LoadedModel:
    """Load and check a model; with `expect_*` also check it fits the data it is about to score."""
    data = read_meta(directory)
    if (
        isinstance(data.get("kind"), str)
        and data["kind"] != KIND
        and data.get("format_version") in READABLE_VERSIONS
    ):
        raise ModelFormatError(
            f"{directory} is a {data['kind']!r} model, not a signal model ({KIND!r}): "
            "use it on the kind of data it was trained on"
        )
    card = ModelCard.from_json(data)
    if expect_signals is not None and tuple(expect_signals) != card.signals:
        expected = list(expect_signals)
        missing = [s for s in card.signals if s not in expected]
        extra = [s for s in expected if s not in card.signals]
        detail = f"model needs {len(card.signals)} signals, data has {len(expected)}"
        if missing:
            detail += f"; missing from the data: {missing[:5]}"
        if extra:
            detail += f"; not in the model: {extra[:5]}"
        if not missing and not extra:
            detail += "; same signals in a different order"
        raise ModelFormatError(f"signal list does not match the model: {detail}")
    if expect_rate_hz is not None and abs(expect_rate_hz - card.rate_hz) > 1e-6 * card.rate_hz:
        raise ModelFormatError(
            "sampling rate does not match the model: "
            f"model trained at {card.rate_hz:g} Hz, data is {expect_rate_hz:g} Hz"
        )
    flow = MVTFlow(card.architecture)
    load_weights(flow, Path(directory) / WEIGHTS)
    flow.eval()
    fusion = load_fusion(Path(directory), card) if card.fusion is not None else None
    return LoadedModel(card=card, flow=flow, fusion=fusion)


def load_fusion(directory: Path, card: ModelCard) -> SignalFusion:
    """The linear parts of a fusion model, checked against model.json."""
    from flows.fusion import SignalFusion

    path = directory / DETECTOR_WEIGHTS
    if not path.is_file():
        raise ModelFormatError(f"{directory} is a fusion model but {DETECTOR_WEIGHTS} is missing")
    try:
        state = load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for a damaged header
        raise ModelFormatError(f"{path} is not a readable safetensors file: {err}") from err
    assert card.fusion is not None
    try:
        fusion = SignalFusion.from_artifact(card.fusion, state)
        fusion.check(len(card.signals), card.time_steps)
    except (KeyError, TypeError, ValueError) as err:
        raise ModelFormatError(f"{path.name} does not fit model.json: {err}") from err
    return fusion


def load_weights(module: Any, weights_path: Path) -> None:
    """Load safetensors weights into `module`, checking every key and shape against it first."""
    try:
        state = load_file(str(weights_path))
    except Exception as err:  # safetensors raises its own error types for a damaged header
        raise ModelFormatError(f"{weights_path} is not a readable safetensors file: {err}") from err
    own = module.state_dict()
    if set(state) != set(own):
        raise ModelFormatError(
            f"{weights_path.name} does not fit the architecture in model.json "
            f"(missing {sorted(set(own) - set(state))[:3]}, unexpected {sorted(set(state) - set(own))[:3]})"
        )
    for key, value in state.items():
        if value.shape != own[key].shape:
            raise ModelFormatError(
                f"weight {key} has shape {tuple(value.shape)}, expected {tuple(own[key].shape)}"
            )
    module.load_state_dict(state)


def read_meta(directory: Path) -> dict[str, Any]:
    """model.json of a model directory, size-bounded and parsed (both files must exist)."""
    directory = Path(directory)
    meta_path, weights_path = directory / META, directory / WEIGHTS
    for path in (meta_path, weights_path):
        if not path.is_file():
            raise ModelFormatError(f"{directory} is not a cellwatch model: {path.name} is missing")
    if meta_path.stat().st_size > MAX_META_BYTES:
        raise ModelFormatError(f"{meta_path} is larger than {MAX_META_BYTES} bytes")
    try:
        data = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelFormatError(f"{meta_path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ModelFormatError(f"{meta_path} must hold a JSON object, found {type(data).__name__}")
    return data


def model_kind(directory: Path) -> str:
    """The ``kind`` of a model directory: "mvt-flow" (signals) or "ast" (images)."""
    kind = read_meta(directory).get("kind")
    if not isinstance(kind, str):
        raise ModelFormatError(f"{Path(directory) / META} has no kind")
    return kind


def state_fingerprint(flow: MVTFlow) -> str:
    """Short hash of the weights, for logs and reports."""
    import hashlib

    h = hashlib.sha256()
    for key, value in sorted(flow.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


__all__ = [
    "FORMAT_VERSION",
    "LoadedModel",
    "ModelCard",
    "ModelFormatError",
    "Threshold",
    "load_model",
    "load_weights",
    "model_kind",
    "read_meta",
    "save_model",
    "state_fingerprint",
    "write_artifact",
]
