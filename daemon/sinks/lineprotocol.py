"""InfluxDB line protocol: one point per line, `measurement,tags fields timestamp`.

Escaping follows the InfluxDB 1.x/2.x/3.x specification: in measurements commas and spaces, in tag keys,
tag values and field keys also equals signs, are backslash-escaped; string field values are quoted with
backslashes and double quotes escaped. Integers carry an ``i`` suffix. NaN and infinity cannot be
stored by InfluxDB and are rejected here, with the field named, before anything is sent.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

FieldValue = float | int | bool | str

_MEASUREMENT = str.maketrans({",": r"\,", " ": r"\ ", "\n": r"\n"})
_KEY = str.maketrans({",": r"\,", "=": r"\=", " ": r"\ ", "\n": r"\n"})


class LineProtocolError(ValueError):
    """A point that cannot be written: the message names the measurement and the field or tag."""


@dataclass(frozen=True)
class Point:
    measurement: str
    fields: Mapping[str, FieldValue]
    time_ns: int
    tags: Mapping[str, str] = field(default_factory=dict)


def _string_field(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _field(point: Point, key: str, value: FieldValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return f"{value}i"
    if isinstance(value, float):
        if not math.isfinite(value):
            raise LineProtocolError(
                f"{point.measurement}: field {key!r} is {value}; InfluxDB stores only finite numbers"
            )
        return repr(value)
    if isinstance(value, str):
        return _string_field(value)
    raise LineProtocolError(f"{point.measurement}: field {key!r} has unsupported type {type(value).__name__}")


def encode(point: Point) -> str:
    """One line (without newline)."""
    if not point.measurement:
        raise LineProtocolError("empty measurement name")
    if not point.fields:
        raise LineProtocolError(f"{point.measurement}: a point needs at least one field")
    head = point.measurement.translate(_MEASUREMENT)
    for key in sorted(point.tags):  # sorted tags: InfluxDB's recommended (fastest) order
        value = point.tags[key]
        if value == "":
            continue  # InfluxDB rejects empty tag values; an empty tag is the same as no tag
        head += f",{key.translate(_KEY)}={str(value).translate(_KEY)}"
    fields = ",".join(f"{k.translate(_KEY)}={_field(point, k, v)}" for k, v in point.fields.items())
    return f"{head} {fields} {int(point.time_ns)}"


def encode_batch(points: Iterable[Point]) -> bytes:
    return "".join(encode(p) + "\n" for p in points).encode()
