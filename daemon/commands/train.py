"""``cellwatch train``: fit MVT-Flow on the normal training cycles of a voraus-AD file."""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path
from typing import Any

import numpy as np

from daemon.cli_support import UsageError, console, progress
from ingest.voraus.schema import SIGNAL_GROUPS


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "train",
        help="train an MVT-Flow model on the normal training cycles (PRE_A) of a voraus-AD file",
        description=(
            "Train MVT-Flow with the paper's configuration by default (4 coupling blocks, kernels 13/1/1, "
            "Adam 8e-4, x0.1 at epochs 11 and 61, 70 epochs, batch 32). The scaler is fitted on training "
            "cycles only; a held-out part of the training cycles calibrates the alert threshold."
        ),
    )
    p.add_argument("--data", required=True, type=Path, help="voraus-AD parquet file")
    p.add_argument("--out", required=True, type=Path, help="model directory to write")
    p.add_argument("--signals", default="machine", choices=list(SIGNAL_GROUPS), help="signal group")
    p.add_argument("--rate-divider", type=int, default=1, help="keep every N-th time step (1 = as recorded)")
    p.add_argument(
        "--mode", choices=("cycle", "window"), default="cycle", help="score whole cycles or windows"
    )
    p.add_argument("--window", type=int, default=256, help="window length in time steps (window mode)")
    p.add_argument("--hop", type=int, default=64, help="window hop in time steps (window mode)")
    p.add_argument("--epochs", type=int, default=70)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=8e-4, help="learning rate")
    p.add_argument("--milestones", type=int, nargs="*", default=[11, 61], help="epochs where lr is x0.1")
    p.add_argument("--blocks", type=int, default=4, help="coupling blocks")
    p.add_argument("--hidden-scale", type=int, default=2, help="hidden channels = signals x this")
    p.add_argument("--seed", type=int, default=177)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for training and calibration")
    p.add_argument("--fpr", type=float, default=0.01, help="target false-positive rate of the threshold")
    p.add_argument(
        "--calibration-fraction",
        type=float,
        default=0.1,
        help="fraction of training cycles held out (never trained on) to calibrate the threshold",
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
    import torch

    from daemon.dataset import load_cycles, resolve_signals
    from flows.artifact import ModelCard, Threshold, save_model
    from flows.metrics import threshold_at_fpr
    from flows.mvtflow import MVTFlow, MVTFlowConfig
    from flows.preprocess import Standardizer, cut_windows, pad_or_truncate
    from flows.training import TrainConfig, batched_scores, resolve_device, seed_everything, train_flow

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
    cal_scores = batched_scores(flow, torch.from_numpy(cal_x), device, bf16=args.bf16)
    value = threshold_at_fpr(cal_scores, args.fpr)
    threshold = Threshold(
        value=float(value),
        reference=float(np.median(cal_scores)),
        target_fpr=args.fpr,
        calibration_fpr=float(np.mean(cal_scores > value)),
        calibration_windows=len(cal_scores),
    )
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
    save_model(args.out, flow, card)
    if len(cal_scores) * args.fpr < 1:
        console.print(
            f"[yellow]note:[/] {len(cal_scores)} calibration {args.mode}s cannot resolve a {args.fpr:g} "
            "false-positive "
            "rate; the threshold is their maximum score"
        )
    console.print(
        f"saved {args.out}: final loss {history.loss[-1]:+.4f} after {history.seconds:.0f} s; threshold "
        f"{threshold.value:.1f} (target FPR {args.fpr:g}, {threshold.calibration_fpr:.3f} on calibration)"
    )
    return 0
