"""Inputs the EtherCAT fuzz campaign (benchmarks/fuzz_ethercat.py) found failing, shrunk to a few frames.

Each test is what a user of the capture source gets when the bus, the capture or its file is damaged in
that way. The comment above each says what failed where, before the fixes (d56c7ac, a9964d8, 77ddf5b), and how
(the campaign's report: benchmarks/results/fuzz_ethercat.md).
"""

from __future__ import annotations

import struct
import tracemalloc
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from ingest.ethercat.frames import REJECTIONS, FrameDecoder
from ingest.ethercat.mapping import ProcessMap, load_yaml_map
from ingest.ethercat.source import BusChain
from ingest.ethercat.types import LINKTYPE_ETHERNET, RecordBatch
from ingest.messages import SignalBatch
from ingest.sim import ethercat as sim
from ingest.voraus.schema import MACHINE_SIGNALS

NAMES = list(MACHINE_SIGNALS)
LAYOUT = sim.layout(NAMES)
T0 = 1_767_225_600_000_000_000  # 2026-01-01
MODEL_NS = 10_000_000  # the model's grid: 100 Hz
LRD, LRW, BRD = 10, 12, 7
LRW_ADDRESS_AT = 14 + 2 + 2  # Ethernet header, EtherCAT header, command and index: the LRW's address


