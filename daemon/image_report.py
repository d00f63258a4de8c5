"""The HTML report of an image model (AST) on an MVTec-AD-layout folder.

Same rules as the signal report (daemon.report), whose helpers it reuses: ONE self-contained HTML file,
inline CSS, figures as base64 PNG data URIs drawn on the Agg canvas at about 100 dpi, no scripts, no
external references. What it shows is what an inspector asks of an image model: how well each defect type
is detected (image AUROC) and located (pixel AUROC, AU-PRO), where the threshold falls between good and
defect scores, and the anomaly maps of the images the model is most sure about, good ones included, so
false alarms are seen and not only hits.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from daemon.cli_support import UsageError, console, progress
from daemon.image_jobs import ScoredSet
from daemon.overlays import MAP_ALPHA, MAP_CMAP  # one colour mapping for report and overlays
from daemon.report import (
    CSS,
    DPI,
    ReportHeader,
    _e,
    _figure,
    _num,
    header_html,
    histogram_figure,
    png_data_uri,
    roc_figure,
)

GOOD = "good"
SCORE_LABEL = "image score (AST map, student–teacher distance)"


@dataclass(frozen=True)
class MapCase:
    """One test image shown with its anomaly map, at the model's input size."""

    name: str  # path relative to the data folder, e.g. test/scratch/003.png
    label: str  # "good" or the defect type
    score: float  # raw image score
    normalized: float  # threshold = 1
    image: np.ndarray  # uint8 RGB (H, W, 3)
    amap: np.ndarray  # float (H, W)
    mask: np.ndarray | None  # bool (H, W); None = no mask file
    source: str  # why it is shown, e.g. "defect rank 1"


@dataclass(frozen=True)
class MapScale:
    """The one colour scale of every map in a report, so a false alarm and a hit can be compared.

    `low` is the median pixel of the good test images' maps (a typical normal pixel: transparent),
    `high` the 99.9th percentile of all test-map pixels (the colour scale's top)."""

    low: float
    high: float


def map_scale(maps: Sequence[np.ndarray], labels: Sequence[str]) -> MapScale:
    good = [np.asarray(m).ravel() for m, label in zip(maps, labels, strict=True) if label == GOOD]
    every = np.concatenate([np.asarray(m).ravel() for m in maps])
    low = float(np.median(np.concatenate(good))) if good else float(np.quantile(every, 0.5))
    high = float(np.quantile(every, 0.999))
    if not high > low:
        high = low + max(abs(low), 1.0) * 1e-6
    return MapScale(low=low, high=high)


def pick_cases(
    scored: ScoredSet, normalized: np.ndarray, root: Path, *, defects: int, goods: int
) -> list[MapCase]:
    """The `defects` highest-scoring defect images, then the `goods` highest-scoring good ones (the
    closest to a false alarm), highest first (ties: data-set order)."""
    scores = np.asarray(scored.scores, dtype=float)
    anomaly = scored.anomaly
    chosen: list[tuple[str, int]] = []
    for want, n, kind in ((anomaly, defects, "defect"), (~anomaly, goods, "good")):
        candidates = np.flatnonzero(want)
        order = candidates[np.argsort(-scores[candidates], kind="stable")]
        chosen += [(f"{kind} rank {r}", int(i)) for r, i in enumerate(order[: max(n, 0)], 1)]
    cases = []
    for source, i in chosen:
        path = Path(scored.paths[i])
        try:
            name = str(path.relative_to(root))
        except ValueError:
            name = path.name
        cases.append(
            MapCase(
                name=name,
                label=scored.labels[i],
                score=float(scores[i]),
                normalized=float(normalized[i]),
                image=scored.images[i],
                amap=np.asarray(scored.maps[i], dtype=np.float32),
                mask=scored.masks[i],
                source=source,
            )
        )
    return cases


