"""The cell simulator: normal cycles look like the real cell, and every anomaly category moves the
signals it physically should — checked against the anomaly's *normal twin* (same seed and sample:
same can position, same cycle variation, same sensor noise; only the anomaly removed)."""

from __future__ import annotations

import numpy as np
import pinocchio as pin
import pytest

from ingest.sim.cell import CONVEYOR_X, CONVEYOR_Y, CellSimulator
from ingest.sim.scenarios import CycleSpec
from ingest.voraus.schema import MACHINE_SIGNALS, META_COLUMNS, META_DTYPES, Action, Category, Variant

SEED = 11


@pytest.fixture(scope="module")
def sim() -> CellSimulator:
    return CellSimulator(100)


def cycle(sim: CellSimulator, category: Category, variant: Variant, sample: int = 3) -> dict[str, np.ndarray]:
    return sim.simulate(CycleSpec(sample, category, variant, 0.5), SEED)


def twins(sim: CellSimulator, category: Category, variant: Variant, sample: int = 3):
    anomalous = cycle(sim, category, variant, sample)
    normal = cycle(sim, Category.NORMAL_OPERATION, Variant.PRE_B, sample)
    return anomalous, normal


def phase(c: dict[str, np.ndarray], action: Action) -> np.ndarray:
    return c["action"] == int(action)


@pytest.fixture(scope="module")
def normals(sim: CellSimulator) -> list[dict[str, np.ndarray]]:
    return [cycle(sim, Category.NORMAL_OPERATION, Variant.PRE_A, sample=s) for s in range(12)]


# --- normal operation -----------------------------------------------------------------------------
def test_cycle_has_every_column_with_the_published_dtype(sim: CellSimulator) -> None:
    c = cycle(sim, Category.NORMAL_OPERATION, Variant.PRE_A)
    assert list(c) == list(META_COLUMNS) + list(MACHINE_SIGNALS)
    for name in META_COLUMNS:
        assert c[name].dtype == META_DTYPES[name], name
    for name in MACHINE_SIGNALS:
        assert c[name].dtype == np.float64, name
        assert np.isfinite(c[name]).all(), name
    assert len({len(v) for v in c.values()}) == 1


def test_normal_cycle_runs_the_program_in_order(normals: list[dict[str, np.ndarray]]) -> None:
    for c in normals:
        steps = c["action"][np.flatnonzero(np.diff(c["action"].astype(int), prepend=-1))]
        assert steps.tolist() == list(range(15))
        assert 10.5 < c["time"][-1] < 13.0  # the real cycle is about 11.5 s
        assert np.allclose(np.diff(c["time"]), 0.01)
        moving = np.abs(c["target_velocity_1"]) + np.abs(c["target_velocity_2"]) > 1e-6
        assert (c["active"][moving] == 1).all()
        assert (c["active"][c["action"] % 2 == 0] == 0).all()


def test_normal_cycles_have_realistic_magnitudes(normals: list[dict[str, np.ndarray]]) -> None:
    for c in normals:
        assert abs(np.median(c["robot_voltage"]) - 48.6) < 0.15
        for axis in range(1, 7):
            assert 47.4 < np.median(c[f"supply_voltage_{axis}"]) < 47.95
            assert abs(np.median(c[f"brake_voltage_{axis}"]) - 11.0) < 0.1
        # shoulder and elbow hold the arm against gravity
        assert 10 < np.abs(c["torque_sensor_a_2"]).max() < 80
        assert 5 < np.abs(c["torque_sensor_a_3"]).max() < 60
        assert np.median(c["computed_inertia_6"]) == pytest.approx(0.0022, rel=0.1)


def test_first_seconds_are_near_identical_and_variance_starts_with_the_can(
    normals: list[dict[str, np.ndarray]],
) -> None:
    n = min(len(c["time"]) for c in normals)
    pos = np.stack([c["target_position_1"][:n] for c in normals])
    early = pos[:, :400].std(axis=0).max()  # first 4 s: move to the scan position, camera
    late = pos[:, 500:].std(axis=0).max()
    assert early < 1e-3
    assert late > 0.05


def test_normal_statistics_stay_within_tolerance(normals: list[dict[str, np.ndarray]]) -> None:
    """Cycle-to-cycle variation of a still phase is noise-level; motion torques vary but stay bounded."""
    scan_hold = [np.mean(c["torque_sensor_a_2"][phase(c, Action.VOID_2)]) for c in normals]
    assert np.std(scan_hold) < 0.3  # Nm: the arm holds the same pose in every cycle
    peaks = [np.abs(c["motor_torque_2"]).max() for c in normals]
    assert np.std(peaks) / np.mean(peaks) < 0.25


