"""Capture files (pcap, pcapng) -> `RecordBatch` chunks, and a fast writer of both formats.

Reading::

    reader = CaptureReader("bus.pcapng")        # CaptureError (naming the file) when it is no capture at all
    for batch in reader.batches():              # RecordBatch, at most `chunk_records` records each
        ...
    reader.rejections                           # reason -> count: what was dropped and why
    reader.counts                               # what was seen: records, fast_records, sections, ...

`read_records(path)` is the same without the counts.

Fast path: the cyclic stream of a bus is records of the same length (or the same few lengths in a fixed
order) back to back. After two repeats of a length pattern of up to `_MAX_PERIOD` records, the headers of
all records that follow the pattern are checked and decoded with numpy at once (strided views into the
chunk, no per-record Python); whatever breaks the pattern goes through a per-record Python loop, which then
watches for the next repeat. Both paths give the same records (a test checks it).

Memory is bounded: the file is read in chunks of `chunk_bytes` (a new buffer per chunk: a batch keeps its
own, read-only); a record's bytes are never copied (`RecordBatch.buf` is the chunk, `offsets` point into it).

Bad input is counted by reason, never raised:
- `truncated_file`: the file ends inside a record or block header.
- `corrupt_block`: pcap: a record header with an impossible timestamp fraction (the file is read no further:
  pcap has no marker to resynchronise on); pcapng: a block whose lengths are impossible or disagree at its
  two ends, or a block body too short for its type (the rest of the section is skipped, reading resumes at
  the next section header block).
- `bad_length`: pcap: a captured length that is neither a plausible record nor followed by a plausible
  header (reading stops); pcapng: a captured length longer than its block (the block is skipped).
- `record_too_large`: more than `MAX_RECORD_BYTES` captured (skipped; the next record is read).
- `unknown_interface`: a pcapng packet block naming an interface its section did not describe.
- `unknown_linktype`: a record on a link type other than Ethernet, Linux cooked capture v1 or v2.
- `no_timestamp`: a simple packet block (no timestamp) before any record with one.
A simple packet block after a timed record takes that record's time (`counts["time_borrowed"]`).
"""

from __future__ import annotations

import io
import logging
import os
import struct
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Final, NamedTuple, TypeAlias

import numpy as np

from ingest.errors import IngestError
from ingest.ethercat.types import LINKTYPE_ETHERNET, LINKTYPE_LINUX_SLL, LINKTYPE_LINUX_SLL2, RecordBatch
from ingest.stream import Rejections

log = logging.getLogger(__name__)

MAX_RECORD_BYTES: Final = 256 * 1024  # a record capturing more is rejected (record_too_large)
CHUNK_BYTES: Final = 8 << 20  # the file is read in chunks of this size
PASSED_LINKTYPES: Final = frozenset({LINKTYPE_ETHERNET, LINKTYPE_LINUX_SLL, LINKTYPE_LINUX_SLL2})

_MAX_PERIOD = 8  # longest length pattern (records) the fast path recognises
_FIRST_WINDOW = 16  # periods checked by the first vectorized look; each next look is 4x longer
_MIN_RUN = 8  # a fast run shorter than this (records) was not worth it: back off ...
_COOLDOWN = 32  # ... for this many records of the per-record loop
_INLINE_BLOCK = 1 << 20  # a pcapng block longer than this is checked and skipped without reading it

# classic pcap magic (as the first 4 bytes read) -> (byte order, nanosecond)
_PCAP_MAGICS: Final = {
    b"\xd4\xc3\xb2\xa1": ("<", False),
    b"\xa1\xb2\xc3\xd4": (">", False),
    b"\x4d\x3c\xb2\xa1": ("<", True),
    b"\xa1\xb2\x3c\x4d": (">", True),
}
_SHB_MAGIC: Final = b"\x0a\x0d\x0d\x0a"  # pcapng section header block type, the same in both byte orders
_SHB: Final = 0x0A0D0D0A
_BOM_LE: Final = b"\x4d\x3c\x2b\x1a"
_BOM_BE: Final = b"\x1a\x2b\x3c\x4d"
_IDB, _OPB, _SPB, _EPB = 1, 2, 3, 6
_COMPRESSED: Final = {
    b"\x1f\x8b": "gzip",
    b"\x28\xb5\x2f\xfd": "zstd",
    b"\xfd7zXZ": "xz",
    b"BZh": "bzip2",
    b"\x04\x22\x4d\x18": "lz4",
}

_NEED, _FULL, _DONE, _SKIP = range(4)
_U32_LE: Final = struct.Struct("<I")
_U32_BE: Final = struct.Struct(">I")
_U64: Final = (1 << 64) - 1


class CaptureError(IngestError):
    """A file is not a pcap or pcapng capture at all (the message names the file and why)."""


def _signed64(v: int) -> int:
    v &= _U64
    return v - (1 << 64) if v >> 63 else v


