"""EtherCAT frames out of capture records (ingest/ethercat/frames.py): what a user gets is every cyclic
datagram of every frame exactly as scapy's EtherCAT dissector reads it (command, address, length, data,
working counter), from Ethernet (VLAN-tagged or not), Linux cooked captures and EtherCAT over UDP; mailbox
traffic skipped and counted; each frame once when the capture holds both copies; stale data flagged; and
every bad record counted by reason while the good frames around it still come. The vectorized fast path
and the per-record path give the same answer on any mix of records."""

from __future__ import annotations

import random
import struct
from collections import Counter
from collections.abc import Sequence

import numpy as np
import pytest
from scapy.contrib.ethercat import (
    EtherCat,
    EtherCatAPRD,
    EtherCatAPWR,
    EtherCatARMW,
    EtherCatBRD,
    EtherCatBWR,
    EtherCatFPRD,
    EtherCatFPRW,
    EtherCatFPWR,
    EtherCatFRMW,
    EtherCatLRD,
    EtherCatLRW,
    EtherCatLWR,
    EtherCatType12DLPDU,
)
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import ARP, CookedLinux, CookedLinuxV2, Dot1AD, Dot1Q, Ether
from scapy.packet import Packet, Raw, raw

import ingest.ethercat.frames as frames_module
from ingest.ethercat.frames import REJECTIONS, FrameDecoder
from ingest.ethercat.types import (
    LINKTYPE_ETHERNET,
    LINKTYPE_LINUX_SLL,
    LINKTYPE_LINUX_SLL2,
    DatagramKey,
    FrameBatch,
    RecordBatch,
)

MASTER = "00:1b:21:aa:bb:cc"  # a universally administered NIC address: bit 1 of the first byte clear
RETURNED = "02:1b:21:aa:bb:cc"  # ... as the first slave sends it back
LRD, LWR, LRW, APRD, FPRD, FPWR, BRD, ARMW, FRMW = 10, 11, 12, 1, 4, 5, 7, 13, 14
LOGICAL_CLASSES = {LRD: EtherCatLRD, LWR: EtherCatLWR, LRW: EtherCatLRW}
ADDRESSED_CLASSES = {
    1: EtherCatAPRD,
    2: EtherCatAPWR,
    4: EtherCatFPRD,
    5: EtherCatFPWR,
    6: EtherCatFPRW,
    7: EtherCatBRD,
    8: EtherCatBWR,
    13: EtherCatARMW,
    14: EtherCatFRMW,
}


# -- building records ---------------------------------------------------------------------------------


def dg(command: int, address: int, data: bytes, wkc: int = 0) -> Packet:
    """One datagram as scapy builds it (logical: a 32-bit address; others: ADP | ADO << 16)."""
    if command in LOGICAL_CLASSES:
        return LOGICAL_CLASSES[command](adr=address, data=list(data), wkc=wkc)
    return ADDRESSED_CLASSES[command](adp=address & 0xFFFF, ado=address >> 16, data=list(data), wkc=wkc)


def ether(datagrams: Sequence[Packet], src: str = MASTER, tags: Sequence[Packet] = ()) -> bytes:
    """An Ethernet frame with an EtherCAT frame of these datagrams (scapy pads it to 60 bytes)."""
    pkt: Packet = Ether(src=src, dst="ff:ff:ff:ff:ff:ff")
    for tag in tags:
        pkt = pkt / tag
    pkt = pkt / EtherCat()
    for d in datagrams:
        pkt = pkt / d.copy()
    return raw(pkt)


def ecat_bytes(datagrams: Sequence[Packet]) -> bytes:
    """The EtherCAT part alone (header + datagrams, no Ethernet padding), for the other carriers."""
    frame = ether(datagrams)
    return frame[14 : 16 + (struct.unpack("<H", frame[14:16])[0] & 0x7FF)]


def sll(payload: bytes, src: bytes = bytes.fromhex("001b21aabbcc"), proto: int = 0x88A4) -> bytes:
    return raw(
        CookedLinux(pkttype=4, lladdrtype=1, lladdrlen=6, src=src + b"\0\0", proto=proto) / Raw(payload)
    )


def sll2(payload: bytes, src: bytes = bytes.fromhex("001b21aabbcc"), proto: int = 0x88A4) -> bytes:
    return raw(
        CookedLinuxV2(proto=proto, ifindex=3, lladdrtype=1, lladdrlen=6, src=src + b"\0\0") / Raw(payload)
    )


