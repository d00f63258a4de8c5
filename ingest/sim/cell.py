"""The simulated pick-and-place cell: one cycle of the voraus-AD program, with physics.

Chain of effects, per axis, all in joint-side units (rad, Nm):

    arm rigid-body dynamics (pinocchio regressor, true inertial parameters + payload)
      + joint-side disturbances (extra friction, cable, collision wrench, moving base)
      = load torque τ_load                       -> torque sensors a/b, gear wind-up (motor vs joint position)
      + gear friction + rotor inertia            = torque the motor must deliver
      - the controller's model (nominal params)  = disturbance d
    position loop  M ë + K_d ė + K_p e = d       -> tracking error, feedback torque, target torque
    motor: current = torque / K_t (miscommutation: less torque per amp, a d-current), back-EMF, R·i
    power and DC bus: electrical power per axis, bus current and voltage drops, I/O and system currents.

Sensor noise is added last; controller-internal values (targets, computed torque/inertia) are exact.

`CellParams` (ingest/sim/presets.py) makes another cell: factors on the constants below (arm masses,
friction, rotor inertia, speeds, dwells, noise, servo bandwidth), other poses, coloured noise and a
warm-up drift. The default parameters give the original cell bit for bit: every factor of 1 and every
zero is skipped or exact in floating point.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pinocchio as pin
from numpy.typing import NDArray
from scipy import signal as sps

from ingest.sim import trajectory as tr
from ingest.sim.presets import DEFAULT, CellParams
from ingest.sim.robot import Arm
from ingest.sim.scenarios import (
    CAN_MASS,
    COMMUTATION_ERROR,
    FRICTION_EXTRA,
    NORMAL_CAN_MASS,
    PLATFORM_DAMPING,
    CycleSpec,
)
from ingest.voraus.schema import AXIS_SIGNAL_STEMS, MACHINE_SIGNALS, Action, Category, Variant

FloatArray = NDArray[np.float64]
A = Action

# --- drive train, per axis 1..6 -------------------------------------------------------------------
ROTOR_INERTIA = np.array([0.60, 0.60, 0.25, 0.040, 0.040, 0.0017])  # reflected to the joint, kg·m²
COULOMB = np.array([3.0, 3.2, 2.2, 0.80, 0.80, 0.55])  # Nm
VISCOUS = np.array([4.0, 4.2, 3.0, 1.00, 1.00, 0.70])  # Nm·s/rad
KT = np.array([11.0, 11.0, 9.0, 4.5, 4.5, 4.5])  # joint-side torque per amp, Nm/A (= back-EMF V·s/rad)
R_PHASE = np.array([0.45, 0.45, 0.6, 1.3, 1.3, 1.3])  # Ω
L_OMEGA = np.array([0.9, 0.9, 0.8, 0.5, 0.5, 0.5])  # d-axis voltage per (rad/s · A)
GEAR_STIFFNESS = np.array([2.2e4, 2.2e4, 1.2e4, 4.0e3, 4.0e3, 4.0e3])  # Nm/rad
SERVO_HZ = np.array([11.0, 11.0, 13.0, 18.0, 18.0, 20.0])  # position-loop bandwidth per axis
SERVO_DAMPING = 0.85
LAG_S = 0.004  # transport delay of the drive (target to motion)
BRAKE_V = np.array([11.02, 10.97, 11.05, 10.95, 11.01, 10.99])
SUPPLY_DROP = np.array([0.72, 0.76, 0.80, 0.86, 0.90, 0.94])
SENSOR_OFFSET_A = np.array([0.35, -0.42, 0.28, -0.08, 0.06, 0.03])
SENSOR_OFFSET_B = np.array([-0.20, 0.31, -0.25, 0.05, -0.07, 0.02])
SMOOTH_V = 0.02  # rad/s, smoothing of the friction sign function
#: direction and size of each torque sensor's offset drift per Nm of CellParams.sensor_offset_drift
SENSOR_DRIFT_A = np.array([1.0, -0.8, 0.9, -0.3, 0.3, 0.2])
SENSOR_DRIFT_B = np.array([-0.6, 1.0, -0.7, 0.25, -0.3, 0.15])

# --- noise (standard deviation of each measured stem; axis torques scaled for wrist axes) -----------
AXIS_NOISE = {
    "motor_position": 1e-5,
    "motor_velocity": 1.5e-3,
    "joint_position": 2e-5,
    "joint_velocity": 2.5e-3,
    "motor_torque": 0.10,
    "torque_sensor_a": 0.12,
    "torque_sensor_b": 0.15,
    "motor_iq": 0.012,
    "motor_id": 0.012,
    "motor_voltage": 0.04,
    "supply_voltage": 0.008,
    "brake_voltage": 0.015,
}
WRIST_TORQUE_NOISE = np.array([1.0, 1.0, 0.8, 0.35, 0.35, 0.3])
#: resolution of the drives' process data (EtherCAT values are scaled integers)
RESOLUTION = {
    "motor_position": 2 * np.pi / 2**20,
    "joint_position": 2 * np.pi / 2**19,
    "motor_velocity": 1e-4,
    "joint_velocity": 1e-4,
    "motor_torque": 1e-3,
    "torque_sensor_a": 1e-3,
    "torque_sensor_b": 1e-3,
    "motor_iq": 1e-3,
    "motor_id": 1e-3,
    "power_motor_el": 1e-3,
    "power_motor_mech": 1e-3,
    "power_load_mech": 1e-3,
    "motor_voltage": 1e-3,
    "supply_voltage": 1e-3,
    "brake_voltage": 1e-3,
}
ROBOT_RESOLUTION = 1e-3

# --- the cell (metres, base frame) ------------------------------------------------------------------
SCAN_XYZ = np.array([0.42, -0.05, 0.42])
SCAN_TILT_RPY = (0.30, -0.25, 0.0)  # camera pose relative to tool-down (roll, pitch, yaw in rad)
PLACE_XYZ = np.array([0.06, 0.48, 0.07])
CONVEYOR_X = (0.38, 0.56)
CONVEYOR_Y = (-0.22, 0.06)
PICK_Z = 0.07
#: INVALID_POSITION cans lie this far (m) beyond the belt region's far edge or its side
INVALID_MARGIN = (0.005, 0.025)
APPROACH_DZ = 0.12
APPROACH = np.array([0.0, 0.0, APPROACH_DZ])
CAN_RADIUS = 0.033
CAN_HEIGHT = 0.115
V_MAX = np.array([1.25, 1.25, 1.5, 2.0, 2.0, 2.2])
A_MAX = np.array([2.6, 2.6, 3.2, 4.5, 4.5, 5.0])
LIN_V = 0.16  # m/s
LIN_A = 0.6  # m/s²
Q_SEED = np.array([0.0, -1.2, 1.8, -2.17, -1.5708, 0.0])
# the default CellParams are this cell
assert DEFAULT.place_xyz == tuple(PLACE_XYZ)
assert DEFAULT.pick_z == PICK_Z
assert (DEFAULT.conveyor_x, DEFAULT.conveyor_y) == (CONVEYOR_X, CONVEYOR_Y)
assert DEFAULT.servo_damping == SERVO_DAMPING


@dataclass
class _Cycle:
    """Target motion and payload events of one cycle on the fine grid."""

    program: tr.Program
    attach: float  # time the can is held by vacuum (controller's view)
    release: float
    vacuum_on: float
    vacuum_off: float


class CellSimulator:
    """Simulates cycles of the pick-and-place cell at 100 or 500 Hz, in the voraus-AD column layout."""

    def __init__(self, rate_hz: int = 100, urdf: Path | None = None, params: CellParams = DEFAULT) -> None:
        if rate_hz not in (100, 500):
            raise ValueError(f"rate must be 100 or 500 Hz, got {rate_hz}")
        self.rate_hz = rate_hz
        self.step = tr.FINE_HZ // rate_hz
        self.params = p = params
        # the arm: true dynamics and the controller's nominal model are both this (scaled) arm's
        self.arm = Arm(urdf, link_mass_scale=p.link_mass_scale)
        self.rotor_inertia = ROTOR_INERTIA * p.rotor_inertia_scale
        self.coulomb = COULOMB * p.coulomb_scale
        self.viscous = VISCOUS * p.viscous_scale
        self.servo_hz = SERVO_HZ * p.servo_bandwidth
        # the program
        self.scan_xyz = SCAN_XYZ + np.asarray(p.scan_offset)
        self.place_xyz = np.array(p.place_xyz)
        self.conveyor_x, self.conveyor_y, self.pick_z = p.conveyor_x, p.conveyor_y, p.pick_z
        self.v_max, self.a_max = V_MAX * p.ptp_speed, A_MAX * p.ptp_accel
        self.lin_v, self.lin_a = LIN_V * p.lin_speed, LIN_A * p.lin_accel
        # the noise colour: the AR(1) coefficient is per 10 ms, the same correlation time at any rate
        self.noise_ar = p.noise_ar ** (100.0 / rate_hz) if p.noise_ar > 0 else 0.0
        self.down = self.arm.tcp_pose(Q_SEED).rotation  # tool axis pointing down
        # the wrist camera looks at the belt at an angle, so the wrist axes move on the way to scan
        self.q_scan = self._ik(self.scan_xyz, Q_SEED, pin.rpy.rpyToMatrix(*SCAN_TILT_RPY) @ self.down)
        self.q_home = self._ik(self.place_xyz + APPROACH, Q_SEED)
        self.place_path = self._line(self.place_xyz + APPROACH, self.place_xyz, self.q_home)
        self.pi_robot = self.arm.base_params
        self._gravity_on = np.array([0.0, 0.0, -9.81])

    # --- kinematics helpers --------------------------------------------------------------------------
    def _ik(self, xyz: FloatArray, seed: FloatArray, rotation: FloatArray | None = None) -> FloatArray:
        xyz = np.asarray(xyz, dtype=float)
        rotation = self.down if rotation is None else rotation
        # turn the seed's base axis towards the target first: same arm branch, short IK path
        here = self.arm.tcp_pose(seed).translation
        turned = seed.copy()
        turned[0] += np.arctan2(xyz[1], xyz[0]) - np.arctan2(here[1], here[0])
        turned[5] += np.arctan2(xyz[1], xyz[0]) - np.arctan2(here[1], here[0])
        return self.arm.inverse_kinematics(pin.SE3(rotation, xyz), turned)

    def _line(self, start: FloatArray, end: FloatArray, seed: FloatArray, points: int = 7) -> FloatArray:
        path = []
        q = seed
        for u in np.linspace(0.0, 1.0, points):
            q = self._ik(start + u * (end - start), q)
            path.append(q)
        return np.array(path)

    def invalid_range(self, axis: int) -> tuple[float, float]:
        """Where INVALID_POSITION cans lie along x (0) or y (1): just beyond the region's edge.
        (Sums rounded to 1 nm, so that the default cell's bounds are exactly its decimal ones.)"""
        edge = (self.conveyor_x, self.conveyor_y)[axis][1]
        return round(edge + INVALID_MARGIN[0], 9), round(edge + INVALID_MARGIN[1], 9)

    def can_position(
        self, spec: CycleSpec, rng: np.random.Generator, rng_anomaly: np.random.Generator
    ) -> FloatArray:
        xyz = np.array([rng.uniform(*self.conveyor_x), rng.uniform(*self.conveyor_y), self.pick_z])
        if spec.category is Category.INVALID_POSITION:
            # outside the region normal cans arrive in: beyond the far edge or the side of the belt
            if rng_anomaly.random() < 0.5:
                xyz[0] = rng_anomaly.uniform(*self.invalid_range(0))
            else:
                xyz[1] = rng_anomaly.uniform(*self.invalid_range(1))
        return xyz

    def check_reach(self, grid: int = 5) -> None:
        """Raise ValueError unless every can position the cell can make is reachable on the arm's own
        branch: a grid over the belt region and over the INVALID_POSITION strips beyond it, each with
        the approach pose and the linear path down."""
        xs = np.linspace(*self.conveyor_x, grid)
        ys = np.linspace(*self.conveyor_y, grid)
        points = [(x, y) for x in xs for y in ys]
        for hi in self.invalid_range(0):
            points += [(hi, y) for y in ys]
        for hi in self.invalid_range(1):
            points += [(x, hi) for x in xs]
        for x, y in points:
            can = np.array([x, y, self.pick_z])
            try:
                q_over = self._ik(can + APPROACH, self.q_scan)
                path = self._line(can + APPROACH, can, q_over)
            except ValueError as err:
                raise ValueError(f"can position {np.round(can, 3).tolist()} is out of reach: {err}") from err
            travel = float(np.abs(q_over - self.q_scan).max())
            if travel > np.pi or float(np.abs(np.diff(path, axis=0)).max()) > 0.5:
                raise ValueError(
                    f"can position {np.round(can, 3).tolist()} is reached only on another arm branch "
                    f"(joint travel {travel:.2f} rad from the scan pose)"
                )

    def plan(self, can_xyz: FloatArray, rng: np.random.Generator) -> _Cycle:
        """The program: scan, camera, approach, pick, carry, place, retreat."""
        over = can_xyz + APPROACH
        q_over = self._ik(over, self.q_scan)
        down_path = self._line(over, can_xyz, q_over)
        q_pick = down_path[-1]
        jitter = rng.uniform(0.0, 0.012)
        ds = self.params.dwell_scale
        v_max, a_max, lin_v, lin_a = self.v_max, self.a_max, self.lin_v, self.lin_a
        segs = [
            tr.dwell(self.q_home, 0.12 * ds, A.VOID_1),
            tr.ptp(self.q_home, self.q_scan, v_max, a_max, A.TO_SCAN_PTP),
            tr.dwell(self.q_scan, (2.05 + jitter) * ds, A.VOID_2),
            tr.ptp(self.q_scan, q_over, v_max, a_max, A.OVER_OBJECT_PTP),
            tr.dwell(q_over, 0.10 * ds, A.VOID_3),
            tr.linear(down_path, APPROACH_DZ, lin_v, lin_a, A.DOWN_PICK_LIN),
            tr.dwell(q_pick, 0.30 * ds, A.VOID_4),
            tr.linear(down_path[::-1], APPROACH_DZ, lin_v, lin_a, A.UP_PICK_LIN),
            tr.dwell(q_over, 0.10 * ds, A.VOID_5),
            tr.ptp(q_over, self.q_home, v_max, a_max, A.TO_PLACE_PTP),
            tr.dwell(self.q_home, 0.10 * ds, A.VOID_6),
            tr.linear(self.place_path, APPROACH_DZ, lin_v, lin_a, A.DOWN_PLACE_LIN),
            tr.dwell(self.place_path[-1], 0.30 * ds, A.VOID_7),
            tr.linear(self.place_path[::-1], APPROACH_DZ, lin_v, lin_a, A.UP_PLACE_LIN),
            tr.dwell(self.q_home, 0.15 * ds, A.VOID_8),
        ]
        program = tr.concatenate(segs)
        vacuum_on, _ = program.segment_bounds(A.VOID_4)
        vacuum_off, _ = program.segment_bounds(A.VOID_7)
        return _Cycle(
            program,
            attach=vacuum_on + 0.12,
            release=vacuum_off + 0.08,
            vacuum_on=vacuum_on,
            vacuum_off=vacuum_off,
        )

    # --- one cycle -------------------------------------------------------------------------------------
    def simulate(self, spec: CycleSpec, seed: int) -> dict[str, np.ndarray]:
        """All columns of one cycle (meta + 130 signals), as arrays of equal length."""
        # three independent streams, so that an anomalous cycle and its normal twin (same seed and
        # sample) share the can position, the cycle's own variation and the sensor noise
        rng, rng_anomaly, rng_noise = (np.random.default_rng([seed, spec.sample, k]) for k in range(3))
        cat, var = spec.category, spec.variant
        cyc = self.plan(self.can_position(spec, rng, rng_anomaly), rng)
        prog = cyc.program
        idx = np.arange(0, len(prog.q), self.step)
        lag = np.clip(idx - round(LAG_S * tr.FINE_HZ), 0, None)
        t = (idx * tr.FINE_DT).astype(np.float64)
        n = len(idx)
        dt = 1.0 / self.rate_hz
        q_d, qd_d, qdd_d = prog.q[idx], prog.qd[idx], prog.qdd[idx]
        q_r, qd_r, qdd_r = prog.q[lag], prog.qd[lag], prog.qdd[lag]
        action = prog.action[idx]

        # payload: the controller's belief versus what the gripper really holds
        held_nominal = ((t >= cyc.attach) & (t < cyc.release)).astype(float)
        held = held_nominal.copy()
        vacuum = ((t >= cyc.vacuum_on) & (t < cyc.vacuum_off)).astype(float)
        can_mass = NORMAL_CAN_MASS + rng.normal(0.0, 0.0015)
        grip_offset = np.zeros(3)
        if cat is Category.MISS_CAN:
            held[:] = 0.0
            vacuum[:] = 0.0
        elif cat is Category.CAN_WEIGHT:
            can_mass = CAN_MASS[var]
        elif cat is Category.INVALID_POSITION:
            angle = rng_anomaly.uniform(0, 2 * np.pi)
            grip_offset = np.array([np.cos(angle), np.sin(angle), 0.0]) * rng_anomaly.uniform(0.010, 0.018)
        elif cat is Category.LOSE_CAN:
            self._lose_can(var, prog, t, held, vacuum, rng_anomaly)
        pi_can = self.arm.payload_params(
            can_mass, np.array([0, 0, CAN_HEIGHT / 2]) + grip_offset, CAN_RADIUS, CAN_HEIGHT
        )
        pi_can_nominal = self.arm.payload_params(
            NORMAL_CAN_MASS, np.array([0, 0, CAN_HEIGHT / 2]), CAN_RADIUS, CAN_HEIGHT
        )
        pi_true = self.pi_robot.copy()
        if cat is Category.AXIS_WEIGHT:
            axis = spec.axis()
            grams = int(var.name.split("_")[1][:-1])
            pi_true += self.arm.point_mass_params(axis, grams / 1000.0, self.arm.housing_point(axis))

        y_act = self.arm.regressors(q_r, qd_r, qdd_r)
        y_cmd = self.arm.regressors(q_d, qd_d, qdd_d)
        tau_rigid = y_act @ pi_true + held[:, None] * (y_act @ pi_can)
        model_rigid = y_cmd @ self.pi_robot + held_nominal[:, None] * (y_cmd @ pi_can_nominal)

        # joint-side disturbances
        tau_ext = np.zeros((n, 6))
        if cat is Category.AXIS_FRICTION:
            k = spec.axis() - 1
            coulomb, viscous = FRICTION_EXTRA[var.name.split("_")[1]]
            tau_ext[:, k] += coulomb[k] * np.tanh(qd_r[:, k] / SMOOTH_V) + viscous[k] * qd_r[:, k]
        elif cat is Category.ENTANGLED:
            stiffness = np.array([0.0, 1.0, 0.7, 0.05, 0.0, 0.0]) * rng_anomaly.uniform(0.8, 1.2)
            damping = np.array([0.0, 0.5, 0.4, 0.03, 0.0, 0.0])
            tau_ext += stiffness * (q_r - self.q_scan) + damping * qd_r
        elif cat in (Category.COLLISION_FOAM, Category.COLLISION_CABLE, Category.COLLISION_CARTON):
            tau_ext += self._collision(cat, var, prog, t, q_r, qd_r, rng_anomaly)
        elif cat is Category.WOBBLING_STATION:
            tau_ext += self._wobble(var, q_r, qd_r, qdd_r, dt, rng_anomaly)

        tau_load = tau_rigid + tau_ext
        # gear friction falls as the gear warms up over the recording; the controller does not know
        cold = self.coldness(spec.order)
        fric_scale = (1.0 + self.params.friction_drift * cold) * rng.normal(1.0, 0.015, size=6)
        coulomb, viscous, rotor = self.coulomb, self.viscous, self.rotor_inertia
        gear_fric = fric_scale * (coulomb * np.tanh(qd_r / SMOOTH_V) + viscous * qd_r)
        tau_motor = tau_load + gear_fric + rotor * qdd_r
        computed = model_rigid + coulomb * np.tanh(qd_d / SMOOTH_V) + viscous * qd_d + rotor * qdd_d
        commutation = np.zeros(6)
        if cat is Category.MOTOR_COMMUTATION:
            commutation[spec.axis() - 1] = COMMUTATION_ERROR[var.name.split("_")[1]]
        cos_c = np.cos(commutation)
        # the drive only gets cos(δ) of the commanded torque: the position loop has to make up the rest
        disturbance = tau_motor / cos_c - computed

        # position loop: tracking error from the disturbance (per axis, constant effective inertia)
        inertia_diag = self.arm.mass_diagonal(q_d)
        m_eff = inertia_diag.mean(axis=0) + rotor
        err = np.empty((n, 6))
        err_d = np.empty((n, 6))
        wn = 2 * np.pi * self.servo_hz
        zeta = self.params.servo_damping
        for j in range(6):
            kp = m_eff[j] * wn[j] ** 2
            kd = 2 * zeta * wn[j] * m_eff[j]
            den = [m_eff[j], kd, kp]
            b, a = sps.bilinear([1.0], den, fs=self.rate_hz)
            err[:, j] = sps.lfilter(b, a, disturbance[:, j])
            b, a = sps.bilinear([1.0, 0.0], den, fs=self.rate_hz)
            err_d[:, j] = sps.lfilter(b, a, disturbance[:, j])
        kp_all = m_eff * wn**2
        kd_all = 2 * zeta * wn * m_eff
        q = q_r - err
        qd = qd_r - err_d
        target_torque = computed + kp_all * err + kd_all * err_d

        # motor and drive electronics
        iq = target_torque / KT
        id_ = -0.012 * qd * iq + iq * np.sin(commutation) + rng.normal(0, 0.002, size=6)
        windup = tau_load / GEAR_STIFFNESS
        motor_pos = q + windup
        motor_vel = qd + np.gradient(windup, dt, axis=0)
        u_q = R_PHASE * iq + KT * qd
        u_d = R_PHASE * id_ - L_OMEGA * qd * iq
        p_el = u_q * iq + u_d * id_

        # DC bus and cell electrics
        i_bus = (np.where(p_el > 0, p_el, 0.3 * p_el).sum(axis=1) + 38.0) / 48.0
        robot_voltage = 48.62 - 0.035 * i_bus + rng.normal(0, 0.01)
        io_current = 0.08 + 0.34 * _first_order(vacuum, 0.04, dt)
        system_current = 1.06 + 0.008 * i_bus
        offset_a, offset_b = SENSOR_OFFSET_A, SENSOR_OFFSET_B
        if self.params.sensor_offset_drift:
            warm = self.params.sensor_offset_drift * (1.0 - cold)  # grows as the cell warms up
            offset_a = offset_a + warm * SENSOR_DRIFT_A
            offset_b = offset_b + warm * SENSOR_DRIFT_B

        axis_values: dict[str, FloatArray] = {
            "target_position": q_d,
            "target_velocity": qd_d,
            "target_acceleration": qdd_d,
            "target_torque": target_torque,
            "computed_inertia": inertia_diag + rotor,
            "computed_torque": computed,
            "motor_position": motor_pos,
            "motor_velocity": motor_vel,
            "joint_position": q,
            "joint_velocity": qd,
            "motor_torque": KT * iq,
            "torque_sensor_a": tau_load + offset_a,
            "torque_sensor_b": 1.006 * tau_load + offset_b,
            "motor_iq": iq,
            "motor_id": id_,
            "power_motor_el": p_el,
            "power_motor_mech": np.empty_like(p_el),  # set from measurements below
            "power_load_mech": np.empty_like(p_el),
            "motor_voltage": np.hypot(u_q, u_d),
            "supply_voltage": robot_voltage[..., None] - SUPPLY_DROP - 0.025 * i_bus[:, None],
            "brake_voltage": np.broadcast_to(BRAKE_V, (n, 6)),
        }
        noise = self._noise
        for stem, sigma in AXIS_NOISE.items():
            scale = WRIST_TORQUE_NOISE if "torque" in stem else 1.0
            white = rng_noise.normal(0.0, 1.0, size=(n, 6))
            axis_values[stem] = axis_values[stem] + noise(white) * sigma * scale
        # the drives compute mechanical powers from their own (noisy) measurements
        axis_values["power_motor_mech"] = axis_values["motor_torque"] * axis_values["motor_velocity"]
        axis_values["power_load_mech"] = axis_values["torque_sensor_a"] * axis_values["joint_velocity"]
        axis_values["power_motor_el"] = p_el + noise(rng_noise.normal(0.0, 0.03, size=(n, 6)))
        for stem, res in RESOLUTION.items():
            axis_values[stem] = np.round(axis_values[stem] / res) * res

        cols: dict[str, np.ndarray] = {
            "time": t,
            "sample": np.full(n, spec.sample, dtype=np.int64),
            "anomaly": np.full(n, spec.anomaly, dtype=bool),
            "category": np.full(n, int(cat), dtype=np.int64),
            "setting": np.full(n, int(var), dtype=np.int64),
            "action": action.astype(np.uint8),
            "active": (action % 2 == 1).astype(np.int64),
            "robot_voltage": _quantize(robot_voltage + noise(rng_noise.normal(0, 0.012, n))),
            "robot_current": _quantize(i_bus + noise(rng_noise.normal(0, 0.025, n))),
            "io_current": _quantize(io_current + noise(rng_noise.normal(0, 0.004, n))),
            "system_current": _quantize(system_current + noise(rng_noise.normal(0, 0.006, n))),
        }
        for axis in range(6):
            for stem in AXIS_SIGNAL_STEMS:
                cols[f"{stem}_{axis + 1}"] = np.ascontiguousarray(
                    axis_values[stem][:, axis], dtype=np.float64
                )
        assert list(cols)[7:] == list(MACHINE_SIGNALS)
        return cols

    # --- the cell's own variation: warm-up and sensor noise ------------------------------------------
    def coldness(self, order: float) -> float:
        """How cold the gears are at `order` (0..1 through the recording): 1 at the start, falling to
        0 (linear, the default) or exponentially with time constant drift_tau."""
        tau = self.params.drift_tau
        return 1.0 - order if tau == 0 else float(np.exp(-order / tau))

    def _noise(self, white: FloatArray) -> FloatArray:
        """Sensor noise from white noise of the wanted std (along time, axis 0): coloured by AR(1) and
        scaled by the noise level; the marginal std stays the white noise's × noise_level (the filter
        starts in its stationary state). Identity for the default cell."""
        out = white
        phi = self.noise_ar
        if phi > 0:
            gain = np.sqrt(1.0 - phi * phi)
            out, _ = sps.lfilter([gain], [1.0, -phi], white, axis=0, zi=(1.0 - gain) * white[:1])
        if self.params.noise_level != 1.0:
            out = out * self.params.noise_level
        return np.asarray(out)

    # --- anomaly mechanics ---------------------------------------------------------------------------
    def _lose_can(
        self,
        var: Variant,
        prog: tr.Program,
        t: FloatArray,
        held: FloatArray,
        vacuum: FloatArray,
        rng: np.random.Generator,
    ) -> None:
        """The can leaves the gripper during the carry; LOSE_* variants open the vacuum valve briefly."""
        start, end = prog.segment_bounds(A.TO_PLACE_PTP)
        delays = {
            Variant.DROP_100MS: 0.1,
            Variant.DROP_200MS: 0.2,
            Variant.DROP_1100MS: 1.1,
            Variant.DROP_1400MS: 1.4,
            Variant.LOSE_200MS: 0.2,
            Variant.LOSE_300MS: 0.3,
        }
        if var is Variant.LOSE_PLACE_100MS:
            start, _ = prog.segment_bounds(A.DOWN_PLACE_LIN)
            t_drop = start + 0.1
        elif var is Variant.DEFECT_GRIPPER_DROP_CAN:
            t_drop = rng.uniform(start, end)
        else:
            t_drop = min(start + delays[var], end - 0.05)
        held[t >= t_drop] = 0.0
        if var in (Variant.LOSE_200MS, Variant.LOSE_300MS):
            width = delays[var]
            vacuum[(t >= t_drop - width) & (t < t_drop)] = 0.0

    def _collision(
        self,
        cat: Category,
        var: Variant,
        prog: tr.Program,
        t: FloatArray,
        q: FloatArray,
        qd: FloatArray,
        rng: np.random.Generator,
    ) -> FloatArray:
        """A short external force on the tool against the motion: soft foam, hanging cable, light carton."""
        peak, duration = {
            Variant.LARGE_FULL: (7.0, 0.32),
            Variant.SMALL_FULL: (4.5, 0.24),
            Variant.LARGE_HANGING_FULL: (4.0, 0.45),
            Variant.SMALL_HANGING_FULL: (3.0, 0.40),
            Variant.LAN: (2.5, 0.60),
            Variant.CONNECTOR_TOP: (3.5, 0.35),
            Variant.FULL_A: (3.0, 0.12),
            Variant.FULL_B: (2.2, 0.10),
        }[var]
        peak *= rng.uniform(0.8, 1.2)
        move = A.TO_PLACE_PTP if rng.random() < 0.6 else A.OVER_OBJECT_PTP
        seg_start, seg_end = prog.segment_bounds(move)
        t0 = rng.uniform(seg_start + 0.15 * (seg_end - seg_start), seg_end - 0.2 * (seg_end - seg_start))
        hit = np.flatnonzero((t >= t0) & (t < t0 + duration))
        tau = np.zeros((len(t), 6))
        if len(hit) == 0:
            return tau
        # foam blocks and hanging cables meet the arm at the forearm's end; a carton meets the tool
        contact = "tcp" if cat is Category.COLLISION_CARTON else "wrist_1_link"
        jac0 = self.arm.point_jacobian(q[hit[0]], contact)
        vel = jac0 @ qd[hit[0]]
        direction = -vel / max(float(np.linalg.norm(vel)), 1e-6)
        if cat is Category.COLLISION_CABLE or "HANGING" in var.name:
            direction = direction + np.array([0.0, 0.0, -0.5])  # the hanging object also pulls down
        for i in hit:
            force = peak * np.sin(np.pi * (t[i] - t0) / duration) * direction
            tau[i] = -self.arm.point_jacobian(q[i], contact).T @ force  # motors counter the force
        return tau

    def _wobble(
        self,
        var: Variant,
        q: FloatArray,
        qd: FloatArray,
        qdd: FloatArray,
        dt: float,
        rng: np.random.Generator,
    ) -> FloatArray:
        """An unstable platform: the base, a damped spring-mass, is shaken by the arm's reaction forces;
        the arm then works in an accelerating frame (gravity minus base acceleration)."""
        zeta = PLATFORM_DAMPING[var]
        mass = 55.0
        wn = 2 * np.pi * rng.uniform(4.2, 5.0)
        reaction = -self.arm.total_mass * self.arm.com_acceleration(q, qd, qdd)[:, :2]
        b, a = sps.bilinear([1.0, 0.0, 0.0], [mass, 2 * zeta * wn * mass, mass * wn**2], fs=1.0 / dt)
        base_acc = sps.lfilter(b, a, reaction, axis=0)
        gravity_delta = np.zeros((len(q), 3))
        gravity_delta[:, :2] = -base_acc
        return self.arm.gravity_torques(q, gravity_delta)


def _quantize(x: FloatArray, res: float = ROBOT_RESOLUTION) -> FloatArray:
    return np.round(x / res) * res


def _first_order(x: FloatArray, tau: float, dt: float) -> FloatArray:
    alpha = dt / (tau + dt)
    out = sps.lfilter([alpha], [1.0, alpha - 1.0], x)
    return np.asarray(out)
