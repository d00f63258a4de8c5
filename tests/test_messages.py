"""Robot-signal messages (JSON and Arrow IPC): round trips, every rejection reason, batches_from_cycle."""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from ingest import messages
from ingest.errors import IngestError
from ingest.messages import (
    REASONS,
    MessageError,
    SignalBatch,
    batches_from_cycle,
    decode,
    encode_arrow,
    encode_json,
)
from ingest.voraus import schema

NAMES = schema.MACHINE_SIGNALS  # the 130 signals of the voraus-AD layout
ROWS = 5
T0 = 1_700_000_000_000_000_000
PERIOD = 10_000_000
ENCODERS = {"json": encode_json, "arrow": encode_arrow}


def values(rows: int = ROWS, cols: int = len(NAMES), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(scale=100.0, size=(rows, cols)).astype(np.float32)


def make_batch(**kw: Any) -> SignalBatch:
    fields: dict[str, Any] = {
        "robot": "cell-3.r_1",
        "time_ns": T0,
        "period_ns": PERIOD,
        "signals": values(),
        "cycle": 42,
        "cycle_end": True,
        "seq": 17,
        "cycle_row": 300,
    }
    fields.update(kw)
    return SignalBatch(**fields)


def json_obj(rows: int = ROWS, names: tuple[str, ...] = NAMES, **fields: Any) -> dict[str, Any]:
    """A valid JSON message as a dict; fields given as ``...=DROP`` are left out."""
    x = values(rows, len(names))
    obj: dict[str, Any] = {
        "robot": "r1",
        "time_ns": T0,
        "period_ns": PERIOD,
        "signals": {n: x[:, j].tolist() for j, n in enumerate(names)},
    }
    obj.update(fields)
    return {k: v for k, v in obj.items() if v is not DROP}


DROP: Any = object()


def dumps(obj: object) -> bytes:
    return json.dumps(obj).encode()


def with_signal(obj: dict[str, Any], name: str, column: Any) -> dict[str, Any]:
    obj["signals"][name] = column
    return obj


def arrow_payload(
    columns: dict[str, pa.Array] | None = None,
    metadata: dict[bytes, bytes] | None = None,
    *,
    batches: int = 1,
    compression: str | None = None,
) -> bytes:
    """An Arrow IPC stream written with pyarrow, as a producer would."""
    if columns is None:
        x = values()
        columns = {n: pa.array(x[:, j]) for j, n in enumerate(NAMES)}
    if metadata is None:
        metadata = {b"robot": b"r1", b"time_ns": str(T0).encode(), b"period_ns": str(PERIOD).encode()}
    record = pa.RecordBatch.from_arrays(list(columns.values()), names=list(columns))
    record = record.replace_schema_metadata(metadata)
    sink = pa.BufferOutputStream()
    options = pa.ipc.IpcWriteOptions(compression=compression)
    with pa.ipc.new_stream(sink, record.schema, options=options) as writer:
        for _ in range(batches):
            writer.write_batch(record)
    return bytes(sink.getvalue().to_pybytes())


def arrow_columns(**override: pa.Array) -> dict[str, pa.Array]:
    x = values()
    columns = {n: pa.array(x[:, j]) for j, n in enumerate(NAMES)}
    columns.update(override)
    return columns


def arrow_meta(**fields: bytes | None) -> dict[bytes, bytes]:
    meta: dict[str, bytes | None] = {"robot": b"r1", "time_ns": str(T0).encode(), "period_ns": b"10000000"}
    meta.update(fields)
    return {k.encode(): v for k, v in meta.items() if v is not None}


def reject(payload: bytes, **kw: Any) -> MessageError:
    with pytest.raises(MessageError) as info:
        decode(payload, NAMES, **kw)
    return info.value


# -- round trips -------------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ENCODERS)
def test_round_trip_reproduces_the_batch(encoding: str) -> None:
    batch = make_batch()
    decoded = decode(ENCODERS[encoding](batch, NAMES), NAMES)
    assert decoded == batch
    assert decoded.signals.dtype == np.float32
    assert decoded.signals.flags.c_contiguous
    assert decoded.signals.flags.writeable
    assert (decoded.rows, decoded.end_ns) == (ROWS, T0 + (ROWS - 1) * PERIOD)


@pytest.mark.parametrize("encoding", ENCODERS)
def test_columns_follow_the_requested_order_not_the_message_order(encoding: str) -> None:
    batch = make_batch()
    order = np.random.default_rng(1).permutation(len(NAMES))
    wanted = tuple(NAMES[i] for i in order)
    decoded = decode(ENCODERS[encoding](batch, NAMES), wanted)
    np.testing.assert_array_equal(decoded.signals, batch.signals[:, order])
    # a subset, in yet another order: the extra signals in the message are ignored
    subset = ("motor_iq_6", "robot_voltage", "target_position_2")
    decoded = decode(ENCODERS[encoding](batch, NAMES), subset)
    np.testing.assert_array_equal(decoded.signals, batch.signals[:, [NAMES.index(n) for n in subset]])


@pytest.mark.parametrize("encoding", ENCODERS)
def test_float32_values_round_trip_bit_for_bit(encoding: str) -> None:
    f32 = np.finfo(np.float32)
    special = [f32.max, -f32.max, f32.tiny, f32.smallest_subnormal, -0.0, 0.1, 1 / 3, 16777217.0, 1e-30]
    x = np.array([special, special[::-1]], dtype=np.float32)
    names = tuple(f"s{i}" for i in range(len(special)))
    batch = SignalBatch("r1", 0, 1, x)
    decoded = decode(ENCODERS[encoding](batch, names), names)
    np.testing.assert_array_equal(decoded.signals.view(np.uint32), x.view(np.uint32))


@pytest.mark.parametrize("encoding", ENCODERS)
def test_optional_fields_round_trip_when_absent(encoding: str) -> None:
    batch = make_batch(cycle=None, cycle_end=False, seq=None, cycle_row=None)
    assert decode(ENCODERS[encoding](batch, NAMES), NAMES) == batch


def test_json_field_order_and_whitespace_do_not_matter() -> None:
    batch = make_batch()
    obj = json.loads(encode_json(batch, NAMES))
    shuffled = {k: obj[k] for k in reversed(list(obj))}
    shuffled["signals"] = {n: obj["signals"][n] for n in reversed(NAMES)}
    pretty = json.dumps(shuffled, indent=2).encode()
    assert pretty.index(b'"signals"') < pretty.index(b'"robot"')
    assert decode(b"\n  \t" + pretty, NAMES) == batch


def test_json_accepts_integers_nulls_for_optional_fields_and_ignores_extra_signals() -> None:
    obj = json_obj(names=("a", "b"), cycle=None, seq=None, cycle_end=None, cycle_row=None)
    obj["signals"] = {"b": [1, 2.5], "a": [-3, 0], "unused": ["text", None, True]}
    batch = decode(dumps(obj), ("a", "b"))
    np.testing.assert_array_equal(batch.signals, np.array([[-3, 1], [0, 2.5]], dtype=np.float32))
    assert (batch.cycle, batch.cycle_end, batch.seq, batch.cycle_row) == (None, False, None, None)


def test_payload_may_be_bytearray_or_memoryview() -> None:
    payload = encode_arrow(make_batch(), NAMES)
    assert decode(bytearray(payload), NAMES) == decode(memoryview(payload), NAMES) == make_batch()


def test_arrow_accepts_integer_float64_and_float16_columns_and_pandas_metadata() -> None:
    frame = pd.DataFrame(
        {
            "a": np.array([1, 2, 3], dtype=np.int64),
            "b": np.array([0.5, 1.5, 2.5], dtype=np.float64),
            "c": np.array([2**64 - 1, 0, 7], dtype=np.uint64),
            "d": np.array([0.25, 8, -1], dtype=np.float16),
        }
    )
    record = pa.RecordBatch.from_pandas(frame, preserve_index=False)
    assert b"pandas" in record.schema.metadata
    record = record.replace_schema_metadata({**record.schema.metadata, **arrow_meta()})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, record.schema) as writer:
        writer.write_batch(record)
    payload = sink.getvalue().to_pybytes()
    expected = frame.to_numpy(dtype=np.float64).astype(np.float32)
    np.testing.assert_array_equal(decode(payload, ("a", "b", "c", "d"), robot="r1").signals, expected)
    np.testing.assert_array_equal(decode(payload, ("b", "a")).signals, expected[:, [1, 0]])
    np.testing.assert_array_equal(decode(payload, ("a",)).signals, expected[:, [0]])


