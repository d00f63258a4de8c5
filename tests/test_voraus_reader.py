"""VorausReader: exact round trips, published-file quirks, bad files, bad cycles, pacing, meta."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from parquet_damage import damage_chunk, jitter_time
from voraus_factory import expected_cycles, make_frame, to_table, write_fastparquet, write_pyarrow

from ingest.errors import VorausFormatError
from ingest.voraus import schema
from ingest.voraus.reader import Cycle, Rejection, RejectStats, VorausReader

STRATEGIES = ("stream", "spill")


@pytest.fixture
def frame() -> pd.DataFrame:
    return make_frame()


@pytest.fixture
def good_file(tmp_path: Path, frame: pd.DataFrame) -> Path:
    return write_pyarrow(frame, tmp_path / "good.parquet")


def read_all(path: Path, **kw: object) -> tuple[list[Cycle], RejectStats]:
    with VorausReader(path, **kw) as reader:
        cycles = list(reader.cycles())
        return cycles, reader.rejections


def assert_cycle_equals(
    cycle: Cycle, rows: pd.DataFrame, signals: tuple[str, ...] = schema.MACHINE_SIGNALS
) -> None:
    assert cycle.sample == int(rows["sample"].iloc[0])
    assert cycle.anomaly == bool(rows["anomaly"].iloc[0])
    assert cycle.category == int(rows["category"].iloc[0])
    assert cycle.setting == int(rows["setting"].iloc[0])
    np.testing.assert_array_equal(cycle.time, rows["time"].to_numpy())
    np.testing.assert_array_equal(cycle.action, rows["action"].to_numpy())
    np.testing.assert_array_equal(cycle.active, rows["active"].to_numpy())
    np.testing.assert_array_equal(cycle.signals, rows[list(signals)].to_numpy())
    assert cycle.signal_names == signals
    assert cycle.time.dtype == np.float64
    assert cycle.action.dtype == np.uint8
    assert cycle.active.dtype == np.int64
    assert cycle.signals.dtype == np.float64
    assert cycle.signals.flags.c_contiguous
    assert cycle.signals.shape == (len(rows), len(signals))


# -- round trips -------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_value_round_trips_exactly(good_file: Path, frame: pd.DataFrame, strategy: str) -> None:
    cycles, rejections = read_all(good_file, strategy=strategy)
    expected = expected_cycles(frame)
    assert [c.sample for c in cycles] == list(expected)
    for cycle in cycles:
        assert_cycle_equals(cycle, expected[cycle.sample])
    assert rejections.total == 0


def test_cycle_properties_follow_the_published_tables(good_file: Path, frame: pd.DataFrame) -> None:
    cycles, _ = read_all(good_file)
    assert [c.category_name for c in cycles] == [
        "NORMAL_OPERATION",
        "AXIS_FRICTION",
        "COLLISION_FOAM",
        "LOSE_CAN",
        "NORMAL_OPERATION",
    ]
    assert [c.variant_name for c in cycles] == ["PRE_A", "A3_B", "SMALL_FULL", "LOSE_200MS", "PRE_B"]
    assert [c.is_train for c in cycles] == [True, False, False, False, False]
    assert [c.anomaly for c in cycles] == [False, True, True, True, False]
    assert [c.n_rows for c in cycles] == [60, 95, 120, 50, 80]
    assert cycles[2].duration_s == pytest.approx(1.19)


def test_fastparquet_file_with_index_column_gives_the_same_cycles(
    tmp_path: Path, frame: pd.DataFrame, good_file: Path
) -> None:
    fp_path = write_fastparquet(frame, tmp_path / "fastparquet.parquet")
    pf = pq.ParquetFile(fp_path)
    assert pf.schema_arrow.names[0] == "index"  # the published quirk really is present
    assert pf.schema_arrow.field("index").type == "int64"
    assert pf.metadata.num_row_groups == 1
    assert "fastparquet" in pf.metadata.created_by

    from_fp, rejections = read_all(fp_path)
    from_pa, _ = read_all(good_file)
    assert rejections.total == 0
    assert len(from_fp) == len(from_pa) == 5
    for a, b in zip(from_fp, from_pa, strict=True):
        assert (a.sample, a.anomaly, a.category, a.setting) == (b.sample, b.anomaly, b.category, b.setting)
        np.testing.assert_array_equal(a.time, b.time)
        np.testing.assert_array_equal(a.action, b.action)
        np.testing.assert_array_equal(a.active, b.active)
        np.testing.assert_array_equal(a.signals, b.signals)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_small_batches_give_identical_cycles(
    tmp_path: Path, frame: pd.DataFrame, good_file: Path, strategy: str
) -> None:
    big, _ = read_all(good_file, batch_rows=1 << 20)
    multi_rg = write_pyarrow(frame, tmp_path / "row_groups.parquet", row_group_size=33)
    small, rejections = read_all(multi_rg, batch_rows=7, strategy=strategy)
    assert rejections.total == 0
    assert [c.sample for c in small] == [c.sample for c in big]
    for a, b in zip(small, big, strict=True):
        np.testing.assert_array_equal(a.signals, b.signals)
        np.testing.assert_array_equal(a.time, b.time)
        np.testing.assert_array_equal(a.action, b.action)


def test_auto_strategy_spills_when_the_column_chunks_exceed_the_budget(good_file: Path) -> None:
    with VorausReader(good_file) as reader:
        assert reader.strategy == "stream"
    with VorausReader(good_file, memory_budget=1000) as reader:
        assert reader.strategy == "spill"
        assert len(list(reader.cycles())) == 5


# -- signal groups -----------------------------------------------------------------------------------


def test_signal_group_sizes_match_the_paper() -> None:
    sizes = {name: len(schema.signal_group(name)) for name in schema.SIGNAL_GROUPS}
    assert sizes == {"machine": 130, "mechanical": 90, "electrical": 40, "computed": 72, "measured": 58}


@pytest.mark.parametrize("group", list(schema.SIGNAL_GROUPS))
def test_reader_on_a_group_returns_its_columns_in_order(
    good_file: Path, frame: pd.DataFrame, group: str
) -> None:
    signals = schema.signal_group(group)
    cycles, _ = read_all(good_file, signals=signals)
    expected = expected_cycles(frame)
    for cycle in cycles:
        assert_cycle_equals(cycle, expected[cycle.sample], signals)
    by_name, _ = read_all(good_file, signals=group)  # the group's name works too
    np.testing.assert_array_equal(by_name[0].signals, cycles[0].signals)


def test_signals_come_in_the_order_asked(good_file: Path, frame: pd.DataFrame) -> None:
    signals = ("motor_iq_3", "robot_voltage", "brake_voltage_6")
    with VorausReader(good_file, signals) as reader:
        assert reader.signal_names == signals
        first = next(reader.cycles())
    np.testing.assert_array_equal(first.signals, frame.loc[frame["sample"] == 10, list(signals)].to_numpy())


def test_unknown_signals_are_named(good_file: Path) -> None:
    with pytest.raises(ValueError, match=r"'robot_votage' \(did you mean 'robot_voltage'\?\)") as info:
        VorausReader(good_file, ["robot_current", "robot_votage", "sample"])
    assert "'sample'" in str(info.value)  # a meta column is not a signal


# -- bad files ---------------------------------------------------------------------------------------


def _drop(df: pd.DataFrame) -> pd.DataFrame:
    return df.drop(columns=["motor_iq_3"])


def _extra(df: pd.DataFrame) -> pd.DataFrame:
    return df.assign(operator_note=1.0)


def _misnamed(df: pd.DataFrame) -> pd.DataFrame:
    return df.rename(columns={"robot_voltage": "robot_votage"})


def _float32_signal(df: pd.DataFrame) -> pd.DataFrame:
    return df.astype({"joint_velocity_4": "float32"})


def _int32_category(df: pd.DataFrame) -> pd.DataFrame:
    return df.astype({"category": "int32"})


def _int_time(df: pd.DataFrame) -> pd.DataFrame:
    return df.astype({"time": "int64"})


def _empty(df: pd.DataFrame) -> pd.DataFrame:
    return df.iloc[:0]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_drop, "missing column(s): 'motor_iq_3'"),
        (_extra, "unexpected column 'operator_note'"),
        (_misnamed, "unexpected column 'robot_votage' (did you mean 'robot_voltage'?)"),
        (_float32_signal, "column 'joint_velocity_4' has dtype float32, expected float64"),
        (_int32_category, "column 'category' has dtype int32, expected int64"),
        (_int_time, "column 'time' has dtype int64, expected float64"),
        (_empty, "the file has no rows"),
    ],
)
def test_bad_layout_is_a_format_error_naming_the_column(
    tmp_path: Path, frame: pd.DataFrame, change: Callable[[pd.DataFrame], pd.DataFrame], message: str
) -> None:
    path = write_pyarrow(change(frame), tmp_path / "bad.parquet")
    with pytest.raises(VorausFormatError) as info:
        VorausReader(path)
    assert message in str(info.value)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_misnamed_column_reports_the_missing_one_too(tmp_path: Path, frame: pd.DataFrame) -> None:
    path = write_pyarrow(_misnamed(frame), tmp_path / "bad.parquet")
    with pytest.raises(VorausFormatError, match=r"missing column\(s\): 'robot_voltage'"):
        VorausReader(path)


def test_not_a_parquet_file(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text("time,sample\n0.0,1\n")
    with pytest.raises(VorausFormatError, match="not a parquet file"):
        VorausReader(path)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(VorausFormatError, match="no such file"):
        VorausReader(tmp_path / "nope.parquet")
    with pytest.raises(VorausFormatError, match="is a directory"):
        VorausReader(tmp_path)


# -- bad cycles ------------------------------------------------------------------------------------
# Each case spoils cycle 12 (the third of five); the reader must reject exactly that one.

BAD = 12


def _rows(df: pd.DataFrame, sample: int = BAD) -> np.ndarray:
    return np.flatnonzero(df["sample"].to_numpy() == sample)


def _set(df: pd.DataFrame, row: int, column: str, value: object) -> None:
    df.iloc[row, df.columns.get_loc(column)] = value


def case_nan(df: pd.DataFrame) -> pd.DataFrame:
    for column in ("motor_torque_2", "robot_current"):
        _set(df, _rows(df)[10], column, np.nan)
    return df


def case_inf(df: pd.DataFrame) -> pd.DataFrame:
    _set(df, _rows(df)[-1], "power_load_mech_5", -np.inf)
    return df


def case_time_backwards(df: pd.DataFrame) -> pd.DataFrame:
    r = _rows(df)[40]
    _set(df, r, "time", df["time"].iloc[r - 2])
    return df


def case_repeated_time(df: pd.DataFrame) -> pd.DataFrame:
    r = _rows(df)[40]
    _set(df, r, "time", df["time"].iloc[r - 1])
    return df


def case_too_short(df: pd.DataFrame) -> pd.DataFrame:
    return df.drop(index=_rows(df)[1:]).reset_index(drop=True)  # one row left


def case_inconsistent_meta(df: pd.DataFrame) -> pd.DataFrame:
    _set(df, _rows(df)[60], "category", int(schema.Category.LOSE_CAN))
    return df


def case_anomaly_flag_flips(df: pd.DataFrame) -> pd.DataFrame:
    _set(df, _rows(df)[5], "anomaly", False)
    return df


def case_unknown_category(df: pd.DataFrame) -> pd.DataFrame:
    df.loc[_rows(df), "category"] = 99
    return df


def case_split(df: pd.DataFrame) -> pd.DataFrame:
    rows = _rows(df)
    tail = rows[-20:]  # the last 20 rows of cycle 12 show up after cycle 13
    after = _rows(df, BAD + 1)[-1]
    order = [i for i in range(len(df)) if i not in set(tail)]
    pos = order.index(after) + 1
    order[pos:pos] = list(tail)
    return df.iloc[order].reset_index(drop=True)


BAD_CYCLES = [
    (case_nan, "nan", "motor_torque_2"),
    (case_inf, "inf", "power_load_mech_5"),
    (case_time_backwards, "non_monotonic_time", "row 40"),
    (case_repeated_time, "non_monotonic_time", "row 40"),
    (case_too_short, "too_short", "1 row"),
    (case_inconsistent_meta, "inconsistent_meta", "category"),
    (case_anomaly_flag_flips, "inconsistent_meta", "anomaly"),
    (case_unknown_category, "unknown_category", "99"),
    (case_split, "split_cycle", "2 separate runs"),
]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize(("spoil", "reason", "detail"), BAD_CYCLES, ids=[c[0].__name__ for c in BAD_CYCLES])
def test_a_bad_cycle_is_rejected_and_the_others_come_through(
    tmp_path: Path,
    frame: pd.DataFrame,
    spoil: Callable[[pd.DataFrame], pd.DataFrame],
    reason: str,
    detail: str,
    strategy: str,
) -> None:
    bad = spoil(frame.copy())
    path = write_pyarrow(bad, tmp_path / "bad_cycle.parquet")
    cycles, rejections = read_all(path, strategy=strategy, batch_rows=16)
    expected = expected_cycles(frame)
    assert [c.sample for c in cycles] == [s for s in expected if s != BAD]
    for cycle in cycles:
        assert_cycle_equals(cycle, expected[cycle.sample])
    assert rejections.counts == {reason: 1}
    assert rejections.total == 1
    [rejection] = rejections.examples
    assert rejection.sample == BAD
    assert rejection.reason == reason
    assert detail in rejection.detail


def test_nan_detail_names_the_columns_and_rows(tmp_path: Path, frame: pd.DataFrame) -> None:
    path = write_pyarrow(case_nan(frame.copy()), tmp_path / "nan.parquet")
    _, rejections = read_all(path)
    assert rejections.examples[0].detail == "nan in 2 column(s): robot_current, motor_torque_2 (1 row(s))"


def test_too_long_cycle_is_skipped_without_buffering(tmp_path: Path) -> None:
    df = make_frame(rows=(60, 95, 300, 50, 80))
    path = write_pyarrow(df, tmp_path / "long.parquet")
    cycles, rejections = read_all(path, max_cycle_rows=200, batch_rows=7)
    assert [c.sample for c in cycles] == [10, 11, 13, 14]
    assert rejections.counts == {"too_long": 1}
    assert rejections.examples[0] == Rejection(12, "too_long", "300 rows, more than max_cycle_rows=200")


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("column", ["motor_velocity_1", "category", "time", "sample"])
def test_null_values_reject_their_cycle(
    tmp_path: Path, frame: pd.DataFrame, column: str, strategy: str
) -> None:
    mask = np.zeros(len(frame), bool)
    mask[_rows(frame)[[3, 30]]] = True
    path = write_pyarrow(frame, tmp_path / "nulls.parquet", nulls={column: mask})
    cycles, rejections = read_all(path, strategy=strategy, batch_rows=16)
    expected = expected_cycles(frame)
    assert [c.sample for c in cycles] == [s for s in expected if s != BAD]
    for cycle in cycles:
        assert_cycle_equals(cycle, expected[cycle.sample])
    assert rejections.counts == {"null": 1}
    assert rejections.examples[0].detail == f"nulls in 1 column(s): {column} (2 row(s))"


def test_fastparquet_writes_nan_as_null_which_is_rejected(tmp_path: Path, frame: pd.DataFrame) -> None:
    path = write_fastparquet(case_nan(frame.copy()), tmp_path / "fp_nan.parquet")
    cycles, rejections = read_all(path)
    assert [c.sample for c in cycles] == [10, 11, 13, 14]
    assert rejections.counts == {"null": 1}
    assert rejections.examples[0].detail == "nulls in 2 column(s): robot_current, motor_torque_2 (1 row(s))"


def test_rejection_examples_are_bounded() -> None:
    stats = RejectStats(max_examples=3)
    for i in range(10):
        stats.add(Rejection(i, "nan" if i % 2 else "inf", "x"))
    assert stats.total == 10
    assert stats.counts == {"inf": 5, "nan": 5}
    assert [r.sample for r in stats.examples] == [0, 1, 2]


# -- rate, meta ------------------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [100, 500])
def test_rate_is_estimated_from_the_time_steps(tmp_path: Path, rate: int) -> None:
    path = write_pyarrow(make_frame(rate=rate), tmp_path / f"{rate}.parquet")
    with VorausReader(path, batch_rows=7) as reader:
        assert reader.rate_hz == rate


@pytest.mark.parametrize("budget", [128 * 2**20, 1])  # 1 byte: one column per pass
def test_meta_has_one_row_per_cycle(good_file: Path, budget: int) -> None:
    with VorausReader(good_file, batch_rows=16, memory_budget=budget) as reader:
        meta = reader.meta()
    assert meta["sample"].tolist() == [10, 11, 12, 13, 14]
    assert meta["rows"].tolist() == [60, 95, 120, 50, 80]
    assert meta["anomaly"].tolist() == [False, True, True, True, False]
    assert meta["category_name"].tolist() == [
        "NORMAL_OPERATION",
        "AXIS_FRICTION",
        "COLLISION_FOAM",
        "LOSE_CAN",
        "NORMAL_OPERATION",
    ]
    assert meta["variant_name"].tolist() == ["PRE_A", "A3_B", "SMALL_FULL", "LOSE_200MS", "PRE_B"]
    assert meta["split"].tolist() == ["train", "test", "test", "test", "test"]
    assert meta["t_start"].tolist() == [0.0] * 5
    np.testing.assert_allclose(meta["t_end"], [0.59, 0.94, 1.19, 0.49, 0.79])
    assert (meta["problem"] == "").all()


@pytest.mark.parametrize(
    ("spoil", "reason"),
    [
        (case_split, "split_cycle"),
        (case_too_short, "too_short"),
        (case_inconsistent_meta, "inconsistent_meta"),
        (case_unknown_category, "unknown_category"),
        (case_time_backwards, "non_monotonic_time"),
    ],
)
def test_meta_flags_meta_level_problems(
    tmp_path: Path, frame: pd.DataFrame, spoil: Callable[[pd.DataFrame], pd.DataFrame], reason: str
) -> None:
    path = write_pyarrow(spoil(frame.copy()), tmp_path / "bad.parquet")
    with VorausReader(path, batch_rows=16) as reader:
        meta = reader.meta()
    problems = dict(zip(meta["sample"], meta["problem"], strict=True))  # a split id's runs agree
    assert problems == {s: (reason if s == BAD else "") for s in (10, 11, 12, 13, 14)}


def test_meta_with_signal_nan_sees_no_problem(tmp_path: Path, frame: pd.DataFrame) -> None:
    path = write_pyarrow(case_nan(frame.copy()), tmp_path / "nan.parquet")
    with VorausReader(path) as reader:
        assert (reader.meta()["problem"] == "").all()  # signals are not read by meta()


# -- replay ----------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self, start: float = 1000.0, work_per_call: float = 0.0) -> None:
        self.now = start
        self.work = work_per_call  # time that passes on every clock read (slow processing)
        self.sleeps: list[float] = []

    def clock(self) -> float:
        self.now += self.work
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.mark.parametrize("speed", [1.0, 4.0])
def test_replay_yields_each_cycle_when_it_is_due(good_file: Path, speed: float) -> None:
    fake = FakeClock()
    with VorausReader(good_file) as reader:
        seen = [
            (c.sample, fake.now - 1000.0) for c in reader.replay(speed, clock=fake.clock, sleep=fake.sleep)
        ]
    durations = [0.59, 0.94, 1.19, 0.49, 0.79]
    due = np.cumsum(durations) / speed
    assert [s for s, _ in seen] == [10, 11, 12, 13, 14]
    np.testing.assert_allclose([t for _, t in seen], due)


def test_replay_never_sleeps_when_behind_or_unpaced(good_file: Path) -> None:
    slow = FakeClock(work_per_call=5.0)  # every cycle takes longer than it lasted
    with VorausReader(good_file) as reader:
        assert len(list(reader.replay(1.0, clock=slow.clock, sleep=slow.sleep))) == 5
        assert slow.sleeps == []
        fast = FakeClock()
        assert len(list(reader.replay(math.inf, clock=fast.clock, sleep=fast.sleep))) == 5
        assert fast.sleeps == []


@pytest.mark.parametrize("speed", [0.0, -1.0, math.nan])
def test_replay_speed_must_be_positive(good_file: Path, speed: float) -> None:
    with VorausReader(good_file) as reader, pytest.raises(ValueError, match="speed must be > 0"):
        reader.replay(speed)


def test_closed_reader_refuses_to_read(good_file: Path) -> None:
    with VorausReader(good_file) as reader:
        pass
    with pytest.raises(ValueError, match="closed"):
        next(reader.cycles())


# -- damaged row groups ----------------------------------------------------------------------------

# make_frame's cycles 10..14 cover rows 0-59, 60-154, 155-274, 275-324, 325-404; with 100 rows per row
# group, row group 1 (rows 100-199) holds rows of cycles 11 and 12 (which span row groups 0-2).


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_damaged_row_group_rejects_its_cycles_and_the_others_come_through(
    tmp_path: Path, frame: pd.DataFrame, strategy: str
) -> None:
    path = write_pyarrow(frame, tmp_path / "rg.parquet", row_group_size=100)
    damage_chunk(path, 1, "motor_iq_2")
    with VorausReader(path, strategy=strategy, batch_rows=32) as reader:
        cycles = list(reader.cycles())
        stats = reader.rejections
        damaged = reader.damaged_row_groups
    expected = expected_cycles(frame)
    assert [c.sample for c in cycles] == [10, 13, 14]
    for c in cycles:
        assert_cycle_equals(c, expected[c.sample])
    assert stats.counts == {"damaged_row_group": 2}
    assert [(r.sample, r.reason) for r in stats.examples] == [
        (11, "damaged_row_group"),
        (12, "damaged_row_group"),
    ]
    assert "row group 1 (rows 100..199)" in stats.examples[0].detail
    assert "motor_iq_2" in stats.examples[0].detail
    assert list(damaged) == [1]


def test_a_damaged_sample_chunk_rejects_the_cycles_around_it(tmp_path: Path, frame: pd.DataFrame) -> None:
    """Sample ids of the damaged rows are unknown: the cycles reaching into them are rejected, and so
    are the rows themselves (one rejection without an id); reading goes on after them."""
    path = write_pyarrow(frame, tmp_path / "rg.parquet", row_group_size=100)
    damage_chunk(path, 3, "sample")  # rows 300-399: cycle 13 (275-324) and 14 (325-404)
    cycles, stats = read_all(path)
    assert [c.sample for c in cycles] == [10, 11, 12]
    assert stats.counts == {"damaged_row_group": 3}
    assert [r.sample for r in stats.examples] == [13, None, 14]
    assert "sample ids unknown" in stats.examples[1].detail
    with VorausReader(path) as reader:
        meta = reader.meta()
    assert meta.loc[meta["problem"] == "damaged_row_group", "sample"].tolist()[::2] == [13, 14]


def test_meta_marks_cycles_of_a_damaged_meta_chunk(tmp_path: Path, frame: pd.DataFrame) -> None:
    path = write_pyarrow(frame, tmp_path / "rg.parquet", row_group_size=100)
    damage_chunk(path, 2, "time")  # rows 200-299: cycles 12 and 13
    with VorausReader(path) as reader:
        meta = reader.meta()
    assert dict(zip(meta["sample"], meta["problem"], strict=True)) == {
        10: "",
        11: "",
        12: "damaged_row_group",
        13: "damaged_row_group",
        14: "",
    }


def test_fastparquet_row_groups_as_published_style(tmp_path: Path, frame: pd.DataFrame) -> None:
    """fastparquet (uncompressed, as the published files): a spoiled page header fails its row group;
    a file of one row group (as published) then loses every cycle, but reading never raises."""
    import fastparquet

    df = frame.copy()
    df.index = pd.RangeIndex(len(df), name=schema.OPTIONAL_INDEX_COLUMN)
    path = tmp_path / "fp.parquet"
    fastparquet.write(str(path), df, row_group_offsets=[0, 100, 200, 300, 400], write_index=True)
    damage_chunk(path, 1, "joint_velocity_4")
    cycles, stats = read_all(path)
    assert [c.sample for c in cycles] == [10, 13, 14]
    assert stats.counts == {"damaged_row_group": 2}

    one = write_fastparquet(frame, tmp_path / "one.parquet")
    damage_chunk(one, 0, "motor_iq_2")
    cycles, stats = read_all(one)
    assert cycles == []
    assert stats.counts == {"damaged_row_group": 5}


def test_page_checksums_turn_silent_corruption_into_a_rejection(tmp_path: Path, frame: pd.DataFrame) -> None:
    """Overwriting plain float values (not a header) decodes to wrong numbers; a file written with
    page checksums has the damage caught and its cycles rejected instead."""
    path = tmp_path / "crc.parquet"
    pq.write_table(
        to_table(frame),
        path,
        row_group_size=100,
        compression="none",
        use_dictionary=False,
        write_page_checksum=True,
    )
    damage_chunk(path, 1, "motor_iq_2", tail=16)
    cycles, stats = read_all(path)
    assert [c.sample for c in cycles] == [10, 13, 14]
    assert stats.counts == {"damaged_row_group": 2}
    assert "checksum" in stats.examples[0].detail.lower() or "crc" in stats.examples[0].detail.lower()


# -- nominal and measured rate ---------------------------------------------------------------------


def test_a_jittered_100_hz_file_is_100_hz_nominal(tmp_path: Path, frame: pd.DataFrame) -> None:
    """The published 100 Hz files step 10.07 ms on median (99.3 Hz): nominally 100 Hz."""
    src = write_pyarrow(frame, tmp_path / "exact.parquet")
    path = jitter_time(src, tmp_path / "jitter.parquet", step_s=0.01007)
    with VorausReader(path) as reader:
        assert reader.rate_hz == 100
        assert reader.measured_rate_hz == pytest.approx(99.3, abs=0.05)
    slow = jitter_time(src, tmp_path / "90.parquet", step_s=1 / 90)
    with VorausReader(slow) as reader:
        assert reader.rate_hz == 90
        assert reader.measured_rate_hz == pytest.approx(90, abs=0.05)


@pytest.mark.parametrize(
    ("measured", "nominal"),
    [(99.3, 100), (100.0, 100), (98.1, 100), (101.9, 100), (497.0, 500), (97.5, 98), (90.2, 90), (50.0, 50)],
)
def test_nominal_rate_snaps_within_the_tolerance(measured: float, nominal: int) -> None:
    assert schema.nominal_rate(measured) == nominal


def test_rate_matches_is_relative() -> None:
    assert schema.rate_matches(99.3, 100)
    assert schema.rate_matches(19.9, 20)
    assert not schema.rate_matches(90.0, 100)
    assert not schema.rate_matches(97.9, 100)
    assert not schema.rate_matches(1.0, 0)


# -- found by the fuzz campaign (benchmarks/fuzz_decoders.py) ----------------------------------------


def test_a_footer_with_a_non_utf8_column_name_is_a_format_error(tmp_path: Path, frame: pd.DataFrame) -> None:
    path = write_pyarrow(frame.rename(columns={"io_current": "io_currént"}), tmp_path / "name.parquet")
    data = path.read_bytes()
    assert data.count("é".encode()) >= 1
    path.write_bytes(data.replace("é".encode(), b"\xc3\x28"))  # same length: offsets stay valid
    with pytest.raises(VorausFormatError, match="not a parquet file"):
        VorausReader(path)


def test_time_steps_too_small_for_a_finite_rate_give_no_rate(tmp_path: Path, frame: pd.DataFrame) -> None:
    frame["time"] = frame.groupby("sample").cumcount().to_numpy() * 5e-324  # the smallest float step
    path = write_pyarrow(frame, tmp_path / "tiny_steps.parquet")
    with VorausReader(path) as reader:
        assert reader.measured_rate_hz is None
        assert reader.rate_hz is None


def test_replay_source_reports_damage_and_measured_rate_as_metrics(
    tmp_path: Path, frame: pd.DataFrame
) -> None:
    import asyncio

    from ingest.voraus.source import VorausReplaySource

    path = write_pyarrow(frame, tmp_path / "rg.parquet", row_group_size=100)
    damage_chunk(path, 1, "motor_iq_2")
    source = VorausReplaySource(path, "r1", schema.MACHINE_SIGNALS, speed=math.inf, test_split_only=False)

    async def drain() -> list[int]:
        return [c.sample async for c in source.cycles()]

    try:
        assert source.reader.measured_rate_hz == pytest.approx(100)
        assert asyncio.run(drain()) == [10, 13, 14]
        samples = {
            name: value
            for name, _, labels, value in source.metric_samples()
            if labels == {"source": "replay:r1"}
        }
        assert samples == {
            "cellwatch_replay_damaged_row_groups": 1.0,
            "cellwatch_replay_measured_rate_hz": pytest.approx(100),
        }
        assert source.rejections == {"damaged_row_group": 2}
    finally:
        source.close()
