"""Capture files (pcap, pcapng) read as tshark, Wireshark and scapy write them, and our own writer's files
read by scapy: exact bytes and capture times, every link type a bus capture has, bad files counted."""

from __future__ import annotations

import gzip
import random
import struct
from pathlib import Path

import numpy as np
import pytest
from scapy.contrib.ethercat import EtherCat, EtherCatLRW
from scapy.layers.l2 import CookedLinux, CookedLinuxV2, Ether
from scapy.packet import Raw
from scapy.utils import EDecimal, rdpcap, wrpcap, wrpcapng

from ingest.errors import IngestError
from ingest.ethercat.pcap import (
    MAX_RECORD_BYTES,
    CaptureError,
    CaptureReader,
    read_records,
    write_pcap,
    write_pcapng,
)
from ingest.ethercat.types import RecordBatch

T0 = 1_700_000_000_000_000_000  # ns: 2023-11-14
Rec = tuple[int, int, bytes, int]  # time ns, link type, captured bytes, length on the wire


def records(batches: list[RecordBatch]) -> list[Rec]:
    out = []
    for b in batches:
        assert b.ts_ns.dtype == np.int64
        assert b.linktype.dtype == np.int32
        assert b.lengths.dtype == np.int32
        assert b.wire_lengths.dtype == np.int32
        assert b.offsets.dtype == np.int64
        for i in range(len(b)):
            out.append((int(b.ts_ns[i]), int(b.linktype[i]), b.record(i), int(b.wire_lengths[i])))
    return out


def read(path: Path, **kw: object) -> tuple[list[Rec], CaptureReader]:
    reader = CaptureReader(path, **kw)  # type: ignore[arg-type]
    return records(list(reader.batches())), reader


def ecat_frame(i: int, size: int) -> Ether:
    """An EtherCAT LRW frame (scapy's layers) carrying `size` bytes of process data."""
    data = [(i * 7 + k) % 256 for k in range(size)]
    return (
        Ether(src="02:00:00:00:00:01", dst="ff:ff:ff:ff:ff:ff")
        / EtherCat()
        / EtherCatLRW(adr=0x1000, data=data)
    )


def frames(n: int, seed: int = 0, lengths: tuple[int, int] = (60, 200)) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, int(k), dtype=np.uint8).tobytes() for k in rng.integers(*lengths, n)]


def mixed(seed: int = 0) -> tuple[np.ndarray, list[bytes]]:
    """A bus stream as it looks: a long fixed-size stretch, a stretch of two frames per cycle, irregular
    records (mailbox traffic, a re-sent frame), then fixed again."""
    rng = np.random.default_rng(seed)
    fixed = [rng.integers(0, 256, 78, dtype=np.uint8).tobytes() for _ in range(3000)]
    pair = [rng.integers(0, 256, 64 if i % 2 else 130, dtype=np.uint8).tobytes() for i in range(2000)]
    out = (
        fixed[:1500]
        + frames(300, seed + 1)
        + pair
        + frames(7, seed + 2)
        + fixed[1500:]
        + frames(50, seed + 3)
    )
    ts = T0 + np.cumsum(rng.integers(200_000, 300_000, len(out))).astype(np.int64)
    return ts, out


# --- hand-made pcapng blocks (the format spec, independent of the module's writer) ---------------------


def block(e: str, btype: int, body: bytes) -> bytes:
    body += b"\0" * (-len(body) % 4)
    return struct.pack(e + "II", btype, 12 + len(body)) + body + struct.pack(e + "I", 12 + len(body))


def option(e: str, code: int, value: bytes) -> bytes:
    return struct.pack(e + "HH", code, len(value)) + value + b"\0" * (-len(value) % 4)


def shb(e: str) -> bytes:
    return block(e, 0x0A0D0D0A, struct.pack(e + "IHHq", 0x1A2B3C4D, 1, 0, -1))


