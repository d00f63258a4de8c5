"""Named signals from EtherCAT process data: where each signal lives on the bus (a `ProcessMap`, loaded
from a YAML map or a TwinCAT ENI file) and its values per bus cycle (`SignalExtractor`: FrameBatch ->
`SignalRows`, vectorized, SI units = raw * scale + offset).

A signal lives in one cyclic datagram: its command and address (a DatagramKey), `byte` bytes into that
datagram's data, `bits` bits from bit `bit` of that byte, little-endian as on the wire. For the logical
commands (LRD/LWR/LRW) `address + byte` is the signal's logical address, so a signal is found in whichever
captured datagram of its command covers that logical address, even where the master's datagrams start
elsewhere than the map says (YAML maps only know logical addresses; ENI maps know the exact datagram).

YAML map (`load_yaml_map`, at most 1 MiB)::

    robot: robot-1              # optional: the robot these signals belong to
    cycle_signal: cycle_count   # optional: a mapped integer counter numbering the robot's process cycles
    eni: bus.xml                # optional: an ENI file (relative to the map) whose variables entries may name
    signals:
      - name: motor_position_1
        address: 0x1000         # logical address of the field's first byte
        type: int32             # bool, int8..int64, uint8..uint64, float32, float64
        command: LRD            # optional: LRD, LWR or LRW (default: whichever logical datagram covers it)
        bit: 0                  # optional: bit offset in the first byte (bool and bit fields)
        bits: 3                 # optional: an integer bit field of this many bits (default: the full type)
        scale: 1.0e-6           # optional: value = raw * scale + offset
        offset: 0.0
      - name: axis1_torque
        variable: "Axis1.Inputs.Torque"   # an ENI variable instead of address/type/command/bit/bits
        scale: 1.0e-3

With `eni:` and no `signals:`, every variable of the ENI that lies on the wire is mapped under its own name.

ENI (`load_eni`, at most 16 MiB): `Config/Cyclic/Frame/Cmd` gives the cyclic datagrams (command, address,
data length, expected working counter `Cnt`, `InputOffs`/`OutputOffs`), `Config/ProcessImage/Inputs|Outputs/
Variable` the variables (`Name`, `DataType`, `BitSize`, `BitOffs`). As TwinCAT writes them, the offsets
count in the same space: a Cmd's InputOffs is where its datagram starts in the frame (16 for the first:
14 bytes Ethernet + 2 EtherCAT header), its data starts 10 bytes later, and a variable's BitOffs points
straight at its bits in the frame. A variable lies in the Cmd whose data holds all its bits (inputs in a
command that reads, outputs in one that writes); variables in no Cmd (the master's status words such as
`Inputs.Frm0WcState`, the `WcState` bits) are skipped with the reason in `ProcessMap.skipped`, as are
types this reader does not decode (STRING, arrays, structures) and outputs that share their bits with an
input of the same LRW: the slaves overwrite those bytes on the way, so the returned frame (the one the
capture stage keeps) holds the input.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from xml.etree.ElementTree import Element, ParseError

import defusedxml
import defusedxml.ElementTree
import numpy as np
import yaml

from ingest.errors import ConfigurationError
from ingest.ethercat.types import COMMANDS, LOGICAL, DatagramKey, FrameBatch

MAX_YAML_BYTES: Final = 1 << 20
MAX_ENI_BYTES: Final = 16 << 20
MAX_SIGNALS: Final = 65536
MAX_NAME_CHARS: Final = 200
CHUNK_ROWS: Final = 8192  # bus cycles decoded at a time: the temporaries of a chunk stay in the CPU's cache

# datagram header before the data, as the ENI's offsets count it
DATAGRAM_HEADER: Final = 10
DATAGRAM_TRAILER: Final = 2  # the working counter

# commands whose returned data carries what slaves put there (inputs) / what the master sent (outputs)
READS: Final = frozenset({1, 3, 4, 6, 7, 9, 10, 12, 13, 14})
WRITES: Final = frozenset({2, 3, 5, 6, 8, 9, 11, 12})
LOGICAL_NAMES: Final = {"LRD": 10, "LWR": 11, "LRW": 12}


class MapError(ConfigurationError):
    """A process map cannot be used: the message names the file, the entry and the field."""

    def __init__(self, message: str, *, entry: str | None = None, field: str | None = None) -> None:
        super().__init__(message)
        self.entry = entry
        self.field = field


@dataclass(frozen=True)
class SignalType:
    name: str
    fmt: str  # numpy format of the full-width value ('<i4'); '|u1' for bool
    bits: int  # full width in bits (1 for bool)
    kind: str  # 'b' bool, 'i' signed, 'u' unsigned, 'f' float

    @property
    def size(self) -> int:
        return max(1, self.bits // 8)


TYPES: Final[Mapping[str, SignalType]] = {
    t.name: t
    for t in (
        SignalType("bool", "|u1", 1, "b"),
        SignalType("int8", "|i1", 8, "i"),
        SignalType("int16", "<i2", 16, "i"),
        SignalType("int32", "<i4", 32, "i"),
        SignalType("int64", "<i8", 64, "i"),
        SignalType("uint8", "|u1", 8, "u"),
        SignalType("uint16", "<u2", 16, "u"),
        SignalType("uint32", "<u4", 32, "u"),
        SignalType("uint64", "<u8", 64, "u"),
        SignalType("float32", "<f4", 32, "f"),
        SignalType("float64", "<f8", 64, "f"),
    )
}

# ENI DataType -> (type, bit size); BITn are unsigned bit fields
ENI_TYPES: Final[Mapping[str, tuple[str, int]]] = {
    "BOOL": ("bool", 1),
    "BIT": ("bool", 1),
    **{f"BIT{n}": ("uint8", n) for n in range(2, 9)},
    "SINT": ("int8", 8),
    "INT": ("int16", 16),
    "DINT": ("int32", 32),
    "LINT": ("int64", 64),
    "USINT": ("uint8", 8),
    "UINT": ("uint16", 16),
    "UDINT": ("uint32", 32),
    "ULINT": ("uint64", 64),
    "BYTE": ("uint8", 8),
    "WORD": ("uint16", 16),
    "DWORD": ("uint32", 32),
    "REAL": ("float32", 32),
    "LREAL": ("float64", 64),
}


@dataclass(frozen=True)
class Signal:
    """One named value: `bits` bits from bit `bit` of byte `byte` of the data of the datagram with
    `command` at `address` (data length `length`), decoded as `dtype` and reported as
    raw * scale + offset. `command` None: any logical datagram covering the logical address
    `address + byte`; `length` None: not known (YAML maps). `variable`: the ENI variable it came from."""

    name: str
    dtype: str
    address: int
    byte: int = 0
    bit: int = 0
    bits: int = 0  # 0: the type's full width
    command: int | None = None
    length: int | None = None
    scale: float = 1.0
    offset: float = 0.0
    variable: str | None = None

    @property
    def type(self) -> SignalType:
        return TYPES[self.dtype]

    @property
    def width(self) -> int:
        return self.bits or self.type.bits

    @property
    def nbytes(self) -> int:
        """Bytes the field touches, from `byte` on."""
        return (self.bit + self.width + 7) // 8

    @property
    def plain(self) -> bool:
        """A whole little-endian value on a byte boundary (read by a view, not by shifts and masks)."""
        return self.type.kind != "b" and self.bit == 0 and self.width == self.type.bits

    @property
    def key(self) -> DatagramKey | None:
        """The datagram as the map names it, where command and length are known (ENI maps)."""
        if self.command is None or self.length is None:
            return None
        return DatagramKey(self.command, self.address, self.length)

    def where(self) -> str:
        cmd = "LRD/LWR/LRW" if self.command is None else COMMANDS.get(self.command, str(self.command))
        if self.command is None or self.command in LOGICAL:
            pos = self.address + self.byte
            return f"{cmd} logical 0x{pos:08x}..0x{pos + self.nbytes - 1:08x}"
        return f"{cmd}@0x{self.address:08x} bytes {self.byte}..{self.byte + self.nbytes - 1}"


@dataclass(frozen=True)
class CyclicCommand:
    """A cyclic datagram of the ENI: its key, the working counter a complete bus returns (`Cnt`; None
    where the ENI gives none) and its offsets (ENI `InputOffs`/`OutputOffs`: where the datagram starts)."""

    key: DatagramKey
    expected_wkc: int | None
    input_offs: int | None
    output_offs: int | None
    frame: int  # which cyclic Frame of the ENI (0-based, in file order)


@dataclass(frozen=True)
class ProcessMap:
    """What to read off the bus: the signals in map order, the cyclic datagrams (ENI maps; empty for a
    YAML map), what was left out and why, the counter that numbers process cycles and the robot."""

    signals: tuple[Signal, ...]
    commands: tuple[CyclicCommand, ...] = ()
    skipped: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    cycle_signal: str | None = None
    robot: str | None = None
    source: str = ""

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.signals)

    @property
    def expected_wkc(self) -> dict[DatagramKey, int]:
        """Expected working counter per datagram (ENI `Cnt`), for the frame stage's staleness check."""
        return {c.key: c.expected_wkc for c in self.commands if c.expected_wkc is not None}

    def __post_init__(self) -> None:
        _check_map(self)

    def signal(self, name: str) -> Signal:
        for s in self.signals:
            if s.name == name:
                return s
        raise KeyError(name)