def udp(payload: bytes, options: bytes = b"", dport: int = 0x88A4) -> bytes:
    """IPv4/UDP to port 0x88A4 (no Ethernet header); `options` makes the IHL larger than 5."""
    from scapy.layers.inet import IPOption

    ip = IP(src="10.0.0.1", dst="10.0.0.2", options=[IPOption(options)] if options else [])
    return raw(ip / UDP(sport=0x88A4, dport=dport) / Raw(payload))


def eth_ip(payload: bytes, src: str = MASTER) -> bytes:
    return raw(Ether(src=src, dst="ff:ff:ff:ff:ff:ff", type=0x0800) / Raw(payload))


def batch_of(
    records: Sequence[bytes],
    linktypes: int | Sequence[int] = LINKTYPE_ETHERNET,
    *,
    wire: Sequence[int] | None = None,
    ts: Sequence[int] | None = None,
    gaps: Sequence[int] | int = 16,
) -> RecordBatch:
    """Records laid out in one buffer as a capture reader hands them over (a header's worth of bytes
    before each: constant, as in a file of same-sized records, or varying)."""
    n = len(records)
    gap_list = [gaps] * n if isinstance(gaps, int) else list(gaps)
    parts, offsets, at = [], [], 0
    for rec, gap in zip(records, gap_list, strict=True):
        parts.append(b"\xee" * gap)
        at += gap
        offsets.append(at)
        parts.append(rec)
        at += len(rec)
    kinds = [linktypes] * n if isinstance(linktypes, int) else list(linktypes)
    return RecordBatch(
        ts_ns=np.array(
            ts if ts is not None else [1_700_000_000_000_000_000 + i * 1000 for i in range(n)], np.int64
        ),
        linktype=np.array(kinds, np.int32),
        offsets=np.array(offsets, np.int64),
        lengths=np.array([len(r) for r in records], np.int32),
        wire_lengths=np.array(wire if wire is not None else [len(r) for r in records], np.int32),
        buf=np.frombuffer(b"".join(parts), np.uint8).copy(),
    )


# -- the reference: scapy's dissection ----------------------------------------------------------------

Row = tuple[int, int, int, bytes, int]  # command, address, length, data, wkc


def scapy_datagrams(ecat: bytes) -> list[Row]:
    """Every datagram of an EtherCAT frame as scapy dissects it (following the "more" bit)."""
    out: list[Row] = []
    layer = EtherCat(ecat).payload
    while isinstance(layer, EtherCatType12DLPDU):
        logical = any(f.name == "adr" for f in layer.fields_desc)  # (getattr would look into the payload)
        address = layer.adr if logical else layer.adp | layer.ado << 16
        out.append((layer._cmd, address, layer.len, bytes(layer.data), layer.wkc))
        if not layer.next:
            break
        layer = layer.payload
    return out


def kept(rows: list[Row]) -> list[Row]:
    """The datagrams the decoder keeps: logical ones, and others to registers below 0x1000."""
    return sorted(r for r in rows if r[0] in (LRD, LWR, LRW) or (r[0] != 0 and r[1] >> 16 < 0x1000))


def per_frame(batch: FrameBatch) -> list[list[Row]]:
    """The decoder's output back as one sorted datagram list per frame kept."""
    out: list[list[Row]] = [[] for _ in range(len(batch))]
    for key, cols in batch.datagrams.items():
        assert cols.key == key
        assert cols.data.shape == (len(cols.frame), key.length)
        assert cols.data.dtype == np.uint8
        assert cols.wkc.dtype == np.uint16
        assert cols.stale.dtype == bool
        assert cols.frame.dtype == np.int64
        assert (np.diff(cols.frame) >= 0).all(), "frame order kept"
        for f, data, wkc in zip(cols.frame.tolist(), cols.data, cols.wkc.tolist(), strict=True):
            out[f].append((key.command, key.address, key.length, data.tobytes(), wkc))
    return [sorted(rows) for rows in out]


def random_datagrams(rng: random.Random, count: int) -> list[Packet]:
    out = []
    for _ in range(count):
        command = rng.choice([LRD, LWR, LRW, LRW, APRD, FPRD, FPWR, BRD, ARMW, FRMW, 2, 6, 8])
        length = rng.choice([0, 1, 2, 4, 8, 13, 64])
        if command in LOGICAL_CLASSES:
            address = rng.randrange(1 << 32)
        else:
            address = (
                rng.randrange(1 << 16) | rng.choice([0x0130, 0x0910, 0x0900, 0x1000, 0x1080, 0x1C00]) << 16
            )
        out.append(dg(command, address, rng.randbytes(length), rng.randrange(1 << 16)))
    return out


def assert_accounted(batch: FrameBatch) -> None:
    """Every record ends up exactly once: a frame, an outgoing copy, not EtherCAT, or rejected."""
    c = batch.counts
    assert c["records"] == c["frames"] + c["outgoing_copy"] + c["not_ethercat"] + sum(
        batch.rejections.values()
    )
    assert set(batch.rejections) <= REJECTIONS