def idb(
    e: str, linktype: int, tsresol: int | None = None, tsoffset: int | None = None, snaplen: int = 0
) -> bytes:
    opts = b""
    if tsresol is not None:
        opts += option(e, 9, bytes([tsresol]))
    if tsoffset is not None:
        opts += option(e, 14, struct.pack(e + "q", tsoffset))
    if opts:
        opts += option(e, 2, b"eth1") + struct.pack(e + "HH", 0, 0)
    return block(e, 1, struct.pack(e + "HHI", linktype, 0, 0) + opts)


def epb(e: str, iface: int, units: int, data: bytes, wire: int | None = None) -> bytes:
    head = struct.pack(e + "IIIII", iface, units >> 32, units & 0xFFFFFFFF, len(data), wire or len(data))
    return block(e, 6, head + data + b"\0" * (-len(data) % 4) + option(e, 1, b"comment") + b"\0\0\0\0")


def opb(e: str, iface: int, units: int, data: bytes) -> bytes:
    head = struct.pack(e + "HHIIII", iface, 0, units >> 32, units & 0xFFFFFFFF, len(data), len(data))
    return block(e, 2, head + data)


def spb(e: str, data: bytes) -> bytes:
    return block(e, 3, struct.pack(e + "I", len(data)) + data)


def ns(units: int, tsresol: int, offset_s: int = 0) -> int:
    """pcapng timestamp units -> ns (if_tsresol: 10^-v, or 2^-(v & 0x7f) when the top bit is set)."""
    scale = 2 ** (tsresol & 0x7F) if tsresol & 0x80 else 10**tsresol
    return units * 10**9 // scale + offset_s * 10**9


# --- reading what scapy writes --------------------------------------------------------------------------


@pytest.mark.parametrize("nano", [True, False])
def test_scapy_pcap_read_back_exactly(tmp_path: Path, nano: bool) -> None:
    """A pcap file (microsecond or nanosecond) reads back with each frame's exact bytes, capture time and
    length on the wire; the fixed-size stream takes the vectorized path."""
    pkts, expected = [], []
    for i in range(400):
        p = ecat_frame(i, 20 if i < 300 else 4 + i % 37)
        frac = (i * 123_456_789) % 999_000_000 if nano else (i * 123_457) % 999_000 * 1000
        p.time = EDecimal(1_700_000_000 + i) + EDecimal(frac) / EDecimal(10**9)
        pkts.append(p)
        expected.append(((1_700_000_000 + i) * 10**9 + frac, 1, bytes(p), len(bytes(p))))
    path = tmp_path / "scapy.pcap"
    wrpcap(str(path), pkts, nano=nano)

    got, reader = read(path)
    assert got == expected
    assert reader.format == "pcap"
    assert reader.linktypes == [1]
    assert not reader.rejections
    assert reader.counts["fast_records"] >= 280
    # scapy's own reader agrees
    back = rdpcap(str(path))
    assert [(int(p.time * 10**9), bytes(p)) for p in back] == [(t, b) for t, _, b, _ in got]


