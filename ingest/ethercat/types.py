"""What the EtherCAT stages hand each other, as numpy columns (never one Python object per frame: the
decoder must keep up with a 4 kHz bus many times over).

    capture file / live socket --(pcap.py)--> RecordBatch      raw link-layer records + capture times
    RecordBatch --(frames.py)-->              FrameBatch       per (command, address) datagram columns
    FrameBatch --(mapping.py)-->              named signals     SI values per bus cycle

Rejections are counted by reason at every stage (a bounded set of names, fit for a metrics label).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Final

import numpy as np

ETHERTYPE: Final = 0x88A4
UDP_PORT: Final = 0x88A4

# pcap link types a capture of the bus has
LINKTYPE_ETHERNET: Final = 1
LINKTYPE_LINUX_SLL: Final = 113
LINKTYPE_LINUX_SLL2: Final = 276

# datagram commands (ethercat.md)
COMMANDS: Final = {
    0: "NOP",
    1: "APRD",
    2: "APWR",
    3: "APRW",
    4: "FPRD",
    5: "FPWR",
    6: "FPRW",
    7: "BRD",
    8: "BWR",
    9: "BRW",
    10: "LRD",
    11: "LWR",
    12: "LRW",
    13: "ARMW",
    14: "FRMW",
}
LOGICAL: Final = frozenset({10, 11, 12})  # LRD, LWR, LRW: cyclic process data at a logical address


@dataclass
class RecordBatch:
    """Consecutive capture records: record i is `buf[offsets[i] : offsets[i] + lengths[i]]` (the captured
    bytes, possibly fewer than on the wire), taken at `ts_ns[i]` (ns since the epoch) on a link of type
    `linktype[i]`. `wire_lengths[i]` is the length on the wire (a record shorter than that was truncated
    by the capture's snap length)."""

    ts_ns: np.ndarray  # int64 (N,)
    linktype: np.ndarray  # int32 (N,)
    offsets: np.ndarray  # int64 (N,)
    lengths: np.ndarray  # int32 (N,)
    wire_lengths: np.ndarray  # int32 (N,)
    buf: np.ndarray  # uint8, the records' bytes (and whatever lies between them)

    def __len__(self) -> int:
        return len(self.ts_ns)

    def record(self, i: int) -> bytes:
        start = int(self.offsets[i])
        return self.buf[start : start + int(self.lengths[i])].tobytes()


@dataclass(frozen=True)
class DatagramKey:
    """Which cyclic datagram: its command and address (the 32-bit logical address for LRD/LWR/LRW; for
    addressed commands ADP | ADO << 16 as on the wire), and its data length."""

    command: int
    address: int
    length: int

    @property
    def name(self) -> str:
        return f"{COMMANDS.get(self.command, str(self.command))}@0x{self.address:08x}[{self.length}]"


@dataclass
class DatagramColumns:
    """One cyclic datagram across the frames of a batch that carried it (frame order kept).

    `frame[i]` indexes into the FrameBatch's frames, `data[i]` is the datagram's data bytes in that frame,
    `wkc[i]` its working counter, `stale[i]` whether that WKC is below the expected count (some slave did
    not process the datagram: its inputs there are old; all False when not given)."""

    key: DatagramKey
    frame: np.ndarray  # int64 (M,)
    data: np.ndarray  # uint8 (M, length)
    wkc: np.ndarray  # uint16 (M,)
    stale: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # bool (M,)

    def __post_init__(self) -> None:
        if len(self.stale) != len(self.wkc):
            if len(self.stale):
                raise ValueError(f"{self.key.name}: {len(self.stale)} stale flags, {len(self.wkc)} datagrams")
            self.stale = np.zeros(len(self.wkc), bool)


@dataclass
class FrameBatch:
    """EtherCAT frames decoded from a RecordBatch: the process-data frames kept (the returned copy when a
    capture holds both copies of a frame), their capture times, and their datagrams by key.

    `counts` counts what was seen: frames, datagrams by command name (`datagrams_LRD`, ...), and skips
    (`mailbox`, `outgoing_copy`, `not_ethercat`); `rejections` counts what could not be decoded, by reason
    (`truncated`, `bad_length`, `unknown_command`, `bad_link`, ...)."""

    ts_ns: np.ndarray  # int64 (F,): capture time of each frame kept
    datagrams: dict[DatagramKey, DatagramColumns] = field(default_factory=dict)
    counts: Counter[str] = field(default_factory=Counter)
    rejections: Counter[str] = field(default_factory=Counter)

    def __len__(self) -> int:
        return len(self.ts_ns)