def test_decode_rejects_unusable_signal_lists() -> None:
    payload = encode_json(make_batch(), NAMES)
    with pytest.raises(TypeError, match="single string"):
        decode(payload, "motor_iq_1")
    with pytest.raises(ValueError, match="at least one"):
        decode(payload, ())
    with pytest.raises(ValueError, match="repeated: motor_iq_1"):
        decode(payload, ("motor_iq_1", "robot_voltage", "motor_iq_1"))


# -- the robot: transport vs message ----------------------------------------------------------------


@pytest.mark.parametrize("encoding", ENCODERS)
def test_robot_comes_from_the_transport_when_the_message_has_none(encoding: str) -> None:
    if encoding == "json":
        payload = dumps(json_obj(robot=DROP))
    else:
        payload = arrow_payload(metadata=arrow_meta(robot=None))
    assert decode(payload, NAMES, robot="press_7").robot == "press_7"
    err = reject(payload)
    assert err.reason == "missing_field"
    assert "robot" in str(err)


@pytest.mark.parametrize("encoding", ENCODERS)
def test_robot_from_the_transport_must_match_the_message(encoding: str) -> None:
    payload = ENCODERS[encoding](make_batch(robot="r1"), NAMES)
    assert decode(payload, NAMES, robot="r1").robot == "r1"
    err = reject(payload, robot="r2")
    assert err.reason == "robot_mismatch"
    assert "'r1'" in str(err)
    assert "'r2'" in str(err)
    err = reject(payload, robot="r 2")
    assert err.reason == "bad_robot"
    assert "transport" in str(err)


