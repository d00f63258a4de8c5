"""EtherCAT process maps (YAML and ENI) and the signals they read off decoded frames: what a user gets is
each named signal in SI units per bus cycle, exactly as the bytes on the wire say, or a start-up error
that names the entry and the field at fault."""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
import pytest

from ingest.errors import IngestError
from ingest.ethercat.mapping import (
    ENI_TYPES,
    MAX_YAML_BYTES,
    TYPES,
    MapError,
    ProcessMap,
    Signal,
    SignalExtractor,
    check_coverage,
    load_eni,
    load_yaml_map,
)
from ingest.ethercat.types import DatagramColumns, DatagramKey, FrameBatch

DATA = Path(__file__).parent / "data" / "ethercat"
LRD, LWR, LRW, BRD = 10, 11, 12, 7

STRUCT = {
    "int8": "<b",
    "int16": "<h",
    "int32": "<i",
    "int64": "<q",
    "uint8": "<B",
    "uint16": "<H",
    "uint32": "<I",
    "uint64": "<Q",
    "float32": "<f",
    "float64": "<d",
}


def dgram(
    key: DatagramKey,
    frames: list[int],
    rows: list[bytes] | np.ndarray,
    wkc: int | list[int] = 1,
    stale: list[bool] | None = None,
) -> DatagramColumns:
    data = (
        np.array(rows, dtype=np.uint8)
        if isinstance(rows, np.ndarray)
        else np.frombuffer(b"".join(rows), np.uint8)
    )
    cols = DatagramColumns(
        key=key,
        frame=np.array(frames, dtype=np.int64),
        data=data.reshape(len(frames), key.length),
        wkc=np.broadcast_to(np.array(wkc, dtype=np.uint16), (len(frames),)).copy(),
    )
    if stale is not None:
        setattr(cols, "stale", np.array(stale, dtype=bool))  # noqa: B010  # a field only once frames.py adds it
    return cols


def batch(ts: list[int], *cols: DatagramColumns) -> FrameBatch:
    return FrameBatch(ts_ns=np.array(ts, dtype=np.int64), datagrams={c.key: c for c in cols})


