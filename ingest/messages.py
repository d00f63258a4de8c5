"""The wire format for robot signals sent over Kafka or MQTT: one robot, one timestamp, a batch of rows.

A message holds consecutive samples of named signals of ONE robot, in one of two encodings that
:func:`decode` tells apart by their first bytes:

* **JSON** (UTF-8 object, starts with ``{`` after optional whitespace)::

      {"robot": "r1", "time_ns": 1700000000000000000, "period_ns": 10000000,
       "cycle": 42, "cycle_end": true, "seq": 17, "cycle_row": 300,
       "signals": {"motor_position_1": [0.1, 0.2], "motor_iq_1": [1.5, 1.6]}}

  ``time_ns`` (first sample, ns since the Unix epoch), ``period_ns`` and ``signals`` are required;
  ``robot`` (when the transport names the robot), ``cycle`` (the voraus ``sample`` marker),
  ``cycle_end`` (the last row ends its cycle), ``seq`` (per-robot message number) and ``cycle_row``
  (index of the first row within its cycle) are optional (absent or ``null``). Types are checked
  strictly (``true`` is not an int), integers lie in [0, 2**63 - 1] (``period_ns`` >= 1).
* **Arrow IPC stream** (starts with the continuation marker ``0xFFFFFFFF``): one record batch whose
  columns are the signals (integer or floating point), the scalar fields above as UTF-8 text in the
  schema metadata (keys ``b"robot"``, ``b"time_ns"``, ``b"period_ns"``, ``b"cycle"``,
  ``b"cycle_end"`` (``true``/``false``), ``b"seq"``, ``b"cycle_row"``). Uncompressed: a compressed body is
  rejected, because a few kB of it can inflate to gigabytes before any check could run (compress at
  the transport instead, e.g. Kafka ``compression.type``).

Signals are matched by name against the model's list; extra signals are ignored entirely (not even
type-checked). Every problem raises :class:`MessageError` whose ``reason`` is one of :data:`REASONS`
(a bounded set, fit for a metrics label) and whose text is one line naming the problem.
"""

from __future__ import annotations

import itertools
import json
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import pyarrow as pa

from ingest.errors import IngestError

__all__ = [
    "REASONS",
    "MessageError",
    "SignalBatch",
    "batches_from_cycle",
    "decode",
    "encode_arrow",
    "encode_json",
]

# Reason codes (MessageError.reason).
TOO_LARGE: Final = "too_large"
UNKNOWN_FORMAT: Final = "unknown_format"
BAD_JSON: Final = "bad_json"
BAD_ARROW: Final = "bad_arrow"
DUPLICATE_KEY: Final = "duplicate_key"
WRONG_TYPE: Final = "wrong_type"
MISSING_FIELD: Final = "missing_field"
UNKNOWN_FIELD: Final = "unknown_field"
OUT_OF_RANGE: Final = "out_of_range"
BAD_ROBOT: Final = "bad_robot"
ROBOT_MISMATCH: Final = "robot_mismatch"
MISSING_SIGNALS: Final = "missing_signals"
RAGGED: Final = "ragged"
EMPTY: Final = "empty"
TOO_MANY_ROWS: Final = "too_many_rows"
NAN: Final = "nan"
INF: Final = "inf"
REASONS: Final = (
    TOO_LARGE,
    UNKNOWN_FORMAT,
    BAD_JSON,
    BAD_ARROW,
    DUPLICATE_KEY,
    WRONG_TYPE,
    MISSING_FIELD,
    UNKNOWN_FIELD,
    OUT_OF_RANGE,
    BAD_ROBOT,
    ROBOT_MISMATCH,
    MISSING_SIGNALS,
    RAGGED,
    EMPTY,
    TOO_MANY_ROWS,
    NAN,
    INF,
)

