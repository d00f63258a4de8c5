"""`cellwatch capture decode`: a bus capture as one row per bus cycle of named SI signals (Parquet or CSV)
and a summary of what the capture held, on captures written by `cellwatch synth --pcap` (the simulated
cell's bus) and by the capture writer with crafted frames (both copies, a stale working counter, mailbox
traffic, a truncated record, an unknown command, a lost bus cycle, a file cut off)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from daemon.cli import main
from ingest.ethercat.pcap import CaptureReader, CaptureWriter
from ingest.sim.ethercat import CYCLE_SIGNAL, layout
from ingest.voraus.reader import VorausReader
from ingest.voraus.schema import MACHINE_SIGNALS

BUS_HZ = 200
RATE_HZ = 100
T0 = 1_767_225_600_000_000_000
MAC = bytes.fromhex("000105aabbcc")


def decode(*argv: str) -> int:
    return main(["capture", "decode", *argv])


@pytest.fixture(scope="module")
def cell(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cell")
    argv = ["synth", "--out", str(root / "X.parquet"), "--cycles", "4", "--seed", "2"]
    assert main([*argv, "--pcap", str(root / "X.pcapng"), "--bus-hz", str(BUS_HZ)]) == 0
    return root


def recording(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The recording's signals (rows, MACHINE_SIGNALS) and each row's cycle, in file order."""
    with VorausReader(path, list(MACHINE_SIGNALS)) as reader:
        cycles = list(reader.cycles())
    values = np.concatenate([c.signals for c in cycles]).astype(np.float64)
    samples = np.concatenate([np.full(len(c.signals), c.sample) for c in cycles])
    return values, samples


def returned_times(path: Path) -> np.ndarray:
    """Capture times of the frames that came back from the ring (bit 1 of the first source-MAC byte)."""
    out = []
    for batch in CaptureReader(path).batches():
        returned = batch.buf[batch.offsets + 6] & 0x02 != 0
        out.append(batch.ts_ns[returned])
    return np.concatenate(out)


def check_rows(columns: dict[str, np.ndarray], cell: Path) -> None:
    values, samples = recording(cell / "X.parquet")
    hold = BUS_HZ // RATE_HZ
    names = list(MACHINE_SIGNALS)
    bus = layout(names)
    assert list(columns) == ["time_ns", *(v.name for v in bus.variables), "stale"]  # the map's order
    assert columns["time_ns"].dtype == np.int64
    np.testing.assert_array_equal(columns["time_ns"], returned_times(cell / "X.pcapng"))
    assert len(columns["time_ns"]) == hold * len(values)
    for j, name in enumerate(names):
        expected = np.repeat(values[:, j], hold)
        resolution = bus.signal(name).scale / 2  # the encoding rounds to the nearest step
        got = columns[name]
        assert got.dtype == np.float64
        assert np.all(np.abs(got - expected) <= resolution * (1 + 1e-9) + 1e-12 * np.abs(expected)), name
    np.testing.assert_array_equal(columns[CYCLE_SIGNAL], np.repeat(samples, hold).astype(np.float64))
    assert not columns["stale"].any()


