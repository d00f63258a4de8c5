"""Shared pieces of the image jobs (train, evaluate, report, demo on an MVTec-AD-layout folder).

`is_image_data` is how every verb decides the model from the data: a directory is an image data set
(AST), a file is a voraus-AD recording (MVT-Flow). `score_dataset` scores test images lazily, one
batch at a time, and keeps what evaluation and the report need at the model's input size: scores, maps,
masks and a downsized copy of each image.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from daemon.cli_support import UsageError


def is_image_data(path: Path) -> bool:
    """A directory is an image data set (MVTec AD layout); anything else is a signal recording."""
    return Path(path).is_dir()


def open_dataset(path: Path, **kwargs: Any) -> Any:
    """The MVTec-layout data set at `path`; a folder not in the layout is a UsageError naming the gap."""
    from ingest.images import MvtecDataset, MvtecLayoutError

    try:
        return MvtecDataset(path, **kwargs)
    except MvtecLayoutError as err:
        raise UsageError(str(err)) from err


@dataclass
class ScoredSet:
    """Scored test images, in the data set's order (test/good first, then each defect type)."""

    paths: list[Path] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    maps: list[np.ndarray] = field(default_factory=list)  # (H, W) float32 at the model's input size
    masks: list[np.ndarray | None] = field(default_factory=list)  # bool at the map's size, None = no mask
    images: list[np.ndarray] = field(default_factory=list)  # uint8 RGB at the map's size

    @property
    def anomaly(self) -> np.ndarray:
        return np.array([label != "good" for label in self.labels], dtype=bool)


def score_dataset(
    scorer: Any,
    items: Iterable[Any],
    *,
    batch_size: int = 16,
    on_image: Callable[[int], None] | None = None,
    keep_images: bool = True,
) -> ScoredSet:
    """Score `ImageItem`s with an `ImageScorer` (batches cut where the image size changes)."""
    from ingest.images import resize_image, resize_mask

    size = tuple(scorer.card.input_size)
    out = ScoredSet()
    pending: list[Any] = []

    def flush() -> None:
        if not pending:
            return
        result = scorer.score([item.image for item in pending])
        for item, raw, amap in zip(pending, result.raw, result.maps, strict=True):
            out.paths.append(item.path)
            out.labels.append(item.label)
            out.scores.append(float(raw))
            out.maps.append(amap)
            out.masks.append(None if item.mask is None else resize_mask(item.mask, size))
            if keep_images:
                out.images.append(resize_image(item.image, size))
        if on_image is not None:
            on_image(len(pending))
        pending.clear()

    for item in items:
        if pending and (len(pending) >= batch_size or pending[0].image.shape[:2] != item.image.shape[:2]):
            flush()
        pending.append(item)
    flush()
    return out


def resolve_kind_flags(
    args: Any,
    *,
    images: bool,
    signal_only: dict[str, Any],
    image_only: dict[str, Any],
    shared: dict[str, tuple[Any, Any]] | None = None,
    context: str,
) -> None:
    """Check and fill the flags whose meaning depends on the kind of data, in place on `args`.

    The flags are registered with default None so that "given" can be told from "default": a flag of
    the other kind that was given is a UsageError naming it (silently ignoring `--window` on an image
    folder would leave the user believing it did something); the others get their kind's default.
    `signal_only` / `image_only` map an option ("--rate-divider") to its default for its own kind,
    `shared` maps an option to its (signal default, image default); `context` ends the error message
    ("DIR is an image folder")."""

    def dest(option: str) -> str:
        return option.lstrip("-").replace("-", "_")

    own, other = (image_only, signal_only) if images else (signal_only, image_only)
    for option in other:
        if getattr(args, dest(option)) is not None:
            kind = "signal recordings" if images else "image data"
            raise UsageError(f"{option} applies to {kind} only; {context}")
    for option, default in own.items():
        if getattr(args, dest(option)) is None:
            setattr(args, dest(option), default)
    for option, (signal_default, image_default) in (shared or {}).items():
        if getattr(args, dest(option)) is None:
            setattr(args, dest(option), image_default if images else signal_default)


def data_kind_context(path: Path, images: bool) -> str:
    """The end of a wrong-kind-flag message: what the data is."""
    return (
        f"{path} is an image folder (MVTec AD layout, AST)"
        if images
        else f"{path} is a signal recording (voraus-AD parquet file, MVT-Flow)"
    )


def count_files(folder: Path) -> int:
    """Files a reader of `folder` will look at (hidden ones skipped, like MvtecDataset): a progress total."""
    try:
        return sum(1 for p in Path(folder).iterdir() if not p.name.startswith("."))
    except OSError:
        return 0