INT64_MAX: Final = 2**63 - 1
ROBOT_PATTERN: Final = re.compile(r"[A-Za-z0-9_.-]{1,64}")
SCALAR_FIELDS: Final = ("robot", "time_ns", "period_ns", "cycle", "cycle_end", "seq", "cycle_row")
JSON_FIELDS: Final = frozenset((*SCALAR_FIELDS, "signals"))
#: Schema metadata keys of an Arrow message; ``b"pandas"`` (added by ``RecordBatch.from_pandas``) is ignored.
ARROW_KEYS: Final = frozenset(k.encode() for k in SCALAR_FIELDS)
_ARROW_IGNORED_KEYS: Final = frozenset({b"pandas"})
_SHOW_NAMES: Final = 5  # how many names an error message lists before "(and N more)"


class MessageError(IngestError):
    """A message cannot be decoded. ``reason`` is a short snake_case code from :data:`REASONS`;
    ``str(err)`` is a one-line human reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, eq=False)
class SignalBatch:
    """Consecutive samples of one robot: row ``i`` was sampled at ``time_ns + i * period_ns``.

    ``signals`` is ``(rows, S)`` float32, its columns in the order of the signal names it was decoded
    with (or is encoded with). Two batches are equal when every field and every value is.
    """

    robot: str
    time_ns: int
    period_ns: int
    signals: np.ndarray
    cycle: int | None = None
    cycle_end: bool = False
    seq: int | None = None
    cycle_row: int | None = None  # index within its cycle of the first row, when the producer knows it

    def __post_init__(self) -> None:
        if not isinstance(self.robot, str) or not ROBOT_PATTERN.fullmatch(self.robot):
            raise ValueError(f"robot must be 1 to 64 characters of [A-Za-z0-9_.-], got {_show(self.robot)}")
        if not isinstance(self.signals, np.ndarray) or self.signals.ndim != 2:
            raise ValueError("signals must be a 2-D numpy array (rows, signals)")
        if self.signals.dtype != np.float32:
            raise ValueError(f"signals must be float32, got {self.signals.dtype}")
        if self.signals.shape[0] < 1:
            raise ValueError("a batch needs at least one row")
        if not isinstance(self.cycle_end, bool):
            raise ValueError(f"cycle_end must be a bool, got {type(self.cycle_end).__name__}")
        try:
            _check_int("time_ns", self.time_ns, 0)
            _check_int("period_ns", self.period_ns, 1)
            if self.cycle is not None:
                _check_int("cycle", self.cycle, 0)
            if self.seq is not None:
                _check_int("seq", self.seq, 0)
            if self.cycle_row is not None:
                _check_int("cycle_row", self.cycle_row, 0)
        except MessageError as e:
            raise ValueError(str(e)) from None
        if self.end_ns > INT64_MAX:
            raise ValueError(f"the last sample's timestamp {self.end_ns} does not fit in int64")

    @property
    def rows(self) -> int:
        return int(self.signals.shape[0])

    @property
    def end_ns(self) -> int:
        """Timestamp of the last sample."""
        return self.time_ns + (self.rows - 1) * self.period_ns

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SignalBatch):
            return NotImplemented
        return (
            self.robot == other.robot
            and self.time_ns == other.time_ns
            and self.period_ns == other.period_ns
            and self.cycle == other.cycle
            and self.cycle_end == other.cycle_end
            and self.seq == other.seq
            and self.cycle_row == other.cycle_row
            and self.signals.shape == other.signals.shape
            and self.signals.dtype == other.signals.dtype
            and bool(np.array_equal(self.signals, other.signals))
        )


# -- decode ------------------------------------------------------------------------------------------

_JSON_START: Final = re.compile(rb"[ \t\r\n]*")
_ARROW_CONTINUATION: Final = b"\xff\xff\xff\xff"


def decode(
    payload: bytes,
    signals: Sequence[str],
    *,
    robot: str | None = None,
    max_bytes: int = 4 * 2**20,
    max_rows: int = 100_000,
) -> SignalBatch:
    """Decode one JSON or Arrow IPC message into a batch whose columns follow ``signals``.

    ``robot`` is the robot named by the transport (Kafka key, MQTT topic), if any: a message naming
    another robot is rejected; a message naming none gets it. Raises :class:`MessageError`.
    """
    names = _check_names(signals)
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise TypeError(f"payload must be bytes, got {type(payload).__name__}")
    size = len(payload) if not isinstance(payload, memoryview) else payload.nbytes
    if size > max_bytes:
        raise MessageError(TOO_LARGE, f"message of {size} bytes is larger than the limit of {max_bytes}")
    payload = bytes(payload) if not isinstance(payload, bytes) else payload
    if payload[:4] == _ARROW_CONTINUATION:
        return _decode_arrow(payload, names, robot, max_rows)
    start = _JSON_START.match(payload)
    if start is not None and payload[start.end() : start.end() + 1] == b"{":
        return _decode_json(payload, names, robot, max_rows)
    if not payload.strip():
        raise MessageError(UNKNOWN_FORMAT, "empty message")
    raise MessageError(
        UNKNOWN_FORMAT,
        f"message is neither JSON (starts with '{{') nor an Arrow IPC stream (starts with 0xFFFFFFFF); "
        f"first bytes: {payload[:8].hex(' ')}",
    )


def _check_names(signals: Sequence[str]) -> tuple[str, ...]:
    if isinstance(signals, str | bytes):
        raise TypeError("signals must be a sequence of signal names, not a single string")
    names = tuple(signals)
    if not names:
        raise ValueError("signals must name at least one signal")
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"signal names must be unique; repeated: {', '.join(dup)}")
    return names


# -- JSON --


class _Constant:
    """Stands for a NaN/Infinity literal until the check that knows which field it is in."""

    __slots__ = ("literal",)

    def __init__(self, literal: str) -> None:
        self.literal = literal


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise MessageError(DUPLICATE_KEY, f"duplicate key {_show(key)} in a JSON object")
            seen.add(key)
    return obj


def _decode_json(payload: bytes, names: tuple[str, ...], robot: str | None, max_rows: int) -> SignalBatch:
    try:
        obj = json.loads(payload.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_Constant)
    except UnicodeDecodeError as e:
        raise MessageError(BAD_JSON, f"message is not valid UTF-8 (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise MessageError(BAD_JSON, f"invalid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise MessageError(BAD_JSON, "invalid JSON: nested too deeply") from None
    except ValueError as e:  # e.g. an integer literal longer than Python's digit limit
        raise MessageError(BAD_JSON, f"invalid JSON: {_one_line(str(e))}") from None
    if not isinstance(obj, dict):  # cannot happen for a payload starting with '{', kept for safety
        raise MessageError(BAD_JSON, "a message must be a JSON object")

    unknown = [k for k in obj if k not in JSON_FIELDS]
    if unknown:
        raise MessageError(
            UNKNOWN_FIELD,
            f"unknown field{'s' if len(unknown) > 1 else ''}: {_list(unknown, quote=True)}; "
            f"known: {', '.join(sorted(JSON_FIELDS))}",
        )
    missing = [k for k in ("time_ns", "period_ns", "signals") if k not in obj]
    if missing:
        raise MessageError(
            MISSING_FIELD, f"missing field{'s' if len(missing) > 1 else ''}: {', '.join(missing)}"
        )
    header = _Header.from_values(obj, robot)

    columns = obj["signals"]
    if not isinstance(columns, dict):
        raise MessageError(WRONG_TYPE, f"'signals' must be an object of arrays, got {_json_type(columns)}")
    _check_missing(names, columns)
    lists = [columns[n] for n in names]
    for name, col in zip(names, lists, strict=True):
        if not isinstance(col, list):
            raise MessageError(
                WRONG_TYPE, f"signal {_show(name)} must be an array of numbers, got {_json_type(col)}"
            )
    lengths = set(map(len, lists))
    if len(lengths) > 1:
        first = len(lists[0])
        odd = next(i for i, col in enumerate(lists) if len(col) != first)
        raise MessageError(
            RAGGED,
            f"signal arrays differ in length: {_show(names[0])} has {first} values, "
            f"{_show(names[odd])} has {len(lists[odd])}",
        )
    rows = lengths.pop()
    _check_rows(rows, max_rows)

    # One C-level pass over every value; bool is a subclass of int but its own type here.
    types = set(map(type, itertools.chain.from_iterable(lists)))
    if not types <= {int, float}:
        _reject_json_values(names, lists)
    try:
        wide = np.array(lists, dtype=np.float64)  # (S, rows)
    except OverflowError:
        big = next(
            (n, i) for n, col in zip(names, lists, strict=True) for i, v in enumerate(col) if abs(v) > 1e308
        )
        raise MessageError(
            INF, f"signal {_show(big[0])} row {big[1]}: integer too large for a float"
        ) from None
    with np.errstate(over="ignore"):
        values = np.ascontiguousarray(wide.T, dtype=np.float32)
    _check_finite(values, names)
    return header.batch(values)


def _reject_json_values(names: tuple[str, ...], lists: list[list[object]]) -> None:
    """Raise for the first value in the signal arrays that is not a JSON number."""
    for name, col in zip(names, lists, strict=True):
        for i, v in enumerate(col):
            if type(v) is int or type(v) is float:
                continue
            if isinstance(v, _Constant):
                reason = NAN if v.literal == "NaN" else INF
                raise MessageError(
                    reason, f"signal {_show(name)} row {i} is {v.literal}: only finite numbers"
                )
            raise MessageError(
                WRONG_TYPE, f"signal {_show(name)} row {i} must be a number, got {_json_type(v)}"
            )
    raise AssertionError("no offending value found")  # pragma: no cover


def _json_type(value: object) -> str:
    if isinstance(value, _Constant):
        return value.literal
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int | float):
        return f"number {value!r}"
    if isinstance(value, str):
        return f"string {_show(value)}"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


# -- Arrow --

_MSG_SCHEMA: Final = 1
_MSG_DICTIONARY: Final = 2
_MSG_RECORD_BATCH: Final = 3
_MSG_NAMES: Final = {
    0: "none",
    1: "schema",
    2: "dictionary batch",
    3: "record batch",
    4: "tensor",
    5: "sparse tensor",
}


class _Malformed(Exception):
    """The IPC framing or a message header cannot be read; becomes MessageError(BAD_ARROW)."""


def _unpack(fmt: str, buf: memoryview, pos: int) -> int:
    size = struct.calcsize(fmt)
    if pos < 0 or pos + size > len(buf):
        raise _Malformed("header field out of bounds")
    value: int = struct.unpack_from(fmt, buf, pos)[0]
    return value


class _FlatTable:
    """Just enough of the flatbuffers format to read a few fields of an Arrow IPC message header."""

    __slots__ = ("_buf", "_pos", "_vtable", "_vtable_size")

    def __init__(self, buf: memoryview, pos: int) -> None:
        self._buf = buf
        self._pos = pos
        self._vtable = pos - _unpack("<i", buf, pos)
        self._vtable_size = _unpack("<H", buf, self._vtable)

    def _field(self, index: int) -> int:
        """Absolute position of field ``index``, 0 when the field is absent."""
        slot = 4 + 2 * index
        if slot + 2 > self._vtable_size:
            return 0
        offset = _unpack("<H", self._buf, self._vtable + slot)
        return self._pos + offset if offset else 0

    def scalar(self, index: int, fmt: str, default: int = 0) -> int:
        pos = self._field(index)
        return _unpack(fmt, self._buf, pos) if pos else default

    def table(self, index: int) -> _FlatTable | None:
        pos = self._field(index)
        return _FlatTable(self._buf, pos + _unpack("<I", self._buf, pos)) if pos else None


def _scan_arrow(payload: bytes, max_rows: int) -> None:
    """Walk the IPC stream framing before pyarrow decodes anything: exactly one schema and one record
    batch, no body compression (a decompression bomb would allocate before any later check), and the
    row count within ``max_rows``."""
    view = memoryview(payload)
    pos, n_batches, rows, first = 0, 0, 0, True
    while pos < len(view):
        if view[pos : pos + 4] != _ARROW_CONTINUATION:
            raise _Malformed(f"no continuation marker at byte {pos}")
        meta_len = _unpack("<i", view, pos + 4)
        pos += 8
        if meta_len == 0:  # end-of-stream marker
            if pos != len(view):
                raise _Malformed(f"{len(view) - pos} bytes after the end-of-stream marker")
            break
        if meta_len < 0 or pos + meta_len > len(view):
            raise _Malformed("message header runs past the end")
        meta = view[pos : pos + meta_len]
        message = _FlatTable(meta, _unpack("<I", meta, 0))
        kind = message.scalar(1, "<B")
        body_len = message.scalar(3, "<q")
        if body_len < 0 or pos + meta_len + body_len > len(view):
            raise _Malformed("message body runs past the end")
        if first != (kind == _MSG_SCHEMA):
            raise _Malformed(f"unexpected {_MSG_NAMES.get(kind, f'message type {kind}')} message")
        if kind == _MSG_DICTIONARY:
            data = message.table(2)
            header = data.table(1) if data is not None else None
        elif kind == _MSG_RECORD_BATCH:
            header = message.table(2)
            n_batches += 1
        else:
            header = None
        if kind in (_MSG_DICTIONARY, _MSG_RECORD_BATCH):
            if header is None:
                raise _Malformed("record batch message without a header")
            if header.scalar(3, "<I"):
                raise _Malformed("compressed Arrow bodies are not accepted (compress at the transport)")
            if kind == _MSG_RECORD_BATCH:
                rows = header.scalar(0, "<q")
        elif kind != _MSG_SCHEMA:
            raise _Malformed(f"unexpected {_MSG_NAMES.get(kind, f'message type {kind}')} message")
        first = False
        pos += meta_len + body_len
    if n_batches != 1:
        raise _Malformed(f"expected exactly one record batch, got {n_batches}")
    if rows < 0:
        raise _Malformed(f"negative row count {rows}")
    _check_rows(rows, max_rows)


_ARROW_ERRORS: Final = (pa.ArrowException, OSError, ValueError, TypeError, StopIteration)
"""What pyarrow raises on a bad stream (an IOError status becomes a plain OSError, bad UTF-8 in a
name a UnicodeDecodeError); caught only around pyarrow calls."""


def _decode_arrow(payload: bytes, names: tuple[str, ...], robot: str | None, max_rows: int) -> SignalBatch:
    try:
        _scan_arrow(payload, max_rows)
        reader = pa.ipc.open_stream(pa.py_buffer(payload))
        batch = reader.read_next_batch()
        batch.validate()
        metadata = reader.schema.metadata or {}
        schema_names = batch.schema.names
    except _Malformed as e:
        raise MessageError(BAD_ARROW, f"invalid Arrow IPC stream: {e}") from None
    except _ARROW_ERRORS as e:
        raise MessageError(BAD_ARROW, f"invalid Arrow IPC stream: {_arrow_error(e)}") from None
    header = _Header.from_values(_arrow_fields(metadata), robot, arrow=True)

    index = {n: i for i, n in enumerate(schema_names)}
    if len(index) != len(schema_names):
        dup = sorted({n for n in schema_names if schema_names.count(n) > 1})
        raise MessageError(
            DUPLICATE_KEY, f"duplicate column{'s' if len(dup) > 1 else ''}: {_list(dup, quote=True)}"
        )
    _check_missing(names, index)
    if batch.num_rows == 0:
        raise MessageError(EMPTY, "the record batch has no rows")
    try:
        values = _arrow_values(batch.select([index[n] for n in names]), names)
    except _ARROW_ERRORS as e:
        raise MessageError(BAD_ARROW, f"invalid Arrow column data: {_arrow_error(e)}") from None
    _check_finite(values, names)
    return header.batch(values)


def _arrow_error(e: BaseException) -> str:
    return _one_line(str(e)) or type(e).__name__


def _arrow_values(batch: pa.RecordBatch, names: tuple[str, ...]) -> np.ndarray:
    """(rows, S) float32 from a record batch whose columns are the wanted signals, in order."""
    try:  # fast path: one C++ copy into a row-major tensor (refuses nulls and non-numeric types)
        tensor = np.asarray(batch.to_tensor(null_to_nan=False, row_major=True))
    except _ARROW_ERRORS:
        tensor = None
    if tensor is not None and tensor.dtype in (np.float32, np.float64):
        with np.errstate(over="ignore"):
            return np.ascontiguousarray(tensor, dtype=np.float32)
    # Slow path: say which column is wrong, or convert column by column (e.g. float16, or integers
    # only, which to_tensor would give as one integer type, wrapping uint64 above 2**63).
    out = np.empty((batch.num_rows, len(names)), dtype=np.float32)
    for j, (name, column) in enumerate(zip(names, batch.columns, strict=True)):
        kind = column.type
        if not (pa.types.is_integer(kind) or pa.types.is_floating(kind)):
            raise MessageError(
                WRONG_TYPE, f"signal {_show(name)} must be an integer or float column, got {kind}"
            )
        if column.null_count:
            raise MessageError(WRONG_TYPE, f"signal {_show(name)} has {column.null_count} null values")
        with np.errstate(over="ignore"):
            out[:, j] = column.to_numpy(zero_copy_only=False)
    return out


_INT_TEXT: Final = re.compile(r"-?[0-9]{1,30}")


def _arrow_fields(metadata: Mapping[bytes, bytes]) -> dict[str, object]:
    """The scalar fields from the schema metadata, parsed from text into JSON's types."""
    unknown = [k for k in metadata if k not in ARROW_KEYS and k not in _ARROW_IGNORED_KEYS]
    if unknown:
        shown = [k.decode("utf-8", "backslashreplace") for k in unknown]
        raise MessageError(
            UNKNOWN_FIELD,
            f"unknown schema metadata key{'s' if len(unknown) > 1 else ''}: {_list(shown, quote=True)}; "
            f"known: {', '.join(SCALAR_FIELDS)}",
        )
    fields: dict[str, object] = {}
    for key in SCALAR_FIELDS:
        raw = metadata.get(key.encode())
        if raw is None:
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise MessageError(WRONG_TYPE, f"schema metadata {key!r} is not UTF-8 text") from None
        if key == "robot":
            fields[key] = text
        elif key == "cycle_end":
            if text not in ("true", "false"):
                raise MessageError(
                    WRONG_TYPE, f"schema metadata 'cycle_end' must be true or false, got {_show(text)}"
                )
            fields[key] = text == "true"
        else:
            if not _INT_TEXT.fullmatch(text):
                raise MessageError(
                    WRONG_TYPE, f"schema metadata {key!r} must be a decimal integer, got {_show(text)}"
                )
            fields[key] = int(text)
    return fields