# -- rejections ---------------------------------------------------------------------------------------


def two_batches() -> bytes:
    return arrow_payload(batches=2)


def no_batches() -> bytes:
    return arrow_payload(batches=0)


def truncated_arrow() -> bytes:
    payload = arrow_payload()
    return payload[: len(payload) // 2]


def corrupt_arrow_body() -> bytes:
    """A record batch whose declared row count needs more data than its buffers hold."""
    record = pa.RecordBatch.from_arrays([pa.array(np.ones(4, np.float32))], names=["motor_iq_1"])
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, record.schema.with_metadata(arrow_meta())) as writer:
        writer.write_batch(record.replace_schema_metadata(arrow_meta()))
    payload = bytearray(sink.getvalue().to_pybytes())
    # the record batch header stores `length` (rows) as int64 4; make it 1000
    at = payload.index((4).to_bytes(8, "little"), payload.index(b"\xff\xff\xff\xff", 8))
    payload[at : at + 8] = (1000).to_bytes(8, "little")
    return bytes(payload)


def duplicate_column() -> bytes:
    x = values()
    names = [*NAMES, "motor_iq_3"]
    record = pa.RecordBatch.from_arrays(
        [pa.array(x[:, j % len(NAMES)]) for j in range(len(names))], names=names
    )
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, record.schema.with_metadata(arrow_meta())) as writer:
        writer.write_batch(record)
    return bytes(sink.getvalue().to_pybytes())


def deeply_nested() -> bytes:
    return b'{"signals": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"


NOT_UTF8 = b'{"robot": "r\xff1"}'