# -- the tests ----------------------------------------------------------------------------------------


def test_every_datagram_as_scapy_reads_it() -> None:
    """Random chains of 1-6 datagrams of every command (logical, addressed, broadcast, DC, mailbox
    registers): the decoder's command, address, length, data and WKC of every kept datagram equal scapy's,
    datagrams are counted by command and mailbox ones counted as such."""
    rng = random.Random(12)
    records, expected, commands = [], [], Counter[int]()
    for _ in range(150):
        datagrams = random_datagrams(rng, rng.randint(1, 6))
        rec = ether(datagrams)
        rows = scapy_datagrams(rec[14:])
        assert len(rows) == len(datagrams)
        records.append(rec)
        expected.append(kept(rows))
        commands.update(r[0] for r in rows)
    out = FrameDecoder().decode(batch_of(records))
    frames_with_data = [rows for rows in expected if rows]
    assert per_frame(out) == frames_with_data
    assert out.counts["frames"] == 150
    assert not out.rejections
    names = {1: "APRD", 2: "APWR", 4: "FPRD", 5: "FPWR", 6: "FPRW", 7: "BRD", 8: "BWR", 10: "LRD", 11: "LWR"}
    names |= {12: "LRW", 13: "ARMW", 14: "FRMW"}
    assert {k: v for k, v in out.counts.items() if k.startswith("datagrams_")} == {
        f"datagrams_{names[c]}": n for c, n in commands.items()
    }
    mailbox = sum(len(scapy_datagrams(r[14:])) - len(e) for r, e in zip(records, expected, strict=True))
    assert out.counts["mailbox"] == mailbox > 0
    assert_accounted(out)