# -- shared checks --


@dataclass(frozen=True)
class _Header:
    robot: str
    time_ns: int
    period_ns: int
    cycle: int | None
    cycle_end: bool
    seq: int | None
    cycle_row: int | None

    @classmethod
    def from_values(
        cls, obj: Mapping[str, object], transport_robot: str | None, *, arrow: bool = False
    ) -> _Header:
        where = "schema metadata" if arrow else "field"
        missing = [k for k in ("time_ns", "period_ns") if k not in obj]
        if missing:
            plural = "s" if len(missing) > 1 else ""
            raise MessageError(MISSING_FIELD, f"missing {where}{plural}: {', '.join(missing)}")
        for key, value in obj.items():
            if isinstance(value, _Constant):
                raise MessageError(
                    NAN if value.literal == "NaN" else INF, f"{where} {key!r} is {value.literal}"
                )
        time_ns = _check_int("time_ns", obj["time_ns"], 0)
        period_ns = _check_int("period_ns", obj["period_ns"], 1)
        cycle = obj.get("cycle")
        if cycle is not None:
            cycle = _check_int("cycle", cycle, 0)
        seq = obj.get("seq")
        if seq is not None:
            seq = _check_int("seq", seq, 0)
        cycle_row = obj.get("cycle_row")
        if cycle_row is not None:
            cycle_row = _check_int("cycle_row", cycle_row, 0)
        cycle_end = obj.get("cycle_end")
        if cycle_end is None:
            cycle_end = False
        elif not isinstance(cycle_end, bool):
            raise MessageError(WRONG_TYPE, f"'cycle_end' must be true or false, got {_json_type(cycle_end)}")

        message_robot = obj.get("robot")
        if message_robot is not None:
            if not isinstance(message_robot, str):
                raise MessageError(WRONG_TYPE, f"'robot' must be a string, got {_json_type(message_robot)}")
            if not ROBOT_PATTERN.fullmatch(message_robot):
                raise MessageError(
                    BAD_ROBOT, f"robot {_show(message_robot)} is not 1 to 64 characters of [A-Za-z0-9_.-]"
                )
        if transport_robot is not None:
            if not isinstance(transport_robot, str) or not ROBOT_PATTERN.fullmatch(transport_robot):
                raise MessageError(
                    BAD_ROBOT,
                    f"robot {_show(transport_robot)} named by the transport is not 1 to 64 characters "
                    "of [A-Za-z0-9_.-]",
                )
            if message_robot is not None and message_robot != transport_robot:
                raise MessageError(
                    ROBOT_MISMATCH,
                    f"message is for robot {_show(message_robot)} "
                    f"but arrived for robot {_show(transport_robot)}",
                )
            message_robot = transport_robot
        if message_robot is None:
            raise MessageError(MISSING_FIELD, f"missing {where}: robot (and the transport names no robot)")
        return cls(message_robot, time_ns, period_ns, cycle, cycle_end, seq, cycle_row)

    def batch(self, values: np.ndarray) -> SignalBatch:
        end = self.time_ns + (values.shape[0] - 1) * self.period_ns
        if end > INT64_MAX:
            raise MessageError(OUT_OF_RANGE, f"the last sample's timestamp {end} does not fit in int64")
        return SignalBatch(
            self.robot,
            self.time_ns,
            self.period_ns,
            values,
            self.cycle,
            self.cycle_end,
            self.seq,
            self.cycle_row,
        )