def write_map(tmp_path: Path, text: str, name: str = "map.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------------- loading


def test_yaml_map_loads_the_issue_format() -> None:
    """The issue's YAML format loads: names, logical addresses, types, bits, scales, the robot and the
    counter that numbers process cycles."""
    pmap = load_yaml_map(DATA / "address_map.yaml")
    assert pmap.names == (
        "motor_position_1",
        "motor_current_1",
        "cycle_count",
        "brake_released",
        "mode",
        "target_position_1",
    )
    assert pmap.robot == "robot-2"
    assert pmap.cycle_signal == "cycle_count"
    pos = pmap.signal("motor_position_1")
    assert (pos.address, pos.dtype, pos.scale, pos.command, pos.length) == (0x1000, "int32", 1e-6, None, None)
    brake = pmap.signal("brake_released")
    assert (brake.dtype, brake.bit, brake.width) == ("bool", 3, 1)
    mode = pmap.signal("mode")
    assert (mode.dtype, mode.bit, mode.bits) == ("uint8", 4, 3)
    assert pmap.signal("target_position_1").command == LWR
    assert pmap.signal("target_position_1").address == 0x2000
    assert pmap.commands == ()
    assert pmap.expected_wkc == {}


def test_eni_loads_variables_datagrams_and_expected_working_counters() -> None:
    """An ENI in TwinCAT's layout gives every variable on the wire, where it lies in its datagram, and the
    expected working counter of each cyclic datagram; what cannot be read off a captured frame is listed
    with the reason instead of failing the load."""
    pmap = load_eni(DATA / "two_slaves_lrw.xml")
    lrw = DatagramKey(LRW, 0x01000000, 36)
    assert pmap.expected_wkc == {lrw: 6, DatagramKey(BRD, 304 << 16, 2): 2}
    assert pmap.commands[0].key == DatagramKey(LRD, 0x09000000, 1)
    assert pmap.names == (
        "Drive1.Inputs.Status word",
        "Drive1.Inputs.Position actual value",
        "Drive1.Inputs.Velocity actual value",
        "Drive1.Inputs.Torque actual value",
        "Io1.Inputs.Counter",
        "Io1.Inputs.Analog",
        "Io1.Inputs.Temperature",
        "Io1.Channel 1.Input",
        "Io1.Channel 2.Input",
        "Io1.Channel 3.Input",
        "Io1.Channel 4.Input",
        "Io1.Status.Mode",
        "Io1.Inputs.Offset",
        "Io1.Channel 1.Output",
        "Io1.Channel 2.Output",
        "Io1.Outputs.Setpoint",
    )
    pos = pmap.signal("Drive1.Inputs.Position actual value")
    assert (pos.key, pos.byte, pos.bit, pos.dtype) == (lrw, 2, 0, "int32")
    mode = pmap.signal("Io1.Status.Mode")
    assert (mode.byte, mode.bit, mode.bits, mode.dtype) == (22, 4, 2, "uint8")
    ch3 = pmap.signal("Io1.Channel 3.Input")
    assert (ch3.byte, ch3.bit, ch3.dtype) == (22, 2, "bool")
    assert pmap.signal("Io1.Outputs.Setpoint").byte == 26
    skipped = dict(s.split(": ", 1) for s in pmap.skipped)
    assert set(skipped) == {
        "Io1.Inputs.Raw",
        "Inputs.Frm0State",
        "Inputs.Frm0WcState",
        "Drive1.WcState.WcState",
        "Io1.WcState.WcState",
        "Drive1.Outputs.Control word",
        "Drive1.Outputs.Target position",
        "Outputs.Frm0Ctrl",
    }
    assert "not decoded" in skipped["Io1.Inputs.Raw"]
    assert "not on the wire" in skipped["Inputs.Frm0WcState"]
    assert "Drive1.Inputs.Status word" in skipped["Drive1.Outputs.Control word"]
    assert pmap.warnings == ()
    check_coverage(pmap, [c.key for c in pmap.commands])


def test_yaml_map_names_eni_variables_renamed_and_scaled() -> None:
    """A YAML map may pick ENI variables by name and give them the names and SI scales the models use."""
    pmap = load_yaml_map(DATA / "cell_map.yaml")
    assert pmap.names == (
        "motor_position_1",
        "motor_velocity_1",
        "motor_torque_1",
        "cycle",
        "gripper_closed",
        "setpoint",
    )
    torque = pmap.signal("motor_torque_1")
    assert (torque.variable, torque.scale, torque.offset) == ("Drive1.Inputs.Torque actual value", 0.01, -0.5)
    assert (torque.key, torque.byte) == (DatagramKey(LRW, 0x01000000, 36), 10)
    assert (pmap.cycle_signal, pmap.robot) == ("cycle", "robot-1")
    assert pmap.expected_wkc[DatagramKey(LRW, 0x01000000, 36)] == 6


def test_yaml_map_with_only_an_eni_maps_all_its_variables(tmp_path: Path) -> None:
    """`eni:` without `signals:` maps every variable of the ENI on the wire under its own name."""
    (tmp_path / "bus.xml").write_bytes((DATA / "two_slaves_lrw.xml").read_bytes())
    pmap = load_yaml_map(write_map(tmp_path, "eni: bus.xml\nrobot: r1\ncycle_signal: Io1.Inputs.Counter\n"))
    assert pmap.names == load_eni(DATA / "two_slaves_lrw.xml").names
    assert pmap.robot == "r1"
    assert any(s.startswith("Inputs.Frm0WcState: ") for s in pmap.skipped)


# ------------------------------------------------------------------------------------------ decoding

EXTREMES: dict[str, list[float | int]] = {
    "int8": [-128, -1, 0, 1, 127],
    "int16": [-32768, -1, 0, 1, 32767],
    "int32": [-(2**31), -1, 0, 1, 2**31 - 1],
    "int64": [-(2**63), -(2**53) - 1, -1, 0, 1, 2**53 + 1, 2**63 - 1],
    "uint8": [0, 1, 127, 128, 255],
    "uint16": [0, 1, 32768, 65535],
    "uint32": [0, 1, 2**31, 2**32 - 1],
    "uint64": [0, 1, 2**63, 2**64 - 1],
    "float32": [
        0.0,
        -0.0,
        1.5,
        -2.25,
        3.4028234663852886e38,
        -1.401298464324817e-45,
        math.inf,
        -math.inf,
        math.nan,
    ],
    "float64": [0.0, -0.0, math.pi, -1e-300, 1.7976931348623157e308, 5e-324, -math.inf, math.nan],
}


@pytest.mark.parametrize("dtype", sorted(STRUCT))
def test_every_type_decodes_as_struct_unpack_reads_the_bytes(tmp_path: Path, dtype: str) -> None:
    """Each type reads as Python's struct module reads the same little-endian bytes: both signs, the
    extremes, random bytes (NaN and infinities included for floats)."""
    fmt = STRUCT[dtype]
    size = struct.calcsize(fmt)
    pmap = load_yaml_map(
        write_map(
            tmp_path,
            f"signals:\n  - {{name: a, address: 0x103, type: {dtype}}}\n"
            f"  - {{name: b, address: 0x110, type: {dtype}, scale: 2, offset: 1}}\n",
        )
    )
    rng = np.random.default_rng(size)
    rows = [bytearray(rng.integers(0, 256, 32, dtype=np.uint8).tobytes()) for _ in range(200)]
    for i, value in enumerate(EXTREMES[dtype]):
        struct.pack_into(fmt, rows[i], 3, value)
        struct.pack_into(fmt, rows[-1 - i], 16, value)
    key = DatagramKey(LRD, 0x100, 32)
    got = SignalExtractor(pmap).extract(
        batch(list(range(200)), dgram(key, list(range(200)), [bytes(r) for r in rows]))
    )
    a = [float(struct.unpack_from(fmt, r, 3)[0]) for r in rows]
    b = [float(struct.unpack_from(fmt, r, 16)[0]) * 2 + 1 for r in rows]
    np.testing.assert_array_equal(got.column("a"), a)
    np.testing.assert_array_equal(got.column("b"), b)
    assert list(np.signbit(got.column("a"))) == [math.copysign(1, x) < 0 for x in a]
    np.testing.assert_array_equal(got.ts_ns, np.arange(200))


def test_all_types_in_one_datagram_decode_together(tmp_path: Path) -> None:
    """A map mixing every type, bits and bit fields in one datagram decodes each as it decodes alone."""
    lines, layout, at = ["signals:"], [], 0
    for dtype in sorted(STRUCT):
        lines.append(f"  - {{name: {dtype}, address: {0x4000 + at}, type: {dtype}, scale: 0.5}}")
        layout.append((dtype, at))
        at += struct.calcsize(STRUCT[dtype]) + 1  # odd offsets: unaligned in memory
    for b in range(8):
        lines.append(f"  - {{name: bit{b}, address: {0x4000 + at}, type: bool, bit: {b}}}")
    lines.append(f"  - {{name: nib, address: {0x4000 + at + 1}, type: uint8, bit: 1, bits: 4}}")
    lines.append(f"  - {{name: snib, address: {0x4000 + at + 1}, type: int8, bit: 5, bits: 3}}")
    lines.append(f"  - {{name: u10, address: {0x4000 + at + 2}, type: uint16, bit: 3, bits: 10}}")
    lines.append(f"  - {{name: s20, address: {0x4000 + at + 4}, type: int32, bit: 7, bits: 20}}")
    pmap = load_yaml_map(write_map(tmp_path, "\n".join(lines) + "\n"))
    length = at + 8
    rng = np.random.default_rng(7)
    data = rng.integers(0, 256, (500, length), dtype=np.uint8)
    got = SignalExtractor(pmap).extract(
        batch(list(range(500)), dgram(DatagramKey(LRW, 0x4000, length), list(range(500)), data))
    )
    for dtype, off in layout:
        want = [float(struct.unpack_from(STRUCT[dtype], r.tobytes(), off)[0]) * 0.5 for r in data]
        np.testing.assert_array_equal(got.column(dtype), want, err_msg=dtype)

    def field(r: np.ndarray, byte: int, bit: int, bits: int, signed: bool) -> float:
        v = int.from_bytes(r[at + byte : at + byte + 8].tobytes(), "little") >> bit & ((1 << bits) - 1)
        return float(v - (1 << bits) if signed and v >> (bits - 1) else v)

    for b in range(8):
        np.testing.assert_array_equal(got.column(f"bit{b}"), [field(r, 0, b, 1, False) for r in data])
    np.testing.assert_array_equal(got.column("nib"), [field(r, 1, 1, 4, False) for r in data])
    np.testing.assert_array_equal(got.column("snib"), [field(r, 1, 5, 3, True) for r in data])
    np.testing.assert_array_equal(got.column("u10"), [field(r, 2, 3, 10, False) for r in data])
    np.testing.assert_array_equal(got.column("s20"), [field(r, 4, 7, 20, True) for r in data])
    assert set(np.unique(got.column("snib"))) == {-4, -3, -2, -1, 0, 1, 2, 3}


def test_values_off_byte_boundaries_decode_like_the_bits_on_the_wire() -> None:
    """ENI variables may start inside a byte (a DINT at bit 3, a REAL at bit 5): shifted and masked."""
    key = DatagramKey(LRD, 0x0, 24)
    pmap = ProcessMap(
        signals=(
            Signal("i16", "int16", 0, byte=1, bit=3, command=LRD, length=24, variable="i16"),
            Signal("i32", "int32", 0, byte=4, bit=3, command=LRD, length=24, variable="i32"),
            Signal("f32", "float32", 0, byte=9, bit=5, command=LRD, length=24, variable="f32"),
            Signal("u64", "uint64", 0, byte=15, bit=0, command=LRD, length=24, variable="u64"),
        )
    )
    rng = np.random.default_rng(3)
    data = rng.integers(0, 256, (300, 24), dtype=np.uint8)
    got = SignalExtractor(pmap).extract(batch(list(range(300)), dgram(key, list(range(300)), data)))

    def bits(r: np.ndarray, byte: int, bit: int, n: int) -> int:
        return int.from_bytes(r[byte:].tobytes(), "little") >> bit & ((1 << n) - 1)

    def signed(v: int, n: int) -> int:
        return v - (1 << n) if v >> (n - 1) else v

    np.testing.assert_array_equal(got.column("i16"), [signed(bits(r, 1, 3, 16), 16) for r in data])
    np.testing.assert_array_equal(got.column("i32"), [signed(bits(r, 4, 3, 32), 32) for r in data])
    f32 = [struct.unpack("<f", bits(r, 9, 5, 32).to_bytes(4, "little"))[0] for r in data]
    np.testing.assert_array_equal(got.column("f32"), f32)
    np.testing.assert_array_equal(got.column("u64"), [float(bits(r, 15, 0, 64)) for r in data])


# -------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("entry", "field", "expect"),
    [
        ("{name: a, address: 0x10, type: int24}", "type", "unknown type 'int24'"),
        ("{name: a, address: 0x10, type: int32, bit: 1}", "bit", "out of range 0..0 for int32"),
        ("{name: a, address: 0x10, type: bool, bit: 8}", "bit", "out of range 0..7"),
        ("{name: a, address: 0x10, type: uint8, bit: 6, bits: 3}", "bit", "out of range 0..5"),
        ("{name: a, address: 0x10, type: uint8, bits: 9}", "bits", "out of range 1..8"),
        ("{name: a, address: 0x10, type: float32, bits: 4}", "bits", "integer type"),
        ("{name: a, address: 0x10, type: int32, scale: .inf}", "scale", "finite"),
        ("{name: a, address: 0x10, type: int32, scale: .nan}", "scale", "finite"),
        ("{name: a, address: 0x10, type: int32, offset: -.inf}", "offset", "finite"),
        ("{name: a, address: 0x10, type: int32, scale: fast}", "scale", "number"),
        ("{name: a, address: 0x10, type: int32, scael: 2}", "scael", "unknown field"),
        ("{name: a, type: int32}", "address", "missing"),
        ("{name: a, address: 0xffffffff, type: int32}", "address", "32-bit"),
        ("{name: a, address: 0x10, type: int32, command: BRD}", "command", "LRD, LWR or LRW"),
        ("{name: a, variable: X.Y}", "variable", "eni"),
    ],
)
def test_bad_signal_entries_fail_at_load_naming_entry_and_field(
    tmp_path: Path, entry: str, field: str, expect: str
) -> None:
    """A mistyped map fails at start-up with the entry and the field in the message."""
    path = write_map(tmp_path, f"signals:\n  - {{name: ok, address: 0x0, type: uint8}}\n  - {entry}\n")
    with pytest.raises(MapError) as err:
        load_yaml_map(path)
    assert isinstance(err.value, IngestError)
    assert err.value.field == field
    for part in (str(path), "signals[1]", f": {field}: ", expect):
        assert part in str(err.value)


