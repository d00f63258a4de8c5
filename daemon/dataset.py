"""Loading a voraus-AD file into labelled cycles for training and evaluation (with progress)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from daemon.cli_support import UsageError, progress
from flows.preprocess import downsample
from ingest.errors import VorausFormatError
from ingest.voraus.reader import RejectStats, VorausReader
from ingest.voraus.schema import SIGNAL_GROUPS


@dataclass
class CycleSet:
    """Cycles of one split: raw signals (T_i, S) float32 and their labels."""

    signals: list[NDArray[np.float32]] = field(default_factory=list)
    samples: list[int] = field(default_factory=list)
    categories: list[str] = field(default_factory=list)
    variants: list[str] = field(default_factory=list)
    anomaly: list[bool] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.signals)

    def subset(self, index: NDArray[np.intp] | list[int]) -> CycleSet:
        return CycleSet(
            signals=[self.signals[i] for i in index],
            samples=[self.samples[i] for i in index],
            categories=[self.categories[i] for i in index],
            variants=[self.variants[i] for i in index],
            anomaly=[self.anomaly[i] for i in index],
        )


@dataclass
class LoadedData:
    train: CycleSet
    test: CycleSet
    signal_names: tuple[str, ...]
    rate_hz: float  # after down-sampling
    source_rate_hz: int
    fingerprint: str  # sha256 over the training cycles' sample ids and values
    rejections: RejectStats


def resolve_signals(name: str) -> tuple[str, ...]:
    try:
        return SIGNAL_GROUPS[name]
    except KeyError:
        raise UsageError(f"--signals must be one of {', '.join(SIGNAL_GROUPS)}, got {name!r}") from None


def load_cycles(
    path: Path,
    signals: tuple[str, ...],
    *,
    rate_divider: int = 1,
    want_train: bool = True,
    want_test: bool = True,
) -> LoadedData:
    if rate_divider < 1:
        raise UsageError(f"--rate-divider must be >= 1, got {rate_divider}")
    if not Path(path).exists():
        raise UsageError(f"data file {path} does not exist")
    train, test = CycleSet(), CycleSet()
    digest = hashlib.sha256()
    try:
        reader = VorausReader(path, signals)
    except VorausFormatError as err:
        raise UsageError(str(err)) from err
    with reader:
        meta = reader.meta()
        rate = reader.rate_hz
        if rate is None:
            raise UsageError(f"{path}: cannot tell the sampling rate (no valid cycle)")
        with progress() as bar:
            task = bar.add_task(f"reading {Path(path).name}", total=len(meta))
            for cycle in reader.cycles():
                bar.advance(task)
                target = train if cycle.is_train else test
                if (target is train and not want_train) or (target is test and not want_test):
                    continue
                x = np.ascontiguousarray(downsample(cycle.signals, rate_divider), dtype=np.float32)
                if target is train:
                    digest.update(np.int64(cycle.sample).tobytes())
                    digest.update(cycle.signals.tobytes())
                target.signals.append(x)
                target.samples.append(cycle.sample)
                target.categories.append(cycle.category_name)
                target.variants.append(cycle.variant_name)
                target.anomaly.append(cycle.anomaly)
            bar.update(task, completed=len(meta))
        return LoadedData(
            train=train,
            test=test,
            signal_names=tuple(signals),
            rate_hz=rate / rate_divider,
            source_rate_hz=rate,
            fingerprint=digest.hexdigest(),
            rejections=reader.rejections,
        )