def test_same_seed_same_cycle_other_seed_other_cycle(sim: CellSimulator) -> None:
    a = sim.simulate(CycleSpec(5, Category.COLLISION_FOAM, Variant.LARGE_FULL, 0.5), 1)
    b = sim.simulate(CycleSpec(5, Category.COLLISION_FOAM, Variant.LARGE_FULL, 0.5), 1)
    c = sim.simulate(CycleSpec(5, Category.COLLISION_FOAM, Variant.LARGE_FULL, 0.5), 2)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["motor_torque_1"][: len(c["time"])], c["motor_torque_1"][: len(a["time"])])


# --- anomalies --------------------------------------------------------------------------------------
@pytest.mark.parametrize("axis", [1, 2, 3, 4, 5, 6])
def test_friction_raises_motor_torque_of_that_axis_during_motion(sim: CellSimulator, axis: int) -> None:
    """Friction opposes the motion: the motor needs more torque *in the direction of motion*. (|torque|
    itself can drop where gravity already pulls the way the axis moves: friction then helps hold.)"""
    anomalous, normal = twins(sim, Category.AXIS_FRICTION, Variant[f"A{axis}_B"])
    velocity = normal[f"target_velocity_{axis}"]
    moving = np.abs(velocity) > 0.05
    assert moving.sum() > 50
    delta = anomalous[f"motor_torque_{axis}"] - normal[f"motor_torque_{axis}"]
    extra = float(np.mean(delta[moving] * np.sign(velocity[moving])))
    assert extra > 0.15  # Nm, against a noise of ~0.1 Nm per sample averaged over hundreds of samples
    # and the axis dissipates more mechanical power
    power = (
        anomalous[f"power_motor_mech_{axis}"][moving].mean()
        - normal[f"power_motor_mech_{axis}"][moving].mean()
    )
    assert power > 0
    for other in set(range(1, 7)) - {axis}:
        d = np.abs(anomalous[f"motor_torque_{other}"] - normal[f"motor_torque_{other}"]).mean()
        assert d < 0.2 * extra, f"axis {other} moved too"


def test_level_b_friction_is_stronger_than_level_a(sim: CellSimulator) -> None:
    a, normal = twins(sim, Category.AXIS_FRICTION, Variant.A2_A)
    b, _ = twins(sim, Category.AXIS_FRICTION, Variant.A2_B)
    moving = np.abs(normal["target_velocity_2"]) > 0.05

    direction = np.sign(normal["target_velocity_2"][moving])

    def excess(c):
        return np.mean((c["motor_torque_2"][moving] - normal["motor_torque_2"][moving]) * direction)

    assert excess(b) > 1.5 * excess(a) > 0


def test_extra_link_mass_changes_the_holding_torque(sim: CellSimulator) -> None:
    hold = {}
    for grams in (115, 231, 500):
        anomalous, normal = twins(sim, Category.AXIS_WEIGHT, Variant[f"A3_{grams}G"])
        still = phase(normal, Action.VOID_2)
        hold[grams] = np.mean(anomalous["torque_sensor_a_2"][still] - normal["torque_sensor_a_2"][still])
    # more mass on the forearm -> more gravity torque on the shoulder, in proportion
    assert abs(hold[500]) > abs(hold[231]) > abs(hold[115]) > 0.05
    assert hold[500] / hold[115] == pytest.approx(500 / 115, rel=0.25)


@pytest.mark.parametrize(
    ("category", "variant"),
    [
        (Category.COLLISION_FOAM, Variant.LARGE_FULL),
        (Category.COLLISION_CABLE, Variant.LAN),
        (Category.COLLISION_CARTON, Variant.FULL_A),
    ],
)
def test_collision_is_a_short_torque_event(sim: CellSimulator, category: Category, variant: Variant) -> None:
    anomalous, normal = twins(sim, category, variant)
    diff = (
        np.abs(anomalous["torque_sensor_a_1"] - normal["torque_sensor_a_1"])
        + np.abs(anomalous["torque_sensor_a_2"] - normal["torque_sensor_a_2"])
        + np.abs(anomalous["torque_sensor_a_3"] - normal["torque_sensor_a_3"])
    )
    assert diff.max() > 0.3
    touched = np.flatnonzero(diff > 0.02)
    # a short event (force pulse plus the position loop settling), not a change of the whole cycle
    assert (touched[-1] - touched[0]) * 0.01 < 1.0
    assert diff[: touched[0]].max(initial=0.0) == 0.0  # identical to its twin before the contact


def test_can_weight_scales_the_carry_torque(sim: CellSimulator) -> None:
    normal = cycle(sim, Category.NORMAL_OPERATION, Variant.PRE_B)
    carry = phase(normal, Action.TO_PLACE_PTP)
    before = phase(normal, Action.OVER_OBJECT_PTP)

    def shoulder(c):
        return c["torque_sensor_a_2"][carry].mean()

    light = cycle(sim, Category.CAN_WEIGHT, Variant.EMPTY)
    heavy = cycle(sim, Category.CAN_WEIGHT, Variant.INCREASE_407G)
    # gravity pulls the shoulder torque negative; a heavier can pulls harder
    assert shoulder(heavy) < shoulder(normal) < shoulder(light)
    assert np.array_equal(heavy["torque_sensor_a_2"][before], normal["torque_sensor_a_2"][before])


