"""Live EtherCAT capture, for real: each test makes a network namespace and a veth pair, a sender inside the
namespace puts frames on the wire of its end through an AF_PACKET socket at the bus's own pace (the
simulated cell's frames, both copies of every frame as a capture at the master holds them, with other
traffic mixed in), and the capture reads the other end. A user gets every EtherCAT frame once, with the
kernel's receive time, nothing else from that wire and nothing from any other interface; the source turns
it into the robot's cycles of signal messages; the daemon scores the cycles it saw.

Needs root: CAP_SYS_ADMIN and CAP_NET_ADMIN (a network namespace, veth pairs) and CAP_NET_RAW (AF_PACKET).
CI runs them as root; where that is missing they fail, naming what is missing, they do not skip."""

from __future__ import annotations

import asyncio
import itertools
import json
import secrets
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from daemons import Daemon
from services import poll, wait_until

from daemon.cli import main
from ingest.ethercat.frames import FrameDecoder
from ingest.ethercat.mapping import SignalExtractor, load_yaml_map
from ingest.ethercat.pcap import CaptureReader
from ingest.ethercat.source import EthercatSource, LiveCapture
from ingest.ethercat.types import RecordBatch
from ingest.messages import SignalBatch
from ingest.sim import ethercat as sim
from ingest.voraus.reader import VorausReader
from ingest.voraus.schema import MACHINE_SIGNALS

SIGNALS = list(MACHINE_SIGNALS)

# Runs inside the namespace: sends the frames of FRAMES.npz (buf, offsets, lengths, at_ns) on IFACE, frame
# i at at_ns[i] / SPEED after the first, and saves the wall-clock times around each send to STAMPS.npy.
SENDER = r"""
import socket, sys, time
import numpy as np
iface, frames_path, stamps_path, speed = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
with np.load(frames_path, allow_pickle=False) as d:
    buf, offsets, lengths, at_ns = d["buf"], d["offsets"], d["lengths"], d["at_ns"]
frames = [buf[o : o + n].tobytes() for o, n in zip(offsets.tolist(), lengths.tolist())]
due = (at_ns / speed).astype(np.int64).tolist()
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
s.bind((iface, 0))
stamps = np.zeros((len(frames), 2), dtype=np.int64)
t0 = time.perf_counter_ns()
for i, frame in enumerate(frames):
    lag = t0 + due[i] - time.perf_counter_ns()
    if lag > 0:
        time.sleep(lag / 1e9)  # pacing: the bus's own period
    before = time.time_ns()
    s.send(frame)
    stamps[i] = before, time.time_ns()
np.save(stamps_path, stamps, allow_pickle=False)
"""

# Runs inside the namespace: EtherCAT frames from another master on IFACE as fast as it can, "go" on stdout
# once the first one went out, until it is terminated.
FLOOD = r"""
import socket, sys
iface = sys.argv[1]
frame = bytes.fromhex("ffffffffffff" "020000000099" "88a4") + bytes.fromhex("1010") + bytes(46)
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
s.bind((iface, 0))
s.send(frame)
print("go", flush=True)
while True:
    s.send(frame)
"""


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10, check=False)


@dataclass
class Wire:
    """One veth pair: `capture` is the end in the test's own namespace, `peer` the end inside `netns`."""

    netns: str
    capture: str
    peer: str

    def send(
        self, tmp_path: Path, frames: list[bytes], at_ns: np.ndarray, *, speed: float = 1.0
    ) -> np.ndarray:
        """Put `frames` on the wire from the namespace's end, paced by `at_ns` (ns after the first) / speed;
        returns the (N, 2) wall-clock times just before and just after each send."""
        lengths = np.array([len(f) for f in frames], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        path = tmp_path / f"frames-{secrets.token_hex(3)}.npz"
        buf = np.frombuffer(b"".join(frames), dtype=np.uint8)
        np.savez(path, buf=buf, offsets=offsets, lengths=lengths, at_ns=np.asarray(at_ns, np.int64))
        stamps = path.with_suffix(".stamps.npy")
        argv = [sys.executable, "-c", SENDER, self.peer, str(path), str(stamps), str(speed)]
        budget = 15 + float(at_ns[-1]) / 1e9 / speed
        done = subprocess.run(
            ["ip", "netns", "exec", self.netns, *argv], capture_output=True, text=True, timeout=budget
        )
        assert done.returncode == 0, f"the sender failed: {done.stderr[-2000:]}"
        return np.load(stamps, allow_pickle=False)

    def flood(self) -> subprocess.Popen[str]:
        """Another master's EtherCAT traffic on this wire, flat out, until terminated."""
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.netns, sys.executable, "-c", FLOOD, self.peer],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "go":  # its first frame went out (or it died: EOF)
            proc.kill()
            _, err = proc.communicate()
            pytest.fail(f"the flood sender failed: {err[-2000:]}")
        return proc