@pytest.mark.parametrize(
    ("text", "field", "expect"),
    [
        (
            "signals:\n  - {name: a, address: 0x10, type: int32}\n  - {name: a, address: 0x20, type: int8}\n",
            "name",
            "'a': name: mapped twice",
        ),
        (
            "signals:\n  - {name: a, address: 0x10, type: int32}\n"
            "  - {name: b, address: 0x13, type: int16}\n",
            "address",
            "'b' overlaps 'a'",
        ),
        (
            "signals:\n  - {name: a, address: 0x10, type: bool, bit: 2}\n"
            "  - {name: b, address: 0x10, type: uint8, bit: 1, bits: 2}\n",
            "address",
            "'b' overlaps 'a'",
        ),
        (
            "cycle_signal: c\nsignals:\n  - {name: a, address: 0x10, type: int32}\n",
            "cycle_signal",
            "not a mapped signal",
        ),
        (
            "cycle_signal: a\nsignals:\n  - {name: a, address: 0x10, type: float32}\n",
            "cycle_signal",
            "integer counter",
        ),
        ("signals: []\n", "signals", "non-empty"),
    ],
)
def test_map_level_errors_name_the_entry(tmp_path: Path, text: str, field: str, expect: str) -> None:
    """Duplicate names, overlapping bits and a cycle counter that is not a mapped integer fail at load."""
    with pytest.raises(MapError) as err:
        load_yaml_map(write_map(tmp_path, text))
    assert err.value.field == field
    assert expect in str(err.value)


