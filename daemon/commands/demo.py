"""``cellwatch demo``: the main job on embedded defaults, needing no data and no infrastructure.

Simulates a small cell, inspects the recording, trains a small MVT-Flow on its normal training cycles
and evaluates it by the paper's protocol next to the 1-NN and PCA baselines, replays the test split
through the daemon (scores and alerts in scores.jsonl) and writes the HTML report (report.html: ROC and
AUROC per category, score histograms, the alerts and the temporal analysis of their peak cycles).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from daemon.cli_support import UsageError, console, progress


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help=(
            "main job on embedded defaults: simulate a small cell, train MVT-Flow, evaluate it, replay it "
            "through the daemon, write the report"
        ),
        description=(
            "Simulate a small pick-and-place cell (all 12 anomaly categories), inspect it, train a small "
            "MVT-Flow (20 Hz, 30 epochs) and evaluate it next to the 1-NN and PCA baselines."
        ),
    )
    p.add_argument("--dir", type=Path, default=Path("cellwatch-demo"), help="working directory")
    p.add_argument("--scale", type=float, default=0.1, help="fraction of the paper-sized recording")
    p.add_argument("--epochs", type=int, default=30, help="training epochs of the small model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--influx-url", help="also replay into this InfluxDB (v1 /write endpoint)")
    p.add_argument("--influx-db", default="cellwatch")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from daemon.cli import build_parser
    from daemon.commands.inspect import print_summary, summarize
    from ingest.sim.dataset import write_recording
    from ingest.sim.scenarios import plan_recording

    if not args.scale > 0:
        raise UsageError(f"--scale must be > 0, got {args.scale}")
    args.dir.mkdir(parents=True, exist_ok=True)
    data = args.dir / "cell.parquet"
    model = args.dir / "model"
    specs = plan_recording(scale=args.scale, seed=args.seed)

    console.rule("[bold]1. simulate the cell")
    started = time.perf_counter()
    with progress() as bar:
        task = bar.add_task(f"simulating {len(specs)} cycles", total=len(specs))
        write_recording(data, specs, seed=args.seed, on_cycle=lambda _s: bar.advance(task))
    console.print(f"wrote {data} in {time.perf_counter() - started:.1f} s")

    console.rule("[bold]2. inspect and validate the recording")
    print_summary(summarize(data, validate=True))

    parser = build_parser()
    steps = [
        (
            "3. train a small MVT-Flow (20 Hz, all 130 signals)",
            [
                "train",
                "--data",
                str(data),
                "--out",
                str(model),
                "--rate-divider",
                "5",
                "--epochs",
                str(args.epochs),
                "--milestones",
                str(max(1, args.epochs - 5)),
                "--seed",
                str(args.seed),
            ],
        ),
        (
            "4. evaluate: AUROC per category on the test split (paper protocol)",
            ["evaluate", "--data", str(data), "--model", str(model), "--baselines"],
        ),
        (
            "5. replay the test split through the daemon (scores, alerts and explanations)",
            [
                "replay",
                str(data),
                "--model",
                str(model),
                "--speed",
                "inf",
                "--robot",
                "demo-cell",
                "--out",
                str(args.dir / "scores.jsonl"),
            ]
            + (["--influx-url", args.influx_url, "--influx-db", args.influx_db] if args.influx_url else []),
        ),
        (
            "6. write the report (ROC, score histograms, alerts, temporal analysis)",
            [
                "report",
                "--data",
                str(data),
                "--model",
                str(model),
                "--alerts",
                str(args.dir / "scores.jsonl"),
                "--out",
                str(args.dir / "report.html"),
            ],
        ),
    ]
    # the file sink appends: a rerun in the same directory must not report the previous run's alerts
    (args.dir / "scores.jsonl").unlink(missing_ok=True)
    for title, argv in steps:
        console.rule(f"[bold]{title}")
        sub_args = parser.parse_args(argv)
        code = int(sub_args.func(sub_args) or 0)
        if code:
            return code
    console.print(
        f"\nmodel in [bold]{model}[/], scores and alerts in [bold]{args.dir / 'scores.jsonl'}[/], "
        f"report in [bold]{args.dir / 'report.html'}[/]; "
        f"next: [bold]cellwatch replay {data} --model {model} --influx-url http://127.0.0.1:8086[/]"
    )
    return 0