# (id, payload, decode kwargs, reason, fragments that str(err) must contain)
CASES: list[tuple[str, Callable[[], bytes], dict[str, Any], str, list[str]]] = [
    ("too_large", lambda: encode_json(make_batch(), NAMES), {"max_bytes": 1000}, "too_large", ["1000"]),
    ("unknown_format", lambda: b"robot=r1;time=1", {}, "unknown_format", ["neither JSON", "72 6f 62"]),
    ("empty_payload", lambda: b"", {}, "unknown_format", ["empty message"]),
    ("bad_json", lambda: encode_json(make_batch(), NAMES)[:-10], {}, "bad_json", ["invalid JSON", "line 1"]),
    ("trailing_data", lambda: b'{"robot": "r1"} {}', {}, "bad_json", ["Extra data"]),
    ("not_utf8", lambda: NOT_UTF8, {}, "bad_json", ["UTF-8"]),
    ("nested", deeply_nested, {}, "bad_json", ["nested too deeply"]),
    ("bad_arrow_truncated", truncated_arrow, {}, "bad_arrow", ["invalid Arrow IPC stream"]),
    ("bad_arrow_two_batches", two_batches, {}, "bad_arrow", ["exactly one record batch, got 2"]),
    ("bad_arrow_no_batch", no_batches, {}, "bad_arrow", ["exactly one record batch, got 0"]),
    (
        "bad_arrow_garbage",
        lambda: b"\xff\xff\xff\xff" + b"\x10\x00\x00\x00" + b"\x00" * 40,
        {},
        "bad_arrow",
        [],
    ),
    ("bad_arrow_body", corrupt_arrow_body, {"robot": "r1"}, "bad_arrow", ["invalid Arrow IPC stream"]),
    (
        "bad_arrow_trailing",
        lambda: arrow_payload() + b"junk",
        {},
        "bad_arrow",
        ["4 bytes after the end-of-stream marker"],
    ),
    (
        "bad_arrow_zstd",
        lambda: arrow_payload(compression="zstd"),
        {},
        "bad_arrow",
        ["compressed Arrow bodies are not accepted"],
    ),
    (
        "bad_arrow_lz4",
        lambda: arrow_payload(compression="lz4"),
        {},
        "bad_arrow",
        ["compressed Arrow bodies are not accepted"],
    ),
    (
        "duplicate_top_level_key",
        lambda: dumps(json_obj())[:-1] + b', "time_ns": 5}',
        {},
        "duplicate_key",
        ["duplicate key 'time_ns'"],
    ),
    (
        "duplicate_signal",
        lambda: dumps(json_obj())[:-2] + b', "motor_iq_2": [1, 2, 3, 4, 5]}}',
        {},
        "duplicate_key",
        ["duplicate key 'motor_iq_2'"],
    ),
    ("duplicate_arrow_column", duplicate_column, {}, "duplicate_key", ["duplicate column: 'motor_iq_3'"]),
    ("bool_time_ns", lambda: dumps(json_obj(time_ns=True)), {}, "wrong_type", ["'time_ns'", "boolean true"]),
    ("bool_cycle", lambda: dumps(json_obj(cycle=False)), {}, "wrong_type", ["'cycle'", "boolean false"]),
    ("str_period", lambda: dumps(json_obj(period_ns="10")), {}, "wrong_type", ["'period_ns'", "string '10'"]),
    ("float_time_ns", lambda: dumps(json_obj(time_ns=1.5e18)), {}, "wrong_type", ["'time_ns'", "number"]),
    ("null_time_ns", lambda: dumps(json_obj(time_ns=None)), {}, "wrong_type", ["'time_ns'", "null"]),
    ("int_cycle_end", lambda: dumps(json_obj(cycle_end=1)), {}, "wrong_type", ["'cycle_end'", "number 1"]),
    ("robot_number", lambda: dumps(json_obj(robot=7)), {}, "wrong_type", ["'robot'", "number 7"]),
    ("signals_array", lambda: dumps(json_obj(signals=[[1.0]])), {}, "wrong_type", ["'signals'", "array"]),
    (
        "signal_not_array",
        lambda: dumps(with_signal(json_obj(), "motor_iq_4", 3.5)),
        {},
        "wrong_type",
        ["'motor_iq_4'", "number 3.5"],
    ),
    (
        "bool_in_signal",
        lambda: dumps(with_signal(json_obj(), "motor_iq_4", [1.0, 2.0, True, 4.0, 5.0])),
        {},
        "wrong_type",
        ["'motor_iq_4' row 2", "boolean true"],
    ),
    (
        "null_in_signal",
        lambda: dumps(with_signal(json_obj(), "joint_velocity_2", [1.0, None, 3.0, 4.0, 5.0])),
        {},
        "wrong_type",
        ["'joint_velocity_2' row 1", "null"],
    ),
    (
        "string_in_signal",
        lambda: dumps(with_signal(json_obj(), "robot_current", ["1.5", 2, 3, 4, 5])),
        {},
        "wrong_type",
        ["'robot_current' row 0", "string '1.5'"],
    ),
    (
        "arrow_string_column",
        lambda: arrow_payload(arrow_columns(motor_iq_5=pa.array(["1"] * ROWS))),
        {},
        "wrong_type",
        ["'motor_iq_5'", "string"],
    ),
    (
        "arrow_bool_column",
        lambda: arrow_payload(arrow_columns(motor_iq_5=pa.array([True] * ROWS))),
        {},
        "wrong_type",
        ["'motor_iq_5'", "bool"],
    ),
    (
        "arrow_nulls",
        lambda: arrow_payload(arrow_columns(motor_id_1=pa.array([1.0, None, None, 4.0, 5.0], pa.float32()))),
        {},
        "wrong_type",
        ["'motor_id_1'", "2 null values"],
    ),
    (
        "arrow_meta_not_int",
        lambda: arrow_payload(metadata=arrow_meta(time_ns=b"1.7e18")),
        {},
        "wrong_type",
        ["'time_ns'", "decimal integer", "'1.7e18'"],
    ),
    (
        "arrow_meta_cycle_end",
        lambda: arrow_payload(metadata=arrow_meta(cycle_end=b"1")),
        {},
        "wrong_type",
        ["'cycle_end'", "true or false"],
    ),
    ("missing_time", lambda: dumps(json_obj(time_ns=DROP)), {}, "missing_field", ["missing field: time_ns"]),
    (
        "missing_fields",
        lambda: dumps(json_obj(period_ns=DROP, signals=DROP)),
        {},
        "missing_field",
        ["missing fields: period_ns, signals"],
    ),
    (
        "arrow_missing_period",
        lambda: arrow_payload(metadata=arrow_meta(period_ns=None)),
        {},
        "missing_field",
        ["period_ns"],
    ),
    (
        "unknown_field",
        lambda: dumps(json_obj(timestamp=5, Robot="x")),
        {},
        "unknown_field",
        ["unknown fields: 'timestamp', 'Robot'"],
    ),
    (
        "arrow_unknown_key",
        lambda: arrow_payload(metadata=arrow_meta(sample=b"3")),
        {},
        "unknown_field",
        ["'sample'"],
    ),
    ("zero_period", lambda: dumps(json_obj(period_ns=0)), {}, "out_of_range", ["'period_ns'", "got 0"]),
    ("negative_time", lambda: dumps(json_obj(time_ns=-1)), {}, "out_of_range", ["'time_ns'", "got -1"]),
    ("negative_seq", lambda: dumps(json_obj(seq=-4)), {}, "out_of_range", ["'seq'", "got -4"]),
    ("huge_cycle", lambda: dumps(json_obj(cycle=2**63)), {}, "out_of_range", ["'cycle'"]),
    (
        "end_beyond_int64",
        lambda: dumps(json_obj(time_ns=2**63 - 2 * PERIOD)),
        {},
        "out_of_range",
        ["last sample", "int64"],
    ),
    (
        "arrow_negative_cycle_row",
        lambda: arrow_payload(metadata=arrow_meta(cycle_row=b"-1")),
        {},
        "out_of_range",
        ["'cycle_row'"],
    ),
    ("robot_space", lambda: dumps(json_obj(robot="robot 1")), {}, "bad_robot", ["'robot 1'"]),
    ("robot_empty", lambda: dumps(json_obj(robot="")), {}, "bad_robot", ["''"]),
    ("robot_slash", lambda: dumps(json_obj(robot="cell/r1")), {}, "bad_robot", ["'cell/r1'"]),
    ("robot_too_long", lambda: dumps(json_obj(robot="r" * 65)), {}, "bad_robot", ["64 characters"]),
    ("robot_mismatch", lambda: dumps(json_obj(robot="r1")), {"robot": "r2"}, "robot_mismatch", ["'r2'"]),
    (
        "missing_signals",
        lambda: dumps(json_obj(names=NAMES[:-7])),
        {},
        "missing_signals",
        [f"missing signals: {', '.join(NAMES[-7:-2])} (and 2 more)"],
    ),
    (
        "missing_one_signal",
        lambda: arrow_payload({n: c for n, c in arrow_columns().items() if n != "motor_iq_3"}),
        {},
        "missing_signals",
        ["missing signal: motor_iq_3"],
    ),
    (
        "ragged",
        lambda: dumps(with_signal(json_obj(), "motor_voltage_6", [1.0, 2.0])),
        {},
        "ragged",
        ["'motor_voltage_6' has 2", f"has {ROWS}"],
    ),
    ("empty", lambda: dumps(json_obj(rows=0)), {}, "empty", ["no rows"]),
    (
        "arrow_empty",
        lambda: arrow_payload(arrow_columns(**{n: pa.array([], pa.float32()) for n in NAMES})),
        {},
        "empty",
        ["no rows"],
    ),
    ("too_many_rows", lambda: dumps(json_obj()), {"max_rows": 4}, "too_many_rows", ["5 rows", "limit of 4"]),
    ("arrow_too_many_rows", lambda: arrow_payload(), {"max_rows": 4}, "too_many_rows", ["5 rows"]),
    (
        "json_nan",
        lambda: dumps(with_signal(json_obj(), "motor_iq_1", [1.0, 2.0, 3.0, math.nan, 5.0])),
        {},
        "nan",
        ["'motor_iq_1' row 3 is NaN"],
    ),
    ("json_nan_time", lambda: dumps(json_obj(time_ns=math.nan)), {}, "nan", ["'time_ns' is NaN"]),
    (
        "arrow_nan",
        lambda: arrow_payload(arrow_columns(motor_iq_2=pa.array([1.0, 2.0, 3.0, 4.0, math.nan]))),
        {},
        "nan",
        ["'motor_iq_2' row 4 is NaN"],
    ),
    (
        "json_infinity",
        lambda: dumps(with_signal(json_obj(), "motor_iq_1", [1.0, -math.inf, 3.0, 4.0, 5.0])),
        {},
        "inf",
        ["'motor_iq_1' row 1 is -Infinity"],
    ),
    (
        "json_beyond_float64",
        lambda: dumps(json_obj(names=NAMES[:-1])).replace(
            b"}}", b', "' + NAMES[-1].encode() + b'": [1, 2, 3, 4, 1e400]}}'
        ),
        {},
        "inf",
        [f"'{NAMES[-1]}' row 4 is infinite or beyond the float32 range"],
    ),
    (
        "json_beyond_float32",
        lambda: dumps(with_signal(json_obj(), "motor_iq_1", [1.0, 2.0, 1e39, 4.0, 5.0])),
        {},
        "inf",
        ["'motor_iq_1' row 2", "float32 range"],
    ),
    (
        "json_huge_integer",
        lambda: dumps(with_signal(json_obj(), "motor_iq_1", [1, 2, 3, 4, 10**400])),
        {},
        "inf",
        ["'motor_iq_1' row 4", "too large"],
    ),
    (
        "arrow_inf",
        lambda: arrow_payload(arrow_columns(brake_voltage_3=pa.array([1.0, 2.0, math.inf, 4.0, 5.0]))),
        {},
        "inf",
        ["'brake_voltage_3' row 2"],
    ),
    (
        "arrow_beyond_float32",
        lambda: arrow_payload(arrow_columns(brake_voltage_3=pa.array([1e39, 2.0, 3.0, 4.0, 5.0]))),
        {},
        "inf",
        ["'brake_voltage_3' row 0", "float32 range"],
    ),
]