def test_bits_in_different_datagrams_do_not_overlap(tmp_path: Path) -> None:
    """The same logical address under an LRD and an LWR is two datagrams, not an overlap."""
    pmap = load_yaml_map(
        write_map(
            tmp_path,
            "signals:\n  - {name: a, address: 0x10, type: int32, command: LRD}\n"
            "  - {name: b, address: 0x10, type: int32, command: LWR}\n",
        )
    )
    assert pmap.names == ("a", "b")


def test_unreadable_maps_fail_naming_the_file(tmp_path: Path) -> None:
    """Not YAML, too large, not a mapping, an unknown top-level key, an ENI variable not on the wire."""
    cases = {
        "bad.yaml": ("signals: [unclosed\n", "not valid YAML"),
        "list.yaml": ("- a\n- b\n", "must be a mapping"),
        "top.yaml": ("signal: []\n", "signal: unknown field"),
        "big.yaml": ("#" * (MAX_YAML_BYTES + 1), "larger than"),
        "int.yaml": ("signals: !!int x\n", "not valid YAML"),
    }
    for name, (text, expect) in cases.items():
        path = write_map(tmp_path, text, name)
        with pytest.raises(MapError, match=expect) as err:
            load_yaml_map(path)
        assert str(path) in str(err.value)
    with pytest.raises(MapError, match="cannot read map"):
        load_yaml_map(tmp_path / "missing.yaml")
    (tmp_path / "bus.xml").write_bytes((DATA / "two_slaves_lrw.xml").read_bytes())
    for variable, expect in [
        ("Inputs.Frm0WcState", "not on the wire"),
        ("Drive1.Outputs.Control word", "returned frame holds the input"),
        ("Io1.Inputs.Raw", "not decoded"),
        ("Nope", "no such variable"),
    ]:
        path = write_map(tmp_path, f'eni: bus.xml\nsignals:\n  - {{name: x, variable: "{variable}"}}\n')
        with pytest.raises(MapError, match=expect) as err:
            load_yaml_map(path)
        assert (err.value.field, err.value.entry) == ("variable", "x")