def map_figure(case: MapCase, scale: MapScale) -> Figure:
    """(a) the image, (b) its anomaly map over it, the mask's outline in white, (c) the ground truth."""
    fig = Figure(figsize=(8.6, 3.1), dpi=DPI, layout="constrained")
    ax_img, ax_map, ax_mask = fig.subplots(1, 3)
    ax_img.imshow(case.image, interpolation="nearest")
    ax_img.set_title("(a) image", fontsize=9, loc="left")
    ax_map.imshow(case.image, interpolation="nearest")
    span = scale.high - scale.low
    strength = np.clip((case.amap - scale.low) / span, 0.0, 1.0)
    heat = ax_map.imshow(
        case.amap,
        cmap=MAP_CMAP,
        vmin=scale.low,
        vmax=scale.high,
        alpha=MAP_ALPHA * strength,
        interpolation="bilinear",
    )
    if case.mask is not None and case.mask.any():
        ax_map.contour(case.mask.astype(float), levels=[0.5], colors="white", linewidths=0.8)
    ax_map.set_title("(b) anomaly map over the image", fontsize=9, loc="left")
    cbar = fig.colorbar(heat, ax=ax_map, fraction=0.046, pad=0.02)
    if cbar.solids is not None:
        cbar.solids.set(alpha=1)  # the bar shows the colours, not the per-pixel opacity
    cbar.ax.tick_params(labelsize=7)
    if case.mask is None:
        ax_mask.imshow(np.full(case.image.shape[:2], 0.92), cmap="gray", vmin=0, vmax=1)
        text = "no mask (good image)" if case.label == GOOD else "no mask"
        ax_mask.text(0.5, 0.5, text, transform=ax_mask.transAxes, ha="center", va="center", fontsize=10)
    else:
        ax_mask.imshow(case.mask, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax_mask.set_title("(c) ground-truth mask", fontsize=9, loc="left")
    for ax in (ax_img, ax_map, ax_mask):
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(
        f"{case.label} · {case.name} · score {_num(case.score)} "
        f"(normalized {case.normalized:.2f}, threshold = 1)",
        fontsize=10,
    )
    return fig


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _data(x: float | None) -> str:
    return "" if x is None else f"{x!r}"


def metrics_table_html(metrics: Any, scored: ScoredSet, threshold: float) -> str:
    """Image AUROC, pixel AUROC and AU-PRO per defect type (percent; full precision in data-* attributes),
    with the share of each type's images over the threshold and the good images' false-alarm share."""
    scores = np.asarray(scored.scores, dtype=float)
    labels = np.asarray(scored.labels, dtype=object)
    flagged = scores > threshold
    masked = np.array([m is not None for m in scored.masks], dtype=bool)
    image = metrics.image
    rows = []
    for defect, auroc in image.per_category.items():
        own = labels == defect
        pixel = metrics.pixel_per_defect.get(defect)
        pro = metrics.pro_per_defect.get(defect)
        rows.append(
            f'<tr data-defect="{_e(defect)}"><td>{_e(defect)}</td>'
            f'<td class="num">{int(own.sum())}</td><td class="num">{int((own & masked).sum())}</td>'
            f'<td class="num" data-auroc="{auroc!r}">{_pct(auroc)}</td>'
            f'<td class="num" data-pixel-auroc="{_data(pixel)}">{_pct(pixel)}</td>'
            f'<td class="num" data-au-pro="{_data(pro)}">{_pct(pro)}</td>'
            f'<td class="num">{flagged[own].mean():.0%}</td></tr>'
        )
    anomaly = scored.anomaly
    rows.append(
        f'<tr class="mean"><td>all defects</td><td class="num">{int(anomaly.sum())}</td>'
        f'<td class="num">{metrics.masked_images}</td>'
        f'<td class="num" data-auroc="{image.mean!r}">{_pct(image.mean)}</td>'
        f'<td class="num" data-pixel-auroc="{_data(metrics.pixel_auroc)}">{_pct(metrics.pixel_auroc)}</td>'
        f'<td class="num" data-au-pro="{_data(metrics.au_pro)}">{_pct(metrics.au_pro)}</td>'
        f'<td class="num">{flagged[anomaly].mean():.0%}</td></tr>'
    )
    rows.append(
        f'<tr data-defect="good"><td>good (false alarms)</td><td class="num">{int((~anomaly).sum())}</td>'
        f'<td class="num">–</td><td class="num">–</td><td class="num">–</td><td class="num">–</td>'
        f'<td class="num">{flagged[~anomaly].mean():.0%}</td></tr>'
    )
    head = (
        '<tr><th>defect type</th><th class="num">images</th><th class="num">with mask</th>'
        '<th class="num">image AUROC %</th><th class="num">pixel AUROC %</th><th class="num">AU-PRO %</th>'
        '<th class="num">flagged at threshold</th></tr>'
    )
    return (
        f'<table class="metrics" id="metrics">{head}{"".join(rows)}</table>'
        f'<p class="note">Image AUROC: each defect type against all {image.normals} good test images, the '
        "mean unweighted over defect types (MVTec AD protocol). Pixel AUROC and AU-PRO (up to 30 % FPR) "
        "over the good images' pixels and the pixels of the defect images that have a mask; the "
        "all-defects row pools every defect type's pixels (not a mean of the rows). – : no mask to "
        "score against.</p>"
    )


def build_image_report(
    header: ReportHeader,
    *,
    scored: ScoredSet,
    metrics: Any,
    cases: Sequence[MapCase],
    scale: MapScale,
    notes: Sequence[str] = (),
) -> str:
    """The whole image report as one HTML document (figures embedded)."""
    scores = np.asarray(scored.scores, dtype=float)
    anomaly = scored.anomaly
    result = metrics.image
    roc = png_data_uri(
        roc_figure(
            scores,
            scored.labels,
            anomaly,
            result,
            unit="images",
            group="defect type",
            title="ROC per defect type",
        )
    )
    hist = png_data_uri(
        histogram_figure(
            scores,
            scored.labels,
            anomaly,
            header.threshold,
            order=list(result.per_category),
            unit="images",
            score_label=SCORE_LABEL,
        )
    )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>cellwatch image report: {_e(header.model)} on {_e(Path(header.data).name)}</title>",
        f"<style>{CSS}</style></head><body>",
        "<h1>cellwatch image report</h1>",
        header_html(header),
        "<h2>1. Detection and localization per defect type</h2>",
        metrics_table_html(metrics, scored, header.threshold),
        _figure(
            roc,
            "ROC curves per defect type",
            "ROC curve of each defect type's test images against all good test images; "
            "image AUROC % in the legend.",
        ),
        "<h2>2. Score distributions</h2>",
        _figure(
            hist,
            "score histograms, good against defect test images",
            "Image scores of the good test images (grey) against all defect images and each defect type; "
            "the dashed line is the model's threshold.",
        ),
        '<h2 id="maps">3. Anomaly maps of the top images</h2>',
        '<p class="note">'
        + _e(
            f"One colour scale for every map in this report, so maps compare across images: transparent "
            f"at {_num(scale.low)} (the median pixel of the good test images' maps), fully coloured at "
            f"{_num(scale.high)} (the 99.9th percentile of all test-map pixels). The white outline in (b) "
            "is the ground-truth mask. Images and maps at the model's input size."
        )
        + "</p>",
    ]
    parts += [f'<p class="note">{_e(note)}</p>' for note in notes]
    if not cases:
        parts.append('<p class="note">No images to show.</p>')
    for case in cases:
        mask = "no mask" if case.mask is None else f"mask covers {case.mask.mean():.1%} of the image"
        caption = (
            f"{_e(case.source)}: <code>{_e(case.name)}</code>, {_e(case.label)}, score {_num(case.score)} "
            f"(normalized {case.normalized:.2f}; {'over' if case.normalized > 1 else 'under'} the "
            f"threshold); {mask}."
        )
        parts.append(
            f'<div class="case" data-image="{_e(case.name)}" data-label="{_e(case.label)}">'
            + _figure(
                png_data_uri(map_figure(case, scale), colors=None), f"anomaly map of {case.name}", caption
            )
            + "</div>"
        )
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------- the CLI job


