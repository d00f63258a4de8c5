"""Fuzzing campaign for the EtherCAT decoders (issue 12, item 7): mutated frames through the frame decoder,
the signal extractor and the daemon's whole bus chain, and corrupted pcap/pcapng files through the
capture reader.

Two targets:

- ``frames``: streams of RecordBatches as a capture of a cyclic bus gives them (the simulated cell's
  LRW process image + ARMW, or a bus of three logical datagrams in two frames; both copies of each frame
  or the returned one only; Ethernet, 802.1Q/802.1ad tags, Linux cooked capture v1/v2, EtherCAT over
  UDP), with mailbox, register, NOP and other traffic mixed in, and frames mutated: bit flips, byte
  replacements, truncations (snap-length cuts and short wire lengths), extensions, the EtherCAT length
  field and frame type, datagram length fields, the more-follows and circulating bits, commands out of
  range, addresses (across the mailbox boundary), datagram headers spliced from other frames (inserted,
  deleted, duplicated, swapped), working counters, source MACs (the copy direction bit), the link layer
  (EtherTypes, VLAN tags, IPv4/UDP fields), record metadata (offsets, lengths and wire lengths that lie,
  unknown link types, records over 256 KiB), interesting integers, shifted bytes, random garbage and
  capture times (backwards, frozen, negative, at the int64 edge). Mutations hit single records or whole
  runs of records alike (the fast path groups those). Each batch goes through ``FrameDecoder`` (fast
  path) and ``FrameDecoder(fast=False)`` (per-record path), the ``SignalExtractor`` of the stream's map
  on both outputs, and a ``BusChain`` (decode -> map -> resample -> cycles) end to end.
- ``files``: pcap (little/big-endian, µs/ns, Ethernet/SLL/SLL2) and pcapng files (one or two sections of
  both byte orders, several interfaces with if_tsresol/if_tsoffset, EPB/SPB/OPB/NRB/ISB/custom blocks)
  with mutated headers, block types and lengths (one end, both ends), captured/original lengths,
  timestamps, interface options, truncations, inserted/deleted/duplicated/dropped blocks, splices of two
  files and random bytes, read by ``CaptureReader`` with the vectorized path at random chunk sizes and
  with the per-record path, then decoded (both decoder paths) and fed to a ``BusChain``.

Checks, per batch (``frames``) or per file (``files``); any failure is a **crash**:
- no exception escapes (``CaptureError`` at open is the documented refusal of a file that is no capture);
  a batch or file running past ``--timeout`` is a hang;
- every record is counted once: ``records == frames + outgoing_copy + not_ethercat + sum(rejections)``
  (frames.py's invariant), rejection reasons in ``frames.REJECTIONS`` (and pcap.py's documented set);
- the FrameBatch is well formed (frame indices in range, ascending, every kept frame has a datagram,
  shapes and dtypes, ``stale`` counted, nothing aliases the batch buffer, times from the batch);
- the fast path and the per-record path agree exactly (times, counts, rejections, keys, frame/data/WKC/
  stale columns), and so do the signal rows extracted from each (values, NaN included, times, stale);
  the vectorized and the per-record capture reader give the same records and rejections;
- the decoder's learned state stays within its bounds (keys, WKC values, masters, layout memory), and
  the worker's RSS is sampled after every task (growth reported).
Soft findings are tallied and reported, not failed: clean returned copies a batch did not keep, bus
chains that never produced a message, non-finite values in messages, warnings, the resampler's held rows.

Input ``i`` of a target (a stream of batches, a file) is a pure function of (``--seed``, target, i):
``--replay TARGET I`` regenerates it and runs it with a traceback for each failure; ``--minimize frames I``
shrinks the first failing batch of stream I to the fewest records that still fail (printed as Python).

Usage:  python benchmarks/fuzz_ethercat.py [-n 1000000] [--files 3000] [--workers 2] [--seed 0]
            [--targets frames,files] [--out benchmarks/results/fuzz_ethercat.md]
        python benchmarks/fuzz_ethercat.py --replay frames 17
        python benchmarks/fuzz_ethercat.py --minimize frames 17
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import re
import resource
import signal
import struct
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from ingest.ethercat import frames as frames_module  # noqa: E402
from ingest.ethercat.frames import REJECTIONS, FrameDecoder  # noqa: E402
from ingest.ethercat.mapping import ProcessMap, SignalExtractor, SignalRows, load_eni, load_yaml_map  # noqa: E402
from ingest.ethercat.pcap import CaptureError, CaptureReader, CaptureWriter  # noqa: E402
from ingest.ethercat.source import BusChain  # noqa: E402
from ingest.ethercat.types import (  # noqa: E402
    LINKTYPE_ETHERNET,
    LINKTYPE_LINUX_SLL,
    LINKTYPE_LINUX_SLL2,
    FrameBatch,
    RecordBatch,
)
from ingest.sim import ethercat as sim  # noqa: E402
from ingest.voraus.schema import MACHINE_SIGNALS  # noqa: E402

TARGETS = ("frames", "files")
CHUNK = {"frames": 1, "files": 20}  # inputs per task sent to a worker
CRASH = "CRASH"

T0 = 1_767_225_600_000_000_000  # 2026-01-01T00:00:00Z
BUS_NS = 1_000_000  # a 1 kHz bus
RING_NS = 35_000  # the returned copy comes back this much later
MODEL_PERIOD_NS = 10_000_000  # the model's grid: 100 Hz
MASTER = sim.MASTER_MAC
MAX_BATCH = 16384
LRD, LWR, LRW, ARMW = 10, 11, 12, 13
APRD, FPRD, FPWR, BRD, FRMW, NOP = 1, 4, 5, 7, 14, 0
INT64_MAX = 2**63 - 1

COUNT_NAMES = frozenset(
    {"records", "frames", "mailbox", "other_frame_type", "outgoing_copy", "not_ethercat", "stale"}
    | {f"datagrams_{name}" for name in frames_module.COMMANDS.values()}
)
READER_REASONS = frozenset(
    {
        "truncated_file",
        "corrupt_block",
        "bad_length",
        "record_too_large",
        "unknown_interface",
        "unknown_linktype",
        "no_timestamp",
    }
)


class Failure(Exception):
    """A check failed (the message says which and how)."""


class Hang(Exception):
    """The input ran past the per-input time limit."""


# --------------------------------------------------------------------------------------------------
# frames, built by hand (the byte layout of ethercat.md; scapy is too slow for a million of them)


@dataclass(frozen=True)
class Shape:
    """Where a record's fields are: the source MAC, the protocol field, IPv4/UDP headers (-1 if none),
    the EtherCAT header and each datagram's header with its data length."""

    mac_at: int
    proto_at: int
    ip_at: int
    udp_at: int
    ecat_at: int
    dgs: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Seed:
    name: str
    record: bytes
    linktype: int
    shape: Shape


Item = tuple[int, int, bytes, int]  # command, address, data, wkc


def datagrams(items: Sequence[Item]) -> bytes:
    out = bytearray()
    for k, (command, address, data, wkc) in enumerate(items):
        more = 0x8000 if k < len(items) - 1 else 0
        out += struct.pack("<BBIHH", command, k & 0xFF, address & 0xFFFFFFFF, len(data) | more, 0)
        out += data + struct.pack("<H", wkc)
    return bytes(out)


def ecat_frame(items: Sequence[Item], frame_type: int = 1) -> bytes:
    body = datagrams(items)
    return struct.pack("<H", len(body) | frame_type << 12) + body


def _ipv4_udp(payload: bytes, *, dport: int = 0x88A4, flags_fragment: int = 0, proto: int = 17) -> bytes:
    udp = struct.pack(">HHHH", 0x88A4, dport, 8 + len(payload), 0) + payload
    ip = struct.pack(
        ">BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, flags_fragment, 64, proto, 0, b"\n\0\0\1", b"\n\0\0\2"
    )
    return ip + udp


CARRIERS = ("eth", "eth", "eth", "vlan", "qinq", "sll", "sll2", "udp", "sll-udp")


def wrap(carrier: str, ecat: bytes, src: bytes, *, pad: bool = True) -> tuple[bytes, int, Shape]:
    """An EtherCAT frame (`ecat`: header + datagrams) on a carrier: the record, its link type, its shape."""
    dgs = _datagram_positions(ecat)
    if carrier in ("udp", "sll-udp"):
        payload = _ipv4_udp(ecat)
        inner = ("sll" if carrier == "sll-udp" else "eth", 0x0800)
    else:
        payload, inner = ecat, (carrier, 0x88A4)
    kind, proto = inner
    if kind in ("eth", "vlan", "qinq"):
        tags = {"eth": b"", "vlan": b"\x81\x00\x00\x05", "qinq": b"\x88\xa8\x00\x07\x81\x00\x00\x05"}[kind]
        head = b"\xff" * 6 + src + tags + struct.pack(">H", proto)
        record, linktype, mac_at, proto_at = head + payload, LINKTYPE_ETHERNET, 6, 12
        if pad and len(record) < 60:
            record += b"\0" * (60 - len(record))
    elif kind == "sll":
        head = struct.pack(">HHH", 4, 1, 6) + src + b"\0\0" + struct.pack(">H", proto)
        record, linktype, mac_at, proto_at = head + payload, LINKTYPE_LINUX_SLL, 6, 14
    else:
        head = struct.pack(">HHIHBB", proto, 0, 3, 1, 4, 6) + src + b"\0\0"
        record, linktype, mac_at, proto_at = head + payload, LINKTYPE_LINUX_SLL2, 12, 0
    start = len(head)
    if carrier in ("udp", "sll-udp"):
        ip_at, udp_at, ecat_at = start, start + 20, start + 28
    else:
        ip_at, udp_at, ecat_at = -1, -1, start
    return (
        record,
        linktype,
        Shape(mac_at, proto_at, ip_at, udp_at, ecat_at, tuple((ecat_at + a, n) for a, n in dgs)),
    )


def _datagram_positions(ecat: bytes) -> list[tuple[int, int]]:
    out, at = [], 2
    while at + 12 <= len(ecat):
        length = int.from_bytes(ecat[at + 6 : at + 8], "little")
        out.append((at, length & 0x7FF))
        at += 12 + (length & 0x7FF)
        if not length & 0x8000:
            break
    return out


def returned_mac() -> bytes:
    return bytes([MASTER[0] | 0x02]) + MASTER[1:]


# --------------------------------------------------------------------------------------------------
# the buses, their maps and the other traffic


@dataclass
class Bus:
    """A cyclic bus: per cycle the frames of its datagrams (items with the WKC of the returned copy)."""

    name: str
    cycle: Callable[[int, np.random.Generator], list[list[Item]]]


