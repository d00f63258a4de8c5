"""EtherCAT frames out of capture records: `RecordBatch` -> `FrameBatch` (datagram columns by key).

    decoder = FrameDecoder()                      # or FrameDecoder(expected_wkc={(LRW, 0x10000): 3, ...})
    for batch in record_batches:                  # ingest/ethercat/pcap.py
        frames = decoder.decode(batch)            # FrameBatch: ts_ns, datagrams[key] -> DatagramColumns

What a record may be (by its link type): Ethernet (EtherType 0x88A4 at byte 12, behind at most two
802.1Q/802.1ad tags), Linux cooked capture SLL (protocol at 14, 16-byte header) and SLL2 (protocol at 0,
20-byte header), each of them also carrying IPv4/UDP to port 0x88A4 (EtherCAT over UDP). Anything else is
counted `not_ethercat` and skipped.

An EtherCAT frame: a 2-byte header (length 11 bits, type 4 bits: 1 = datagrams, 5 = mailbox gateway, the
others skipped as `other_frame_type`), then datagrams chained by bit 15 of their length field. Every
datagram is counted by command (`datagrams_LRD`, ...). Kept as process data (a `DatagramKey` with columns):
logical LRD/LWR/LRW datagrams and addressed or broadcast datagrams to a register below 0x1000 (ARMW/FRMW
distributed-clock datagrams among them); datagrams to registers >= 0x1000 (the mailboxes) and mailbox
gateway frames are skipped and counted `mailbox`; NOP datagrams are counted only. A frame holding no kept
datagram is counted but is not a row of the FrameBatch.

Bad input rejects the whole record, counted by reason (`FrameBatch.rejections`, never raised):
`truncated` (the capture kept fewer bytes than the wire carried, and the cut falls inside the link or
EtherCAT part), `bad_length` (a length that runs past the EtherCAT frame, the UDP datagram or the frame on
the wire), `unknown_command` (a datagram command above 14), `bad_link` (an unknown link type, a link header
or IPv4 header that cannot be), `fragmented` (the first fragment of an IPv4 datagram to port 0x88A4: not
reassembled), `oversize` (a record over 256 KiB), `bad_record` (a record outside the batch's buffer).

Both copies of a cyclic frame (a capture at the master): the first slave flips bit 1 of the first source
MAC byte of every frame it forwards, so a master's outgoing copies and the returned copies differ in that
one bit. Per master MAC (that bit cleared) the decoder tallies, across batches, the datagram frames seen
with the bit clear and set and how many of them carry a non-zero working counter. Once both variants of a
MAC have been seen, the capture holds both copies: the variant whose frames carry more non-zero WKCs is the
returned one (ties: bit set), every frame of the other variant is an outgoing copy, dropped and counted
`outgoing_copy` (not `frames`, not `datagrams_*`). Until both variants are seen (a capture of one direction,
or the very first frames of a batch-by-batch live capture whose returned copy comes in a later batch)
every frame is kept.

Working counters: expected per key from `expected_wkc` (an ENI's `Cnt`; keys `DatagramKey` or
`(command, address)`), else learned: the most common non-zero WKC seen for the key so far, this batch
included (ties: the higher one; robust to a one-off odd value, unlike the maximum). A datagram whose WKC is
below the expected count (a WKC of 0 is always below a learned one) is `stale` (DatagramColumns.stale,
counted `stale`).

Fast path: records are grouped by (link type, captured length, wire length); a group's first record is
parsed in Python into a layout (every byte position the parse read: link type fields, EtherCAT header,
each datagram's command, address and length field), every record of the group is checked against it at
once (masked 64-bit words), and the data and WKC columns of all matching records are sliced out together
(strided views when the records lie at a constant stride in the buffer, as a capture file's records of one
length do; else the group's rows are gathered once). Records that differ are tried against the next
layout, a few times; the rest and groups under 16 records go through the per-record path (the same parser,
applied to each record alone: ~60,000 records/s against millions).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, Final, NamedTuple

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ingest.ethercat.types import (
    COMMANDS,
    ETHERTYPE,
    LINKTYPE_ETHERNET,
    LINKTYPE_LINUX_SLL,
    LINKTYPE_LINUX_SLL2,
    LOGICAL,
    UDP_PORT,
    DatagramColumns,
    DatagramKey,
    FrameBatch,
    RecordBatch,
)

MAX_RECORD_BYTES: Final = 256 * 1024
MAILBOX_REGISTER: Final = 0x1000  # addressed datagrams to slave registers at or above this: mailbox traffic

# rejection reasons (FrameBatch.rejections) and skips (FrameBatch.counts)
TRUNCATED: Final = "truncated"
BAD_LENGTH: Final = "bad_length"
UNKNOWN_COMMAND: Final = "unknown_command"
BAD_LINK: Final = "bad_link"
FRAGMENTED: Final = "fragmented"
OVERSIZE: Final = "oversize"
BAD_RECORD: Final = "bad_record"
REJECTIONS: Final = frozenset(
    {TRUNCATED, BAD_LENGTH, UNKNOWN_COMMAND, BAD_LINK, FRAGMENTED, OVERSIZE, BAD_RECORD}
)
NOT_ETHERCAT: Final = "not_ethercat"
OTHER_FRAME_TYPE: Final = "other_frame_type"
MAILBOX: Final = "mailbox"
OUTGOING_COPY: Final = "outgoing_copy"
STALE: Final = "stale"

_VLAN_TPIDS: Final = frozenset({0x8100, 0x88A8, 0x9100})
_MAX_TAGS: Final = 2
_ETHERTYPE_IPV4: Final = 0x0800
_FRAME_DATAGRAMS: Final = 1
_FRAME_MAILBOX: Final = 5
# link type -> (protocol field position, payload start, source address position)
_LINKS: Final = {
    LINKTYPE_ETHERNET: (12, 14, 6),
    LINKTYPE_LINUX_SLL: (14, 16, 6),
    LINKTYPE_LINUX_SLL2: (0, 20, 12),
}
_MAC_MASK: Final = 0xFFFF_FFFF_FFFD  # six address bytes (little-endian word), bit 1 of the first cleared
_DIRECTION_BIT: Final = 0x02

# bounds on what the decoder learns from the wire (garbage must not grow it without end)
MAX_LEARNED_KEYS: Final = 4096
MAX_WKC_VALUES: Final = 64
MAX_MASTERS: Final = 256

_MIN_GROUP: Final = 16  # smaller groups go through the per-record path
_MAX_LAYOUTS: Final = 8  # layouts tried per group before the rest goes through the per-record path
_FAST_MIN_LENGTH: Final = 16
_RECENT_SHAPES: Final = 256  # per-record path: layouts remembered per (link type, lengths) ...
_RECENT_LAYOUTS: Final = 4  # ... a few for each
_FAST_MAX_WIRE: Final = 1 << 40  # wire lengths are int32 anyway; the group key packs them in 40 bits
_LINK_TYPES: Final = np.array(sorted(_LINKS), np.int64)
_LINK_INDEX: Final = np.zeros(max(_LINKS) + 1, np.int64)
_LINK_INDEX[_LINK_TYPES] = np.arange(len(_LINK_TYPES))


class _Datagram(NamedTuple):
    command: int
    address: int
    length: int
    data_at: int  # offset of the data in the record
    wkc_at: int  # offset of the 2-byte WKC (right after the data)
    kept: bool  # process data (else mailbox or NOP: counted only)


class _Layout:
    """What a record is, and the byte positions that decided it: any record of the same link type,
    captured length and wire length with the same bytes at `checked` parses the same (same outcome, same
    datagrams at the same offsets)."""

    __slots__ = ("_counts", "checked", "datagrams", "frame_type", "keeps", "outcome")

    def __init__(
        self, outcome: str, checked: list[int], frame_type: int = 0, datagrams: tuple[_Datagram, ...] = ()
    ) -> None:
        self.outcome = outcome  # "" for an EtherCAT frame, else a rejection reason or a skip
        self.checked = checked
        self.frame_type = frame_type
        self.datagrams = datagrams
        self.keeps = any(d.kept for d in datagrams)
        self._counts: Counter[str] | None = None

    def counts(self) -> Counter[str]:
        """What one frame of this layout adds to the counts."""
        if self._counts is None:
            self._counts = self._count()
        return self._counts

    def _count(self) -> Counter[str]:
        out: Counter[str] = Counter()
        if self.frame_type == _FRAME_MAILBOX:
            out[MAILBOX] += 1
        elif self.frame_type != _FRAME_DATAGRAMS:
            out[OTHER_FRAME_TYPE] += 1
        for d in self.datagrams:
            out[_COUNT_NAMES[d.command]] += 1
            if not d.kept and d.command:
                out[MAILBOX] += 1
        return out


_COUNT_NAMES: Final = {command: f"datagrams_{name}" for command, name in COMMANDS.items()}


def parse_record(rec: bytes, linktype: int, wire_length: int) -> _Layout:
    """Parse one record: the per-record path, and the template of a fast-path group."""
    n = len(rec)
    wire = max(wire_length, n)
    checked: list[int] = []
    link = _LINKS.get(linktype)
    if link is None:
        return _Layout(BAD_LINK, checked)
    type_at, payload_at, _ = link
    if payload_at > n:  # bytes up to `end` needed: a record the wire would have held is truncated
        return _Layout(TRUNCATED if payload_at <= wire else BAD_LINK, checked)
    checked += (type_at, type_at + 1)
    proto = rec[type_at] << 8 | rec[type_at + 1]
    tags = 0
    while proto in _VLAN_TPIDS:
        if tags == _MAX_TAGS:
            return _Layout(NOT_ETHERCAT, checked)
        tags += 1
        if payload_at + 4 > n:
            return _Layout(TRUNCATED if payload_at + 4 <= wire else BAD_LINK, checked)
        checked += (payload_at + 2, payload_at + 3)
        proto = rec[payload_at + 2] << 8 | rec[payload_at + 3]
        payload_at += 4
    if proto == ETHERTYPE:
        start, bound = payload_at, wire
    elif proto == _ETHERTYPE_IPV4:
        ip = payload_at
        if ip + 20 > n:
            return _Layout(TRUNCATED if ip + 20 <= wire else BAD_LINK, checked)
        checked += (ip, ip + 6, ip + 7, ip + 9)
        version_ihl = rec[ip]
        ihl = (version_ihl & 0x0F) * 4
        if version_ihl >> 4 != 4 or ihl < 20:
            return _Layout(BAD_LINK, checked)
        if rec[ip + 9] != _IPPROTO_UDP:
            return _Layout(NOT_ETHERCAT, checked)
        flags_fragment = rec[ip + 6] << 8 | rec[ip + 7]
        if flags_fragment & 0x1FFF:  # a later fragment: no UDP header in it
            return _Layout(NOT_ETHERCAT, checked)
        udp = ip + ihl
        if udp + 8 > n:
            return _Layout(TRUNCATED if udp + 8 <= wire else BAD_LINK, checked)
        checked += (udp + 2, udp + 3)
        if (rec[udp + 2] << 8 | rec[udp + 3]) != UDP_PORT:
            return _Layout(NOT_ETHERCAT, checked)
        if flags_fragment & 0x2000:  # more fragments: the EtherCAT frame is not all here
            return _Layout(FRAGMENTED, checked)
        checked += (ip + 2, ip + 3, udp + 4, udp + 5)
        total = rec[ip + 2] << 8 | rec[ip + 3]
        udp_length = rec[udp + 4] << 8 | rec[udp + 5]
        if total < ihl + 8 or not 8 <= udp_length <= total - ihl or ip + total > wire:
            return _Layout(BAD_LENGTH, checked)
        start, bound = udp + 8, udp + udp_length
    else:
        return _Layout(NOT_ETHERCAT, checked)

    if start + 2 > bound:
        return _Layout(BAD_LENGTH, checked)
    if start + 2 > n:
        return _Layout(TRUNCATED, checked)
    checked += (start, start + 1)
    header = rec[start] | rec[start + 1] << 8
    end = start + 2 + (header & 0x7FF)
    if end > bound:
        return _Layout(BAD_LENGTH, checked)
    if end > n:
        return _Layout(TRUNCATED, checked)
    frame_type = header >> 12
    if frame_type != _FRAME_DATAGRAMS:
        return _Layout("", checked, frame_type)

    datagrams: list[_Datagram] = []
    at = start + 2
    while True:
        if at + 12 > end:
            return _Layout(BAD_LENGTH, checked)
        checked += (at, at + 2, at + 3, at + 4, at + 5, at + 6, at + 7)
        command = rec[at]
        if command > _LAST_COMMAND:
            return _Layout(UNKNOWN_COMMAND, checked)
        address = rec[at + 2] | rec[at + 3] << 8 | rec[at + 4] << 16 | rec[at + 5] << 24
        length_field = rec[at + 6] | rec[at + 7] << 8
        length = length_field & 0x7FF
        if at + 12 + length > end:
            return _Layout(BAD_LENGTH, checked)
        if command in LOGICAL:
            kept = True
        elif command == 0:  # NOP
            kept = False
        else:  # addressed or broadcast: ADP | ADO << 16, ADO the slave register
            kept = address >> 16 < MAILBOX_REGISTER
        datagrams.append(_Datagram(command, address, length, at + 10, at + 10 + length, kept))
        at += 12 + length
        if not length_field & 0x8000:
            return _Layout("", checked, frame_type, tuple(datagrams))


_IPPROTO_UDP: Final = 17
_LAST_COMMAND: Final = max(COMMANDS)


class _Rows:
    """The records of one fast-path group as strided views: row i starts at `offset + i * stride` in
    `base` and is `length` bytes long."""

    def __init__(self, base: np.ndarray, offset: int, stride: int, n: int, length: int) -> None:
        self.base, self.offset, self.stride, self.n, self.length = base, offset, stride, n, length

    def u8(self, start: int, width: int) -> np.ndarray:
        return np.ndarray((self.n, width), np.uint8, self.base, self.offset + start, (self.stride, 1))

    def u16(self, start: int) -> np.ndarray:
        return np.ndarray((self.n,), "<u2", self.base, self.offset + start, (self.stride,))

    def u64(self, start: int) -> np.ndarray:
        return np.ndarray((self.n,), "<u8", self.base, self.offset + start, (self.stride,))

    def select(self, at: np.ndarray) -> _Rows:
        """Rows `at` (ascending): a view when they are evenly spaced (every record, or every other one as
        in a capture of both copies), else a contiguous copy of those rows."""
        m = len(at)
        if m == self.n:
            return self
        if m == 0:
            return _Rows(self.base, self.offset, self.stride, 0, self.length)
        step = int(at[1] - at[0]) if m > 1 else 1
        if step > 0 and (m < 3 or (np.diff(at) == step).all()):
            return _Rows(
                self.base, self.offset + int(at[0]) * self.stride, self.stride * step, m, self.length
            )
        gathered = self.u8(0, self.length)[at].reshape(-1)
        return _Rows(gathered, 0, self.length, m, self.length)

    def matches(self, layout: _Layout, template: bytes) -> np.ndarray:
        """Rows whose bytes at the layout's checked positions equal the template record's (compared
        as masked little-endian 64-bit words, a few per record)."""
        ok = np.ones(self.n, bool)
        positions = sorted(set(layout.checked))
        i = 0
        while i < len(positions):
            start = min(positions[i], self.length - 8)
            mask = 0
            while i < len(positions) and positions[i] < start + 8:
                mask |= 0xFF << (8 * (positions[i] - start))
                i += 1
            value = int.from_bytes(template[start : start + 8], "little") & mask
            ok &= (self.u64(start) & np.uint64(mask)) == np.uint64(value)
        return ok


class _Unit:
    """Records of one fast-path group that share a layout: `records` (batch indices, ascending) are the
    rows of `rows`."""

    __slots__ = ("layout", "records", "rows")

    def __init__(self, layout: _Layout, records: np.ndarray, rows: _Rows) -> None:
        self.layout, self.records, self.rows = layout, records, rows


_Slow = tuple[int, _Layout, bytes]  # a record of the per-record path: batch index, layout, bytes
_Key = tuple[int, int, int]  # command, address, length


@dataclass
class _Master:
    # datagram frames seen with the direction bit clear and set, and how many of them had a non-zero WKC
    seen: list[int] = field(default_factory=lambda: [0, 0])
    nonzero: list[int] = field(default_factory=lambda: [0, 0])

    def outgoing(self) -> int:
        """The direction bit of the outgoing copies; -1: not a capture of both copies (so far)."""
        if not (self.seen[0] and self.seen[1]):
            return -1
        return 0 if self.nonzero[1] >= self.nonzero[0] else 1


ExpectedKey = DatagramKey | tuple[int, int]


class FrameDecoder:
    """Decodes RecordBatches into FrameBatches, keeping across batches what it learns (which copy of a
    frame is the returned one, the expected working counters); `counts` and `rejections` total every
    batch decoded.

    `expected_wkc`: the expected WKC per datagram (an ENI's `Cnt`) by `DatagramKey` or by
    `(command, address)`; keys not in it are learned. `fast=False` sends every record through the
    per-record path (the reference the fast path is tested against)."""

    def __init__(self, expected_wkc: Mapping[ExpectedKey, int] | None = None, *, fast: bool = True) -> None:
        self._expected_exact: dict[DatagramKey, int] = {}
        self._expected_addr: dict[tuple[int, int], int] = {}
        for key, count in (expected_wkc or {}).items():
            if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= 0xFFFF:
                raise ValueError(f"expected working counter of {key!r}: {count!r} is not an integer 0..65535")
            if isinstance(key, DatagramKey):
                self._expected_exact[key] = count
            elif isinstance(key, tuple) and len(key) == 2 and all(isinstance(k, int) for k in key):
                self._expected_addr[(key[0], key[1])] = count
            else:
                raise ValueError(
                    f"expected working counter of {key!r}: not a DatagramKey or (command, address)"
                )
        self.fast = fast
        self._wkc_seen: dict[DatagramKey, Counter[int]] = {}
        self._masters: dict[int, _Master] = {}
        # per (link type, length, wire length): the last layouts the per-record path parsed, each with a
        # getter of the bytes it depends on and their values
        self._recent: dict[tuple[int, int, int], list[tuple[_Layout, Callable[[bytes], Any], Any]]] = {}
        self.counts: Counter[str] = Counter()
        self.rejections: Counter[str] = Counter()

    # -- working counters -------------------------------------------------------------------------

    def configured(self, key: DatagramKey) -> int | None:
        """The expected WKC given for `key` (None: learned)."""
        count = self._expected_exact.get(key)
        return count if count is not None else self._expected_addr.get((key.command, key.address))

    def expected(self, key: DatagramKey) -> int | None:
        """The WKC expected of `key`: configured, else learned (None: no non-zero WKC seen yet)."""
        count = self.configured(key)
        if count is not None:
            return count
        seen = self._wkc_seen.get(key)
        if not seen:
            return None
        return max(seen.items(), key=lambda item: (item[1], item[0]))[0]

    def _learn(self, key: DatagramKey, wkc: np.ndarray) -> None:
        seen = self._wkc_seen.get(key)
        if seen is None:
            if len(self._wkc_seen) >= MAX_LEARNED_KEYS:
                return
            seen = self._wkc_seen[key] = Counter()
        nonzero = wkc[wkc != 0]
        if not len(nonzero):
            return
        if int(nonzero.max()) < 1024:
            tally = np.bincount(nonzero)
            values = np.flatnonzero(tally)
            numbers = tally[values]
        else:
            values, numbers = np.unique(nonzero, return_counts=True)
        for value, number in zip(values.tolist(), numbers.tolist(), strict=True):
            if value in seen or len(seen) < MAX_WKC_VALUES:
                seen[value] += number

    def _stale(self, key: DatagramKey, wkc: np.ndarray) -> np.ndarray:
        count = self.configured(key)
        if count is None:
            self._learn(key, wkc)
            count = max(self.expected(key) or 1, 1)
        return wkc < count

    # -- decoding ---------------------------------------------------------------------------------

    def decode(self, batch: RecordBatch) -> FrameBatch:
        """The frames of `batch` (see the module docstring); bad records are counted, never raised."""
        n = len(batch)
        counts: Counter[str] = Counter()
        rejections: Counter[str] = Counter()
        buf = np.ascontiguousarray(batch.buf, dtype=np.uint8).reshape(-1)
        ts = np.asarray(batch.ts_ns, dtype=np.int64)
        linktype = np.asarray(batch.linktype, dtype=np.int64)
        offsets = np.asarray(batch.offsets, dtype=np.int64)
        lengths = np.asarray(batch.lengths, dtype=np.int64)
        wire = np.maximum(np.asarray(batch.wire_lengths, dtype=np.int64), lengths)
        if n:
            counts["records"] = n

        size = len(buf)
        # no sum that can overflow: an offset near 2**63 must not wrap round into the buffer
        inside = (
            (offsets >= 0)
            & (lengths >= 0)
            & (offsets <= size)
            & (lengths <= size - np.minimum(offsets, size))
        )
        oversize = inside & (lengths > MAX_RECORD_BYTES)
        if not inside.all():
            rejections[BAD_RECORD] += int((~inside).sum())
        if oversize.any():
            rejections[OVERSIZE] += int(oversize.sum())
        usable = inside & ~oversize
        known = np.isin(linktype, _LINK_TYPES)
        if not known.all():
            rejections[BAD_LINK] += int((usable & ~known).sum())
            usable &= known
        candidates = usable & (lengths >= _FAST_MIN_LENGTH) & (wire < _FAST_MAX_WIRE)

        units: list[_Unit] = []
        outcomes: Counter[str] = Counter()
        claimed = np.zeros(n, bool)
        if self.fast:
            for members in _groups(np.flatnonzero(candidates), linktype, lengths, wire):
                first = int(members[0])
                kind, length, wire_length = int(linktype[first]), int(lengths[first]), int(wire[first])
                _fast_group(members, kind, length, wire_length, buf, offsets, units, outcomes)
            for unit in units:
                claimed[unit.records] = True
        slow: list[_Slow] = []
        recent = self._recent
        for i in np.flatnonzero(usable & ~claimed).tolist():
            start, length, kind, wire_length = (
                int(offsets[i]),
                int(lengths[i]),
                int(linktype[i]),
                int(wire[i]),
            )
            record = buf[start : start + length].tobytes()
            shape = (kind, length, wire_length)
            cached = recent.get(shape)
            layout = None
            if cached is not None:
                for candidate, getter, values in cached:
                    if getter(record) == values:  # the same bytes where that record's parse looked
                        layout = candidate
                        break
            if layout is None:
                layout = parse_record(record, kind, wire_length)
                if layout.checked:
                    if cached is None:
                        if len(recent) >= _RECENT_SHAPES:
                            recent.clear()
                        cached = recent[shape] = []
                    getter = itemgetter(*layout.checked)
                    cached.insert(0, (layout, getter, getter(record)))
                    del cached[_RECENT_LAYOUTS:]
            if layout.outcome:
                outcomes[layout.outcome] += 1
            else:
                slow.append((i, layout, record))
        for name, number in outcomes.items():
            (rejections if name in REJECTIONS else counts)[name] += number

        drop = self._copies(units, slow, linktype, n)
        return self._assemble(units, slow, drop, ts, n, counts, rejections)

    def _copies(self, units: list[_Unit], slow: list[_Slow], linktype: np.ndarray, n: int) -> np.ndarray:
        """Which records are outgoing copies (module docstring); tallies each master's frames."""
        records: list[np.ndarray] = []
        words: list[np.ndarray] = []  # the source address word (8 bytes at the address, little-endian)
        counted: list[np.ndarray] = []  # datagram frames (the others count for nothing in the tallies)
        nonzero: list[np.ndarray] = []
        for unit in units:
            layout = unit.layout
            if layout.outcome:
                continue
            records.append(unit.records)
            mac_at = _LINKS[int(linktype[unit.records[0]])][2]
            words.append(unit.rows.u64(mac_at))
            counted.append(np.full(len(unit.records), layout.frame_type == _FRAME_DATAGRAMS))
            any_set = np.zeros(len(unit.records), bool)
            for d in layout.datagrams:
                any_set |= unit.rows.u16(d.wkc_at) != 0
            nonzero.append(any_set)
        if slow:
            records.append(np.array([s[0] for s in slow], np.int64))
            slow_words, slow_counted, slow_nonzero = [], [], []
            for i, layout, rec in slow:
                mac_at = _LINKS[int(linktype[i])][2]
                slow_words.append(int.from_bytes(rec[mac_at : mac_at + 8], "little"))
                slow_counted.append(layout.frame_type == _FRAME_DATAGRAMS)
                slow_nonzero.append(any(rec[d.wkc_at] | rec[d.wkc_at + 1] for d in layout.datagrams))
            words.append(np.array(slow_words, np.uint64))
            counted.append(np.array(slow_counted, bool))
            nonzero.append(np.array(slow_nonzero, bool))
        drop = np.zeros(n, bool)
        if not records:
            return drop
        frames = np.concatenate(records)
        word = np.concatenate(words)
        bit = (word & np.uint64(_DIRECTION_BIT)) != 0
        mac = (word & np.uint64(_MAC_MASK)).astype(np.int64)
        if (mac == mac[0]).all():
            masters, inverse = mac[:1], np.zeros(len(frames), np.int64)
        else:
            masters, inverse = np.unique(mac, return_inverse=True)
        datagram_frame = np.concatenate(counted)
        with_wkc = datagram_frame & np.concatenate(nonzero)
        outgoing = np.full(len(masters), -1, np.int64)
        for m, address in enumerate(masters.tolist()):
            state = self._masters.get(address)
            if state is None:
                if len(self._masters) >= MAX_MASTERS:
                    continue
                state = self._masters[address] = _Master()
            mine = inverse == m if len(masters) > 1 else np.ones(len(frames), bool)
            set_bit = mine & bit
            clear_bit = mine & ~bit
            state.seen[0] += int(np.count_nonzero(clear_bit & datagram_frame))
            state.seen[1] += int(np.count_nonzero(set_bit & datagram_frame))
            state.nonzero[0] += int(np.count_nonzero(clear_bit & with_wkc))
            state.nonzero[1] += int(np.count_nonzero(set_bit & with_wkc))
            outgoing[m] = state.outgoing()
        drop[frames] = outgoing[inverse] == bit
        return drop

    def _assemble(
        self,
        units: list[_Unit],
        slow: list[_Slow],
        drop: np.ndarray,
        ts: np.ndarray,
        n: int,
        counts: Counter[str],
        rejections: Counter[str],
    ) -> FrameBatch:
        kept_frame = np.zeros(n, bool)
        pieces: dict[_Key, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}
        outgoing = 0
        for unit in units:
            layout = unit.layout
            if layout.outcome:
                continue
            keep = ~drop[unit.records]
            kept = int(np.count_nonzero(keep))
            outgoing += len(keep) - kept
            if not kept:
                continue
            counts["frames"] += kept
            for name, number in layout.counts().items():
                counts[name] += number * kept
            if not layout.keeps:
                continue
            records, rows = unit.records, unit.rows
            if kept < len(keep):
                records, rows = records[keep], rows.select(np.flatnonzero(keep))
            kept_frame[records] = True
            for d in layout.datagrams:
                if d.kept:
                    data = rows.u8(d.data_at, d.length).copy()  # never a view of the batch's buffer
                    wkc = rows.u16(d.wkc_at).astype(np.uint16)
                    pieces.setdefault((d.command, d.address, d.length), []).append((records, data, wkc))

        slow_rows: dict[_Key, tuple[list[int], list[bytes], list[int]]] = {}
        slow_kept: list[int] = []
        layouts: dict[int, tuple[_Layout, int]] = {}  # id -> (layout, frames)
        drops = drop.tolist() if slow else []
        for i, layout, rec in slow:
            if drops[i]:
                outgoing += 1
                continue
            tally = layouts.get(id(layout))
            layouts[id(layout)] = (layout, 1 if tally is None else tally[1] + 1)
            if layout.keeps:
                slow_kept.append(i)
            for d in layout.datagrams:
                if d.kept:
                    columns = slow_rows.setdefault((d.command, d.address, d.length), ([], [], []))
                    columns[0].append(i)
                    columns[1].append(rec[d.data_at : d.wkc_at])
                    columns[2].append(rec[d.wkc_at] | rec[d.wkc_at + 1] << 8)
        for layout, frames in layouts.values():
            counts["frames"] += frames
            for name, number in layout.counts().items():
                counts[name] += number * frames
        if slow_kept:
            kept_frame[slow_kept] = True
        for cal, (recs, datas, wkcs) in slow_rows.items():
            data = np.frombuffer(bytearray().join(datas), np.uint8).reshape(len(recs), cal[2])
            pieces.setdefault(cal, []).append((np.array(recs, np.int64), data, np.array(wkcs, np.uint16)))
        if outgoing:
            counts[OUTGOING_COPY] += outgoing

        frame_of = np.cumsum(kept_frame) - 1
        out = FrameBatch(ts_ns=ts[kept_frame], counts=counts, rejections=rejections)
        for command_address_length in sorted(pieces):
            parts = pieces[command_address_length]
            if len(parts) == 1:
                records, data, wkc = parts[0]
            else:
                records = np.concatenate([p[0] for p in parts])
                data = np.concatenate([p[1] for p in parts])
                wkc = np.concatenate([p[2] for p in parts])
                if (np.diff(records) < 0).any():
                    order = np.argsort(records, kind="stable")
                    records, data, wkc = records[order], data[order], wkc[order]
            key = DatagramKey(*command_address_length)
            stale = self._stale(key, wkc)
            if stale.any():
                counts[STALE] += int(np.count_nonzero(stale))
            out.datagrams[key] = DatagramColumns(key, frame_of[records], data, wkc, stale)
        self.counts.update(counts)
        self.rejections.update(rejections)
        return out


def _groups(
    candidates: np.ndarray, linktype: np.ndarray, lengths: np.ndarray, wire: np.ndarray
) -> Iterator[np.ndarray]:
    """Fast-path records by (link type, captured length, wire length): each group's batch indices,
    ascending (groups too small to be worth it left out)."""
    if len(candidates) < _MIN_GROUP:
        return
    # link types are few (_LINK_TYPES), lengths < 2**19 (MAX_RECORD_BYTES), wire lengths < _FAST_MAX_WIRE
    keys = _LINK_INDEX[linktype[candidates]] << 60 | wire[candidates] << 20 | lengths[candidates]
    if (keys == keys[0]).all():
        yield candidates
        return
    _, inverse, sizes = np.unique(keys, return_inverse=True, return_counts=True)
    order = np.argsort(inverse, kind="stable")
    bounds = np.concatenate(([0], np.cumsum(sizes)))
    for g in np.flatnonzero(sizes >= _MIN_GROUP).tolist():
        yield candidates[order[bounds[g] : bounds[g + 1]]]


def _fast_group(
    members: np.ndarray,
    linktype: int,
    length: int,
    wire: int,
    buf: np.ndarray,
    offsets: np.ndarray,
    units: list[_Unit],
    outcomes: Counter[str],
) -> None:
    """Decode a group's records a layout at a time; what is left after a few layouts (or too few to
    be worth a layout) is left unclaimed for the per-record path."""
    starts = offsets[members]
    stride = int(starts[1] - starts[0])
    if stride > 0 and (np.diff(starts) == stride).all():
        rows = _Rows(buf, int(starts[0]), stride, len(members), length)
    else:  # gather the rows once into a contiguous copy, viewed the same way
        gathered = sliding_window_view(buf, length)[starts].reshape(-1)
        rows = _Rows(gathered, 0, length, len(members), length)
    pending = np.ones(len(members), bool)
    first = 0
    for _ in range(_MAX_LAYOUTS):
        start = int(starts[first])
        template = buf[start : start + length].tobytes()
        layout = parse_record(template, linktype, wire)
        at = np.flatnonzero(pending & rows.matches(layout, template))
        if layout.outcome:
            outcomes[layout.outcome] += len(at)
        units.append(_Unit(layout, members[at], rows.select(at)))
        pending[at] = False
        left = np.flatnonzero(pending)
        if len(left) < _MIN_GROUP:
            return
        first = int(left[0])