def _check_int(name: str, value: object, minimum: int) -> int:
    """``value`` as an int in [minimum, 2**63 - 1]; bool is not an int."""
    if type(value) is not int:
        raise MessageError(WRONG_TYPE, f"{name!r} must be an integer, got {_json_type(value)}")
    if not minimum <= value <= INT64_MAX:
        raise MessageError(OUT_OF_RANGE, f"{name!r} must be in [{minimum}, 2**63 - 1], got {value}")
    return value


def _check_missing(names: tuple[str, ...], present: Mapping[str, object]) -> None:
    missing = [n for n in names if n not in present]
    if missing:
        raise MessageError(
            MISSING_SIGNALS, f"missing signal{'s' if len(missing) > 1 else ''}: {_list(missing)}"
        )


def _check_rows(rows: int, max_rows: int) -> None:
    if rows == 0:
        raise MessageError(EMPTY, "the message has no rows")
    if rows > max_rows:
        raise MessageError(TOO_MANY_ROWS, f"message has {rows} rows, more than the limit of {max_rows}")


def _check_finite(values: np.ndarray, names: tuple[str, ...]) -> None:
    if np.isfinite(values).all():
        return
    row, col = (int(i) for i in np.argwhere(~np.isfinite(values))[0])
    if np.isnan(values[row, col]):
        raise MessageError(NAN, f"signal {_show(names[col])} row {row} is NaN")
    raise MessageError(INF, f"signal {_show(names[col])} row {row} is infinite or beyond the float32 range")