@dataclass
class Netns:
    """A network namespace of the test's own, made at its first `wire()` (so that a machine where it cannot
    be made fails the test itself, with the reason), and its veth pairs."""

    name: str
    token: str
    made: bool = False
    wires: list[Wire] = field(default_factory=list)

    def _make(self) -> None:
        try:
            done = _ip("netns", "add", self.name)
        except FileNotFoundError:
            pytest.fail("the live capture tests need iproute2's `ip` (and root or CAP_NET_ADMIN)")
        if done.returncode != 0:
            pytest.fail(
                f"cannot make a network namespace (`ip netns add {self.name}`: {done.stderr.strip()}): "
                "the live capture tests need root (CAP_SYS_ADMIN and CAP_NET_ADMIN for the namespace and the "
                "veth pair, CAP_NET_RAW to capture); CI runs them as root"
            )
        self.made = True

    def wire(self) -> Wire:
        """A veth pair, one end moved into the namespace, both up (carrier polled)."""
        if not self.made:
            self._make()
        i = len(self.wires)
        w = Wire(self.name, f"cw{self.token}{i}c", f"cw{self.token}{i}p")
        self.wires.append(w)  # before it exists: the finalizer removes what was made of it
        for args in (
            ("link", "add", w.capture, "type", "veth", "peer", "name", w.peer),
            ("link", "set", w.peer, "netns", self.name),
            ("link", "set", w.capture, "up"),
            ("-n", self.name, "link", "set", w.peer, "up"),
        ):
            done = _ip(*args)
            assert done.returncode == 0, f"ip {' '.join(args)}: {done.stderr.strip()}"
        wait_until(lambda: _carrier(w.capture), 10, f"carrier on {w.capture}")
        return w

    def remove(self) -> None:
        if self.made:
            _ip("netns", "del", self.name)  # takes the peers with it; a veth pair goes with either end
        for w in self.wires:  # a pair whose peer never moved
            if Path(f"/sys/class/net/{w.capture}").exists():
                _ip("link", "del", w.capture)
        left = [w.capture for w in self.wires if Path(f"/sys/class/net/{w.capture}").exists()]
        assert not left, f"veth {left} left behind"
        assert not Path(f"/run/netns/{self.name}").exists(), f"network namespace {self.name} left behind"


def _carrier(interface: str) -> bool:
    try:
        return Path(f"/sys/class/net/{interface}/carrier").read_text().strip() == "1"
    except OSError:  # no carrier file to read while the link is down
        return False


@pytest.fixture
def netns() -> Iterator[Netns]:
    """A network namespace of this test's own (a unique name per run) for its veth pairs, removed with
    them at the end even when the test fails."""
    token = secrets.token_hex(4)
    ns = Netns(f"cwlive-{token}", token)
    try:
        yield ns
    finally:
        ns.remove()


# ---- frames -------------------------------------------------------------------------------------------

BUS = sim.layout(SIGNALS)