def test_bad_eni_files_fail_naming_the_file(tmp_path: Path) -> None:
    """An ENI that is not XML, holds entities, has no cyclic commands or a broken number fails at load."""
    eni = (DATA / "two_slaves_lrw.xml").read_text()
    cases = {
        "notxml.xml": ("<EtherCATConfig><Config>", "not valid XML"),
        "bomb.xml": ('<!DOCTYPE x [<!ENTITY a "aaaa">]><EtherCATConfig>&a;</EtherCATConfig>', "refused XML"),
        "nocyclic.xml": ("<EtherCATConfig><Config></Config></EtherCATConfig>", "no Config/Cyclic"),
        "noconfig.xml": ("<Other/>", "no Config element"),
        "badnum.xml": (
            eni.replace("<BitOffs>328</BitOffs>", "<BitOffs>3x8</BitOffs>"),
            "BitOffs: must be an integer",
        ),
        "dup.xml": (
            eni.replace("Drive1.Inputs.Torque actual value", "Drive1.Inputs.Status word"),
            "appears twice",
        ),
    }
    for name, (text, expect) in cases.items():
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(MapError, match=expect) as err:
            load_eni(path)
        assert str(path) in str(err.value)


# ------------------------------------------------------------------------------------------ coverage


def test_coverage_names_each_signal_no_datagram_holds() -> None:
    """At start-up the daemon checks the map against the datagrams of the first frames: every signal
    whose bytes no datagram holds is named, and a signal two datagrams hold asks for its command."""
    pmap = load_yaml_map(DATA / "address_map.yaml")
    lrd = DatagramKey(LRD, 0x0FF0, 32)  # starts before the map's first address: offsets are relative
    lwr = DatagramKey(LWR, 0x2000, 8)
    check_coverage(pmap, [lrd, lwr])
    with pytest.raises(MapError) as err:
        check_coverage(pmap, [lrd])
    assert "'target_position_1': no datagram holds LWR logical 0x00002000..0x00002007" in str(err.value)
    assert (err.value.entry, err.value.field) == ("target_position_1", "address")
    assert "motor_position_1" not in str(err.value)
    with pytest.raises(MapError) as err:
        check_coverage(pmap, [DatagramKey(LRD, 0x1000, 7), DatagramKey(LRW, 0x2000, 8)])
    message = str(err.value)
    for name in ("cycle_count", "brake_released", "mode", "target_position_1"):
        assert f"'{name}'" in message
    assert "'motor_position_1'" not in message
    assert "'motor_current_1'" not in message
    with pytest.raises(
        MapError, match=r"'motor_position_1': both LRD@\S+ and LWR@\S+ hold .*: set its command"
    ):
        check_coverage(pmap, [lrd, lwr, DatagramKey(LWR, 0x1000, 4)])


# ------------------------------------------------------------------------------------ bus cycles, fill

REF = DatagramKey(LRD, 0x1000, 4)
OTHER = DatagramKey(LRD, 0x2000, 2)


def two_datagram_map(tmp_path: Path) -> ProcessMap:
    return load_yaml_map(
        write_map(
            tmp_path,
            "signals:\n  - {name: pos, address: 0x1000, type: int32}\n"
            "  - {name: temp, address: 0x2000, type: int16, scale: 0.1}\n",
        )
    )


def i32(v: int) -> bytes:
    return struct.pack("<i", v)


def i16(v: int) -> bytes:
    return struct.pack("<h", v)


def test_rows_are_bus_cycles_and_other_datagrams_fill_forward_across_batches(tmp_path: Path) -> None:
    """One row per occurrence of the first signal's datagram; a slower datagram's value holds until it
    is seen again, across batches; NaN before it is first seen."""
    ex = SignalExtractor(two_datagram_map(tmp_path))
    rows = ex.extract(
        batch(
            [100, 200, 300, 400],
            dgram(REF, [0, 1, 2, 3], [i32(v) for v in (10, 11, 12, 13)]),
            dgram(OTHER, [1], [i16(250)]),
        )
    )
    np.testing.assert_array_equal(rows.ts_ns, [100, 200, 300, 400])
    np.testing.assert_array_equal(rows.column("pos"), [10, 11, 12, 13])
    np.testing.assert_allclose(rows.column("temp"), [np.nan, 25.0, 25.0, 25.0])
    rows = ex.extract(batch([500, 600], dgram(REF, [0, 1], [i32(14), i32(15)])))  # OTHER absent: carried
    np.testing.assert_allclose(rows.column("temp"), [25.0, 25.0])
    rows = ex.extract(
        batch(
            [700, 800, 900],
            dgram(REF, [0, 2], [i32(16), i32(17)]),
            dgram(OTHER, [1, 2], [i16(-300), i16(-310)]),  # frame 1 holds no bus cycle row
        )
    )
    np.testing.assert_array_equal(rows.ts_ns, [700, 900])
    np.testing.assert_allclose(rows.column("temp"), [25.0, -31.0])
    rows = ex.extract(batch([1000, 1100], dgram(REF, [1], [i32(18)]), dgram(OTHER, [0, 1], [i16(5), i16(6)])))
    np.testing.assert_allclose(rows.column("temp"), [0.6])
    rows = ex.extract(batch([1200], dgram(OTHER, [0], [i16(7)])))  # no bus cycle, but remembered
    assert rows.values.shape == (0, 2)
    rows = ex.extract(batch([1300], dgram(REF, [0], [i32(19)])))
    np.testing.assert_allclose(rows.values, [[19.0, 0.7]])
    assert ex.counts["rows"] == 10
    # rows whose OTHER value is not from their own frame, batch by batch (the NaN row 0 included)
    assert ex.counts["filled_rows"] == 3 + 2 + 1 + 0 + 1


