"""`cellwatch synth`: recording composition, file layout, determinism, and the reader round trip."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from daemon.cli import main
from ingest.sim.dataset import ARROW_SCHEMA, simulate_cycles, write_recording
from ingest.sim.scenarios import PAPER_ANOMALY_COUNTS, parse_categories, plan_recording
from ingest.voraus.reader import VorausReader
from ingest.voraus.schema import ALL_COLUMNS, ANOMALY_CATEGORIES, MACHINE_SIGNALS, Category, Variant


def test_default_recording_has_the_papers_size_and_split() -> None:
    specs = plan_recording()
    train = [s for s in specs if s.variant is Variant.PRE_A]
    normal_test = [s for s in specs if not s.anomaly and s.variant is not Variant.PRE_A]
    counts = Counter(s.category for s in specs if s.anomaly)
    assert (len(train), len(normal_test), sum(counts.values())) == (948, 419, 755)
    assert counts == PAPER_ANOMALY_COUNTS
    # training normals are recorded first; test normals and anomalies come after, interleaved
    assert all(s.variant is Variant.PRE_A for s in specs[:948])
    assert [s.sample for s in specs] == list(range(len(specs)))
    first_anomaly = next(i for i, s in enumerate(specs) if s.anomaly)
    assert any(not s.anomaly for s in specs[first_anomaly:])


def test_scale_keeps_every_category_and_cycles_is_exact() -> None:
    small = plan_recording(scale=0.05)
    assert {s.category for s in small if s.anomaly} == set(ANOMALY_CATEGORIES)
    for n in (3, 7, 150, 1000):
        assert len(plan_recording(cycles=n)) == n
    tiny = plan_recording(cycles=14)  # room for 2 train + 1 test normal + one of each category... almost
    assert sum(not s.anomaly for s in tiny) >= 3
    only = plan_recording(cycles=60, categories=parse_categories(["axis_friction", "10"]))
    assert {s.category for s in only if s.anomaly} == {Category.AXIS_FRICTION, Category.MOTOR_COMMUTATION}


def test_unknown_category_is_a_clear_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code = main(["synth", "--out", str(tmp_path / "x.parquet"), "--cycles", "10", "--categories", "FRICTION"])
    assert code == 2
    err = capsys.readouterr().err
    assert "unknown anomaly category 'FRICTION'" in err
    assert "AXIS_FRICTION" in err
    assert not (tmp_path / "x.parquet").exists()


@pytest.fixture(scope="module")
def small_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "cell.parquet"
    assert main(["synth", "--out", str(out), "--scale", "0.05", "--seed", "3"]) == 0
    return out


def test_file_has_exactly_the_voraus_layout(small_file: Path) -> None:
    schema = pq.read_schema(small_file)
    assert schema.names == list(ALL_COLUMNS)
    assert schema.equals(ARROW_SCHEMA, check_metadata=False)


def test_synth_then_inspect_reports_130_signals_100hz_all_categories(
    small_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    assert main(["inspect", str(small_file), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["signals"] == 130
    assert report["rate_hz"] == 100
    assert set(report["categories"]) == {c.name for c in Category}
    assert report["cycles"] == len(plan_recording(scale=0.05))


def test_reader_round_trips_the_simulator(small_file: Path) -> None:
    specs = plan_recording(scale=0.05, seed=3)
    expected = simulate_cycles(specs[:12], seed=3, workers=1)
    with VorausReader(small_file) as reader:
        for spec, want, got in zip(specs, expected, reader.cycles(), strict=False):
            assert got.sample == spec.sample
            assert (got.anomaly, got.category, got.setting) == (
                spec.anomaly,
                int(spec.category),
                int(spec.variant),
            )
            assert np.array_equal(got.time, want["time"])
            assert np.array_equal(got.action, want["action"])
            assert np.array_equal(got.signals, np.stack([want[s] for s in MACHINE_SIGNALS], axis=1))
        assert reader.rejections.total == 0


def test_same_seed_same_file_for_any_worker_count(tmp_path: Path) -> None:
    specs = plan_recording(cycles=12, seed=5)
    a, b, c = tmp_path / "a.parquet", tmp_path / "b.parquet", tmp_path / "c.parquet"
    write_recording(a, specs, seed=5, workers=1, cycles_per_row_group=5)
    write_recording(b, specs, seed=5, workers=2, cycles_per_row_group=5)
    write_recording(c, specs, seed=6, workers=1, cycles_per_row_group=5)
    ta, tb, tc = (pq.read_table(p) for p in (a, b, c))
    assert ta.equals(tb)
    assert not ta.equals(tc)
    assert pq.ParquetFile(a).metadata.num_row_groups == 3  # written in bounded row groups


def test_500hz_recording(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "fast.parquet"
    assert (
        main(
            [
                "synth",
                "--out",
                str(out),
                "--cycles",
                "4",
                "--rate",
                "500",
                "--workers",
                "1",
                "--categories",
                "MISS_CAN",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rate_hz"] == 500
    assert report["rows"] > 4 * 10 * 500  # cycles of more than 10 s
