"""``cellwatch evaluate`` on an MVTec-layout image folder: the MVTec AD protocol on an AST model.

The model scores the test split through `ImageScorer` (what the daemon runs), so the numbers are those of
the deployed pipeline. Image AUROC per defect type against all good test images and their mean; pixel
AUROC and AU-PRO where masks exist; the calibrated threshold's false-positive rate on test/good and its
detection rate per defect type. With --baselines, the teacher's own NLL and nearest-neighbour distance
on the frozen features (fitted on the images the model was trained on) get exactly the model card's
treatment (same upsampling, smoothing and reduction), on features extracted once for both, so a
difference in the table is a difference in the map, not in the post-processing.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from daemon.cli_support import UsageError, console, err_console, progress
from daemon.image_jobs import ScoredSet, count_files, open_dataset, score_dataset

MODEL = "AST"
BASELINES = ("teacher_nll", "feature_nn")
SHORT = {MODEL: "AST", "teacher_nll": "NLL", "feature_nn": "NN"}


def _relative(path: Path, root: Path) -> str:
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return str(path)


def threshold_behaviour(scored: ScoredSet, threshold: Any) -> dict[str, Any]:
    """What the calibrated threshold does on the test images: FPR on good, detection rate per defect."""
    scores = np.asarray(scored.scores, dtype=float)
    labels = np.asarray(scored.labels)
    flagged = scores > threshold.value
    good = labels == "good"
    defects = sorted(set(labels[~good].tolist()))
    return {
        "value": threshold.value,
        "target_fpr": threshold.target_fpr,
        "calibration_fpr": threshold.calibration_fpr,
        "calibration_images": threshold.calibration_windows,
        "test_fpr": float(flagged[good].mean()),
        "false_positives": int(flagged[good].sum()),
        "normals": int(good.sum()),
        "detection_rate": {d: float(flagged[labels == d].mean()) for d in defects},
        "detected": {d: int(flagged[labels == d].sum()) for d in defects},
        "counts": {d: int((labels == d).sum()) for d in defects},
        "overall_detection_rate": float(flagged[~good].mean()),
    }


def baseline_scores(
    args: argparse.Namespace, scorer: Any, n_test: int
) -> tuple[dict[str, tuple[np.ndarray, list[np.ndarray]]], dict[str, float]]:
    """Image scores and maps (at the input size) of the teacher NLL and feature-NN baselines."""
    from flows.ast.baselines import FeatureNN, teacher_nll_map
    from flows.ast.training import extract_features, feature_maps, scores_from_maps

    card = scorer.card
    root = Path(args.data)
    held_out = set(card.training.get("calibration_images", []))
    train_set, test_set = open_dataset(root), open_dataset(root)  # fresh readers: rejections not recounted
    timings: dict[str, float] = {}
    started = time.perf_counter()
    train_total = count_files(root / "train" / "good")
    with progress() as bar:
        task = bar.add_task("baseline features (train/good, test)", total=train_total + n_test)
        train_feats = extract_features(
            scorer.extractor,
            (item.image for item in train_set.train() if _relative(item.path, root) not in held_out),
            on_batch=lambda n: bar.advance(task, n),
        )
        test_feats = extract_features(
            scorer.extractor,
            (item.image for item in test_set.test()),
            on_batch=lambda n: bar.advance(task, n),
        )
        bar.update(task, completed=train_total + n_test)
    timings["baseline_features"] = time.perf_counter() - started
    if len(test_feats) != n_test:  # the folder changed between the two passes
        raise UsageError(f"{root}/test changed while it was being evaluated; run again")
    if len(train_feats) == 0:
        raise UsageError(f"{root}/train/good has no usable images for the feature-NN baseline")
    teacher = scorer.model.teacher
    map_fns = {
        "teacher_nll": lambda f: teacher_nll_map(teacher, f),
        "feature_nn": FeatureNN().fit(train_feats).map,
    }
    out: dict[str, tuple[np.ndarray, list[np.ndarray]]] = {}
    for name, map_fn in map_fns.items():
        started = time.perf_counter()
        maps = feature_maps(map_fn, test_feats, scorer.device)
        scores, full = scores_from_maps(
            maps, card.input_size, reduce=card.scoring.reduce, sigma=card.scoring.sigma
        )
        out[name] = (scores, list(full.numpy()))
        timings[name] = time.perf_counter() - started
    return out, timings


def evaluate_images_command(args: argparse.Namespace) -> int:
    from flows.artifact import ModelFormatError
    from flows.ast.artifact import load_ast
    from flows.ast.evaluation import evaluate_images
    from flows.ast.scorer import ImageScorer
    from ingest.images import MvtecLayoutError

    begun = time.perf_counter()
    say = err_console if args.json else console  # stdout holds nothing but the JSON object
    try:
        loaded = load_ast(args.model)
    except ModelFormatError as err:
        raise UsageError(str(err)) from err
    root = Path(args.data)
    dataset = open_dataset(root)
    try:
        items = dataset.test()
        defects = dataset.defect_types
    except MvtecLayoutError as err:
        raise UsageError(str(err)) from err
    # what can be told from the folder alone fails before the backbone is loaded
    if not defects:
        raise UsageError(f"{root / 'test'} has no defect folders (only good): evaluation needs defect images")
    good_files = count_files(root / "test" / "good")
    defect_files = sum(count_files(root / "test" / d) for d in defects)
    no_good = f"{root / 'test' / 'good'} has no usable images: evaluation needs good test images"
    no_defects = f"the defect folders under {root / 'test'} ({', '.join(defects)}) have no usable images"
    if good_files == 0:
        raise UsageError(no_good)
    if defect_files == 0:
        raise UsageError(no_defects)
    try:
        scorer = ImageScorer(loaded, device=args.device)
    except (ModelFormatError, ValueError) as err:
        raise UsageError(str(err)) from err
    total = good_files + defect_files
    started = time.perf_counter()
    with progress() as bar:
        task = bar.add_task(f"scoring {root / 'test'} ({MODEL})", total=total)
        scored = score_dataset(scorer, items, on_image=lambda n: bar.advance(task, n), keep_images=False)
        bar.update(task, completed=total)
    timings = {"ast": time.perf_counter() - started}
    rejected = dict(sorted(dataset.rejections.items()))
    if rejected:
        say.print(
            f"[yellow]rejected[/] {sum(rejected.values())} test files ("
            + ", ".join(f"{reason} {n}" for reason, n in rejected.items())
            + "): not evaluated (the log names each file)"
        )
    n_good = sum(1 for label in scored.labels if label == "good")
    if n_good == 0:
        raise UsageError(no_good)
    if n_good == len(scored.labels):
        raise UsageError(no_defects)
    empty = [d for d in defects if d not in set(scored.labels)]
    if empty:
        say.print(f"[yellow]note:[/] no usable images in {', '.join(empty)}: left out of the evaluation")
    if dataset.missing_masks:
        say.print(
            f"[yellow]note:[/] {dataset.missing_masks} defect images have no mask: the pixel metrics "
            "leave them out"
        )
    results = {MODEL: evaluate_images(scored.scores, scored.labels, scored.maps, scored.masks)}
    all_scores: dict[str, np.ndarray] = {MODEL: np.asarray(scored.scores)}
    if args.baselines:
        baselines, extra = baseline_scores(args, scorer, len(scored.labels))
        timings.update(extra)
        for name, (scores, maps) in baselines.items():
            results[name] = evaluate_images(scores, scored.labels, maps, scored.masks)
            all_scores[name] = scores
    behaviour = threshold_behaviour(scored, loaded.card.threshold)
    timings["total"] = time.perf_counter() - begun
    if args.scores:
        write_scores(args.scores, scored, root, all_scores, loaded.card.threshold.value)
    if args.json:
        out: dict[str, Any] = results[MODEL].to_json()
        out["threshold"] = behaviour
        out["seconds"] = {k: round(v, 3) for k, v in timings.items()}
        out["rejected"] = rejected
        out["missing_masks"] = dataset.missing_masks
        if args.baselines:
            out["baselines"] = {name: results[name].to_json() for name in BASELINES}
        print(json.dumps(out))
        return 0
    print_table(results, scored, all_scores, timings)
    print_threshold(behaviour)
    return 0


def write_scores(
    path: Path, scored: ScoredSet, root: Path, all_scores: dict[str, np.ndarray], threshold: float
) -> None:
    import csv

    with Path(path).open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", *all_scores, "flagged"])
        for i, (image_path, label) in enumerate(zip(scored.paths, scored.labels, strict=True)):
            writer.writerow(
                [_relative(image_path, root), label]
                + [f"{s[i]:.6g}" for s in all_scores.values()]
                + [int(scored.scores[i] > threshold)]
            )


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def print_table(
    results: dict[str, Any],
    scored: ScoredSet,
    all_scores: dict[str, np.ndarray],
    timings: dict[str, float],
) -> None:
    """Rows: defect types, then their mean and the pooled numbers; columns: each metric, the methods side by
    side within it (best in bold), so the table stays narrow enough for a terminal with the baselines."""
    from rich import box
    from rich.table import Table

    from flows.metrics import roc_auc

    names = list(results)
    first = results[MODEL]
    caption = "image = image AUROC, pixel = pixel AUROC, PRO = AU-PRO to 30 % FPR"
    if len(names) > 1:
        caption += "; NLL = the teacher's own likelihood, NN = nearest neighbour on the frozen features"
    table = Table(
        title=f"% per defect type ({first.image.normals} good test images)",
        caption=caption,
        box=box.SIMPLE_HEAD,
        collapse_padding=True,
        pad_edge=False,
    )
    table.add_column("defect", no_wrap=True)
    table.add_column("n", justify="right", no_wrap=True, min_width=2)
    metrics = ("image", "pixel", "PRO")
    for metric in metrics:
        for name in names:
            table.add_column(f"{metric}\n{SHORT[name]}", justify="right", no_wrap=True)

    def cells(values: Sequence[float | None], bold: bool = False) -> list[str]:
        known = [v for v in values if v is not None]
        best = max(known) if known and len(values) > 1 else None
        return [f"[bold]{_pct(v)}[/]" if bold or (v is not None and v == best) else _pct(v) for v in values]

    for defect, n in first.image.counts.items():
        row = [defect, str(n)]
        row += cells([results[name].image.per_category[defect] for name in names])
        row += cells([results[name].pixel_per_defect.get(defect) for name in names])
        row += cells([results[name].pro_per_defect.get(defect) for name in names])
        table.add_row(*row)
    table.add_section()

    def mean(values: list[float]) -> float | None:
        return float(np.mean(values)) if values else None

    anomaly = scored.anomaly
    table.add_row(
        "mean",
        "",
        *cells([results[name].image.mean for name in names], bold=True),
        *cells([mean(list(results[name].pixel_per_defect.values())) for name in names]),
        *cells([mean(list(results[name].pro_per_defect.values())) for name in names]),
    )
    pooled = [roc_auc(all_scores[name][~anomaly], all_scores[name][anomaly]) for name in names]
    table.add_row(
        "pooled",
        str(int(anomaly.sum())),
        *cells(pooled),
        *cells([results[name].pixel_auroc for name in names]),
        *cells([results[name].au_pro for name in names]),
    )
    table.add_row("seconds", "", *[f"{timings.get(name.lower(), 0.0):.1f}" for name in names])
    console.print(table)


def print_threshold(behaviour: dict[str, Any]) -> None:
    detected = ", ".join(
        f"{d} {behaviour['detected'][d]}/{behaviour['counts'][d]}" for d in behaviour["detection_rate"]
    )
    console.print(
        f"at the calibrated threshold {behaviour['value']:.4g} (target FPR {behaviour['target_fpr']:g}, "
        f"{behaviour['calibration_fpr']:.3f} on {behaviour['calibration_images']} held-out training images): "
        f"test/good {behaviour['false_positives']}/{behaviour['normals']} flagged "
        f"(FPR {behaviour['test_fpr']:.3f}); detected {detected} "
        f"({100 * behaviour['overall_detection_rate']:.0f} % of defect images)"
    )
