"""How subtle are the simulated anomalies?

For every anomaly category this simulates anomalous cycles together with their *normal twins* (same
seed and sample: same can position, same sensor noise, only the anomaly removed) and a reference set
of normal cycles. It reports, against the normal cycle-to-cycle spread of each signal (std across
normal cycles at the same time step, averaged over the cycle):

- rms shift: RMS over the cycle of (anomalous − twin), in units of that spread, for the most affected
  signal (median over the category's cycles);
- peak shift: the same with the largest single-step difference;
- max-value AUROC: the best AUROC any single signal's max |value| reaches between the category's
  anomalies and normal cycles — how far a plain max-value check gets (0.5 = chance).

Usage:  python benchmarks/sim_subtlety.py [--per-category 12] [--normals 80] [--rate 100] [--json out]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from flows.metrics import roc_auc
from ingest.sim.dataset import simulate_cycles
from ingest.sim.scenarios import CATEGORY_VARIANTS, CycleSpec
from ingest.voraus.schema import ANOMALY_CATEGORIES, MACHINE_SIGNALS, Category, Variant


def stack(cycles: list[dict[str, np.ndarray]]) -> np.ndarray:
    return np.stack([np.stack([c[s] for s in MACHINE_SIGNALS], axis=1) for c in cycles])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-category", type=int, default=12)
    ap.add_argument("--normals", type=int, default=80)
    ap.add_argument("--rate", type=int, default=100, choices=(100, 500))
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--json", type=Path, help="also write the table as JSON here")
    args = ap.parse_args()
    console = Console(width=160)
    started = time.perf_counter()

    normals = [
        CycleSpec(10_000 + i, Category.NORMAL_OPERATION, Variant.PRE_B, 0.6) for i in range(args.normals)
    ]
    normal_cycles = list(simulate_cycles(normals, rate_hz=args.rate, seed=args.seed))
    length = min(len(c["time"]) for c in normal_cycles)
    ref = stack([{k: v[:length] for k, v in c.items()} for c in normal_cycles])  # (N, T, S)
    spread = ref.std(axis=0)  # (T, S): normal cycle-to-cycle spread at each time step
    # floor: a signal's typical spread, so still phases (spread ~ noise) do not inflate the ratio
    pooled = ref.reshape(-1, ref.shape[-1]).std(axis=0)
    spread = np.maximum(spread, np.maximum(np.median(spread, axis=0), 0.25 * pooled))
    spread = np.where(spread > 0, spread, np.inf)
    normal_max = np.stack(
        [np.abs(np.stack([c[s] for s in MACHINE_SIGNALS], 1)).max(0) for c in normal_cycles]
    )

    rows = []
    for cat in ANOMALY_CATEGORIES:
        variants = CATEGORY_VARIANTS[cat]
        specs = [
            CycleSpec(20_000 + 100 * int(cat) + i, cat, variants[i % len(variants)], 0.6)
            for i in range(args.per_category)
        ]
        twins = [CycleSpec(s.sample, Category.NORMAL_OPERATION, Variant.PRE_B, s.order) for s in specs]
        anomalous = list(simulate_cycles(specs, rate_hz=args.rate, seed=args.seed))
        twin_cycles = list(simulate_cycles(twins, rate_hz=args.rate, seed=args.seed))
        rms_best, peak_best, names = [], [], []
        for a, b in zip(anomalous, twin_cycles, strict=True):
            n = min(len(a["time"]), len(b["time"]), length)
            diff = np.stack([a[s][:n] - b[s][:n] for s in MACHINE_SIGNALS], axis=1) / spread[:n]
            rms = np.sqrt((diff**2).mean(axis=0))
            best = int(np.argmax(rms))
            rms_best.append(rms[best])
            peak_best.append(np.abs(diff).max())
            names.append(MACHINE_SIGNALS[best])
        anomaly_max = np.stack(
            [np.abs(np.stack([c[s] for s in MACHINE_SIGNALS], 1)).max(0) for c in anomalous]
        )
        aucs = [
            max(
                roc_auc(normal_max[:, j], anomaly_max[:, j]), 1 - roc_auc(normal_max[:, j], anomaly_max[:, j])
            )
            for j in range(len(MACHINE_SIGNALS))
        ]
        j_best = int(np.argmax(aucs))
        top_signal = max(set(names), key=names.count)
        rows.append(
            {
                "category": cat.name,
                "cycles": len(specs),
                "most_affected_signal": top_signal,
                "rms_shift_sigma": float(np.median(rms_best)),
                "peak_shift_sigma": float(np.median(peak_best)),
                "max_value_auroc": float(aucs[j_best]),
                "max_value_signal": MACHINE_SIGNALS[j_best],
            }
        )

    table = Table(
        title=f"How subtle are the simulated anomalies ({args.rate} Hz, {args.normals} normal cycles)"
    )
    for col in (
        "category",
        "n",
        "most affected signal",
        "rms shift [σ]",
        "peak shift [σ]",
        "best max-value AUROC",
        "(signal)",
    ):
        table.add_column(
            col, justify="left" if col in ("category", "most affected signal", "(signal)") else "right"
        )
    for r in rows:
        table.add_row(
            r["category"],
            str(r["cycles"]),
            r["most_affected_signal"],
            f"{r['rms_shift_sigma']:.2f}",
            f"{r['peak_shift_sigma']:.1f}",
            f"{r['max_value_auroc']:.2f}",
            r["max_value_signal"],
        )
    console.print(table)
    console.print(
        "σ = normal cycle-to-cycle std at the same time step (floored at its median over the cycle "
        f"and at 25 % of the signal's overall std); took {time.perf_counter() - started:.0f} s"
    )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
