"""Does temporal localization (thesis Eq. 8.6) point at the moment of the anomaly?

For short events (collisions, losing the can) the simulator knows when the anomaly happened: the
anomalous cycle differs from its normal twin (same seed and sample, anomaly removed) only from that
moment on. This script simulates such cycles at the model's rate, takes the localization curve
Σ_s |∂score/∂x(t, s)| of a trained model, and reports how far its peak lies from the first time step
where the cycle's difference to its twin reaches half its maximum, and the top contributing signals.

Second table: for the faults local to one axis whose variant names it (added friction A<k>_A|B,
miscommutation A<k>_MEDIUM|HIGH, and added weight A<k>_<g>G, which also loads the joints below the
link), the share of cycles whose most attributed axis (the axis of the signal with the largest
attribution, `Scorer.localize(...).per_signal`) is the faulty one, next to a naive explanation: the
axis whose signals deviate most from the mean training cycle (standardized, squared, summed).

Usage:  python benchmarks/localization_check.py --model MODEL [--cycles 12] [--seed 21] [--axis-cycles 4]
        [--json OUT.json]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from flows.artifact import load_model
from flows.preprocess import downsample
from flows.scorer import Scorer
from ingest.sim.cell import CellSimulator
from ingest.sim.scenarios import CATEGORY_VARIANTS, CycleSpec
from ingest.voraus.schema import Category, Variant

EVENTS = (Category.COLLISION_FOAM, Category.COLLISION_CABLE, Category.COLLISION_CARTON, Category.LOSE_CAN)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--cycles", type=int, default=12, help="cycles per category")
    ap.add_argument("--seed", type=int, default=21)
    ap.add_argument("--axis-cycles", type=int, default=4, help="cycles per axis-local variant")
    ap.add_argument("--json", type=Path, help="also write the figures as JSON")
    args = ap.parse_args()
    model = load_model(args.model)
    card = model.card
    scorer = Scorer(model)
    divider = int(card.training.get("rate_divider", 1))
    sim = CellSimulator(int(card.training.get("source_rate_hz", 100)))
    dt = 1.0 / card.rate_hz
    table = Table(title=f"Localization peak vs. true event time ({card.rate_hz:g} Hz model)")
    for col in ("category", "cycles", "median |peak − event| s", "within 1 s", "most frequent top signal"):
        table.add_column(col)
    for cat in EVENTS:
        errors, tops = [], []
        variants = CATEGORY_VARIANTS[cat]
        for i in range(args.cycles):
            spec = CycleSpec(50_000 + i, cat, variants[i % len(variants)], 0.6)
            twin = CycleSpec(spec.sample, Category.NORMAL_OPERATION, Variant.PRE_B, 0.6)
            a, b = sim.simulate(spec, args.seed), sim.simulate(twin, args.seed)
            xa = downsample(np.stack([a[s] for s in card.signals], axis=1), divider)
            xb = downsample(np.stack([b[s] for s in card.signals], axis=1), divider)
            n = min(len(xa), len(xb))
            # the event: where the standardized difference to the twin first reaches half its maximum
            diff = np.abs(card.scaler.transform(xa[:n]) - card.scaler.transform(xb[:n])).sum(axis=1)
            onset = int(np.flatnonzero(diff >= 0.5 * diff.max())[0])
            loc = scorer.localize(scorer.prepare_cycle(xa)[None], top=1)
            peak = int(np.argmax(loc.per_time[0][: len(xa)]))
            errors.append(abs(peak - onset) * dt)
            tops.append(loc.top_signals[0][0][0])
        top = max(set(tops), key=tops.count)
        table.add_row(
            cat.name,
            str(len(errors)),
            f"{np.median(errors):.2f}",
            f"{np.mean(np.asarray(errors) <= 1.0):.0%}",
            top,
        )
    Console().print(table)
    shares = axis_check(scorer, sim, divider, args.axis_cycles, args.seed)
    axis_table = Table(title="Most attributed axis = the faulty one (share of cycles)")
    for col in ("category", "cycles", "model's explanation", "naive deviation"):
        axis_table.add_column(col)
    for cat, row in shares.items():
        axis_table.add_row(cat, str(row["cycles"]), f"{row['model']:.0%}", f"{row['naive']:.0%}")
    Console().print(axis_table)
    if args.json:
        import json

        args.json.write_text(json.dumps({"model": str(args.model), "axis": shares}, indent=1))


def axis_check(
    scorer: Scorer, sim: CellSimulator, divider: int, per_variant: int, seed: int
) -> dict[str, dict]:
    """Per axis-local category: share of cycles whose top-attributed axis is the faulty one."""
    card = scorer.card
    axis_of = np.array(
        [int(s.rsplit("_", 1)[1]) if s.rsplit("_", 1)[-1].isdigit() else 0 for s in card.signals]
    )
    # the naive explanation's reference: the mean normal cycle, from fresh normal cycles
    normals = []
    for i in range(16):
        c = sim.simulate(CycleSpec(60_000 + i, Category.NORMAL_OPERATION, Variant.PRE_A, 0.3), seed)
        normals.append(
            scorer.prepare_cycle(downsample(np.stack([c[s] for s in card.signals], axis=1), divider))
        )
    mean_cycle = np.mean(normals, axis=0)
    out: dict[str, dict] = {}
    for cat in (Category.AXIS_FRICTION, Category.MOTOR_COMMUTATION, Category.AXIS_WEIGHT):
        model_hits, naive_hits = [], []
        for v, variant in enumerate(CATEGORY_VARIANTS[cat]):
            for i in range(per_variant):
                spec = CycleSpec(70_000 + 100 * v + i, cat, variant, 0.6)
                c = sim.simulate(spec, seed)
                x = scorer.prepare_cycle(downsample(np.stack([c[s] for s in card.signals], axis=1), divider))
                loc = scorer.localize(x[None], top=1)
                axis = spec.axis()
                model_hits.append(axis_of[int(np.argmax(loc.per_signal[0]))] == axis)
                deviation = np.square(x - mean_cycle).sum(axis=1)
                per_axis = [deviation[axis_of == k].sum() for k in range(1, 7)]
                naive_hits.append(int(np.argmax(per_axis)) + 1 == axis)
        out[cat.name] = {
            "cycles": len(model_hits),
            "model": float(np.mean(model_hits)),
            "naive": float(np.mean(naive_hits)),
        }
    return out


if __name__ == "__main__":
    main()