@pytest.mark.parametrize(
    ("payload", "kw", "reason", "fragments"),
    [pytest.param(*case[1:], id=case[0]) for case in CASES],
)
def test_bad_message_is_rejected_with_reason_and_text(
    payload: Callable[[], bytes], kw: dict[str, Any], reason: str, fragments: list[str]
) -> None:
    err = reject(payload(), **kw)
    assert err.reason == reason, str(err)
    text = str(err)
    for fragment in fragments:
        assert fragment in text
    assert "\n" not in text
    assert len(text) < 400
    assert isinstance(err, IngestError)


def test_every_reason_is_exercised() -> None:
    assert {case[3] for case in CASES} == set(REASONS)


def test_size_is_checked_before_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_parsing(*args: object, **kw: object) -> None:
        raise AssertionError("parsed a payload that is too large")

    monkeypatch.setattr(messages, "_decode_json", no_parsing)
    monkeypatch.setattr(messages, "_decode_arrow", no_parsing)
    big = values(rows=2000)
    for encode in ENCODERS.values():
        payload = encode(make_batch(signals=big), NAMES)
        err = reject(payload, max_bytes=len(payload) - 1)
        assert err.reason == "too_large"
        assert str(len(payload)) in str(err)
    garbage = b"{" + b"[" * (4 * 2**20)
    assert reject(garbage).reason == "too_large"  # the default limit is 4 MiB