def _sim_bus() -> tuple[Bus, sim.BusLayout]:
    names = list(MACHINE_SIGNALS)
    layout = sim.layout(names)
    rng = np.random.default_rng(7)
    values = rng.normal(0, 1, (256, len(names)))
    images = sim.encode(layout, names, values, np.arange(256) // 25)

    def cycle(k: int, _: np.random.Generator) -> list[list[Item]]:
        image = images[k % len(images)].tobytes()
        system_time = struct.pack("<Q", k * BUS_NS)
        return [
            [(LRW, sim.LRW_ADDRESS, image, 3 * sim.N_SLAVES), (ARMW, 0x0910 << 16, system_time, sim.N_SLAVES)]
        ]

    return Bus("sim", cycle), layout


SPLIT_A, SPLIT_B, SPLIT_C = 0x0002_0000, 0x0003_0000, 0x0004_0000


def _split_bus() -> Bus:
    """Three logical datagrams: an LRD of 32 B and an LWR of 16 B in every cycle's frame, an LRD of 8 B in
    a second frame every other cycle (the map's signals of it are carried forward)."""

    def cycle(k: int, rng: np.random.Generator) -> list[list[Item]]:
        a = bytearray(rng.integers(0, 256, 32, dtype=np.uint8).tobytes())
        a[0:2] = struct.pack("<H", (k // 40) & 0xFFFF)  # the cycle counter
        a[8:12] = struct.pack("<f", math.sin(k / 50.0))
        a[16:24] = struct.pack("<d", math.cos(k / 70.0))
        frames_ = [
            [
                (LRD, SPLIT_A, bytes(a), 5),
                (LWR, SPLIT_B, rng.integers(0, 256, 16, dtype=np.uint8).tobytes(), 2),
            ]
        ]
        if k % 2 == 0:
            frames_.append([(LRD, SPLIT_C, rng.integers(0, 256, 8, dtype=np.uint8).tobytes(), 1)])
        return frames_

    return Bus("split", cycle)


SPLIT_MAP = """\
# signals of every type in the three datagrams of the split bus (the first signal's datagram is the cycle)
robot: robot-split
cycle_signal: counter
signals:
  - {name: counter, address: 0x00020000, type: uint16}
  - {name: speed, address: 0x00020002, type: int16, scale: 0.01}
  - {name: flag_a, address: 0x00020004, type: bool, bit: 0}
  - {name: flag_b, address: 0x00020004, type: bool, bit: 7}
  - {name: mode, address: 0x00020005, type: uint8, bit: 2, bits: 3}
  - {name: step, address: 0x00020006, type: int16, bit: 3, bits: 9}
  - {name: level, address: 0x00020008, type: float32}
  - {name: small, address: 0x0002000c, type: int8, scale: 0.5, offset: -1.0}
  - {name: tiny, address: 0x0002000d, type: uint8}
  - {name: angle, address: 0x00020010, type: float64}
  - {name: big, address: 0x00020018, type: int64, scale: 1.0e-9}
  - {name: ubig, address: 0x00030000, type: uint64, command: LWR}
  - {name: out_word, address: 0x00030008, type: uint32, command: LWR, scale: 1.0e-3}
  - {name: out_bits, address: 0x0003000c, type: uint32, bit: 5, bits: 20, command: LWR}
  - {name: slow_a, address: 0x00040000, type: int32, scale: 1.0e-6}
  - {name: slow_b, address: 0x00040004, type: float32}
"""


def other_seeds() -> list[Seed]:
    """Traffic besides the cyclic stream: start-up and register access, mailboxes, NOPs, other frame
    types, other protocols, on several carriers."""
    out: list[Seed] = []
    mbx = bytes(range(48))
    ecats = {
        "mailbox": ecat_frame([(FPWR, 0x1001 | 0x1000 << 16, mbx, 1), (FPRD, 0x1001 | 0x1080 << 16, mbx, 1)]),
        "al_status": ecat_frame([(BRD, 0x0130 << 16, b"\x08\x00", 7)]),
        "scan": ecat_frame(
            [(APRD, 0xFFFF | 0x0000 << 16, b"\0" * 4, 1), (APRD, 0xFFFE | 0x0130 << 16, b"\0\0", 1)]
        ),
        "dc": ecat_frame(
            [(FRMW, 0x1001 | 0x0910 << 16, b"\0" * 8, 7), (FPRD, 0x1002 | 0x0910 << 16, b"\0" * 8, 1)]
        ),
        "nop": ecat_frame([(NOP, 0, b"\0" * 6, 0), (LRD, 0x0005_0000, b"\x01\x02\x03\x04", 1)]),
        "empty_lrd": ecat_frame([(LRD, 0x0006_0000, b"", 1)]),
        "gateway": ecat_frame([(FPRD, 0x1001 | 0x1000 << 16, mbx[:16], 1)], frame_type=5),
        "type4": ecat_frame([(LRD, 0x10000, b"\0" * 4, 1)], frame_type=4),
        "many": ecat_frame([(LRD, 0x0007_0000 + 64 * k, bytes([k]) * (1 + k), k) for k in range(12)]),
        "jumbo": ecat_frame([(LRW, 0x0008_0000, bytes(range(256)) * 5 + b"\x55" * 200, 3)]),
    }
    for name, ecat in ecats.items():
        for carrier in ("eth", "vlan", "sll", "sll2", "udp"):
            for src in (MASTER, returned_mac()):
                record, linktype, shape = wrap(carrier, ecat, src)
                out.append(Seed(f"{name}/{carrier}", record, linktype, shape))
    # other protocols: ARP, IPv4/TCP, UDP to another port, IPv6, fragments, three VLAN tags, an FCS
    lrd = ecat_frame([(LRD, 0x10000, b"\xaa" * 8, 1)])
    eth = b"\xff" * 6 + MASTER
    none = Shape(6, 12, -1, -1, 14, ())
    out += [
        Seed("arp", eth + b"\x08\x06" + bytes(46), LINKTYPE_ETHERNET, none),
        Seed("tcp", eth + b"\x08\x00" + _ipv4_udp(b"x" * 30, proto=6), LINKTYPE_ETHERNET, none),
        Seed("udp_other", eth + b"\x08\x00" + _ipv4_udp(lrd, dport=53), LINKTYPE_ETHERNET, none),
        Seed("ipv6", eth + b"\x86\xdd" + bytes(60), LINKTYPE_ETHERNET, none),
        Seed(
            "fragment_first",
            eth + b"\x08\x00" + _ipv4_udp(lrd, flags_fragment=0x2000),
            LINKTYPE_ETHERNET,
            none,
        ),
        Seed(
            "fragment_later",
            eth + b"\x08\x00" + _ipv4_udp(lrd, flags_fragment=0x0010),
            LINKTYPE_ETHERNET,
            none,
        ),
        Seed("three_tags", eth + b"\x81\x00\0\1" * 3 + b"\x88\xa4" + lrd, LINKTYPE_ETHERNET, none),
    ]
    record, linktype, shape = wrap("eth", lrd, returned_mac())
    out.append(Seed("fcs", record + b"\xde\xad\xbe\xef", linktype, shape))
    return out


STARTUP = ("al_status", "scan", "dc", "mailbox")


@dataclass
class MapSetup:
    name: str
    bus: str
    pmap: ProcessMap

    @property
    def expected_wkc(self) -> dict[Any, int]:
        return dict(self.pmap.expected_wkc.items())


@dataclass
class Seeds:
    buses: dict[str, Bus]
    maps: list[MapSetup]
    others: list[Seed]
    startup: list[Seed]
    files: list[tuple[str, bytes]]  # name, file contents


def build_seeds(tmp: Path) -> Seeds:
    sim_bus, layout = _sim_bus()
    buses = {"sim": sim_bus, "split": _split_bus()}
    (tmp / "sim.map.yaml").write_text(sim.yaml_map(layout))
    (tmp / "sim.eni.xml").write_text(sim.eni_xml(layout, cycle_time_us=1000))
    (tmp / "split.map.yaml").write_text(SPLIT_MAP)
    maps = [
        MapSetup("sim-yaml", "sim", load_yaml_map(tmp / "sim.map.yaml")),
        MapSetup("sim-eni", "sim", load_eni(tmp / "sim.eni.xml")),
        MapSetup("split-yaml", "split", load_yaml_map(tmp / "split.map.yaml")),
    ]
    others = other_seeds()
    startup = [s for s in others if s.name.split("/")[0] in STARTUP]
    return Seeds(buses, maps, others, startup, build_file_seeds(tmp, buses, others))


# --------------------------------------------------------------------------------------------------
# a stream of clean records (the bus as a capture at the master holds it)


@dataclass
class Rec:
    """A record being built: its bytes, link type, wire length and capture time, the shape of its seed
    (None: no structure known), whether it was mutated and whether it is a clean returned copy of the
    map's cyclic frame (the decoder must keep those)."""

    data: bytes
    linktype: int
    wire: int
    ts: int
    shape: Shape | None
    mutated: bool = False
    clean_returned: bool = False
    ts_tampered: bool = False


class CleanStream:
    def __init__(
        self, bus: Bus, carrier: str, both: bool, rng: np.random.Generator, start_cycle: int
    ) -> None:
        self.bus, self.carrier, self.both, self.rng = bus, carrier, both, rng
        self.k = start_cycle
        self.pending: list[Rec] = []
        self.jitter = int(rng.integers(0, 30_000))
        self.offset = 0

    def next(self) -> Rec:
        if not self.pending:
            base = self.offset + T0 + self.k * BUS_NS + int(self.rng.integers(-self.jitter, self.jitter + 1))
            for f, items in enumerate(self.bus.cycle(self.k, self.rng)):
                at = base + f * 3_000
                if self.both:
                    zero = [
                        (c, a, d if c != LRW else d[: len(d) // 2] + bytes(len(d) - len(d) // 2), 0)
                        for c, a, d, _ in items
                    ]
                    record, linktype, shape = wrap(self.carrier, ecat_frame(zero), MASTER)
                    self.pending.append(Rec(record, linktype, len(record), at, shape))
                record, linktype, shape = wrap(self.carrier, ecat_frame(items), returned_mac())
                self.pending.append(
                    Rec(record, linktype, len(record), at + RING_NS, shape, clean_returned=f == 0)
                )
            self.k += 1
        return self.pending.pop(0)


# --------------------------------------------------------------------------------------------------
# mutations of one record

INTERESTING = (
    0,
    1,
    0x7F,
    0x80,
    0xFF,
    0x7FF,
    0x800,
    0x7FFF,
    0x8000,
    0xFFFF,
    0x1000,
    0x0FFF,
    2**31 - 1,
    2**32 - 1,
)
OPS = (
    "bitflip",
    "byte",
    "truncate",
    "extend",
    "ecat_length",
    "dg_length",
    "more_bit",
    "command",
    "address",
    "splice",
    "garbage",
    "link",
    "wkc",
    "mac",
    "meta",
    "ints",
    "shift",
    "timestamp",
    "ts_ahead",
)
PROFILES: dict[str, dict[str, float]] = {
    "mixed": {
        "bitflip": 14,
        "byte": 10,
        "truncate": 8,
        "extend": 5,
        "ecat_length": 7,
        "dg_length": 8,
        "more_bit": 7,
        "command": 6,
        "address": 5,
        "splice": 8,
        "garbage": 4,
        "link": 5,
        "wkc": 3,
        "mac": 3,
        "meta": 3,
        "ints": 4,
        "shift": 3,
        "timestamp": 2,
    },
    # many distinct datagram keys and masters: the decoder's learned state must stay bounded
    "flood": {"address": 30, "mac": 25, "command": 10, "wkc": 15, "dg_length": 5, "bitflip": 10, "splice": 5},
    # capture times gone wrong (a corrupt pcapng gives any int64)
    # (one capture time far ahead makes the resampler drop every later one: only in this profile)
    "clock": {
        "timestamp": 40,
        "ts_ahead": 3,
        "bitflip": 20,
        "truncate": 10,
        "ecat_length": 10,
        "garbage": 10,
    },
    # the EtherCAT structure itself
    "structure": {
        "ecat_length": 20,
        "dg_length": 25,
        "more_bit": 20,
        "splice": 25,
        "command": 10,
        "shift": 10,
    },
}
PROFILE_WEIGHTS = {"mixed": 70, "flood": 10, "clock": 10, "structure": 10}


def _pick(rng: random.Random, weights: Mapping[str, float]) -> str:
    names = list(weights)
    return rng.choices(names, [weights[n] for n in names])[0]


def _header_end(rec: Rec) -> int:
    s = rec.shape
    if s is None or not s.dgs:
        return min(len(rec.data), 64)
    return min(len(rec.data), s.dgs[0][0] + 10)


def _boundaries(rec: Rec) -> list[int]:
    s = rec.shape
    out = [0, len(rec.data)]
    if s is not None:
        out += [s.proto_at, s.ecat_at, s.ecat_at + 2]
        if s.ip_at >= 0:
            out += [s.ip_at, s.udp_at, s.udp_at + 8]
        for at, n in s.dgs:
            out += [at, at + 10, at + 10 + n, at + 12 + n]
    return out


def _put(b: bytearray, at: int, value: int, width: int) -> None:
    if at >= 0 and at + width <= len(b):
        b[at : at + width] = (value % (1 << (8 * width))).to_bytes(width, "little")


def _set(b: bytearray, at: int, value: int) -> None:
    if 0 <= at < len(b):
        b[at] = value


def _get(b: bytes | bytearray, at: int, width: int) -> int:
    if at >= 0 and at + width <= len(b):
        return int.from_bytes(b[at : at + width], "little")
    return 0


def mutate(
    rng: random.Random, rec: Rec, op: str, others: Sequence[Seed], meta: list[tuple[str, int]]
) -> None:
    """Apply one mutation `op` to `rec` in place (record metadata changes go to `meta`, applied when the
    batch is laid out)."""
    b = bytearray(rec.data)
    n = len(b)
    s = rec.shape
    dgs = list(s.dgs) if s is not None else []
    dg = rng.choice(dgs) if dgs else None
    if op == "bitflip" and n:
        for _ in range(rng.choice((1, 1, 1, 2, 3, 8))):
            i = (
                rng.randrange(_header_end(rec))
                if rng.random() < 0.5 and _header_end(rec)
                else rng.randrange(n)
            )
            b[i] ^= 1 << rng.randrange(8)
    elif op == "byte" and n:
        for _ in range(rng.choice((1, 1, 2, 4))):
            i = (
                rng.randrange(_header_end(rec))
                if rng.random() < 0.5 and _header_end(rec)
                else rng.randrange(n)
            )
            b[i] = rng.choice((0, 0xFF, 0x7F, 0x80, rng.randrange(256)))
    elif op == "truncate":
        cut = (
            rng.choice(_boundaries(rec)) + rng.randint(-2, 2) if rng.random() < 0.6 else rng.randrange(n + 1)
        )
        cut = min(max(cut, 0), n)
        del b[cut:]
        if rng.random() < 0.4:  # cut on the wire too, else by the snap length (the wire length stays)
            rec.wire = cut
    elif op == "extend":
        extra = rng.choice((b"\0", b"\xff", None))
        k = rng.randint(1, 64)
        b += (extra * k) if extra else rng.randbytes(k)
        if rng.random() < 0.7:
            rec.wire = len(b)
    elif op == "ecat_length" and s is not None:
        header = _get(b, s.ecat_at, 2)
        length = header & 0x7FF
        choice = rng.randrange(6)
        if choice == 0:
            length = rng.choice((0, 1, 2, 11, 12, 0x7FF))
        elif choice == 1:
            length = length + rng.choice((-16, -4, -2, -1, 1, 2, 4, 16))
        elif choice == 2:
            length = rng.randrange(0x800)
        if choice == 3:  # the frame type
            header = (header & 0x0FFF) | rng.randrange(16) << 12
        elif choice == 4:  # the reserved bit
            header ^= 0x0800
        else:
            header = (header & 0xF800) | (length & 0x7FF)
        _put(b, s.ecat_at, header, 2)
    elif op == "dg_length" and dg is not None:
        field_ = _get(b, dg[0] + 6, 2)
        length = field_ & 0x7FF
        length = rng.choice((0, 1, 0x7FF, rng.randrange(0x800), length + rng.choice((-8, -2, -1, 1, 2, 8))))
        keep = field_ & 0xC000 if rng.random() < 0.8 else rng.randrange(4) << 14
        _put(b, dg[0] + 6, keep | (length & 0x7FF) | (field_ & 0x3800 if rng.random() < 0.8 else 0), 2)
    elif op == "more_bit" and dg is not None:
        _put(b, dg[0] + 6, _get(b, dg[0] + 6, 2) ^ (0x8000 if rng.random() < 0.8 else 0x4000), 2)
    elif op == "command" and dg is not None:
        _set(b, dg[0], rng.choice((15, 16, 0x7F, 0x80, 0xFF, rng.randrange(15, 256), rng.randrange(15))))
    elif op == "address" and dg is not None:
        at = dg[0] + 2
        choice = rng.randrange(5)
        if choice == 0:
            _put(b, at, rng.getrandbits(32), 4)
        elif choice == 1:  # the register (ADO) across the mailbox boundary
            _put(b, at + 2, rng.choice((0x0FFF, 0x1000, 0x1001, 0xFFFF, 0)), 2)
        elif choice == 2:
            _put(b, at, rng.getrandbits(16), 2)
        elif choice == 3:
            _put(b, at, _get(b, at, 4) ^ (1 << rng.randrange(32)), 4)
        else:
            _put(b, at, rng.choice(INTERESTING), 4)
    elif op == "splice" and s is not None:
        donor = rng.choice(others)
        ddgs = donor.shape.dgs
        choice = rng.randrange(5)
        if choice == 0 and ddgs and dg is not None:  # a datagram header from another frame
            d_at, _ = rng.choice(ddgs)
            b[dg[0] : dg[0] + 10] = donor.record[d_at : d_at + 10]
        elif choice == 1 and ddgs:  # a whole datagram of another frame inserted
            d_at, d_len = rng.choice(ddgs)
            piece = bytearray(donor.record[d_at : d_at + 12 + d_len])
            where = rng.choice([*(a + 12 + m for a, m in dgs), s.ecat_at + 2])
            if rng.random() < 0.5 and dgs:  # chain it: the more bit of the datagram before
                prev = max((a for a, m in dgs if a + 12 + m <= where), default=None)
                if prev is not None:
                    _put(b, prev + 6, _get(b, prev + 6, 2) | 0x8000, 2)
            if rng.random() < 0.5:
                _put(b, s.ecat_at, _get(b, s.ecat_at, 2) + len(piece), 2)
            b[where:where] = piece
        elif choice == 2 and dg is not None:  # a datagram deleted
            at, m = dg
            del b[at : at + 12 + m]
            if rng.random() < 0.5:
                _put(b, s.ecat_at, _get(b, s.ecat_at, 2) - 12 - m, 2)
        elif choice == 3 and dg is not None:  # a datagram duplicated
            at, m = dg
            b[at:at] = b[at : at + 12 + m]
            if rng.random() < 0.5:
                _put(b, s.ecat_at, _get(b, s.ecat_at, 2) + 12 + m, 2)
        elif len(dgs) >= 2:  # two datagram headers swapped
            (a, _), (c, _) = rng.sample(dgs, 2)
            b[a : a + 10], b[c : c + 10] = b[c : c + 10], b[a : a + 10]
    elif op == "garbage":
        choice = rng.randrange(4)
        k = rng.choice((0, 1, 13, 14, 15, 16, 17, 30, 60, 64, 200, 1514, rng.randrange(1600)))
        if choice == 0:
            b = bytearray(rng.randbytes(k))
        elif choice == 1 and s is not None:  # the link header kept, random after it
            b = b[: s.ecat_at] + rng.randbytes(k)
        elif choice == 2 and s is not None:  # the link and EtherCAT headers kept
            b = b[: s.ecat_at + 2] + rng.randbytes(k)
        else:
            b = bytearray(bytes([rng.choice((0, 0xFF, 0xA4))]) * k)
        rec.wire = len(b) if rng.random() < 0.8 else rng.randrange(2000)
        rec.shape = None
    elif op == "link" and s is not None:
        choice = rng.randrange(4)
        if choice == 0:
            _put(
                b,
                s.proto_at,
                rng.choice((0x8100, 0x88A8, 0x9100, 0x0800, 0x86DD, 0xA488, rng.getrandbits(16))),
                2,
            )
            b[s.proto_at : s.proto_at + 2] = b[s.proto_at : s.proto_at + 2][::-1]  # network order
        elif choice == 1 and rec.linktype == LINKTYPE_ETHERNET:  # tags inserted (up to 3: too many)
            tags = b"".join(
                rng.choice((b"\x81\x00", b"\x88\xa8", b"\x91\x00")) + rng.randbytes(2)
                for _ in range(rng.randint(1, 3))
            )
            b[12:12] = tags
        elif s.ip_at >= 0:  # IPv4/UDP header fields
            ip, udp = s.ip_at, s.udp_at
            which = rng.randrange(7)
            if which == 0:
                _set(b, ip, rng.choice((0x44, 0x46, 0x4F, 0x40, 0x65, rng.randrange(256))))
            elif which == 1:
                _put(b, ip + 2, rng.choice((0, 20, 27, 28, 0xFFFF, rng.getrandbits(16))), 2)
                b[ip + 2 : ip + 4] = b[ip + 2 : ip + 4][::-1]
            elif which == 2:
                _set(b, ip + 6, rng.choice((0x20, 0x40, 0x00, 0x1F, 0x3F)))
                _set(b, ip + 7, rng.randrange(256))
            elif which == 3:
                _set(b, ip + 9, rng.choice((6, 17, 1, 0)))
            elif which == 4:
                _put(b, udp + 4, rng.choice((0, 7, 8, 9, 0xFFFF, rng.getrandbits(16))), 2)
            else:
                _put(b, udp + 2, rng.getrandbits(16), 2)
        else:
            meta.append(
                (
                    "linktype",
                    rng.choice(
                        (0, 2, 101, LINKTYPE_ETHERNET, LINKTYPE_LINUX_SLL, LINKTYPE_LINUX_SLL2, 0xFFFF)
                    ),
                )
            )
    elif op == "wkc" and dg is not None:
        at = dg[0] + 10 + dg[1]
        _put(b, at, rng.choice((0, 1, 0xFFFF, rng.getrandbits(16), _get(b, at, 2) + rng.choice((-1, 1)))), 2)
    elif op == "mac" and s is not None:
        choice = rng.randrange(3)
        if choice == 0 and s.mac_at < n:
            b[s.mac_at] ^= 0x02
        elif choice == 1:
            b[s.mac_at : s.mac_at + 6] = rng.randbytes(6)
        else:
            b[s.mac_at : s.mac_at + 6] = rng.choice((b"\xff" * 6, b"\0" * 6, MASTER, returned_mac()))
    elif op == "meta":
        what = rng.choice(("wire", "wire", "linktype", "offset", "length", "oversize"))
        if what == "wire":
            rec.wire = rng.choice(
                (0, -1, -(2**31), n - 1, n + 1, n + rng.randrange(100), 2**31 - 1, rng.randrange(2**31))
            )
        elif what == "linktype":
            meta.append(("linktype", rng.choice((0, 2, 101, 113, 276, 1, 0xFFFF, -1, 2**31 - 1))))
        elif what == "offset":
            # rarely an offset so large that offset + length wraps around int64 (it would fail most batches)
            meta.append(("offset", rng.randrange(8 if rng.random() < 0.02 else 6)))
        elif what == "length":
            meta.append(("length", rng.randrange(5)))
        else:  # a record over 256 KiB (or exactly at it)
            size = rng.choice((256 * 1024, 256 * 1024 + 1, 300_000))
            b += bytes(size - n) if size > n else b""
            rec.wire = len(b)
    elif op == "ints" and n >= 1:
        width = rng.choice((1, 2, 4, 8))
        i = rng.randrange(max(1, n - width + 1))
        _put(b, i, rng.choice((*INTERESTING, 2**63 - 1, 2**64 - 1)), min(width, n - i))
    elif op == "shift" and n:
        i = rng.randrange(n)
        choice = rng.randrange(3)
        if choice == 0:
            b[i:i] = rng.randbytes(rng.randint(1, 4))
        elif choice == 1:
            del b[i : i + rng.randint(1, 4)]
        else:
            j = min(n, i + rng.randint(1, 24))
            b[i:i] = b[i:j]
        if rng.random() < 0.5:
            rec.wire = len(b)
    elif op in ("timestamp", "ts_ahead"):  # the frame's bytes are untouched
        if op == "timestamp":  # a capture time that goes back (dropped and counted by the resampler)
            rec.ts = rng.choice((rec.ts - BUS_NS, rec.ts - 10**9, rec.ts - 1, 0, -1, -(2**63)))
        else:  # one far ahead (what a flipped high bit of a pcapng timestamp gives)
            ahead = (rec.ts + 2**40, INT64_MAX, INT64_MAX - rng.randrange(10**9), rng.getrandbits(63))
            rec.ts = rng.choice(ahead)
        rec.ts_tampered = True
        return
    else:
        return  # the op does not apply to this record: unchanged
    rec.data = bytes(b)
    rec.mutated = True
    rec.clean_returned = False


# --------------------------------------------------------------------------------------------------
# a stream of batches


@dataclass
class BatchInput:
    batch: RecordBatch
    mutated: int  # records with changed bytes or metadata
    ts_tampered: int
    clean_returned: np.ndarray  # batch indices of clean returned copies of the cyclic frame
    systematic: bool
    ops: Counter[str] = field(default_factory=Counter)  # mutations applied


@dataclass
class StreamPlan:
    index: int
    map_: MapSetup
    carrier: str
    both: bool
    profile: str
    startup: bool
    clock_offset: int  # added to every capture time of the stream (a clock before 1970, or far ahead)


def plan_stream(w: Worker, index: int) -> tuple[StreamPlan, random.Random, np.random.Generator]:
    rng = random.Random(f"{w.seed}:frames:{index}")
    nprng = np.random.default_rng(rng.getrandbits(64))
    map_ = w.seeds.maps[index % len(w.seeds.maps)]
    plan = StreamPlan(
        index,
        map_,
        rng.choice(CARRIERS),
        rng.random() < 0.8,
        profile := _pick(rng, PROFILE_WEIGHTS),
        rng.random() < 0.1,
        rng.choice((0, 0, -(T0 + 10**12), -T0, 2**62)) if profile == "clock" else 0,
    )
    return plan, rng, nprng


def stream_batches(w: Worker, index: int, mutated_target: int) -> Iterator[BatchInput]:
    """Stream `index`: batches until `mutated_target` records were mutated."""
    plan, rng, nprng = plan_stream(w, index)
    clean = CleanStream(w.seeds.buses[plan.map_.bus], plan.carrier, plan.both, nprng, rng.randrange(10**6))
    clean.offset = plan.clock_offset
    weights = PROFILES[plan.profile]
    others = w.seeds.others
    done = 0
    if plan.startup:  # a capture that starts while the master brings the bus up
        recs: list[Rec] = []
        for _ in range(rng.choice((1, 5, 40))):
            seed = rng.choice(w.seeds.startup)
            recs.append(Rec(seed.record, seed.linktype, len(seed.record), clean.next().ts, seed.shape))
        clean.pending.clear()
        yield layout_batch(rng, recs, [], systematic=False)
    if rng.random() < 0.7:  # most captures start clean: the chain binds its map to the real datagrams
        cycles = 2 * 32 if plan.map_.bus == "sim" else 3 * 32
        yield layout_batch(rng, [clean.next() for _ in range(cycles)], [], systematic=False)
    while done < mutated_target:
        m = min(mutated_target - done, rng.choice((1, 2, 5, 16, 40, 100, 300, 1000, 3000)))
        fraction = rng.choice((1.0, 0.9, 0.5, 0.5, 0.2, 0.05, 0.01))
        n = min(MAX_BATCH, max(m, round(m / fraction)))
        systematic = rng.random() < 0.25
        if systematic:  # the mutated records are a run: the fast path groups them
            start = rng.randrange(n - m + 1)
            chosen = set(range(start, start + m))
            run_seed = rng.getrandbits(32)
            variants = rng.choice((1, 1, 3, 12))
            run_ops = [_pick(rng, weights) for _ in range(rng.choice((1, 1, 2)))]
        else:
            chosen = set(rng.sample(range(n), m))
        recs = []
        metas: list[list[tuple[str, int]]] = []
        applied: Counter[str] = Counter()
        for j in range(n):
            if rng.random() < 0.02:  # other traffic in between, unmutated
                seed = rng.choice(others)
                at = recs[-1].ts if recs else T0
                recs.append(Rec(seed.record, seed.linktype, len(seed.record), at, seed.shape))
                metas.append([])
            rec = clean.next()
            meta: list[tuple[str, int]] = []
            if j in chosen:
                if systematic:
                    sub = random.Random(run_seed + (j % variants))
                    ops = run_ops
                else:
                    sub = rng
                    ops = [_pick(rng, weights) for _ in range(rng.choice((1, 1, 1, 1, 2, 2, 3, 4)))]
                if sub.random() < 0.15 and not systematic:  # mutate other traffic instead of the stream
                    seed = sub.choice(others)
                    rec = Rec(seed.record, seed.linktype, len(seed.record), rec.ts, seed.shape)
                for op in ops:
                    mutate(sub, rec, op, others, meta)
                    applied[op] += 1
                if not rec.mutated and not rec.ts_tampered:  # the ops did not apply: flip a bit at least
                    mutate(sub, rec, "bitflip", others, meta)
                    applied["bitflip"] += 1
                rec.mutated = rec.mutated or bool(meta)
            recs.append(rec)
            metas.append(meta)
        if plan.profile == "clock" and rng.random() < 0.3:  # the whole batch at one time, or gone back
            frozen = rng.choice((recs[0].ts, recs[0].ts - 10**10, 0))
            for rec in recs:
                rec.ts, rec.ts_tampered = frozen, True
        batch = layout_batch(rng, recs, metas, systematic=systematic)
        batch.ops = applied
        done += batch.mutated
        yield batch


def layout_batch(
    rng: random.Random, recs: list[Rec], metas: list[list[tuple[str, int]]], *, systematic: bool
) -> BatchInput:
    """The records in one buffer as a reader hands them over: a constant gap (a pcap file's record
    headers) or varying ones; then the metadata lies (offsets, lengths, link types) applied."""
    n = len(recs)
    gap = rng.choice((16, 16, 16, 28, None))
    parts: list[bytes] = []
    offsets = np.zeros(n, np.int64)
    at = 0
    for i, rec in enumerate(recs):
        g = gap if gap is not None else rng.choice((0, 3, 16, 40))
        parts.append(b"\xee" * g)
        at += g
        offsets[i] = at
        parts.append(rec.data)
        at += len(rec.data)
    parts.append(b"\xee" * rng.choice((0, 0, 5)))
    buf = np.frombuffer(b"".join(parts), np.uint8).copy()
    lengths = np.array([len(r.data) for r in recs], np.int64)
    linktype = np.array([r.linktype for r in recs], np.int64)
    wire = np.array([r.wire for r in recs], np.int64)
    if n > 1 and rng.random() < 0.03:  # records out of buffer order (offsets not ascending)
        order = np.array(rng.sample(range(n), n))
        recs = [recs[i] for i in order]
        metas = [metas[i] for i in order] if metas else metas
        offsets, lengths, linktype, wire = offsets[order], lengths[order], linktype[order], wire[order]
    for i, meta in enumerate(metas):
        for what, value in meta:
            if what == "linktype":
                linktype[i] = value
            elif what == "offset":  # outside the buffer, partly outside, or so far that offset+length wraps
                near_end = len(buf) - lengths[i] + 1
                choices = (-1, -(2**40), len(buf), near_end, 2**62, offsets[i] - 1, INT64_MAX, INT64_MAX - 3)
                offsets[i] = choices[value]
            elif what == "length":
                lengths[i] = (-1, len(buf) + 1, 2**31 - 1, 0, lengths[i] + 1)[value]
    mutated = sum(1 for r in recs if r.mutated)
    return BatchInput(
        RecordBatch(
            ts_ns=np.array([(r.ts + 2**63) % 2**64 - 2**63 for r in recs], np.int64),  # wrapped as int64
            linktype=linktype.astype(np.int32),
            offsets=offsets,
            lengths=np.clip(lengths, -(2**31), 2**31 - 1).astype(np.int32),
            wire_lengths=np.clip(wire, -(2**31), 2**31 - 1).astype(np.int32),
            buf=buf,
        ),
        mutated,
        sum(1 for r in recs if r.ts_tampered),
        np.array([i for i, r in enumerate(recs) if r.clean_returned and not r.ts_tampered], np.int64),
        systematic,
    )


# --------------------------------------------------------------------------------------------------
# checks


def check_frame_batch(batch: RecordBatch, fb: FrameBatch, where: str) -> None:
    """frames.py's accounting and the FrameBatch contract (types.py)."""
    c, rej = fb.counts, fb.rejections
    n = len(batch)
    if c.get("records", 0) != n:
        raise Failure(f"{where}: counts records {c.get('records', 0)} for a batch of {n}")
    accounted = c["frames"] + c["outgoing_copy"] + c["not_ethercat"] + sum(rej.values())
    if accounted != n:
        raise Failure(
            f"{where}: {n} records, accounted {accounted} (frames {c['frames']}, "
            f"outgoing {c['outgoing_copy']}, "
            f"not_ethercat {c['not_ethercat']}, rejections {dict(rej)})"
        )
    if not set(rej) <= REJECTIONS:
        raise Failure(f"{where}: undocumented rejection reasons {sorted(set(rej) - REJECTIONS)}")
    if not set(c) <= COUNT_NAMES:
        raise Failure(f"{where}: undocumented count names {sorted(set(c) - COUNT_NAMES)}")
    if any(v < 0 for v in c.values()) or any(v < 0 for v in rej.values()):
        raise Failure(f"{where}: a negative count")
    if fb.ts_ns.dtype != np.int64 or fb.ts_ns.ndim != 1:
        raise Failure(f"{where}: ts_ns {fb.ts_ns.dtype} {fb.ts_ns.shape}")
    frames_n = len(fb)
    if frames_n > c["frames"]:
        raise Failure(f"{where}: {frames_n} frames kept, {c['frames']} counted")
    seen = np.zeros(frames_n, bool)
    rows = stale = 0
    for key, cols in fb.datagrams.items():
        m = len(cols.frame)
        if cols.key != key:
            raise Failure(f"{where}: columns of {cols.key} under {key}")
        if cols.frame.dtype != np.int64 or cols.data.dtype != np.uint8 or cols.wkc.dtype != np.uint16:
            raise Failure(
                f"{where}: {key.name}: dtypes {cols.frame.dtype} {cols.data.dtype} {cols.wkc.dtype}"
            )
        if cols.data.shape != (m, key.length) or cols.wkc.shape != (m,) or cols.stale.shape != (m,):
            raise Failure(
                f"{where}: {key.name}: shapes {cols.data.shape} {cols.wkc.shape} {cols.stale.shape}"
            )
        if cols.stale.dtype != bool:
            raise Failure(f"{where}: {key.name}: stale {cols.stale.dtype}")
        if m and (cols.frame.min() < 0 or cols.frame.max() >= frames_n or (np.diff(cols.frame) < 0).any()):
            raise Failure(f"{where}: {key.name}: frame indices out of range or order")
        if m and np.may_share_memory(cols.data, batch.buf):
            raise Failure(f"{where}: {key.name}: data is a view of the batch buffer")
        seen[cols.frame] = True
        rows += m
        stale += int(cols.stale.sum())
    if not seen.all():
        raise Failure(f"{where}: {int((~seen).sum())} kept frames without a kept datagram")
    if stale != c["stale"]:
        raise Failure(f"{where}: {stale} stale datagrams, counted {c['stale']}")
    counted = sum(v for k, v in c.items() if k.startswith("datagrams_"))
    if rows > counted:
        raise Failure(f"{where}: {rows} datagram rows, {counted} datagrams counted")
    if frames_n and not np.isin(fb.ts_ns, batch.ts_ns).all():
        raise Failure(f"{where}: frame times not from the batch")


def same_frames(a: FrameBatch, b: FrameBatch, where: str) -> None:
    if not np.array_equal(a.ts_ns, b.ts_ns):
        raise Failure(f"{where}: fast path kept {len(a)} frames, per-record path {len(b)} (or other times)")
    if +a.counts != +b.counts:
        diff = {
            k: (a.counts[k], b.counts[k]) for k in set(a.counts) | set(b.counts) if a.counts[k] != b.counts[k]
        }
        raise Failure(f"{where}: counts differ (fast, per-record): {diff}")
    if +a.rejections != +b.rejections:
        raise Failure(
            f"{where}: rejections differ: fast {dict(a.rejections)} per-record {dict(b.rejections)}"
        )
    if list(a.datagrams) != list(b.datagrams):
        only = set(a.datagrams) ^ set(b.datagrams)
        raise Failure(f"{where}: datagram keys differ: {sorted(k.name for k in only)[:5]} (or their order)")
    for key, x in a.datagrams.items():
        y = b.datagrams[key]
        for name in ("frame", "data", "wkc", "stale"):
            u, v = getattr(x, name), getattr(y, name)
            if u.dtype != v.dtype or not np.array_equal(u, v):
                raise Failure(f"{where}: {key.name}: {name} differs between the fast and the per-record path")


def same_rows(a: SignalRows, b: SignalRows, where: str) -> None:
    if a.values.shape != b.values.shape or not np.array_equal(a.ts_ns, b.ts_ns):
        raise Failure(
            f"{where}: {a.values.shape} rows from the fast path's frames, {b.values.shape} from the other"
        )
    if not np.array_equal(a.values, b.values, equal_nan=True) or not np.array_equal(a.stale, b.stale):
        raise Failure(f"{where}: signal values or stale flags differ between the two paths' frames")


def check_rows(rows: SignalRows, pmap: ProcessMap, fb: FrameBatch, where: str) -> None:
    s = len(pmap.signals)
    if rows.values.ndim != 2 or rows.values.shape[1] != s or rows.values.dtype != np.float64:
        raise Failure(f"{where}: values {rows.values.dtype} {rows.values.shape} for {s} signals")
    if rows.ts_ns.shape != (len(rows.values),) or rows.stale.shape != (len(rows.values),):
        raise Failure(
            f"{where}: {len(rows.ts_ns)} times, {len(rows.stale)} stale flags, {len(rows.values)} rows"
        )
    if len(rows) and not np.isin(rows.ts_ns, fb.ts_ns).all():
        raise Failure(f"{where}: row times not from the frames")


def check_decoder_state(dec: FrameDecoder, where: str, extra: Counter[str]) -> None:
    keys, masters, recent = len(dec._wkc_seen), len(dec._masters), len(dec._recent)
    values = max((len(v) for v in dec._wkc_seen.values()), default=0)
    extra["max_learned_keys"] = max(extra["max_learned_keys"], keys)
    extra["max_masters"] = max(extra["max_masters"], masters)
    extra["max_layout_memory"] = max(extra["max_layout_memory"], recent)
    if keys > frames_module.MAX_LEARNED_KEYS or values > frames_module.MAX_WKC_VALUES:
        raise Failure(f"{where}: {keys} learned keys / {values} WKC values, past the bounds")
    if masters > frames_module.MAX_MASTERS or recent > frames_module._RECENT_SHAPES:
        raise Failure(f"{where}: {masters} masters / {recent} remembered shapes, past the bounds")


# --------------------------------------------------------------------------------------------------
# running one stream


@dataclass
class Worker:
    seeds: Seeds
    tmp: Path
    seed: int
    timeout: float
    per_stream: int


_worker: Worker | None = None


def _init(seed: int, timeout: float, per_stream: int, nice: int = 0) -> None:
    global _worker
    if nice:
        os.nice(nice)  # a shared machine: the campaign yields to everyone else
    tmp = Path(tempfile.mkdtemp(prefix="cellwatch-ecat-fuzz-"))
    _worker = Worker(build_seeds(tmp), tmp, seed, timeout, per_stream)

    def on_alarm(signum: int, frame: object) -> None:
        raise Hang(f"no result within {timeout:g} s")

    signal.signal(signal.SIGALRM, on_alarm)
    logging_quiet()


def logging_quiet() -> None:
    """The reader logs each rejection (rate-limited): thousands of files would flood the terminal."""
    import logging

    logging.getLogger("ingest").setLevel(logging.CRITICAL)


@dataclass
class Machines:
    """The stages one stream goes through."""

    fast: FrameDecoder
    slow: FrameDecoder
    ext_fast: SignalExtractor
    ext_slow: SignalExtractor
    chain: BusChain

    @classmethod
    def of(cls, map_: MapSetup) -> Machines:
        pmap = map_.pmap
        return cls(
            FrameDecoder(map_.expected_wkc),
            FrameDecoder(map_.expected_wkc, fast=False),
            SignalExtractor(pmap),
            SignalExtractor(pmap),
            BusChain(pmap, robot="robot1", signals=list(pmap.names), period_ns=MODEL_PERIOD_NS),
        )


def _describe(err: BaseException) -> tuple[str, str]:
    """The error and where it was raised: the innermost frame in the project (and the innermost of all)."""
    frames_ = traceback.extract_tb(err.__traceback__)
    mine = [
        f for f in frames_ if f.filename.startswith(str(ROOT)) and not f.filename.endswith("fuzz_ethercat.py")
    ]
    at = mine[-1] if mine else (frames_[-1] if frames_ else None)
    where = ""
    if at is not None:
        name = Path(at.filename).relative_to(ROOT) if at.filename.startswith(str(ROOT)) else at.filename
        where = f"{name}:{at.lineno} in {at.name}"
        if at is not frames_[-1]:
            inner = frames_[-1]
            where += f" (raised in {Path(inner.filename).name}:{inner.lineno} {inner.name})"
    return f"{type(err).__name__}: {' '.join(str(err).split())[:300]}", where


def run_batch(
    m: Machines, map_: MapSetup, bi: BatchInput, where: str, extra: Counter[str]
) -> list[tuple[str, BaseException]]:
    """One batch through every stage; the failures (stage, error), the rest tallied in `extra`."""
    failures: list[tuple[str, BaseException]] = []
    batch = bi.batch

    def stage(name: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except (Hang, KeyboardInterrupt):
            raise
        except BaseException as err:  # noqa: BLE001 (anything escaping a stage is what we look for)
            failures.append((name, err))
            return None

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fa = stage("decode (fast path)", lambda: m.fast.decode(batch))
        fb = stage("decode (per-record path)", lambda: m.slow.decode(batch))
        if fa is not None:
            stage("FrameBatch contract (fast path)", lambda: check_frame_batch(batch, fa, where))
            extra["frames_kept"] += len(fa)
            for reason, count in fa.rejections.items():
                extra[f"rejected:{reason}"] += count
            for name in ("outgoing_copy", "not_ethercat", "mailbox", "other_frame_type", "stale"):
                extra[f"count:{name}"] += fa.counts[name]
            missing = np.setdiff1d(batch.ts_ns[bi.clean_returned], fa.ts_ns)
            if len(missing):
                extra["soft:clean_returned_not_kept"] += len(missing)
        if fb is not None:
            stage("FrameBatch contract (per-record path)", lambda: check_frame_batch(batch, fb, where))
        if fa is not None and fb is not None:
            stage("fast path == per-record path", lambda: same_frames(fa, fb, where))
        stage("decoder state bounds", lambda: check_decoder_state(m.fast, where, extra))
        stage("decoder state bounds (per-record)", lambda: check_decoder_state(m.slow, where, extra))
        ra = rb = None
        if fa is not None:
            ra = stage("SignalExtractor.extract (fast path's frames)", lambda: m.ext_fast.extract(fa))
            if ra is not None:
                stage("signal rows", lambda: check_rows(ra, map_.pmap, fa, where))
                extra["signal_rows"] += len(ra)
        if fb is not None:
            rb = stage("SignalExtractor.extract (per-record path's frames)", lambda: m.ext_slow.extract(fb))
        if ra is not None and rb is not None:
            stage("rows of both paths", lambda: same_rows(ra, rb, where))
        messages = stage("BusChain.feed", lambda: m.chain.feed(batch))
        if messages is None and not m.chain.checked:
            # past the map check (as if it had passed on a clean batch): the later stages still get tested
            m.chain.checked = True
            extra["chain_map_check_skipped"] += 1
        if messages is not None:
            extra["chain_messages"] += len(messages)
            extra["chain_rows"] += sum(msg.rows for msg in messages)
            extra["soft:non_finite_message_values"] += sum(
                int((~np.isfinite(msg.signals)).sum()) for msg in messages
            )
        # what the chain holds between batches: frames waiting for the map check (bounded by its window)
        pending = getattr(m.chain, "_pending", None) or []
        held = sum(len(f) for f in pending)
        extra["max_chain_pending_frames"] = max(extra["max_chain_pending_frames"], held)
    _tally_warnings(caught, extra)
    return failures


def _tally_warnings(caught: list[warnings.WarningMessage], extra: Counter[str]) -> None:
    for w in caught:
        where = Path(w.filename).relative_to(ROOT) if w.filename.startswith(str(ROOT)) else w.filename
        extra[f"warning:{w.category.__name__}: {str(w.message)[:60]} ({where}:{w.lineno})"] += 1


def fuzz_stream(
    w: Worker, index: int, extra: Counter[str], failures: list[dict[str, Any]], *, verbose: bool = False
) -> int:
    """Stream `index` through the stages; returns the batches run."""
    plan, _, _ = plan_stream(w, index)
    m = Machines.of(plan.map_)
    batches = 0
    chain_rows_before = extra["chain_rows"]
    clean_before = extra["clean_returned"]
    for k, bi in enumerate(stream_batches(w, index, w.per_stream)):
        extra["batches"] += 1
        extra["records"] += len(bi.batch)
        extra["mutated_frames"] += bi.mutated
        extra["ts_tampered_records"] += bi.ts_tampered
        extra["clean_returned"] += len(bi.clean_returned)
        extra["systematic_batches"] += bi.systematic
        for op, count in bi.ops.items():
            extra[f"op:{op}"] += count
        signal.setitimer(signal.ITIMER_REAL, w.timeout)
        t0 = time.perf_counter()
        try:
            found = run_batch(m, plan.map_, bi, f"stream {index} batch {k}", extra)
        except Hang as hang:
            found = [("whole batch", hang)]
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        dt = time.perf_counter() - t0
        if dt > extra["slowest_batch_us"] / 1e6:
            extra["slowest_batch_us"] = int(dt * 1e6)
        if any(stage_name.startswith("decode") for stage_name, _ in found):
            # a decoder raised half-way: its learned state no longer matches the other's, start both afresh
            fresh = Machines.of(plan.map_)
            m.fast, m.slow, m.ext_fast, m.ext_slow = fresh.fast, fresh.slow, fresh.ext_fast, fresh.ext_slow
            extra["decoders_restarted_after_a_failure"] += 1
        for stage_name, problem in found:
            error, where = _describe(problem)
            failures.append({"index": index, "batch": k, "stage": stage_name, "error": error, "where": where})
            if verbose:
                print(f"--- stream {index} batch {k}: {stage_name}")
                for line in traceback.format_exception(problem):
                    print(line.rstrip()[:600])
        batches += 1
    stage_failures: list[tuple[str, BaseException]] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            extra["chain_rows"] += sum(msg.rows for msg in m.chain.finish())
        except BaseException as err:  # noqa: BLE001
            stage_failures.append(("BusChain.finish", err))
    _tally_warnings(caught, extra)
    for stage_name, problem in stage_failures:
        error, where = _describe(problem)
        failures.append(
            {"index": index, "batch": batches, "stage": stage_name, "error": error, "where": where}
        )
    if extra["chain_rows"] == chain_rows_before and extra["clean_returned"] - clean_before > 2000:
        extra["soft:chains_that_never_sent"] += 1
    stats = m.chain.resampler.stats
    extra["chain_bus_cycles"] += stats.bus_cycles
    extra["chain_dropped_as_backwards"] += stats.backwards
    for name, count in stats.counts.items():
        extra[f"chain_dropped:{name}"] += count
    if stats.bus_cycles and stats.backwards > stats.bus_cycles / 2:
        extra["soft:chains_that_dropped_most_bus_cycles_as_backwards"] += 1
    extra[f"streams:{plan.map_.name}/{plan.carrier}/{'both' if plan.both else 'returned'}"] += 1
    extra[f"profile:{plan.profile}"] += 1
    return batches


# --------------------------------------------------------------------------------------------------
# capture files


def _pcap(
    frames_: Sequence[tuple[int, bytes]], *, endian: str = "<", nano: bool = True, linktype: int = 1
) -> bytes:
    magic = 0xA1B23C4D if nano else 0xA1B2C3D4
    out = bytearray(struct.pack(endian + "IHHiIII", magic, 2, 4, 0, 0, 65535, linktype))
    for ts, data in frames_:
        frac = ts % 10**9 if nano else ts % 10**9 // 1000
        out += struct.pack(endian + "IIII", ts // 10**9, frac, len(data), len(data)) + data
    return bytes(out)


def _block(endian: str, btype: int, body: bytes) -> bytes:
    body += b"\0" * (-len(body) % 4)
    return (
        struct.pack(endian + "II", btype, 12 + len(body)) + body + struct.pack(endian + "I", 12 + len(body))
    )


def _option(endian: str, code: int, value: bytes) -> bytes:
    return struct.pack(endian + "HH", code, len(value)) + value + b"\0" * (-len(value) % 4)


def _pcapng_rich(frames_: Sequence[tuple[int, bytes]], others: Sequence[Seed]) -> bytes:
    """Two sections (little-, then big-endian), interfaces of three link types with if_tsresol 10^-9,
    2^-20 and the default, an if_tsoffset; EPB, SPB, OPB, NRB, ISB and a custom block."""
    out = bytearray()
    for endian in ("<", ">"):
        out += _block(
            endian,
            0x0A0D0D0A,
            struct.pack(endian + "IHHq", 0x1A2B3C4D, 1, 0, -1)
            + _option(endian, 4, b"cellwatch fuzz")
            + _option(endian, 0, b""),
        )
        out += _block(
            endian,
            1,
            struct.pack(endian + "HHI", 1, 0, 0) + _option(endian, 9, b"\x09") + _option(endian, 0, b""),
        )
        out += _block(
            endian,
            1,
            struct.pack(endian + "HHI", 113, 0, 65535)
            + _option(endian, 9, b"\x94")
            + _option(endian, 14, struct.pack(endian + "q", 1_700_000_000))
            + _option(endian, 0, b""),
        )
        out += _block(endian, 1, struct.pack(endian + "HHI", 147, 0, 0))
        out += _block(
            endian, 4, struct.pack(endian + "HH", 1, 8) + b"\n\0\0\1cell" + struct.pack(endian + "HH", 0, 0)
        )
        for k, (ts, data) in enumerate(frames_):
            if k % 17 == 5:
                out += _block(endian, 3, struct.pack(endian + "I", len(data)) + data)
            elif k % 23 == 7:
                units = ts // 1000
                out += _block(
                    endian,
                    2,
                    struct.pack(
                        endian + "HHIIII", 0, 0, units >> 32, units & 0xFFFFFFFF, len(data), len(data)
                    )
                    + data,
                )
            else:
                iface = 0 if k % 11 else 2
                units = ts
                out += _block(
                    endian,
                    6,
                    struct.pack(
                        endian + "IIIII", iface, units >> 32, units & 0xFFFFFFFF, len(data), len(data)
                    )
                    + data
                    + _option(endian, 1, b"c")
                    + _option(endian, 0, b""),
                )
        sll = next(s for s in others if s.linktype == LINKTYPE_LINUX_SLL)
        units = (T0 // 10**9 - 1_700_000_000) << 20
        out += _block(
            endian,
            6,
            struct.pack(
                endian + "IIIII", 1, units >> 32, units & 0xFFFFFFFF, len(sll.record), len(sll.record)
            )
            + sll.record,
        )
        out += _block(endian, 5, struct.pack(endian + "III", 0, 0, 0))
        out += _block(endian, 0x00000BAD, b"\0\0\0\0custom")
    return bytes(out)


def build_file_seeds(tmp: Path, buses: dict[str, Bus], others: Sequence[Seed]) -> list[tuple[str, bytes]]:
    rng = np.random.default_rng(11)
    out: list[tuple[str, bytes]] = []
    for bus_name, carrier, cycles in (
        ("sim", "eth", 48),
        ("split", "eth", 60),
        ("sim", "sll", 20),
        ("split", "sll2", 40),
        ("sim", "udp", 20),
    ):
        stream = CleanStream(buses[bus_name], carrier, True, rng, 0)
        recs = [stream.next() for _ in range(cycles * (2 if bus_name == "sim" else 3))]
        for k in range(0, len(recs), 9):  # other traffic in between
            seed = others[(k * 7) % len(others)]
            recs.insert(k, Rec(seed.record, seed.linktype, len(seed.record), recs[k].ts, seed.shape))
        linktype = recs[-1].linktype
        same = [(r.ts, r.data) for r in recs if r.linktype == linktype]
        mixed = [(r.ts, r.data) for r in recs]
        name = f"{bus_name}-{carrier}"
        out.append((f"pcap-ns-{name}", _pcap(same, linktype=linktype)))
        if carrier == "eth":
            out.append((f"pcap-us-be-{name}", _pcap(same, endian=">", nano=False)))
            path = tmp / "w.pcapng"
            with CaptureWriter(path, format="pcapng", nanosecond=bool(cycles % 2)) as writer:
                writer.write([t for t, _ in same], [d for _, d in same])
            out.append((f"pcapng-writer-{name}", path.read_bytes()))
            if bus_name == "sim":  # one frame length (the split bus has two: its map needs both)
                path = tmp / "w.pcap"
                with CaptureWriter(path, format="pcap", nanosecond=False) as writer:
                    arr = [d for _, d in same if len(d) == len(same[1][1])]
                    writer.write([T0 + i * BUS_NS for i in range(len(arr))], arr)
                out.append((f"pcap-writer-fixed-{name}", path.read_bytes()))
            out.append((f"pcapng-rich-{name}", _pcapng_rich(mixed, others)))
    return out


def _file_units(data: bytes) -> list[tuple[int, int, str, str]]:
    """The (start, length, kind, byte order) of the file header and records, or of the blocks, of a seed."""
    units: list[tuple[int, int, str, str]] = []
    if data[:4] == b"\x0a\x0d\x0d\x0a":
        at, endian = 0, "<"
        while at + 12 <= len(data):
            if data[at : at + 4] == b"\x0a\x0d\x0d\x0a":
                endian = "<" if data[at + 8 : at + 12] == b"\x4d\x3c\x2b\x1a" else ">"
            btype, blen = struct.unpack_from(endian + "II", data, at)
            kind = {1: "idb", 2: "opb", 3: "spb", 6: "epb", 0x0A0D0D0A: "shb"}.get(btype, "other")
            units.append((at, blen, kind, endian))
            at += max(blen, 12)
        return units
    endian = "<" if data[:4] in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
    units.append((0, 24, "pcap_header", endian))
    at = 24
    while at + 16 <= len(data):
        cap = struct.unpack_from(endian + "I", data, at + 8)[0]
        units.append((at, 16 + cap, "pcap_record", endian))
        at += 16 + cap
    return units


def _put_in(b: bytearray, endian: str, at: int, value: int, width: int = 4) -> None:
    """`value` as a `width`-byte integer of byte order `endian` at `at` (nothing where it does not fit)."""
    if at >= 0 and at + width <= len(b):
        b[at : at + width] = (value % (1 << 8 * width)).to_bytes(width, "little" if endian == "<" else "big")


def mutate_file(rng: random.Random, data: bytes, others: Sequence[bytes]) -> bytes:
    b = bytearray(data)
    units = _file_units(data)
    for _ in range(rng.choice((1, 1, 1, 2, 3, 5))):
        n = len(b)
        op = rng.randrange(16)
        start, length, kind, endian = rng.choice(units) if units else (0, n, "other", "<")

        lie = rng.choice(
            (
                0,
                1,
                4,
                8,
                11,
                12,
                16,
                28,
                31,
                32,
                length - 4,
                length + 4,
                length + 1,
                0xFFFFFFFF,
                0xFFFFFFFC,
                0x7FFFFFFF,
                (1 << 20) + 4,
                (1 << 20) + 1024,
                262_144 + 32,
                rng.getrandbits(32),
            )
        )
        if op == 0 and n:  # bit flips
            for _ in range(rng.choice((1, 2, 8))):
                i = rng.randrange(n)
                b[i] ^= 1 << rng.randrange(8)
        elif op == 1 and n:  # random bytes
            for _ in range(rng.choice((1, 4, 16))):
                b[rng.randrange(n)] = rng.randrange(256)
        elif op == 2:  # the block type / record header's first word
            _put_in(
                b,
                endian,
                start,
                rng.choice((1, 2, 3, 4, 5, 6, 0x0A0D0D0A, 0, 0xFFFFFFFF, rng.getrandbits(32))),
            )
        elif op == 3:  # a block length (front, back or both) / a record's captured length
            if kind == "pcap_record":
                _put_in(b, endian, start + 8 + rng.choice((0, 4)), lie)
            elif kind == "pcap_header":
                _put_in(b, endian, 16, lie)  # the snap length
            else:
                if rng.random() < 0.7:
                    _put_in(b, endian, start + 4, lie)
                if rng.random() < 0.5:
                    _put_in(b, endian, start + length - 4, lie)
        elif op == 4 and kind in ("epb", "opb", "spb"):  # captured / original length inside a packet block
            _put_in(
                b,
                endian,
                start + {"epb": 20, "opb": 20, "spb": 8}[kind] + rng.choice((0, 4)) * (kind != "spb"),
                lie,
            )
        elif op == 5:  # timestamps
            if kind == "pcap_record":
                _put_in(
                    b,
                    endian,
                    start + rng.choice((0, 4)),
                    rng.choice((0, 999_999, 10**6, 10**9 - 1, 10**9, 0xFFFFFFFF, rng.getrandbits(32))),
                )
            elif kind in ("epb", "opb"):
                _put_in(
                    b,
                    endian,
                    start + 12 + rng.choice((0, 4)),
                    rng.choice((0, 0xFFFFFFFF, 0x80000000, rng.getrandbits(32))),
                )
            else:
                _put_in(b, endian, start + 8, rng.getrandbits(32))
        elif op == 6 and kind in ("epb",):  # the interface number
            _put_in(b, endian, start + 8, rng.choice((0, 1, 2, 3, 4, 255, 0xFFFFFFFF)))
        elif op == 7 and kind in ("idb", "shb", "pcap_header"):  # header fields, options
            if kind == "pcap_header":
                at = rng.choice((0, 4, 6, 20))
                _put_in(
                    b,
                    endian,
                    at,
                    rng.choice(
                        (
                            0xA1B2C3D4,
                            0xA1B23C4D,
                            0xD4C3B2A1,
                            1,
                            2,
                            0,
                            0xFFFF,
                            113,
                            276,
                            0x10000001,
                            rng.getrandbits(32),
                        )
                    ),
                    2 if at in (4, 6) else 4,
                )
            elif kind == "idb":
                which = rng.randrange(4)
                if which == 0:
                    _put_in(b, endian, start + 8, rng.choice((0, 1, 113, 276, 147, 0xFFFF)), 2)
                elif which == 1:
                    _put_in(b, endian, start + 12, rng.choice((0, 1, 60, 0xFFFFFFFF)))
                elif which == 2:  # an if_tsresol / if_tsoffset value at the first option
                    code = rng.choice((9, 14))
                    _put_in(b, endian, start + 16, code, 2)
                    _put_in(b, endian, start + 18, 1 if code == 9 else 8, 2)
                    if code == 9:
                        if start + 20 < len(b):
                            b[start + 20] = rng.choice(
                                (0, 3, 6, 9, 12, 19, 20, 29, 30, 63, 127, 0x80, 0x94, 0xA0, 0xBF, 0xFF)
                            )
                    else:
                        _put_in(
                            b,
                            endian,
                            start + 20,
                            rng.choice((-(2**62), -1, 2**40, 2**62, rng.getrandbits(64))),
                            8,
                        )
                else:
                    _put_in(
                        b, endian, start + 16 + 2, rng.choice((0, 1, 0xFFFF, 255)), 2
                    )  # an option's length
            else:
                _put_in(
                    b, endian, start + rng.choice((8, 12, 14, 16)), rng.getrandbits(32)
                )  # BOM, version, section length
        elif op == 8:  # truncate (at a unit boundary or anywhere)
            cut = (
                start + rng.choice((0, 1, 4, 8, 12, 16, 24, 28, length - 1, length - 4))
                if rng.random() < 0.6
                else rng.randrange(n + 1)
            )
            del b[max(0, min(cut, n)) :]
        elif op == 9 and n:  # insert or delete a few bytes (misalignment)
            i = rng.randrange(n)
            if rng.random() < 0.5:
                b[i:i] = rng.randbytes(rng.choice((1, 2, 4, 12)))
            else:
                del b[i : i + rng.choice((1, 2, 4, 12))]
        elif op == 10:  # a unit dropped, duplicated, or moved
            piece = bytes(b[start : start + length])
            choice = rng.randrange(3)
            if choice == 0:
                del b[start : start + length]
            elif choice == 1:
                b[start:start] = piece
            else:
                del b[start : start + length]
                elsewhere = rng.choice(units)[0]
                b[elsewhere:elsewhere] = piece
        elif op == 11 and others:  # splice: this file's head, another's tail
            o = rng.choice(others)
            b = b[: rng.randrange(n + 1)] + o[rng.randrange(len(o) + 1) :]
        elif op == 12:  # random garbage at a place, or a whole random file
            if rng.random() < 0.2:
                b = bytearray(rng.randbytes(rng.choice((0, 3, 4, 23, 24, 100, 4096))))
                if rng.random() < 0.5 and len(b) >= 4:
                    b[:4] = rng.choice(
                        (b"\xd4\xc3\xb2\xa1", b"\x0a\x0d\x0d\x0a", b"\x1f\x8b\x08\x00", b"\x28\xb5\x2f\xfd")
                    )
            else:
                i = rng.randrange(n + 1)
                b[i : i + rng.randint(1, 64)] = rng.randbytes(rng.randint(1, 64))
        elif op == 13 and n >= 4:  # an interesting integer at a 4-aligned position (blocks are aligned)
            i = rng.randrange(0, n - 3, 4) if n > 4 else 0
            _put_in(
                b,
                endian,
                i,
                rng.choice(
                    (0, 1, 12, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0x0A0D0D0A, 0x1A2B3C4D, 0x4D3C2B1A)
                ),
            )
        elif op == 14:  # a block claiming more than 1 MiB (checked at its far end, then skipped)
            size = rng.choice(((1 << 20) + 4, (1 << 20) + 64))
            if rng.random() < 0.5:
                btype = rng.choice((6, 3, 1, 5, 0x0A0D0D0A))
                if kind.startswith("pcap"):
                    piece = struct.pack(endian + "IIII", 0, 0, size, size) + bytes(size)
                else:
                    piece = (
                        struct.pack(endian + "II", btype, size)
                        + bytes(size - 12)
                        + struct.pack(endian + "I", size)
                    )
                b[start:start] = piece
            else:
                _put_in(b, endian, start + (8 if kind == "pcap_record" else 4), size)
        elif op == 15 and n:  # a run of one byte value
            i = rng.randrange(n)
            j = min(n, i + rng.randint(1, 300))
            b[i:j] = bytes([rng.choice((0, 0xFF, 0x0A))]) * (j - i)
    return bytes(b)


def make_file(w: Worker, index: int) -> tuple[bytes, dict[str, Any]]:
    rng = random.Random(f"{w.seed}:files:{index}")
    pool = w.seeds.files
    name, data = pool[rng.randrange(len(pool))]
    ctx: dict[str, Any] = {
        "seed": name,
        "chunk_records": rng.choice((1, 3, 7, 64, 1000, 65536)),
        "chunk_bytes": rng.choice((64, 100, 300, 1024, 4096, 65536, 8 << 20)),
    }
    if rng.random() >= 0.03:  # a few seeds as they are (checks the harness)
        data = mutate_file(rng, data, [d for _, d in pool])
    return data, ctx


def _read(path: Path, **options: Any) -> tuple[list[RecordBatch], CaptureReader]:
    reader = CaptureReader(path, **options)
    return list(reader.batches()), reader


def check_file(
    w: Worker,
    index: int,
    data: bytes,
    ctx: dict[str, Any],
    extra: Counter[str],
    failures: list[dict[str, Any]],
) -> str:
    """Read a file both ways and compare, then decode it and feed a bus chain; the outcome (failures go to
    `failures`: raised by a check, or anything else raised)."""
    path = w.tmp / "input.pcap"
    path.write_bytes(data)

    def fail(stage: str, err: BaseException) -> None:
        error, where = _describe(err)
        failures.append({"index": index, "stage": stage, "error": error, "where": where, **ctx})

    try:
        batches, reader = _read(path, chunk_records=ctx["chunk_records"], chunk_bytes=ctx["chunk_bytes"])
        reference, ref_reader = _read(path, vectorized=False)
    except CaptureError as err:
        text = str(err).removeprefix(f"{path}: ")
        return "not_a_capture: " + text.split("(")[0].strip().removeprefix("a ").split(" cut off")[0][:40]
    except (Hang, KeyboardInterrupt):
        raise
    except BaseException as err:  # noqa: BLE001
        fail("CaptureReader", err)
        return CRASH
    try:
        check_reading(batches, reader, reference, ref_reader, ctx)
    except Failure as err:
        fail("CaptureReader checks", err)
    for reason, count in reader.rejections.items():
        extra[f"reader:{reason}"] += count
    extra["records"] += reader.counts["records"]
    extra["fast_records"] += reader.counts["fast_records"]
    # the records on: both decoder paths, the extractor, and the daemon's chain end to end
    maps = [setup for setup in w.seeds.maps if setup.bus == ctx["seed"].split("-")[-2]]
    map_ = maps[index % len(maps)]
    m = Machines.of(map_)
    seen: set[str] = set()
    # the reader's batches as the source gets them (but not tens of thousands of one-record batches)
    for k, batch in enumerate(batches if len(batches) <= 2000 else reference):
        bi = BatchInput(batch, 0, 0, np.zeros(0, np.int64), False)
        for stage, problem in run_batch(m, map_, bi, f"file {index} batch {k}", extra):
            if stage not in seen:  # once per stage and file
                seen.add(stage)
                fail(stage, problem)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            last = m.chain.finish()
            extra["chain_messages"] += len(last)
            extra["chain_rows"] += sum(msg.rows for msg in last)
        except (Hang, KeyboardInterrupt):
            raise
        except BaseException as err:  # noqa: BLE001
            fail("BusChain.finish", err)
    _tally_warnings(caught, extra)
    return "read" if reader.counts["records"] else "read_no_records"


def check_reading(
    batches: list[RecordBatch],
    reader: CaptureReader,
    reference: list[RecordBatch],
    ref_reader: CaptureReader,
    ctx: dict[str, Any],
) -> None:
    for label, bs, r in (("vectorized", batches, reader), ("per-record", reference, ref_reader)):
        total = 0
        for batch in bs:
            n = len(batch)
            total += n
            if label == "vectorized" and n > ctx["chunk_records"]:
                raise Failure(f"{label}: a batch of {n} records (chunk_records {ctx['chunk_records']})")
            arrays = (batch.ts_ns, batch.linktype, batch.offsets, batch.lengths, batch.wire_lengths)
            dtypes = tuple(str(a.dtype) for a in arrays)
            if dtypes != ("int64", "int32", "int64", "int32", "int32") or any(len(a) != n for a in arrays):
                raise Failure(f"{label}: RecordBatch arrays {dtypes} {[len(a) for a in arrays]}")
            if n and (
                batch.offsets.min() < 0
                or batch.lengths.min() < 0
                or (batch.offsets + batch.lengths).max() > len(batch.buf)
            ):
                raise Failure(f"{label}: a record outside its batch's buffer")
            if n and batch.lengths.max() > frames_module.MAX_RECORD_BYTES:
                raise Failure(f"{label}: a record of {batch.lengths.max()} bytes passed")
            if not np.isin(
                batch.linktype, [LINKTYPE_ETHERNET, LINKTYPE_LINUX_SLL, LINKTYPE_LINUX_SLL2]
            ).all():
                raise Failure(f"{label}: a record of link type {sorted(set(batch.linktype.tolist()))} passed")
        if total != r.counts["records"]:
            raise Failure(f"{label}: {total} records yielded, counts say {r.counts['records']}")
        if not set(r.rejections) <= READER_REASONS:
            raise Failure(f"{label}: undocumented reasons {sorted(set(r.rejections) - READER_REASONS)}")
    a, b = _flatten(batches), _flatten(reference)
    if a != b:
        raise Failure(
            f"vectorized (chunks of {ctx['chunk_records']} records / {ctx['chunk_bytes']} B) and per-record "
            f"reading differ: {_first_difference(a, b)}"
        )
    if +reader.rejections != +ref_reader.rejections:
        raise Failure(
            f"rejections differ: vectorized {dict(reader.rejections)}, "
            f"per-record {dict(ref_reader.rejections)}"
        )


def _flatten(batches: list[RecordBatch]) -> list[tuple[int, int, int, bytes]]:
    return [
        (int(b.ts_ns[i]), int(b.linktype[i]), int(b.wire_lengths[i]), b.record(i))
        for b in batches
        for i in range(len(b))
    ]


def _first_difference(a: list[tuple[int, int, int, bytes]], b: list[tuple[int, int, int, bytes]]) -> str:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return f"record {i}: {x[:3]} {len(x[3])} B vs {y[:3]} {len(y[3])} B"
    return f"{len(a)} records vs {len(b)}"


# --------------------------------------------------------------------------------------------------
# a task in a worker


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def fuzz_chunk(target: str, start: int, stop: int) -> dict[str, Any]:
    assert _worker is not None
    w = _worker
    outcomes: Counter[str] = Counter()
    extra: Counter[str] = Counter()
    failures: list[dict[str, Any]] = []
    slowest = (0.0, -1)
    for i in range(start, stop):
        t0 = time.perf_counter()
        if target == "frames":
            before = len(failures)
            fuzz_stream(w, i, extra, failures)
            outcomes[CRASH if len(failures) > before else "passed"] += 1
        else:
            data, ctx = make_file(w, i)
            before = len(failures)
            signal.setitimer(signal.ITIMER_REAL, w.timeout)
            try:
                outcome = check_file(w, i, data, ctx, extra, failures)
            except Hang as err:
                error, where = _describe(err)
                failures.append({"index": i, "stage": "whole file", "error": error, "where": where, **ctx})
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            if len(failures) > before:
                outcome = CRASH
                if before < 3 and len(data) < 300_000:
                    failures[before]["input"] = data.hex()
            outcomes[outcome] += 1
            extra["bytes"] += len(data)
        dt = time.perf_counter() - t0
        if dt > slowest[0]:
            slowest = (dt, i)
    rss = _rss()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "outcomes": dict(outcomes),
        "extra": dict(extra),
        "crashes": failures,
        "slowest": slowest,
        "rss": (os.getpid(), rss, peak),
    }


# --------------------------------------------------------------------------------------------------
# the campaign

MAX_KEYS = (
    "max_learned_keys",
    "max_masters",
    "max_layout_memory",
    "max_chain_pending_frames",
    "slowest_batch_us",
)


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
    rss: dict[int, list[tuple[int, int]]] = field(default_factory=dict)  # pid -> (rss, peak) after each task

    @property
    def n_crashes(self) -> int:
        return len(self.crashes) + len(self.dead_workers)

    def add(self, result: dict[str, Any], n: int) -> None:
        self.inputs += n
        self.outcomes.update(result["outcomes"])
        for key, value in result["extra"].items():
            if key in MAX_KEYS:
                self.extra[key] = max(self.extra[key], value)
            else:
                self.extra[key] += value
        self.crashes += result["crashes"]
        if result["slowest"][0] > self.slowest[0]:
            self.slowest = (float(result["slowest"][0]), int(result["slowest"][1]))
        pid, rss, peak = result["rss"]
        self.rss.setdefault(pid, []).append((rss, peak))

    def memory(self) -> dict[str, int]:
        """RSS of the workers, sampled after each task: the growth over the second half of a worker's
        tasks (its last RSS minus the highest of its first half: the first tasks fill the allocator's
        pools with the largest batches and files they happen to meet), the highest RSS, the peak."""
        growth = []
        for v in self.rss.values():
            if len(v) >= 4:
                growth.append(v[-1][0] - max(r for r, _ in v[: len(v) // 2]))
        return {
            "rss_growth_max_bytes": max(growth, default=0),
            "rss_first_max_bytes": max((v[0][0] for v in self.rss.values()), default=0),
            "rss_max_bytes": max((r for v in self.rss.values() for r, _ in v), default=0),
            "peak_rss_max_bytes": max((p for v in self.rss.values() for _, p in v), default=0),
            "workers": len(self.rss),
            "tasks_per_worker_min": min((len(v) for v in self.rss.values()), default=0),
        }


def campaign(target: str, n: int, args: argparse.Namespace, log: Callable[[str], None]) -> Tally:
    tally = Tally(target)
    chunk = CHUNK[target]
    tasks = [(s, min(n, s + chunk)) for s in range(0, n, chunk)]
    t0 = time.monotonic()
    last_report = t0
    pending: dict[Future[dict[str, Any]], tuple[int, int]] = {}
    initargs = (args.seed, args.timeout, args.per_stream, args.nice)
    pool = ProcessPoolExecutor(args.workers, initializer=_init, initargs=initargs)
    try:
        while tasks or pending:
            while tasks and len(pending) < 2 * args.workers:
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
                pool = ProcessPoolExecutor(args.workers, initializer=_init, initargs=initargs)
            now = time.monotonic()
            if now - last_report >= 15 or (not tasks and not pending):
                last_report = now
                unit = "mutated frames" if target == "frames" else "files"
                count = tally.extra["mutated_frames"] if target == "frames" else tally.inputs
                log(
                    f"  {target}: {count:,} {unit}, {tally.n_crashes} failures, "
                    f"{count / max(now - t0, 1e-9):,.0f}/s"
                )
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    tally.wall_s = time.monotonic() - t0
    return tally


def _signature(error: str) -> str:
    """An error message without its particulars (paths, names, numbers): failures of one kind group."""
    text = re.sub(r"/\S+", "<path>", error)
    text = re.sub(r"'[^']*'", "<name>", text)
    text = re.sub(r"\b(0x[0-9a-f]+|\d+)\b", "<n>", text)
    text = re.sub(r"\S+@<n>\[<n>\]", "<key>", text)
    text = re.sub(r"<key>( and <key>)+", "<keys>", text)
    return text[:90]


def crash_classes(t: Tally) -> list[dict[str, Any]]:
    """Failures grouped by (stage, place, kind of message): count and the first input of each."""
    groups: dict[tuple[str, str, str], dict[str, Any]] = {}
    for c in t.crashes:
        key = (c.get("stage", ""), c["where"], _signature(c["error"]))
        g = groups.setdefault(key, {"stage": key[0], "where": key[1], "kind": key[2], "count": 0, "first": c})
        g["count"] += 1
    return sorted(groups.values(), key=lambda g: -g["count"])


def summary(t: Tally) -> dict[str, Any]:
    e = t.extra
    out: dict[str, Any] = {
        "target": t.target,
        "inputs": t.inputs,
        "wall_s": round(t.wall_s, 1),
        "crashes": t.n_crashes,
        "crash_classes": len(crash_classes(t)),
        "outcomes": dict(t.outcomes.most_common()),
        "slowest_input_s": round(t.slowest[0], 3),
        "slowest_input": t.slowest[1],
        **t.memory(),
    }
    if t.target == "frames":
        out.update(
            streams=t.inputs,
            batches=e["batches"],
            records=e["records"],
            mutated_frames=e["mutated_frames"],
            mutated_frames_per_s=round(e["mutated_frames"] / max(t.wall_s, 1e-9)),
            records_per_s=round(e["records"] / max(t.wall_s, 1e-9)),
        )
    else:
        out.update(
            files=t.inputs,
            files_per_s=round(t.inputs / max(t.wall_s, 1e-9), 1),
            records=e["records"],
            bytes=e["bytes"],
        )
    out["details"] = dict(sorted(e.items()))
    return out


def report(tallies: list[Tally], out: Callable[[str], None]) -> None:
    for t in tallies:
        s = summary(t)
        out("")
        if t.target == "frames":
            out(
                f"frames: {s['streams']:,} streams, {s['batches']:,} batches, {s['records']:,} records, "
                f"{s['mutated_frames']:,} mutated frames in {t.wall_s:,.0f} s = "
                f"{s['mutated_frames_per_s']:,} "
                f"mutated frames/s ({s['records_per_s']:,} records/s); {t.n_crashes} failures"
            )
        else:
            out(
                f"files: {t.inputs:,} files, {s['records']:,} records in {t.wall_s:,.0f} s = "
                f"{s['files_per_s']} files/s; {t.n_crashes} failures"
            )
            for outcome, count in t.outcomes.most_common():
                out(f"  {outcome:<60} {count:>9,}")
        out(
            f"  RSS per worker: {s['rss_first_max_bytes'] / 2**20:.0f} MiB after its first task, highest "
            f"{s['rss_max_bytes'] / 2**20:.0f} MiB, peak {s['peak_rss_max_bytes'] / 2**20:.0f} MiB; "
            f"growth over the second half of its tasks {s['rss_growth_max_bytes'] / 2**20:+.1f} MiB (at most)"
        )
        for key, count in sorted(t.extra.items()):
            out(f"  {key:<70} {count:>12,}")
        for g in crash_classes(t):
            first = g["first"]
            out(f"  FAILURE x{g['count']}: [{g['stage']}] {first['error']}  at {g['where']}")
            out(
                f"      first: input {first['index']}"
                + (f" batch {first['batch']}" if "batch" in first else "")
            )
        for d in t.dead_workers:
            out(f"  FAILURE {d}")


def write_results(out: Path, meta: dict[str, Any], tallies: list[Tally], lines: list[str]) -> None:
    results = [summary(t) for t in tallies]
    classes = {t.target: [{k: v for k, v in g.items()} for g in crash_classes(t)] for t in tallies}
    out.with_suffix(".json").write_text(
        json.dumps({"meta": meta, "results": results, "failures": classes}, indent=2) + "\n"
    )
    md = [
        "# EtherCAT fuzz campaign: mutated frames and corrupted capture files",
        "",
        f"Measured {meta['date']} by `{meta['command']}` on {meta['cpus']} CPU cores ({meta['machine']}), "
        f"Python {meta['python']}, numpy {meta['numpy']}; {meta['workers']} worker processes at nice "
        f"{meta['nice']}, seed {meta['seed']}; load average {meta['load_before'][0]} before, "
        f"{meta['load_after'][0]} after "
        "(the cores were shared with other jobs: rates are a floor).",
        "",
        "| target | inputs | mutated frames | records | failures | throughput | RSS growth, 2nd half "
        "| slowest input |",
        "|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in results:
        if r["target"] == "frames":
            md.append(
                "| frames (FrameDecoder fast + per-record, SignalExtractor, BusChain) | "
                f"{r['streams']:,} streams, "
                f"{r['batches']:,} batches | {r['mutated_frames']:,} | {r['records']:,} | {r['crashes']} | "
                f"{r['mutated_frames_per_s']:,} mutated frames/s ({r['records_per_s']:,} records/s) | "
                f"{r['rss_growth_max_bytes'] / 2**20:+.1f} MiB | {r['slowest_input_s']} s |"
            )
        else:
            md.append(
                "| files (CaptureReader both paths, FrameDecoder, BusChain) | "
                f"{r['files']:,} files | | {r['records']:,} | {r['crashes']} | {r['files_per_s']} files/s | "
                f"{r['rss_growth_max_bytes'] / 2**20:+.1f} MiB | "
                f"{r['slowest_input_s']} s |"
            )
    md += ["", "Failures by class (stage, error, place), with the first input (`--replay TARGET INDEX`):", ""]
    any_failure = False
    for t in tallies:
        for g in crash_classes(t):
            any_failure = True
            first = g["first"]
            at = f"input {first['index']}" + (f" batch {first['batch']}" if "batch" in first else "")
            md.append(
                f"- {t.target}: **{g['count']}** × [{g['stage']}] `{first['error'][:200]}` at `{g['where']}` "
                f"(first: {at})"
            )
        for d in t.dead_workers:
            any_failure = True
            md.append(f"- {t.target}: {d}")
    if not any_failure:
        md.append("- none")
    md += ["", "Full log:", "", "```", *lines, "```", ""]
    out.write_text("\n".join(md))


# --------------------------------------------------------------------------------------------------
# replay and minimization


def replay(target: str, index: int, args: argparse.Namespace) -> int:
    _init(args.seed, args.timeout, args.per_stream)
    assert _worker is not None
    extra: Counter[str] = Counter()
    failures: list[dict[str, Any]] = []
    if target == "frames":
        plan, _, _ = plan_stream(_worker, index)
        print(f"stream {index}: {plan}")
        fuzz_stream(_worker, index, extra, failures, verbose=True)
    else:
        data, ctx = make_file(_worker, index)
        print(f"file {index}: {len(data)} bytes, {ctx}")
        print("outcome:", check_file(_worker, index, data, ctx, extra, failures))
    for f in failures:
        print(f)
    return 1 if failures else 0


def _records_of(batch: RecordBatch) -> list[tuple[bytes, int, int, int]]:
    return [
        (
            batch.record(i)
            if batch.offsets[i] >= 0
            and batch.lengths[i] >= 0
            and batch.offsets[i] + batch.lengths[i] <= len(batch.buf)
            else b"",
            int(batch.linktype[i]),
            int(batch.wire_lengths[i]),
            int(batch.ts_ns[i]),
        )
        for i in range(len(batch))
    ]


def batch_from(records: Sequence[tuple[bytes, int, int, int]], gap: int = 16) -> RecordBatch:
    """Records as a RecordBatch (the shape the regression tests build)."""
    parts, offsets, at = [], [], 0
    for data, *_ in records:
        parts.append(b"\xee" * gap + data)
        offsets.append(at + gap)
        at += gap + len(data)
    return RecordBatch(
        ts_ns=np.array([r[3] for r in records], np.int64),
        linktype=np.array([r[1] for r in records], np.int32),
        offsets=np.array(offsets, np.int64),
        lengths=np.array([len(r[0]) for r in records], np.int32),
        wire_lengths=np.array([r[2] for r in records], np.int32),
        buf=np.frombuffer(b"".join(parts), np.uint8).copy(),
    )


def minimize(index: int, args: argparse.Namespace) -> int:
    """The first failing batch of stream `index`, shrunk (ddmin over its records, with fresh stages, after
    the stream's earlier batches if the failure needs their state) to the fewest records that still fail
    the same way."""
    _init(args.seed, args.timeout, args.per_stream)
    assert _worker is not None
    w = _worker
    plan, _, _ = plan_stream(w, index)
    history: list[RecordBatch] = []
    target: tuple[str, str] | None = None
    m = Machines.of(plan.map_)
    for bi in stream_batches(w, index, w.per_stream):
        found = run_batch(m, plan.map_, bi, "", Counter())
        if found:
            stage, err = found[0]
            target = (stage, type(err).__name__)
            history.append(bi.batch)
            break
        history.append(bi.batch)
    if target is None:
        print(f"stream {index}: no failure")
        return 0
    print(f"stream {index}, batch {len(history) - 1}: {target}")

    def fails(prefix: list[RecordBatch], records: Sequence[tuple[bytes, int, int, int]]) -> bool:
        mm = Machines.of(plan.map_)
        for earlier in prefix:
            run_batch(mm, plan.map_, BatchInput(earlier, 0, 0, np.zeros(0, np.int64), False), "", Counter())
        got = run_batch(
            mm, plan.map_, BatchInput(batch_from(records), 0, 0, np.zeros(0, np.int64), False), "", Counter()
        )
        return any((s, type(e).__name__) == target for s, e in got)

    records = _records_of(history[-1])
    prefix: list[RecordBatch] = []
    if not fails(prefix, records):
        prefix = history[:-1]
        if not fails(prefix, records):
            print("the failure does not reproduce from the records alone (it depends on the buffer layout)")
            return 1
        print(f"needs the state of the {len(prefix)} batches before it")
    granularity = 2
    while len(records) >= 2:
        size = math.ceil(len(records) / granularity)
        reduced = False
        for start in range(0, len(records), size):
            candidate = records[:start] + records[start + size :]
            if candidate and fails(prefix, candidate):
                records, granularity, reduced = candidate, max(granularity - 1, 2), True
                break
        if not reduced:
            if granularity >= len(records):
                break
            granularity = min(len(records), granularity * 2)
    print(f"{len(records)} record(s) (bytes, linktype, wire length, ts_ns):")
    print("RECORDS = [")
    for data, linktype, wire, ts in records:
        print(f"    (bytes.fromhex({data.hex()!r}), {linktype}, {wire}, {ts}),")
    print("]")
    return 0


# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--targets", default=",".join(TARGETS), help="comma-separated: frames,files")
    ap.add_argument("-n", type=int, default=1_000_000, help="mutated frames (target frames)")
    ap.add_argument("--per-stream", type=int, default=20_000, help="mutated frames per stream (one input)")
    ap.add_argument("--files", type=int, default=3000, help="corrupted capture files (target files)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--nice", type=int, default=19, help="niceness of the worker processes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--timeout", type=float, default=20.0, help="per batch/file limit (s): beyond it is a hang"
    )
    ap.add_argument("--out", type=Path, help="write the report here (.md, and .json beside it)")
    ap.add_argument("--replay", nargs=2, metavar=("TARGET", "INDEX"), help="regenerate and run one input")
    ap.add_argument(
        "--minimize", type=int, metavar="STREAM", help="shrink the first failing batch of a stream"
    )
    args = ap.parse_args(argv)
    if args.replay:
        return replay(args.replay[0], int(args.replay[1]), args)
    if args.minimize is not None:
        return minimize(args.minimize, args)
    targets = [t for t in args.targets.split(",") if t]
    unknown = set(targets) - set(TARGETS)
    if unknown:
        ap.error(f"unknown target(s): {', '.join(sorted(unknown))}")
    lines: list[str] = []

    def log(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    load_before = [round(x, 2) for x in os.getloadavg()]
    command = "python benchmarks/fuzz_ethercat.py " + " ".join(sys.argv[1:] if argv is None else argv)
    log(
        f"EtherCAT fuzz campaign: seed {args.seed}, {args.workers} workers, per-input limit "
        f"{args.timeout:g} s, {os.cpu_count()} CPUs"
    )
    tallies: list[Tally] = []
    for target in targets:
        if target == "frames":
            n = math.ceil(args.n / args.per_stream)
            log(f"frames: {n} streams of {args.per_stream:,} mutated frames")
        else:
            n = args.files
        tallies.append(campaign(target, n, args, log))
    report(tallies, log)
    total = sum(t.n_crashes for t in tallies)
    log(f"\n{total} failures")
    if args.out:
        meta = {
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "command": command.strip(),
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "workers": args.workers,
            "nice": args.nice,
            "seed": args.seed,
            "per_stream": args.per_stream,
            "timeout_s": args.timeout,
            "load_before": load_before,
            "load_after": [round(x, 2) for x in os.getloadavg()],
        }
        write_results(args.out, meta, tallies, lines)
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main())
