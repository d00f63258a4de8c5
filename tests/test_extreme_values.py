"""Extreme values never crash the daemon and never vanish: one glitching sample (1e20 in one torque
value: a drive glitch, an integer overflow in a gateway) gives a bounded, very high score that is
stored like any other, flagged anomalous; the rest of the stream goes on.

Before the fix such a value gave an infinite score: the line-protocol encoder refused it, the InfluxDB
flush dropped the whole batch, and over Kafka/MQTT the redelivered message crashed the daemon again
after each restart.
"""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from brokers import TansuServer
from daemons import Daemon
from services import InfluxServer
from test_kafka_source import Committed
from test_stream_ingest import (
    T0,
    config,
    expected_windows,
    kafka_source,
    stored,
    unique,
    wait_stored,
)

from daemon.cli import main
from flows.artifact import load_model
from flows.scorer import CLIP_SIGMA, SCORE_CAP, Scorer
from ingest.loadgen import Target, plan, publish, robot_ids
from ingest.voraus.reader import VorausReader
from ingest.voraus.schema import MACHINE_SIGNALS

EXTREME = 1e20
SIGNAL = "motor_torque_3"  # a torque sample, as a glitching drive would send


def strict_json(line: str) -> Any:
    """json.loads that refuses NaN and Infinity (Python accepts them; JSON does not)."""

    def refuse(constant: str) -> Any:
        raise ValueError(f"not JSON: {constant}")

    return json.loads(line, parse_constant=refuse)


def with_extreme_value(cell: Path, out: Path) -> int:
    """A copy of `cell` whose second test cycle has one sample of `SIGNAL` at 1e20; returns its id."""
    table = pq.read_table(cell)
    with VorausReader(cell, [SIGNAL]) as reader:
        test = [c.sample for c in reader.cycles() if not c.is_train]
    target = test[1]
    samples = table.column("sample").to_numpy()
    values = table.column(SIGNAL).to_numpy().copy()
    row = int(np.flatnonzero(samples == target)[40])
    values[row] = EXTREME
    index = table.column_names.index(SIGNAL)
    pq.write_table(table.set_column(index, SIGNAL, [values]), out)
    return target


def test_replay_with_one_extreme_value_stores_every_cycle(
    tiny_cell_and_model: tuple[Path, Path], influx: InfluxServer, tmp_path: Path
) -> None:
    """Into the real InfluxDB and the file sink: every cycle stored, the glitched one anomalous; the
    file sink's lines are strict JSON."""
    cell, model = tiny_cell_and_model
    glitched = tmp_path / "glitched.parquet"
    target = with_extreme_value(cell, glitched)
    influx.create_database("extreme")
    cfg = {
        "sources": [
            {
                "type": "voraus_replay",
                "robot": "r1",
                "path": str(glitched),
                "speed": 1e6,
                "start": "2026-01-01T00:00:00Z",
            }
        ],
        "model": {"path": str(model)},
        "scoring": {"batch": 4, "max_wait_ms": 5},
        "sinks": {
            "influxdb": {"url": influx.url, "database": "extreme", "spool_dir": str(tmp_path / "spool")},
            "file": {"path": str(tmp_path / "scores.jsonl")},
        },
        "metrics": {"listen": None},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["run", "--config", str(path)]) == 0

    with VorausReader(glitched, [SIGNAL]) as reader:
        test_cycles = [c.sample for c in reader.cycles() if not c.is_train]
    rows = influx.series('SELECT "cycle", "score", "is_anomaly", "capped" FROM "anomaly_score"', "extreme")
    assert [r[1] for r in rows] == test_cycles  # every cycle stored, in order, the glitched one too
    by_cycle = {r[1]: r for r in rows}
    _, _, score, anomalous, capped = by_cycle[target]
    assert anomalous
    assert math.isfinite(score)
    # far above the same cycle without the glitch (scored directly from the original file)
    loaded = load_model(model)
    scorer = Scorer(loaded, device="cpu")
    with VorausReader(cell, loaded.card.signals) as reader:
        (clean,) = [c.signals[::10] for c in reader.cycles() if c.sample == target]
    # (by more than the whole span from a typical normal cycle to the threshold, on the model's own scale)
    span = loaded.card.threshold.value - loaded.card.threshold.reference
    assert score > scorer.score(scorer.prepare_cycle(clean)[None]).raw[0] + span
    assert not capped  # clipped inputs give a finite score: nothing needed capping
    alerts = influx.series('SELECT "cycles" FROM "alert"', "extreme")
    assert any(str(target) in a[1].split(",") for a in alerts)

    lines = (tmp_path / "scores.jsonl").read_text().splitlines()
    records = [strict_json(line) for line in lines]  # raises on NaN / Infinity
    assert [r["cycle"] for r in records if r["measurement"] == "anomaly_score"] == test_cycles