class _Stream:
    """The file in chunks. A chunk is never modified once read (batches keep it): moving on allocates a new
    one, carrying over the unread tail (at most one partial block)."""

    def __init__(self, f: io.BufferedReader, chunk_bytes: int, start: int) -> None:
        self.f = f
        self.chunk_bytes = chunk_bytes
        self.size = os.fstat(f.fileno()).st_size
        self.arr = np.empty(0, np.uint8)  # the chunk (read-only once read)
        self.raw = memoryview(self.arr.data)  # the same bytes, for struct
        self.base = start  # file offset of the chunk's first byte
        self.pos = 0
        self.end = 0
        self.eof = False
        f.seek(start)

    def fill(self, need: int) -> bool:
        """At least `need` bytes at `pos` (False: the file ends before)."""
        if self.end - self.pos >= need:
            return True
        if self.eof:
            return False
        keep = self.end - self.pos
        want = max(self.chunk_bytes, need - keep)
        new = np.empty(keep + want, np.uint8)  # not zeroed: readinto fills it
        new[:keep] = self.arr[self.pos : self.end]
        got = 0
        with memoryview(new.data) as view:
            while got < want:
                n = self.f.readinto(view[keep + got :])
                if not n:
                    break
                got += n
        if got < want:
            self.eof = True
            new = new[: keep + got]
        new.flags.writeable = False
        self.base += self.pos
        self.arr, self.raw = new, memoryview(new.data)
        self.pos, self.end = 0, len(new)
        return self.end - self.pos >= need

    def skip_to(self, offset: int) -> None:
        if offset <= self.base + self.end:
            self.pos = offset - self.base
            return
        self.f.seek(offset)
        self.arr = np.empty(0, np.uint8)
        self.raw = memoryview(self.arr.data)
        self.base, self.pos, self.end, self.eof = offset, 0, 0, False

    def peek(self, offset: int, n: int) -> bytes:
        """`n` bytes at file `offset` (fewer at the end of the file), leaving the chunk as it is."""
        if offset >= self.base and offset + n <= self.base + self.end:
            return bytes(self.raw[offset - self.base : offset - self.base + n])
        here = self.f.tell()
        try:
            self.f.seek(offset)
            return self.f.read(n)
        finally:
            self.f.seek(here)


class _Collector:
    """The records of the batch being built: decoded fast runs (arrays) and single records (tuples), in
    file order."""

    def __init__(self) -> None:
        self.parts: list[tuple[np.ndarray, ...]] = []
        self.single: list[tuple[int, int, int, int, int, int]] = []
        self.n = 0
        self.fast = 0

    def add(self, ts: int, lt: int, off: int, cap: int, wire: int, borrowed: bool = False) -> None:
        self.single.append((ts, lt, off, cap, wire, borrowed))
        self.n += 1

    def add_run(
        self, ts: np.ndarray, lt: np.ndarray, off: np.ndarray, cap: np.ndarray, wire: np.ndarray
    ) -> None:
        self._flush()
        self.parts.append((ts, lt, off, cap, wire, np.zeros(len(ts), bool)))
        self.n += len(ts)
        self.fast += len(ts)

    def _flush(self) -> None:
        if self.single:
            a = np.array(self.single, dtype=np.int64).reshape(-1, 6)
            self.parts.append((a[:, 0], a[:, 1], a[:, 2], a[:, 3], a[:, 4], a[:, 5].astype(bool)))
            self.single.clear()  # in place: the scanners hold its append

    def take(self) -> tuple[np.ndarray, ...]:
        self._flush()
        parts = self.parts
        self.parts, self.n = [], 0
        if len(parts) == 1:
            return parts[0]
        return tuple(np.concatenate([p[i] for p in parts]) for i in range(6))


