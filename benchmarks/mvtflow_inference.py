"""MVT-Flow inference speed: latency and throughput at batch 1, 32 and 256, S=130 signals.

Modes: whole cycles (T=1152, the paper's 100 Hz input) and sliding windows (T=--window). Precision:
fp32 and bf16 autocast. Runs on CPU, and on CUDA when there is one (or --device cuda). Weights are
random: speed does not depend on training. For comparison (../shared/ENVIRONMENT.md): the official
code on an H100, fp32, S=130, T=1152: batch 1 = 2.3 ms, batch 256 = 27.5 ms (9,300 cycles/s).

Usage:  python benchmarks/mvtflow_inference.py [--device auto] [--repeats 5] [--window 256] [--json out]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from flows.mvtflow import MVTFlow, MVTFlowConfig
from flows.training import autocast, resolve_device


def measure(flow: MVTFlow, batch: int, steps: int, device: torch.device, bf16: bool, repeats: int) -> float:
    x = torch.randn(batch, flow.config.signals, steps, device=device)
    times = []
    with torch.no_grad():
        for i in range(repeats + 1):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with autocast(device, bf16):
                flow.score(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i:  # the first call warms up
                times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--window", type=int, default=256, help="window length for window mode")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32, 256])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    device = resolve_device(args.device)
    rows = []
    table = Table(title=f"MVT-Flow inference, S=130, device {device} ({torch.get_num_threads()} CPU threads)")
    for col in ("mode", "T", "precision", "batch", "latency ms", "windows/s"):
        table.add_column(col, justify="right")
    for mode, steps in (("cycle", 1152), ("window", args.window)):
        flow = MVTFlow(MVTFlowConfig(signals=130, time_steps=steps)).to(device).eval()
        for bf16 in (False, True):
            for batch in args.batches:
                latency = measure(flow, batch, steps, device, bf16, args.repeats)
                row = {
                    "mode": mode,
                    "time_steps": steps,
                    "precision": "bf16" if bf16 else "fp32",
                    "batch": batch,
                    "latency_ms": 1000 * latency,
                    "per_second": batch / latency,
                }
                rows.append(row)
                table.add_row(
                    mode,
                    str(steps),
                    row["precision"],
                    str(batch),
                    f"{1000 * latency:.1f}",
                    f"{batch / latency:,.0f}",
                )
    Console().print(table)
    if args.json:
        args.json.write_text(json.dumps({"device": str(device), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