# ---------------------------------------------------------------------------------------------- checks


def _check_signal(s: Signal, entry: str) -> None:
    """Type, bit range, scale; raise MapError naming the entry and the field."""
    if s.dtype not in TYPES:
        raise MapError(f"{entry}: type: unknown type {s.dtype!r} (known: {', '.join(TYPES)})", field="type")
    t = s.type
    if s.bits:
        if t.kind not in "iu" and not (t.kind == "b" and s.bits == 1):
            raise MapError(f"{entry}: bits: a bit field must be an integer type, not {t.name}", field="bits")
        if not 1 <= s.bits <= t.bits:
            raise MapError(f"{entry}: bits: {s.bits} is out of range 1..{t.bits} for {t.name}", field="bits")
    if not 0 <= s.bit <= 7:
        raise MapError(
            f"{entry}: bit: {s.bit} is out of range 0..7 (a bit of the field's first byte)", field="bit"
        )
    if s.bit + s.width > 64:
        raise MapError(
            f"{entry}: bit: a {s.width}-bit field from bit {s.bit} spans more than 8 bytes", field="bit"
        )
    if s.byte < 0 or s.address < 0 or (s.length is not None and s.byte + s.nbytes > s.length):
        raise MapError(f"{entry}: address: {s.where()} lies outside its datagram", field="address")
    for name, value in (("scale", s.scale), ("offset", s.offset)):
        if not math.isfinite(value):
            raise MapError(f"{entry}: {name}: must be a finite number, got {value!r}", field=name)


def _check_overlaps(signals: Sequence[Signal], where: str) -> None:
    """No two signals read the same bits of the same datagram (or logical address)."""
    by_space: dict[tuple[Any, ...], list[tuple[int, int, int]]] = {}
    for i, s in enumerate(signals):
        if s.command is None or s.command in LOGICAL:
            start = 8 * (s.address + s.byte) + s.bit
            spaces: Iterable[tuple[Any, ...]] = (
                [("L", c) for c in sorted(LOGICAL)] if s.command is None else [("L", s.command)]
            )
        else:
            start = 8 * s.byte + s.bit
            spaces = [("A", s.command, s.address)]
        for space in spaces:
            by_space.setdefault(space, []).append((start, start + s.width, i))
    for intervals in by_space.values():
        intervals.sort()
        reach, holder = -1, -1
        for start, end, i in intervals:
            if start < reach and holder != i:
                a, b = signals[min(holder, i)], signals[max(holder, i)]  # b: the later entry of the map
                raise MapError(
                    f"{where}: {b.name!r} overlaps {a.name!r}: both read bits of {b.where()}",
                    entry=b.name,
                    field="address",
                )
            if end > reach:
                reach, holder = end, i