def _count_test_files(root: Path, defects: Sequence[str]) -> int:
    from ingest.images.mvtec import SUFFIXES

    total = 0
    for folder in [GOOD, *defects]:
        path = root / "test" / folder
        if path.is_dir():
            total += sum(1 for p in path.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES)
    return total


def run_image_report(args: argparse.Namespace) -> int:
    """`cellwatch report` on an image folder with an AST model (the command has checked the pairing)."""
    from daemon.image_jobs import open_dataset, score_dataset
    from flows.artifact import ModelFormatError
    from flows.ast.artifact import data_fingerprint, load_ast
    from flows.ast.evaluation import evaluate_images
    from flows.ast.features import BACKBONE
    from flows.ast.scorer import ImageScorer

    if args.alerts is not None:
        raise UsageError("--alerts belongs to signal reports (the daemon's alerts on a recording)")
    if args.top_good < 0:
        raise UsageError(f"--top-good must be >= 0, got {args.top_good}")
    try:
        loaded = load_ast(args.model)
        scorer = ImageScorer(loaded, device=args.device)
    except ModelFormatError as err:
        raise UsageError(f"{args.model}: {err}") from err
    dataset = open_dataset(args.data)
    defects = dataset.defect_types
    with progress() as bar:
        task = bar.add_task("scoring test images (AST)", total=_count_test_files(dataset.root, defects))
        scored = score_dataset(scorer, dataset.test(), on_image=lambda n: bar.advance(task, n))
    try:
        metrics = evaluate_images(scored.scores, scored.labels, scored.maps, scored.masks)
    except ValueError as err:
        raise UsageError(f"{args.data}: {err}") from err

    card = scorer.card
    threshold = card.threshold
    normalized = np.asarray(threshold.normalize(np.asarray(scored.scores, dtype=float)), dtype=float)
    cases = pick_cases(scored, normalized, dataset.root, defects=args.top, goods=args.top_good)
    scale = map_scale(scored.maps, scored.labels)

    train_files = [item.path for item in dataset.train()]
    here = data_fingerprint(train_files, dataset.root) if train_files else None
    trained_on = card.training.get("data_fingerprint")
    if here is None:
        fingerprint = f"no training images here; model trained on {trained_on or 'unrecorded data'}"
    elif trained_on is None:
        fingerprint = f"train/good {here} (the model records no fingerprint)"
    elif trained_on == here:
        fingerprint = f"{here}: train/good is the data this model was trained on"
    else:
        fingerprint = f"train/good {here}, the model was trained on {trained_on} (other data)"
    arch = card.architecture
    h, w = card.input_size
    fh, fw = card.feature_size
    sigma = "none" if card.scoring.sigma is None else f"{card.scoring.sigma:g} px"
    details = {
        "model directory": str(args.model),
        "features": (
            f"{BACKBONE} block {card.features.block} ({card.channels} channels at {fh}×{fw}), input {h}×{w}"
        ),
        "architecture": (
            f"teacher flow {arch.coupling_blocks} coupling blocks, hidden {arch.teacher_hidden}; "
            f"student {arch.student_blocks} blocks, width {arch.student_width}"
        ),
        "scoring": f"map {card.scoring.reduce}, Gaussian sigma {sigma}, device {scorer.device}",
        "data fingerprint": fingerprint,
        "defect types": ", ".join(defects) or "none",
        "image AUROC": f"{100 * metrics.image.mean:.1f} % mean over {len(metrics.image.per_category)} types",
        "pixel AUROC / AU-PRO": f"{_pct(metrics.pixel_auroc)} % / {_pct(metrics.au_pro)} %",
    }
    notes = []
    if dataset.rejections:
        reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(dataset.rejections.items()))
        details["rejected files"] = f"{sum(dataset.rejections.values())} not read ({reasons}; see the log)"
    if dataset.missing_masks:
        details["defect images without a mask"] = str(dataset.missing_masks)
    anomaly = scored.anomaly
    notes.append(
        f"The {min(args.top, int(anomaly.sum()))} highest-scoring defect images, then the "
        f"{min(args.top_good, int((~anomaly).sum()))} highest-scoring good images (the nearest to a "
        "false alarm)."
    )
    header = ReportHeader(
        model=str(Path(args.model).resolve().name),
        data=str(args.data),
        cycles=len(scored.scores),
        normals=int((~anomaly).sum()),
        anomalies=int(anomaly.sum()),
        threshold=threshold.value,
        target_fpr=threshold.target_fpr,
        created=datetime.now(UTC),
        details=details,
        unit="images",
        data_label="data folder",
        classes=("good", "defect"),
    )
    with console.status("drawing figures"):
        document = build_image_report(
            header, scored=scored, metrics=metrics, cases=cases, scale=scale, notes=notes
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(document, encoding="utf-8")
    figures = document.count("data:image/png;base64,")
    console.print(
        f"wrote [bold]{args.out}[/] ({args.out.stat().st_size / 1024:.0f} KiB, {figures} figures); "
        f"image AUROC {_pct(metrics.image.mean)} %, pixel AUROC {_pct(metrics.pixel_auroc)} %, "
        f"AU-PRO {_pct(metrics.au_pro)} %"
    )
    return 0