def test_scapy_pcapng_read_back_exactly(tmp_path: Path) -> None:
    """A pcapng file as scapy writes it (one interface, microseconds) reads back as scapy reads it."""
    pkts = []
    for i in range(300):
        p = ecat_frame(i, 32 if i % 3 else 8)
        p.time = EDecimal(1_700_000_000 + i // 10) + EDecimal(i % 10) / EDecimal(10)
        pkts.append(p)
    path = tmp_path / "scapy.pcapng"
    wrpcapng(str(path), pkts)

    got, reader = read(path)
    ref = rdpcap(str(path))
    assert len(ref) == 300
    assert got == [(int(p.time * 10**9), 1, bytes(p), p.wirelen or len(bytes(p))) for p in ref]
    assert [b for _, _, b, _ in got] == [bytes(p) for p in pkts]
    assert reader.format == "pcapng"
    assert reader.counts["sections"] == 1
    assert not reader.rejections
    assert reader.counts["fast_records"] > 250  # a pattern of three frames repeating


@pytest.mark.parametrize(("cls", "linktype"), [(CookedLinux, 113), (CookedLinuxV2, 276)])
def test_linux_cooked_capture_records_pass_through(tmp_path: Path, cls: type, linktype: int) -> None:
    """`tcpdump -i any` writes Linux cooked captures (SLL, SLL2): their records come through with their
    link type for the frame decoder to unwrap."""
    pkts = []
    for i in range(50):
        inner = bytes(ecat_frame(i, 10))[14:]
        p = cls(proto=0x88A4) / Raw(inner)
        p.time = EDecimal(1_700_000_000) + EDecimal(i) / EDecimal(1000)
        pkts.append(p)
    path = tmp_path / "any.pcap"
    wrpcap(str(path), pkts)

    got, reader = read(path)
    assert reader.linktypes == [linktype]
    assert got == [(T0 + i * 1_000_000, linktype, bytes(p), len(bytes(p))) for i, p in enumerate(pkts)]


# --- what our writer writes, read by scapy ---------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["pcap", "pcapng"])
@pytest.mark.parametrize("nano", [True, False])
@pytest.mark.parametrize("shape", ["array", "list"])
def test_our_files_read_by_scapy(tmp_path: Path, fmt: str, nano: bool, shape: str) -> None:
    """The writer's files (the synthetic captures, the benchmarks) are read by scapy as written, and by
    our reader back to the same frames."""
    rng = np.random.default_rng(3)
    ts = T0 + np.cumsum(rng.integers(1, 2_000_000, 500)).astype(np.int64)
    if shape == "array":
        data: np.ndarray | list[bytes] = rng.integers(0, 256, (500, 61), dtype=np.uint8)
        raw = [bytes(r) for r in data]
    else:
        raw = frames(500, seed=4)
        data = raw
    path = tmp_path / f"ours.{fmt}"
    (write_pcap if fmt == "pcap" else write_pcapng)(path, ts, data, 1, nano)
    want_ts = ts if nano else ts // 1000 * 1000

    ref = rdpcap(str(path))
    assert [bytes(p) for p in ref] == raw
    assert [int(p.time * 10**9) for p in ref] == want_ts.tolist()
    assert [p.wirelen for p in ref] == [len(r) for r in raw]
    got, reader = read(path)
    assert got == [(int(t), 1, r, len(r)) for t, r in zip(want_ts, raw, strict=True)]
    assert not reader.rejections


# --- byte orders, sections, interfaces ---------------------------------------------------------------


@pytest.mark.parametrize("nano", [True, False])
def test_big_endian_pcap(tmp_path: Path, nano: bool) -> None:
    """A pcap written on a big-endian machine (magic a1b2c3d4 / a1b23c4d as bytes) reads the same."""
    magic = 0xA1B23C4D if nano else 0xA1B2C3D4
    data = frames(40, seed=5, lengths=(60, 62))
    out = struct.pack(">IHHiIII", magic, 2, 4, 0, 0, 65535, 1)
    expected = []
    for i, d in enumerate(data):
        frac = (i * 999_983 % 1_000_000) * (1000 if nano else 1)
        out += struct.pack(">IIII", 1_700_000_000 + i, frac, len(d), len(d) + 4) + d
        expected.append(((1_700_000_000 + i) * 10**9 + frac * (1 if nano else 1000), 1, d, len(d) + 4))
    path = tmp_path / "be.pcap"
    path.write_bytes(out)
    got, reader = read(path)
    assert got == expected
    assert not reader.rejections
    # wire lengths longer than captured: records cut by the snap length
    assert all(w > len(b) for _, _, b, w in got)


def test_pcapng_sections_interfaces_and_block_types(tmp_path: Path) -> None:
    """dumpcap on two interfaces, files joined by mergecap/cat: several sections of either byte order,
    interfaces with their own link type, time resolution (powers of 10 and of 2) and offset; enhanced,
    simple and obsolete packet blocks; other blocks skipped; a link type no bus capture has is counted."""
    a, b, c, d, e_ = (bytes([k]) * n for k, n in ((1, 60), (2, 61), (3, 62), (4, 63), (5, 64)))
    le, be = "<", ">"
    t_us = 1_700_000_000_123_456
    t_bin = (1_700_000_000 << 20) + 777_777  # 2^-20 s units
    t_ns = T0 + 987_654_321
    content = (
        shb(le)
        + idb(le, 1)  # Ethernet, default microseconds
        + idb(le, 276, tsresol=0x80 | 20, tsoffset=-100)  # SLL2, 2^-20 s, offset -100 s
        + block(le, 4, b"\x00" * 8)  # name resolution block: skipped
        + epb(le, 0, t_us, a)
        + epb(le, 1, t_bin, b)
        + opb(le, 1, t_bin + 1, c)
        + block(le, 5, struct.pack("<III", 0, 0, 0))  # interface statistics: skipped
        + shb(be)
        + idb(be, 113, tsresol=9)  # SLL, ns
        + idb(be, 147, tsresol=9)  # a user link type: counted, skipped
        + epb(be, 0, t_ns, d)
        + epb(be, 1, t_ns + 1, e_)
        + spb(be, e_)  # iface 0, no time: the time of the record before
        + block(be, 0x40000BAD, b"\x00\x00\x00\x01custom")  # custom block: skipped
    )
    path = tmp_path / "two.pcapng"
    path.write_bytes(content)

    got, reader = read(path)
    assert got == [
        (t_us * 1000, 1, a, 60),
        (ns(t_bin, 0x80 | 20, -100), 276, b, 61),
        (ns(t_bin + 1, 0x80 | 20, -100), 276, c, 62),
        (t_ns, 113, d, 63),
        (t_ns + 1, 113, e_, 64),  # the SPB: iface 0 (SLL), the previous record's time (of the skipped one)
    ]
    assert reader.linktypes == [1, 276, 113, 147]
    assert reader.counts["sections"] == 2
    assert reader.counts["interfaces"] == 4
    assert reader.counts["other_blocks"] == 3
    assert reader.counts["time_borrowed"] == 1
    assert dict(reader.rejections) == {"unknown_linktype": 1}


def test_pcapng_time_resolutions_fast_and_slow(tmp_path: Path) -> None:
    """Every if_tsresol a capture tool writes (ms to ps, 2^-10 to 2^-50; the fine ones with an
    if_tsoffset, since 64-bit units cannot count from 1970) gives exact ns on both paths, also for
    interfaces interleaved record by record (a TAP captured on two ports)."""
    resolutions = [3, 6, 9, 12, 0x80 | 10, 0x80 | 30, 0x80 | 50]
    scales = [2 ** (r & 0x7F) if r & 0x80 else 10**r for r in resolutions]
    offsets = [1_700_000_000 if scale * 2 * 10**9 > 2**64 else 0 for scale in scales]
    content = shb("<") + b"".join(
        idb("<", 1, r, tsoffset=off or None) for r, off in zip(resolutions, offsets, strict=True)
    )
    expected = []
    rnd = random.Random(6)
    for k in range(len(resolutions)):
        for i in range(60):  # this interface and the next alternating, two lengths: period 2
            for j in (k, (k + 1) % len(resolutions)):
                seconds = (1_700_000_000 - offsets[j]) + i
                units = seconds * scales[j] + rnd.randrange(scales[j])
                data = bytes([j]) * (60 + 4 * (j == k))
                content += epb("<", j, units, data)
                expected.append((ns(units, resolutions[j], offsets[j]), 1, data, len(data)))
    path = tmp_path / "res.pcapng"
    path.write_bytes(content)
    fast, reader = read(path)
    slow, _ = read(path, vectorized=False)
    assert fast == slow == expected
    assert reader.counts["fast_records"] > 700


# --- bad files ------------------------------------------------------------------------------------------


def test_not_a_capture_raises_naming_the_file(tmp_path: Path) -> None:
    """Handing the reader something that is no capture fails at once with the file and the reason."""
    cases = {
        "garbage.pcap": bytes(range(256)) * 4,
        "empty.pcap": b"",
        "text.pcap": b"time,value\n1,2\n",
        "header.pcap": struct.pack("<I", 0xA1B2C3D4) + b"\x02\x00",
        "shb.pcapng": b"\x0a\x0d\x0d\x0a\x1c\x00\x00\x00garbage!",
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
    gz = tmp_path / "bus.pcap.gz"
    write_pcap(tmp_path / "bus.pcap", [T0], [b"x" * 60])
    gz.write_bytes(gzip.compress((tmp_path / "bus.pcap").read_bytes()))
    for name in [*cases, "bus.pcap.gz", "missing.pcap"]:
        with pytest.raises(CaptureError, match=name.replace(".", r"\.")) as info:
            read_records(tmp_path / name)
        assert isinstance(info.value, IngestError)
    with pytest.raises(CaptureError, match="gzip"):
        CaptureReader(gz)


@pytest.mark.parametrize("fmt", ["pcap", "pcapng"])
@pytest.mark.parametrize("cut", [1, 10, 30])
def test_truncated_file(tmp_path: Path, fmt: str, cut: int) -> None:
    """A capture cut off mid-record (dumpcap killed, a copy in progress) gives every whole record and
    counts the cut one."""
    ts = T0 + np.arange(200, dtype=np.int64) * 1000
    data = np.full((200, 80), 7, np.uint8)
    path = tmp_path / f"cut.{fmt}"
    (write_pcap if fmt == "pcap" else write_pcapng)(path, ts, data)
    path.write_bytes(path.read_bytes()[:-cut])
    got, reader = read(path)
    assert len(got) == 199
    assert got[-1][0] == ts[198]
    assert dict(reader.rejections) == {"truncated_file": 1}


def test_corrupt_pcapng_block_skips_to_next_section(tmp_path: Path) -> None:
    """A damaged block ends its section (counted); reading resumes at the next section header."""
    ts = T0 + np.arange(100, dtype=np.int64) * 1000
    one, two = tmp_path / "1.pcapng", tmp_path / "2.pcapng"
    write_pcapng(one, ts, np.full((100, 64), 1, np.uint8))
    write_pcapng(two, ts + 10**9, frames(100, seed=7))
    first, second = bytearray(one.read_bytes()), two.read_bytes()
    header = 28 + 32  # SHB + IDB
    epb_len = 32 + 64
    got_two, _ = read(two)
    for where, value in [
        (header + 40 * epb_len + 4, 100),  # leading length disagrees with the trailing one
        (header + 40 * epb_len + epb_len - 4, 0),  # trailing length
        (header + 40 * epb_len + 4, 0x7FFF_FFF0),  # points far past the end of the file
        (header + 40 * epb_len + 4, 97),  # not a multiple of 4
        (header + 40 * epb_len + 4, 16),  # too short for a packet block
    ]:
        damaged = bytearray(first)
        damaged[where : where + 4] = struct.pack("<I", value)
        path = tmp_path / "damaged.pcapng"
        path.write_bytes(bytes(damaged) + second)
        for vectorized in (True, False):
            got, reader = read(path, vectorized=vectorized)
            assert len(got) == 140, value
            assert got[:40] == [(int(t), 1, b"\x01" * 64, 64) for t in ts[:40]]
            assert got[40:] == got_two
            assert dict(reader.rejections) == {"corrupt_block": 1}, value
            assert reader.counts["sections"] == 2


def test_pcap_impossible_header_stops_reading(tmp_path: Path) -> None:
    """pcap has no marker to resynchronise on: a record header that cannot be right (a garbage captured
    length, a fraction of a second over one second) ends the file, counted; the records before it stay."""
    ts = T0 + np.arange(100, dtype=np.int64) * 1000
    path = tmp_path / "x.pcap"
    write_pcap(path, ts, np.full((100, 60), 3, np.uint8))
    good = path.read_bytes()
    for field, value, reason in [(8, 0xFFFF_FFF0, "bad_length"), (4, 2_000_000_000, "corrupt_block")]:
        damaged = bytearray(good)
        at = 24 + 50 * 76 + field
        damaged[at : at + 4] = struct.pack("<I", value)
        path.write_bytes(bytes(damaged))
        got, reader = read(path)
        assert len(got) == 50
        assert dict(reader.rejections) == {reason: 1}


@pytest.mark.parametrize("fmt", ["pcap", "pcapng"])
def test_record_too_large_is_skipped(tmp_path: Path, fmt: str) -> None:
    """A record capturing more than 256 KiB (no bus frame does) is skipped and counted; the records after
    it are read."""
    data = frames(30, seed=8)
    data[10] = b"\xaa" * (MAX_RECORD_BYTES + 1)
    data[20] = b"\xbb" * MAX_RECORD_BYTES  # at the limit: kept
    ts = T0 + np.arange(30, dtype=np.int64)
    path = tmp_path / f"big.{fmt}"
    (write_pcap if fmt == "pcap" else write_pcapng)(path, ts, data)
    got, reader = read(path, chunk_bytes=100_000)
    assert [b for _, _, b, _ in got] == data[:10] + data[11:]
    assert dict(reader.rejections) == {"record_too_large": 1}


def test_pcapng_odd_packet_blocks_counted(tmp_path: Path) -> None:
    """Packet blocks naming an undescribed interface, claiming more bytes than they hold, or a simple
    packet block before any time: each counted, the blocks around them read."""
    e = "<"
    d = b"\x11" * 60
    overlong = block(e, 6, struct.pack("<IIIII", 0, 0, 5, 200, 200) + d)
    path = tmp_path / "odd.pcapng"
    path.write_bytes(
        shb(e) + idb(e, 1) + spb(e, d) + epb(e, 3, 7, d) + overlong + epb(e, 0, 9, d) + spb(e, d)
    )
    got, reader = read(path)
    assert got == [(9000, 1, d, 60), (9000, 1, d, 60)]
    assert dict(reader.rejections) == {"no_timestamp": 1, "unknown_interface": 1, "bad_length": 1}


def test_unknown_linktype_counted(tmp_path: Path) -> None:
    """A capture of another link type (802.11 here) gives no records, every one counted."""
    path = tmp_path / "wifi.pcap"
    write_pcap(path, T0 + np.arange(64, dtype=np.int64), np.zeros((64, 70), np.uint8), linktype=105)
    got, reader = read(path)
    assert got == []
    assert reader.linktypes == [105]
    assert dict(reader.rejections) == {"unknown_linktype": 64}


# --- chunks and the two paths ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["pcap", "pcapng"])
def test_chunking_gives_the_same_records(tmp_path: Path, fmt: str) -> None:
    """Small batches and small read chunks give exactly the records of one big batch."""
    ts, data = mixed()
    path = tmp_path / f"m.{fmt}"
    (write_pcap if fmt == "pcap" else write_pcapng)(path, ts, data)
    whole = list(CaptureReader(path, chunk_records=10**6).batches())
    assert len(whole) == 1
    want = records(whole)
    assert want == [(int(t), 1, d, len(d)) for t, d in zip(ts, data, strict=True)]
    for chunk_records, chunk_bytes in [(7, 1 << 20), (65536, 4096), (1000, 5000), (1, 300)]:
        batches = list(CaptureReader(path, chunk_records=chunk_records, chunk_bytes=chunk_bytes).batches())
        assert max(len(b) for b in batches) <= chunk_records
        assert records(batches) == want
        assert all(len(b.buf) <= max(chunk_bytes, 1000) + 1000 for b in batches)
    assert records(list(read_records(path, chunk_records=999))) == want


@pytest.mark.parametrize("fmt", ["pcap", "pcapng"])
def test_fast_and_slow_paths_agree(tmp_path: Path, fmt: str) -> None:
    """The vectorized path and the per-record loop read a mixed stream identically; the vectorized path
    takes the fixed-size and the two-frames-per-cycle stretches."""
    ts, data = mixed(seed=11)
    data[4000] = b"\xcc" * (MAX_RECORD_BYTES + 5)  # skipped on both paths
    path = tmp_path / f"m.{fmt}"
    (write_pcap if fmt == "pcap" else write_pcapng)(path, ts, data)
    fast, rf = read(path, chunk_bytes=64 * 1024)
    slow, rs = read(path, chunk_bytes=64 * 1024, vectorized=False)
    assert fast == slow
    assert len(fast) == len(data) - 1
    assert rf.rejections == rs.rejections == {"record_too_large": 1}
    assert rs.counts["fast_records"] == 0
    assert rf.counts["fast_records"] > 0.9 * (3000 + 2000)


def test_mutated_files_never_raise(tmp_path: Path) -> None:
    """Random damage (flipped bytes, cut, garbage spliced in) never raises past the reader, and every
    record it returns lies inside its buffer within the size limit."""
    ts, data = mixed(seed=12)
    rnd = random.Random(12)
    originals = []
    for fmt in ("pcap", "pcapng"):
        path = tmp_path / f"o.{fmt}"
        (write_pcap if fmt == "pcap" else write_pcapng)(path, ts[:600], data[:600])
        originals.append(path.read_bytes())
    path = tmp_path / "mutant"
    for trial in range(240):
        content = bytearray(originals[trial % 2])
        for _ in range(rnd.randint(1, 6)):
            at = rnd.randrange(24, len(content))
            kind = rnd.random()
            if kind < 0.5:
                content[at] = rnd.randrange(256)
            elif kind < 0.7:
                content[at : at + 4] = struct.pack("<I", rnd.choice([0, 12, 0xFFFFFFFF, rnd.getrandbits(32)]))
            elif kind < 0.85:
                content[at:at] = rnd.randbytes(rnd.randint(1, 40))
            else:
                del content[at : at + rnd.randint(1, 200)]
        if rnd.random() < 0.3:
            del content[rnd.randrange(24, len(content)) :]
        path.write_bytes(bytes(content))
        try:
            reader = CaptureReader(path, chunk_bytes=rnd.choice([512, 4096, 1 << 20]))
        except CaptureError:
            continue
        total = 0
        for b in reader.batches():
            assert (b.offsets >= 0).all()
            assert (b.offsets + b.lengths <= len(b.buf)).all()
            assert (b.lengths >= 0).all()
            assert (b.lengths <= MAX_RECORD_BYTES).all()
            total += len(b)
        assert total <= 700
        slow, _ = read(path, vectorized=False)
        assert total == len(slow)


def test_writer_errors(tmp_path: Path) -> None:
    """The writer refuses what it cannot write (times before 1970, counts that do not match)."""
    with pytest.raises(ValueError, match="timestamps"):
        write_pcap(tmp_path / "a.pcap", [T0, T0], [b"x"])
    with pytest.raises(ValueError, match="1970"):
        write_pcapng(tmp_path / "a.pcapng", [-1], [b"x"])
    with pytest.raises(ValueError, match="2-D uint8"):
        write_pcapng(tmp_path / "a.pcapng", [1], np.zeros((1, 4), np.int16))
    write_pcapng(tmp_path / "empty.pcapng", [], [])
    got, reader = read(tmp_path / "empty.pcapng")
    assert got == []
    assert not reader.rejections
    assert reader.linktypes == [1]
