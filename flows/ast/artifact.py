"""AST model artifacts: ``weights.safetensors`` (teacher and student) and ``model.json``, like MVT-Flow's.

model.json (kind "ast") holds everything needed to score new frames the way the model was trained: the
feature extractor (backbone, block, input size, normalization, channels and feature-map size), the
architecture, how an image score is made from the map (reduction and smoothing), the calibrated threshold
with its false-positive rate and the training data's fingerprint. Loading checks all of it: a model made
with another backbone, block, normalization or channel count fails with the field named, not with a
shape error deep in torch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from flows.artifact import (
    WEIGHTS,
    ModelFormatError,
    Threshold,
    load_weights,
    read_meta,
    write_artifact,
)
from flows.ast.features import BACKBONE, IMAGENET_MEAN, IMAGENET_STD, FeatureExtractorConfig
from flows.ast.model import AST, ASTConfig

#: the image model's own format version (signal models have theirs in flows.artifact)
FORMAT_VERSION = 1

KIND = "ast"
Reduce = Literal["mean", "max"]


@dataclass(frozen=True)
class ScoringConfig:
    """How the image score is made from the map: upsampled to the input size, optionally smoothed with a
    Gaussian of `sigma` pixels (of the input size), then reduced by mean or max."""

    reduce: Reduce = "mean"
    sigma: float | None = 4.0

    def __post_init__(self) -> None:
        if self.reduce not in ("mean", "max"):
            raise ValueError(f"reduce must be 'mean' or 'max', got {self.reduce!r}")
        if self.sigma is not None and not self.sigma >= 0:
            raise ValueError(f"sigma must be >= 0 or None, got {self.sigma}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ASTCard:
    """Everything about a trained AST model except its weights (model.json)."""

    features: FeatureExtractorConfig
    channels: int  # of the extractor's block, checked against the extractor at scoring time
    feature_size: tuple[int, int]
    architecture: ASTConfig
    scoring: ScoringConfig
    threshold: Threshold
    training: dict[str, Any]

    @property
    def input_size(self) -> tuple[int, int]:
        return self.features.input_size

    def to_json(self) -> dict[str, Any]:
        features = self.features.to_dict()
        features["channels"] = self.channels
        features["feature_size"] = list(self.feature_size)
        return {
            "format_version": FORMAT_VERSION,
            "kind": KIND,
            "features": features,
            "architecture": self.architecture.to_dict(),
            "scoring": self.scoring.to_dict(),
            "threshold": self.threshold.__dict__,
            "training": self.training,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ASTCard:
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ModelFormatError(
                f"model format_version is {version!r}, this cellwatch reads version {FORMAT_VERSION}; "
                "retrain the model or use a matching cellwatch"
            )
        if data.get("kind") != KIND:
            raise ModelFormatError(
                f"model kind is {data.get('kind')!r}, expected {KIND!r} (an image model from cellwatch train)"
            )
        try:
            feats = data["features"]
            if feats.get("backbone") != BACKBONE:
                raise ModelFormatError(
                    f"features.backbone is {feats.get('backbone')!r}; this cellwatch has {BACKBONE!r} only"
                )
            norm = feats.get("normalization") or {}
            if _floats(norm.get("mean")) != list(IMAGENET_MEAN) or _floats(norm.get("std")) != list(
                IMAGENET_STD
            ):
                raise ModelFormatError(
                    f"features.normalization is {norm!r}; the extractor normalizes with ImageNet "
                    f"mean {list(IMAGENET_MEAN)} and std {list(IMAGENET_STD)}"
                )
            size = feats["input_size"]
            features = FeatureExtractorConfig(
                block=int(feats["block"]), input_size=(int(size[0]), int(size[1]))
            )
            architecture = ASTConfig(**data["architecture"])
            card = cls(
                features=features,
                channels=int(feats["channels"]),
                feature_size=(int(feats["feature_size"][0]), int(feats["feature_size"][1])),
                architecture=architecture,
                scoring=ScoringConfig(**data["scoring"]),
                threshold=Threshold(**data["threshold"]),
                training=dict(data.get("training", {})),
            )
        except ModelFormatError:
            raise
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as err:
            raise ModelFormatError(f"model.json is incomplete or invalid: {err!r}") from err
        if card.channels != architecture.channels:
            raise ModelFormatError(
                f"features.channels is {card.channels} but architecture.channels is {architecture.channels}"
            )
        return card


def _floats(values: Any) -> list[float] | None:
    try:
        return [float(v) for v in values]
    except (TypeError, ValueError):
        return None


@dataclass
class LoadedAST:
    card: ASTCard
    model: AST


def save_ast(directory: Path, model: AST, card: ASTCard) -> None:
    """Write the AST artifact atomically (see flows.artifact.write_artifact)."""
    if model.config != card.architecture:
        raise ValueError("the card's architecture is not the model's")
    write_artifact(directory, model.state_dict(), card.to_json(), kind=KIND)


def load_ast(directory: Path) -> LoadedAST:
    """Load and check an AST model (the extractor's channel count is checked when a scorer is built)."""
    card = ASTCard.from_json(read_meta(directory))
    model = AST(card.architecture)
    load_weights(model, Path(directory) / WEIGHTS)
    model.eval()
    return LoadedAST(card=card, model=model)


def data_fingerprint(paths: Iterable[Path], root: Path | None = None) -> str:
    """SHA-256 (first 16 hex digits) over the training files' names (relative to `root`) and bytes, in
    sorted order: the same images give the same fingerprint wherever the folder lies."""
    h = hashlib.sha256()
    for path in sorted(Path(p) for p in paths):
        name = str(path.relative_to(root)) if root is not None else path.name
        h.update(name.encode())
        h.update(b"\0")
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()[:16]