def capture(cycles: int, *, start_ns: int = T0) -> tuple[np.ndarray, np.ndarray]:
    """`cycles` bus cycles (1 kHz) of the simulated cell, both copies of each frame (outgoing first)."""
    samples = cycles // 10
    rng = np.random.default_rng(3)
    images = sim.encode(LAYOUT, NAMES, rng.normal(0, 1, (samples, len(NAMES))), np.arange(samples) // 5)
    starts = start_ns + np.arange(samples, dtype=np.int64) * MODEL_NS
    return sim.frames(LAYOUT, images, sample_start_ns=starts, sample_period_ns=MODEL_NS, bus_hz=1000)


def records(ts: Sequence[int] | np.ndarray, frames: Sequence[bytes] | np.ndarray) -> RecordBatch:
    """Records laid out as a pcap file holds them (a 16-byte header before each)."""
    items = [bytes(f) for f in frames]
    offsets = np.cumsum([16 + len(f) for f in items], dtype=np.int64) - np.array([len(f) for f in items])
    return RecordBatch(
        ts_ns=np.asarray(ts, np.int64),
        linktype=np.full(len(items), LINKTYPE_ETHERNET, np.int32),
        offsets=offsets.astype(np.int64),
        lengths=np.array([len(f) for f in items], np.int32),
        wire_lengths=np.array([len(f) for f in items], np.int32),
        buf=np.frombuffer(b"".join(b"\xee" * 16 + f for f in items), np.uint8).copy(),
    )


def ethercat(datagrams: Sequence[tuple[int, int, bytes, int]], src: bytes = sim.MASTER_MAC) -> bytes:
    """An Ethernet frame of EtherCAT datagrams (command, address, data, working counter)."""
    body = b""
    for k, (command, address, data, wkc) in enumerate(datagrams):
        more = 0x8000 if k < len(datagrams) - 1 else 0
        body += (
            struct.pack("<BBIHH", command, k, address, len(data) | more, 0) + data + struct.pack("<H", wkc)
        )
    frame = b"\xff" * 6 + src + b"\x88\xa4" + struct.pack("<H", len(body) | 0x1000) + body
    return frame + b"\0" * max(0, 60 - len(frame))


@pytest.fixture
def cell_map(tmp_path: Path) -> ProcessMap:
    path = tmp_path / "cell.map.yaml"
    path.write_text(sim.yaml_map(LAYOUT))
    return load_yaml_map(path)


def chain_of(pmap: ProcessMap) -> BusChain:
    return BusChain(pmap, robot="robot1", signals=list(pmap.names), period_ns=MODEL_NS)


def rows(messages: Sequence[SignalBatch]) -> int:
    return sum(m.rows for m in messages)


# -- frames.py ------------------------------------------------------------------------------------------

# F3. FrameDecoder.decode's bounds check `... & (offsets + lengths <= len(buf))` (frames.py:447) wrapped
# around int64 for an offset near 2**63: the record passed as inside its buffer; the fast path then raised
# IndexError gathering its group's rows (frames.py:694, `sliding_window_view(buf, length)[starts]`), the
# per-record path in its layout memo (frames.py:485, `getter(record)` on the empty slice). Fixed
# (a9964d8): the check has no sum that can overflow.


@pytest.mark.parametrize("fast", [True, False], ids=["fast path", "per-record path"])
def test_a_record_offset_near_int64_max_is_counted_as_a_bad_record(fast: bool) -> None:
    """A producer's RecordBatch with an absurd offset (a record "outside its buffer" by wrapping around)
    costs that record, counted `bad_record`; the batch's other frames still decode."""
    ts, frames = capture(40)
    batch = records(ts, frames)
    batch.offsets[5] = 2**63 - 1
    out = FrameDecoder(fast=fast).decode(batch)
    assert out.rejections["bad_record"] == 1
    assert set(out.rejections) <= REJECTIONS
    c = out.counts
    assert c["records"] == c["frames"] + c["outgoing_copy"] + c["not_ethercat"] + sum(out.rejections.values())
    assert c["frames"] == 39


# -- source.py: BusChain's map check ------------------------------------------------------------------


# F1. BusChain.feed (source.py:98) checked the map (check_coverage) against the datagrams of ONE batch
# and raised MapError out of feed (a capture refused at start-up, exit 2; a live source stopped):
# (a) start-up traffic: register reads (BRD AL status, kept datagrams) before any process data: no
#     datagram covers the map (fixed in d56c7ac: checked once a logical datagram is seen);
# (b) one corrupt frame whose LRW address is off by a few bytes is a second datagram holding the same
#     signals ("both LRW@0x00010000[468] and LRW@0x00010004[468] hold ...: set its command", which no map
#     can settle for two LRWs);
# (c) a map whose signals ride in two frames (a fast task's datagram every cycle, a slow task's every
#     other cycle or slower) failed whenever that batch held only the fast frame (a small capture chunk;
#     a 50 ms live batch against a 100 ms task).
# (b) and (c) fixed in a9964d8: the map is checked against the datagrams the bus carries regularly over
# its first 256 frames or 1 s of process data.
def test_bus_start_up_traffic_before_process_data_does_not_stop_the_source(cell_map: ProcessMap) -> None:
    """A capture that begins while the master brings the bus up (broadcast reads of the slaves' AL
    status, no process data yet) decodes on: once the cyclic frames come, so do the signals."""
    chain = chain_of(cell_map)
    start_up = [ethercat([(BRD, 0x0130 << 16, b"\x01\x00", sim.N_SLAVES)]) for _ in range(4)]
    chain.feed(records(T0 - 10**9 + np.arange(4) * 10**6, start_up))
    ts, frames = capture(500)
    assert rows(chain.feed(records(ts, frames)) + chain.finish()) >= 45


def test_one_corrupt_frame_in_the_first_batch_does_not_refuse_the_map(cell_map: ProcessMap) -> None:
    """A single damaged frame (its LRW's logical address bit-flipped) at the start of a capture costs that
    frame, not the whole source: the map still binds to the real process image."""
    ts, frames = capture(500)
    frames = frames.copy()
    address = struct.unpack_from("<I", frames[9], LRW_ADDRESS_AT)[0]
    frames[9, LRW_ADDRESS_AT : LRW_ADDRESS_AT + 4] = np.frombuffer(struct.pack("<I", address + 4), np.uint8)
    chain = chain_of(cell_map)
    assert rows(chain.feed(records(ts, frames)) + chain.finish()) >= 45


def two_task_bus(tmp_path: Path, cycles: int) -> tuple[BusChain, list[int], list[bytes]]:
    """A chain whose map has a signal in a fast task's LRD (every cycle) and one in a slow task's LRD
    (every other cycle, its own frame), and the returned frames of `cycles` bus cycles."""
    path = tmp_path / "two.map.yaml"
    path.write_text(
        "signals:\n"
        "  - {name: fast, address: 0x00020000, type: int32}\n"
        "  - {name: slow, address: 0x00040000, type: int32}\n"
    )
    returned = bytes([sim.MASTER_MAC[0] | 2]) + sim.MASTER_MAC[1:]
    ts, frames = [], []
    for k in range(cycles):
        frames.append(ethercat([(LRD, 0x20000, struct.pack("<i", k), 1)], returned))
        ts.append(T0 + k * 10**6)
        if k % 2:
            frames.append(ethercat([(LRD, 0x40000, struct.pack("<i", -k), 1)], returned))
            ts.append(T0 + k * 10**6 + 3000)
    return chain_of(load_yaml_map(path)), ts, frames


def test_a_map_over_two_frames_starts_from_a_batch_holding_only_one_of_them(tmp_path: Path) -> None:
    """Signals of a slow task's datagram are carried forward between its frames; a first batch that has
    not seen that datagram yet is no reason to stop the source."""
    chain, ts, frames = two_task_bus(tmp_path, 400)
    messages = chain.feed(records(ts[:1], frames[:1]))
    messages += chain.feed(records(ts[1:], frames[1:])) + chain.finish()
    assert rows(messages) >= 35


# F1d (found by the campaign's second full run, on a9964d8). BusChain._check_and_release (source.py:122)
# took as the bus's datagrams those seen in `max(2.0, RARE_SHARE * top)` frames or more. In a short
# capture (a damaged file whose readable part ends after a few frames: pcap stops at a bad record header,
# pcapng skips the rest of a section) a datagram seen once was left out although nothing else was seen
# more often (a slow task's datagram; with one frame of process data even the only LRW), and finish()
# raised MapError "... signals not on the bus" for a map that fits: 65 of the 3,000 damaged files of that
# run, the most common logical datagram in 6 frames or fewer. Fixed (77ddf5b): the floor of 2 only once
# the most common key has 2 / RARE_SHARE = 40 frames.


def test_a_capture_cut_after_its_first_frame_gives_that_bus_cycle(cell_map: ProcessMap) -> None:
    """A damaged capture whose readable part holds one frame of process data gives that one bus cycle,
    not a map error naming signals the frame carries."""
    ts, frames = capture(10)
    chain = chain_of(cell_map)
    messages = chain.feed(records(ts[:2], frames[:2])) + chain.finish()  # the outgoing and returned copy
    assert rows(messages) == 1


def test_a_short_capture_with_one_frame_of_the_slow_task_gives_its_bus_cycles(tmp_path: Path) -> None:
    """A capture cut after three bus cycles, the slow task's frame among them once, is decoded."""
    chain, ts, frames = two_task_bus(tmp_path, 3)
    assert rows(chain.feed(records(ts, frames)) + chain.finish()) >= 1


# F1e (found by the campaign's second full run, on a9964d8). BusChain.feed (source.py:112) ended the
# check window when the pending frames spanned CHECK_SPAN_NS, measured from the first to the last: one
# damaged capture time far ahead (a flipped high bit of a pcapng timestamp) at the end of the first batch
# ended it at once, and the map was checked on that batch's few frames: a slow task's datagram not among
# them, MapError (3 of the 3,000 files). Fixed (77ddf5b): the span sums the steps up to MAX_JUMP_NS.


def test_one_damaged_time_does_not_end_the_map_check_window(tmp_path: Path) -> None:
    """A capture time days ahead in the first batch costs that frame, not the start of the source."""
    chain, ts, frames = two_task_bus(tmp_path, 400)
    ts[1] += 4 * 86_400 * 10**9  # the second frame (the fast task's), four days ahead
    messages = chain.feed(records(ts[:2], frames[:2]))
    messages += chain.feed(records(ts[2:], frames[2:])) + chain.finish()
    assert rows(messages) >= 35


# -- resample.py: capture times and values a damaged capture gives ------------------------------------

# F2. CycleCutter._send (resample.py) built SignalBatch(time_ns=...) from the grid time of bus cycles
# captured before 1970; SignalBatch refuses a negative time_ns ("'time_ns' must be in [0, 2**63 - 1]",
# messages.py:140) and the ValueError escaped BusChain.feed. pcapng gives such times from a negative
# if_tsoffset or a wrapped 64-bit timestamp (pcap.py reads them as int64 on purpose). Fixed (a9964d8):
# dropped and counted `before_epoch`.


def test_capture_times_before_1970_do_not_raise(cell_map: ProcessMap) -> None:
    """A capture whose clock says 1969 (a damaged interface time offset) is not decoded into messages
    SignalBatch cannot hold: those bus cycles are dropped and counted, nothing is raised."""
    ts, frames = capture(300, start_ns=-(10**12))
    chain = chain_of(cell_map)
    assert rows(chain.feed(records(ts, frames)) + chain.finish()) == 0
    assert chain.resampler.stats.counts["before_epoch"] == 300  # the returned copies


# S1. Resampler.push ordered capture times by a running maximum, so one bus cycle whose time is far ahead
# (a flipped high bit of a pcapng timestamp) made every later one "go back": dropped as `backwards` to the
# end of the capture, the source silent without an error. Fixed (a9964d8): a lone time far ahead is
# dropped and counted `jump_ahead`.


def test_one_capture_time_far_ahead_does_not_silence_the_chain(cell_map: ProcessMap) -> None:
    """One record with a garbage capture time (centuries ahead) costs that bus cycle, not the rest of the
    capture."""
    ts, frames = capture(500)
    ts = ts.copy()
    ts[101] = 2**62  # a returned copy
    chain = chain_of(cell_map)
    assert rows(chain.feed(records(ts, frames)) + chain.finish()) >= 45
    assert chain.resampler.stats.counts["jump_ahead"] == 1
    assert chain.resampler.stats.backwards == 0


# S2. Resampler.push kept every bus cycle of the newest grid sample and concatenated each batch onto them;
# a capture whose clock stands still (all records at one time: pcapng if_tsresol 2^-127 makes every time
# equal) never closes that sample: memory grew with the capture, each batch cost O(held). Fixed
# (a9964d8): the open grid sample is its running sum and count.


def test_a_frozen_capture_clock_keeps_the_resampler_bounded(cell_map: ProcessMap) -> None:
    """A capture whose every record carries the same time does not make the source hold it all in memory."""
    ts, frames = capture(200)
    frozen = records(np.full(len(ts), T0), frames)
    chain = chain_of(cell_map)
    for _ in range(3):
        chain.feed(frozen)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(30):
            chain.feed(frozen)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # 30 batches of 200 bus cycles of 131 float64 signals each would be 6 MB if they were held
    assert grown < 500_000


# S3. CycleCutter.push (resample.py:158) cast the grid means to float32 outside np.errstate: a float64
# signal beyond float32's range (a damaged frame's bytes) warned "overflow encountered in cast" (an error
# where warnings are errors; log noise in the daemon) and was inf in the message, where the other sources
# reject non-finite signals. Fixed (a9964d8): such bus cycles are left out of the mean, counted
# `nonfinite`.


def test_a_float64_signal_beyond_float32_range_does_not_warn(tmp_path: Path) -> None:
    """A float64 process value too large for the model's float32 samples is left out of its grid sample
    and counted, without a warning; every message holds finite values."""
    path = tmp_path / "float.map.yaml"
    path.write_text(
        "signals:\n"
        "  - {name: counter, address: 0x00020000, type: uint32}\n"
        "  - {name: value, address: 0x00020004, type: float64}\n"
    )
    chain = chain_of(load_yaml_map(path))
    returned = bytes([sim.MASTER_MAC[0] | 2]) + sim.MASTER_MAC[1:]
    frames = [
        ethercat([(LRD, 0x20000, struct.pack("<Id", k, 1e300 if k == 50 else 1.0), 1)], returned)
        for k in range(300)
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        messages = chain.feed(records(T0 + np.arange(300) * 10**6, frames)) + chain.finish()
    assert rows(messages) >= 25
    assert all(np.isfinite(m.signals).all() for m in messages)
    assert chain.resampler.stats.counts["nonfinite"] == 1
