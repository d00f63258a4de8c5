"""``cellwatch demo``: the main job on embedded defaults, needing no data and no infrastructure.

Signal half: simulates a small cell, inspects the recording, trains a small MVT-Flow on its normal
training cycles and evaluates it by the paper's protocol next to the 1-NN and PCA baselines, replays the
test split through the daemon (scores and alerts in scores.jsonl) and writes the HTML report
(report.html: ROC and AUROC per category, score histograms, the alerts and the temporal analysis of their
peak cycles).

Image half: generates a small MVTec-layout image set with masked defects painted on a real texture
(images/), trains a small AST on it (image-model/), evaluates it by the MVTec AD protocol next to the
teacher-NLL and nearest-neighbour baselines and writes the image report (image-report.html: image AUROC,
pixel AUROC and AU-PRO per defect type, ROC, histograms and the anomaly maps of the top images).

Each half runs the same CLI verbs a user would, so the demo shows the commands and proves they work.
"""

from __future__ import annotations

import argparse
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from daemon.cli_support import UsageError, console, progress

HALVES = ("signals", "images")
#: the demo's image set: train/good, test/good and test images per defect type (5 types)
IMAGE_COUNTS = (40, 10, 6)
IMAGE_DATA_SIZE = 256  # px of the generated frames; the model resizes them to --image-size


