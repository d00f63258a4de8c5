"""The arm: a pinocchio model of a UR5-class robot with gripper, and the few kinematics and dynamics
quantities the cell simulator needs (inverse kinematics, torque regressor, mass matrix)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from importlib import resources
from pathlib import Path

import numpy as np
import pinocchio as pin
from numpy.typing import NDArray

FloatArray = NDArray[np.float64]

URDF_NAME = "ur5_cell.urdf"
TCP_FRAME = "tcp"
N_PARAMS = 10  # inertial parameters per body: m, m·c (3), inertia about the joint origin (6)


def default_urdf() -> Path:
    return Path(str(resources.files("ingest.sim").joinpath(URDF_NAME)))


class Arm:
    """Kinematics and dynamics of the 6-axis arm, from a URDF, via pinocchio."""

    def __init__(self, urdf: Path | None = None, link_mass_scale: Sequence[float] | None = None) -> None:
        """`link_mass_scale`: a factor per moving link 1..6 on its mass and inertia (a denser link of
        the same shape: the centre of mass stays), applied to the model itself, so every dynamics
        quantity below (regressor parameters, mass matrix, gravity, total mass) is the scaled arm's."""
        path = urdf or default_urdf()
        if not path.is_file():
            raise FileNotFoundError(f"robot model {path} not found")
        self.model = pin.buildModelFromUrdf(str(path))
        if self.model.nq != 6 or self.model.nv != 6:
            raise ValueError(f"{path}: expected a 6-axis arm, got nq={self.model.nq}")
        self.data = self.model.createData()
        self.tcp = self.model.getFrameId(TCP_FRAME)
        if self.tcp >= self.model.nframes:
            raise ValueError(f"{path}: no frame named {TCP_FRAME!r}")
        if link_mass_scale is not None:
            scale = [float(x) for x in link_mass_scale]
            if len(scale) != self.model.njoints - 1:
                raise ValueError(f"link_mass_scale needs {self.model.njoints - 1} factors, got {len(scale)}")
            for j, factor in enumerate(scale, start=1):
                if factor != 1.0:
                    inertia = self.model.inertias[j]
                    self.model.inertias[j] = pin.Inertia(
                        inertia.mass * factor, inertia.lever.copy(), inertia.inertia * factor
                    )
            self.data = self.model.createData()
        self.q_lower = np.full(6, -2 * np.pi)
        self.q_upper = np.full(6, 2 * np.pi)

    # --- inertial parameters -------------------------------------------------------------------
    @cached_property
    def base_params(self) -> FloatArray:
        """The nominal inertial parameter vector (60,) of the six moving bodies."""
        return np.concatenate(
            [self.model.inertias[j].toDynamicParameters() for j in range(1, self.model.njoints)]
        )

    def tcp_in_last_joint(self) -> pin.SE3:
        return self.model.frames[self.tcp].placement

    def point_mass_params(self, joint: int, mass: float, point_in_joint: FloatArray) -> FloatArray:
        """Parameter increment (60,) of a point-like mass attached to body `joint` (1..6)."""
        inertia = pin.Inertia(mass, np.asarray(point_in_joint, dtype=float), np.eye(3) * 1e-6 * mass)
        delta = np.zeros(6 * N_PARAMS)
        delta[(joint - 1) * N_PARAMS : joint * N_PARAMS] = inertia.toDynamicParameters()
        return delta

    def payload_params(self, mass: float, com_in_tcp: FloatArray, radius: float, height: float) -> FloatArray:
        """Parameter increment (60,) of a cylindrical payload held at the TCP."""
        ixx = mass * (3 * radius**2 + height**2) / 12.0
        izz = mass * radius**2 / 2.0
        local = pin.Inertia(mass, np.asarray(com_in_tcp, dtype=float), np.diag([ixx, ixx, izz]))
        in_joint = self.tcp_in_last_joint().act(local)
        delta = np.zeros(6 * N_PARAMS)
        delta[5 * N_PARAMS :] = in_joint.toDynamicParameters()
        return delta

    def housing_point(self, joint: int, radius: float = 0.07) -> FloatArray:
        """A point on the outside of body `joint`'s housing: beside its centre of mass, `radius` off
        the joint axis (where a weight strapped to the axis sits)."""
        # every joint of this arm turns about its local y or z axis, so local x is always radial
        lever = np.asarray(self.model.inertias[joint].lever, dtype=float)
        return lever + np.array([radius, 0.0, 0.0])

    # --- dynamics along a trajectory ----------------------------------------------------------------
    def regressors(self, q: FloatArray, qd: FloatArray, qdd: FloatArray) -> FloatArray:
        """Joint torque regressors Y(t) (T, 6, 60): τ(t) = Y(t) @ π for any inertial parameters π."""
        out = np.empty((len(q), 6, 6 * N_PARAMS))
        for i in range(len(q)):
            out[i] = pin.computeJointTorqueRegressor(self.model, self.data, q[i], qd[i], qdd[i])
        return out

    def mass_diagonal(self, q: FloatArray) -> FloatArray:
        """Diagonal of the joint-space mass matrix along a trajectory (T, 6)."""
        out = np.empty((len(q), 6))
        for i in range(len(q)):
            out[i] = np.diag(pin.crba(self.model, self.data, q[i]))
        return out

    def point_jacobian(self, q: FloatArray, frame: str = TCP_FRAME) -> FloatArray:
        """Linear part of a frame's Jacobian (the TCP by default) in world-aligned axes (3, 6)."""
        fid = self.tcp if frame == TCP_FRAME else self.model.getFrameId(frame)
        jac = pin.computeFrameJacobian(self.model, self.data, q, fid, pin.LOCAL_WORLD_ALIGNED)
        return np.asarray(jac[:3])

    def com_acceleration(self, q: FloatArray, qd: FloatArray, qdd: FloatArray) -> FloatArray:
        """Acceleration of the arm's centre of mass (T, 3) and its total mass via `total_mass`."""
        out = np.empty((len(q), 3))
        for i in range(len(q)):
            pin.centerOfMass(self.model, self.data, q[i], qd[i], qdd[i])
            out[i] = self.data.acom[0]
        return out

    @cached_property
    def total_mass(self) -> float:
        return float(sum(self.model.inertias[j].mass for j in range(1, self.model.njoints)))

    def gravity_torques(self, q: FloatArray, gravity: FloatArray) -> FloatArray:
        """Gravity torques (T, 6) for a per-step gravity vector (T, 3) (e.g. a moving base)."""
        saved = self.model.gravity.linear.copy()
        out = np.empty((len(q), 6))
        try:
            for i in range(len(q)):
                self.model.gravity.linear = gravity[i]
                out[i] = pin.computeGeneralizedGravity(self.model, self.data, q[i])
        finally:
            self.model.gravity.linear = saved
        return out

    # --- kinematics ----------------------------------------------------------------------------
    def tcp_pose(self, q: FloatArray) -> pin.SE3:
        pin.framesForwardKinematics(self.model, self.data, q)
        return self.data.oMf[self.tcp].copy()

    def inverse_kinematics(
        self, target: pin.SE3, seed: FloatArray, *, tol: float = 1e-9, max_iter: int = 200
    ) -> FloatArray:
        """Damped least-squares IK for the TCP pose; raises if the pose is out of reach."""
        q = np.array(seed, dtype=float)
        damping = 1e-6
        err = np.inf
        for _ in range(max_iter):
            pin.framesForwardKinematics(self.model, self.data, q)
            current = self.data.oMf[self.tcp]
            err_vec = pin.log6(current.actInv(target)).vector
            err = float(err_vec @ err_vec)
            if err < tol:
                return q
            jac = pin.computeFrameJacobian(self.model, self.data, q, self.tcp, pin.LOCAL)
            jlog = pin.Jlog6(current.actInv(target))
            j = -jlog @ jac
            step = -j.T @ np.linalg.solve(j @ j.T + damping * np.eye(6), err_vec)
            norm = float(np.linalg.norm(step))
            if norm > 0.3:  # trust region: keeps the solution on the seed's branch
                step *= 0.3 / norm
            q = pin.integrate(self.model, q, step)
            q = seed + (q - seed + np.pi) % (2 * np.pi) - np.pi
        raise ValueError(f"IK did not converge for {target.translation} (residual {err:.2e})")
