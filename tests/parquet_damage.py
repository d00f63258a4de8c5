"""Test helpers that spoil parquet files the way disks and copies do, and clocks the way real
recordings run: damage one row group's column chunk (the footer stays intact), jitter the time column."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def chunk_span(path: Path, row_group: int, column: str) -> tuple[int, int]:
    """(file offset, size) of one column chunk, from the footer."""
    md = pq.ParquetFile(path).metadata
    names = [md.schema.column(j).name for j in range(md.num_columns)]
    chunk = md.row_group(row_group).column(names.index(column))
    start = chunk.dictionary_page_offset or chunk.data_page_offset
    return int(start), int(chunk.total_compressed_size)


def damage_chunk(path: Path, row_group: int, column: str, *, tail: int | None = None) -> None:
    """Overwrite the bytes of one column chunk of one row group, leaving the footer intact: the whole
    chunk (its page headers first), or with ``tail`` only its last ``tail`` bytes (page values)."""
    start, size = chunk_span(path, row_group, column)
    data = bytearray(path.read_bytes())
    a = start + size - tail if tail is not None else start
    data[a : start + size] = bytes([0xA5]) * (start + size - a)
    path.write_bytes(bytes(data))


def jitter_time(src: Path, dst: Path, *, step_s: float, rel_noise: float = 0.002, seed: int = 0) -> Path:
    """A copy of a voraus file whose ``time`` column restarts at 0 per cycle and advances by steps of
    median ``step_s`` with relative gaussian noise, as on a real recording's clock."""
    table = pq.read_table(src)
    sample = table.column("sample").to_numpy()
    rng = np.random.default_rng(seed)
    steps = step_s * (1.0 + rel_noise * rng.standard_normal(len(sample)))
    starts = np.flatnonzero(np.r_[True, sample[1:] != sample[:-1]])
    first = np.repeat(starts, np.diff(np.r_[starts, len(sample)]))
    total = np.cumsum(steps)
    time = total - total[first]
    table = table.set_column(table.schema.get_field_index("time"), "time", pa.array(time))
    pq.write_table(table, dst)
    return dst
