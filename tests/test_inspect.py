"""``cellwatch inspect``: the summary a user reads, as JSON and as tables, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from parquet_damage import damage_chunk, jitter_time
from voraus_factory import make_frame, write_fastparquet, write_pyarrow

from daemon.cli import main


def inspect_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    assert main(["inspect", *args, "--json"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1  # exactly one JSON object, nothing else on stdout
    result: dict[str, Any] = json.loads(out)
    return result


def test_json_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_fastparquet(make_frame(), tmp_path / "cell.parquet")
    s = inspect_json(capsys, str(path))
    assert s["file"] == str(path)
    assert s["rows"] == 60 + 95 + 120 + 50 + 80
    assert s["cycles"] == 5
    assert s["signals"] == 130
    assert s["rate_hz"] == 100
    assert s["categories"] == {"AXIS_FRICTION": 1, "COLLISION_FOAM": 1, "LOSE_CAN": 1, "NORMAL_OPERATION": 2}
    assert s["variants"] == {"A3_B": 1, "SMALL_FULL": 1, "LOSE_200MS": 1, "PRE_A": 1, "PRE_B": 1}
    assert s["split"] == {"train": 1, "test": 4}
    assert s["time_range"] == [0.0, pytest.approx(1.19)]
    assert s["duration_s"] == {
        "min": pytest.approx(0.49),
        "mean": pytest.approx(np.mean([0.59, 0.94, 1.19, 0.49, 0.79])),
        "max": pytest.approx(1.19),
    }
    assert s["rejections"] == {}
    assert s["validated"] is False


def test_json_rate_of_a_500_hz_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_pyarrow(make_frame(rate=500), tmp_path / "fast.parquet")
    assert inspect_json(capsys, str(path))["rate_hz"] == 500


def _spoiled(tmp_path: Path) -> Path:
    """Cycle 11 has a NaN signal (seen only by --validate); cycle 13 an unknown category (meta-level)."""
    df = make_frame()
    rows11 = np.flatnonzero(df["sample"] == 11)
    df.iloc[rows11[7], df.columns.get_loc("motor_iq_2")] = np.nan
    df.loc[df["sample"] == 13, "category"] = 42
    return write_pyarrow(df, tmp_path / "spoiled.parquet")


def test_rejections_from_meta_checks_and_from_validation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _spoiled(tmp_path)
    quick = inspect_json(capsys, str(path))
    assert quick["rejections"] == {"unknown_category": 1}
    assert quick["categories"]["UNKNOWN_42"] == 1

    full = inspect_json(capsys, str(path), "--validate")
    assert full["validated"] is True
    assert full["rejections"] == {"nan": 1, "unknown_category": 1}
    assert [(e["sample"], e["reason"]) for e in full["rejection_examples"]] == [
        (11, "nan"),
        (13, "unknown_category"),
    ]
    assert "motor_iq_2" in full["rejection_examples"][0]["detail"]


def test_tables_for_people(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _spoiled(tmp_path)
    assert main(["inspect", str(path), "--validate"]) == 0
    captured = capsys.readouterr()
    out = captured.out
    for text in ("cycles", "405", "130", "100 Hz", "1 train / 4 test", "NORMAL_OPERATION", "LOSE_200MS"):
        assert text in out
    assert "nan" in out
    assert "unknown_category" in out
    assert "sample 11: nan:" in out
    assert "validating" in captured.err  # the progress bar goes to stderr


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("rename", "unexpected column 'robot_votage' (did you mean 'robot_voltage'?)"),
        ("text", "not a parquet file"),
        ("absent", "no such file"),
    ],
)
def test_bad_file_is_one_clear_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, expected: str
) -> None:
    path = tmp_path / "bad.parquet"
    if content == "rename":
        write_pyarrow(make_frame().rename(columns={"robot_voltage": "robot_votage"}), path)
    elif content == "text":
        path.write_text("not parquet at all\n")
    assert main(["inspect", str(path), "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("cellwatch inspect: error: ")
    assert expected in lines[0]
    assert "Traceback" not in captured.err


def test_wrong_dtype_names_column_and_dtypes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    df: pd.DataFrame = make_frame().astype({"sample": "float64"})
    path = write_pyarrow(df, tmp_path / "float_sample.parquet")
    assert main(["inspect", str(path)]) == 2
    assert "column 'sample' has dtype float64, expected int64" in capsys.readouterr().err


def test_jittered_clock_shows_nominal_and_measured_rate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A published 100 Hz file steps 10.07 ms on median: 100 Hz nominal, 99.3 Hz measured."""
    exact = write_pyarrow(make_frame(), tmp_path / "exact.parquet")
    path = jitter_time(exact, tmp_path / "real.parquet", step_s=0.01007)
    s = inspect_json(capsys, str(path))
    assert s["rate_hz"] == 100
    assert s["measured_rate_hz"] == pytest.approx(99.3, abs=0.05)
    assert main(["inspect", str(path)]) == 0
    assert "100 Hz (measured 99.3" in capsys.readouterr().out


def test_damaged_row_group_is_reported_and_the_rest_summarized(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_pyarrow(make_frame(), tmp_path / "rg.parquet", row_group_size=100)
    damage_chunk(path, 1, "motor_iq_2")  # rows 100-199: cycles 11 and 12
    quick = inspect_json(capsys, str(path))  # meta columns only: a signal chunk is not read
    assert quick["row_groups"] == 5
    assert quick["rejections"] == {}

    full = inspect_json(capsys, str(path), "--validate")
    assert full["rejections"] == {"damaged_row_group": 2}
    assert [(e["sample"], e["reason"]) for e in full["rejection_examples"]] == [
        (11, "damaged_row_group"),
        (12, "damaged_row_group"),
    ]
    assert list(full["damaged_row_groups"]) == ["1"]
    assert "motor_iq_2" in full["damaged_row_groups"]["1"]

    damage_chunk(path, 3, "category")  # a meta chunk: seen without --validate (cycles 13, 14)
    quick = inspect_json(capsys, str(path))
    assert quick["rejections"] == {"damaged_row_group": 2}
    assert "category" in quick["damaged_row_groups"]["3"]
    assert main(["inspect", str(path), "--validate"]) == 0
    out = capsys.readouterr().out
    assert "5, 2 damaged" in out
    assert "damaged: row group 1 (rows 100..199): cannot decode 1 column(s): motor_iq_2" in " ".join(
        out.split()
    )
