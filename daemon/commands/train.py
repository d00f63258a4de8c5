"""``cellwatch train``: fit MVT-Flow on the normal cycles of a voraus-AD file, or AST on the normal images
of an MVTec-layout folder (daemon.image_train); the data decides which."""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path
from typing import Any

import numpy as np

from daemon.cli_support import UsageError, console, progress
from ingest.voraus.schema import SIGNAL_GROUPS

#: flags of the signal path only -> their default there (registered with default None: see run)
SIGNAL_ONLY: dict[str, Any] = {
    "--signals": "machine",
    "--rate-divider": 1,
    "--mode": "cycle",
    "--window": 256,
    "--hop": 64,
    "--milestones": [11, 61],
    "--hidden-scale": 2,
    "--bf16": False,
    "--detector": "fusion",
}
#: flags of the image path only -> their default there
IMAGE_ONLY: dict[str, Any] = {
    "--size": 192,
    "--block": 10,
    "--teacher-hidden": 256,
    "--student-width": 256,
    "--student-blocks": 4,
    "--score": "mean",
    "--sigma": 4.0,
    "--student-epochs": None,  # = --epochs
}
#: flags of both whose default depends on the kind -> (signals, images)
SHARED: dict[str, tuple[Any, Any]] = {
    "--epochs": (70, 60),
    "--batch-size": (32, 8),
    "--lr": (8e-4, 2e-4),
    "--calibration-fraction": (0.1, 0.2),
}


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "train",
        help="train on normal data: MVT-Flow on a voraus-AD file, AST on an MVTec-layout image folder",
        description=(
            "The data decides the model. A voraus-AD parquet file trains MVT-Flow with the paper's "
            "configuration by default (4 coupling blocks, kernels 13/1/1, Adam 8e-4, x0.1 at epochs 11 and "
            "61, 70 epochs, batch 32) on the normal training cycles (PRE_A); the scaler is fitted on "
            "training cycles only. A directory in the MVTec AD layout trains AST (frozen EfficientNet-Lite0 "
            "features, a normalizing-flow teacher, then a student) on DIR/train/good. Either way a held-out "
            "part of the normal training data, never trained on, calibrates the alert threshold. The flags "
            "under signals or images apply to that kind only; giving one for the other kind is an error."
        ),
    )
    p.add_argument(
        "--data", required=True, type=Path, help="voraus-AD parquet file, or MVTec-layout image directory"
    )
    p.add_argument("--out", required=True, type=Path, help="model directory to write")
    signals = p.add_argument_group("signals (voraus-AD parquet file, MVT-Flow)")
    signals.add_argument("--signals", choices=list(SIGNAL_GROUPS), help="signal group (default machine)")
    signals.add_argument(
        "--rate-divider", type=int, help="keep every N-th time step (default 1 = as recorded)"
    )
    signals.add_argument(
        "--mode", choices=("cycle", "window"), help="score whole cycles or windows (default cycle)"
    )
    signals.add_argument("--window", type=int, help="window length in time steps (window mode, default 256)")
    signals.add_argument("--hop", type=int, help="window hop in time steps (window mode, default 64)")
    signals.add_argument("--milestones", type=int, nargs="*", help="epochs where lr is x0.1 (default 11 61)")
    signals.add_argument("--hidden-scale", type=int, help="hidden channels = signals x this (default 2)")
    signals.add_argument(
        "--bf16", action="store_true", default=None, help="bf16 autocast for training and calibration"
    )
    signals.add_argument(
        "--detector",
        choices=("fusion", "mvt-flow"),
        help="fusion (default): MVT-Flow's NLL, a local linear-relation residual and a whole-cycle PCA "
        "residual, each normalized on the calibration split, the score is the most anomalous of the three; "
        "mvt-flow: the flow's NLL alone, as published",
    )
    images = p.add_argument_group("images (MVTec-layout directory, AST)")
    images.add_argument(
        "--size", type=int, help="input size in pixels, images are resized to it (default 192)"
    )
    images.add_argument(
        "--block", type=int, help="EfficientNet-Lite0 block whose output is the feature map (default 10)"
    )
    images.add_argument(
        "--teacher-hidden", type=int, help="hidden channels of the teacher's subnets (default 256)"
    )
    images.add_argument("--student-width", type=int, help="channels of the student's layers (default 256)")
    images.add_argument("--student-blocks", type=int, help="residual blocks of the student (default 4)")
    images.add_argument(
        "--score", choices=("mean", "max"), help="image score = mean or max of the anomaly map (default mean)"
    )
    images.add_argument(
        "--sigma", type=float, help="Gaussian smoothing of the map in input pixels (default 4; 0 = none)"
    )
    images.add_argument(
        "--student-epochs", type=int, help="epochs of the student (default: the same as --epochs)"
    )
    both = p.add_argument_group("both")
    both.add_argument(
        "--epochs", type=int, help="epochs (signals: 70; images: 60 for the teacher and for the student)"
    )
    both.add_argument("--batch-size", type=int, help="batch size (signals: 32; images: 8)")
    both.add_argument("--lr", type=float, help="learning rate (signals: 8e-4; images: 2e-4)")
    both.add_argument(
        "--blocks", type=int, default=4, help="coupling blocks of the flow (MVT-Flow, or AST's teacher)"
    )
    both.add_argument("--seed", type=int, default=177, help="random seed (default 177)")
    both.add_argument("--device", default="auto", help="auto, cpu or cuda")
    both.add_argument("--fpr", type=float, default=0.01, help="target false-positive rate of the threshold")
    both.add_argument(
        "--calibration-fraction",
        type=float,
        help="fraction of the normal training data held out (never trained on) to calibrate the threshold "
        "(signals: 0.1 of the cycles; images: 0.2 of train/good, at least 2 images)",
    )
    p.set_defaults(func=run)