def test_a_cyclic_stream_through_the_fast_path_equals_scapy(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same few frame layouts repeated 300 times with changing data and WKCs (what a bus carries):
    decoded in one pass over each layout, every value still equal to scapy's dissection of each record."""
    rng = random.Random(5)
    shapes = [
        [dg(LRW, 0x10000, bytes(64)), dg(ARMW, 0x0910_0000, bytes(8))],
        [dg(LRD, 0x20000, bytes(12)), dg(LWR, 0x30000, bytes(6)), dg(BRD, 0x0130_0000, bytes(2))],
        [dg(LRD, 0x40000, bytes(3))],  # padded to 60 bytes by scapy
    ]
    templates = [ether(s) for s in shapes]
    records = []
    for i in range(300):  # the layout stays, data and WKCs change
        rec = bytearray(templates[i % 3])
        at = 16
        for _, _, length, _, _ in scapy_datagrams(bytes(rec[14:])):
            rec[at + 10 : at + 10 + length + 2] = rng.randbytes(length + 2)
            at += 12 + length
        records.append(bytes(rec))
    calls = Counter[str]()
    parse = frames_module.parse_record

    def counting(rec: bytes, linktype: int, wire_length: int) -> object:
        calls["parse"] += 1
        return parse(rec, linktype, wire_length)

    monkeypatch.setattr(frames_module, "parse_record", counting)
    out = FrameDecoder().decode(batch_of(records))
    assert calls["parse"] <= 6, "one parse per layout, not per record"
    assert per_frame(out) == [kept(scapy_datagrams(r[14:])) for r in records]
    assert out.counts["datagrams_LRD"] == 200
    assert out.counts["datagrams_ARMW"] == 100


@pytest.mark.parametrize("tags", ["dot1q", "qinq"])
def test_vlan_tagged_frames(tags: str) -> None:
    """Frames behind one 802.1Q tag or an 802.1ad + 802.1Q pair decode as untagged ones do."""
    layers = [Dot1Q(vlan=7)] if tags == "dot1q" else [Dot1AD(vlan=100), Dot1Q(vlan=7)]
    datagrams = [dg(LRW, 0x10000, b"\x01\x02\x03\x04", 3), dg(FPRD, 0x0910_03E9, b"\x05" * 8, 1)]
    records = [ether(datagrams, tags=layers)] * 20
    out = FrameDecoder().decode(batch_of(records))
    assert per_frame(out) == [kept(scapy_datagrams(ecat_bytes(datagrams)))] * 20
    assert out.counts["frames"] == 20
    assert not out.rejections


def test_three_tags_are_not_ethercat() -> None:
    """More than two VLAN tags is not a layout a bus capture has: counted as other traffic."""
    rec = ether([dg(LRD, 0, b"\0\0")], tags=[Dot1AD(vlan=1), Dot1Q(vlan=2), Dot1Q(vlan=3)])
    out = FrameDecoder().decode(batch_of([rec]))
    assert out.counts["not_ethercat"] == 1
    assert len(out) == 0


@pytest.mark.parametrize(
    ("carrier", "linktype"),
    [
        ("sll", LINKTYPE_LINUX_SLL),
        ("sll2", LINKTYPE_LINUX_SLL2),
        ("udp", LINKTYPE_ETHERNET),
        ("udp_options", LINKTYPE_ETHERNET),
        ("sll_udp", LINKTYPE_LINUX_SLL),
        ("sll2_udp", LINKTYPE_LINUX_SLL2),
    ],
)
def test_cooked_captures_and_udp(carrier: str, linktype: int) -> None:
    """Linux cooked captures (SLL, SLL2) and EtherCAT over UDP (IPv4, IHL 5 or with options, behind
    Ethernet or SLL): the same datagrams as scapy reads from the EtherCAT bytes; the same frames in
    the fast path (many alike) and the per-record path (one)."""
    rng = random.Random(carrier)
    for count in (1, 40):
        records, expected = [], []
        for _ in range(count):
            datagrams = [dg(LRW, 0x10000, rng.randbytes(16), 3), dg(LRD, 0x20000, rng.randbytes(4), 1)]
            ecat = ecat_bytes(datagrams)
            rec = {
                "sll": lambda e: sll(e),
                "sll2": lambda e: sll2(e),
                "udp": lambda e: eth_ip(udp(e)),
                "udp_options": lambda e: eth_ip(udp(e, options=b"\x01\x01\x01\x00")),
                "sll_udp": lambda e: sll(udp(e), proto=0x0800),
                "sll2_udp": lambda e: sll2(udp(e), proto=0x0800),
            }[carrier](ecat)
            records.append(rec)
            expected.append(kept(scapy_datagrams(ecat)))
        out = FrameDecoder().decode(batch_of(records, linktype))
        assert per_frame(out) == expected, count
        assert out.counts["frames"] == count
        assert not out.rejections


def test_other_traffic_is_counted_and_skipped() -> None:
    """ARP, UDP to another port, TCP, IPv6, non-initial IP fragments: `not_ethercat`, frames around them
    still decoded."""
    good = ether([dg(LRD, 0x1000, b"\x11\x22", 1)])
    ecat = ecat_bytes([dg(LRD, 0x1000, b"\x11\x22", 1)])
    later_fragment = bytearray(udp(ecat))
    later_fragment[6:8] = b"\x00\x10"
    others = [
        raw(Ether(src=MASTER) / ARP()),
        eth_ip(udp(ecat, dport=5000)),
        eth_ip(raw(IP(proto=6) / Raw(b"\0" * 20))),
        raw(Ether(src=MASTER, type=0x86DD) / Raw(b"\x60" + b"\0" * 39)),
        eth_ip(bytes(later_fragment)),
    ]
    out = FrameDecoder().decode(batch_of([good, *others, good]))
    assert out.counts["not_ethercat"] == len(others)
    assert out.counts["frames"] == 2
    assert per_frame(out) == [[(LRD, 0x1000, 2, b"\x11\x22", 1)]] * 2
    assert_accounted(out)


def test_mailbox_traffic_is_skipped_and_counted() -> None:
    """Datagrams to slave registers >= 0x1000 (CoE mailboxes) and mailbox-gateway frames (type 5) carry
    no process data: skipped and counted `mailbox`; a frame of only those is counted but is no row; the
    process data beside a mailbox datagram in the same frame is kept."""
    mailbox_only = ether([dg(FPWR, 0x1000_03E9, b"\x0a" * 16, 1), dg(FPRD, 0x1080_03EA, b"\0" * 16, 1)])
    mixed = ether([dg(FPRD, 0x1080_03E9, b"\0" * 8, 1), dg(LRD, 0x10000, b"\x07\x08", 2)])
    gateway = bytearray(ether([dg(LRD, 0, b"\0" * 4)]))
    gateway[15] = (gateway[15] & 0x0F) | 0x50  # EtherCAT frame type 5: mailbox gateway
    out = FrameDecoder().decode(batch_of([mailbox_only, mixed, bytes(gateway)]))
    assert out.counts["mailbox"] == 2 + 1 + 1
    assert out.counts["frames"] == 3
    assert len(out) == 1
    assert per_frame(out) == [[(LRD, 0x10000, 2, b"\x07\x08", 2)]]
    assert out.counts["datagrams_FPRD"] == 2
    assert out.counts["datagrams_FPWR"] == 1
    assert out.ts_ns.tolist() == [batch_of([mailbox_only, mixed]).ts_ns[1]]


def test_other_frame_types_and_nop_datagrams() -> None:
    """An EtherCAT frame of another type (network variables) is skipped as `other_frame_type`; a NOP
    datagram is counted by command and never kept."""
    nv = bytearray(ether([dg(LRD, 0, b"\0" * 4)]))
    nv[15] = (nv[15] & 0x0F) | 0x40
    nop = bytearray(ether([dg(LRD, 0, b"\0" * 4, 1), dg(LRD, 0x10, b"\x01\x02", 1)]))
    nop[16] = 0  # the first datagram becomes a NOP
    out = FrameDecoder().decode(batch_of([bytes(nv), bytes(nop)]))
    assert out.counts["other_frame_type"] == 1
    assert out.counts["datagrams_NOP"] == 1
    assert per_frame(out) == [[(LRD, 0x10, 2, b"\x01\x02", 1)]]


def copies(n: int, *, out_src: str = MASTER, back_src: str = RETURNED, wkc: int = 3) -> list[bytes]:
    """A capture at the master: each cycle's outgoing copy (WKC 0) then the returned one (WKC `wkc`,
    new inputs, the ARMW's ADP counted up by the 4 slaves)."""
    records = []
    for i in range(n):
        records.append(
            ether([dg(LRW, 0x10000, bytes([i % 256]) * 8), dg(ARMW, 0x0910_0000, bytes(8))], out_src)
        )
        back = [
            dg(LRW, 0x10000, bytes([i % 256, 0xAA]) * 4, wkc),
            dg(ARMW, 0x0910_0004, struct.pack("<Q", i), 4),
        ]
        records.append(ether(back, back_src))
    return records


@pytest.mark.parametrize("n", [3, 40])
def test_both_copies_each_frame_once_from_the_returned_copy(n: int) -> None:
    """A capture holding the outgoing and the returned copy of every frame: each frame once, its process
    data and time from the returned copy (the first slave flipped the source MAC bit), the outgoing copies
    counted `outgoing_copy`, datagrams not counted twice."""
    records = copies(n)
    batch = batch_of(records)
    out = FrameDecoder().decode(batch)
    assert len(out) == n
    assert out.counts["frames"] == n
    assert out.counts["outgoing_copy"] == n
    assert out.counts["datagrams_LRW"] == n
    assert out.counts["datagrams_ARMW"] == n
    assert out.ts_ns.tolist() == batch.ts_ns[1::2].tolist()
    assert per_frame(out) == [kept(scapy_datagrams(r[14:])) for r in records[1::2]]
    assert not out.datagrams[DatagramKey(LRW, 0x10000, 8)].stale.any()
    assert_accounted(out)


def test_copies_split_across_batches_are_not_counted_twice() -> None:
    """Batches cut between a frame's outgoing and returned copy: what the decoder learned in one batch
    holds in the next, so no outgoing copy is ever kept after the first batch."""
    records = copies(60)
    decoder = FrameDecoder()
    sizes = [7, 1, 1, 30, 2, 79]  # odd sizes: cuts fall between the two copies
    outs, at = [], 0
    for size in sizes:
        outs.append(decoder.decode(batch_of(records[at : at + size])))
        at += size
    assert sum(len(o) for o in outs) == 60
    assert sum(o.counts["outgoing_copy"] for o in outs) == 60
    assert decoder.counts["frames"] == 60
    assert decoder.counts["outgoing_copy"] == 60
    wkcs = np.concatenate([o.datagrams[DatagramKey(LRW, 0x10000, 8)].wkc for o in outs if o.datagrams])
    assert (wkcs == 3).all()


def test_record_by_record_keeps_only_the_very_first_outgoing_copy() -> None:
    """A live capture decoded one record at a time: before any returned copy was seen, the first outgoing
    copy cannot be told apart from a capture of one direction; it is kept (stale: WKC 0) and every later
    outgoing copy is dropped."""
    decoder = FrameDecoder()
    outs = [decoder.decode(batch_of([rec])) for rec in copies(10)]
    assert decoder.counts["frames"] == 11
    assert decoder.counts["outgoing_copy"] == 9
    first = outs[0].datagrams[DatagramKey(LRW, 0x10000, 8)]
    assert first.wkc.tolist() == [0]
    assert first.stale.tolist() == [True]


def test_a_master_with_a_locally_administered_mac() -> None:
    """A master whose own MAC has bit 1 set: the slave flips it clear; the returned copies are told by
    their working counters, not by the bit."""
    records = copies(20, out_src=RETURNED, back_src=MASTER)
    out = FrameDecoder().decode(batch_of(records))
    assert len(out) == 20
    assert out.counts["outgoing_copy"] == 20
    assert (out.datagrams[DatagramKey(LRW, 0x10000, 8)].wkc == 3).all()


def test_one_direction_keeps_every_frame() -> None:
    """A capture that holds only one direction (a mirror port of the returning link): nothing dropped."""
    records = copies(20)[1::2]
    out = FrameDecoder().decode(batch_of(records))
    assert len(out) == 20
    assert "outgoing_copy" not in out.counts


def test_two_masters_are_told_apart() -> None:
    """Two masters on one capture (two MACs): each one's copies paired with its own."""
    a = copies(10)
    b = copies(10, out_src="00:1b:21:00:00:01", back_src="02:1b:21:00:00:01")
    out = FrameDecoder().decode(batch_of([r for pair in zip(a, b, strict=True) for r in pair]))
    assert len(out) == 20
    assert out.counts["outgoing_copy"] == 20


def cyclic(wkcs: Sequence[int], address: int = 0x10000) -> list[bytes]:
    return [ether([dg(LRW, address, bytes([i % 256]) * 4, w)]) for i, w in enumerate(wkcs)]


def test_short_working_counter_marks_stale_learned() -> None:
    """No expected count given: the most common non-zero WKC seen so far is expected; a datagram with a
    lower one (a slave missed it) is stale, counted; later batches are judged by what was learned."""
    decoder = FrameDecoder()
    wkcs = [3] * 30 + [2, 3, 0, 3, 5]
    out = decoder.decode(batch_of(cyclic(wkcs)))
    cols = out.datagrams[DatagramKey(LRW, 0x10000, 4)]
    assert cols.stale.tolist() == [w < 3 for w in wkcs]
    assert out.counts["stale"] == 2
    assert decoder.expected(DatagramKey(LRW, 0x10000, 4)) == 3
    later = decoder.decode(batch_of(cyclic([2, 3])))  # a batch with too few to tell on its own
    assert later.datagrams[DatagramKey(LRW, 0x10000, 4)].stale.tolist() == [True, False]


@pytest.mark.parametrize("key", [DatagramKey(LRW, 0x10000, 4), (LRW, 0x10000)])
def test_short_working_counter_marks_stale_configured(key: DatagramKey | tuple[int, int]) -> None:
    """Expected counts given (an ENI's Cnt), by key or by (command, address): WKC below it is stale, even
    where the bus has been short all along (learning would have taken that as normal)."""
    decoder = FrameDecoder(expected_wkc={key: 3})
    out = decoder.decode(
        batch_of(cyclic([2] * 20 + [3], address=0x10000) + cyclic([1] * 20, address=0x20000))
    )
    assert out.datagrams[DatagramKey(LRW, 0x10000, 4)].stale.tolist() == [True] * 20 + [False]
    assert not out.datagrams[DatagramKey(LRW, 0x20000, 4)].stale.any()  # learned: 1
    assert out.counts["stale"] == 20


@pytest.mark.parametrize("bad", [{(LRW,): 3}, {(LRW, 0): -1}, {(LRW, 0): 1.5}, {"LRW": 3}])
def test_bad_expected_counts_fail_at_start(bad: dict) -> None:
    """A wrong expected-WKC table is a start-up error naming the entry."""
    with pytest.raises(ValueError, match="expected working counter"):
        FrameDecoder(expected_wkc=bad)


def test_every_bad_input_counted_by_reason_good_frames_still_come() -> None:
    """Truncated records, impossible lengths, unknown commands, unknown link types, broken IPv4 headers,
    IP fragments, oversize records and records outside the buffer: each counted by its reason, the good
    frames between them decoded."""
    good = ether([dg(LRW, 0x10000, b"\x01\x02\x03\x04", 3), dg(LRD, 0x20000, b"\x05\x06", 1)])
    g = bytearray(good)
    bad: list[tuple[str, bytes, int, int]] = []  # reason, record, link type, wire length

    cut = good[:30]
    bad.append(("truncated", cut, LINKTYPE_ETHERNET, len(good)))
    bad.append(("truncated", good[:10], LINKTYPE_ETHERNET, len(good)))  # cut before the EtherType
    short_uncut = bytearray(good[:40])
    bad.append(("bad_length", bytes(short_uncut), LINKTYPE_ETHERNET, 40))  # EtherCAT length past the frame
    too_long = bytearray(g)
    too_long[14:16] = struct.pack("<H", 0x1000 | 2000)
    bad.append(("bad_length", bytes(too_long), LINKTYPE_ETHERNET, len(g)))
    dg_past = bytearray(g)
    dg_past[22:24] = struct.pack("<H", 0x8000 | 60)  # the first datagram runs past the EtherCAT length
    bad.append(("bad_length", bytes(dg_past), LINKTYPE_ETHERNET, len(g)))
    more_nothing = bytearray(g)
    more_nothing[16 + 16 + 6 : 16 + 16 + 8] = struct.pack("<H", 0x8000 | 2)  # "more" set on the last one
    bad.append(("bad_length", bytes(more_nothing), LINKTYPE_ETHERNET, len(g)))
    empty = bytearray(g)
    empty[14:16] = struct.pack("<H", 0x1000 | 5)  # too short for one datagram
    bad.append(("bad_length", bytes(empty), LINKTYPE_ETHERNET, len(g)))
    unknown = bytearray(g)
    unknown[16 + 16] = 0x2A  # the second datagram's command
    bad.append(("unknown_command", bytes(unknown), LINKTYPE_ETHERNET, len(g)))
    bad.append(("bad_link", good, 147, len(good)))
    bad.append(("bad_link", good[:9], LINKTYPE_ETHERNET, 9))
    ecat = ecat_bytes([dg(LRD, 0x20000, b"\x05\x06", 1)])
    bad_ihl = bytearray(udp(ecat))
    bad_ihl[0] = 0x44
    bad.append(("bad_link", eth_ip(bytes(bad_ihl)), LINKTYPE_ETHERNET, 0))
    udp_len = bytearray(udp(ecat))
    udp_len[24:26] = struct.pack(">H", 200)
    bad.append(("bad_length", eth_ip(bytes(udp_len)), LINKTYPE_ETHERNET, 0))
    fragment = bytearray(udp(ecat))
    fragment[6:8] = b"\x20\x00"
    bad.append(("fragmented", eth_ip(bytes(fragment)), LINKTYPE_ETHERNET, 0))
    bad.append(("truncated", eth_ip(udp(ecat))[:40], LINKTYPE_ETHERNET, 80))
    bad.append(("oversize", good + bytes(300_000), LINKTYPE_ETHERNET, 0))

    records, kinds, wire = [], [], []
    for _, rec, kind, wire_length in bad:
        records += [good, rec]
        kinds += [LINKTYPE_ETHERNET, kind]
        wire += [len(good), wire_length or len(rec)]
    records.append(good)
    kinds.append(LINKTYPE_ETHERNET)
    wire.append(len(good))
    batch = batch_of(records, kinds, wire=wire)
    batch.offsets = np.append(batch.offsets, len(batch.buf) - 10)  # a record past the buffer's end
    for name in ("ts_ns", "linktype", "lengths", "wire_lengths"):
        setattr(batch, name, np.append(getattr(batch, name), getattr(batch, name)[-1]))
    for fast in (True, False):
        out = FrameDecoder(fast=fast).decode(batch)
        expected = Counter(reason for reason, *_ in bad) + Counter({"bad_record": 1})
        assert out.rejections == expected
        assert len(out) == len(bad) + 1
        assert per_frame(out) == [kept(scapy_datagrams(good[14:]))] * (len(bad) + 1)
        assert_accounted(out)


def test_a_cut_after_the_ethercat_part_is_not_truncation() -> None:
    """A snap length that only cut Ethernet padding (or an FCS) loses nothing: the frame decodes."""
    rec = ether([dg(LRD, 0x10000, b"\x01\x02", 1)])  # 60 bytes with padding, EtherCAT ends at 30
    out = FrameDecoder().decode(batch_of([rec[:40]], wire=[64]))
    assert per_frame(out) == [[(LRD, 0x10000, 2, b"\x01\x02", 1)]]
    assert not out.rejections


def test_mutated_records_never_raise(monkeypatch: pytest.MonkeyPatch) -> None:
    """3,000 records mutated at random (flipped, cut, extended bytes): decoding never raises, every
    record is accounted for once, and the fast path, the per-record path and the per-record path without
    its memory of recent layouts (every record parsed afresh) agree."""
    rng = random.Random(99)
    templates = [ether(random_datagrams(rng, rng.randint(1, 4))) for _ in range(6)]
    records = []
    for _ in range(3000):
        rec = bytearray(rng.choice(templates))
        for _ in range(rng.randint(0, 3)):
            op = rng.random() if rec else 1.0
            if op < 0.6:
                rec[rng.randrange(len(rec))] = rng.randrange(256)
            elif op < 0.8:
                del rec[rng.randrange(len(rec)) :]
            else:
                rec += rng.randbytes(rng.randint(1, 20))
        records.append(bytes(rec))
    batch = batch_of(records, wire=[len(r) + rng.choice([0, 0, 0, 7]) for r in records])
    fast = FrameDecoder().decode(batch)
    slow = FrameDecoder(fast=False).decode(batch)
    monkeypatch.setattr(frames_module, "_RECENT_LAYOUTS", 0)
    parsed = FrameDecoder(fast=False).decode(batch)
    assert_same(fast, slow)
    assert_same(slow, parsed)
    assert_accounted(fast)
    assert fast.counts["frames"] > 1000
    assert len(fast.rejections) >= 3


def assert_same(a: FrameBatch, b: FrameBatch) -> None:
    assert a.ts_ns.tolist() == b.ts_ns.tolist()
    assert +a.counts == +b.counts
    assert +a.rejections == +b.rejections
    assert list(a.datagrams) == list(b.datagrams)
    for key, x in a.datagrams.items():
        y = b.datagrams[key]
        assert x.key == y.key == key
        for name in ("frame", "data", "wkc", "stale"):
            assert getattr(x, name).dtype == getattr(y, name).dtype, (key, name)
            assert np.array_equal(getattr(x, name), getattr(y, name)), (key, name)


def test_fast_path_and_per_record_path_agree_on_random_mixes() -> None:
    """Random captures (fixed seed): cyclic layouts on every carrier, both copies or one, stale WKCs,
    mailbox frames, other traffic and damaged records in random order, laid out at constant or varying
    spacing and cut into random batches: the fast path returns exactly what the per-record path does."""
    rng = random.Random(2024)
    for trial in range(6):
        shapes = [random_datagrams(rng, rng.randint(1, 3)) for _ in range(4)]
        carriers = ["eth", "vlan", "sll", "sll2", "udp"]
        records: list[bytes] = []
        kinds: list[int] = []
        wire: list[int] = []
        for _ in range(rng.randint(300, 600)):
            shape = rng.choice(shapes)
            carrier = rng.choice(carriers[: 1 + trial % 5])
            both = rng.random() < 0.7
            for src in [MASTER, RETURNED] if both else [RETURNED]:
                rebuilt = [d.copy() for d in shape]
                for d in rebuilt:
                    d.wkc = 0 if src == MASTER else rng.choice([3, 3, 3, 2])
                    d.data = list(rng.randbytes(len(d.data)))
                rec, kind = ether(rebuilt, src), LINKTYPE_ETHERNET
                if carrier == "vlan":
                    rec = ether(rebuilt, src, tags=[Dot1Q(vlan=5)])
                elif carrier == "sll":
                    rec, kind = sll(rec[14:], src=bytes.fromhex(src.replace(":", ""))), LINKTYPE_LINUX_SLL
                elif carrier == "sll2":
                    rec, kind = sll2(rec[14:], src=bytes.fromhex(src.replace(":", ""))), LINKTYPE_LINUX_SLL2
                elif carrier == "udp":
                    rec = eth_ip(udp(ecat_bytes(rebuilt)), src)
                records.append(rec)
                kinds.append(kind)
                wire.append(len(rec))
            if rng.random() < 0.05:  # damage one
                i = rng.randrange(len(records))
                damaged = bytearray(records[i])
                damaged[rng.randrange(len(damaged))] ^= 1 << rng.randrange(8)
                records[i] = bytes(damaged)
                if rng.random() < 0.3:  # cut (the wire length stays)
                    records[i] = records[i][: rng.randrange(len(damaged))]
            if rng.random() < 0.03:
                records.append(raw(Ether(src=MASTER) / ARP()))
                kinds.append(LINKTYPE_ETHERNET)
                wire.append(len(records[-1]))
        gaps: int | list[int] = 16 if trial % 2 else [rng.choice([16, 16, 20, 28]) for _ in records]
        fast, slow = FrameDecoder(), FrameDecoder(fast=False)
        at = 0
        while at < len(records):
            size = rng.randint(1, 400)
            part = slice(at, at + size)
            batch = batch_of(
                records[part],
                kinds[part],
                wire=wire[part],
                gaps=gaps if isinstance(gaps, int) else gaps[part],
            )
            a, b = fast.decode(batch), slow.decode(batch)
            assert_same(a, b)
            assert_accounted(a)
            at += size
        assert fast.counts == slow.counts
        assert fast.counts["frames"] > 0


def test_output_does_not_alias_the_batch_buffer() -> None:
    """The capture reader may reuse its buffer: the decoded data are copies."""
    batch = batch_of(cyclic([3] * 40))
    out = FrameDecoder().decode(batch)
    before = out.datagrams[DatagramKey(LRW, 0x10000, 4)].data.copy()
    batch.buf[:] = 0
    assert np.array_equal(out.datagrams[DatagramKey(LRW, 0x10000, 4)].data, before)


def test_empty_batch() -> None:
    """No records: an empty FrameBatch."""
    out = FrameDecoder().decode(batch_of([]))
    assert len(out) == 0
    assert out.datagrams == {}
    assert not out.rejections