@pytest.mark.parametrize("variant", [Variant.DROP_100MS, Variant.DROP_1100MS, Variant.LOSE_300MS])
def test_losing_the_can_unloads_the_arm_mid_move(sim: CellSimulator, variant: Variant) -> None:
    anomalous, normal = twins(sim, Category.LOSE_CAN, variant)
    carry = np.flatnonzero(phase(normal, Action.TO_PLACE_PTP))
    diff = np.abs(anomalous["torque_sensor_a_2"] - normal["torque_sensor_a_2"])
    changed = np.flatnonzero(diff > 0.2)
    assert len(changed) > 0
    assert carry[0] <= changed[0] <= carry[-1]  # starts during the carry, not before
    arrival = phase(normal, Action.DOWN_PLACE_LIN)
    assert diff[arrival].mean() > 0.5  # the arm arrives at the place position without the can's weight


def test_misgrip_never_holds_the_can(sim: CellSimulator) -> None:
    anomalous, normal = twins(sim, Category.MISS_CAN, Variant.NO_VACUUM)
    carry = phase(normal, Action.TO_PLACE_PTP)
    assert normal["io_current"][carry].mean() > 0.35  # vacuum valve on while carrying
    assert anomalous["io_current"][carry].mean() < 0.15
    assert np.abs(anomalous["torque_sensor_a_2"][carry] - normal["torque_sensor_a_2"][carry]).mean() > 0.5


def test_cable_at_robot_adds_elastic_torque_on_the_arm_axes_only(sim: CellSimulator) -> None:
    anomalous, normal = twins(sim, Category.ENTANGLED, Variant.CABLE)
    for axis in (2, 3):
        assert np.abs(anomalous[f"torque_sensor_a_{axis}"] - normal[f"torque_sensor_a_{axis}"]).mean() > 0.1
    for axis in (5, 6):
        assert np.abs(anomalous[f"torque_sensor_a_{axis}"] - normal[f"torque_sensor_a_{axis}"]).max() < 0.05


def test_invalid_gripping_position_is_outside_the_normal_region(sim: CellSimulator) -> None:
    for sample in range(4):
        anomalous, _ = twins(sim, Category.INVALID_POSITION, Variant.PICK, sample)
        grip = np.flatnonzero(phase(anomalous, Action.VOID_4))[0]
        q = np.array([anomalous[f"target_position_{k}"][grip] for k in range(1, 7)])
        pin.framesForwardKinematics(sim.arm.model, sim.arm.data, q)
        x, y, _ = sim.arm.data.oMf[sim.arm.tcp].translation
        assert x > CONVEYOR_X[1] or y > CONVEYOR_Y[1]
        # ... but only just: a plausible position, not a different program
        assert x < CONVEYOR_X[1] + 0.05
        assert y < CONVEYOR_Y[1] + 0.05


@pytest.mark.parametrize("axis", [2, 4])
def test_miscommutation_costs_current_and_shows_a_d_current(sim: CellSimulator, axis: int) -> None:
    anomalous, normal = twins(sim, Category.MOTOR_COMMUTATION, Variant[f"A{axis}_MEDIUM"])
    iq_a, iq_n = anomalous[f"motor_iq_{axis}"], normal[f"motor_iq_{axis}"]
    loaded = np.abs(iq_n) > 0.3
    ratio = np.abs(iq_a[loaded]).mean() / np.abs(iq_n[loaded]).mean()
    assert ratio == pytest.approx(1 / np.cos(np.deg2rad(6.0)), abs=0.01)  # less torque per amp
    id_gain = (
        np.abs(anomalous[f"motor_id_{axis}"][loaded]).mean()
        - np.abs(normal[f"motor_id_{axis}"][loaded]).mean()
    )
    assert id_gain > 0.05 * np.abs(iq_n[loaded]).mean()
    # the joint itself sees the same load: torque sensors agree with the twin to noise level
    d = anomalous[f"torque_sensor_a_{axis}"] - normal[f"torque_sensor_a_{axis}"]
    assert np.abs(d).mean() < 0.05


def test_unstable_platform_oscillates_more_with_less_damping(sim: CellSimulator) -> None:
    amplitude = {}
    for variant in (Variant.LOW_DAMPING, Variant.HIGH_DAMPING):
        anomalous, normal = twins(sim, Category.WOBBLING_STATION, variant)
        amplitude[variant] = np.std(anomalous["torque_sensor_a_2"] - normal["torque_sensor_a_2"])
    assert amplitude[Variant.LOW_DAMPING] > amplitude[Variant.HIGH_DAMPING] > 0.01
