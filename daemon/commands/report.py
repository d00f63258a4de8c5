"""``cellwatch report``: one self-contained HTML file with ROC curves and AUROC per anomaly category,
score histograms against the threshold, the daemon's alerts and the temporal analysis of the top
cycles (see daemon.report); for an image model on an image folder, the metrics per defect type and the
anomaly maps of the top images instead (see daemon.image_report). The model's kind picks the report."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from daemon.cli_support import UsageError, console, progress


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "report",
        help="HTML report: AUROC per category or defect type, ROC, score histograms, alerts or anomaly maps",
        description=(
            "Score the test split and write one self-contained HTML file (figures embedded). On a "
            "voraus-AD file with a signal model (MVT-Flow): ROC curves and AUROC per anomaly category, score "
            "histograms with the threshold, and the temporal analysis (localization and top signals) of the "
            "top cycles: the peak cycles of the daemon's alerts with --alerts, otherwise the highest-scoring "
            "anomalous test cycles. On an image folder (MVTec AD layout) with an image model (AST): image "
            "AUROC, pixel AUROC and AU-PRO per defect type, ROC curves, score histograms, and the anomaly "
            "maps of the highest-scoring defect images and good images (the nearest false alarms) next to "
            "their ground-truth masks."
        ),
    )
    p.add_argument(
        "--data",
        required=True,
        type=Path,
        help="voraus-AD parquet file or image folder (MVTec AD layout)",
    )
    p.add_argument("--model", required=True, type=Path, help="model directory from cellwatch train")
    p.add_argument("--out", type=Path, default=Path("report.html"), help="HTML file to write")
    p.add_argument(
        "--top",
        type=int,
        default=5,
        help="cycles in the temporal analysis, or defect images whose anomaly maps are shown (default 5)",
    )
    p.add_argument(
        "--top-good",
        type=int,
        default=2,
        help="images only: highest-scoring good images whose maps are shown, to see false alarms (default 2)",
    )
    p.add_argument(
        "--alerts", type=Path, help="JSON-lines file of the daemon's file sink (e.g. scores.jsonl)"
    )
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from daemon.commands.evaluate import DETECTOR_LABELS, cycle_scores
    from daemon.dataset import load_cycles
    from daemon.report import (
        AlertRecord,
        ReportHeader,
        alert_cycles,
        build_report,
        read_alerts,
        temporal_case,
        top_anomalous,
    )
    from flows.artifact import ModelFormatError, load_model
    from flows.metrics import per_category_auroc
    from flows.scorer import Scorer

    if args.top < 0:
        raise UsageError(f"--top must be >= 0, got {args.top}")
    if args.out.is_dir():
        raise UsageError(f"--out {args.out} is a directory; name the HTML file to write")
    if _image_job(args):
        from daemon.image_report import run_image_report

        return run_image_report(args)
    alerts: list[AlertRecord] | None = None
    if args.alerts is not None:
        if not args.alerts.is_file():
            raise UsageError(f"alerts file {args.alerts} does not exist")
        try:
            alerts = read_alerts(args.alerts)
        except (ValueError, UnicodeDecodeError) as err:
            raise UsageError(str(err)) from err

    try:
        peek = load_model(args.model)
    except ModelFormatError as err:
        raise UsageError(str(err)) from err
    divider = int(peek.card.training.get("rate_divider", 1))
    data = load_cycles(args.data, peek.card.signals, rate_divider=divider, want_train=False)
    try:
        model = load_model(args.model, expect_signals=data.signal_names, expect_rate_hz=data.rate_hz)
        scorer = Scorer(model, device=args.device)
    except (ModelFormatError, ValueError) as err:
        raise UsageError(f"{args.model} does not fit {args.data}: {err}") from err
    test = data.test
    if not any(test.anomaly) or all(test.anomaly):
        raise UsageError(f"{args.data} needs both normal and anomalous test cycles for a report")

    with progress() as bar:
        task = bar.add_task(f"scoring test cycles ({DETECTOR_LABELS[model.card.detector]})", total=len(test))
        parts = []
        for i in range(0, len(test), 64):
            chunk = test.signals[i : i + 64]
            parts.append(cycle_scores(scorer, chunk))
            bar.advance(task, len(chunk))
    scores = np.concatenate(parts)
    anomaly = np.asarray(test.anomaly, dtype=bool)
    result = per_category_auroc(scores, test.categories, anomaly)

    notes: list[str] = []
    chosen: list[tuple[str, int]] = []  # (why shown, index into test)
    if alerts:
        picked = alert_cycles(alerts, test.samples, args.top)
        if not picked:
            raise UsageError(
                f"none of the {len(alerts)} alerts in {args.alerts} peaks in a test cycle of {args.data}; "
                "were they recorded from another file?"
            )
        chosen = [(f"alert {k} ({alerts[k - 1].robot})", i) for k, i in picked]
        notes.append(
            f"Peak cycles of the {len(chosen)} highest-peaking alerts (one figure per cycle), "
            "re-scored and localized here."
        )
    else:
        if alerts is not None:
            notes.append(f"{args.alerts} holds no alerts; showing the highest-scoring anomalous cycles.")
        else:
            notes.append(f"The {args.top} highest-scoring anomalous test cycles.")
        chosen = [(f"rank {r}", i) for r, i in enumerate(top_anomalous(scores, anomaly, args.top), 1)]

    cases = []
    with progress() as bar:
        task = bar.add_task("temporal analysis", total=len(chosen))
        for why, i in chosen:
            cases.append(
                temporal_case(
                    scorer,
                    test.signals[i],
                    sample=test.samples[i],
                    category=test.categories[i],
                    variant=test.variants[i],
                    source=why,
                )
            )
            bar.advance(task)

    card = model.card
    mode = card.mode if card.mode == "cycle" else f"window ({card.window} steps, hop {card.hop})"
    header = ReportHeader(
        model=str(args.model.resolve().name),
        data=str(args.data),
        cycles=len(test),
        normals=int((~anomaly).sum()),
        anomalies=int(anomaly.sum()),
        threshold=card.threshold.value,
        target_fpr=card.threshold.target_fpr,
        created=datetime.now(UTC),
        details={
            "model directory": str(args.model),
            "detector": DETECTOR_LABELS[card.detector]
            + (
                " (MVT-Flow NLL + local linear residual + whole-cycle PCA residual)"
                if card.detector == "fusion"
                else ""
            ),
            "scoring": f"{mode}, {card.rate_hz:g} Hz, {len(card.signals)} signals, device {scorer.device}",
            "mean AUROC": f"{100 * result.mean:.1f} % over {len(result.per_category)} categories",
        },
    )
    with console.status("drawing figures"):
        document = build_report(
            header,
            scores=scores,
            categories=test.categories,
            anomaly=anomaly,
            samples=test.samples,
            result=result,
            cases=cases,
            alerts=alerts,
            notes=notes,
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(document, encoding="utf-8")
    images = document.count("data:image/png;base64,")
    console.print(
        f"wrote [bold]{args.out}[/] ({args.out.stat().st_size / 1024:.0f} KiB, {images} figures); "
        f"mean AUROC {100 * result.mean:.1f} %"
    )
    return 0


def _image_job(args: argparse.Namespace) -> bool:
    """Whether this is an image report; the data and the model must be of one kind, else a UsageError
    that says which is which (a signal model cannot score pictures, nor an image model a recording)."""
    from daemon.image_jobs import is_image_data
    from flows.artifact import ModelFormatError, model_kind

    try:
        kind = model_kind(args.model)
    except ModelFormatError as err:
        raise UsageError(str(err)) from err
    images = is_image_data(args.data)
    if kind == "ast" and not images:
        what = "a file" if args.data.exists() else "missing"
        raise UsageError(
            f"{args.model} is an image model (AST) but --data {args.data} is {what}, not an image folder "
            "(MVTec AD layout: train/good, test/good, test/<defect>); give an image model an image folder"
        )
    if kind != "ast" and images:
        raise UsageError(
            f"{args.model} is a signal model ({kind}) but --data {args.data} is an image folder; "
            "report a signal model on its voraus-AD parquet file, or pass an image model (AST) from "
            "cellwatch train --data <image folder>"
        )
    return kind == "ast"
