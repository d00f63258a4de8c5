"""Cell presets: the parameters in which one real pick-and-place cell differs from another.

A detector trained on one simulated cell learns that cell's quirks (its arm's masses and friction, its
program's poses and speeds, its sensors' noise, its warm-up), so the simulator can make other cells:
`CellParams` holds what changes, `PRESETS` names a few cells. `CellParams()` is the original cell,
bit for bit. Every factor multiplies the simulator's own constant (see `ingest/sim/cell.py`), so 1.0 is
"as in the default cell".

No numpy here: the CLI imports this module to build its parser.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any

N_AXES = 6

#: the fields that hold a tuple, and how many values it has (link_mass_scale: 1 value = all links)
_TUPLE_LENGTHS = {
    "link_mass_scale": N_AXES,
    "place_xyz": 3,
    "conveyor_x": 2,
    "conveyor_y": 2,
    "scan_offset": 3,
}


@dataclass(frozen=True)
class CellParams:
    """What a real cell changes. The defaults are the original simulated cell, exactly."""

    # --- arm: the inertial parameters of the true arm; the controller's model is tuned to the same arm
    #: mass of each moving link 1..6 (and its inertia, same shape: a denser link), factor
    link_mass_scale: tuple[float, ...] = (1.0,) * N_AXES
    #: gear friction: Coulomb and viscous, factors (the controller's friction model follows)
    coulomb_scale: float = 1.0
    viscous_scale: float = 1.0
    #: rotor inertia reflected to the joint, factor
    rotor_inertia_scale: float = 1.0

    # --- program: where the cell picks and places, and how fast
    #: place position (m, base frame)
    place_xyz: tuple[float, float, float] = (0.06, 0.48, 0.07)
    #: the belt region cans arrive in (m): x range, y range, belt height
    conveyor_x: tuple[float, float] = (0.38, 0.56)
    conveyor_y: tuple[float, float] = (-0.22, 0.06)
    pick_z: float = 0.07
    #: shift of the camera's scan pose (m)
    scan_offset: tuple[float, float, float] = (0.0, 0.0, 0.0)
    #: PTP moves: joint velocity and acceleration limits, factors
    ptp_speed: float = 1.0
    ptp_accel: float = 1.0
    #: linear moves: tool speed and acceleration, factors
    lin_speed: float = 1.0
    lin_accel: float = 1.0
    #: every dwell of the program (camera, vacuum, settle), factor; at least 0.5 (the gripper's vacuum
    #: takes 0.12 s to hold the can, and that does not get faster with the program)
    dwell_scale: float = 1.0

    # --- sensor noise
    #: standard deviation of every sensor's noise, factor
    noise_level: float = 1.0
    #: colour of the noise: AR(1) coefficient per 10 ms (0 = white; at 500 Hz the coefficient is
    #: converted, so the correlation time in seconds is the same); the marginal standard deviation
    #: stays noise_level × sigma whatever the colour
    noise_ar: float = 0.0

    # --- slow drift over the recording (the gears warm up); `order` is the cycle's position 0..1
    #: gear friction of a cold gear is (1 + friction_drift) times the warm gear's
    friction_drift: float = 0.02
    #: warm-up time constant as a fraction of the recording: 0 = linear over the whole recording
    #: (1 - order), else exp(-order / drift_tau) (most of the warm-up early on)
    drift_tau: float = 0.0
    #: torque sensor offset drift as the gears warm (Nm at the main axes, less at the wrist)
    sensor_offset_drift: float = 0.0

    # --- controller
    #: position-loop bandwidth, factor (below 1: softer gains, larger tracking error)
    servo_bandwidth: float = 1.0
    #: position-loop damping ratio
    servo_damping: float = 0.85

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in _TUPLE_LENGTHS:
                values = tuple(value) if isinstance(value, Iterable) else (value,)
                want = _TUPLE_LENGTHS[f.name]
                if f.name == "link_mass_scale" and len(values) == 1:
                    values = values * N_AXES
                if len(values) != want:
                    raise ValueError(f"{f.name} needs {want} values, got {len(values)}")
                values = tuple(_number(f.name, v) for v in values)
                object.__setattr__(self, f.name, values)
            else:
                object.__setattr__(self, f.name, _number(f.name, value))
        positive = (
            "coulomb_scale",
            "viscous_scale",
            "rotor_inertia_scale",
            "ptp_speed",
            "ptp_accel",
            "lin_speed",
            "lin_accel",
            "noise_level",
            "servo_bandwidth",
            "servo_damping",
        )
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not all(0.2 <= s <= 5.0 for s in self.link_mass_scale):
            raise ValueError(f"link_mass_scale must be within 0.2..5, got {self.link_mass_scale}")
        if not 0.5 <= self.dwell_scale <= 10.0:
            raise ValueError(f"dwell_scale must be within 0.5..10, got {self.dwell_scale}")
        if not 0.0 <= self.noise_ar < 1.0:
            raise ValueError(f"noise_ar must be in [0, 1), got {self.noise_ar}")
        if not 0.0 <= self.servo_damping <= 3.0:
            raise ValueError(f"servo_damping must be within 0..3, got {self.servo_damping}")
        if self.drift_tau < 0:
            raise ValueError(f"drift_tau must be >= 0, got {self.drift_tau}")
        if not -0.5 < self.friction_drift < 2.0:
            raise ValueError(f"friction_drift must be within -0.5..2, got {self.friction_drift}")
        for name in ("conveyor_x", "conveyor_y"):
            low, high = getattr(self, name)
            if not low < high:
                raise ValueError(f"{name} must be (low, high) with low < high, got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (tuples as lists)."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> CellParams:
        unknown = sorted(set(values) - set(field_names()))
        if unknown:
            raise ValueError(f"unknown cell parameter(s): {', '.join(unknown)}")
        kwargs: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        return cls(**kwargs)

    def changes(self, base: CellParams | None = None) -> dict[str, Any]:
        """The fields that differ from `base` (the default cell when None)."""
        base = base or CellParams()
        return {
            f.name: _jsonable(getattr(self, f.name))
            for f in fields(self)
            if getattr(self, f.name) != getattr(base, f.name)
        }


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def field_names() -> list[str]:
    return [f.name for f in fields(CellParams)]


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """`KEY=VALUE` strings (the CLI's --param) as CellParams keyword arguments; tuples comma-separated.
    ValueError naming the key for an unknown key or a value that is not a number (list)."""
    known = field_names()
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ValueError(f"expected KEY=VALUE, got {item!r}")
        if key not in known:
            raise ValueError(f"unknown cell parameter {key!r}; choose from {', '.join(known)}")
        tokens = [t.strip() for t in raw.split(",")]
        try:
            numbers = [float(t) for t in tokens]
        except ValueError:
            what = "a comma-separated list of numbers" if key in _TUPLE_LENGTHS else "a number"
            raise ValueError(f"{key}: {raw!r} is not {what}") from None
        if not all(math.isfinite(x) for x in numbers):
            raise ValueError(f"{key}: {raw!r} is not finite")
        if key in _TUPLE_LENGTHS:
            want = _TUPLE_LENGTHS[key]
            if len(numbers) != want and not (key == "link_mass_scale" and len(numbers) == 1):
                raise ValueError(f"{key} needs {want} comma-separated values, got {raw!r}")
            out[key] = tuple(numbers)
        elif len(numbers) != 1:
            raise ValueError(f"{key} takes one number, got {raw!r}")
        else:
            out[key] = numbers[0]
    return out


def with_overrides(params: CellParams, items: Iterable[str]) -> CellParams:
    """`params` with --param overrides applied; ValueError for a bad key or value."""
    return dataclasses.replace(params, **parse_overrides(items))


DEFAULT = CellParams()

PRESETS: dict[str, CellParams] = {
    "default": DEFAULT,
    # another arm: heavier links (a payload-class arm of the same geometry), stiffer gears with more
    # friction, bigger motors, and a controller tuned softer for it
    "heavy-arm": CellParams(
        link_mass_scale=(1.40, 1.35, 1.30, 1.30, 1.25, 1.25),
        coulomb_scale=1.5,
        viscous_scale=1.5,
        rotor_inertia_scale=1.3,
        servo_bandwidth=0.8,
        servo_damping=0.9,
    ),
    # another program: the belt 4 cm nearer the base, 4 cm further in -y and 2 cm lower, the place
    # station and the scan pose moved, faster moves and shorter dwells
    "fast-program": CellParams(
        place_xyz=(0.10, 0.44, 0.05),
        conveyor_x=(0.34, 0.50),
        conveyor_y=(-0.26, 0.02),
        pick_z=0.05,
        scan_offset=(-0.03, -0.04, -0.04),
        ptp_speed=1.3,
        ptp_accel=1.3,
        lin_speed=1.25,
        lin_accel=1.25,
        dwell_scale=0.6,
    ),
    # worse sensors in a cold cell: 2.5× noise, coloured (AR(1) 0.8), friction 25 % up when cold,
    # most of the warm-up in the first fifth of the recording, and torque sensor offsets that drift
    "noisy-drift": CellParams(
        noise_level=2.5,
        noise_ar=0.8,
        friction_drift=0.25,
        drift_tau=0.2,
        sensor_offset_drift=0.6,
    ),
    # a bit of everything: a somewhat heavier arm, another layout, a faster program, noisier and
    # coloured sensors, a warm-up, a softer and less damped loop
    "other-cell": CellParams(
        link_mass_scale=(1.2,) * N_AXES,
        coulomb_scale=1.25,
        viscous_scale=1.2,
        rotor_inertia_scale=1.15,
        place_xyz=(0.02, 0.50, 0.09),
        conveyor_x=(0.40, 0.54),
        conveyor_y=(-0.18, 0.10),
        pick_z=0.09,
        scan_offset=(0.02, 0.03, 0.02),
        ptp_speed=1.15,
        ptp_accel=1.1,
        lin_speed=1.1,
        dwell_scale=0.8,
        noise_level=1.6,
        noise_ar=0.5,
        friction_drift=0.12,
        drift_tau=0.35,
        sensor_offset_drift=0.3,
        servo_bandwidth=0.9,
        servo_damping=0.75,
    ),
}

#: one line per preset, for the CLI's help
PRESET_NOTES: dict[str, str] = {
    "default": "the original cell",
    "heavy-arm": "links +25-40 % mass, gear friction x1.5, rotor inertia x1.3, servo bandwidth x0.8",
    "fast-program": "other belt, place and scan poses, PTP x1.3, linear x1.25, dwells x0.6",
    "noisy-drift": "noise x2.5 coloured (AR(1) 0.8), strong warm-up drift of friction and sensor offsets",
    "other-cell": "a mix: heavier arm, other layout, faster, noisier, warm-up, softer loop",
}
assert set(PRESET_NOTES) == set(PRESETS)


def preset_name(params: CellParams) -> str:
    """The name of the preset `params` is, or "custom"."""
    return next((name for name, p in PRESETS.items() if p == params), "custom")


def sim_metadata(params: CellParams, *, preset: str | None = None, **extra: Any) -> str:
    """The JSON the simulator writes under the parquet key `cellwatch.sim`."""
    name = preset if preset is not None else preset_name(params)
    base = PRESETS.get(name, DEFAULT)
    return json.dumps(
        {
            "preset": name,
            "overrides": params.changes(base),
            "params": params.to_dict(),
            **extra,
        },
    )