def _show(value: object, limit: int = 48) -> str:
    """A short, one-line quoted rendering of a name that came from a message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _list(names: Sequence[str], *, quote: bool = False) -> str:
    shown = [_show(n) if quote else n for n in names[:_SHOW_NAMES]]
    more = len(names) - len(shown)
    return ", ".join(shown) + (f" (and {more} more)" if more else "")


def _one_line(text: str, limit: int = 200) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


# -- encode ------------------------------------------------------------------------------------------


def _columns_for_encoding(batch: SignalBatch, signals: Sequence[str]) -> tuple[tuple[str, ...], np.ndarray]:
    names = _check_names(signals)
    if len(names) != batch.signals.shape[1]:
        raise ValueError(f"{len(names)} signal names for a batch of {batch.signals.shape[1]} columns")
    if not np.isfinite(batch.signals).all():
        raise ValueError("cannot encode NaN or infinite values: decode would reject the message")
    return names, np.ascontiguousarray(batch.signals.T)  # (S, rows): one contiguous row per signal


def encode_json(batch: SignalBatch, signals: Sequence[str]) -> bytes:
    """The batch as a compact JSON message; ``signals`` names the batch's columns in order.

    Values are written as the shortest text of their float64 value, which reads back to the same
    float32 exactly (the float32's own shortest text might not, through float64 double rounding).
    """
    names, columns = _columns_for_encoding(batch, signals)
    message: dict[str, object] = {
        "robot": batch.robot,
        "time_ns": batch.time_ns,
        "period_ns": batch.period_ns,
    }
    if batch.cycle is not None:
        message["cycle"] = batch.cycle
    message["cycle_end"] = batch.cycle_end
    if batch.seq is not None:
        message["seq"] = batch.seq
    if batch.cycle_row is not None:
        message["cycle_row"] = batch.cycle_row
    message["signals"] = dict(zip(names, columns.astype(np.float64).tolist(), strict=True))
    return json.dumps(message, separators=(",", ":"), allow_nan=False).encode("utf-8")


def encode_arrow(batch: SignalBatch, signals: Sequence[str]) -> bytes:
    """The batch as an uncompressed Arrow IPC stream of one float32 record batch."""
    names, columns = _columns_for_encoding(batch, signals)
    metadata = {
        b"robot": batch.robot.encode(),
        b"time_ns": str(batch.time_ns).encode(),
        b"period_ns": str(batch.period_ns).encode(),
        b"cycle_end": b"true" if batch.cycle_end else b"false",
    }
    if batch.cycle is not None:
        metadata[b"cycle"] = str(batch.cycle).encode()
    if batch.seq is not None:
        metadata[b"seq"] = str(batch.seq).encode()
    if batch.cycle_row is not None:
        metadata[b"cycle_row"] = str(batch.cycle_row).encode()
    schema = pa.schema([pa.field(n, pa.float32(), nullable=False) for n in names], metadata=metadata)
    record = pa.RecordBatch.from_arrays([pa.array(c) for c in columns], schema=schema)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema) as writer:
        writer.write_batch(record)
    return bytes(sink.getvalue().to_pybytes())


def batches_from_cycle(
    robot: str,
    signals: np.ndarray,
    *,
    start_ns: int,
    period_ns: int,
    cycle: int | None,
    rows_per_message: int,
    seq_start: int = 0,
) -> list[SignalBatch]:
    """Split one cycle's ``(rows, S)`` signals into consecutive batches of ``rows_per_message`` rows
    (the last may be shorter), numbered ``seq_start, seq_start + 1, ...``; the last has ``cycle_end``.
    With a ``cycle``, each batch's ``cycle_row`` is the index of its first row in the cycle."""
    if rows_per_message < 1:
        raise ValueError(f"rows_per_message must be at least 1, got {rows_per_message}")
    values = np.array(signals, dtype=np.float32, order="C", copy=True)
    if values.ndim != 2 or values.shape[0] == 0:
        raise ValueError(f"signals must be a (rows, signals) array with at least one row, got {values.shape}")
    starts = range(0, values.shape[0], rows_per_message)
    return [
        SignalBatch(
            robot=robot,
            time_ns=start_ns + first * period_ns,
            period_ns=period_ns,
            signals=values[first : first + rows_per_message],
            cycle=cycle,
            cycle_end=k == len(starts) - 1,
            seq=seq_start + k,
            cycle_row=first if cycle is not None else None,
        )
        for k, first in enumerate(starts)
    ]
