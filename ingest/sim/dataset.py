"""Writing a simulated recording: cycles in parallel worker processes, streamed to parquet in row
groups (bounded memory), in exactly the voraus-AD layout. The cell's parameters (its preset) go into the
file's key-value metadata under `cellwatch.sim` (JSON); the columns stay the voraus ones."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ingest.sim.cell import CellSimulator
from ingest.sim.presets import DEFAULT, CellParams, sim_metadata
from ingest.sim.scenarios import CycleSpec
from ingest.voraus.schema import ALL_COLUMNS, MACHINE_SIGNALS, META_DTYPES, SIGNAL_DTYPE

_ARROW_TYPES = {
    np.dtype("float64"): pa.float64(),
    np.dtype("int64"): pa.int64(),
    np.dtype("bool"): pa.bool_(),
    np.dtype("uint8"): pa.uint8(),
}
ARROW_SCHEMA = pa.schema(
    [pa.field(name, _ARROW_TYPES[META_DTYPES[name]], nullable=False) for name in META_DTYPES]
    + [pa.field(name, _ARROW_TYPES[SIGNAL_DTYPE], nullable=False) for name in MACHINE_SIGNALS]
)
assert ARROW_SCHEMA.names == list(ALL_COLUMNS)
#: the parquet key-value metadata key of the simulated cell's description
SIM_METADATA_KEY = "cellwatch.sim"

_worker_sim: CellSimulator | None = None
_worker_seed = 0


def _init_worker(rate_hz: int, seed: int, params: CellParams = DEFAULT) -> None:
    global _worker_sim, _worker_seed
    _worker_sim = CellSimulator(rate_hz, params=params)
    _worker_seed = seed


def _simulate(spec: CycleSpec) -> dict[str, np.ndarray]:
    assert _worker_sim is not None
    return _worker_sim.simulate(spec, _worker_seed)


def simulate_cycles(
    specs: Sequence[CycleSpec],
    *,
    rate_hz: int = 100,
    seed: int = 0,
    workers: int | None = None,
    params: CellParams = DEFAULT,
) -> Iterator[dict[str, np.ndarray]]:
    """Cycles of the cell `params` in recording order. Each cycle's randomness depends only on
    (seed, sample), so the output is the same for any number of workers."""
    workers = workers or min(os.cpu_count() or 1, 8)
    if workers <= 1 or len(specs) < 4:
        _init_worker(rate_hz, seed, params)
        for spec in specs:
            yield _simulate(spec)
        return
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(rate_hz, seed, params)) as pool:
        yield from pool.imap(_simulate, specs, chunksize=4)


def write_recording(
    out: Path,
    specs: Sequence[CycleSpec],
    *,
    rate_hz: int = 100,
    seed: int = 0,
    workers: int | None = None,
    cycles_per_row_group: int = 32,
    on_cycle: Callable[[CycleSpec], None] | None = None,
    params: CellParams = DEFAULT,
    preset: str | None = None,
) -> int:
    """Simulate the cell `params` and write `specs` to `out`; returns the number of rows written.

    `preset` names the preset `params` was made from (with --param overrides on top); by default the
    preset `params` equals, else "custom". The file is written to a temporary name and renamed when
    complete, so a crash never leaves a truncated file under the requested name.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    rows = 0
    pending: list[dict[str, np.ndarray]] = []
    try:
        meta = sim_metadata(params, preset=preset, rate_hz=rate_hz, seed=seed)
        schema = ARROW_SCHEMA.with_metadata({SIM_METADATA_KEY: meta})
        with pq.ParquetWriter(tmp, schema, compression="zstd", compression_level=1) as writer:

            def flush() -> None:
                arrays = [
                    pa.array(np.concatenate([c[name] for c in pending]), type=field.type)
                    for name, field in zip(ARROW_SCHEMA.names, ARROW_SCHEMA, strict=True)
                ]
                writer.write_table(pa.Table.from_arrays(arrays, schema=ARROW_SCHEMA))
                pending.clear()

            for spec, cycle in zip(
                specs,
                simulate_cycles(specs, rate_hz=rate_hz, seed=seed, workers=workers, params=params),
                strict=True,
            ):
                pending.append(cycle)
                rows += len(cycle["time"])
                if on_cycle is not None:
                    on_cycle(spec)
                if len(pending) >= cycles_per_row_group:
                    flush()
            if pending:
                flush()
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return rows


def read_sim_metadata(path: Path) -> dict[str, Any] | None:
    """The simulated cell's description in a file `write_recording` wrote (preset, overrides, params,
    rate_hz, seed), or None for a file without it (a real recording, an older simulated one)."""
    raw = (pq.read_schema(path).metadata or {}).get(SIM_METADATA_KEY.encode())
    if raw is None:
        return None
    value = json.loads(raw)
    return value if isinstance(value, dict) else None