def test_a_short_working_counter_marks_the_rows_that_use_it_stale(tmp_path: Path) -> None:
    """A stale datagram (the frame stage's `stale`) marks its own rows, and the rows that carry its value
    forward, until it comes back good."""
    ex = SignalExtractor(two_datagram_map(tmp_path))
    rows = ex.extract(
        batch(
            list(range(5)),
            dgram(REF, [0, 1, 2, 3, 4], [i32(v) for v in range(5)], stale=[False, True, False, False, False]),
            dgram(OTHER, [0, 3], [i16(1), i16(2)], stale=[False, True]),
        )
    )
    assert rows.stale.tolist() == [False, True, False, True, True]
    rows = ex.extract(batch([5, 6], dgram(REF, [0, 1], [i32(5), i32(6)], stale=[False, False])))
    assert rows.stale.tolist() == [True, True]  # still the stale value of OTHER
    rows = ex.extract(
        batch(
            [7, 8],
            dgram(REF, [0, 1], [i32(7), i32(8)]),
            dgram(OTHER, [0, 1], [i16(3), i16(4)], stale=[False, False]),
        )
    )
    assert rows.stale.tolist() == [False, False]
    assert ex.counts["stale_rows"] == 5


def test_a_yaml_map_binds_to_the_datagram_that_covers_it(tmp_path: Path) -> None:
    """A YAML address falls inside whichever datagram covers it (offset from that datagram's start); a
    signal whose datagram has not yet appeared reads NaN and binds once it does."""
    ex = SignalExtractor(two_datagram_map(tmp_path))
    wide = DatagramKey(LRW, 0x0FFE, 8)  # pos at bytes 2..5
    rows = ex.extract(batch([1], dgram(wide, [0], [b"\0\0" + i32(-5) + b"\0\0"])))
    np.testing.assert_array_equal(rows.values, [[-5.0, np.nan]])
    rows = ex.extract(
        batch([2], dgram(wide, [0], [b"\0\0" + i32(-6) + b"\0\0"]), dgram(OTHER, [0], [i16(10)]))
    )
    np.testing.assert_allclose(rows.values, [[-6.0, 1.0]])


# ----------------------------------------------------------------------------------------------- ENI


def scapy_frames(datagrams: list[list[tuple[str, dict[str, int], bytes, int]]]) -> list[bytes]:
    """Frames as scapy builds them: each a list of (layer, address fields, data, wkc)."""
    from scapy.config import conf
    from scapy.contrib import ethercat
    from scapy.layers.l2 import Ether

    conf.max_list_count = 10000
    out = []
    for frame in datagrams:
        pkt = Ether(dst="ff:ff:ff:ff:ff:ff", src="02:00:00:00:00:01", type=0x88A4) / ethercat.EtherCat()
        for layer, addr, data, wkc in frame:
            pkt = pkt / getattr(ethercat, f"EtherCat{layer}")(**addr, data=list(data), wkc=wkc)
        out.append(bytes(pkt))
    return out


def dissect(frames: list[bytes], ts: list[int], expected_wkc: dict[DatagramKey, int]) -> FrameBatch:
    """FrameBatch columns from scapy's dissection of the frames (the reference decoder), stale where the
    working counter is below the expected one (as the frame stage marks it)."""
    from scapy.config import conf
    from scapy.contrib import ethercat
    from scapy.layers.l2 import Ether

    conf.max_list_count = 10000
    found: dict[DatagramKey, tuple[list[int], list[bytes], list[int]]] = {}
    for i, raw in enumerate(frames):
        layer = Ether(raw)[ethercat.EtherCat].payload
        while isinstance(layer, ethercat.EtherCatType12DLPDU):
            code = layer._cmd
            address = layer.adr if code in (LRD, LWR, LRW) else layer.adp | layer.ado << 16
            data = bytes(layer.data)
            f = found.setdefault(DatagramKey(code, address, len(data)), ([], [], []))
            f[0].append(i)
            f[1].append(data)
            f[2].append(layer.wkc)
            layer = layer.payload
    return batch(
        ts,
        *(
            dgram(k, fr, rows, wkc, stale=[w < expected_wkc.get(k, 0) for w in wkc])
            for k, (fr, rows, wkc) in found.items()
        ),
    )