def _check_map(pmap: ProcessMap) -> None:
    """What every map must hold (ProcessMap checks itself when made)."""
    where = pmap.source or "process map"
    if not pmap.signals:
        raise MapError(f"{where}: no signals mapped", field="signals")
    if len(pmap.signals) > MAX_SIGNALS:
        raise MapError(f"{where}: {len(pmap.signals)} signals, at most {MAX_SIGNALS}", field="signals")
    seen: set[str] = set()
    for s in pmap.signals:
        _check_signal(s, f"{where}: signal {s.name!r}")
        if s.name in seen:
            raise MapError(f"{where}: signal {s.name!r}: name: mapped twice", entry=s.name, field="name")
        seen.add(s.name)
    _check_overlaps(pmap.signals, where)
    if pmap.cycle_signal is not None:
        if pmap.cycle_signal not in seen:
            raise MapError(
                f"{where}: cycle_signal: {pmap.cycle_signal!r} is not a mapped signal", field="cycle_signal"
            )
        kind = pmap.signal(pmap.cycle_signal).type.kind
        if kind not in "iu":
            raise MapError(
                f"{where}: cycle_signal: {pmap.cycle_signal!r} must be an integer counter, not "
                f"{pmap.signal(pmap.cycle_signal).dtype}",
                field="cycle_signal",
            )


# ------------------------------------------------------------------------------------------- coverage


def _locate(s: Signal, keys: Sequence[DatagramKey]) -> list[tuple[DatagramKey, int]]:
    """The datagrams among `keys` holding all bytes of `s`, each with the byte offset of `s` in its data."""
    exact = s.key
    if exact is not None and exact in keys and s.byte + s.nbytes <= exact.length:
        return [(exact, s.byte)]
    found = []
    if s.command is None or s.command in LOGICAL:
        commands = LOGICAL if s.command is None else {s.command}
        pos = s.address + s.byte
        for k in keys:
            if k.command in commands and k.address <= pos and pos + s.nbytes <= k.address + k.length:
                found.append((k, pos - k.address))
    else:
        for k in keys:
            if k.command == s.command and k.address == s.address and s.byte + s.nbytes <= k.length:
                found.append((k, s.byte))
    return sorted(found, key=lambda f: (f[0].command, f[0].address, f[0].length))


def resolve(pmap: ProcessMap, keys: Iterable[DatagramKey]) -> list[tuple[DatagramKey, int] | None]:
    """Per signal (map order), the datagram among `keys` that holds it and its byte offset there; None
    where none does. Where several do (a YAML signal without `command` under both an LRD and an LWR), the
    first by (command, address, length) — `check_coverage` refuses that case."""
    ks = sorted(set(keys), key=lambda k: (k.command, k.address, k.length))
    out: list[tuple[DatagramKey, int] | None] = []
    for s in pmap.signals:
        found = _locate(s, ks)
        out.append(found[0] if found else None)
    return out


SHOWN_PROBLEMS = 5  # signals (and datagrams) named in a coverage error; the rest are counted


def check_coverage(pmap: ProcessMap, keys: Iterable[DatagramKey]) -> None:
    """Raise MapError naming each signal whose bytes no datagram among `keys` holds (or that two hold,
    so that the map must say which `command`). For an ENI map pass its own `commands`' keys to check the
    map, or the keys of the first captured frames to check the capture against the ENI."""
    ks = sorted(set(keys), key=lambda k: (k.command, k.address, k.length))
    problems, named = [], []
    for s in pmap.signals:
        found = _locate(s, ks)
        if not found:
            problems.append(f"{s.name!r}: no datagram holds {s.where()}")
        elif len(found) > 1:
            names = " and ".join(k.name for k, _ in found)
            problems.append(f"{s.name!r}: both {names} hold {s.where()}: set its command")
        else:
            continue
        named.append(s.name)
    if problems:
        shown_keys = [k.name for k in ks[:SHOWN_PROBLEMS]]
        more_keys = f" and {len(ks) - SHOWN_PROBLEMS} more" if len(ks) > SHOWN_PROBLEMS else ""
        seen = ", ".join(shown_keys) + more_keys or "none"
        more = (
            f"; and {len(problems) - SHOWN_PROBLEMS} more signals" if len(problems) > SHOWN_PROBLEMS else ""
        )
        raise MapError(
            f"{pmap.source or 'process map'}: {len(problems)} signals not on the bus: "
            + "; ".join(problems[:SHOWN_PROBLEMS])
            + more
            + f" (datagrams: {seen})",
            entry=named[0] if len(named) == 1 else None,
            field="address",
        )


# ------------------------------------------------------------------------------------------ file input


def _read_bounded(path: Path, limit: int, what: str) -> bytes:
    try:
        with path.open("rb") as f:
            data = f.read(limit + 1)
    except OSError as err:
        raise MapError(f"cannot read {what} {path}: {err.strerror}") from None
    if len(data) > limit:
        raise MapError(f"{what} {path} is larger than {limit} bytes")
    return data