def _period(hist: list[int]) -> int:
    """The shortest period (records) with which the last records repeat at least once; 0 if none."""
    h = len(hist)
    last = hist[-1]
    for p in range(1, min(_MAX_PERIOD, h // 2) + 1):
        if hist[h - 1 - p] == last and hist[h - p :] == hist[h - 2 * p : h - p]:
            return p
    return 0


def _interleave(parts: list[np.ndarray], dtype: type | np.dtype) -> np.ndarray:
    if len(parts) == 1:
        return parts[0].astype(dtype, copy=False)
    out = np.empty(len(parts[0]) * len(parts), dtype)
    for j, part in enumerate(parts):
        out[j :: len(parts)] = part
    return out


class _Run(NamedTuple):
    period: int  # bytes from one repeat of the pattern to the next
    starts: list[int]  # where each record of the pattern starts in it
    pattern: list[int]  # each record's length key (pcap: captured length; pcapng: block length)


class _Scanner:
    """Shared state of the two formats' scanners: counting, the length history the fast path watches."""

    def __init__(self, reader: CaptureReader, vectorized: bool) -> None:
        self.reader = reader
        self.vectorized = vectorized
        self.hist: list[int] = []
        self.cooldown = 0
        self.maybe = False  # the last records may repeat: try the vectorized path
        self.need = 0
        self.target = 0

    def reject(self, reason: str, st: _Stream, pos: int, text: str) -> None:
        self.reader.rejections.add(reason, f"{self.reader.path} at byte {st.base + pos}: {text}", log)

    def remember(self, length: int) -> None:
        """A record of this length key was read by the per-record loop: might a repeat start here?"""
        hist = self.hist
        hist.append(length)
        if len(hist) > 4 * _MAX_PERIOD:
            del hist[: 2 * _MAX_PERIOD]
        if self.cooldown:
            self.cooldown -= 1
        elif self.vectorized and length in hist[-1 - _MAX_PERIOD : -1]:
            self.maybe = True

    def forget(self) -> None:
        self.hist.clear()
        self.maybe = False

    def fast(self, st: _Stream, pos: int, col: _Collector, limit: int) -> int:
        """Try a vectorized run at `pos` when the history repeats; returns the new position."""
        p = _period(self.hist) if len(self.hist) >= 2 else 0
        if not p:
            self.maybe = False
            return pos
        pattern = self.hist[-p:]
        strides = [self.stride(s) for s in pattern]
        if max(strides) > MAX_RECORD_BYTES + 64:
            return pos
        period = sum(strides)
        starts = [sum(strides[:j]) for j in range(p)]
        run = _Run(period, starts, pattern)
        most = min((st.end - pos) // period, (limit - col.n) // p)
        if most < 2:
            return pos
        n, window = 0, _FIRST_WINDOW
        u4, width = self.u4, self.width
        pieces: list[list[np.ndarray]] = []
        while n < most:
            m = min(window, most - n)
            base = pos + n * period
            # one strided pass copies the headers; checks and decoding then work on compact arrays
            heads = [np.array(np.ndarray((m, width), u4, st.arr, base + s, (period, 4))) for s in starts]
            ok = self.check(st.arr, base, run, heads)
            good = m if ok.all() else int(np.argmin(ok))
            pieces.append([h[:good] for h in heads])
            n += good
            if good < m:
                break
            window *= 4
        if n < most:  # the pattern broke: the per-record loop goes on (and waits a while if it was short)
            self.maybe = False
            if n * p < _MIN_RUN:
                self.cooldown = _COOLDOWN
        if n:
            heads = [np.concatenate([piece[j] for piece in pieces]) for j in range(p)]
            col.add_run(*self.decode(pos, run, heads, n))
        return pos + n * period

    # per format
    width = 0  # 32-bit words of a record header
    u4 = np.dtype("<u4")  # their byte order

    def stride(self, key: int) -> int:
        raise NotImplementedError

    def check(self, arr: np.ndarray, base: int, run: _Run, heads: list[np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    def decode(self, base: int, run: _Run, heads: list[np.ndarray], n: int) -> tuple[np.ndarray, ...]:
        raise NotImplementedError

    def scan(self, st: _Stream, col: _Collector, limit: int) -> int:
        raise NotImplementedError

    def at_eof(self, st: _Stream) -> bool:
        """The file ended with `st.pos` short of a whole block; True when reading goes on."""
        raise NotImplementedError


class _PcapScanner(_Scanner):
    """Classic pcap: a 16-byte header (seconds, fraction, captured length, wire length) per record."""

    def __init__(
        self, reader: CaptureReader, vectorized: bool, endian: str, nano: bool, linktype: int
    ) -> None:
        super().__init__(reader, vectorized)
        self.header = struct.Struct(endian + "IIII")
        self.u4 = np.dtype(endian + "u4")
        self.frac_limit = 1_000_000_000 if nano else 1_000_000
        self.mult = 1 if nano else 1000
        self.linktype = linktype

    def stride(self, key: int) -> int:
        return 16 + key

    width = 4

    def check(self, arr: np.ndarray, base: int, run: _Run, heads: list[np.ndarray]) -> np.ndarray:
        ok = np.ones(len(heads[0]), bool)
        for h, cap in zip(heads, run.pattern, strict=True):
            ok &= h[:, 2] == cap
            ok &= h[:, 1] < self.frac_limit
        return ok

    def decode(self, base: int, run: _Run, heads: list[np.ndarray], n: int) -> tuple[np.ndarray, ...]:
        ts, off, cap, wire = [], [], [], []
        k = np.arange(n, dtype=np.int64) * run.period
        for start, h in zip(run.starts, heads, strict=True):
            ts.append(h[:, 0].astype(np.int64) * 1_000_000_000 + h[:, 1].astype(np.int64) * self.mult)
            off.append(k + (base + start + 16))
            cap.append(h[:, 2])
            wire.append(h[:, 3])
        count = n * len(run.starts)
        return (
            _interleave(ts, np.int64),
            np.full(count, self.linktype, np.int64),
            _interleave(off, np.int64),
            _interleave(cap, np.int64),
            _interleave(wire, np.int64),
        )

    def scan(self, st: _Stream, col: _Collector, limit: int) -> int:
        raw, pos, end = st.raw, st.pos, st.end
        header, frac_limit, mult, lt = self.header, self.frac_limit, self.mult, self.linktype
        add = col.single.append
        try:
            while col.n < limit:
                if self.maybe:
                    pos = self.fast(st, pos, col, limit)
                    if col.n >= limit:
                        break
                if end - pos < 16:
                    self.need = 16
                    return _NEED
                sec, frac, cap, wire = header.unpack_from(raw, pos)
                if frac >= frac_limit:
                    self.reject("corrupt_block", st, pos, f"record header with a fraction of a second {frac}")
                    return _DONE
                if cap > MAX_RECORD_BYTES:
                    return self._too_large(st, pos, cap)
                if end - pos < 16 + cap:
                    self.need = 16 + cap
                    return _NEED
                add((sec * 1_000_000_000 + frac * mult, lt, pos + 16, cap, wire, False))
                col.n += 1
                pos += 16 + cap
                self.remember(cap)
            return _FULL
        finally:
            st.pos = pos

    def _too_large(self, st: _Stream, pos: int, cap: int) -> int:
        """A record over the limit is skipped when a plausible header (or the end of the file) follows it;
        otherwise its length is garbage and, pcap having no marker to resynchronise on, reading stops."""
        after = st.base + pos + 16 + cap
        following = st.peek(after, 16)
        plausible = after == st.size
        if len(following) == 16:
            _, frac, cap2, _ = self.header.unpack(following)
            plausible = frac < self.frac_limit and cap2 <= MAX_RECORD_BYTES
        self.forget()
        if plausible:
            self.reject("record_too_large", st, pos, f"{cap} bytes captured (at most {MAX_RECORD_BYTES})")
            self.target = after
            return _SKIP
        self.reject(
            "bad_length", st, pos, f"impossible captured length {cap}; the rest of the file is unread"
        )
        return _DONE

    def at_eof(self, st: _Stream) -> bool:
        self.reject("truncated_file", st, st.pos, f"the file ends {st.end - st.pos} bytes into a record")
        return False


class _Interface:
    __slots__ = ("linktype", "ns_offset", "snaplen", "tsbase", "tsexp")

    def __init__(self, linktype: int, snaplen: int) -> None:
        self.linktype = linktype
        self.snaplen = snaplen
        self.tsbase = 10
        self.tsexp = 6  # default resolution: microseconds
        self.ns_offset = 0  # if_tsoffset, in ns

    def ns(self, units: int) -> int:
        ns = units * 1_000_000_000
        v = ns // 10**self.tsexp if self.tsbase == 10 else ns >> self.tsexp
        return _signed64(v + self.ns_offset)

    def ns_array(self, units: np.ndarray) -> np.ndarray:
        """`ns` on uint64 units (the same values, wrapping the same way)."""
        e = self.tsexp
        if self.tsbase == 10 and e <= 9:
            v = units * np.uint64(10 ** (9 - e))
        elif self.tsbase == 10 and e - 9 <= 19:
            v = units // np.uint64(10 ** (e - 9))
        elif self.tsbase == 2 and e <= 43:
            v = (units >> np.uint64(e)) * np.uint64(1_000_000_000)
            v += (
                ((units & np.uint64((1 << e) - 1)) * np.uint64(5**9))
                >> np.uint64(max(e - 9, 0))
                << np.uint64(max(9 - e, 0))
            )
        else:  # an odd resolution: exact, with Python integers
            return np.array([self.ns(int(u)) for u in units], np.int64)
        v += np.uint64(self.ns_offset & _U64)
        return v.view(np.int64)


class _PcapngScanner(_Scanner):
    """pcapng: blocks (type, total length, body, total length) in sections, each opened by a section header
    block that sets its byte order and is followed by the interface descriptions its packets refer to."""

    def __init__(self, reader: CaptureReader, vectorized: bool) -> None:
        super().__init__(reader, vectorized)
        self.ifaces: list[_Interface] = []
        self.resync = False
        self._order("<")

    def _order(self, endian: str) -> None:
        self.endian = endian
        self.u4 = np.dtype(endian + "u4")
        self.head = struct.Struct(endian + "II")
        self.epb = struct.Struct(endian + "IIIII")
        self.opb = struct.Struct(endian + "HHIIII")
        self.u32 = _U32_LE if endian == "<" else _U32_BE
        self.lt_table = np.zeros(0, np.int64)

    def stride(self, key: int) -> int:
        return key

    width = 7

    def check(self, arr: np.ndarray, base: int, run: _Run, heads: list[np.ndarray]) -> np.ndarray:
        m = len(heads[0])
        ok = np.ones(m, bool)
        nif = len(self.ifaces)
        for start, blen, h in zip(run.starts, run.pattern, heads, strict=True):
            tail = np.ndarray((m,), self.u4, arr, base + start + blen - 4, (run.period,))
            ok &= h[:, 0] == _EPB
            ok &= h[:, 1] == blen
            ok &= tail == blen
            ok &= h[:, 5] <= min(blen - 32, MAX_RECORD_BYTES)
            ok &= h[:, 2] < nif
        return ok

    def decode(self, base: int, run: _Run, heads: list[np.ndarray], n: int) -> tuple[np.ndarray, ...]:
        iface, units, off, cap, wire = [], [], [], [], []
        k = np.arange(n, dtype=np.int64) * run.period
        for start, h in zip(run.starts, heads, strict=True):
            iface.append(h[:, 2])
            units.append((h[:, 3].astype(np.uint64) << np.uint64(32)) | h[:, 4].astype(np.uint64))
            off.append(k + (base + start + 28))
            cap.append(h[:, 5])
            wire.append(h[:, 6])
        ifs = _interleave(iface, np.int64)
        u = _interleave(units, np.uint64)
        lo, hi = int(ifs.min()), int(ifs.max())
        if lo == hi:
            ts = self.ifaces[lo].ns_array(u)
        else:
            ts = np.empty(len(u), np.int64)
            for i in np.unique(ifs):
                sel = ifs == i
                ts[sel] = self.ifaces[int(i)].ns_array(u[sel])
        return (
            ts,
            self.lt_table[ifs],
            _interleave(off, np.int64),
            _interleave(cap, np.int64),
            _interleave(wire, np.int64),
        )

    def _corrupt(self, st: _Stream, pos: int, text: str) -> int:
        self.reject("corrupt_block", st, pos, text + "; the rest of the section is skipped")
        self.resync = True
        self.forget()
        return pos + 1

    @staticmethod
    def _find_section(raw: memoryview, pos: int, end: int) -> tuple[bool, int]:
        """(True, q): the next section header block (its magic and a byte-order magic) in raw[pos:end]
        starts at q; (False, q): none before q, and reading on from q needs more bytes."""
        piece = 1 << 16
        while pos < end:
            stop = min(end, pos + piece + 11)
            text = bytes(raw[pos:stop])
            q = text.find(_SHB_MAGIC)
            while q >= 0:
                if pos + q + 12 > end:
                    return False, pos + q
                if text[q + 8 : q + 12] in (_BOM_LE, _BOM_BE):
                    return True, pos + q
                q = text.find(_SHB_MAGIC, q + 1)
            if stop == end:
                break
            pos += piece
        return False, max(pos, end - 3)

    def scan(self, st: _Stream, col: _Collector, limit: int) -> int:
        raw, pos, end = st.raw, st.pos, st.end
        try:
            while col.n < limit:
                if self.resync:
                    found, pos = self._find_section(raw, pos, end)
                    if not found:
                        self.need = end - pos + 1
                        return _NEED
                    self.resync = False
                if self.maybe:
                    pos = self.fast(st, pos, col, limit)
                    if col.n >= limit:
                        break
                if end - pos < 12:
                    self.need = 12
                    return _NEED
                btype, blen = self.head.unpack_from(raw, pos)
                u32 = self.u32
                if btype == _SHB:
                    bom = bytes(raw[pos + 8 : pos + 12])
                    if bom not in (_BOM_LE, _BOM_BE):
                        pos = self._corrupt(st, pos, "section header without byte-order magic")
                        continue
                    u32 = _U32_LE if bom == _BOM_LE else _U32_BE
                    (blen,) = u32.unpack_from(raw, pos + 4)
                if blen < 12 or blen % 4:
                    pos = self._corrupt(st, pos, f"block type {btype:#x}: length {blen}")
                    continue
                if blen > _INLINE_BLOCK:
                    status = self._large(st, pos, btype, blen)
                    if status is None:
                        pos = self._corrupt(st, pos, f"block type {btype:#x}: length {blen}")
                        continue
                    return status
                if end - pos < blen:
                    self.need = blen
                    return _NEED
                if u32.unpack_from(raw, pos + blen - 4)[0] != blen:
                    pos = self._corrupt(st, pos, f"block type {btype:#x}: lengths at its two ends disagree")
                    continue
                if btype == _EPB:
                    if blen < 32:
                        pos = self._corrupt(st, pos, f"packet block of {blen} bytes")
                        continue
                    iface, hi, lo, cap, wire = self.epb.unpack_from(raw, pos + 8)
                    if self._packet(st, col, pos, iface, cap, blen - 32, wire, pos + 28, (hi << 32) | lo):
                        self.remember(blen)
                    else:
                        self.forget()
                elif btype == _SPB:
                    self.forget()
                    if blen < 16:
                        pos = self._corrupt(st, pos, f"simple packet block of {blen} bytes")
                        continue
                    (wire,) = self.u32.unpack_from(raw, pos + 8)
                    cap = min(wire, blen - 16)
                    if self.ifaces and self.ifaces[0].snaplen:
                        cap = min(cap, self.ifaces[0].snaplen)
                    self._packet(st, col, pos, 0, cap, blen - 16, wire, pos + 12, None)
                elif btype == _OPB:
                    self.forget()
                    if blen < 32:
                        pos = self._corrupt(st, pos, f"packet block of {blen} bytes")
                        continue
                    iface, _, hi, lo, cap, wire = self.opb.unpack_from(raw, pos + 8)
                    self._packet(st, col, pos, iface, cap, blen - 32, wire, pos + 28, (hi << 32) | lo)
                else:
                    self.forget()
                    if btype == _SHB:
                        if blen < 28:
                            pos = self._corrupt(st, pos, f"section header of {blen} bytes")
                            continue
                        self._order("<" if u32 is _U32_LE else ">")
                        self.ifaces = []
                        self.reader.counts["sections"] += 1
                    elif btype == _IDB:
                        if blen < 20:
                            pos = self._corrupt(st, pos, f"interface block of {blen} bytes")
                            continue
                        self._interface(raw, pos, blen)
                    else:
                        self.reader.counts["other_blocks"] += 1
                pos += blen
            return _FULL
        finally:
            st.pos = pos

    def _packet(
        self,
        st: _Stream,
        col: _Collector,
        pos: int,
        iface: int,
        cap: int,
        room: int,
        wire: int,
        data: int,
        units: int | None,
    ) -> bool:
        if iface >= len(self.ifaces):
            self.reject("unknown_interface", st, pos, f"interface {iface} of {len(self.ifaces)} described")
            return False
        if cap > room:
            self.reject("bad_length", st, pos, f"{cap} bytes captured in a block with room for {room}")
            return False
        if cap > MAX_RECORD_BYTES:
            self.reject("record_too_large", st, pos, f"{cap} bytes captured (at most {MAX_RECORD_BYTES})")
            return False
        i = self.ifaces[iface]
        if units is None:
            col.add(0, i.linktype, data, cap, wire, True)
        else:
            col.add(i.ns(units), i.linktype, data, cap, wire)
        return True

    def _interface(self, raw: memoryview, pos: int, blen: int) -> None:
        e = self.endian
        linktype, _, snaplen = struct.unpack_from(e + "HHI", raw, pos + 8)
        i = _Interface(linktype, snaplen)
        p, stop = pos + 16, pos + blen - 4
        while p + 4 <= stop:
            code, olen = struct.unpack_from(e + "HH", raw, p)
            if code == 0 or p + 4 + olen > stop:
                break
            if code == 9 and olen >= 1:  # if_tsresol
                v = raw[p + 4]
                i.tsbase, i.tsexp = (2, v & 0x7F) if v & 0x80 else (10, v)
            elif code == 14 and olen == 8:  # if_tsoffset, seconds
                i.ns_offset = struct.unpack_from(e + "q", raw, p + 4)[0] * 1_000_000_000
            p += 4 + olen + (-olen % 4)
        self.ifaces.append(i)
        self.lt_table = np.array([x.linktype for x in self.ifaces], np.int64)
        self.reader.counts["interfaces"] += 1
        if linktype not in self.reader.linktypes:
            self.reader.linktypes.append(linktype)

    def _large(self, st: _Stream, pos: int, btype: int, blen: int) -> int | None:
        """A block longer than any record: checked at its far end without reading it, then skipped."""
        tail = st.peek(st.base + pos + blen - 4, 4)
        if len(tail) < 4 or struct.unpack(self.endian + "I", tail)[0] != blen or btype == _SHB:
            return None
        self.forget()
        if btype in (_EPB, _SPB, _OPB):
            self.reject("record_too_large", st, pos, f"packet block of {blen} bytes")
        elif btype == _IDB:  # keep the interface numbering; its packets are counted as unknown link type
            self.ifaces.append(_Interface(-1, 0))
            self.lt_table = np.array([x.linktype for x in self.ifaces], np.int64)
        else:
            self.reader.counts["other_blocks"] += 1
        self.target = st.base + pos + blen
        return _SKIP

    def at_eof(self, st: _Stream) -> bool:
        if self.resync:
            return False
        found, q = self._find_section(st.raw, st.pos + 4, st.end)
        if found:  # the block's length ran past the end, and yet another section follows: corrupt
            self.reject("corrupt_block", st, st.pos, "block length past the end of the file")
            st.pos = q
            return True
        self.reject("truncated_file", st, st.pos, f"the file ends {st.end - st.pos} bytes into a block")
        return False


class CaptureReader:
    """A pcap or pcapng file as `RecordBatch` chunks (see the module docstring).

    Opening checks the format: a file that is not a capture raises `CaptureError` here. `batches()` reads
    the file once; afterwards `rejections` (reason -> count) and `counts` (records, fast_records,
    time_borrowed, sections, interfaces, other_blocks) say what happened. `format` is "pcap" or "pcapng",
    `linktypes` the link types the file declares (in order of first appearance).
    `vectorized=False` turns the fast path off (tests compare both).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        chunk_records: int = 65536,
        chunk_bytes: int = CHUNK_BYTES,
        vectorized: bool = True,
    ) -> None:
        if chunk_records < 1 or chunk_bytes < 1:
            raise ValueError("chunk_records and chunk_bytes must be positive")
        self.path = Path(path)
        self.chunk_records = chunk_records
        self.rejections: Rejections = Rejections()
        self.counts: Counter[str] = Counter()
        self.linktypes: list[int] = []
        self.format = ""
        self._last_ts: int | None = None
        self._used = False
        try:
            self._f: io.BufferedReader = open(self.path, "rb")  # noqa: SIM115 (closed by batches() or close())
        except OSError as e:
            raise CaptureError(f"{self.path}: cannot be opened: {e.strerror or e}") from e
        try:
            head = self._f.read(24)
            self._scanner, start = self._detect(head, vectorized)
            self._stream = _Stream(self._f, chunk_bytes, start)
        except BaseException:
            self._f.close()
            raise

    def _detect(self, head: bytes, vectorized: bool) -> tuple[_Scanner, int]:
        magic = head[:4]
        if magic in _PCAP_MAGICS:
            endian, nano = _PCAP_MAGICS[magic]
            if len(head) < 24:
                raise CaptureError(
                    f"{self.path}: a pcap file cut off inside its file header ({len(head)} bytes)"
                )
            major, _minor, _zone, _sigfigs, _snaplen, network = struct.unpack(endian + "HHiIII", head[4:24])
            if major != 2:
                raise CaptureError(f"{self.path}: pcap version {major} (only version 2 exists)")
            linktype = network & 0xFFFF  # the upper bits carry FCS information
            self.format = "pcap"
            self.linktypes.append(linktype)
            return _PcapScanner(self, vectorized, endian, nano, linktype), 24
        if magic == _SHB_MAGIC:
            if head[8:12] not in (_BOM_LE, _BOM_BE):
                raise CaptureError(f"{self.path}: a pcapng section header without its byte-order magic")
            self.format = "pcapng"
            return _PcapngScanner(self, vectorized), 0
        what = "an empty file" if not head else f"it starts with {head[:8].hex(' ')}"
        for sig, name in _COMPRESSED.items():
            if head.startswith(sig):
                what = f"it is {name}-compressed: decompress it first"
        raise CaptureError(f"{self.path}: not a pcap or pcapng capture ({what})")

    def batches(self) -> Iterator[RecordBatch]:
        """The file's records in batches of at most `chunk_records`, in file order (read once)."""
        if self._used:
            raise RuntimeError("CaptureReader.batches() reads the file once")
        self._used = True
        st, scanner, col = self._stream, self._scanner, _Collector()
        try:
            while True:
                status = scanner.scan(st, col, self.chunk_records)
                if col.n:
                    batch = self._batch(col, st.arr)
                    if len(batch):
                        yield batch
                if status == _FULL:
                    continue
                if status == _DONE:
                    break
                if status == _SKIP:
                    st.skip_to(scanner.target)
                    continue
                if not st.fill(scanner.need):
                    if st.end > st.pos and scanner.at_eof(st):
                        continue
                    break
        finally:
            self.close()

    def _batch(self, col: _Collector, buf: np.ndarray) -> RecordBatch:
        self.counts["fast_records"] += col.fast
        col.fast = 0
        ts, lt, off, cap, wire, borrowed = col.take()
        if borrowed.any():
            idx = np.where(borrowed, -1, np.arange(len(ts)))
            np.maximum.accumulate(idx, out=idx)
            earlier = idx >= 0
            ts = np.where(earlier, ts[np.maximum(idx, 0)], self._last_ts or 0)
            orphan = ~earlier if self._last_ts is None else np.zeros(len(ts), bool)
            self.counts["time_borrowed"] += int(borrowed.sum() - orphan.sum())
            if orphan.any():
                self._reject_n(
                    "no_timestamp", int(orphan.sum()), "simple packet blocks before any timed record"
                )
                keep = ~orphan
                ts, lt, off, cap, wire = ts[keep], lt[keep], off[keep], cap[keep], wire[keep]
        if len(ts):
            self._last_ts = int(ts[-1])
        passed = (lt == LINKTYPE_ETHERNET) | (lt == LINKTYPE_LINUX_SLL) | (lt == LINKTYPE_LINUX_SLL2)
        if not passed.all():
            for value in np.unique(lt[~passed]):
                n = int((lt[~passed] == value).sum())
                self._reject_n("unknown_linktype", n, f"records of link type {value}")
            ts, lt, off, cap, wire = ts[passed], lt[passed], off[passed], cap[passed], wire[passed]
        self.counts["records"] += len(ts)
        return RecordBatch(
            ts_ns=ts.astype(np.int64, copy=False),
            linktype=lt.astype(np.int32),
            offsets=off.astype(np.int64, copy=False),
            lengths=cap.astype(np.int32),
            wire_lengths=np.minimum(wire, 2**31 - 1).astype(np.int32),
            buf=buf,
        )

    def _reject_n(self, reason: str, n: int, text: str) -> None:
        self.rejections[reason] += n - 1
        self.rejections.add(reason, f"{self.path}: {n} {text}", log)

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> CaptureReader:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def read_records(path: str | os.PathLike[str], *, chunk_records: int = 65536) -> Iterator[RecordBatch]:
    """The records of a pcap/pcapng file in batches (`CaptureReader` for the rejection counts). Raises
    `CaptureError` at once when the file is not a capture."""
    return CaptureReader(path, chunk_records=chunk_records).batches()


# --------------------------------------------------------------------------------------------- writing

Frames: TypeAlias = Sequence[bytes] | np.ndarray


def _frames(frames: Frames) -> tuple[np.ndarray | None, list[bytes]]:
    """Equal-length frames as a 2-D uint8 array (the vectorized path), else the list of frames."""
    if isinstance(frames, np.ndarray):
        if frames.ndim != 2 or frames.dtype != np.uint8:
            raise ValueError("frames as an array must be 2-D uint8 (one frame per row)")
        return np.ascontiguousarray(frames), []
    items = [bytes(f) for f in frames]
    if items and len({len(f) for f in items}) == 1:
        return np.frombuffer(b"".join(items), np.uint8).reshape(len(items), len(items[0])), []
    return None, items


def _pack(headers: np.ndarray, items: list[bytes], align: int, trailer: np.ndarray | None) -> np.ndarray:
    """Records of different lengths: header bytes, the frame, zero padding to `align`, trailer bytes."""
    n, h = headers.shape
    t = 0 if trailer is None else trailer.shape[1]
    lengths = np.fromiter((len(f) for f in items), np.int64, n)
    padded = lengths + (-lengths % align)
    sizes = h + padded + t
    starts = np.zeros(n, np.int64)
    np.cumsum(sizes[:-1], out=starts[1:])
    out = np.zeros(int(sizes.sum()), np.uint8)
    out[(starts[:, None] + np.arange(h)).ravel()] = headers.ravel()
    data = np.frombuffer(b"".join(items), np.uint8)
    data_starts = np.zeros(n, np.int64)
    np.cumsum(lengths[:-1], out=data_starts[1:])
    out[np.repeat(starts + h - data_starts, lengths) + np.arange(len(data))] = data
    if trailer is not None:
        out[((starts + h + padded)[:, None] + np.arange(t)).ravel()] = trailer.ravel()
    return out


class CaptureWriter:
    """Writes records to a pcap or pcapng file (one Ethernet-like interface), numpy-fast; `write` may be
    called many times (a long capture need not be held in memory at once)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        format: str = "pcapng",
        linktype: int = LINKTYPE_ETHERNET,
        nanosecond: bool = True,
        snaplen: int = MAX_RECORD_BYTES,
    ) -> None:
        if format not in ("pcap", "pcapng"):
            raise ValueError(f"format must be pcap or pcapng, not {format!r}")
        self.format = format
        self.nanosecond = nanosecond
        self._f = open(path, "wb")  # noqa: SIM115 (closed by close())
        if format == "pcap":
            magic = 0xA1B23C4D if nanosecond else 0xA1B2C3D4
            self._f.write(struct.pack("<IHHiIII", magic, 2, 4, 0, 0, snaplen, linktype))
        else:
            self._f.write(struct.pack("<IIIHHqI", _SHB, 28, 0x1A2B3C4D, 1, 0, -1, 28))
            options = struct.pack("<HHBxxxHH", 9, 1, 9, 0, 0) if nanosecond else b""
            blen = 20 + len(options)
            self._f.write(
                struct.pack("<IIHHI", _IDB, blen, linktype, 0, snaplen) + options + struct.pack("<I", blen)
            )

    def write(
        self, ts_ns: Sequence[int] | np.ndarray, frames: Frames, wire_lengths: np.ndarray | None = None
    ) -> None:
        ts = np.asarray(ts_ns, dtype=np.int64)
        arr, items = _frames(frames)
        n = len(arr) if arr is not None else len(items)
        if ts.shape != (n,):
            raise ValueError(f"{ts.shape[0] if ts.ndim else 0} timestamps for {n} frames")
        if n and ts.min() < 0:
            raise ValueError("timestamps before 1970 cannot be written")
        step = 65536
        for i in range(0, n, step):
            wire = None if wire_lengths is None else np.asarray(wire_lengths[i : i + step], np.int64)
            if arr is not None:
                self._write_equal(ts[i : i + step], arr[i : i + step], wire)
            else:
                self._write_list(ts[i : i + step], items[i : i + step], wire)

    def _fields(self, ts: np.ndarray, caps: np.ndarray, wire: np.ndarray | None) -> np.ndarray:
        wire = caps if wire is None else wire
        if self.format == "pcap":
            frac = ts % 1_000_000_000
            if not self.nanosecond:
                frac //= 1000
            cols = [ts // 1_000_000_000, frac, caps, wire]
        else:
            units = ts if self.nanosecond else ts // 1000
            blen = 32 + caps + (-caps % 4)
            cols = [
                np.full(len(ts), _EPB),
                blen,
                np.zeros(len(ts)),
                units >> 32,
                units & 0xFFFFFFFF,
                caps,
                wire,
            ]
        return np.stack([np.asarray(c, np.int64) for c in cols], axis=1).astype("<u4")

    def _write_equal(self, ts: np.ndarray, arr: np.ndarray, wire: np.ndarray | None) -> None:
        n, length = arr.shape
        fields = self._fields(ts, np.full(n, length, np.int64), wire)
        h = fields.shape[1] * 4
        if self.format == "pcap":
            rec = np.empty((n, h + length), np.uint8)
        else:
            padded = length + (-length % 4)
            rec = np.zeros((n, h + padded + 4), np.uint8)
            rec[:, h + padded :] = np.full((n, 1), 32 + padded, "<u4").view(np.uint8)
        rec[:, :h] = fields.view(np.uint8).reshape(n, h)
        rec[:, h : h + length] = arr
        self._f.write(rec.data)

    def _write_list(self, ts: np.ndarray, items: list[bytes], wire: np.ndarray | None) -> None:
        caps = np.fromiter((len(f) for f in items), np.int64, len(items))
        fields = self._fields(ts, caps, wire)
        headers = fields.view(np.uint8).reshape(len(items), -1)
        if self.format == "pcap":
            out = _pack(headers, items, 1, None)
        else:
            out = _pack(headers, items, 4, fields[:, 1:2].copy().view(np.uint8))
        self._f.write(out.data)

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> CaptureWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def write_pcap(
    path: str | os.PathLike[str],
    ts_ns: Sequence[int] | np.ndarray,
    frames: Frames,
    linktype: int = LINKTYPE_ETHERNET,
    nanosecond: bool = True,
) -> None:
    """A classic pcap file (little-endian; nanosecond or microsecond timestamps) of `frames` (a list of
    bytes, or a 2-D uint8 array of equal-length frames) taken at `ts_ns` (int ns since the epoch)."""
    with CaptureWriter(path, format="pcap", linktype=linktype, nanosecond=nanosecond) as w:
        w.write(ts_ns, frames)


def write_pcapng(
    path: str | os.PathLike[str],
    ts_ns: Sequence[int] | np.ndarray,
    frames: Frames,
    linktype: int = LINKTYPE_ETHERNET,
    tsresol_ns: bool = True,
) -> None:
    """A pcapng file (one section, one interface of `linktype`, enhanced packet blocks; the interface's
    if_tsresol 10^-9 when `tsresol_ns`, else the default microseconds)."""
    with CaptureWriter(path, format="pcapng", linktype=linktype, nanosecond=tsresol_ns) as w:
        w.write(ts_ns, frames)
