"""What each simulated cycle is: the anomaly category, its variant and the physical parameters,
and the composition of a whole recording (paper-sized by default)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ingest.voraus.schema import ANOMALY_CATEGORIES, Category, Variant

#: Cycle counts of the published set: training normals, test normals, test anomalies per category.
PAPER_TRAIN_NORMALS = 948
PAPER_TEST_NORMALS = 419
PAPER_ANOMALY_COUNTS: dict[Category, int] = {
    Category.AXIS_FRICTION: 144,
    Category.AXIS_WEIGHT: 156,
    Category.COLLISION_FOAM: 72,
    Category.COLLISION_CABLE: 48,
    Category.COLLISION_CARTON: 22,
    Category.MISS_CAN: 11,
    Category.LOSE_CAN: 74,
    Category.CAN_WEIGHT: 80,
    Category.ENTANGLED: 10,
    Category.INVALID_POSITION: 12,
    Category.MOTOR_COMMUTATION: 89,
    Category.WOBBLING_STATION: 37,
}
assert sum(PAPER_ANOMALY_COUNTS.values()) == 755

V = Variant
CATEGORY_VARIANTS: dict[Category, tuple[Variant, ...]] = {
    Category.AXIS_FRICTION: (
        V.A1_A,
        V.A1_B,
        V.A2_A,
        V.A2_B,
        V.A3_A,
        V.A3_B,
        V.A4_A,
        V.A4_B,
        V.A5_A,
        V.A5_B,
        V.A6_A,
        V.A6_B,
    ),
    Category.AXIS_WEIGHT: tuple(
        Variant[f"A{axis}_{grams}G"] for axis in range(1, 7) for grams in (115, 231, 500)
    ),
    Category.COLLISION_FOAM: (V.LARGE_FULL, V.SMALL_FULL, V.LARGE_HANGING_FULL, V.SMALL_HANGING_FULL),
    Category.COLLISION_CABLE: (V.LAN, V.CONNECTOR_TOP),
    Category.COLLISION_CARTON: (V.FULL_A, V.FULL_B),
    Category.MISS_CAN: (V.NO_VACUUM,),
    Category.LOSE_CAN: (
        V.DROP_100MS,
        V.DROP_200MS,
        V.DROP_1100MS,
        V.DROP_1400MS,
        V.LOSE_200MS,
        V.LOSE_300MS,
        V.LOSE_PLACE_100MS,
        V.DEFECT_GRIPPER_DROP_CAN,
    ),
    Category.CAN_WEIGHT: (
        V.EMPTY,
        V.DECREASE_165G,
        V.DECREASE_95G,
        V.INCREASE_242G,
        V.INCREASE_373G,
        V.INCREASE_407G,
    ),
    Category.ENTANGLED: (V.CABLE,),
    Category.INVALID_POSITION: (V.PICK,),
    Category.MOTOR_COMMUTATION: (
        V.A1_HIGH,
        V.A1_MEDIUM,
        V.A2_MEDIUM,
        V.A3_MEDIUM,
        V.A4_MEDIUM,
        V.A5_MEDIUM,
        V.A6_MEDIUM,
    ),
    Category.WOBBLING_STATION: (V.LOW_DAMPING, V.MEDIUM_DAMPING, V.HIGH_DAMPING),
}
NORMAL_TEST_VARIANTS = (V.PRE_B, V.PRE_B, V.PRE_B, V.BETWEEN_A, V.BETWEEN_B, V.BETWEEN_C)

# --- physical parameters of the anomalies ---------------------------------------------------------
#: extra joint friction (Coulomb Nm, viscous Nm·s/rad) per axis, levels A and B
FRICTION_EXTRA = {
    "A": (np.array([1.2, 1.6, 1.2, 0.35, 0.35, 0.25]), np.array([1.0, 1.2, 0.9, 0.25, 0.25, 0.2])),
    "B": (np.array([2.4, 3.0, 2.2, 0.7, 0.7, 0.5]), np.array([2.0, 2.4, 1.8, 0.5, 0.5, 0.4])),
}
#: can mass per variant (kg); the normal can weighs 241 g (41 g can + 200 g contents)
CAN_MASS = {
    V.EMPTY: 0.041,
    V.DECREASE_165G: 0.076,
    V.DECREASE_95G: 0.146,
    V.INCREASE_242G: 0.283,
    V.INCREASE_373G: 0.414,
    V.INCREASE_407G: 0.448,
}
NORMAL_CAN_MASS = 0.241
#: commutation angle error (rad)
COMMUTATION_ERROR = {"MEDIUM": np.deg2rad(6.0), "HIGH": np.deg2rad(12.0)}
#: base platform damping ratio per wobbling variant
PLATFORM_DAMPING = {V.LOW_DAMPING: 0.03, V.MEDIUM_DAMPING: 0.07, V.HIGH_DAMPING: 0.15}


@dataclass(frozen=True)
class CycleSpec:
    """One cycle to simulate: its position in the recording, its labels and its random seed."""

    sample: int
    category: Category
    variant: Variant
    order: float  # 0..1, position in the recording (slow drifts, e.g. warm-up, depend on it)

    @property
    def anomaly(self) -> bool:
        return self.category is not Category.NORMAL_OPERATION

    def axis(self) -> int:
        """The axis (1..6) an axis-specific variant names, e.g. A3_B -> 3."""
        name = self.variant.name
        if not (name.startswith("A") and name[1].isdigit()):
            raise ValueError(f"variant {name} names no axis")
        return int(name[1])


def parse_categories(values: Sequence[str] | None) -> tuple[Category, ...]:
    """Anomaly categories from names (any case) or numbers; all twelve when nothing is given."""
    if not values:
        return ANOMALY_CATEGORIES
    chosen: list[Category] = []
    for raw in values:
        for token in raw.split(","):
            token = token.strip()
            if not token:
                continue
            try:
                cat = Category(int(token)) if token.isdigit() else Category[token.upper()]
            except (KeyError, ValueError):
                names = ", ".join(c.name for c in ANOMALY_CATEGORIES)
                raise ValueError(f"unknown anomaly category {token!r}; choose from {names}") from None
            if cat is Category.NORMAL_OPERATION:
                raise ValueError("NORMAL_OPERATION is not an anomaly category; normal cycles are always made")
            if cat not in chosen:
                chosen.append(cat)
    return tuple(chosen)


def _group_sizes(paper: list[int], total: int, minimum: list[int]) -> list[int]:
    """Split `total` in proportion to `paper` (largest remainders), honouring per-group minimums
    while the total allows it."""
    weight = np.asarray(paper, dtype=float)
    quota = total * weight / weight.sum()
    sizes = np.floor(quota).astype(int)
    for i in np.argsort(-(quota - sizes), kind="stable")[: total - sizes.sum()]:
        sizes[i] += 1
    for i, low in enumerate(minimum):
        while sizes[i] < low:
            donor = int(np.argmax(sizes - np.asarray(minimum)))
            if sizes[donor] - minimum[donor] <= 0:
                break
            sizes[donor] -= 1
            sizes[i] += 1
    return [int(x) for x in sizes]


def plan_recording(
    *,
    scale: float = 1.0,
    cycles: int | None = None,
    categories: Sequence[Category] = ANOMALY_CATEGORIES,
    seed: int = 0,
) -> list[CycleSpec]:
    """The cycles of a recording in recording order, with the paper's proportions.

    Training normals (PRE_A) come first, then test normals and anomalies interleaved at random.
    `scale` multiplies the paper's counts (every selected category keeps at least one cycle);
    `cycles` fixes the exact total instead (categories get at least one cycle while the total allows).
    """
    if not categories:
        raise ValueError("at least one anomaly category is needed")
    paper = [PAPER_TRAIN_NORMALS, PAPER_TEST_NORMALS] + [PAPER_ANOMALY_COUNTS[c] for c in categories]
    if cycles is not None:
        if cycles < 3:
            raise ValueError(
                f"cycles must be at least 3 (two training cycles and a test cycle), got {cycles}"
            )
        sizes = _group_sizes(paper, cycles, [2, 1] + [1] * len(categories))
    else:
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        sizes = [max(2, round(paper[0] * scale)), max(1, round(paper[1] * scale))]
        sizes += [max(1, round(n * scale)) for n in paper[2:]]
    n_train, n_test_normal, per_category = sizes[0], sizes[1], sizes[2:]
    rng = np.random.default_rng([seed, 0x5EED])
    anomalies: list[tuple[Category, Variant]] = []
    for cat, count in zip(categories, per_category, strict=True):
        variants = list(CATEGORY_VARIANTS[cat])
        offset = int(rng.integers(len(variants)))
        anomalies += [(cat, variants[(offset + i) % len(variants)]) for i in range(count)]
    test: list[tuple[Category, Variant]] = [
        (Category.NORMAL_OPERATION, NORMAL_TEST_VARIANTS[i % len(NORMAL_TEST_VARIANTS)])
        for i in range(n_test_normal)
    ]
    test += anomalies
    order = rng.permutation(len(test))
    labels = [(Category.NORMAL_OPERATION, V.PRE_A)] * n_train + [test[i] for i in order]
    total = len(labels)
    return [
        CycleSpec(sample=i, category=c, variant=v, order=i / max(total - 1, 1))
        for i, (c, v) in enumerate(labels)
    ]