def _number(value: Any, entry: str, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise MapError(f"{entry}: {name}: must be a number, got {value!r}", field=name)
    try:
        return float(value)  # also "1e-6", which YAML 1.1 reads as a string
    except ValueError:
        raise MapError(f"{entry}: {name}: must be a number, got {value!r}", field=name) from None


def _integer(value: Any, entry: str, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise MapError(f"{entry}: {name}: must be an integer, got {value!r}", field=name)
    if isinstance(value, str):
        try:
            return int(value.strip().replace("_", ""), 0)
        except ValueError:
            raise MapError(f"{entry}: {name}: must be an integer, got {value!r}", field=name) from None
    return value


def _name(value: Any, entry: str, name: str = "name") -> str:
    if not isinstance(value, str) or not value.strip():
        raise MapError(f"{entry}: {name}: must be a non-empty string, got {value!r}", field=name)
    if len(value) > MAX_NAME_CHARS or any(ord(c) < 32 for c in value):
        raise MapError(
            f"{entry}: {name}: at most {MAX_NAME_CHARS} printable characters, got {value[:40]!r}", field=name
        )
    return value


_SIGNAL_KEYS: Final = {"name", "address", "type", "command", "bit", "bits", "scale", "offset", "variable"}
_TOP_KEYS: Final = {"signals", "robot", "cycle_signal", "eni"}


def _yaml_signal(item: Any, entry: str, eni: _Eni | None) -> Signal:
    if not isinstance(item, dict):
        raise MapError(f"{entry}: must be a mapping with name, address and type, got {item!r}")
    unknown = sorted(str(k) for k in item if k not in _SIGNAL_KEYS)
    if unknown:
        raise MapError(
            f"{entry}: {unknown[0]}: unknown field (known: {', '.join(sorted(_SIGNAL_KEYS))})",
            field=unknown[0],
        )
    scale = _number(item.get("scale", 1.0), entry, "scale")
    offset = _number(item.get("offset", 0.0), entry, "offset")
    if "variable" in item:
        variable = _name(item["variable"], entry, "variable")
        if eni is None:
            raise MapError(f"{entry}: variable: needs an eni: file at the top of the map", field="variable")
        clash = sorted(k for k in ("address", "type", "command", "bit", "bits") if k in item)
        if clash:
            raise MapError(f"{entry}: {clash[0]}: comes from the ENI with variable:", field=clash[0])
        name = _name(item.get("name", variable), entry)
        found = eni.signals.get(variable)
        if found is None:
            why = eni.skipped.get(variable, "no such variable in the ENI")
            raise MapError(f"{entry}: variable: {variable!r}: {why}", entry=name, field="variable")
        sig = Signal(
            name=name,
            dtype=found.dtype,
            address=found.address,
            byte=found.byte,
            bit=found.bit,
            bits=found.bits,
            command=found.command,
            length=found.length,
            scale=scale,
            offset=offset,
            variable=variable,
        )
        _check_signal(sig, f"{entry} ({name})")
        return sig
    name = _name(item.get("name"), entry)
    entry = f"{entry} ({name})"
    for required in ("address", "type"):
        if required not in item:
            raise MapError(f"{entry}: {required}: missing", entry=name, field=required)
    dtype = item["type"]
    if not isinstance(dtype, str) or dtype.strip().lower() not in TYPES:
        raise MapError(
            f"{entry}: type: unknown type {dtype!r} (known: {', '.join(TYPES)})", entry=name, field="type"
        )
    dtype = dtype.strip().lower()
    address = _integer(item["address"], entry, "address")
    command: int | None = None
    if item.get("command") is not None:
        raw = item["command"]
        if isinstance(raw, str) and raw.strip().upper() in LOGICAL_NAMES:
            command = LOGICAL_NAMES[raw.strip().upper()]
        elif isinstance(raw, int) and not isinstance(raw, bool) and raw in LOGICAL:
            command = raw
        else:
            raise MapError(
                f"{entry}: command: must be LRD, LWR or LRW, got {raw!r}", entry=name, field="command"
            )
    sig = Signal(
        name=name,
        dtype=dtype,
        address=address,
        bit=_integer(item.get("bit", 0), entry, "bit"),
        bits=_integer(item.get("bits", 0), entry, "bits") if "bits" in item else 0,
        command=command,
        scale=scale,
        offset=offset,
    )
    if "bits" in item and sig.bits == 0:
        raise MapError(f"{entry}: bits: {sig.bits} is out of range", entry=name, field="bits")
    try:
        _check_signal(sig, entry)
        limit = 8 if sig.type.kind == "b" else sig.type.bits  # a YAML field lies within its type's bytes
        if sig.bit > limit - sig.width:
            what = f"a {sig.width}-bit field of {dtype}" if sig.bits else dtype
            raise MapError(
                f"{entry}: bit: {sig.bit} is out of range 0..{limit - sig.width} for {what}", field="bit"
            )
    except MapError as err:
        err.entry = name
        raise
    if address < 0 or address + sig.nbytes > 1 << 32:
        raise MapError(f"{entry}: address: {address:#x} is outside the 32-bit logical space", field="address")
    return sig


def load_yaml_map(path: str | Path) -> ProcessMap:
    """Read a YAML map (format in the module docstring; at most 1 MiB, yaml.safe_load). Raises MapError
    naming the entry and the field: unknown type or field, duplicate names, overlapping bits, a bit offset
    out of range for the type, a non-finite scale or offset, an ENI variable not on the wire."""
    path = Path(path)
    raw = _read_bounded(path, MAX_YAML_BYTES, "map")
    try:
        data = yaml.safe_load(raw.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise MapError(f"{path}: not UTF-8 text (byte {err.start})") from None
    except yaml.YAMLError as err:
        raise MapError(f"{path}: not valid YAML: {err}") from None
    except (ValueError, TypeError, AttributeError, LookupError, OverflowError, RecursionError) as err:
        # PyYAML's constructors raise these for malformed typed scalars (`!!int ""`), its composer recurses
        detail = " ".join(str(err).split())[:200]
        raise MapError(f"{path}: not valid YAML: {type(err).__name__}: {detail}") from None
    if not isinstance(data, dict):
        raise MapError(f"{path}: must be a mapping with a signals: list, got {type(data).__name__}")
    unknown = sorted(str(k) for k in data if k not in _TOP_KEYS)
    if unknown:
        raise MapError(f"{path}: {unknown[0]}: unknown field (known: {', '.join(sorted(_TOP_KEYS))})")
    eni: _Eni | None = None
    if data.get("eni") is not None:
        eni_path = Path(_name(data["eni"], str(path), "eni"))
        eni = _parse_eni(eni_path if eni_path.is_absolute() else path.parent / eni_path)
    items = data.get("signals")
    if items is None and eni is not None:
        signals = tuple(eni.signals.values())
    else:
        if not isinstance(items, list) or not items:
            raise MapError(f"{path}: signals: must be a non-empty list", field="signals")
        if len(items) > MAX_SIGNALS:
            raise MapError(f"{path}: signals: {len(items)} entries, at most {MAX_SIGNALS}", field="signals")
        signals = tuple(_yaml_signal(item, f"{path}: signals[{i}]", eni) for i, item in enumerate(items))
    robot = None if data.get("robot") is None else _name(data["robot"], str(path), "robot")
    cycle = (
        None if data.get("cycle_signal") is None else _name(data["cycle_signal"], str(path), "cycle_signal")
    )
    pmap = ProcessMap(
        signals=signals,
        commands=eni.commands if eni else (),
        skipped=tuple(f"{n}: {why}" for n, why in eni.skipped.items()) if eni and items is None else (),
        warnings=eni.warnings if eni else (),
        cycle_signal=cycle,
        robot=robot,
        source=str(path),
    )
    if eni is not None:
        check_coverage(pmap, [c.key for c in eni.commands])
    return pmap


# ------------------------------------------------------------------------------------------------- ENI


@dataclass
class _Eni:
    signals: dict[str, Signal]
    skipped: dict[str, str]
    commands: tuple[CyclicCommand, ...]
    warnings: tuple[str, ...]


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _child(elem: Element, name: str) -> Element | None:
    for c in elem:
        if _local(c.tag) == name:
            return c
    return None


def _children(elem: Element | None, name: str) -> list[Element]:
    return [] if elem is None else [c for c in elem if _local(c.tag) == name]


def _text(elem: Element, name: str) -> str | None:
    c = _child(elem, name)
    return None if c is None or c.text is None else c.text.strip()


_ENI_INT = re.compile(r"^(#x[0-9a-fA-F]+|0x[0-9a-fA-F]+|[0-9]+)$")


def _eni_opt(elem: Element, name: str, entry: str) -> int | None:
    text = _text(elem, name)
    if text is None:
        return None
    if not _ENI_INT.match(text):
        raise MapError(f"{entry}: {name}: must be an integer, got {text[:40]!r}", entry=entry, field=name)
    return int(text[2:], 16) if text[:2].lower() in ("#x", "0x") else int(text)


def _eni_int(elem: Element, name: str, entry: str) -> int:
    value = _eni_opt(elem, name, entry)
    if value is None:
        raise MapError(f"{entry}: {name}: missing", entry=entry, field=name)
    return value


def _parse_eni(path: Path) -> _Eni:
    raw = _read_bounded(path, MAX_ENI_BYTES, "ENI")
    try:
        root = defusedxml.ElementTree.fromstring(raw)
    except ParseError as err:
        raise MapError(f"{path}: not valid XML: {err}") from None
    except defusedxml.DefusedXmlException as err:
        raise MapError(f"{path}: refused XML: {err}") from None
    config = _child(root, "Config") if _local(root.tag) != "Config" else root
    if config is None:
        raise MapError(f"{path}: no Config element (not an ENI file?)")
    commands: list[CyclicCommand] = []
    frame_no = 0
    warnings: list[str] = []
    for cyclic in _children(config, "Cyclic"):
        for frame in _children(cyclic, "Frame"):
            next_offs: int | None = None
            for j, cmd in enumerate(_children(frame, "Cmd")):
                entry = f"{path}: Cyclic Frame {frame_no} Cmd {j}"
                code = _eni_int(cmd, "Cmd", entry)
                length = _eni_int(cmd, "DataLength", entry)
                addr = _eni_opt(cmd, "Addr", entry)
                if addr is None:
                    adp = _eni_opt(cmd, "Adp", entry)
                    ado = _eni_opt(cmd, "Ado", entry)
                    if adp is None or ado is None:
                        raise MapError(f"{entry}: Addr: missing (neither Addr nor Adp/Ado)", field="Addr")
                    addr = (adp & 0xFFFF) | (ado & 0xFFFF) << 16
                if not 0 <= addr < 1 << 32 or not 0 <= length < 1 << 11 or code not in COMMANDS:
                    raise MapError(f"{entry}: impossible command {code}, address {addr} or length {length}")
                ioffs = _eni_opt(cmd, "InputOffs", entry)
                ooffs = _eni_opt(cmd, "OutputOffs", entry)
                start = ioffs if ioffs is not None else ooffs
                if next_offs is not None and start is not None and start != next_offs:
                    warnings.append(
                        f"{entry}: starts at {start}, the previous datagram ends at {next_offs} "
                        "(offsets are not the frame-relative layout TwinCAT writes; check the decoded values)"
                    )
                if start is not None:
                    next_offs = start + DATAGRAM_HEADER + length + DATAGRAM_TRAILER
                commands.append(
                    CyclicCommand(
                        key=DatagramKey(code, addr, length),
                        expected_wkc=_eni_opt(cmd, "Cnt", entry),
                        input_offs=ioffs,
                        output_offs=ooffs,
                        frame=frame_no,
                    )
                )
            frame_no += 1
    if not commands:
        raise MapError(f"{path}: no Config/Cyclic/Frame/Cmd entries: no cyclic process data to read")

    image = _child(config, "ProcessImage")
    signals: dict[str, Signal] = {}
    skipped: dict[str, str] = {}
    by_direction: dict[str, list[Signal]] = {"Inputs": [], "Outputs": []}
    for direction in ("Inputs", "Outputs"):
        part = _child(image, direction) if image is not None else None
        for k, var in enumerate(_children(part, "Variable")):
            entry = f"{path}: ProcessImage {direction} Variable {k}"
            name = _name(_text(var, "Name"), entry, "Name")
            entry = f"{entry} ({name})"
            if name in signals or name in skipped:
                raise MapError(f"{entry}: Name: appears twice in the process image", entry=name, field="Name")
            dtype_text = _text(var, "DataType") or ""
            bitsize = _eni_int(var, "BitSize", entry)
            bitoffs = _eni_int(var, "BitOffs", entry)
            known = ENI_TYPES.get(dtype_text.upper())
            if known is None:
                skipped[name] = f"DataType {dtype_text!r} is not decoded"
                continue
            dtype, width = known
            if bitsize != width:
                skipped[name] = f"BitSize {bitsize} does not match DataType {dtype_text}"
                continue
            allowed = READS if direction == "Inputs" else WRITES
            homes = []
            for c in commands:
                offs = c.input_offs if direction == "Inputs" else c.output_offs
                if offs is None or c.key.command not in allowed:
                    continue
                data_bit = 8 * (offs + DATAGRAM_HEADER)
                if data_bit <= bitoffs and bitoffs + bitsize <= data_bit + 8 * c.key.length:
                    homes.append((c, bitoffs - data_bit))
            if not homes:
                skipped[name] = (
                    "not in any cyclic datagram (a status variable of the master, not on the wire)"
                )
                continue
            if len(homes) > 1:
                skipped[name] = "in more than one cyclic datagram (offsets of several frames overlap)"
                continue
            c, rel = homes[0]
            sig = Signal(
                name=name,
                dtype=dtype,
                address=c.key.address,
                byte=rel // 8,
                bit=rel % 8,
                bits=width if TYPES[dtype].bits != width else 0,
                command=c.key.command,
                length=c.key.length,
                variable=name,
            )
            if sig.bit + sig.width > 64:
                skipped[name] = f"a {sig.width}-bit value starting at bit {sig.bit} of a byte is not decoded"
                continue
            by_direction[direction].append(sig)
            signals[name] = sig
    # an output sharing bits with an input of the same datagram is overwritten by the slave on the way
    inputs_by_key: dict[DatagramKey | None, list[Signal]] = {}
    for s in by_direction["Inputs"]:
        inputs_by_key.setdefault(s.key, []).append(s)
    for out in by_direction["Outputs"]:
        lo, hi = 8 * out.byte + out.bit, 8 * out.byte + out.bit + out.width
        for inp in inputs_by_key.get(out.key, []):
            ilo = 8 * inp.byte + inp.bit
            if ilo < hi and lo < ilo + inp.width:
                del signals[out.name]
                skipped[out.name] = (
                    f"shares its bits with input {inp.name!r} in {out.key.name if out.key else '?'}: "
                    "the returned frame holds the input"
                )
                break
    return _Eni(signals, skipped, tuple(commands), tuple(warnings))


def load_eni(path: str | Path) -> ProcessMap:
    """Every variable of an ENI file that lies on the wire, under its own name, in process-image order
    (inputs, then outputs), with the cyclic datagrams and their expected working counters. Variables that
    cannot be read off the captured frames are listed in `skipped` with the reason (not an error)."""
    path = Path(path)
    eni = _parse_eni(path)
    return ProcessMap(
        signals=tuple(eni.signals.values()),
        commands=eni.commands,
        skipped=tuple(f"{n}: {why}" for n, why in eni.skipped.items()),
        warnings=eni.warnings,
        source=str(path),
    )


# ---------------------------------------------------------------------------------------- extraction


@dataclass
class SignalRows:
    """Signal values per bus cycle: row i at capture time `ts_ns[i]`, `values[i, j]` the SI value of
    signal `names[j]` (NaN before its datagram was first seen), `stale[i]` True where a datagram the row
    uses came back with a short working counter."""

    names: tuple[str, ...]
    ts_ns: np.ndarray  # int64 (N,)
    values: np.ndarray  # float64 (N, S)
    stale: np.ndarray  # bool (N,)

    def __len__(self) -> int:
        return len(self.ts_ns)

    def column(self, name: str) -> np.ndarray:
        return self.values[:, self.names.index(name)]


@dataclass(frozen=True)
class _BitGroup:
    local: np.ndarray  # indices into the plan's signals
    byte: np.ndarray  # (k,) byte of each field in the datagram's data
    nbytes: int
    shift: np.ndarray  # (k,) uint64
    mask: np.ndarray  # (k,) uint64
    sign: np.ndarray  # (k,) uint64: the sign bit of signed fields (0 for the others)
    kind: str  # 'b', 'u', 'i', 'f4', 'f8'

    def decode(self, data: np.ndarray) -> np.ndarray:
        k, nb = len(self.local), self.nbytes
        if nb == 1 and self.kind in "bu":
            v8 = data[:, self.byte]
            return ((v8 >> self.shift.astype(np.uint8)) & self.mask.astype(np.uint8)).astype(np.float64)
        idx = (self.byte[:, None] + np.arange(nb)[None, :]).ravel()
        cols = data[:, idx].reshape(len(data), k, nb)
        v = cols[:, :, 0].astype(np.uint64)
        for i in range(1, nb):
            v |= cols[:, :, i].astype(np.uint64) << np.uint64(8 * i)
        v >>= self.shift
        v &= self.mask
        if self.kind == "i":
            v = (v ^ self.sign) - self.sign
            return v.view(np.int64).astype(np.float64)
        if self.kind == "f4":
            return v.astype(np.uint32).view(np.float32).astype(np.float64)
        if self.kind == "f8":
            return v.view(np.float64).copy()
        return v.astype(np.float64)


@dataclass
class _Plan:
    """How to decode the signals bound to one datagram."""

    key: DatagramKey
    cols: np.ndarray  # int64 (s,): the signals' columns in the rows (map order)
    src: np.dtype | None  # structured view of one datagram's data: the plain fields
    dst_rows: np.dtype | None  # the same fields as float64 at their columns of a row of all S signals
    dst_own: np.dtype | None  # ... at their positions in a row of this plan's s signals
    plain: np.ndarray  # positions (in this plan) of the plain fields, in src order
    groups: list[_BitGroup]
    span: slice | None  # cols as a slice where they are consecutive
    all_own: np.dtype  # a row of this plan's s values as a record ...
    all_rows: np.dtype  # ... and the same values at their columns of a row of all S signals

    def scatter(self, out: np.ndarray, own: np.ndarray, at: np.ndarray) -> None:
        """out[:, cols] = own[at], without numpy's slow fancy assignment to columns."""
        if self.span is not None:
            out[:, self.span] = own[at]
        else:
            out.view(self.all_rows)[:, 0][...] = np.take(own.view(self.all_own)[:, 0], at)

    def decode(self, data: np.ndarray, dst: np.ndarray, *, rows: bool) -> None:
        """Raw values of `data` (M, length) into `dst` (M, S) at the signals' columns (`rows`) or into
        `dst` (M, s) in plan order."""
        if data.strides[-1] != 1 or data.shape[1] != self.key.length:
            data = np.ascontiguousarray(data[:, : self.key.length])
        if self.src is not None:
            layout = self.dst_rows if rows else self.dst_own
            assert layout is not None  # set with src
            target = dst.view(layout)[:, 0]
            target[...] = data.view(self.src)[:, 0]
        for g in self.groups:
            where = self.cols[g.local] if rows else g.local
            dst[:, where] = g.decode(data)


def _record(formats: Sequence[str], offsets: Sequence[int], itemsize: int, names: Sequence[str]) -> np.dtype:
    """A structured dtype: fields `names` of `formats` at byte `offsets` in records of `itemsize` bytes."""
    spec: Any = {
        "names": list(names),
        "formats": list(formats),
        "offsets": list(offsets),
        "itemsize": itemsize,
    }
    return np.dtype(spec)


def _plan(key: DatagramKey, members: list[tuple[int, Signal, int]], total: int) -> _Plan:
    """`members`: (column, signal, byte offset in this datagram's data)."""
    cols = np.array([c for c, _, _ in members], dtype=np.int64)
    plain = [p for p, (_, s, _) in enumerate(members) if s.plain]
    src = dst_rows = dst_own = None
    if plain:
        names = [f"f{p}" for p in plain]
        f8 = ["<f8"] * len(plain)
        src = _record(
            [members[p][1].type.fmt for p in plain], [members[p][2] for p in plain], key.length, names
        )
        dst_rows = _record(f8, [8 * int(cols[p]) for p in plain], 8 * total, names)
        dst_own = _record(f8, [8 * p for p in plain], 8 * len(members), names)
    grouped: dict[tuple[int, str], list[int]] = {}
    for p, (_, s, _) in enumerate(members):
        if not s.plain:
            kind = s.type.kind if s.type.kind != "f" else f"f{s.type.size}"
            grouped.setdefault((s.nbytes, kind), []).append(p)
    groups = []
    for (nb, kind), ps in grouped.items():
        sigs = [members[p][1] for p in ps]
        groups.append(
            _BitGroup(
                local=np.array(ps, dtype=np.int64),
                byte=np.array([members[p][2] for p in ps], dtype=np.int64),
                nbytes=nb,
                shift=np.array([s.bit for s in sigs], dtype=np.uint64),
                mask=np.array([(1 << s.width) - 1 for s in sigs], dtype=np.uint64),
                sign=np.array([1 << (s.width - 1) if kind == "i" else 0 for s in sigs], dtype=np.uint64),
                kind=kind,
            )
        )
    consecutive = bool(np.all(np.diff(cols) == 1))
    every = [f"f{p}" for p in range(len(members))]
    all_own = _record(["<f8"] * len(members), [8 * p for p in range(len(members))], 8 * len(members), every)
    all_rows = _record(["<f8"] * len(members), [8 * int(c) for c in cols], 8 * total, every)
    return _Plan(
        key,
        cols,
        src,
        dst_rows,
        dst_own,
        np.array(plain, dtype=np.int64),
        groups,
        slice(int(cols[0]), int(cols[-1]) + 1) if consecutive else None,
        all_own,
        all_rows,
    )


@dataclass
class SignalExtractor:
    """FrameBatch -> SignalRows, one row per bus cycle.

    A bus cycle is an occurrence of the reference datagram: the one holding the map's first signal.
    Signals of other datagrams take that datagram's value from the same frame when it is there, else the
    latest seen before (carried from batch to batch; NaN until first seen). A signal is bound to the
    datagram that holds it when that datagram is first seen (YAML maps) and stays bound. A row is stale
    when a datagram it takes values from was stale (`DatagramColumns.stale`, which the frame stage sets
    from the working counter; never where it is absent).

    `counts`: rows, stale_rows, filled_rows (rows with a value carried from an earlier frame)."""

    pmap: ProcessMap
    counts: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        n = len(self.pmap.signals)
        self._binding: list[tuple[DatagramKey, int] | None] = [None] * n
        self._scale = np.array([s.scale for s in self.pmap.signals], dtype=np.float64)
        # x + -0.0 is x for every x (x + 0.0 turns -0.0 into 0.0): zero offsets keep a float's sign
        self._offset = np.array([s.offset or -0.0 for s in self.pmap.signals], dtype=np.float64)
        self._identity = bool(np.all(self._scale == 1.0) and np.all(self._offset == 0.0))
        self._carry = np.full(n, np.nan)  # raw value of each signal at its datagram's latest occurrence
        self._carry_stale: dict[DatagramKey, bool] = {}
        self._plans: dict[DatagramKey, _Plan] = {}
        self._unbound = np.arange(n, dtype=np.int64)

    @property
    def names(self) -> tuple[str, ...]:
        return self.pmap.names

    def bind(self, keys: Iterable[DatagramKey]) -> None:
        """Bind the signals to these datagrams (those the bus carries regularly) before the first batch:
        a datagram seen only in a damaged frame must not capture a signal."""
        self._bind(keys)

    def _bind(self, keys: Iterable[DatagramKey]) -> None:
        found = resolve(self.pmap, keys)
        changed = False
        for i in self._unbound.tolist():
            if found[i] is not None:
                self._binding[i] = found[i]
                changed = True
        if not changed:
            return
        members: dict[DatagramKey, list[tuple[int, Signal, int]]] = {}
        for i, b in enumerate(self._binding):
            if b is not None:
                members.setdefault(b[0], []).append((i, self.pmap.signals[i], b[1]))
        total = len(self.pmap.signals)
        self._plans = {k: _plan(k, m, total) for k, m in members.items()}
        self._unbound = np.array([i for i, b in enumerate(self._binding) if b is None], dtype=np.int64)

    @staticmethod
    def _stale(key: DatagramKey, frames: FrameBatch) -> np.ndarray:
        cols = frames.datagrams[key]
        stale = getattr(cols, "stale", None)  # set by the frame stage (against `ProcessMap.expected_wkc`)
        if stale is None or len(stale) != len(cols.frame):
            return np.zeros(len(cols.frame), dtype=bool)
        return np.asarray(stale, dtype=bool)

    def extract(self, frames: FrameBatch) -> SignalRows:
        if len(self._unbound):
            self._bind(frames.datagrams.keys())
        ref = self._binding[0][0] if self._binding[0] is not None else None
        if ref is None or ref not in frames.datagrams or len(frames.datagrams[ref].frame) == 0:
            self._carry_only(frames, skip=None)
            return self._empty()
        with np.errstate(all="ignore"):  # NaN/inf floats on the wire, inf * 0 scales: values, not errors
            return self._rows(frames, ref)

    def _empty(self) -> SignalRows:
        return SignalRows(
            self.names,
            np.empty(0, dtype=np.int64),
            np.empty((0, len(self.pmap.signals))),
            np.empty(0, dtype=bool),
        )

    def _carry_only(self, frames: FrameBatch, skip: DatagramKey | None) -> None:
        """Remember the latest value of each datagram in a batch that makes no rows."""
        for key, plan in self._plans.items():
            cols = frames.datagrams.get(key)
            if key == skip or cols is None or len(cols.frame) == 0:
                continue
            last = np.empty((1, len(plan.cols)))
            with np.errstate(all="ignore"):
                plan.decode(cols.data[-1:], last, rows=False)
            self._carry[plan.cols] = last[0]
            self._carry_stale[key] = bool(self._stale(key, frames)[-1])

    def _rows(self, frames: FrameBatch, ref: DatagramKey) -> SignalRows:
        """Rows of a batch, CHUNK_ROWS bus cycles at a time (the temporaries stay in cache)."""
        f_ref = np.asarray(frames.datagrams[ref].frame)
        n = len(f_ref)
        out = np.empty((n, len(self.pmap.signals)))
        stale = np.zeros(n, dtype=bool)
        filled = np.zeros(n, dtype=bool)
        starts = np.arange(0, n, CHUNK_ROWS)
        edges = f_ref[starts[1:] - 1] + 1  # chunk c holds the frames before edges[c] (and after edges[c-1])
        parts: dict[DatagramKey, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = {}
        for key in self._plans:
            cols = frames.datagrams.get(key)
            if cols is not None and len(cols.frame):
                f_key = np.asarray(cols.frame)
                cut = np.concatenate([[0], np.searchsorted(f_key, edges), [len(f_key)]])
                parts[key] = (f_key, cols.data, self._stale(key, frames), cut)
        for c, i0 in enumerate(starts.tolist()):
            i1 = min(i0 + CHUNK_ROWS, n)
            chunk = {
                k: (f[cut[c] : cut[c + 1]], d[cut[c] : cut[c + 1]], st[cut[c] : cut[c + 1]])
                for k, (f, d, st, cut) in parts.items()
            }
            self._chunk(ref, f_ref[i0:i1], chunk, out[i0:i1], stale[i0:i1], filled[i0:i1])
        self.counts["rows"] += n
        self.counts["stale_rows"] += int(stale.sum())
        self.counts["filled_rows"] += int(filled.sum())
        return SignalRows(self.names, np.asarray(frames.ts_ns)[f_ref].astype(np.int64), out, stale)

    def _chunk(
        self,
        ref: DatagramKey,
        f_ref: np.ndarray,
        parts: dict[DatagramKey, tuple[np.ndarray, np.ndarray, np.ndarray]],
        out: np.ndarray,
        stale: np.ndarray,
        filled: np.ndarray,
    ) -> None:
        """Fill `out` (the rows of the reference occurrences in frames `f_ref`) from the occurrences in
        `parts` (frames, data, stale per datagram: those after the previous chunk's last row, up to this
        chunk's last row, or to the batch's end for the last chunk)."""
        n = len(f_ref)
        ref_plan = self._plans[ref]
        _, ref_data, ref_stale = parts[ref]
        ref_plan.decode(ref_data, out, rows=True)
        self._carry[ref_plan.cols] = out[-1, ref_plan.cols]
        stale |= ref_stale
        for key, plan in self._plans.items():
            if key == ref:
                continue
            carried_stale = self._carry_stale.get(key, False)
            part = parts.get(key)
            if part is None or len(part[0]) == 0:
                out[:, plan.cols] = self._carry[plan.cols]
                stale |= carried_stale
                filled[:] = True
                continue
            f_key, data, key_stale = part
            if len(f_key) == n and np.array_equal(f_key, f_ref):  # in every frame of the reference
                plan.decode(data, out, rows=True)
                stale |= key_stale
                self._carry[plan.cols] = out[-1, plan.cols]
            else:
                own = np.empty((len(f_key) + 1, len(plan.cols)))
                own[0] = self._carry[plan.cols]
                plan.decode(data, own[1:], rows=False)
                at = np.searchsorted(f_key, f_ref, side="right")  # 0: carried from before
                plan.scatter(out, own, at)
                stale |= np.concatenate([[carried_stale], key_stale])[at]
                filled |= (at == 0) | (f_key[np.maximum(at - 1, 0)] != f_ref)
                self._carry[plan.cols] = own[-1]
            self._carry_stale[key] = bool(key_stale[-1])
        if len(self._unbound):
            out[:, self._unbound] = np.nan
        if not self._identity:
            out *= self._scale
            out += self._offset
