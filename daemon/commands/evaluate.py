"""``cellwatch evaluate``: the paper's protocol — AUROC per anomaly category against all normal test
cycles, and their mean — optionally next to the 1-NN and PCA baselines (Table 8.2 of the thesis).

On an MVTec-layout image folder the same verb runs the MVTec AD protocol on an AST model instead
(daemon.image_evaluate); the data decides which, and a model of the other kind is a clear error."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from daemon.cli_support import UsageError, console, progress


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "evaluate",
        help="AUROC per anomaly category or defect type on the test split, optionally with baselines",
        description=(
            "On a voraus-AD parquet file: AUROC per anomaly category of an MVT-Flow model (paper protocol), "
            "with --baselines next to 1-NN and PCA. On an MVTec-layout image folder: image AUROC, pixel "
            "AUROC and AU-PRO per defect type of an AST model, with --baselines next to the teacher's own "
            "NLL and nearest-neighbour on the frozen features, and the calibrated threshold's false-positive "
            "and detection rates on the test images."
        ),
    )
    p.add_argument(
        "--data", required=True, type=Path, help="voraus-AD parquet file, or MVTec-layout image directory"
    )
    p.add_argument("--model", required=True, type=Path, help="model directory from cellwatch train")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument(
        "--baselines",
        action="store_true",
        help="add baselines: 1-NN (l1) and PCA (90 components) on signals, teacher NLL and feature NN "
        "on images",
    )
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument(
        "--bf16", action="store_true", default=None, help="bf16 autocast for scoring (signals only)"
    )
    p.add_argument("--scores", type=Path, help="also write per-cycle or per-image scores to this CSV file")
    p.set_defaults(func=run)


def check_model_kind(data: Path, model: Path, images: bool) -> None:
    """A model of the other kind than the data is a UsageError saying which kind each is."""
    from flows.artifact import ModelFormatError, model_kind

    try:
        kind = model_kind(model)
    except ModelFormatError as err:
        raise UsageError(str(err)) from err
    wanted = "ast" if images else "mvt-flow"
    if kind != wanted:
        data_kind = (
            "an image folder (needs an AST image model)"
            if images
            else ("a signal recording (needs an MVT-Flow signal model)")
        )
        model_desc = {"ast": "an AST image model", "mvt-flow": "an MVT-Flow signal model"}.get(
            kind, f"a {kind!r} model"
        )
        raise UsageError(f"{data} is {data_kind}, but {model} is {model_desc}")


#: evaluation column of each detector's score, and of a fusion model's components
DETECTOR_LABELS = {"fusion": "fusion", "mvt-flow": "MVT-Flow"}
COMPONENT_LABELS = {"nll": "MVT-Flow", "linres": "linres", "pca": "PCA-res"}


def cycle_scores(scorer: Any, cycles: list[np.ndarray]) -> np.ndarray:
    """One score per cycle: the whole cycle (cycle mode) or its highest window score (window mode)."""
    return cycle_scores_with_parts(scorer, cycles)[0]


def cycle_scores_with_parts(
    scorer: Any, cycles: list[np.ndarray]
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """`cycle_scores` and, for a fusion model, each component's normalized score per cycle (window
    mode: its highest window value)."""
    if scorer.card.mode == "cycle":
        result = scorer.score(np.stack([scorer.prepare_cycle(x) for x in cycles]))
        return np.asarray(result.raw), dict(result.components or {})
    out = np.empty(len(cycles))
    parts: dict[str, np.ndarray] = {}
    for i, x in enumerate(cycles):
        windows = scorer.prepare_stream(x)
        if len(windows) == 0:  # shorter than one window: score it padded
            windows = scorer.prepare_stream(np.concatenate([x, np.repeat(x[-1:], scorer.card.window, 0)]))[:1]
        result = scorer.score(windows)
        out[i] = result.raw.max()
        for name, values in (result.components or {}).items():
            parts.setdefault(name, np.empty(len(cycles)))[i] = values.max()
    return out, parts


def run(args: argparse.Namespace) -> int:
    from daemon.image_jobs import data_kind_context, is_image_data, resolve_kind_flags

    images = is_image_data(args.data)
    resolve_kind_flags(
        args,
        images=images,
        signal_only={"--bf16": False},
        image_only={},
        context=data_kind_context(args.data, images),
    )
    check_model_kind(args.data, args.model, images)
    if images:
        from daemon.image_evaluate import evaluate_images_command

        return evaluate_images_command(args)
    return evaluate_signals(args)


def evaluate_signals(args: argparse.Namespace) -> int:
    """The paper's protocol on a voraus-AD file with an MVT-Flow model."""
    from daemon.dataset import load_cycles
    from flows.artifact import ModelFormatError, load_model
    from flows.metrics import per_category_auroc
    from flows.preprocess import pad_or_truncate
    from flows.scorer import Scorer

    try:
        peek = load_model(args.model)
    except ModelFormatError as err:
        raise UsageError(str(err)) from err
    divider = int(peek.card.training.get("rate_divider", 1))
    data = load_cycles(args.data, peek.card.signals, rate_divider=divider, want_train=args.baselines)
    try:
        model = load_model(args.model, expect_signals=data.signal_names, expect_rate_hz=data.rate_hz)
        scorer = Scorer(model, device=args.device, bf16=args.bf16)
    except (ModelFormatError, ValueError) as err:
        raise UsageError(str(err)) from err
    test = data.test
    if not any(test.anomaly) or all(test.anomaly):
        raise UsageError(f"{args.data} needs both normal and anomalous test cycles to evaluate")
    results: dict[str, Any] = {}
    timings: dict[str, float] = {}
    started = time.perf_counter()
    label = DETECTOR_LABELS[model.card.detector]
    with progress() as bar:
        task = bar.add_task(f"scoring test cycles ({label})", total=len(test))
        parts, component_parts = [], []
        for i in range(0, len(test), 64):
            raw, components = cycle_scores_with_parts(scorer, test.signals[i : i + 64])
            parts.append(raw)
            component_parts.append(components)
            bar.advance(task, len(test.signals[i : i + 64]))
    model_scores = np.concatenate(parts)
    timings[label] = time.perf_counter() - started
    anomaly = np.asarray(test.anomaly)
    results[label] = per_category_auroc(model_scores, test.categories, anomaly)
    all_scores = {label: model_scores}
    columns = []  # a fusion model's components
    for name in component_parts[0] if component_parts else {}:
        values = np.concatenate([c[name] for c in component_parts])
        column = COMPONENT_LABELS.get(name, name)
        results[column] = per_category_auroc(values, test.categories, anomaly)
        all_scores[column] = values
        timings[column] = timings[label]
        columns.append(column)
    if args.baselines:
        import torch

        from flows.baselines import OneNN, PCABaseline

        steps = max(len(x) for x in data.train.signals)
        scaler = model.card.scaler

        def matrix(cycles: list[np.ndarray]) -> torch.Tensor:
            return torch.from_numpy(np.stack([pad_or_truncate(scaler.transform(x), steps) for x in cycles]))

        train_x, test_x = matrix(data.train.signals), matrix(test.signals)
        for name, baseline in (("1-NN", OneNN()), ("PCA", PCABaseline(n_components=90))):
            started = time.perf_counter()
            with console.status(f"baseline {name}"):
                baseline.fit(train_x)
                scores = baseline.score(test_x).double().numpy()
            timings[name] = time.perf_counter() - started
            results[name] = per_category_auroc(scores, test.categories, anomaly)
            all_scores[name] = scores
    if args.scores:
        import csv

        with args.scores.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["sample", "category", "variant", "anomaly", *all_scores])
            for i in range(len(test)):
                writer.writerow(
                    [test.samples[i], test.categories[i], test.variants[i], int(test.anomaly[i])]
                    + [f"{s[i]:.6g}" for s in all_scores.values()]
                )
    main = results[label]
    if args.json:
        out: dict[str, Any] = {
            "detector": model.card.detector,
            "per_category": main.per_category,
            "mean": main.mean,
            "counts": main.counts,
            "normals": main.normals,
            "seconds": {k: round(v, 3) for k, v in timings.items()},
        }
        if columns:
            out["components"] = {
                name: {"per_category": results[name].per_category, "mean": results[name].mean}
                for name in columns
            }
        if args.baselines:
            out["baselines"] = {
                name: {"per_category": r.per_category, "mean": r.mean}
                for name, r in results.items()
                if name in ("1-NN", "PCA")
            }
        print(json.dumps(out))
        return 0
    print_table(results, main.counts, main.normals, timings)
    return 0


def print_table(
    results: dict[str, Any], counts: dict[str, int], normals: int, timings: dict[str, float]
) -> None:
    from rich.table import Table

    names = list(results)
    table = Table(title=f"AUROC % per category (each against all {normals} normal test cycles)")
    table.add_column("category")
    table.add_column("n", justify="right")
    for name in names:
        table.add_column(name, justify="right")
    for category, n in counts.items():
        row = [f"{100 * results[name].per_category[category]:.1f}" for name in names]
        best = max(range(len(names)), key=lambda i: results[names[i]].per_category[category])
        row[best] = f"[bold]{row[best]}[/]"
        table.add_row(category, str(n), *row)
    table.add_section()
    table.add_row("mean", "", *[f"[bold]{100 * results[name].mean:.1f}[/]" for name in names])
    table.add_row("seconds", "", *[f"{timings[name]:.1f}" for name in names])
    console.print(table)
