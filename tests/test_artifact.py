"""Model artifacts: safetensors + JSON, round trip, and clear refusals."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from flows.artifact import ModelCard, ModelFormatError, Threshold, load_model, save_model
from flows.mvtflow import MVTFlow, MVTFlowConfig
from flows.preprocess import Standardizer
from flows.scorer import Scorer

SIGNALS = tuple(f"s{i}" for i in range(6))


def make(tmp_path: Path, mode: str = "cycle") -> tuple[Path, MVTFlow, ModelCard]:
    torch.manual_seed(1)
    flow = MVTFlow(MVTFlowConfig(signals=6, time_steps=32)).eval()
    card = ModelCard(
        signals=SIGNALS,
        rate_hz=100.0,
        mode=mode,  # type: ignore[arg-type]
        time_steps=32,
        window=32 if mode == "window" else None,
        hop=8 if mode == "window" else None,
        scaler=Standardizer(mean=np.arange(6.0), std=np.full(6, 2.0)),
        threshold=Threshold(
            value=50.0, reference=10.0, target_fpr=0.01, calibration_fpr=0.0, calibration_windows=20
        ),
        architecture=flow.config,
        training={"data_fingerprint": "abc"},
    )
    path = tmp_path / "model"
    save_model(path, flow, card)
    return path, flow, card


def test_round_trip_scores_identically(tmp_path: Path) -> None:
    path, flow, card = make(tmp_path)
    loaded = load_model(path, expect_signals=SIGNALS, expect_rate_hz=100.0)
    assert loaded.card == card
    x = torch.randn(4, 6, 32)
    with torch.no_grad():
        assert torch.equal(flow.score(x), loaded.flow.score(x))
    assert sorted(p.name for p in path.iterdir()) == ["model.json", "weights.safetensors"]
    assert set(load_file(str(path / "weights.safetensors"))) == set(flow.state_dict())  # plain tensors
    meta = json.loads((path / "model.json").read_text())
    for key in (
        "format_version",
        "signals",
        "rate_hz",
        "mode",
        "time_steps",
        "scaler",
        "threshold",
        "architecture",
    ):
        assert key in meta


def test_scorer_normalizes_so_the_threshold_is_one(tmp_path: Path) -> None:
    path, _, card = make(tmp_path)
    scorer = Scorer(load_model(path), device="cpu")
    raw = np.array([10.0, 50.0, 90.0])
    assert np.allclose(card.threshold.normalize(raw), [0.0, 1.0, 2.0])
    cycle = np.random.default_rng(0).normal(size=(40, 6)) * 2 + np.arange(6.0)  # longer than T: truncated
    prepared = scorer.prepare_cycle(cycle)
    assert prepared.shape == (6, 32)
    assert np.allclose(prepared[:, 0], (cycle[0] - np.arange(6.0)) / 2.0, atol=1e-6)
    short = scorer.prepare_cycle(cycle[:10])
    assert np.all(short[:, 10:] == 0)  # zero-padded after standardization
    result = scorer.score(np.stack([prepared, short]))
    assert np.allclose(result.normalized, (result.raw - 10.0) / 40.0)
    assert np.array_equal(result.is_anomaly, result.raw > 50.0)


def test_refuses_a_different_signal_list_rate_or_version(tmp_path: Path) -> None:
    path, _, _ = make(tmp_path)
    with pytest.raises(ModelFormatError, match=r"missing from the data: \['s5'\]"):
        load_model(path, expect_signals=SIGNALS[:5])
    with pytest.raises(ModelFormatError, match="different order"):
        load_model(path, expect_signals=tuple(reversed(SIGNALS)))
    with pytest.raises(ModelFormatError, match="trained at 100 Hz, data is 500 Hz"):
        load_model(path, expect_rate_hz=500.0)
    meta = json.loads((path / "model.json").read_text())
    meta["format_version"] = 99
    (path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelFormatError, match="format_version is 99"):
        load_model(path)


def test_refuses_incomplete_or_mismatched_files(tmp_path: Path) -> None:
    path, _, _ = make(tmp_path)
    meta = json.loads((path / "model.json").read_text())
    del meta["scaler"]
    (path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelFormatError, match="incomplete or invalid"):
        load_model(path)
    path2, _, _ = make(tmp_path / "b")
    meta = json.loads((path2 / "model.json").read_text())
    meta["architecture"]["hidden_scale"] = 3  # weights no longer fit
    (path2 / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelFormatError, match=r"weight .* has shape"):
        load_model(path2)
    (path2 / "weights.safetensors").unlink()
    with pytest.raises(ModelFormatError, match=r"weights\.safetensors is missing"):
        load_model(path2)


def test_window_mode_cuts_a_stream(tmp_path: Path) -> None:
    path, _, _ = make(tmp_path, mode="window")
    scorer = Scorer(load_model(path), device="cpu")
    stream = np.random.default_rng(1).normal(size=(100, 6))
    windows = scorer.prepare_stream(stream)
    assert windows.shape == (len(range(0, 100 - 32 + 1, 8)), 6, 32)
    # micro-batching: any mix of windows scores the same as one at a time
    together = scorer.score(windows).raw
    alone = np.array([scorer.score(w[None]).raw[0] for w in windows])
    assert np.allclose(together, alone, rtol=1e-5)
    loc = scorer.localize(windows[:2], top=3)
    assert loc.per_time.shape == (2, 32)
    assert loc.per_signal.shape == (2, 6)
    assert len(loc.top_signals[0]) == 3
    assert loc.top_signals[0][0][1] >= loc.top_signals[0][1][1]


# --- atomic save ---------------------------------------------------------------------------------------
CRASH = """
import dataclasses, os, sys
from pathlib import Path
import flows.artifact as art

