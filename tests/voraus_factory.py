"""Small voraus-AD layout files for tests: plausible random cycles with the published dtypes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from ingest.voraus import schema
from ingest.voraus.schema import Category, Variant

#: (category, setting) of the default five cycles: a training normal, three anomalies, a test normal
DEFAULT_LABELS: tuple[tuple[int, int], ...] = (
    (Category.NORMAL_OPERATION, Variant.PRE_A),
    (Category.AXIS_FRICTION, Variant.A3_B),
    (Category.COLLISION_FOAM, Variant.SMALL_FULL),
    (Category.LOSE_CAN, Variant.LOSE_200MS),
    (Category.NORMAL_OPERATION, Variant.PRE_B),
)


def make_frame(
    rows: Sequence[int] = (60, 95, 120, 50, 80),
    labels: Sequence[tuple[int, int]] = DEFAULT_LABELS,
    *,
    rate: int = 100,
    first_sample: int = 10,
    seed: int = 0,
) -> pd.DataFrame:
    """Cycles stacked row-wise, columns in schema.ALL_COLUMNS order, a RangeIndex."""
    assert len(rows) == len(labels)
    rng = np.random.default_rng(seed)
    lengths = np.asarray(rows, dtype=np.int64)
    n = int(lengths.sum())
    step = np.arange(n) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    category = np.repeat([int(c) for c, _ in labels], lengths).astype(np.int64)
    cols: dict[str, np.ndarray] = {
        "time": step / rate,
        "sample": np.repeat(np.arange(first_sample, first_sample + len(rows)), lengths).astype(np.int64),
        "anomaly": category != int(Category.NORMAL_OPERATION),
        "category": category,
        "setting": np.repeat([int(s) for _, s in labels], lengths).astype(np.int64),
        "action": (step // 7 % 15).astype(np.uint8),
        "active": (step % 9 > 1).astype(np.int64),
    }
    for name in schema.MACHINE_SIGNALS:
        cols[name] = np.cumsum(rng.standard_normal(n)) + rng.uniform(-40, 50)
    df = pd.DataFrame(cols)
    assert tuple(df.columns) == schema.ALL_COLUMNS
    return df


def to_table(df: pd.DataFrame, nulls: dict[str, np.ndarray] | None = None) -> pa.Table:
    """Arrow table keeping NaN as NaN (pa.Table.from_pandas would turn NaN into null); ``nulls``
    maps a column to a boolean mask of null rows."""
    nulls = nulls or {}
    arrays = [pa.array(df[c].to_numpy(), mask=nulls.get(c)) for c in df.columns]
    return pa.Table.from_arrays(arrays, names=[str(c) for c in df.columns])


def write_pyarrow(
    df: pd.DataFrame,
    path: Path,
    *,
    nulls: dict[str, np.ndarray] | None = None,
    row_group_size: int | None = None,
) -> Path:
    pq.write_table(to_table(df, nulls), path, row_group_size=row_group_size)
    return path


def write_fastparquet(df: pd.DataFrame, path: Path) -> Path:
    """As the published files were written: fastparquet, one row group, an int64 ``index`` column."""
    import fastparquet

    df = df.copy()
    df.index = pd.RangeIndex(len(df), name=schema.OPTIONAL_INDEX_COLUMN)
    fastparquet.write(str(path), df, row_group_offsets=[0], write_index=True)
    return path


def expected_cycles(df: pd.DataFrame) -> dict[int, pd.DataFrame]:
    """Rows of each sample id, in file order (for contiguous cycles)."""
    return {int(k): g.reset_index(drop=True) for k, g in df.groupby("sample", sort=False)}