def test_compression_bomb_is_rejected_before_inflating(monkeypatch: pytest.MonkeyPatch) -> None:
    """40 MB of zeros compress to a few kB: they must be refused before pyarrow inflates them."""

    def no_reading(*args: object, **kw: object) -> None:
        raise AssertionError("pyarrow read a compressed stream")

    record = pa.RecordBatch.from_arrays([pa.array(np.zeros(10_000_000, np.float32))], names=["motor_iq_1"])
    record = record.replace_schema_metadata(arrow_meta())
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, record.schema, options=pa.ipc.IpcWriteOptions(compression="zstd")) as w:
        w.write_batch(record)
    payload = sink.getvalue().to_pybytes()
    del record
    assert len(payload) < 20_000
    monkeypatch.setattr(messages.pa.ipc, "open_stream", no_reading)
    err = reject(payload, max_rows=10**9)
    assert err.reason == "bad_arrow"
    assert "compressed" in str(err)


def test_row_limit_is_checked_before_arrow_reads_the_body(monkeypatch: pytest.MonkeyPatch) -> None:
    payload = arrow_payload()
    monkeypatch.setattr(messages.pa.ipc, "open_stream", lambda *a, **k: pytest.fail("read the body"))
    assert reject(payload, max_rows=ROWS - 1).reason == "too_many_rows"