def expected_from_frame(raw: bytes, dtype: str, bitoffs: int, bitsize: int) -> float:
    """A variable read straight off the captured frame at its ENI BitOffs (no datagram arithmetic)."""
    if bitoffs % 8 == 0 and dtype in STRUCT:
        return float(struct.unpack_from(STRUCT[dtype], raw, bitoffs // 8)[0])
    v = int.from_bytes(raw[bitoffs // 8 : bitoffs // 8 + 9], "little") >> (bitoffs % 8) & ((1 << bitsize) - 1)
    return float(v)


def test_eni_offsets_land_on_the_bytes_of_the_captured_frame() -> None:
    """Frames built by scapy as the ENI describes them (mailbox LRD, one LRW for both slaves, BRD) and
    dissected by scapy decode to the values found at each variable's BitOffs in the raw frame; the drive's
    outputs, overwritten by its inputs on the way, are not reported."""
    import xml.etree.ElementTree as ET

    pmap = load_eni(DATA / "two_slaves_lrw.xml")
    rng = np.random.default_rng(12)
    frames = []
    for _ in range(6):
        frames.append(
            [
                ("LRD", {"adr": 0x09000000}, bytes([0]), 0),
                ("LRW", {"adr": 0x01000000}, rng.integers(0, 256, 36, dtype=np.uint8).tobytes(), 6),
                ("BRD", {"adp": 0, "ado": 304}, b"\x08\x00", 2),
            ]
        )
    raws = scapy_frames(frames)
    assert (raws[0][16], raws[0][29], raws[0][77]) == (LRD, LRW, BRD)  # where the ENI's InputOffs say
    rows = SignalExtractor(pmap).extract(dissect(raws, [10, 20, 30, 40, 50, 60], pmap.expected_wkc))
    np.testing.assert_array_equal(rows.ts_ns, [10, 20, 30, 40, 50, 60])
    assert not rows.stale.any()
    root = ET.parse(DATA / "two_slaves_lrw.xml").getroot()  # the test's own reading of the file (trusted)
    checked = 0
    for var in root.iter("Variable"):
        name = var.findtext("Name")
        if name not in pmap.names:
            continue
        dtype, width = ENI_TYPES[var.findtext("DataType", "")]
        bitoffs = int(var.findtext("BitOffs", ""))
        want = [expected_from_frame(raw, dtype, bitoffs, width) for raw in raws]
        np.testing.assert_array_equal(rows.column(name), want, err_msg=name)
        checked += 1
    assert checked == len(pmap.names) == 16
    assert TYPES["float64"].size == 8


def eni_lrd_lwr(path: Path) -> Path:
    """An ENI as TwinCAT writes one with inputs in an LRD and outputs in an LWR of the same frame."""

    def var(name: str, dtype: str, bits: int, offs: int) -> str:
        return (
            f"<Variable><Name>{name}</Name><DataType>{dtype}</DataType>"
            f"<BitSize>{bits}</BitSize><BitOffs>{offs}</BitOffs></Variable>"
        )

    def cmd(code: int, addr: int, length: int, cnt: int, offs: int) -> str:
        return (
            f"<Cmd><State>SAFEOP</State><State>OP</State><Cmd>{code}</Cmd><Addr>{addr}</Addr>"
            f"<DataLength>{length}</DataLength><Cnt>{cnt}</Cnt>"
            f"<InputOffs>{offs}</InputOffs><OutputOffs>{offs}</OutputOffs></Cmd>"
        )

    # LRD at 16: data at bytes 26..33 (bits 208..271); LWR at 16 + 10 + 8 + 2 = 36: data at 46..51
    inputs = [
        var("Axis1.Inputs.Position", "DINT", 32, 208),
        var("Axis2.Inputs.Position", "DINT", 32, 240),
    ]
    outputs = [
        var("Axis1.Outputs.Target", "INT", 16, 368),
        var("Axis2.Outputs.Target", "INT", 16, 384),
        var("Axis2.Outputs.Enable", "BOOL", 1, 400),
        var("Axis2.Outputs.Brake", "BIT", 1, 401),
    ]
    path.write_text(
        '<?xml version="1.0"?>\n<EtherCATConfig Version="1.3"><Config>'
        "<Slave><Info><Name>Axis1</Name><PhysAddr>1001</PhysAddr></Info></Slave>"
        "<Slave><Info><Name>Axis2</Name><PhysAddr>1002</PhysAddr></Info></Slave>"
        "<Cyclic><CycleTime>1000</CycleTime><Frame>"
        + cmd(LRD, 0x01000000, 8, 2, 16)
        + cmd(LWR, 0x01000800, 6, 2, 36)
        + "</Frame></Cyclic><ProcessImage>"
        + "<Inputs><ByteSize>1536</ByteSize>"
        + "".join(inputs)
        + "</Inputs><Outputs><ByteSize>1536</ByteSize>"
        + "".join(outputs)
        + "</Outputs></ProcessImage></Config></EtherCATConfig>\n"
    )
    return path


def test_eni_with_an_lrd_and_lwr_pair_decodes_inputs_and_outputs(tmp_path: Path) -> None:
    """Inputs from the LRD and outputs from the LWR of the same frame make one row per bus cycle; an LWR
    whose working counter falls short marks its rows stale."""
    pmap = load_eni(eni_lrd_lwr(tmp_path / "bus.xml"))
    lrd, lwr = DatagramKey(LRD, 0x01000000, 8), DatagramKey(LWR, 0x01000800, 6)
    assert pmap.expected_wkc == {lrd: 2, lwr: 2}
    assert pmap.skipped == ()
    assert len(pmap.names) == 6
    raws = scapy_frames(
        [
            [
                ("LRD", {"adr": 0x01000000}, i32(1000 * k) + i32(-1000 * k), 2),
                ("LWR", {"adr": 0x01000800}, i16(k) + i16(-k) + bytes([k & 3, 0]), 2 if k != 2 else 1),
            ]
            for k in range(4)
        ]
    )
    rows = SignalExtractor(pmap).extract(dissect(raws, [0, 1, 2, 3], pmap.expected_wkc))
    np.testing.assert_array_equal(
        rows.values,
        [[1000.0 * k, -1000.0 * k, k, -k, k & 1, (k >> 1) & 1] for k in range(4)],
    )
    assert rows.stale.tolist() == [False, False, True, False]


def test_eni_offsets_that_do_not_chain_are_reported(tmp_path: Path) -> None:
    """An ENI whose datagram offsets do not follow one another as in TwinCAT's frame layout loads with a
    warning saying so (its values should be checked against a capture)."""
    path = eni_lrd_lwr(tmp_path / "bus.xml")
    path.write_text(path.read_text().replace("<InputOffs>36</InputOffs>", "<InputOffs>40</InputOffs>"))
    pmap = load_eni(path)
    assert len(pmap.warnings) == 1
    assert "starts at 40, the previous datagram ends at 36" in pmap.warnings[0]


def test_forward_fill_matches_a_plain_reading_however_batches_and_chunks_fall(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows are the same whether a capture comes in one batch or many and however the extractor cuts a
    batch into chunks: each value is the latest its datagram carried at or before the row's frame."""
    import ingest.ethercat.mapping as mapping

    pmap = load_yaml_map(
        write_map(
            tmp_path,
            "signals:\n  - {name: p0, address: 0x1000, type: int32}\n"
            "  - {name: t0, address: 0x2000, type: int16, scale: 0.5}\n"
            "  - {name: p1, address: 0x1004, type: uint16}\n"
            "  - {name: f0, address: 0x2002, type: bool, bit: 6}\n"
            "  - {name: s0, address: 0x3000, type: int8, bit: 1, bits: 5}\n"
            "  - {name: t1, address: 0x2003, type: float32}\n",
        )
    )
    ref, slow, rare = DatagramKey(LRW, 0x1000, 6), DatagramKey(LRD, 0x2000, 7), DatagramKey(LRD, 0x3000, 1)
    rng = np.random.default_rng(5)
    n = 400
    data = {k: rng.integers(0, 256, (n, k.length), dtype=np.uint8) for k in (ref, slow, rare)}
    frames = {
        ref: np.flatnonzero(rng.random(n) < 0.9),
        slow: np.flatnonzero(rng.random(n) < 0.3),
        rare: np.flatnonzero(rng.random(n) < 0.05),
    }
    stale = {k: rng.random(n) < 0.05 for k in frames}
    # the plain reading: per row, the latest occurrence of each datagram at or before the row's frame
    single = {s.name: SignalExtractor(ProcessMap((s,))) for s in pmap.signals}
    expect_values, expect_stale = [], []
    for f in frames[ref]:
        row, row_stale = [], False
        for s in pmap.signals:
            key = next(k for k in frames if k.address <= s.address < k.address + k.length)
            seen = frames[key][frames[key] <= f]
            if len(seen) == 0:
                row.append(math.nan)
                continue
            last = int(seen[-1])
            one = DatagramKey(key.command, s.address, key.length - (s.address - key.address))
            got = single[s.name].extract(
                batch([0], dgram(one, [0], [data[key][last, s.address - key.address :].tobytes()]))
            )
            row.append(float(got.values[0, 0]))
            row_stale |= bool(stale[key][last])
        expect_values.append(row)
        expect_stale.append(row_stale)

    def run(cuts: list[int]) -> tuple[np.ndarray, np.ndarray]:
        ex = SignalExtractor(pmap)
        values, flags = [], []
        for lo, hi in zip([0, *cuts], [*cuts, n], strict=True):
            cols = []
            for k, fr in frames.items():
                sel = fr[(fr >= lo) & (fr < hi)]
                cols.append(dgram(k, (sel - lo).tolist(), data[k][sel], stale=stale[k][sel].tolist()))
            rows = ex.extract(batch(list(range(lo, hi)), *cols))
            np.testing.assert_array_equal(rows.ts_ns, frames[ref][(frames[ref] >= lo) & (frames[ref] < hi)])
            values.append(rows.values)
            flags.append(rows.stale)
        return np.concatenate(values), np.concatenate(flags)

    for chunk in (8192, 7, 1):
        monkeypatch.setattr(mapping, "CHUNK_ROWS", chunk)
        for cuts in ([], [1, 2, 3, 150], sorted(rng.choice(np.arange(1, n), 20, replace=False).tolist())):
            values, flags = run(cuts)
            np.testing.assert_array_equal(values, expect_values, err_msg=f"chunk {chunk} cuts {cuts}")
            assert flags.tolist() == expect_stale
