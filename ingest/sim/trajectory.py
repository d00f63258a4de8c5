"""Motion planning for the simulated cell: jerk-limited point-to-point and linear moves.

Trajectories are built on a fine 1 kHz grid (so every output rate samples the same continuous motion)
and returned as joint positions, velocities and accelerations plus the program step (`action`).
Point-to-point moves are synchronized joint-space moves, time-optimal under per-axis velocity and
acceleration limits; linear moves keep the tool orientation and follow a straight Cartesian line
(inverse kinematics on a coarse path grid, splined in the path parameter).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray
from scipy.interpolate import CubicSpline

from ingest.voraus.schema import Action

FINE_HZ = 1000
FINE_DT = 1.0 / FINE_HZ

FloatArray = NDArray[np.float64]


def motion_profile(v_max: float, a_max: float, jerk_time: float) -> tuple[FloatArray, FloatArray, FloatArray]:
    """A normalized 0→1 profile s(t) with |ṡ| ≤ v_max, |s̈| ≤ a_max, jerk-limited by a moving average.

    Returns s, ṡ, s̈ sampled on the fine grid, ending exactly at s = 1 with zero velocity.
    """
    t_acc = v_max / a_max
    if v_max * t_acc >= 1.0:  # triangular: never reaches v_max
        t_acc = float(np.sqrt(1.0 / a_max))
        v_peak = a_max * t_acc
        t_total = 2.0 * t_acc
    else:
        v_peak = v_max
        t_total = 1.0 / v_max + t_acc
    n = max(int(np.ceil(t_total * FINE_HZ)), 2)
    t = np.arange(n + 1) * FINE_DT
    vel = np.minimum.reduce([np.full_like(t, v_peak), a_max * t, a_max * (t_total - t)])
    vel = np.clip(vel, 0.0, None)
    k = max(round(jerk_time * FINE_HZ), 1)
    if k > 1:
        vel = np.convolve(vel, np.ones(k) / k, mode="full")
    # exact integral by trapezoids, then normalized so the move ends exactly at its goal
    s = np.concatenate([[0.0], np.cumsum(0.5 * (vel[1:] + vel[:-1]) * FINE_DT)])
    scale = 1.0 / s[-1]
    s *= scale
    vel = vel * scale
    acc = np.gradient(vel, FINE_DT)
    return s, vel, acc


@dataclass
class Segment:
    """One program step on the fine grid."""

    action: Action
    q: FloatArray  # (n, 6)
    qd: FloatArray
    qdd: FloatArray


@dataclass
class Program:
    """A whole cycle's target motion on the fine grid, with event times (seconds from cycle start)."""

    q: FloatArray
    qd: FloatArray
    qdd: FloatArray
    action: NDArray[np.uint8]
    events: dict[str, float] = field(default_factory=dict)

    @property
    def duration(self) -> float:
        return (len(self.q) - 1) * FINE_DT

    def segment_bounds(self, action: Action) -> tuple[float, float]:
        """Start and end time of a program step."""
        idx = np.flatnonzero(self.action == action)
        return float(idx[0] * FINE_DT), float(idx[-1] * FINE_DT)


def dwell(q: FloatArray, seconds: float, action: Action) -> Segment:
    n = max(round(seconds * FINE_HZ), 1)
    pos = np.repeat(q[None, :], n, axis=0)
    zeros = np.zeros_like(pos)
    return Segment(action, pos, zeros, zeros.copy())


def ptp(
    q0: FloatArray,
    q1: FloatArray,
    v_max: FloatArray,
    a_max: FloatArray,
    action: Action,
    jerk_time: float = 0.06,
) -> Segment:
    """Synchronized joint-space move: the slowest axis sets the time, all axes share its profile."""
    delta = q1 - q0
    dist = np.abs(delta)
    moving = dist > 1e-9
    if not moving.any():
        return dwell(q0, 0.01, action)
    # limits of the normalized profile: every axis must stay within its own limits
    vn = float(np.min(v_max[moving] / dist[moving]))
    an = float(np.min(a_max[moving] / dist[moving]))
    s, sd, sdd = motion_profile(vn, an, jerk_time)
    return Segment(action, q0 + s[:, None] * delta, sd[:, None] * delta, sdd[:, None] * delta)


def linear(
    path_q: FloatArray,
    length_m: float,
    v_max: float,
    a_max: float,
    action: Action,
    jerk_time: float = 0.04,
) -> Segment:
    """Straight Cartesian move given joint configurations at equally spaced path points (IK done)."""
    u = np.linspace(0.0, 1.0, len(path_q))
    spline = CubicSpline(u, path_q, axis=0)
    s, sd, sdd = motion_profile(v_max / length_m, a_max / length_m, jerk_time)
    q = spline(s)
    dq = spline(s, 1)
    ddq = spline(s, 2)
    return Segment(action, q, dq * sd[:, None], ddq * (sd**2)[:, None] + dq * sdd[:, None])


def concatenate(segments: list[Segment]) -> Program:
    q = np.concatenate([seg.q for seg in segments])
    qd = np.concatenate([seg.qd for seg in segments])
    qdd = np.concatenate([seg.qdd for seg in segments])
    action = np.concatenate([np.full(len(seg.q), int(seg.action), dtype=np.uint8) for seg in segments])
    return Program(q=q, qd=qd, qdd=qdd, action=action)
