"""``cellwatch train`` on an MVTec-layout image folder: AST on DIR/train/good.

The frozen features of every readable training image are extracted once (one pass over the folder, the
images never held in memory at full size); a seeded random part of them, at least 2 images, is held out
and never trained on: it calibrates the image threshold at the target false-positive rate, scored by
exactly the pipeline `flows.ast.scorer.ImageScorer` runs (same extractor, map, upsampling, smoothing and
reduction), so the rate the card records is the one the deployed model has on such images.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
from pathlib import Path
from typing import Any

import numpy as np

from daemon.cli_support import UsageError, console, progress
from daemon.image_jobs import count_files, open_dataset

MIN_IMAGES = 4
MIN_CALIBRATION = 2


def _check(args: argparse.Namespace) -> None:
    rules = {
        "--epochs": (args.epochs, args.epochs >= 1),
        "--student-epochs": (args.student_epochs, args.student_epochs is None or args.student_epochs >= 1),
        "--batch-size": (args.batch_size, args.batch_size >= 1),
        "--lr": (args.lr, args.lr > 0),
        "--blocks": (args.blocks, args.blocks >= 1),
        "--size": (args.size, args.size >= 32),
        "--block": (args.block, 0 <= args.block <= 15),
        "--teacher-hidden": (args.teacher_hidden, args.teacher_hidden >= 1),
        "--student-width": (args.student_width, args.student_width >= 1),
        "--student-blocks": (args.student_blocks, args.student_blocks >= 0),
        "--sigma": (args.sigma, args.sigma >= 0 and math.isfinite(args.sigma)),
        "--fpr": (args.fpr, 0 < args.fpr < 1),
        "--calibration-fraction": (args.calibration_fraction, 0 < args.calibration_fraction < 0.5),
    }
    for flag, (value, ok) in rules.items():
        if not ok:
            raise UsageError(f"{flag} is out of range: {value}")
    if args.sigma > 0 and args.size <= math.ceil(4 * args.sigma):
        raise UsageError(
            f"--sigma {args.sigma:g} is too large for --size {args.size}: the smoothing kernel needs an "
            f"input larger than {math.ceil(4 * args.sigma)} px"
        )


def describe_rejections(rejections: Any) -> str:
    """'2 (unreadable 1, empty 1)' for the user, from MvtecDataset.rejections."""
    total = sum(rejections.values())
    return f"{total} (" + ", ".join(f"{reason} {n}" for reason, n in sorted(rejections.items())) + ")"


def train_images(args: argparse.Namespace) -> int:
    """Train AST on DIR/train/good and save it with its card (flags already resolved for images)."""
    import torch

    from flows.artifact import Threshold
    from flows.ast.artifact import ASTCard, ScoringConfig, data_fingerprint, save_ast
    from flows.ast.features import FeatureExtractor, FeatureExtractorConfig
    from flows.ast.model import AST, ASTConfig
    from flows.ast.training import (
        ASTTrainConfig,
        extract_features,
        feature_maps,
        scores_from_maps,
        train_ast,
    )
    from flows.training import resolve_device, seed_everything

    _check(args)
    try:
        device = resolve_device(args.device)
    except ValueError as err:
        raise UsageError(str(err)) from err
    root = Path(args.data)
    dataset = open_dataset(root)
    folder = root / "train" / "good"
    candidates = count_files(folder)
    if candidates < MIN_IMAGES:  # told before the backbone is loaded
        raise UsageError(f"{folder} has {candidates} files; need at least {MIN_IMAGES} usable images")
    input_size = (args.size, args.size)
    features_config = FeatureExtractorConfig(block=args.block, input_size=input_size)
    extractor = FeatureExtractor(features_config).to(device)
    paths: list[Path] = []

    def images() -> Any:
        for item in dataset.train():
            paths.append(item.path)
            yield item.image

    with progress() as bar:
        task = bar.add_task(f"features of {folder} (block {args.block}, {args.size} px)", total=candidates)
        features = extract_features(extractor, images(), on_batch=lambda n: bar.advance(task, n))
        bar.update(task, total=max(len(paths), 1), completed=len(paths))
    rejected = dict(sorted(dataset.rejections.items()))
    if rejected:
        console.print(
            f"[yellow]rejected[/] {describe_rejections(dataset.rejections)} of {candidates} files in "
            f"{folder}: not trained on (the log names each file)"
        )
    if len(paths) < MIN_IMAGES:
        more = f"; rejected {describe_rejections(dataset.rejections)}" if rejected else ""
        raise UsageError(f"{folder} has {len(paths)} usable images{more}; need at least {MIN_IMAGES}")

    n_cal = max(MIN_CALIBRATION, round(len(paths) * args.calibration_fraction))
    order = np.random.default_rng(args.seed).permutation(len(paths))
    cal_index, fit_index = sorted(order[:n_cal].tolist()), sorted(order[n_cal:].tolist())
    fit_features, cal_features = features[fit_index], features[cal_index]
    student_epochs = args.student_epochs if args.student_epochs is not None else args.epochs
    train_config = ASTTrainConfig(
        teacher_epochs=args.epochs,
        student_epochs=student_epochs,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        seed=args.seed,
    )
    architecture = ASTConfig(
        channels=extractor.channels,
        coupling_blocks=args.blocks,
        teacher_hidden=args.teacher_hidden,
        permutation_seed=args.seed,
        student_blocks=args.student_blocks,
        student_width=args.student_width,
    )
    scoring = ScoringConfig(reduce=args.score, sigma=args.sigma if args.sigma > 0 else None)
    console.print(
        f"training AST on {len(fit_index)} images of {folder} ({extractor.channels} channels x "
        f"{extractor.feature_size[0]}x{extractor.feature_size[1]} from block {args.block} at "
        f"{args.size} px), {n_cal} held out for calibration, device {device}"
    )
    seed_everything(args.seed)
    model = AST(architecture)
    steps = -(-len(fit_index) // args.batch_size)
    with progress() as bar:
        tasks = {
            "teacher": bar.add_task("teacher", total=args.epochs * steps),
            "student": bar.add_task("student", total=student_epochs * steps),
        }
        epochs = {"teacher": args.epochs, "student": student_epochs}
        done = {"teacher": 0, "student": 0}

        def on_batch(phase: str, loss: float) -> None:
            bar.update(
                tasks[phase],
                advance=1,
                description=f"{phase} epoch {done[phase] + 1}/{epochs[phase]} loss {loss:+.4f}",
            )

        def on_epoch(phase: str, epoch: int, loss: float) -> None:
            done[phase] = epoch + 1
            bar.console.log(f"{phase} epoch {epoch + 1}/{epochs[phase]}: mean loss {loss:+.5f}")

        try:
            history = train_ast(
                model, fit_features, train_config, device, on_batch=on_batch, on_epoch=on_epoch
            )
        except FloatingPointError as err:
            raise UsageError(f"training diverged ({err}); try a lower --lr") from err

    maps = feature_maps(model.anomaly_map, cal_features, device)
    cal_scores, _ = scores_from_maps(maps, input_size, reduce=scoring.reduce, sigma=scoring.sigma)
    threshold = Threshold.calibrate(cal_scores, args.fpr)
    card = ASTCard(
        features=features_config,
        channels=extractor.channels,
        feature_size=extractor.feature_size,
        architecture=architecture,
        scoring=scoring,
        threshold=threshold,
        training={
            "data": str(args.data),
            "data_fingerprint": data_fingerprint(paths, root=root),
            "counts": {"fit": len(fit_index), "calibration": n_cal, "rejected": rejected},
            "calibration_images": [str(paths[i].relative_to(root)) for i in cal_index],
            "config": train_config.to_dict(),
            "losses": {"teacher": history.teacher_loss, "student": history.student_loss},
            "seconds": round(history.seconds, 2),
            "device": str(device),
            "torch": torch.__version__,
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        },
    )
    save_ast(args.out, model.cpu(), card)
    if n_cal * args.fpr < 1:
        console.print(
            f"[yellow]note:[/] {n_cal} calibration images cannot resolve a {args.fpr:g} false-positive rate; "
            "the threshold is their maximum score"
        )
    console.print(
        f"saved {args.out}: final losses teacher {history.teacher_loss[-1]:+.4f}, student "
        f"{history.student_loss[-1]:.4f} after {history.seconds:.0f} s; threshold {threshold.value:.4g} "
        f"(target FPR {args.fpr:g}, {threshold.calibration_fpr:.3f} on {n_cal} calibration images)"
    )
    return 0