def raw_values(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, S) SI values of SIGNALS that the bus encodes exactly (integers of each variable's type x scale)."""
    out = np.zeros((n, len(SIGNALS)))
    for j, name in enumerate(SIGNALS):
        var = BUS.signal(name)
        info = np.iinfo(np.dtype(var.dtype))
        lo, hi = max(info.min, -(10**6)), min(info.max, 10**6)
        out[:, j] = rng.integers(lo, hi, n) * var.scale
    return out


def bus_frames(values: np.ndarray, counters: np.ndarray, *, sample_ms: int) -> tuple[list[bytes], np.ndarray]:
    """The frames of `values` (a row per `sample_ms`) on a 1 kHz bus, both copies of each: (frames, at_ns)."""
    images = sim.encode(BUS, SIGNALS, values, counters)
    period = sample_ms * 1_000_000
    ts, records = sim.frames(
        BUS, images, sample_start_ns=np.arange(len(values)) * period, sample_period_ns=period, bus_hz=1000
    )
    assert np.all(np.diff(ts) >= 0)
    return [r.tobytes() for r in records], ts - ts[0]


def other_traffic() -> list[bytes]:
    """Frames on the same wire that are not EtherCAT: the capture must never see them."""
    src = bytes.fromhex("0200000000aa")
    ecat = bytes.fromhex("1010") + bytes(46)  # an EtherCAT header and payload, under other EtherTypes
    # IPv4, UDP to port 0x88A4 (EtherCAT over UDP is not the EtherType the capture takes)
    ipv4_udp = bytes.fromhex("450000240000400040110000c0a80001c0a8000288a488a400100000") + bytes(8)
    return [
        b"\xff" * 6 + src + bytes.fromhex("0806") + bytes(46),  # ARP
        b"\xff" * 6 + src + bytes.fromhex("0800") + ipv4_udp,
        bytes.fromhex("0180c200000e") + src + bytes.fromhex("88cc") + bytes(46),  # LLDP
        b"\xff" * 6 + src + bytes.fromhex("88a5") + ecat,  # one off
        b"\xff" * 6 + src + bytes.fromhex("a488") + ecat,  # byte-swapped
        b"\xff" * 6 + src + bytes.fromhex("810000640800") + ipv4_udp,  # VLAN-tagged IPv4
        b"\xff" * 6 + src + bytes.fromhex("86dd") + bytes(46),  # IPv6
    ]


def mixed(frames: list[bytes], at_ns: np.ndarray, every: int) -> tuple[list[bytes], np.ndarray]:
    """`frames` with a frame of other traffic after every `every`-th, sent at the same time."""
    others = other_traffic()
    out: list[bytes] = []
    at: list[int] = []
    for i, (frame, t) in enumerate(zip(frames, at_ns.tolist(), strict=True)):
        out.append(frame)
        at.append(t)
        if i % every == every - 1:
            out.append(others[(i // every) % len(others)])
            at.append(t)
    return out, np.array(at, dtype=np.int64)


def is_ethercat(frame: bytes) -> bool:
    return frame[12:14] == b"\x88\xa4"


def write_map(tmp_path: Path) -> Path:
    path = tmp_path / "bus.map.yaml"
    path.write_text(sim.yaml_map(BUS))
    return path


# ---- the capture itself -------------------------------------------------------------------------------


class Collector:
    """`LiveCapture.batches()` on a thread of its own, as the source runs it."""

    def __init__(self, capture: LiveCapture) -> None:
        self.capture = capture
        self.batches: list[RecordBatch] = []
        self.error: Exception | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for batch in self.capture.batches():
                self.batches.append(batch)
        except Exception as err:  # noqa: BLE001 (shown by the test)
            self.error = err

    @property
    def frames(self) -> int:
        return sum(len(b.ts_ns) for b in self.batches)

    def stop(self) -> None:
        self.capture.stop()
        self.thread.join(timeout=10)
        assert not self.thread.is_alive(), "the capture did not stop"
        assert self.error is None, f"the capture failed: {self.error!r}"


def test_live_capture_takes_every_ethercat_frame_once_with_its_kernel_time_and_nothing_else(
    netns: Netns, tmp_path: Path
) -> None:
    """What a user gets off the wire: each EtherCAT frame once, byte for byte, in order, stamped by the kernel
    when it arrived (within the sender's send call); ARP, IP, LLDP, VLAN and look-alike EtherTypes on the
    same wire are filtered in the kernel, and a busy EtherCAT bus on another interface is never seen, not
    even while the capture opens. Its frames decode to the very process data that was sent."""
    wire, other = netns.wire(), netns.wire()
    rng = np.random.default_rng(12)
    n = 400  # samples of 1 ms: 400 bus cycles at 1 kHz, 800 frames with both copies
    values = raw_values(rng, n)
    counters = np.repeat(np.arange(100, 104), n // 4)
    ecat, at_ns = bus_frames(values, counters, sample_ms=1)
    sent, sent_at = mixed(ecat, at_ns, every=20)
    assert len(sent) - len(ecat) == 40

    flood = other.flood()  # another master's bus, flat out, while the capture opens
    try:
        capture = LiveCapture(wire.capture)
    finally:
        flood.terminate()
        flood.communicate(timeout=10)
    collector = Collector(capture)
    try:
        stamps = wire.send(tmp_path, sent, sent_at)
        wait_until(lambda: collector.frames >= len(ecat), 30, f"{len(ecat)} frames captured")
    finally:
        collector.stop()

    assert capture.counts["kernel_drops"] == 0, "the kernel dropped frames: the receive buffer ran full"
    got = [
        bytes(b.buf[o : o + k]) for b in collector.batches for o, k in zip(b.offsets, b.lengths, strict=True)
    ]
    strangers = [
        f[6:12].hex() for f in got if f[6:12] not in (sim.MASTER_MAC, bytes([0x02]) + sim.MASTER_MAC[1:])
    ]
    assert not strangers, f"{len(strangers)} frames not from this wire's master, e.g. from {strangers[0]}"
    assert len(got) == len(ecat), f"sent {len(ecat)} EtherCAT frames, captured {len(got)}"
    assert got == ecat, "the frames captured are not the frames sent, in order, byte for byte"
    assert capture.counts["frames"] == len(ecat)

    # kernel receive times: in order, and inside (or just after) the send call of the frame
    rx = np.concatenate([b.ts_ns for b in collector.batches])
    keep = np.array([is_ethercat(f) for f in sent])
    before, after = stamps[keep, 0], stamps[keep, 1]
    assert np.all(np.diff(rx) >= 0), "capture times went back"
    late = rx - after
    assert np.all(rx >= before), f"a frame stamped before it was sent, by {(before - rx).max()} ns"
    assert late.max() < 50_000_000, f"a frame stamped {late.max() / 1e6:.1f} ms after its send returned"
    # the sender's pace survives: spacing of the returned copies as sent, to the scheduling noise
    assert abs((rx[-1] - rx[0]) - (before[-1] - before[0])) < 50_000_000

    # decoded: one row per bus cycle (the returned copies), the process data that was sent, at its time
    pmap = load_yaml_map(write_map(tmp_path))
    decoder, extractor = FrameDecoder(dict(pmap.expected_wkc.items())), SignalExtractor(pmap)
    parts = [extractor.extract(decoder.decode(b)) for b in collector.batches]
    ts = np.concatenate([p.ts_ns for p in parts])
    rows = np.concatenate([p.values for p in parts])
    assert decoder.counts["frames"] == n
    assert decoder.counts["outgoing_copy"] == n
    assert not np.concatenate([p.stale for p in parts]).any()
    np.testing.assert_array_equal(ts, rx[1::2])  # the returned copy of each bus cycle
    names = list(pmap.names)
    got_values = rows[:, [names.index(s) for s in SIGNALS]]
    np.testing.assert_allclose(got_values, values, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(rows[:, names.index(sim.CYCLE_SIGNAL)], counters)


def test_frames_the_kernel_had_to_drop_are_counted(netns: Netns, tmp_path: Path) -> None:
    """A capture that falls behind the bus (here: not read at all while a burst far beyond its receive buffer
    goes by) loses frames in the kernel; a user sees how many (`counts["kernel_drops"]`, logged), and every
    frame is either captured or counted as dropped."""
    wire = netns.wire()
    frame = bytes.fromhex("ffffffffffff000105aabbcc88a41010") + bytes(46)
    n = 40_000
    capture = LiveCapture(wire.capture)
    try:
        wire.send(tmp_path, [frame] * n, np.zeros(n, dtype=np.int64))  # flat out, nobody reading
    except BaseException:
        capture.close()
        raise
    collector = Collector(capture)
    try:
        wait_until(
            lambda: capture.counts["frames"] + capture.counts["kernel_drops"] >= n, 10, "all frames accounted"
        )
    finally:
        collector.stop()
    assert capture.counts["kernel_drops"] > 0, f"{n} frames fit the receive buffer: make the burst longer"
    assert capture.counts["frames"] + capture.counts["kernel_drops"] == n
    assert collector.frames == capture.counts["frames"]


# ---- the source ---------------------------------------------------------------------------------------


def test_the_source_turns_the_live_bus_into_cycles_of_signal_messages(netns: Netns, tmp_path: Path) -> None:
    """What the daemon gets from `type: ethercat, interface: ...`: the robot's cycles in order as signal
    messages on the model's grid (100 Hz here) by capture time, each cycle ended by the next one's first bus
    cycle, holding the values the bus carried; every frame counted once (the outgoing copies skipped), none
    stale, none rejected. The last cycle, whose end the bus never showed, goes out unfinished at the stop."""
    wire = netns.wire()
    rng = np.random.default_rng(5)
    cycles, per_cycle = [40, 41, 42, 43, 44], 12  # 12 samples of 10 ms each, every sample 10 bus cycles
    levels = raw_values(rng, len(cycles))  # the values of each cycle, held through it
    values = np.repeat(levels, per_cycle, axis=0)
    frames, at_ns = bus_frames(values, np.repeat(cycles, per_cycle), sample_ms=10)
    bus_cycles = len(frames) // 2
    source = EthercatSource(
        robot="r1", map_path=write_map(tmp_path), signals=SIGNALS, rate_hz=100, interface=wire.capture
    )
    messages: list[SignalBatch] = []
    stamps: np.ndarray | None = None

    def counted(name: str, **labels: str) -> float:
        return sum(
            v for m, _, lab, v in source.metric_samples() if m == name and labels.items() <= lab.items()
        )

    async def run() -> None:
        nonlocal stamps
        await source.start()

        async def consume() -> None:
            async for delivery in source.deliveries():
                assert isinstance(delivery.item, SignalBatch)
                messages.append(delivery.item)

        consumer = asyncio.create_task(consume())
        try:
            stamps = await asyncio.to_thread(wire.send, tmp_path, frames, at_ns)
            await poll(  # every frame decoded, the next-to-last cycle ended
                lambda: (
                    counted("cellwatch_ethercat_bus_cycles_total") >= bus_cycles
                    and any(m.cycle == cycles[-2] and m.cycle_end for m in messages)
                ),
                10,
            )
        finally:
            await source.aclose()
            await asyncio.wait_for(consumer, 10)

    asyncio.run(run())
    assert stamps is not None

    assert counted("cellwatch_ethercat_frames_total") == bus_cycles
    assert counted("cellwatch_ethercat_skipped_total", what="outgoing_copy") == bus_cycles
    assert counted("cellwatch_ethercat_bus_cycles_total") == bus_cycles
    assert counted("cellwatch_ethercat_stale_total") == 0
    assert source.rejections == {}
    assert source.chain.resampler.stats.backwards == 0

    # the cycles in order, each in consecutive messages; all but the last ended
    order = [m.cycle for m in messages]
    assert [c for i, c in enumerate(order) if i == 0 or c != order[i - 1]] == cycles
    ends = [m.cycle for m in messages if m.cycle_end]
    assert ends == cycles[:-1], f"cycle ends {ends}"
    assert all(m.robot == "r1" and m.period_ns == 10_000_000 for m in messages)

    # on the grid by capture time: in order, inside the time the frames were on the wire
    for a, b in itertools.pairwise(messages):
        assert b.time_ns >= a.time_ns + len(a.signals) * a.period_ns
    first, last = int(stamps[0, 0]), int(stamps[-1, 1])
    assert first - 10_000_000 < messages[0].time_ns <= first + 1_000_000  # the first frame's grid sample
    end = messages[-1].time_ns + len(messages[-1].signals) * 10_000_000
    assert first < end <= last + 10_000_000

    # each grid sample holds what the bus carried: its cycle's values, or (the last sample of a cycle, where
    # the next cycle began inside it) a mean of the two: fraction a of this cycle's bus cycles, the same for
    # every signal
    for k, cycle in enumerate(cycles):
        rows = np.concatenate([m.signals for m in messages if m.cycle == cycle]).astype(np.float64)
        assert 4 <= len(rows) <= 3 * per_cycle, f"cycle {cycle}: {len(rows)} rows"
        mine = levels[k]
        pure = np.all(np.isclose(rows, mine, rtol=1e-6, atol=1e-6), axis=1)
        assert pure[:-1].all(), f"cycle {cycle}: rows {np.flatnonzero(~pure[:-1])} are not its values"
        if not pure[-1]:
            assert k + 1 < len(cycles), f"the last cycle's last row is not its values: {rows[-1]}"
            nxt = levels[k + 1]
            apart = np.abs(mine - nxt) > 1e-3 * np.maximum(np.abs(mine), 1)
            share = (rows[-1, apart] - nxt[apart]) / (mine[apart] - nxt[apart])
            assert share.min() > 0, share
            assert share.max() <= 1, share
            assert np.ptp(share) < 1e-4, share


# ---- the daemon ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[int]]:
    """3 cycles of the simulated cell and their bus capture (200 Hz, both copies): (capture, map, cycles)."""
    root = tmp_path_factory.mktemp("live-bus")
    argv = ["synth", "--out", str(root / "cell.parquet"), "--cycles", "3", "--seed", "6"]
    assert main([*argv, "--pcap", str(root / "bus.pcapng"), "--bus-hz", "200"]) == 0
    reader = VorausReader(root / "cell.parquet", SIGNALS)
    try:
        ids = [c.sample for c in reader.cycles()]
    finally:
        reader.close()
    return root / "bus.pcapng", root / "bus.map.yaml", ids


def test_the_daemon_scores_the_cycles_it_saw_on_a_live_bus(
    netns: Netns,
    recording: tuple[Path, Path, list[int]],
    tiny_cell_and_model: tuple[Path, Path],
    tmp_path: Path,
) -> None:
    """`cellwatch run` with a `type: ethercat, interface: ...` source: the simulated cell's bus (3 cycles,
    both copies of each frame, sent at 10x its pace) scored as it arrives: one anomaly_score point per cycle
    the bus showed whole (all but the last, whose end never came), and its metrics count every frame."""
    capture, map_path, ids = recording
    _, model = tiny_cell_and_model
    wire = netns.wire()
    batches = list(CaptureReader(capture).batches())
    frames = [bytes(b.buf[o : o + k]) for b in batches for o, k in zip(b.offsets, b.lengths, strict=True)]
    ts = np.concatenate([b.ts_ns for b in batches])
    out = tmp_path / "scores.jsonl"
    config: dict[str, Any] = {
        "sources": [{"type": "ethercat", "robot": "r1", "interface": wire.capture, "map": str(map_path)}],
        "model": {"path": str(model)},
        "scoring": {"batch": 8, "max_wait_ms": 5, "device": "cpu"},
        "sinks": {"file": {"path": str(out)}},
    }
    daemon = Daemon(tmp_path, "live", config)
    try:
        daemon.start()  # ready: the capture is open (sources start before the metrics endpoint)
        wire.send(tmp_path, frames, ts - ts[0], speed=10)

        def scored() -> list[int]:
            if not out.exists():
                return []
            lines = [json.loads(x) for x in out.read_text().splitlines()]
            return [x["cycle"] for x in lines if x["measurement"] == "anomaly_score"]

        label = {"source": "ethercat:r1"}
        wait_until(
            lambda: (
                daemon.metric("cellwatch_ethercat_frames_total", **label)
                + daemon.metric("cellwatch_ethercat_skipped_total", what="outgoing_copy", **label)
                >= len(frames)
                or not daemon.alive
            ),
            60,
            "every frame counted",
        )
        wait_until(lambda: len(scored()) >= len(ids) - 1 or not daemon.alive, 60, "the cycles scored")
        assert daemon.alive, daemon.log_tail()
        assert daemon.metric("cellwatch_ethercat_frames_total", **label) == len(frames) // 2
        assert (
            daemon.metric("cellwatch_ethercat_skipped_total", what="outgoing_copy", **label)
            == len(frames) // 2
        )
        assert daemon.metric("cellwatch_ethercat_stale_total", **label) == 0
        assert daemon.stop() == 0, daemon.log_tail()
    finally:
        daemon.kill()
    assert sorted(scored()) == sorted(ids[:-1]), daemon.log_tail()
