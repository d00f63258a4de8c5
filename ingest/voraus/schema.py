"""The voraus-AD file layout: columns, dtypes, signal groups, categories and variants.

Everything here is a fact about the published dataset (see ../shared/voraus-ad.md); the reader,
the simulator and the models all take their column lists from this one module.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Final

import numpy as np

META_COLUMNS: Final = ("time", "sample", "anomaly", "category", "setting", "action", "active")
META_DTYPES: Final[dict[str, np.dtype]] = {
    "time": np.dtype("float64"),
    "sample": np.dtype("int64"),
    "anomaly": np.dtype("bool"),
    "category": np.dtype("int64"),
    "setting": np.dtype("int64"),
    "action": np.dtype("uint8"),
    "active": np.dtype("int64"),
}
#: fastparquet writes the global row number as an extra int64 column when the index is kept.
OPTIONAL_INDEX_COLUMN: Final = "index"

ROBOT_SIGNALS: Final = ("robot_voltage", "robot_current", "io_current", "system_current")
AXIS_SIGNAL_STEMS: Final = (
    "target_position",
    "target_velocity",
    "target_acceleration",
    "target_torque",
    "computed_inertia",
    "computed_torque",
    "motor_position",
    "motor_velocity",
    "joint_position",
    "joint_velocity",
    "motor_torque",
    "torque_sensor_a",
    "torque_sensor_b",
    "motor_iq",
    "motor_id",
    "power_motor_el",
    "power_motor_mech",
    "power_load_mech",
    "motor_voltage",
    "supply_voltage",
    "brake_voltage",
)
N_AXES: Final = 6

MACHINE_SIGNALS: Final[tuple[str, ...]] = ROBOT_SIGNALS + tuple(
    f"{stem}_{axis}" for axis in range(1, N_AXES + 1) for stem in AXIS_SIGNAL_STEMS
)
SIGNAL_DTYPE: Final = np.dtype("float64")
ALL_COLUMNS: Final[tuple[str, ...]] = META_COLUMNS + MACHINE_SIGNALS

_ELECTRICAL_STEMS: Final = (
    "motor_iq",
    "motor_id",
    "power_motor_el",
    "motor_voltage",
    "supply_voltage",
    "brake_voltage",
)
_MEASURED_STEMS: Final = (
    "motor_position",
    "motor_velocity",
    "joint_position",
    "joint_velocity",
    "torque_sensor_a",
    "torque_sensor_b",
    "motor_voltage",
    "supply_voltage",
    "brake_voltage",
)


def _axis_group(stems: tuple[str, ...]) -> tuple[str, ...]:
    wanted = set(stems)
    return ROBOT_SIGNALS + tuple(
        s for s in MACHINE_SIGNALS[len(ROBOT_SIGNALS) :] if s.rsplit("_", 1)[0] in wanted
    )


ELECTRICAL: Final = _axis_group(_ELECTRICAL_STEMS)
MEASURED: Final = _axis_group(_MEASURED_STEMS)
MECHANICAL: Final = tuple(s for s in MACHINE_SIGNALS if s not in set(ELECTRICAL))
COMPUTED: Final = tuple(s for s in MACHINE_SIGNALS if s not in set(MEASURED))

SIGNAL_GROUPS: Final[dict[str, tuple[str, ...]]] = {
    "machine": MACHINE_SIGNALS,
    "mechanical": MECHANICAL,
    "electrical": ELECTRICAL,
    "computed": COMPUTED,
    "measured": MEASURED,
}


def signal_group(name: str) -> tuple[str, ...]:
    """Return the signals of a named group, in file order."""
    try:
        return SIGNAL_GROUPS[name]
    except KeyError:
        known = ", ".join(SIGNAL_GROUPS)
        raise ValueError(f"unknown signal group {name!r}; known groups: {known}") from None


class Category(IntEnum):
    """Anomaly category, column ``category``, numbered as published."""

    AXIS_FRICTION = 0
    AXIS_WEIGHT = 1
    COLLISION_FOAM = 2
    COLLISION_CABLE = 3
    COLLISION_CARTON = 4
    MISS_CAN = 5
    LOSE_CAN = 6
    CAN_WEIGHT = 7
    ENTANGLED = 8
    INVALID_POSITION = 9
    MOTOR_COMMUTATION = 10
    WOBBLING_STATION = 11
    NORMAL_OPERATION = 12


ANOMALY_CATEGORIES: Final = tuple(c for c in Category if c is not Category.NORMAL_OPERATION)


class Variant(IntEnum):
    """Anomaly variant, column ``setting``, numbered as published."""

    A1_A = 0
    A1_B = 1
    A2_A = 2
    A2_B = 3
    A3_A = 4
    A3_B = 5
    A3_C = 6
    A4_A = 7
    A4_B = 8
    A4_C = 9
    A5_A = 10
    A5_B = 11
    A6_A = 12
    A6_B = 13
    A1_115G = 14
    A1_231G = 15
    A1_500G = 16
    A2_500G = 17
    A2_231G = 18
    A2_115G = 19
    A3_115G = 20
    A3_231G = 21
    A3_500G = 22
    A4_500G = 23
    A4_231G = 24
    A4_115G = 25
    A5_115G = 26
    A5_231G = 27
    A5_500G = 28
    A6_500G = 29
    A6_231G = 30
    A6_115G = 31
    LARGE_FULL = 32
    SMALL_FULL = 33
    SMALL_STRIPE = 34
    SMALL_HANGING_FULL = 35
    LARGE_HANGING_FULL = 36
    SMALL_HANGING_STRIPE = 37
    CONNECTOR_TOP = 38
    CONNECTOR_SIDE = 39
    LAN = 40
    STRIPE = 41
    FULL_A = 42
    FULL_B = 43
    CONVEYOR = 44
    NO_VACUUM = 45
    DEFECT_GRIPPER_DROP_CAN = 46
    DROP_1400MS = 47
    DROP_1100MS = 48
    DROP_100MS = 49
    DROP_200MS = 50
    LOSE_200MS = 51
    LOSE_300MS = 52
    LOSE_PLACE_100MS = 53
    DECREASE_95G = 54
    DECREASE_165G = 55
    EMPTY = 56
    INCREASE_242G = 57
    INCREASE_373G = 58
    INCREASE_407G = 59
    CABLE = 60
    PICK = 61
    A1_HIGH = 62
    A1_MEDIUM = 63
    A2_MEDIUM = 64
    A3_MEDIUM = 65
    A4_MEDIUM = 66
    A5_MEDIUM = 67
    A6_MEDIUM = 68
    LOW_DAMPING = 69
    MEDIUM_DAMPING = 70
    HIGH_DAMPING = 71
    PRE_A = 72
    PRE_B = 73
    BETWEEN_A = 74
    BETWEEN_B = 75
    BETWEEN_C = 76


#: The training split: normal cycles of variant PRE_A (recorded first).
TRAIN_VARIANT: Final = Variant.PRE_A


class Action(IntEnum):
    """Robot program step, column ``action``."""

    VOID_1 = 0
    TO_SCAN_PTP = 1
    VOID_2 = 2
    OVER_OBJECT_PTP = 3
    VOID_3 = 4
    DOWN_PICK_LIN = 5
    VOID_4 = 6
    UP_PICK_LIN = 7
    VOID_5 = 8
    TO_PLACE_PTP = 9
    VOID_6 = 10
    DOWN_PLACE_LIN = 11
    VOID_7 = 12
    UP_PLACE_LIN = 13
    VOID_8 = 14


def category_name(value: int) -> str:
    """Name of a category value, or ``UNKNOWN_<n>`` for a value outside the published table."""
    try:
        return Category(value).name
    except ValueError:
        return f"UNKNOWN_{value}"


def variant_name(value: int) -> str:
    """Name of a variant value, or ``UNKNOWN_<n>`` for a value outside the published table."""
    try:
        return Variant(value).name
    except ValueError:
        return f"UNKNOWN_{value}"


def is_train_cycle(anomaly: bool, setting: int) -> bool:
    """The published split: normal cycles of variant PRE_A are training data, all else is test."""
    return (not anomaly) and setting == TRAIN_VARIANT


# Sampling rates. Real recordings are not exactly on the nominal clock: the published 100 Hz files
# have a median time step of about 10.07 ms (99.3 Hz). A measured rate within RATE_TOLERANCE of a
# nominal rate is that rate; the nominal rate is what model cards and dashboards show.

#: the published sampling rates (recorded at 500 Hz, a 100 Hz version derived)
NOMINAL_RATES_HZ: Final = (100, 500)
#: relative tolerance between a measured and a nominal (or a model's) sampling rate: ±2 %
RATE_TOLERANCE: Final = 0.02


def rate_matches(measured_hz: float, nominal_hz: float, tolerance: float = RATE_TOLERANCE) -> bool:
    """A measured rate lies within ``tolerance`` (relative) of a nominal one."""
    return nominal_hz > 0 and abs(measured_hz - nominal_hz) <= tolerance * nominal_hz


def nominal_rate(measured_hz: float) -> int:
    """The published rate (100 or 500 Hz) that a measured rate is within the tolerance of, else the
    measured rate rounded to whole Hz (e.g. 99.3 -> 100, 500.8 -> 500, 90.2 -> 90)."""
    for rate in NOMINAL_RATES_HZ:
        if rate_matches(measured_hz, rate):
            return rate
    return round(measured_hz)