target, where = Path(sys.argv[1]), sys.argv[2]
loaded = art.load_model(target)
card = dataclasses.replace(loaded.card, threshold=dataclasses.replace(loaded.card.threshold, value=99.0))
if where == "weights":  # the power goes while the new weights are half written
    real_save = art.save_file
    def torn(state, path, metadata=None):
        real_save(state, path, metadata=metadata)
        with open(path, "r+b") as fh:
            fh.truncate(100)
        os._exit(9)
    art.save_file = torn
else:  # between moving the old model aside and moving the new one in
    real_replace = os.replace
    def replace(src, dst):
        real_replace(src, dst)
        os._exit(9)
    os.replace = replace
art.save_model(target, loaded.flow, card)
"""


def crash_during_save(path: Path, where: str) -> None:
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", CRASH, str(path), where], capture_output=True, timeout=120)
    assert result.returncode == 9, result.stderr.decode()[-2000:]


def test_a_crash_while_writing_leaves_the_old_model_loadable(tmp_path: Path) -> None:
    path, flow, card = make(tmp_path)
    crash_during_save(path, "weights")
    loaded = load_model(path)  # the old model, whole
    assert loaded.card == card
    x = torch.randn(2, 6, 32)
    with torch.no_grad():
        assert torch.equal(flow.score(x), loaded.flow.score(x))
    assert sorted(p.name for p in path.iterdir()) == ["model.json", "weights.safetensors"]


def test_a_crash_between_the_renames_never_leaves_a_half_model(tmp_path: Path) -> None:
    path, flow, card = make(tmp_path)
    crash_during_save(path, "swap")
    with pytest.raises(ModelFormatError, match="is not a cellwatch model"):
        load_model(path)  # no model under the name: a clear refusal, not a mix of two
    [aside] = [p for p in tmp_path.iterdir() if p.name.startswith(".model.old-")]
    assert load_model(aside).card == card  # the old model is whole beside it
    save_model(path, flow, card)  # and saving again works
    assert load_model(path).card == card


def test_save_fsyncs_files_and_directories_before_the_renames(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without fsync a rename can reach the disk before the data it points at: after a power failure
    the new name would hold empty or partial files."""
    import os
    import stat

    path, flow, card = make(tmp_path)
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        info = os.fstat(fd)
        events.append("fsync dir" if stat.S_ISDIR(info.st_mode) else f"fsync file {info.st_size}")
        real_fsync(fd)

    def replace(src: Any, dst: Any) -> None:
        events.append(f"replace {Path(src).name[:10]} -> {Path(dst).name[:10]}")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    save_model(path, flow, card)
    weights, meta = (path / "weights.safetensors").stat().st_size, (path / "model.json").stat().st_size
    assert events[:3] == [f"fsync file {weights}", f"fsync file {meta}", "fsync dir"]
    assert events[3:5] == ["replace model -> .model.old", "replace .model.tmp -> model"]
    assert events[5:] == ["fsync dir", "fsync dir"]  # the parent, after the renames
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # nothing left beside it


def test_standardizer_gives_mean_0_std_1_and_maps_constant_signals_to_0() -> None:
    """What the scaler promises on its own training data, cycles of different lengths pooled: each
    varying signal comes out with mean 0 and std 1; a constant signal (even a large constant, where
    float rounding leaves a tiny variance) gets std 1 and comes out 0, not inf or NaN."""
    rng = np.random.default_rng(5)
    cycles = []
    for length in (40, 75, 13):
        x = rng.normal(loc=[3.0, -200.0, 0.0, 0.0], scale=[0.5, 40.0, 1e-3, 1.0], size=(length, 4))
        x[:, 3] = 1e6 + 0.1  # constant, far from zero
        cycles.append(x.astype(np.float32))
    scaler = Standardizer.fit(cycles)
    z = np.concatenate([scaler.transform(x) for x in cycles]).astype(np.float64)
    np.testing.assert_allclose(z[:, :3].mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(z[:, :3].std(axis=0), 1.0, rtol=1e-5)
    assert scaler.std[3] == 1.0
    np.testing.assert_allclose(z[:, 3], 0.0, atol=1e-6)
    # round trip through the card's dict form keeps it exactly
    assert Standardizer.from_dict(json.loads(json.dumps(scaler.to_dict()))) == scaler