def _check(args: argparse.Namespace) -> None:
    rules = {
        "--epochs": (args.epochs, args.epochs >= 1),
        "--batch-size": (args.batch_size, args.batch_size >= 1),
        "--lr": (args.lr, args.lr > 0),
        "--blocks": (args.blocks, args.blocks >= 1),
        "--hidden-scale": (args.hidden_scale, args.hidden_scale >= 1),
        "--window": (args.window, args.window >= 8),
        "--hop": (args.hop, args.hop >= 1),
        "--fpr": (args.fpr, 0 < args.fpr < 1),
        "--calibration-fraction": (args.calibration_fraction, 0 < args.calibration_fraction < 0.5),
    }
    for flag, (value, ok) in rules.items():
        if not ok:
            raise UsageError(f"{flag} is out of range: {value}")


def run(args: argparse.Namespace) -> int:
    from daemon.image_jobs import data_kind_context, is_image_data, resolve_kind_flags

    images = is_image_data(args.data)
    resolve_kind_flags(
        args,
        images=images,
        signal_only=SIGNAL_ONLY,
        image_only=IMAGE_ONLY,
        shared=SHARED,
        context=data_kind_context(args.data, images),
    )
    if images:
        from daemon.image_train import train_images

        return train_images(args)
    return train_signals(args)


