"""Fuzzing campaign for every decoder of untrusted input: JSON and Arrow IPC messages, the config
YAML and the voraus parquet reader on damaged files.

Each input is a mutation of a real, valid input (messages from ``batches_from_cycle`` encoded with
``encode_json``/``encode_arrow``, the example configs in ``examples/``, small voraus files written by
pyarrow and fastparquet): byte flips, insertions, deletions, truncations, splices, plus mutations that
know the structure (JSON: changed types, huge numbers, deep nesting, duplicate keys, giant arrays;
Arrow: flatbuffer metadata, length fields, bodies, compressed bodies, schema metadata; YAML: typed
tags, aliases, deep nesting, bad values at any path; parquet: column chunk bytes, page headers, footer).

An outcome is *accepted*, *rejected* with a documented error (``MessageError`` with its reason,
``ConfigError``, ``VorausFormatError``: the reason is tallied) or a **crash**: any other exception, a
hang past ``--timeout``, or a worker process killed by a signal. The campaign fails (exit 1) if it
found a crash. Input ``i`` of a target is a pure function of (``--seed``, target, i): ``--replay TARGET
I`` regenerates it and shows the outcome with a traceback; crashing inputs are also saved under
``--crash-dir``.

Usage:  python benchmarks/fuzz_decoders.py [--targets json,arrow,config,parquet] [-n 1000000]
            [--parquet-n 3000] [--workers 2] [--seed 0] [--out FILE]
        python benchmarks/fuzz_decoders.py --replay json 12345
        python benchmarks/fuzz_decoders.py --atheris json   (coverage-guided, needs `pip install atheris`)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import signal
import struct
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import yaml  # noqa: E402

import daemon.config as daemon_config  # noqa: E402
from daemon.config import MAX_CONFIG_BYTES, Config, ConfigError, load_config  # noqa: E402
from ingest.errors import VorausFormatError  # noqa: E402
from ingest.messages import MessageError, batches_from_cycle, decode, encode_arrow, encode_json  # noqa: E402
from ingest.voraus import schema  # noqa: E402
from ingest.voraus.reader import VorausReader  # noqa: E402

TARGETS = ("json", "arrow", "config", "config-py", "parquet")
ACCEPTED = "accepted"
_C_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_C_DUMPER: Any = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


class _C_YAML:
    YAMLError = yaml.YAMLError

    @staticmethod
    def safe_load(text: str) -> Any:
        return yaml.load(text, Loader=_C_LOADER)


#: inputs per task sent to a worker
CHUNK = {"json": 4000, "arrow": 2000, "config": 2000, "config-py": 500, "parquet": 20}
MAX_ROWS = 1000  # decode's row limit in the campaign (small, so that too_many_rows is reachable)

# --------------------------------------------------------------------------------------------------
# generic byte mutations

_INTERESTING_INTS = (0, 1, -1, 2**7 - 1, -(2**7), 2**15 - 1, 2**16, 2**31 - 1, -(2**31), 2**32 - 1, 2**63 - 1)
_TOKENS: dict[str, tuple[bytes, ...]] = {
    "json": (
        b'"',
        b"{",
        b"}",
        b"[",
        b"]",
        b",",
        b":",
        b"null",
        b"true",
        b"1e999",
        b"-",
        b"\\u0000",
        b"\\ud800",
        b"NaN",
        b"Infinity",
        b"-0",
        b"9" * 30,
        b"\xff",
        b"\xc3",
    ),
    "arrow": (b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\xff\xff\xff\x7f", b"\x00" * 8, b"\xff" * 8),
    "config": (
        b"&a ",
        b"*a",
        b"!!python/object:os.system ",
        b"!!binary ",
        b"!!timestamp ",
        b"2026-13-45",
        b"? ",
        b"- ",
        b": ",
        b"\t",
        b"{",
        b"[",
        b"---\n",
        b"...\n",
        b"!!int ",
        b"!!float ",
        b"<<: *a\n",
        b"0x1F",
        b"0o17",
        b".inf",
        b".nan",
        b"~",
        b"\xff",
        b"\n  ",
        b"%YAML 1.1\n",
        b"!!set ",
        b"!!omap ",
        b"!!str ",
        b"'",
        b'"',
        b"#",
        b"|\n",
        b">\n",
    ),
}


def mutate_bytes(rng: random.Random, data: bytes, kind: str, others: list[bytes]) -> bytes:
    b = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 3, 4, 8))):
        op = rng.randrange(10)
        n = len(b)
        if op == 0 and n:  # flip one bit
            i = rng.randrange(n)
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1 and n:  # random byte
            b[rng.randrange(n)] = rng.randrange(256)
        elif op == 2:  # insert random bytes
            i = rng.randrange(n + 1)
            b[i:i] = rng.randbytes(rng.randrange(1, 17))
        elif op == 3:  # insert a token of the format
            i = rng.randrange(n + 1)
            b[i:i] = rng.choice(_TOKENS[kind]) if kind in _TOKENS else rng.randbytes(4)
        elif op == 4 and n:  # delete a range
            i = rng.randrange(n)
            del b[i : i + rng.randrange(1, 1 + max(1, min(64, n - i)))]
        elif op == 5 and n:  # truncate
            del b[rng.randrange(n) :]
        elif op == 6 and n:  # duplicate a range
            i = rng.randrange(n)
            j = min(n, i + rng.randrange(1, 65))
            k = rng.randrange(n + 1)
            b[k:k] = b[i:j]
        elif op == 7 and others:  # splice: this input's head with another's tail
            o = rng.choice(others)
            b = b[: rng.randrange(n + 1)] + o[rng.randrange(len(o) + 1) :]
        elif op == 8 and n >= 4:  # an interesting integer over 1, 2, 4 or 8 bytes
            width = rng.choice((1, 2, 4, 8))
            i = rng.randrange(max(1, n - width + 1))
            v = rng.choice(_INTERESTING_INTS) % (1 << (8 * width))
            b[i : i + width] = v.to_bytes(width, "little")
        elif op == 9 and n:  # overwrite a range with one repeated byte
            i = rng.randrange(n)
            j = min(n, i + rng.randrange(1, 257))
            b[i:j] = bytes([rng.choice((0, 0xFF, 0x7F, 0x80, 0x20))]) * (j - i)
    return bytes(b)


# --------------------------------------------------------------------------------------------------
# seeds


@dataclass
class Seeds:
    names: list[tuple[str, ...]] = field(default_factory=list)  # decode's signal list per message seed
    json: list[bytes] = field(default_factory=list)
    arrow: list[bytes] = field(default_factory=list)
    config: list[bytes] = field(default_factory=list)
    parquet: list[bytes] = field(default_factory=list)


def _message_batches(rng: np.random.Generator) -> list[tuple[tuple[str, ...], Any]]:
    out = []
    for width in (1, 3, 8, 24):
        names = tuple(schema.MACHINE_SIGNALS[:width])
        for rows, per in ((1, 1), (40, 16), (120, 60)):
            values = rng.standard_normal((rows, width)) * rng.choice([1.0, 50.0, 1e3])
            cycle = int(rng.integers(0, 5000)) if rows > 1 else None
            for batch in batches_from_cycle(
                f"robot-{width}",
                values,
                start_ns=1_700_000_000_000_000_000,
                period_ns=10_000_000,
                cycle=cycle,
                rows_per_message=per,
            )[:2]:
                out.append((names, batch))
    return out


def _extra_arrow_seeds(names: tuple[str, ...], metadata: dict[bytes, bytes]) -> list[bytes]:
    """Valid Arrow streams the encoder never writes: compressed, two batches, other column types."""
    rows = 5
    out = []

    def stream(sch: pa.Schema, batches: list[pa.RecordBatch], **options: Any) -> bytes:
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, sch, options=pa.ipc.IpcWriteOptions(**options)) as w:
            for rb in batches:
                w.write_batch(rb)
        return bytes(sink.getvalue().to_pybytes())

    floats = [pa.array(np.arange(rows, dtype=np.float32) + k) for k in range(len(names))]
    sch = pa.schema([pa.field(n, pa.float32()) for n in names], metadata=metadata)
    rb = pa.RecordBatch.from_arrays(floats, schema=sch)
    out.append(stream(sch, [rb], compression="lz4"))
    out.append(stream(sch, [rb], compression="zstd"))
    out.append(stream(sch, [rb, rb]))
    out.append(stream(sch, []))
    for typ, arr in (
        (pa.int64(), pa.array(np.arange(rows, dtype=np.int64))),
        (pa.float64(), pa.array([1.0, None, 3.0, 4.0, 5.0])),
        (pa.string(), pa.array(["a", "b", "c", "d", "e"])),
        (pa.float16(), pa.array(np.ones(rows, np.float16))),
        (pa.list_(pa.float32()), pa.array([[1.0]] * rows, pa.list_(pa.float32()))),
        (pa.dictionary(pa.int8(), pa.string()), pa.array(["x"] * rows).dictionary_encode()),
        (pa.bool_(), pa.array([True] * rows)),
    ):
        s2 = pa.schema([pa.field(names[0], typ), *sch][: len(names)], metadata=metadata)
        cols = [arr, *floats[1:]]
        out.append(stream(s2, [pa.RecordBatch.from_arrays(cols, schema=s2)]))
    return out


def _voraus_frame(rng: np.random.Generator, rows: tuple[int, ...]) -> pa.Table:
    lengths = np.asarray(rows, np.int64)
    n = int(lengths.sum())
    step = np.arange(n) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    cats = rng.choice([0, 2, 6, 12], size=len(rows))
    category = np.repeat(cats, lengths).astype(np.int64)
    cols: dict[str, np.ndarray] = {
        "time": step * 0.01007,
        "sample": np.repeat(np.arange(len(rows)) + 10, lengths).astype(np.int64),
        "anomaly": category != 12,
        "category": category,
        "setting": np.repeat(rng.choice([72, 73, 5], size=len(rows)), lengths).astype(np.int64),
        "action": (step // 7 % 15).astype(np.uint8),
        "active": (step % 9 > 1).astype(np.int64),
    }
    for name in schema.MACHINE_SIGNALS:
        cols[name] = np.cumsum(rng.standard_normal(n)) + rng.uniform(-40, 50)
    return pa.table(cols)


def _parquet_seeds(rng: np.random.Generator, tmp: Path) -> list[bytes]:
    import fastparquet

    out = []
    table = _voraus_frame(rng, (60, 95, 120, 50, 80, 45))
    variants: tuple[dict[str, Any], ...] = (
        {"row_group_size": 100},
        {"row_group_size": 64, "compression": "none", "write_page_checksum": True},
        {"row_group_size": 150, "compression": "zstd", "use_dictionary": False},
        {"row_group_size": 1000},
    )
    for i, options in enumerate(variants):
        path = tmp / f"seed{i}.parquet"
        pq.write_table(table, path, **options)
        out.append(path.read_bytes())
    df = table.to_pandas()
    for i, offsets in enumerate(([0], [0, 150, 300])):
        path = tmp / f"seed_fp{i}.parquet"
        df.index.name = schema.OPTIONAL_INDEX_COLUMN
        fastparquet.write(str(path), df, row_group_offsets=offsets, write_index=True)
        out.append(path.read_bytes())
    return out


def build_seeds(tmp: Path) -> Seeds:
    rng = np.random.default_rng(1234)
    seeds = Seeds()
    for names, batch in _message_batches(rng):
        seeds.names.append(names)
        seeds.json.append(encode_json(batch, names))
        seeds.arrow.append(encode_arrow(batch, names))
    names0 = seeds.names[3]
    meta = pa.ipc.open_stream(seeds.arrow[3]).schema.metadata
    for extra in _extra_arrow_seeds(names0, dict(meta)):
        seeds.names.append(names0)
        seeds.arrow.append(extra)
        seeds.json.append(seeds.json[3])
    seeds.config = [p.read_bytes() for p in sorted((ROOT / "examples").glob("*.yaml"))]
    seeds.parquet = _parquet_seeds(rng, tmp)
    return seeds


# --------------------------------------------------------------------------------------------------
# structure-aware mutations

_WEIRD_VALUES: tuple[object, ...] = (
    None,
    True,
    False,
    0,
    -1,
    1.5,
    -0.0,
    2**63,
    2**63 - 1,
    2**64,
    -(2**63) - 1,
    10**30,
    1e308,
    "",
    "x",
    "1",
    "true",
    [],
    {},
    [1],
    {"a": 1},
    "\u0000",
    "é" * 70,
    float("nan"),
    float("inf"),
    -1e39,
)


def _weird(rng: random.Random) -> object:
    v = rng.choice(_WEIRD_VALUES)
    if rng.random() < 0.1:
        v = [v] * rng.choice((2, 100, 5000))
    return v


def _nest(rng: random.Random, value: object, depth: int) -> object:
    for _ in range(depth):
        value = [value] if rng.random() < 0.5 else {"k": value}
    return value


_GIANT: dict[int, str] = {}


def _giant(n: int) -> str:
    if n not in _GIANT:
        _GIANT[n] = "[" + ",".join(["0.5"] * n) + "]"
    return _GIANT[n]


@dataclass
class _JsonSeed:
    """A JSON seed taken apart once: header fields, and each signal column as name, text and values."""

    header: dict[str, object]
    columns: list[tuple[str, str, list[object]]]


_JSON_CACHE: dict[bytes, _JsonSeed] = {}


def _json_seed(seed: bytes) -> _JsonSeed:
    if seed not in _JSON_CACHE:
        obj = json.loads(seed)
        signals = obj.pop("signals")
        cols = [(n, json.dumps(v, separators=(",", ":")), v) for n, v in signals.items()]
        _JSON_CACHE[seed] = _JsonSeed(obj, cols)
    return _JSON_CACHE[seed]


def _dump(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), allow_nan=True)


def mutate_json(rng: random.Random, seed: bytes, others: list[bytes]) -> bytes:
    """Structure-aware: the message is rebuilt from pieces (a full json.dumps per input is too slow)."""
    parsed = _json_seed(seed)
    header = dict(parsed.header)
    columns = [(_dump(n), text) for n, text, _ in parsed.columns]
    signals_text: str | None = None  # replaces the whole "signals" value when set
    extra_text = ""  # raw text inserted first in the object
    op = rng.randrange(12)
    keys = [*header, "signals"]
    if op == 0:  # a field of another type
        key = rng.choice(keys)
        if key == "signals":
            signals_text = _dump(_weird(rng))
        else:
            header[key] = _weird(rng)
    elif op == 1:  # a field missing
        key = rng.choice(keys)
        if key == "signals":
            signals_text = ""
        else:
            header.pop(key, None)
    elif op == 2:  # an unknown field
        header[rng.choice(("extra", "Robot", "time", "signal", ""))] = _weird(rng)
    elif op == 3 and columns:  # a signal value of another type, or extreme
        j = rng.randrange(len(columns))
        values = list(parsed.columns[j][2])
        if values:
            values[rng.randrange(len(values))] = _weird(rng)
        columns[j] = (columns[j][0], _dump(values))
    elif op == 4 and columns:  # ragged, empty or missing columns
        j = rng.randrange(len(columns))
        choice = rng.randrange(4)
        if choice == 0:
            columns[j] = (columns[j][0], _dump(parsed.columns[j][2][:-1]))
        elif choice == 1:
            columns[j] = (columns[j][0], "[]")
        elif choice == 2:
            del columns[j]
        else:
            columns = []
    elif op == 5 and columns:  # a giant array (past max_rows; rarely, a large one)
        j = rng.randrange(len(columns))
        n = rng.choice((MAX_ROWS + 1, MAX_ROWS + 1, 10_000, 10_000, 300_000 if rng.random() < 0.1 else 5))
        columns[j] = (columns[j][0], _giant(n))
    elif op == 6:  # deep nesting
        depth = rng.choice((10, 100, 1000, 100_000))
        extra_text = '"s":' + "[" * depth + "0" + "]" * depth + ","
    elif op == 7:  # duplicate key: a header field, or a signal column
        if columns and rng.random() < 0.5:
            columns.append(columns[rng.randrange(len(columns))])
        else:
            key = rng.choice([*header, "signals"])
            extra_text = f"{_dump(key)}:1,"
    elif op == 8:  # huge numbers, as text
        big = rng.choice(
            ("9" * 5000, "1e999999", "-1e400", "1" + "0" * 400, "0." + "0" * 400 + "1", "1E+99999999999")
        )
        if columns and rng.random() < 0.3:
            j = rng.randrange(len(columns))
            columns[j] = (columns[j][0], "[" + big + "," + columns[j][1][1:])
        else:
            header.pop(key := rng.choice(("time_ns", "period_ns", "seq", "cycle")), None)
            extra_text = f'"{key}":{big},'
    elif op == 9:  # robot strings
        header["robot"] = rng.choice(
            ("", "a" * 65, "../etc", "r 1", "r\n1", "ロボット", "r1\u0000", "a" * 64)
        )
    elif op == 10:  # timestamps at the int64 edge
        header["time_ns"] = rng.choice((2**63 - 1, 2**63 - 2, 0, -1))
        header["period_ns"] = rng.choice((2**62, 1, 0, 2**63 - 1))
    else:  # nested values anywhere
        header[rng.choice(keys[:-1] or ["robot"])] = _nest(rng, _weird(rng), rng.choice((2, 30, 500)))
    parts = [f"{_dump(k)}:{_dump(v)}" for k, v in header.items()]
    if signals_text is None:
        signals_text = "{" + ",".join(f"{n}:{t}" for n, t in columns) + "}"
    if signals_text:
        parts.append('"signals":' + signals_text)
    text = ("{" + extra_text + ",".join(parts) + "}").encode()
    if rng.random() < 0.2:
        text = rng.choice((b"\xef\xbb\xbf", b" \n\t", b"\x00")) + text
    return text


def _arrow_frames(data: bytes) -> list[tuple[int, int, int]]:
    """(marker position, flatbuffer start, flatbuffer end) of each message, as far as it parses."""
    out = []
    pos = 0
    while pos + 8 <= len(data) and data[pos : pos + 4] == b"\xff\xff\xff\xff":
        (length,) = struct.unpack_from("<i", data, pos + 4)
        if length <= 0 or pos + 8 + length > len(data):
            break
        out.append((pos, pos + 8, pos + 8 + length))
        nxt = data.find(b"\xff\xff\xff\xff", pos + 8 + length)
        if nxt < 0:
            break
        pos = nxt
    return out


def mutate_arrow(rng: random.Random, seed: bytes, others: list[bytes]) -> bytes:
    frames = _arrow_frames(seed)
    b = bytearray(seed)
    op = rng.randrange(9)
    if not frames:
        return mutate_bytes(rng, seed, "arrow", others)
    marker, fb0, fb1 = rng.choice(frames)
    if op == 0:  # corrupt the flatbuffer metadata
        for _ in range(rng.choice((1, 2, 4))):
            b[rng.randrange(fb0, fb1)] = rng.randrange(256)
    elif op == 1:  # metadata length
        v = rng.choice((0, 1, 7, -1, -8, 2**31 - 1, fb1 - fb0 + 8, fb1 - fb0 - 8))
        struct.pack_into("<i", b, marker + 4, v)
    elif op == 2:  # an aligned int32/int64 in the flatbuffer: offsets, lengths, buffer sizes, row count
        width = rng.choice((4, 8))
        i = fb0 + rng.randrange(max(1, (fb1 - fb0) // width)) * width
        v = rng.choice((*_INTERESTING_INTS, 2**40, -(2**40)))
        if i + width <= fb1:
            b[i : i + width] = (v % (1 << (8 * width))).to_bytes(width, "little")
    elif op == 3:  # body bytes
        nxt = frames[frames.index((marker, fb0, fb1)) + 1][0] if (marker, fb0, fb1) != frames[-1] else len(b)
        if nxt > fb1:
            for _ in range(rng.choice((1, 4, 16))):
                b[rng.randrange(fb1, nxt)] = rng.randrange(256)
    elif op == 4:  # truncate inside a message
        del b[rng.randrange(marker, len(b)) :]
    elif op == 5:  # drop the end-of-stream marker or add bytes after it
        b = b[:-8] if rng.random() < 0.5 else b + rng.randbytes(rng.randrange(1, 32))
    elif op == 6 and len(frames) >= 2:  # a message repeated (two batches, two schemas)
        m, _, _ = frames[1]
        end = frames[2][0] if len(frames) > 2 else len(b) - 8
        b[end:end] = b[m:end]
    elif op == 7:  # the schema of another stream with this one's batches
        other = rng.choice(others)
        of = _arrow_frames(other)
        if len(of) >= 2 and len(frames) >= 2:
            b = bytearray(other[: of[1][0]]) + b[frames[1][0] :]
    else:  # schema metadata values
        try:
            reader = pa.ipc.open_stream(seed)
            table = reader.read_all()
        except pa.ArrowException:
            return bytes(b)
        meta = dict(table.schema.metadata or {})
        key = rng.choice([*meta, b"extra", b"pandas", b"Time_ns"])
        meta[key] = rng.choice(
            (
                b"abc",
                b"-1",
                b"9" * 30,
                b"1e5",
                b" 12",
                b"True",
                b"\xff\xfe",
                b"",
                b"0x10",
                b"\xd9\xa3",
                b"1_000",
                b"+5",
                b"null",
            )
        )
        if rng.random() < 0.2:
            meta.pop(rng.choice(list(meta)), None)
        sink = pa.BufferOutputStream()
        sch = table.schema.with_metadata(meta)
        with pa.ipc.new_stream(sink, sch) as w:
            for rb in table.cast(sch).to_batches():
                w.write_batch(rb)
        return bytes(sink.getvalue().to_pybytes())
    return bytes(b)


def _paths(node: object, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


def mutate_config(rng: random.Random, seed: bytes, others: list[bytes]) -> bytes:
    data = yaml.load(seed, Loader=_C_LOADER)
    path = rng.choice(_paths(data)[1:])
    parent: Any = data
    for part in path[:-1]:
        parent = parent[part]
    last = path[-1]
    op = rng.randrange(8)
    if op == 0:
        parent[last] = _weird(rng)
    elif op == 1:
        del parent[last]
    elif op == 2 and isinstance(parent, dict):
        parent[rng.choice(("extra", "Path", "type", "robot", "port", ""))] = _weird(rng)
    elif op == 3 and isinstance(parent, dict):  # a key with a typo
        parent[str(last)[:-1] + "x"] = parent.pop(last)
    elif op == 4:
        parent[last] = rng.choice(("x" * 5000, "/" * 300, "../../etc/passwd", "a\x00b", " ", "1e999"))
    elif op == 5:
        parent[last] = _nest(rng, parent[last], rng.choice((3, 50)))
    elif op == 6 and isinstance(parent[last], list | dict) and parent[last]:
        parent[last] = [parent[last]] * rng.choice((2, 50))
    else:  # YAML-only constructs, as text
        text = seed.decode()
        line = rng.choice(text.splitlines() or [""])
        snippet = rng.choice(
            (
                "!!timestamp 2026-13-45",
                "!!int x",
                "!!float x",
                "!!binary '***'",
                "!!set {a: 1}",
                "!!python/object/apply:os.system ['true']",
                "&a [1, 2]",
                "*undefined",
                "2026-02-30",
                "[" * 3000,
                "{" * 3000,
                "!!timestamp x",
                "!!omap [a]",
                "? [a, b]",
                "1_0_0",
                "0o8",
                "0x",
            )
        )
        if ":" in line:
            head = line.split(":", 1)[0]
            return text.replace(line, f"{head}: {snippet}", 1).encode()
        return (text + f"\nextra: {snippet}\n").encode()
    out: bytes = yaml.dump(data, Dumper=_C_DUMPER, sort_keys=False).encode()
    if rng.random() < 0.02:  # aliases that expand (bounded: 10**4 leaves)
        out += b"laughs: &l0 [x, x, x, x, x, x, x, x, x, x]\n" + b"".join(
            b"l%d: &l%d [" % (k, k) + b", ".join([b"*l%d" % (k - 1)] * 10) + b"]\n" for k in range(1, 4)
        )
    if rng.random() < 0.002:  # past the size limit
        out += b"#" + b"x" * MAX_CONFIG_BYTES + b"\n"
    return out


def mutate_parquet(rng: random.Random, seed: bytes, others: list[bytes]) -> bytes:
    b = bytearray(seed)
    op = rng.randrange(8)
    md = pq.ParquetFile(io.BytesIO(seed)).metadata
    rg = md.row_group(rng.randrange(md.num_row_groups))
    col = rg.column(rng.randrange(md.num_columns))
    start = col.dictionary_page_offset or col.data_page_offset
    size = col.total_compressed_size
    if op <= 2:  # one column chunk of one row group: overwrite a span, flip bytes, zero it
        a = start + rng.randrange(size)
        z = min(start + size, a + rng.choice((1, 8, 64, size)))
        if op == 0:
            b[a:z] = rng.randbytes(z - a)
        elif op == 1:
            for i in range(a, z, max(1, (z - a) // 8)):
                b[i] ^= 1 << rng.randrange(8)
        else:
            b[a:z] = bytes(z - a)
    elif op == 3:  # the page header at the chunk's start
        for _ in range(rng.choice((1, 3))):
            b[start + rng.randrange(min(size, 24))] = rng.randrange(256)
    elif op == 4:  # one chunk's bytes over another's
        other = rg.column(rng.randrange(md.num_columns))
        o = other.dictionary_page_offset or other.data_page_offset
        n = min(size, other.total_compressed_size)
        b[start : start + n] = b[o : o + n]
    elif op == 5:  # the footer (its length is the 4 bytes before the final "PAR1")
        (flen,) = struct.unpack_from("<i", b, len(b) - 8)
        for _ in range(rng.choice((1, 2, 8))):
            b[len(b) - 8 - rng.randrange(1, max(2, flen))] = rng.randrange(256)
    elif op == 6:  # truncated file
        del b[rng.randrange(len(b)) :]
    else:
        return mutate_bytes(rng, seed, "parquet", others)
    return bytes(b)


# --------------------------------------------------------------------------------------------------
# running one input


class Hang(Exception):
    """The input ran past the per-input time limit."""


@dataclass
class Worker:
    seeds: Seeds
    tmp: Path
    seed: int
    timeout: float


_worker: Worker | None = None


def _init(seed: int, timeout: float) -> None:
    global _worker
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    tmp = Path(tempfile.mkdtemp(prefix="cellwatch-fuzz-"))
    _worker = Worker(build_seeds(tmp), tmp, seed, timeout)

    def on_alarm(signum: int, frame: object) -> None:
        raise Hang(f"no result within {timeout:g} s")

    signal.signal(signal.SIGALRM, on_alarm)


def make_input(w: Worker, target: str, index: int) -> tuple[bytes, dict[str, Any]]:
    """Input ``index`` of ``target`` and how to decode it: a pure function of (seed, target, index)."""
    rng = random.Random(f"{w.seed}:{target}:{index}")
    kind = target.split("-")[0]  # config-py: the config seeds and mutations
    pool: list[bytes] = getattr(w.seeds, kind)
    k = rng.randrange(len(pool))
    seed = pool[k]
    ctx: dict[str, Any] = {}
    if target in ("json", "arrow"):
        ctx["names"] = w.seeds.names[k]
        ctx["robot"] = rng.choice((None, None, f"robot-{len(ctx['names'])}", "other"))
    structured = {
        "json": mutate_json,
        "arrow": mutate_arrow,
        "config": mutate_config,
        "parquet": mutate_parquet,
    }
    r = rng.random()
    if r < 0.05:
        data = seed  # the seed itself: must be accepted (checks the harness)
    elif kind == "parquet" or r < 0.55:
        data = structured[kind](rng, seed, pool)
        if kind != "parquet" and rng.random() < 0.25:
            data = mutate_bytes(rng, data, kind, pool)
    else:
        data = mutate_bytes(rng, seed, kind, pool)
    if kind == "config" and rng.random() < 0.8:  # mostly valid UTF-8, to get past the decoding
        data = data.decode("utf-8", "ignore").encode()
    if target == "parquet":
        ctx["strategy"] = rng.choice(("stream", "spill"))
        ctx["batch_rows"] = rng.choice((7, 64, 1000, 65536))
    return data, ctx


def _config_reason(err: ConfigError, path: Path) -> str:
    text = str(err).removeprefix(f"{path}: ")
    for marker, reason in (
        ("not valid YAML", "yaml"),
        ("larger than", "too_large"),
        ("expected a mapping", "not_a_mapping"),
        ("not UTF-8", "not_utf8"),
        ("cannot read", "unreadable"),
    ):
        if marker in text:
            return reason
    top = text.split(": ", 1)[0].split(".")[0].split("[")[0]
    return f"invalid:{top}" if top in Config.model_fields or top == "(top level)" else "invalid:unknown_key"


def _parquet_reason(err: VorausFormatError) -> str:
    text = str(err)
    for marker, reason in (
        ("not a parquet file", "not_parquet"),
        ("not in the voraus-AD layout", "layout"),
        ("damaged footer", "damaged_footer"),
        ("unreadable footer", "unreadable_footer"),
        ("has no rows", "no_rows"),
    ):
        if marker in text:
            return reason
    return "format:other"


def run_input(w: Worker, target: str, data: bytes, ctx: dict[str, Any], extra: Counter[str]) -> str:
    """The outcome: ACCEPTED or a rejection reason; anything raised is a crash."""
    if target in ("json", "arrow"):
        try:
            decode(data, ctx["names"], robot=ctx["robot"], max_rows=MAX_ROWS)
        except MessageError as err:
            return err.reason
        return ACCEPTED
    path = w.tmp / ("input.parquet" if target == "parquet" else "input.yaml")
    path.write_bytes(data)
    if target in ("config", "config-py"):
        # config: load_config with libyaml's scanner and parser under the same Python constructors
        # (10x faster, so that 1,000,000 inputs fit); config-py: load_config exactly as the daemon runs it
        daemon_config.yaml = _C_YAML if target == "config" else yaml  # type: ignore[assignment]
        try:
            load_config(path)
        except ConfigError as err:
            return _config_reason(err, path)
        return ACCEPTED
    try:
        with VorausReader(
            path, strategy=ctx["strategy"], batch_rows=ctx["batch_rows"], memory_budget=2**16
        ) as r:
            _ = r.rate_hz
            r.meta()
            extra["cycles"] += sum(1 for _ in r.cycles())
            for reason, n in r.rejections.counts.items():
                extra[f"cycle_rejected:{reason}"] += n
            extra["damaged_row_groups"] += len(r.damaged_row_groups)
    except VorausFormatError as err:
        return _parquet_reason(err)
    return ACCEPTED


def fuzz_chunk(target: str, start: int, stop: int) -> dict[str, Any]:
    """Run inputs [start, stop) of a target in this worker; outcomes tallied, crashes described."""
    assert _worker is not None
    w = _worker
    outcomes: Counter[str] = Counter()
    extra: Counter[str] = Counter()
    crashes: list[dict[str, Any]] = []
    slowest = (0.0, -1)
    for i in range(start, stop):
        data, ctx = make_input(w, target, i)
        t0 = time.perf_counter()
        signal.setitimer(signal.ITIMER_REAL, w.timeout)
        try:
            outcome = run_input(w, target, data, ctx, extra)
        except BaseException as err:
            if isinstance(err, KeyboardInterrupt):
                raise
            outcome = "CRASH"
            crashes.append(
                {
                    "index": i,
                    "error": f"{type(err).__name__}: {' '.join(str(err).split())[:300]}",
                    "where": traceback.format_exception(err)[-2].strip().splitlines()[0][:300]
                    if len(traceback.format_exception(err)) > 1
                    else "",
                    "input": data[:200_000].hex() if len(crashes) < 5 else "",
                }
            )
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        dt = time.perf_counter() - t0
        if dt > slowest[0]:
            slowest = (dt, i)
        outcomes[outcome] += 1
    return {"outcomes": dict(outcomes), "extra": dict(extra), "crashes": crashes, "slowest": slowest}


# --------------------------------------------------------------------------------------------------
# the campaign


@dataclass
class Tally:
    target: str
    inputs: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    extra: Counter[str] = field(default_factory=Counter)
    crashes: list[dict[str, Any]] = field(default_factory=list)
    dead_workers: list[str] = field(default_factory=list)
    slowest: tuple[float, int] = (0.0, -1)
    wall_s: float = 0.0

    @property
    def n_crashes(self) -> int:
        return self.outcomes["CRASH"] + len(self.dead_workers)

    def add(self, result: dict[str, Any], n: int) -> None:
        self.inputs += n
        self.outcomes.update(result["outcomes"])
        self.extra.update(result["extra"])
        self.crashes += result["crashes"]
        if result["slowest"][0] > self.slowest[0]:
            self.slowest = (float(result["slowest"][0]), int(result["slowest"][1]))


def campaign(
    target: str, n: int, workers: int, seed: int, timeout: float, log: Callable[[str], None]
) -> Tally:
    tally = Tally(target)
    chunk = CHUNK[target]
    tasks = [(s, min(n, s + chunk)) for s in range(0, n, chunk)]
    t0 = time.monotonic()
    last_report = t0
    pending: dict[Future[dict[str, Any]], tuple[int, int]] = {}
    pool = ProcessPoolExecutor(workers, initializer=_init, initargs=(seed, timeout))
    try:
        while tasks or pending:
            while tasks and len(pending) < 2 * workers:
                s, e = tasks.pop(0)
                pending[pool.submit(fuzz_chunk, target, s, e)] = (s, e)
            done, _ = wait(pending, timeout=30, return_when=FIRST_COMPLETED)
            broken = False
            for fut in done:
                s, e = pending.pop(fut)
                try:
                    tally.add(fut.result(), e - s)
                except BrokenProcessPool:
                    broken = True
                    tally.dead_workers.append(f"inputs {s}..{e - 1}: a worker died (killed by a signal?)")
                    tally.inputs += e - s
            if broken:  # the other pending chunks died with the pool: run them again in a new one
                tasks = sorted(pending.values()) + tasks
                pending.clear()
                pool.shutdown(wait=False, cancel_futures=True)
                pool = ProcessPoolExecutor(workers, initializer=_init, initargs=(seed, timeout))
            now = time.monotonic()
            if now - last_report >= 15 or (not tasks and not pending):
                last_report = now
                rate = tally.inputs / max(now - t0, 1e-9)
                log(f"  {target}: {tally.inputs:,}/{n:,} inputs, {tally.n_crashes} crashes, {rate:,.0f}/s")
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    tally.wall_s = time.monotonic() - t0
    return tally


def report(tallies: list[Tally], out: Callable[[str], None]) -> None:
    out("")
    out(
        f"{'target':<8} {'inputs':>11} {'accepted':>10} {'rejected':>11} {'crashes':>8} {'inputs/s':>9} "
        f"{'wall s':>8} {'slowest':>9}"
    )
    for t in tallies:
        rejected = t.inputs - t.outcomes[ACCEPTED] - t.n_crashes
        out(
            f"{t.target:<8} {t.inputs:>11,} {t.outcomes[ACCEPTED]:>10,} {rejected:>11,} {t.n_crashes:>8} "
            f"{t.inputs / max(t.wall_s, 1e-9):>9,.0f} {t.wall_s:>8,.0f} {t.slowest[0] * 1e3:>7,.0f}ms"
        )
    for t in tallies:
        out(f"\n{t.target}: rejections by reason")
        for reason, count in sorted(t.outcomes.items(), key=lambda kv: -kv[1]):
            if reason not in (ACCEPTED, "CRASH"):
                out(f"  {reason:<28} {count:>11,}")
        if t.extra:
            out(f"{t.target}: accepted files, cycles")
            for key, count in sorted(t.extra.items()):
                out(f"  {key:<40} {count:>11,}")
        for c in t.crashes[:20]:
            out(f"  CRASH input {c['index']}: {c['error']}  at {c['where']}")
        for d in t.dead_workers:
            out(f"  CRASH {d}")


def replay(target: str, index: int, seed: int, timeout: float) -> int:
    _init(seed, timeout)
    assert _worker is not None
    data, ctx = make_input(_worker, target, index)
    print(f"{target} input {index}: {len(data)} bytes, {ctx}")
    print(repr(data[:600]))
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        print("outcome:", run_input(_worker, target, data, ctx, Counter()))
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        return 1
    return 0


def atheris_mode(target: str, seed: int, rest: list[str]) -> int:
    """Coverage-guided fuzzing of one target with atheris (libFuzzer), from the same seeds."""
    import atheris  # type: ignore[import-untyped]

    _init(seed, 10.0)
    assert _worker is not None
    w = _worker
    pool: list[bytes] = getattr(w.seeds, target.split("-")[0])
    corpus = w.tmp / "corpus"
    corpus.mkdir()
    for k, s in enumerate(pool):
        (corpus / f"seed{k}").write_bytes(s)
    names = w.seeds.names[3] if target in ("json", "arrow") else ()
    ctx = {"names": names, "robot": None, "strategy": "stream", "batch_rows": 64}

    def one(data: bytes) -> None:
        signal.setitimer(signal.ITIMER_REAL, w.timeout)
        try:
            run_input(w, target, data, ctx, Counter())
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)

    atheris.instrument_all()  # coverage of every loaded Python function (the decoders included)
    atheris.Setup([sys.argv[0], *rest, str(corpus)], one)
    atheris.Fuzz()
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--targets", default=",".join(TARGETS), help="comma-separated: json,arrow,config,parquet")
    ap.add_argument("-n", type=int, default=1_000_000, help="inputs per message/config target")
    ap.add_argument("--parquet-n", type=int, default=3000, help="damaged parquet files (slow per input)")
    ap.add_argument("--config-py-n", type=int, default=30_000, help="configs through the pure-Python YAML")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=20.0, help="per-input limit (s): beyond it is a hang")
    ap.add_argument("--out", type=Path, help="also write the report (and crashes as JSON) here")
    ap.add_argument("--crash-dir", type=Path, default=Path(tempfile.gettempdir()) / "cellwatch-fuzz-crashes")
    ap.add_argument("--replay", nargs=2, metavar=("TARGET", "INDEX"), help="regenerate and run one input")
    ap.add_argument("--atheris", metavar="TARGET", help="coverage-guided mode (libFuzzer args after --)")
    args, rest = ap.parse_known_args(argv)
    if args.replay:
        return replay(args.replay[0], int(args.replay[1]), args.seed, args.timeout)
    if args.atheris:
        return atheris_mode(args.atheris, args.seed, rest)
    targets = [t for t in args.targets.split(",") if t]
    unknown = set(targets) - set(TARGETS)
    if unknown:
        ap.error(f"unknown target(s): {', '.join(sorted(unknown))}")
    lines: list[str] = []

    def log(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    log(
        f"fuzz campaign: seed {args.seed}, {args.workers} workers, per-input limit {args.timeout:g} s, "
        f"{os.cpu_count()} CPUs"
    )
    tallies: list[Tally] = []
    for target in targets:
        n = {"parquet": args.parquet_n, "config-py": args.config_py_n}.get(target, args.n)
        tallies.append(campaign(target, n, args.workers, args.seed, args.timeout, log))
        if args.out:  # what has finished so far, in case a long campaign is stopped
            partial: list[str] = []
            report(tallies, partial.append)
            args.out.write_text("\n".join([*lines, *partial, "(campaign still running)"]) + "\n")
    report(tallies, log)
    crashes = [{"target": t.target, **c} for t in tallies for c in t.crashes]
    if crashes:
        args.crash_dir.mkdir(parents=True, exist_ok=True)
        for c in crashes:
            if c["input"]:
                (args.crash_dir / f"{c['target']}-{c['index']}.bin").write_bytes(bytes.fromhex(c["input"]))
        log(f"crashing inputs saved in {args.crash_dir} (regenerate any with --replay TARGET INDEX)")
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
        with contextlib.suppress(OSError):
            args.out.with_suffix(".crashes.json").write_text(json.dumps(crashes, indent=1))
    total = sum(t.n_crashes for t in tallies)
    log(f"\n{sum(t.inputs for t in tallies):,} inputs, {total} crashes")
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main())
