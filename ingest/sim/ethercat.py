"""The simulated cell as an EtherCAT capture: the bus between the robot controller and its six drives.

A realistic process image: per axis the voraus signals as the drives and the controller exchange them
(targets in the controller's outputs, RxPDO; measured values in the drives' inputs, TxPDO), at integer
encodings with fixed scales a drive vendor would choose (positions int32 at 0.1 µrad, currents int16 at
1 mA, voltages uint16 at 1 mV, ...), plus a PLC input that counts the robot's process cycles (the voraus
`sample`, which the daemon uses to cut cycles). One cyclic frame per bus cycle: an LRW of the whole
image (outputs first, then inputs) and an ARMW of the reference clock's system time (distributed clocks),
captured at the master, so each frame is there twice: the outgoing copy (working counter 0) and the copy
that returns from the ring (the first slave flips bit 1 of the first source-MAC byte; WKC = 3 per slave).

The samples of the recording (100 Hz) are held for `bus_hz / rate` bus cycles each; bus cycle k of a
sample is captured at the sample's start + (k + 0.5) bus periods, with a small jitter, so that the
capture's frames of one sample lie inside that sample's period and an average per model period gives
the sample back (to the encoding's resolution).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final
from xml.sax.saxutils import quoteattr

import numpy as np

LRW_ADDRESS: Final = 0x0001_0000
N_SLAVES: Final = 7  # six drives and the controller's I/O terminal
CYCLE_SIGNAL: Final = "plc_cycle_counter"
MASTER_MAC: Final = bytes.fromhex("000105aabbcc")
ETH_HEADER: Final = 14
ECAT_HEADER: Final = 2
DATAGRAM_HEADER: Final = 10

# stem -> (numpy dtype, ENI data type, scale, direction); outputs are what the controller sends
_ENCODINGS: Final[dict[str, tuple[str, str, float, str]]] = {
    "target_position": ("<i4", "DINT", 1e-7, "out"),
    "target_velocity": ("<i4", "DINT", 1e-6, "out"),
    "target_acceleration": ("<i4", "DINT", 1e-6, "out"),
    "target_torque": ("<i4", "DINT", 1e-6, "out"),
    "computed_inertia": ("<i4", "DINT", 1e-7, "out"),
    "computed_torque": ("<i4", "DINT", 1e-6, "out"),
    "motor_position": ("<i4", "DINT", 1e-7, "in"),
    "motor_velocity": ("<i4", "DINT", 1e-6, "in"),
    "joint_position": ("<i4", "DINT", 1e-7, "in"),
    "joint_velocity": ("<i4", "DINT", 1e-6, "in"),
    "motor_torque": ("<i4", "DINT", 1e-3, "in"),
    "torque_sensor_a": ("<i4", "DINT", 1e-3, "in"),
    "torque_sensor_b": ("<i4", "DINT", 1e-3, "in"),
    "motor_iq": ("<i2", "INT", 1e-3, "in"),
    "motor_id": ("<i2", "INT", 1e-3, "in"),
    "power_motor_el": ("<i4", "DINT", 1e-3, "in"),
    "power_motor_mech": ("<i4", "DINT", 1e-3, "in"),
    "power_load_mech": ("<i4", "DINT", 1e-3, "in"),
    "motor_voltage": ("<i4", "DINT", 1e-3, "in"),
    "supply_voltage": ("<u2", "UINT", 1e-3, "in"),
    "brake_voltage": ("<u2", "UINT", 1e-3, "in"),
    "robot_voltage": ("<u2", "UINT", 1e-3, "in"),
    "robot_current": ("<i2", "INT", 1e-3, "in"),
    "io_current": ("<i2", "INT", 1e-3, "in"),
    "system_current": ("<i2", "INT", 1e-3, "in"),
}


@dataclass(frozen=True)
class BusVariable:
    name: str  # the signal name (voraus layout), or CYCLE_SIGNAL
    variable: str  # the ENI variable name, e.g. "Drive 3.Inputs.Motor position"
    dtype: str  # numpy dtype, little-endian
    eni_type: str
    scale: float
    direction: str  # "out" (controller -> drives) or "in"
    byte: int  # offset in the LRW datagram's data


@dataclass(frozen=True)
class BusLayout:
    variables: tuple[BusVariable, ...]
    out_bytes: int
    in_bytes: int

    @property
    def data_bytes(self) -> int:
        return self.out_bytes + self.in_bytes

    @property
    def frame_bytes(self) -> int:
        return ETH_HEADER + ECAT_HEADER + 2 * DATAGRAM_HEADER + self.data_bytes + 2 + 8 + 2

    def signal(self, name: str) -> BusVariable:
        return next(v for v in self.variables if v.name == name)


def _stem_and_owner(name: str) -> tuple[str, str]:
    stem, _, axis = name.rpartition("_")
    if axis.isdigit():
        return stem, f"Drive {axis}"
    return name, "Controller IO"


def layout(signals: Sequence[str]) -> BusLayout:
    """The process image of `signals` (voraus names) plus the cycle counter: outputs, then inputs."""
    entries: list[tuple[str, str, str, str, float, str]] = []
    for name in signals:
        stem, owner = _stem_and_owner(name)
        if stem not in _ENCODINGS:
            raise ValueError(f"no bus encoding for signal {name!r}")
        dtype, eni_type, scale, direction = _ENCODINGS[stem]
        kind = "Outputs" if direction == "out" else "Inputs"
        entries.append(
            (name, f"{owner}.{kind}.{stem.replace('_', ' ').capitalize()}", dtype, eni_type, scale, direction)
        )
    entries.append((CYCLE_SIGNAL, "Controller IO.Inputs.Cycle counter", "<u4", "UDINT", 1.0, "in"))
    variables: list[BusVariable] = []
    offsets = {"out": 0, "in": 0}
    for direction in ("out", "in"):
        for name, variable, dtype, eni_type, scale, d in entries:
            if d != direction:
                continue
            variables.append(BusVariable(name, variable, dtype, eni_type, scale, d, offsets[d]))
            offsets[d] += np.dtype(dtype).itemsize
    out_bytes = offsets["out"]
    shifted = tuple(
        v
        if v.direction == "out"
        else BusVariable(v.name, v.variable, v.dtype, v.eni_type, v.scale, v.direction, v.byte + out_bytes)
        for v in variables
    )
    return BusLayout(shifted, out_bytes, offsets["in"])


def encode(layout_: BusLayout, names: Sequence[str], values: np.ndarray, cycles: np.ndarray) -> np.ndarray:
    """Process images (T, data_bytes) uint8 of T samples: `values` (T, len(names)) in SI units."""
    t = len(values)
    image = np.zeros((t, layout_.data_bytes), dtype=np.uint8)
    column = {n: i for i, n in enumerate(names)}
    for var in layout_.variables:
        dtype = np.dtype(var.dtype)
        if var.name == CYCLE_SIGNAL:
            raw = np.asarray(cycles, dtype=np.int64)
        else:
            raw = np.rint(values[:, column[var.name]] / var.scale)
        info = np.iinfo(dtype)
        encoded = np.clip(raw, info.min, info.max).astype(dtype)
        image[:, var.byte : var.byte + dtype.itemsize] = encoded.view(np.uint8).reshape(t, dtype.itemsize)
    return image


def frames(
    layout_: BusLayout,
    images: np.ndarray,
    *,
    sample_start_ns: np.ndarray,
    sample_period_ns: int,
    bus_hz: int,
    jitter_ns: int = 20_000,
    both_copies: bool = True,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Capture records (timestamps (F,) int64, frames (F, frame_bytes) uint8) of the images held for
    their sample periods on a `bus_hz` bus, each bus cycle's outgoing copy then its returned copy."""
    bus_period_ns = round(1e9 / bus_hz)
    per_sample = sample_period_ns // bus_period_ns
    if per_sample < 1 or per_sample * bus_period_ns != sample_period_ns:
        raise ValueError(
            f"the bus period ({bus_period_ns} ns) must divide the sample period ({sample_period_ns} ns)"
        )
    rng = np.random.default_rng(seed)
    n = len(images) * per_sample
    sample_of = np.repeat(np.arange(len(images)), per_sample)
    within = np.tile(np.arange(per_sample), len(images))
    ts = sample_start_ns[sample_of] + (within * bus_period_ns + bus_period_ns // 2)
    ts = ts + rng.integers(-jitter_ns, jitter_ns + 1, n)
    size = layout_.frame_bytes
    out = np.zeros((n, size), dtype=np.uint8)
    out[:, 0:6] = 0xFF  # broadcast
    out[:, 6:12] = np.frombuffer(MASTER_MAC, dtype=np.uint8)
    out[:, 12:14] = (0x88, 0xA4)
    ecat_len = size - ETH_HEADER - ECAT_HEADER
    out[:, 14:16] = np.frombuffer(np.uint16(ecat_len | (1 << 12)).tobytes(), dtype=np.uint8)
    p = 16
    # LRW: cmd 12, index, logical address, length | more-follows, irq
    out[:, p] = 12
    out[:, p + 1] = (np.arange(n) & 0xFF).astype(np.uint8)
    out[:, p + 2 : p + 6] = np.frombuffer(np.uint32(LRW_ADDRESS).tobytes(), dtype=np.uint8)
    out[:, p + 6 : p + 8] = np.frombuffer(np.uint16(layout_.data_bytes | 0x8000).tobytes(), dtype=np.uint8)
    data = p + DATAGRAM_HEADER
    out[:, data : data + layout_.data_bytes] = images[sample_of]
    wkc_lrw = data + layout_.data_bytes
    q = wkc_lrw + 2
    # ARMW: cmd 13, ADP 0 (the reference clock), ADO 0x0910 (system time), 8 bytes
    out[:, q] = 13
    out[:, q + 1] = out[:, p + 1]
    out[:, q + 2 : q + 6] = np.frombuffer(
        (np.uint16(0).tobytes() + np.uint16(0x0910).tobytes()), dtype=np.uint8
    )
    out[:, q + 6 : q + 8] = np.frombuffer(np.uint16(8).tobytes(), dtype=np.uint8)
    system_time = (ts - ts[0]).astype("<u8") if n else np.zeros(0, "<u8")
    out[:, q + 10 : q + 18] = system_time.view(np.uint8).reshape(n, 8)
    wkc_armw = q + 18
    if not both_copies:
        returned = out
        returned[:, 6] |= 0x02
        returned[:, wkc_lrw : wkc_lrw + 2] = (3 * N_SLAVES, 0)
        returned[:, wkc_armw : wkc_armw + 2] = (N_SLAVES, 0)
        return ts.astype(np.int64), returned
    outgoing = out.copy()
    outgoing[:, data : data + layout_.out_bytes + layout_.in_bytes][:, layout_.out_bytes :] = (
        0  # inputs not filled yet
    )
    returned = out
    returned[:, 6] |= 0x02
    returned[:, wkc_lrw : wkc_lrw + 2] = (3 * N_SLAVES, 0)
    returned[:, wkc_armw : wkc_armw + 2] = (N_SLAVES, 0)
    both = np.empty((2 * n, size), dtype=np.uint8)
    both[0::2], both[1::2] = outgoing, returned
    times = np.empty(2 * n, dtype=np.int64)
    times[0::2], times[1::2] = ts, ts + 35_000  # the ring's round trip
    return times, both


def eni_xml(layout_: BusLayout, *, cycle_time_us: int) -> str:
    """An ENI (TwinCAT layout as in ethercat.md: frame-relative bit offsets) for the capture's frames."""
    data_start = ETH_HEADER + ECAT_HEADER + DATAGRAM_HEADER  # the LRW's data in the frame
    out_vars = [v for v in layout_.variables if v.direction == "out"]
    in_vars = [v for v in layout_.variables if v.direction == "in"]

    def variables(vs: list[BusVariable]) -> str:
        return "".join(
            f"<Variable><Name>{_text(v.variable)}</Name><DataType>{v.eni_type}</DataType>"
            f"<BitSize>{8 * np.dtype(v.dtype).itemsize}</BitSize>"
            f"<BitOffs>{8 * (data_start + v.byte)}</BitOffs>"
            "</Variable>"
            for v in vs
        )

    frame_bytes = layout_.frame_bytes
    return (
        '<?xml version="1.0" encoding="utf-8"?>\n'
        "<EtherCATConfig><Config>"
        f"<Master><Info><Name>{_text('cellwatch simulated cell')}</Name></Info></Master>"
        f"<Cyclic><CycleTime>{cycle_time_us}</CycleTime><Frame>"
        f"<Cmd><State>OP</State><Comment>{_text('process data')}</Comment><Cmd>12</Cmd>"
        f"<Addr>{LRW_ADDRESS}</Addr><DataLength>{layout_.data_bytes}</DataLength><Cnt>{3 * N_SLAVES}</Cnt>"
        f"<InputOffs>{ETH_HEADER + ECAT_HEADER}</InputOffs>"
        f"<OutputOffs>{ETH_HEADER + ECAT_HEADER}</OutputOffs></Cmd>"
        f"<Cmd><State>OP</State><Comment>{_text('DC system time')}</Comment><Cmd>13</Cmd><Adp>0</Adp>"
        f"<Ado>{0x0910}</Ado><DataLength>8</DataLength><Cnt>{N_SLAVES}</Cnt></Cmd>"
        "</Frame></Cyclic>"
        f"<ProcessImage><Inputs><ByteSize>{frame_bytes}</ByteSize>{variables(in_vars)}</Inputs>"
        f"<Outputs><ByteSize>{frame_bytes}</ByteSize>{variables(out_vars)}</Outputs></ProcessImage>"
        "</Config></EtherCATConfig>\n"
    )


def _text(value: str) -> str:
    return quoteattr(value)[1:-1]


def yaml_map(layout_: BusLayout, *, robot: str = "robot1") -> str:
    """The YAML map of the capture (issue 12's format): every signal at its logical address and type."""
    lines = [
        "# cellwatch simulated cell: the LRW process image (outputs, then inputs) at logical address",
        f"# 0x{LRW_ADDRESS:08x}; scale turns the raw integer into SI units",
        f"robot: {robot}",
        f"cycle_signal: {CYCLE_SIGNAL}",
        "signals:",
    ]
    types = {"<i2": "int16", "<i4": "int32", "<u2": "uint16", "<u4": "uint32"}
    for v in layout_.variables:
        lines.append(
            f"  - {{name: {v.name}, address: 0x{LRW_ADDRESS + v.byte:08x}, type: {types[v.dtype]}, "
            f"scale: {v.scale!r}}}"
        )
    return "\n".join(lines) + "\n"


def write_capture(
    recording: Path,
    out: Path,
    *,
    bus_hz: int = 1000,
    both_copies: bool = True,
    seed: int = 0,
    start_ns: int = 1_767_225_600_000_000_000,  # 2026-01-01T00:00:00Z: a multiple of every sample period
    on_cycle: Callable[[int], None] | None = None,
) -> tuple[int, int, Path, Path]:
    """The recording's cycles, in file order and back to back, as an EtherCAT capture (pcapng) with its
    maps next to it: OUT.eni.xml (the ENI), OUT.map.yaml (a YAML map on its own) and OUT.eni-map.yaml
    (a YAML map naming the ENI's variables). Returns (frames, cycles, eni, map)."""
    from ingest.ethercat.pcap import CaptureWriter
    from ingest.voraus.reader import VorausReader
    from ingest.voraus.schema import MACHINE_SIGNALS

    names = list(MACHINE_SIGNALS)
    bus = layout(names)
    reader = VorausReader(recording, names, batch_rows=65536)
    try:
        rate = reader.rate_hz
        if rate is None:
            raise ValueError(f"{recording}: the sampling rate cannot be told from the file")
        sample_period_ns = round(1e9 / rate)
        writer = CaptureWriter(out, format="pcapng")
        written = cycles = 0
        next_ns = start_ns
        try:
            for cycle in reader.cycles():
                n = len(cycle.signals)
                starts = next_ns + np.arange(n, dtype=np.int64) * sample_period_ns
                images = encode(bus, names, cycle.signals, np.full(n, cycle.sample))
                ts, records = frames(
                    bus,
                    images,
                    sample_start_ns=starts,
                    sample_period_ns=sample_period_ns,
                    bus_hz=bus_hz,
                    both_copies=both_copies,
                    seed=seed + cycles,
                )
                writer.write(ts, records)
                written += len(ts)
                cycles += 1
                next_ns += n * sample_period_ns
                if on_cycle is not None:
                    on_cycle(cycles)
        finally:
            writer.close()
    finally:
        reader.close()
    stem = out.name.removesuffix(".pcapng").removesuffix(".pcap")
    eni, yml = out.with_name(f"{stem}.eni.xml"), out.with_name(f"{stem}.map.yaml")
    eni.write_text(eni_xml(bus, cycle_time_us=round(1e6 / bus_hz)))
    yml.write_text(yaml_map(bus))
    out.with_name(f"{stem}.eni-map.yaml").write_text(eni_yaml_map(bus, eni.name))
    return written, cycles, eni, yml


def eni_yaml_map(layout_: BusLayout, eni_name: str, *, robot: str = "robot1") -> str:
    """A YAML map that takes the ENI's variables and gives them the model's names and SI scales (an ENI
    knows bits and types, not units)."""
    lines = [
        "# the ENI's process image under the voraus names, in SI units",
        f"eni: {eni_name}",
        f"robot: {robot}",
        f"cycle_signal: {CYCLE_SIGNAL}",
        "signals:",
    ]
    for v in layout_.variables:
        lines.append(f"  - {{name: {v.name}, variable: {v.variable!r}, scale: {v.scale!r}}}")
    return "\n".join(lines) + "\n"