def train_signals(args: argparse.Namespace) -> int:
    """MVT-Flow on the PRE_A cycles of a voraus-AD file (flags already resolved for signals)."""
    import torch

    from daemon.dataset import load_cycles, resolve_signals
    from flows.artifact import ModelCard, Threshold, save_model
    from flows.fusion import FusionConfig
    from flows.mvtflow import MVTFlow, MVTFlowConfig
    from flows.preprocess import Standardizer, cut_windows, pad_or_truncate
    from flows.training import (
        TrainConfig,
        batched_scores,
        fit_fusion,
        normal_attribution,
        resolve_device,
        seed_everything,
        train_flow,
    )

    _check(args)
    try:
        device = resolve_device(args.device)
    except ValueError as err:
        raise UsageError(str(err)) from err
    signals = resolve_signals(args.signals)
    data = load_cycles(args.data, signals, rate_divider=args.rate_divider, want_test=False)
    cycles = data.train
    if len(cycles) < 4:
        raise UsageError(
            f"{args.data} has {len(cycles)} normal training cycles (variant PRE_A); need at least 4"
        )
    rng = np.random.default_rng(args.seed)
    n_cal = max(1, round(len(cycles) * args.calibration_fraction))
    order = rng.permutation(len(cycles))
    fit_set, cal_set = cycles.subset(sorted(order[n_cal:])), cycles.subset(sorted(order[:n_cal]))
    scaler = Standardizer.fit(fit_set.signals)

    def inputs(cycle_set: Any) -> np.ndarray:
        standardized = [scaler.transform(x) for x in cycle_set.signals]
        if args.mode == "cycle":
            return np.stack([pad_or_truncate(x, time_steps) for x in standardized])
        parts = [cut_windows(x, args.window, args.hop) for x in standardized]
        return np.concatenate(parts) if parts else np.zeros((0, len(signals), args.window), np.float32)

    time_steps = max(len(x) for x in fit_set.signals) if args.mode == "cycle" else args.window
    fit_x, cal_x = inputs(fit_set), inputs(cal_set)
    if len(fit_x) == 0 or len(cal_x) == 0:
        raise UsageError(
            f"--window {args.window} is longer than the training cycles; choose a shorter window"
        )
    architecture = MVTFlowConfig(
        signals=len(signals),
        time_steps=time_steps,
        coupling_blocks=args.blocks,
        hidden_scale=args.hidden_scale,
        permutation_seed=args.seed,
    )
    train_config = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        milestones=tuple(args.milestones),
        seed=args.seed,
        bf16=args.bf16,
    )
    console.print(
        f"training MVT-Flow on {len(fit_set)} cycles ({len(fit_x)} {args.mode}s of {len(signals)} signals x "
        f"{time_steps} steps at {data.rate_hz:g} Hz), {n_cal} cycles held out for calibration, "
        f"device {device}"
    )
    seed_everything(args.seed)
    flow = MVTFlow(architecture)
    steps_per_epoch = -(-len(fit_x) // args.batch_size)
    with progress() as bar:
        task = bar.add_task("epoch 1", total=args.epochs * steps_per_epoch)
        state = {"epoch": 0}

        def on_batch(loss: float) -> None:
            bar.update(
                task, advance=1, description=f"epoch {state['epoch'] + 1}/{args.epochs} loss {loss:+.4f}"
            )

        def on_epoch(epoch: int, loss: float) -> None:
            state["epoch"] = epoch + 1
            bar.console.log(f"epoch {epoch + 1}/{args.epochs}: mean loss {loss:+.5f}")

        history = train_flow(
            flow, torch.from_numpy(fit_x), train_config, device, on_epoch=on_epoch, on_batch=on_batch
        )
    fusion = None
    fit_t, cal_t = torch.from_numpy(fit_x), torch.from_numpy(cal_x)
    if args.detector == "fusion":
        with console.status("fitting the linear detectors and the fusion on normal data"):
            lengths = (
                torch.tensor([min(len(x), time_steps) for x in fit_set.signals])
                if args.mode == "cycle"
                else None
            )
            fusion, cal_scores = fit_fusion(
                flow, fit_t, lengths, cal_t, data.rate_hz, FusionConfig(), device, bf16=args.bf16
            )
    else:
        cal_scores = batched_scores(flow, cal_t, device, bf16=args.bf16)
    with console.status("measuring the normal attribution profile"):
        reference = normal_attribution(flow, fit_t, device)
    threshold = Threshold.calibrate(cal_scores, args.fpr)
    card = ModelCard(
        signals=signals,
        rate_hz=data.rate_hz,
        mode=args.mode,
        time_steps=time_steps,
        window=args.window if args.mode == "window" else None,
        hop=args.hop if args.mode == "window" else None,
        scaler=scaler,
        threshold=threshold,
        architecture=architecture,
        detector=args.detector,
        fusion=fusion.meta() if fusion is not None else None,
        attribution_reference=tuple(float(v) for v in reference),
        training={
            "data": str(args.data),
            "data_fingerprint": data.fingerprint,
            "signal_group": args.signals,
            "source_rate_hz": data.source_rate_hz,
            "rate_divider": args.rate_divider,
            "cycles_fit": len(fit_set),
            "cycles_calibration": n_cal,
            "calibration_samples": cal_set.samples,
            "config": train_config.to_dict(),
            "loss": history.loss,
            "seconds": round(history.seconds, 2),
            "device": str(device),
            "torch": torch.__version__,
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        },
    )
    save_model(args.out, flow, card, fusion)
    if len(cal_scores) * args.fpr < 1:
        console.print(
            f"[yellow]note:[/] {len(cal_scores)} calibration {args.mode}s cannot resolve a {args.fpr:g} "
            "false-positive "
            "rate; the threshold is their maximum score"
        )
    console.print(
        f"saved {args.out} ({args.detector}): final loss {history.loss[-1]:+.4f} after "
        f"{history.seconds:.0f} s; threshold {threshold.value:.4g} (target FPR {args.fpr:g}, "
        f"{threshold.calibration_fpr:.3f} on calibration)"
    )
    return 0