@pytest.mark.parametrize("encoding", ENCODERS)
def test_corrupted_messages_raise_only_message_error(encoding: str) -> None:
    """Random byte changes anywhere: each message decodes or is rejected with a reason, nothing else."""
    rng = np.random.default_rng(11)
    names = NAMES[:8]
    payload = ENCODERS[encoding](make_batch(signals=values(cols=len(names))), names)
    reasons = set()
    for _ in range(400):
        corrupt = bytearray(payload)
        for at in rng.integers(0, len(corrupt), size=int(rng.integers(1, 4))):
            corrupt[at] = int(rng.integers(0, 256))
        cut = len(corrupt) if rng.random() < 0.8 else int(rng.integers(0, len(corrupt)))
        try:
            decode(bytes(corrupt[:cut]), names)
        except MessageError as err:
            reasons.add(err.reason)
    assert reasons <= set(REASONS)
    assert len(reasons) >= 3


def test_nan_in_an_ignored_signal_is_ignored() -> None:
    obj = with_signal(json_obj(), "not_a_model_signal", [math.nan, "x"])
    assert decode(dumps(obj), NAMES).rows == ROWS


# -- SignalBatch and the encoders ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"signals": values().astype(np.float64)}, "float32"),
        ({"signals": values()[0]}, "2-D"),
        ({"signals": values()[:0]}, "at least one row"),
        ({"robot": "r/1"}, "robot"),
        ({"time_ns": True}, "time_ns"),
        ({"period_ns": 0}, "period_ns"),
        ({"cycle": -1}, "cycle"),
        ({"seq": 1.0}, "seq"),
        ({"cycle_row": -2}, "cycle_row"),
        ({"cycle_end": 1}, "cycle_end"),
        ({"time_ns": 2**63 - 1}, "int64"),
    ],
)
def test_signal_batch_refuses_invalid_fields(kw: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_batch(**kw)


def test_signal_batch_equality() -> None:
    a = make_batch()
    assert a == make_batch()
    assert a != make_batch(seq=18)
    assert a != make_batch(signals=a.signals + 1)
    assert a != make_batch(signals=a.signals[:-1])
    assert a != "not a batch"


@pytest.mark.parametrize("encode", ENCODERS.values())
def test_encoders_refuse_what_decode_would_reject(
    encode: Callable[[SignalBatch, tuple[str, ...]], bytes],
) -> None:
    bad = values()
    bad[2, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        encode(make_batch(signals=bad), NAMES)
    with pytest.raises(ValueError, match="129 signal names for a batch of 130 columns"):
        encode(make_batch(), NAMES[:-1])


# -- batches_from_cycle -------------------------------------------------------------------------------


@pytest.mark.parametrize(("rows", "per_message"), [(1000, 64), (1024, 64), (7, 100), (1, 1), (5, 1)])
def test_batches_from_cycle_cover_every_row_once_in_order(rows: int, per_message: int) -> None:
    cycle_values = np.random.default_rng(3).normal(size=(rows, len(NAMES)))  # float64, as the reader gives
    batches = batches_from_cycle(
        "r1", cycle_values, start_ns=T0, period_ns=PERIOD, cycle=9, rows_per_message=per_message, seq_start=40
    )
    assert len(batches) == math.ceil(rows / per_message)
    np.testing.assert_array_equal(
        np.concatenate([b.signals for b in batches]), cycle_values.astype(np.float32)
    )
    assert all(b.rows == per_message for b in batches[:-1])
    assert [b.seq for b in batches] == list(range(40, 40 + len(batches)))
    assert [b.cycle_end for b in batches] == [False] * (len(batches) - 1) + [True]
    assert [b.cycle_row for b in batches] == list(range(0, rows, per_message))
    assert {b.cycle for b in batches} == {9}
    assert batches[0].time_ns == T0
    assert batches[-1].end_ns == T0 + (rows - 1) * PERIOD
    for prev, nxt in itertools.pairwise(batches):
        assert nxt.time_ns == prev.end_ns + PERIOD
    for batch in batches[:3] + batches[-1:]:
        for encode in ENCODERS.values():
            assert decode(encode(batch, NAMES), NAMES) == batch


def test_batches_from_cycle_do_not_alias_the_input() -> None:
    cycle_values = values(rows=10)
    batches = batches_from_cycle("r1", cycle_values, start_ns=0, period_ns=1, cycle=None, rows_per_message=4)
    before = batches[0].signals.copy()
    cycle_values[:] = 0
    np.testing.assert_array_equal(batches[0].signals, before)
    assert {b.cycle for b in batches} == {None}
    assert {b.cycle_row for b in batches} == {None}


def test_batches_from_cycle_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="rows_per_message"):
        batches_from_cycle("r1", values(), start_ns=0, period_ns=1, cycle=1, rows_per_message=0)
    with pytest.raises(ValueError, match="at least one row"):
        batches_from_cycle("r1", values()[:0], start_ns=0, period_ns=1, cycle=1, rows_per_message=10)