@pytest.mark.parametrize("map_name", ["X.map.yaml", "X.eni-map.yaml"])
def test_parquet_rows_are_the_recordings_signals_per_bus_cycle(
    cell: Path, map_name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A user gets one Parquet row per bus cycle: the capture time, then every signal of the map in SI
    units (each 100 Hz sample of the recording held for its two 200 Hz bus cycles, to the encoding's
    resolution), the cycle counter and the stale flag; the summary table says where the rows went."""
    out = tmp_path / "bus.parquet"
    assert decode(str(cell / "X.pcapng"), "--map", str(cell / map_name), "--out", str(out)) == 0
    table = pq.read_table(out)
    check_rows({name: table[name].to_numpy() for name in table.column_names}, cell)
    assert [p.name for p in tmp_path.iterdir()] == ["bus.parquet"]  # no partial file left behind
    printed = capsys.readouterr().out
    assert "bus cycles" in printed
    assert str(out) in printed


def test_csv_rows_are_the_same_and_the_suffix_picks_the_format(cell: Path, tmp_path: Path) -> None:
    """A user who names a .csv file gets the same rows as text with a header line."""
    out = tmp_path / "bus.csv"
    assert decode(str(cell / "X.pcapng"), "--map", str(cell / "X.map.yaml"), "--out", str(out)) == 0
    assert out.read_text().splitlines()[0].startswith('"time_ns","target_position_1"')
    table = pacsv.read_csv(out)
    check_rows({name: table[name].to_numpy() for name in table.column_names}, cell)


def test_json_summary_of_the_synthetic_capture(cell: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A user gets one JSON object on stdout: every frame once (outgoing copies dropped), datagrams by
    command, bus cycles, the measured bus period, no losses, nothing rejected."""
    values, _ = recording(cell / "X.parquet")
    cycles = len(values) * BUS_HZ // RATE_HZ
    assert decode(str(cell / "X.pcapng"), "--map", str(cell / "X.eni.xml"), "--json") == 0
    s = json.loads(capsys.readouterr().out)
    assert s["records"] == 2 * cycles
    assert s["frames"] == s["bus_cycles"] == s["outgoing_copies"] == cycles
    assert s["datagrams"] == {"ARMW": cycles, "LRW": cycles}
    assert (s["stale"], s["lost"], s["gaps"], s["mailbox"], s["rejections"]) == (0, 0, 0, 0, {})
    assert s["signals"] == len(MACHINE_SIGNALS) + 1
    assert s["map_skipped"] == 0
    assert abs(s["bus_period_ns"] - 1e9 / BUS_HZ) < 50_000  # the simulated bus jitters by 20 us
    assert 0 < s["jitter_ns"] < 100_000
    assert s["out"] is None


def test_without_out_the_first_bus_cycles_are_shown(cell: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A user who only looks gets the summary and the first bus cycles as a table."""
    assert decode(str(cell / "X.pcapng"), "--map", str(cell / "X.map.yaml")) == 0
    printed = capsys.readouterr().out
    assert "the first 5 bus cycles" in printed
    assert "200 Hz" in printed
    assert str(returned_times(cell / "X.pcapng")[0]) in printed


# ---------------------------------------------------------------------------------------- crafted

CRAFTED_MAP = """\
signals:
  - {name: position, address: 0x1000, type: int16, scale: 0.01}
  - {name: counter, address: 0x1002, type: uint16}
  - {name: flag, address: 0x1004, type: bool, bit: 3}
"""


def datagram(command: int, address: int, data: bytes, wkc: int, *, more: bool) -> bytes:
    length = len(data) | (0x8000 if more else 0)
    return struct.pack("<BBIHH", command, 0, address, length, 0) + data + struct.pack("<H", wkc)


def ethercat(datagrams: list[bytes], *, returned: bool) -> bytes:
    payload = b"".join(datagrams)
    src = bytes([MAC[0] | (0x02 if returned else 0)]) + MAC[1:]
    frame = b"\xff" * 6 + src + b"\x88\xa4" + struct.pack("<H", len(payload) | 0x1000) + payload
    return frame + bytes(max(0, 60 - len(frame)))  # Ethernet's minimum frame


def cycle_frame(k: int, *, returned: bool, wkc: int = 3) -> bytes:
    data = struct.pack("<hHBx", 100 * k - 500, k, 0x08 if k % 2 else 0)
    if not returned:
        data, wkc = bytes(6), 0  # the outgoing copy: inputs not filled in yet
    armw = datagram(13, 0x0910 << 16, struct.pack("<Q", k * 1000), 3 if returned else 0, more=False)
    return ethercat([datagram(10, 0x1000, data, wkc, more=True), armw], returned=returned)


def startup_frame() -> bytes:
    """A broadcast read of the AL status register, as a master sends them while it brings the bus up."""
    return ethercat([datagram(7, 0x0130 << 16, bytes(2), 7, more=False)], returned=True)


def write_crafted(root: Path, *, startup: int = 0) -> tuple[Path, Path]:
    """20 bus cycles at 1 kHz captured at the master (both copies): cycle 7 lost, cycle 12 returns a short
    WKC, the outgoing copy of cycle 9 truncated by the snap length, one mailbox frame, one frame with an
    unknown command, and the file cut off inside a block; `startup` register reads before the first."""
    stamps: list[int] = [T0 - 1_000_000 + 1000 * i for i in range(startup)]
    frames: list[bytes] = [startup_frame()] * startup
    wire: list[int] = [len(f) for f in frames]
    for k in range(20):
        if k == 7:
            continue
        t = T0 + k * 1_000_000 + (10_000 if k == 3 else 0)
        outgoing = cycle_frame(k, returned=False)
        stamps += [t, t + 20_000]
        frames += [
            outgoing[:30] if k == 9 else outgoing,
            cycle_frame(k, returned=True, wkc=2 if k == 12 else 3),
        ]
        wire += [len(outgoing), len(frames[-1])]
    mailbox = ethercat([datagram(4, 0x1001 | 0x1800 << 16, bytes(16), 1, more=False)], returned=True)
    unknown = ethercat([datagram(0x20, 0x1000, bytes(4), 1, more=False)], returned=True)
    for t, odd in ((T0 + 7_500_000, mailbox), (T0 + 7_600_000, unknown)):
        stamps.append(t)
        frames.append(odd)
        wire.append(len(odd))
    capture = root / "crafted.pcapng"
    with CaptureWriter(capture) as writer:
        writer.write(stamps, frames, np.array(wire))
    with capture.open("ab") as f:
        f.write(struct.pack("<II", 6, 64) + bytes(4))  # an enhanced packet block the file ends inside
    bus_map = root / "crafted.map.yaml"
    bus_map.write_text(CRAFTED_MAP)
    return capture, bus_map


@pytest.fixture
def crafted(tmp_path: Path) -> tuple[Path, Path]:
    return write_crafted(tmp_path)


@pytest.mark.parametrize("chunk", [None, 3])
def test_json_counts_of_a_crafted_capture_are_exact(
    crafted: tuple[Path, Path],
    chunk: int | None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A user gets exact counts of what went wrong on the bus and in the file: each frame once, the
    outgoing copies dropped, the stale bus cycle, the mailbox frame skipped, the lost bus cycle in one gap,
    the measured period and jitter, and each rejected record by reason (reader and decoder); the same
    however the capture is cut into chunks."""
    from daemon.commands import capture as command

    if chunk is not None:
        monkeypatch.setattr(command, "CHUNK_RECORDS", chunk)
    capture, bus_map = crafted
    out = tmp_path / "rows.csv"
    assert decode(str(capture), "--map", str(bus_map), "--json", "--out", str(out)) == 0
    s = json.loads(capsys.readouterr().out)
    expected = {
        "format": "pcapng",
        "signals": 3,
        "map_skipped": 0,
        "records": 2 * 19 + 2,
        "frames": 19 + 1,  # the returned copies and the mailbox frame
        "datagrams": {"ARMW": 19, "FPRD": 1, "LRD": 19},
        "outgoing_copies": 18,  # the truncated one was rejected before
        "mailbox": 1,
        "not_ethercat": 0,
        "bus_cycles": 19,
        "stale": 1,
        "stale_datagrams": 1,
        "lost": 1,
        "gaps": 1,
        "backwards": 0,
        "bus_period_ns": 1_000_000.0,
        "jitter_ns": 10_000.0,
        "first_ns": T0 + 20_000,
        "last_ns": T0 + 19_000_000 + 20_000,
        "rejections": {"truncated": 1, "truncated_file": 1, "unknown_command": 1},
        "out": str(out),
    }
    assert {k: s[k] for k in expected} == expected
    table = pacsv.read_csv(out)
    ks = np.array([k for k in range(20) if k != 7])
    np.testing.assert_array_equal(
        table["time_ns"].to_numpy(), T0 + ks * 1_000_000 + (ks == 3) * 10_000 + 20_000
    )
    np.testing.assert_allclose(table["position"].to_numpy(), (100 * ks - 500) * 0.01, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(table["counter"].to_numpy(), ks.astype(np.float64))
    np.testing.assert_array_equal(table["flag"].to_numpy(), (ks % 2).astype(np.float64))
    np.testing.assert_array_equal(table["stale"].to_numpy(), ks == 12)


def test_the_readable_summary_of_a_crafted_capture(
    crafted: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --json a user reads the same summary as a table."""
    capture, bus_map = crafted
    assert decode(str(capture), "--map", str(bus_map)) == 0
    printed = capsys.readouterr().out
    for text in (
        "1 in 1 gaps",
        "19, 1 stale",
        "outgoing copies 18",
        "mailbox 1",
        "unknown_command 1",
        "10.0 µs",
    ):
        assert text in printed, text


# ------------------------------------------------------------------------------------------ errors


def fails(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert decode(*argv) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert not captured.out
    return captured.err


def test_errors_are_one_line_with_the_reason(
    crafted: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A user who points it at the wrong file, a broken map or a map of another bus gets exit status 2
    and the reason on one line, and no output file."""
    capture, bus_map = crafted
    out = tmp_path / "rows.parquet"
    text = tmp_path / "notes.txt"
    text.write_text("not a capture\n")
    assert "not a pcap or pcapng capture" in fails(capsys, str(text), "--map", str(bus_map))
    assert "cannot be opened" in fails(capsys, str(tmp_path / "missing.pcap"), "--map", str(bus_map))

    assert "cannot be read" in fails(capsys, str(capture), "--map", str(tmp_path / "missing.yaml"))

    bad = tmp_path / "bad.yaml"
    bad.write_text(CRAFTED_MAP.replace("uint16", "uint17"))
    err = fails(capsys, str(capture), "--map", str(bad), "--out", str(out))
    assert "(counter)" in err
    assert "type" in err
    assert "uint17" in err

    other = tmp_path / "other.yaml"
    other.write_text(CRAFTED_MAP + "  - {name: far_away, address: 0x9000, type: int32}\n")
    err = fails(capsys, str(capture), "--map", str(other), "--out", str(out))
    assert "does not carry the map's signals" in err
    assert "'far_away'" in err
    assert "LRD@0x00001000" in err

    clash = tmp_path / "clash.yaml"
    clash.write_text(CRAFTED_MAP.replace("name: flag", "name: stale"))
    assert "'stale'" in fails(capsys, str(capture), "--map", str(clash))

    assert "name it .parquet" in fails(
        capsys, str(capture), "--map", str(bus_map), "--out", str(tmp_path / "x.txt")
    )
    assert "cannot be written" in fails(
        capsys, str(capture), "--map", str(bus_map), "--out", str(tmp_path / "no" / "dir" / "x.csv")
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["crafted.pcapng", "crafted.map.yaml", "notes.txt", "bad.yaml", "other.yaml", "clash.yaml"]
    )


def test_a_capture_without_process_data_cannot_carry_the_map(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A user who decodes a capture of start-up mailbox traffic (or an empty one) is told why there are
    no rows."""
    bus_map = tmp_path / "m.yaml"
    bus_map.write_text(CRAFTED_MAP)
    capture = tmp_path / "mailbox.pcap"
    mailbox = ethercat([datagram(4, 0x1001 | 0x1800 << 16, bytes(16), 1, more=False)], returned=True)
    with CaptureWriter(capture, format="pcap") as writer:
        writer.write([T0, T0 + 1000], [mailbox, mailbox])
    err = fails(capsys, str(capture), "--map", str(bus_map), "--out", str(tmp_path / "o.parquet"))
    assert "none of its 2 records carries process data" in err
    assert "mailbox 2" in err
    empty = tmp_path / "empty.pcapng"
    CaptureWriter(empty).close()
    assert "it holds no records" in fails(capsys, str(empty), "--map", str(bus_map))
    assert not (tmp_path / "o.parquet").exists()


def test_a_long_capture_shows_progress_on_stderr_and_stdout_stays_json(
    cell: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A user decoding a long capture sees a progress bar on stderr while --json output stays parseable."""
    from daemon.commands import capture

    monkeypatch.setattr(capture, "PROGRESS_BYTES", 1)  # every capture is long
    assert decode(str(cell / "X.pcapng"), "--map", str(cell / "X.map.yaml"), "--json") == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["bus_cycles"] > 0
    assert "decoding X.pcapng" in captured.err


def test_start_up_register_traffic_before_the_process_data_is_no_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A user whose capture starts while the master brings the bus up (register reads, whole chunks of
    them before the first process data) gets the bus cycles that follow; a capture of start-up traffic
    alone names the signals it lacks."""
    from daemon.commands import capture as command

    monkeypatch.setattr(command, "CHUNK_RECORDS", 4)
    capture, bus_map = write_crafted(tmp_path, startup=10)
    assert decode(str(capture), "--map", str(bus_map), "--json") == 0
    s = json.loads(capsys.readouterr().out)
    assert (s["bus_cycles"], s["datagrams"]["BRD"], s["frames"]) == (19, 10, 30)
    only = tmp_path / "startup.pcapng"
    with CaptureWriter(only) as writer:
        writer.write([T0 + 1000 * i for i in range(10)], [startup_frame()] * 10)
    err = fails(capsys, str(only), "--map", str(bus_map))
    assert "'position': no datagram holds LRD/LWR/LRW logical 0x00001000..0x00001001" in err