def _counts(text: str) -> tuple[int, int, int]:
    try:
        train, good, per_defect = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected TRAIN,GOOD,PER_DEFECT (three integers), got {text!r}"
        ) from None
    if train < 4 or good < 1 or per_defect < 1:
        raise argparse.ArgumentTypeError(f"need >= 4 train, >= 1 good, >= 1 per defect, got {text!r}")
    return train, good, per_defect


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help=(
            "main job on embedded defaults: simulate a small cell, train MVT-Flow, evaluate it, replay it "
            "through the daemon, write the report; then the same for a generated image set with AST"
        ),
        description=(
            "Signal half: simulate a small pick-and-place cell (all 12 anomaly categories), inspect it, "
            "train a small MVT-Flow (20 Hz, 30 epochs), evaluate it next to the 1-NN and PCA baselines, "
            "replay the test split through the daemon and write report.html. Image half: generate a small "
            "image set in the MVTec AD layout (real texture, 5 masked defect types), train a small AST on "
            "it (128 px, 10 epochs), evaluate it next to the teacher-NLL and nearest-neighbour baselines "
            "and write image-report.html with the anomaly maps. --only runs one half."
        ),
    )
    p.add_argument("--dir", type=Path, default=Path("cellwatch-demo"), help="working directory")
    p.add_argument("--only", choices=HALVES, help="run only the signal half or only the image half")
    p.add_argument("--scale", type=float, default=0.1, help="fraction of the paper-sized recording")
    p.add_argument("--epochs", type=int, default=30, help="training epochs of the small MVT-Flow")
    p.add_argument(
        "--image-size", type=int, default=128, help="input size of the small AST in pixels (default 128)"
    )
    p.add_argument(
        "--image-epochs", type=int, default=10, help="epochs of the AST's teacher and student (default 10)"
    )
    # for tests and quick looks: the image set's size and the AST's width
    p.add_argument("--image-counts", type=_counts, default=IMAGE_COUNTS, help=argparse.SUPPRESS)
    p.add_argument("--image-width", type=int, default=64, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--influx-url", help="also replay into this InfluxDB (v1 /write endpoint)")
    p.add_argument("--influx-db", default="cellwatch")
    p.set_defaults(func=run)


def _numbers() -> Iterator[int]:
    n = 0
    while True:
        n += 1
        yield n


def _run_verbs(
    parser: argparse.ArgumentParser, steps: list[tuple[str, list[str]]], number: Iterator[int]
) -> int:
    for title, argv in steps:
        console.rule(f"[bold]{next(number)}. {title}")
        sub_args = parser.parse_args(argv)
        code = int(sub_args.func(sub_args) or 0)
        if code:
            return code
    return 0


def _signal_half(args: argparse.Namespace, parser: argparse.ArgumentParser, number: Iterator[int]) -> int:
    from daemon.commands.inspect import print_summary, summarize
    from ingest.sim.dataset import write_recording
    from ingest.sim.scenarios import plan_recording

    data = args.dir / "cell.parquet"
    model = args.dir / "model"
    specs = plan_recording(scale=args.scale, seed=args.seed)

    console.rule(f"[bold]{next(number)}. simulate the cell")
    started = time.perf_counter()
    with progress() as bar:
        task = bar.add_task(f"simulating {len(specs)} cycles", total=len(specs))
        write_recording(data, specs, seed=args.seed, on_cycle=lambda _s: bar.advance(task))
    console.print(f"wrote {data} in {time.perf_counter() - started:.1f} s")

    console.rule(f"[bold]{next(number)}. inspect and validate the recording")
    print_summary(summarize(data, validate=True))

    steps = [
        (
            "train a small MVT-Flow (20 Hz, all 130 signals)",
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
            "evaluate: AUROC per category on the test split (paper protocol)",
            ["evaluate", "--data", str(data), "--model", str(model), "--baselines"],
        ),
        (
            "replay the test split through the daemon (scores, alerts and explanations)",
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
            "write the report (ROC, score histograms, alerts, temporal analysis)",
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
    return _run_verbs(parser, steps, number)


def _image_half(args: argparse.Namespace, parser: argparse.ArgumentParser, number: Iterator[int]) -> int:
    from ingest.sim.images import write_image_dataset

    data = args.dir / "images"
    model = args.dir / "image-model"
    n_train, n_good, n_per_defect = args.image_counts

    console.rule(f"[bold]{next(number)}. generate an image set (MVTec AD layout, masked defects)")
    started = time.perf_counter()
    shutil.rmtree(data, ignore_errors=True)  # a rerun with other counts must not keep the old files
    with console.status("painting defects on a real texture"):
        counts = write_image_dataset(
            data,
            seed=args.seed,
            n_train=n_train,
            n_test_good=n_good,
            n_per_defect=n_per_defect,
            size=IMAGE_DATA_SIZE,
        )
    listing = ", ".join(f"{folder} {n}" for folder, n in counts.items())
    console.print(
        f"wrote {sum(counts.values())} images to {data} in {time.perf_counter() - started:.1f} s: {listing}"
    )

    width = str(args.image_width)
    steps = [
        (
            f"train a small AST ({args.image_size} px, EfficientNet-Lite0 block 10, "
            f"{args.image_epochs} epochs)",
            [
                "train",
                "--data",
                str(data),
                "--out",
                str(model),
                "--size",
                str(args.image_size),
                "--teacher-hidden",
                width,
                "--student-width",
                width,
                "--student-blocks",
                "2",
                "--epochs",
                str(args.image_epochs),
                "--seed",
                str(args.seed),
            ],
        ),
        (
            "evaluate: image AUROC per defect type, pixel AUROC and AU-PRO (MVTec AD protocol)",
            ["evaluate", "--data", str(data), "--model", str(model), "--baselines"],
        ),
        (
            "write the image report (metrics per defect type, ROC, histograms, anomaly maps)",
            [
                "report",
                "--data",
                str(data),
                "--model",
                str(model),
                "--out",
                str(args.dir / "image-report.html"),
            ],
        ),
    ]
    return _run_verbs(parser, steps, number)


def run(args: argparse.Namespace) -> int:
    from daemon.cli import build_parser

    if not args.scale > 0:
        raise UsageError(f"--scale must be > 0, got {args.scale}")
    if args.image_size < 32:
        raise UsageError(f"--image-size must be >= 32 px, got {args.image_size}")
    if args.image_epochs < 1:
        raise UsageError(f"--image-epochs must be >= 1, got {args.image_epochs}")
    if args.image_width < 1:
        raise UsageError(f"--image-width must be >= 1, got {args.image_width}")
    halves = [args.only] if args.only else list(HALVES)
    args.dir.mkdir(parents=True, exist_ok=True)
    parser = build_parser()
    number = _numbers()
    timings: dict[str, float] = {}
    for half in halves:
        started = time.perf_counter()
        code = (_signal_half if half == "signals" else _image_half)(args, parser, number)
        if code:
            return code
        timings[half] = time.perf_counter() - started

    done = []
    if "signals" in timings:
        data = args.dir / "cell.parquet"
        model = args.dir / "model"
        done.append(
            f"signals ({timings['signals']:.0f} s): model in [bold]{model}[/], scores and alerts in "
            f"[bold]{args.dir / 'scores.jsonl'}[/], report in [bold]{args.dir / 'report.html'}[/]; next: "
            f"[bold]cellwatch replay {data} --model {model} --influx-url http://127.0.0.1:8086[/]"
        )
    if "images" in timings:
        done.append(
            f"images ({timings['images']:.0f} s): image set in [bold]{args.dir / 'images'}[/], AST model in "
            f"[bold]{args.dir / 'image-model'}[/], report with the anomaly maps in "
            f"[bold]{args.dir / 'image-report.html'}[/]"
        )
    console.print("\n" + "\n".join(done))
    return 0