def test_a_non_finite_score_is_stored_capped_and_flagged(tiny_cell_and_model: tuple[Path, Path]) -> None:
    """Should the flow still give a non-finite score (here its score function is replaced by one that
    overflows: no real input is known to do that after clipping), the scorer stores the cap, flags
    the window anomalous and says it was capped."""
    _, model_dir = tiny_cell_and_model
    scorer = Scorer(load_model(model_dir), device="cpu")
    card = scorer.card
    x = np.zeros((3, len(card.signals), card.time_steps), dtype=np.float32)
    real = scorer.flow.score

    def overflowing(batch: torch.Tensor) -> torch.Tensor:
        out = real(batch).clone()
        out[1] = math.inf
        out[2] = math.nan
        return out

    scorer.flow.score = overflowing  # type: ignore[method-assign]
    scores = scorer.score(x)
    assert list(scores.capped) == [False, True, True]
    assert list(scores.is_anomaly[1:]) == [True, True]
    assert np.all(np.isfinite(scores.raw))
    assert np.all(np.isfinite(scores.normalized))
    assert scores.raw[1] == scores.raw[2] == SCORE_CAP


def test_standardized_inputs_are_clipped_and_counted(tiny_cell_and_model: tuple[Path, Path]) -> None:
    _, model_dir = tiny_cell_and_model
    scorer = Scorer(load_model(model_dir), device="cpu")
    card = scorer.card
    cycle = np.asarray(card.scaler.mean, dtype=np.float64)[None, :].repeat(50, axis=0)
    cycle[7, 3] = EXTREME
    cycle[9, 4] = -EXTREME
    prepared = scorer.prepare_cycle(cycle)
    assert scorer.clipped == 2
    assert prepared.max() == CLIP_SIGMA
    assert prepared.min() == -CLIP_SIGMA
    assert math.isfinite(float(scorer.score(prepared[None]).raw[0]))


@pytest.mark.slow
def test_an_extreme_value_over_kafka_neither_crashes_nor_crash_loops(
    tansu: TansuServer,
    influx: InfluxServer,
    tiny_cell_and_model: tuple[Path, Path],
    tmp_path: Path,
) -> None:
    """The same glitch in one Kafka message: the daemon stays up, every cycle is stored (the glitched
    one anomalous), the clip is counted, and a restarted daemon in the same group goes on from the
    committed offsets instead of meeting the message again and dying."""
    cell, model = tiny_cell_and_model
    topic, db, group = unique("signals"), unique("extreme_kafka"), unique("g")
    tansu.create_topic(topic, 2)
    robots = robot_ids(1)
    batches = list(plan(cell, robots, start_ns=T0))
    glitch = len(batches) // 3
    data = batches[glitch].signals.copy()  # columns: every machine signal, in the schema's order
    data[0, list(MACHINE_SIGNALS).index(SIGNAL)] = EXTREME  # row 0: kept by the 10x downsampling
    batches[glitch] = type(batches[glitch])(**{**batches[glitch].__dict__, "signals": data})
    target_cycle = batches[glitch].cycle
    asyncio.run(publish(Target.parse(f"kafka://{tansu.bootstrap}/{topic}"), iter(batches), speed=math.inf))

    expected = expected_windows(cell, robots)
    cfg = config(model, influx, db, tmp_path, kafka_source(tansu, topic, group))
    daemon = Daemon(tmp_path, "d", cfg).start()
    try:
        wait_stored(influx, db, len(expected), 90, [daemon])
        assert daemon.alive
        assert daemon.metric("cellwatch_inputs_clipped_total") >= 1
        got = stored(influx, db)
        assert set(got) == set(expected)
        flagged = influx.series('SELECT "cycle", "is_anomaly" FROM "anomaly_score"', db)
        assert any(cycle == target_cycle and anomalous for _, cycle, anomalous in flagged)
        assert daemon.stop() == 0
    finally:
        daemon.kill()

    async def committed() -> int:
        async with Committed(tansu.bootstrap, group, topic) as offsets:
            return sum([(await offsets.offset(p)) or 0 for p in range(2)])

    # every message, the glitched one included, is committed: a restarted daemon does not meet it again
    assert asyncio.run(committed()) == len(batches)
