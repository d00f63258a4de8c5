"""AST scoring speed: ms per frame of flows.ast.scorer.ImageScorer.score on uint8 frames, end to end.

What one call does, and what is timed: uint8 frames (B, H, W, 3) -> float tensor, to the device, resized
to the model's input size, EfficientNet-Lite0 features, teacher and student, the distance map upsampled
and smoothed to the input size, image scores, maps back to the host as numpy. Two frame kinds: camera
frames (--camera, default 480x640, so the resize is part of the cost) and frames already at the input
size. A second stage, "maps_of", times the network alone (resize, features and AST map of a float batch
already on the device), to show what conversion, upsampling, smoothing and the copy back cost. Batches
1 and 16 on the CPU (1, 16 and 64 on CUDA); the first --warmup calls are dropped, then the median and
the 90th percentile over --repeats calls, in ms per frame, and frames/s from the median.

The model: without --model, an untrained AST with the real architecture (teacher hidden = student width
= 256, 4 coupling and 4 student blocks, block --block, sigma 4, mean reduction) is saved with a dummy
threshold into a temporary directory and loaded back with load_ast, exactly as a trained one would be:
speed does not depend on the weights. With --model DIR, that model is timed (at its own input size).

CPU numbers on a machine shared with other jobs are noisy (torch uses --threads threads, default every
core); rerun on a quiet machine before quoting them. --bf16 adds rows under torch.autocast(bfloat16)
wrapped around score() from outside (the scorer has no precision option of its own).

Usage:  python benchmarks/ast_inference.py [--device auto] [--sizes 256] [--block 10] [--model DIR]
            [--batches 1 16] [--repeats 10] [--warmup 2] [--camera 480 640] [--bf16] [--json out]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from flows.artifact import Threshold
from flows.ast.artifact import ASTCard, ScoringConfig, load_ast, save_ast
from flows.ast.features import FeatureExtractor, FeatureExtractorConfig, frames_to_tensor
from flows.ast.model import AST, ASTConfig
from flows.ast.scorer import ImageScorer
from flows.training import autocast, resolve_device


def untrained_model(directory: Path, block: int, size: int) -> Path:
    """An untrained AST of the real architecture, written as an artifact (what `cellwatch train` writes)."""
    extractor = FeatureExtractor(FeatureExtractorConfig(block=block, input_size=(size, size)))
    torch.manual_seed(0)
    model = AST(ASTConfig(channels=extractor.channels))
    card = ASTCard(
        features=extractor.config,
        channels=extractor.channels,
        feature_size=extractor.feature_size,
        architecture=model.config,
        scoring=ScoringConfig(),
        threshold=Threshold(
            value=1.0, reference=0.0, target_fpr=0.01, calibration_fpr=0.0, calibration_windows=0
        ),
        training={"note": "untrained, for timing only"},
    )
    out = directory / f"ast_b{block}_{size}"
    save_ast(out, model, card)
    return out


def timed(call: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Seconds per call, after `warmup` calls that are not counted."""
    times = []
    for i in range(warmup + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        call()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def p90(values: list[float]) -> float:
    return float(np.percentile(values, 90))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--model", type=Path, help="a trained AST model directory (default: an untrained one)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[256], help="input sizes (untrained model only)")
    ap.add_argument("--block", type=int, default=10, help="feature block (untrained model only)")
    ap.add_argument("--batches", type=int, nargs="+", help="default 1 16 on the CPU, 1 16 64 on CUDA")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--camera", type=int, nargs=2, default=[480, 640], metavar=("H", "W"))
    ap.add_argument("--bf16", action="store_true", help="also time under bf16 autocast")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch CPU threads")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    batches = args.batches or ([1, 16, 64] if device.type == "cuda" else [1, 16])
    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    rng = np.random.default_rng(0)
    rows: list[dict[str, Any]] = []
    table = Table(title=f"AST scoring, device {device}{gpu}, {torch.get_num_threads()} CPU threads")
    for col in (
        "input",
        "frames",
        "precision",
        "stage",
        "batch",
        "median ms/frame",
        "p90 ms/frame",
        "frames/s",
    ):
        table.add_column(col, justify="right")
    with tempfile.TemporaryDirectory() as tmp:
        dirs = [args.model] if args.model else [untrained_model(Path(tmp), args.block, s) for s in args.sizes]
        for model_dir in dirs:
            loaded = load_ast(model_dir)
            size = loaded.card.input_size
            frame_kinds = {
                f"{args.camera[0]}x{args.camera[1]}": tuple(args.camera),
                f"{size[0]}x{size[1]}": size,
            }
            for precision in ("fp32", "bf16") if args.bf16 else ("fp32",):
                for batch in batches:
                    scorer = ImageScorer(loaded, device=device, batch_size=batch)
                    for kind, (h, w) in frame_kinds.items():
                        frames = rng.integers(0, 256, size=(batch, h, w, 3), dtype=np.uint8)
                        images = frames_to_tensor(frames).to(device)
                        stages: dict[str, Callable[[], Any]] = {
                            "score": partial(scorer.score, frames),
                            "maps_of": partial(scorer.maps_of, images),
                        }
                        for stage, call in stages.items():
                            with autocast(device, precision == "bf16"):
                                times = timed(call, device, args.warmup, args.repeats)
                            per_frame = [t / batch for t in times]
                            med = statistics.median(per_frame)
                            row = {
                                "input_size": list(size),
                                "block": loaded.card.features.block,
                                "frames": kind,
                                "precision": precision,
                                "stage": stage,
                                "batch": batch,
                                "median_ms_per_frame": 1000 * med,
                                "p90_ms_per_frame": 1000 * p90(per_frame),
                                "frames_per_second": 1 / med,
                            }
                            rows.append(row)
                            table.add_row(
                                f"{size[0]}x{size[1]} b{row['block']}",
                                kind,
                                precision,
                                stage,
                                str(batch),
                                f"{row['median_ms_per_frame']:.2f}",
                                f"{row['p90_ms_per_frame']:.2f}",
                                f"{row['frames_per_second']:,.1f}",
                            )
    Console(width=160).print(table)
    if args.json:
        meta = {
            "device": str(device) + gpu,
            "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "model": str(args.model) if args.model else "untrained (timing only)",
            "repeats": args.repeats,
            "warmup": args.warmup,
            "torch": torch.__version__,
        }
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
