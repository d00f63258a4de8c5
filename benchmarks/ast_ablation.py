"""The evidence behind AST's defaults: an ablation on generated MVTec-layout image sets.

Measures, for one configuration axis at a time around a centre (feature block 10, input 256, teacher
hidden = student width = 256, 4 student blocks), image AUROC (unweighted mean over defect types), pixel
AUROC and AU-PRO (up to 30 % FPR) per category, the worst defect type, and the CPU cost of scoring one
image (features + AST map + upsampling, batch 1). Axes: feature block {4, 7, 10, 12} (channels follow the
block: 40/80/112/192), input size {192, 256, 320}, channels (teacher hidden = student width)
{64, 128, 256}, epochs (teacher and student each) {10, 30, 60}; the non-epoch axes train for
--epochs epochs.

Data: brick, grass and gravel from ingest.sim.images.write_image_dataset (real photographed textures with
painted, masked defects), seeded, written at 320 px so every input size is a downscale (the extractor
resizes, as the scorer does in production). --data-root reuses (or writes once) the sets there.

Features are extracted once per (block, input size, category) and shared by every configuration that uses
them. Each configuration is trained once per category (flows.ast.training.train_ast on train/good) and
scored four ways from the same model: image score by mean or max of the map, with the map upsampled to
the input size unsmoothed or smoothed by a Gaussian of --sigma pixels (masks resized to the input size
with nearest neighbour). Baselines on the same features: the teacher's own NLL per position and a
nearest-neighbour distance to the training features (flows.ast.baselines), for every configuration.

Results are written after every (configuration, category) to --json (and --markdown), and one line per
step to --progress, so a long run can be watched and an interrupted one still leaves its numbers;
--resume adds what is missing to an existing --json (e.g. the epoch axis on more categories, which
--epoch-categories can limit to save time). Training runs on the CPU with --threads torch threads (1 by
default: on a machine shared with other jobs, two contending threads were 4x slower than one); the
ms/image column is measured at that thread count, on a machine that may be busy (benchmarks/
ast_inference.py measures scoring speed properly).

Usage:  python benchmarks/ast_ablation.py [--data-root DIR] [--categories brick grass gravel]
            [--n-train 48] [--epochs 10] [--epoch-values 10 30 60] [--epoch-categories brick]
            [--axes block input width epochs] [--json out.json] [--markdown out.md]
            [--progress progress.log] [--resume]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor

from flows.ast.baselines import FeatureNN, teacher_nll_map
from flows.ast.evaluation import evaluate_images
from flows.ast.features import FeatureExtractor, FeatureExtractorConfig, frames_to_tensor
from flows.ast.model import AST, ASTConfig, image_score, upsample
from flows.ast.training import ASTTrainConfig, extract_features, feature_maps, scores_from_maps, train_ast
from flows.localization_metrics import au_pro, pixel_auroc
from ingest.images import MvtecDataset, resize_mask
from ingest.sim.images import write_image_dataset

CPU = torch.device("cpu")
Reduce = Literal["mean", "max"]
REDUCES: tuple[Reduce, ...] = ("mean", "max")


@dataclass(frozen=True)
class Config:
    axis: str  # which axis this point varies ("centre" for the centre itself)
    block: int
    input_size: int
    width: int  # teacher hidden channels = student width
    epochs: int  # teacher and student each
    seed: int = 0  # of the initialisation and the batch order

    @property
    def name(self) -> str:
        seed = f" seed{self.seed}" if self.axis == "seed" else ""
        return f"b{self.block} {self.input_size}px w{self.width} e{self.epochs}{seed}"


def configurations(args: argparse.Namespace) -> list[Config]:
    """The centre, then each axis in turn with the centre's value left out (it is the centre)."""
    centre = Config("centre", 10, 256, 256, args.epochs, args.train_seed)
    out = [centre]
    axes: dict[str, tuple[str, list[int]]] = {
        "block": ("block", args.block_values),
        "input": ("input_size", args.input_values),
        "width": ("width", args.width_values),
        "epochs": ("epochs", args.epoch_values),
        "seed": ("seed", args.seed_values),
    }
    for axis in args.axes:
        field_name, values = axes[axis]
        for value in values:
            cfg = Config(**{**asdict(centre), "axis": axis, field_name: value})
            if getattr(cfg, field_name) != getattr(centre, field_name):
                out.append(cfg)
    return out


@dataclass
class Category:
    name: str
    train: list[np.ndarray]
    test: list[np.ndarray]
    labels: list[str]
    masks: list[np.ndarray | None]  # at the data's native size


def load_category(root: Path, name: str, args: argparse.Namespace) -> Category:
    folder = root / name
    if not folder.is_dir():  # written beside and renamed, so an interrupted write is never reused
        partial = root / f".{name}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        write_image_dataset(
            partial,
            seed=args.seed,
            n_train=args.n_train,
            n_test_good=args.n_test_good,
            n_per_defect=args.n_per_defect,
            size=args.image_size,
            category=name,
        )
        partial.rename(folder)
    ds = MvtecDataset(folder)
    train = [item.image for item in ds.train()]
    test_items = list(ds.test())
    return Category(
        name=name,
        train=train,
        test=[item.image for item in test_items],
        labels=[item.label for item in test_items],
        masks=[item.mask for item in test_items],
    )


class Features:
    """Features per (block, input size, category), extracted on first use and kept."""

    def __init__(self) -> None:
        self.extractors: dict[tuple[int, int], FeatureExtractor] = {}
        self.cache: dict[tuple[int, int, str], tuple[Tensor, Tensor, float]] = {}

    def extractor(self, block: int, size: int) -> FeatureExtractor:
        key = (block, size)
        if key not in self.extractors:
            self.extractors[key] = FeatureExtractor(
                FeatureExtractorConfig(block=block, input_size=(size, size))
            )
        return self.extractors[key]

    def get(self, block: int, size: int, cat: Category) -> tuple[Tensor, Tensor, float]:
        """(train features, test features, seconds it took to extract them)."""
        key = (block, size, cat.name)
        if key not in self.cache:
            ext = self.extractor(block, size)
            t0 = time.perf_counter()
            train = extract_features(ext, cat.train)
            test = extract_features(ext, cat.test)
            self.cache[key] = (train, test, time.perf_counter() - t0)
        return self.cache[key]


def pixel_metrics(full: Tensor, masks: list[np.ndarray | None], labels: list[str]) -> tuple[float, float]:
    """Pixel AUROC and AU-PRO over the good test images (all-normal truth) and the defect images that
    have a mask, as flows.ast.evaluation.evaluate_images computes them (without its per-defect split,
    which would cost five more sorted passes per scoring)."""
    index = [i for i, label in enumerate(labels) if label == "good" or masks[i] is not None]
    maps = [full[i].numpy() for i in index]
    truth = [np.zeros(maps[0].shape, dtype=bool) if masks[i] is None else np.asarray(masks[i]) for i in index]
    return pixel_auroc(maps, truth), au_pro(maps, truth)


def evaluate_variants(
    maps: Tensor, cat: Category, size: int, sigma: float, pixel_for: tuple[str, ...] = ("none", "sigma")
) -> dict[str, dict[str, Any]]:
    """The four scorings of one set of feature-resolution maps: {"mean/none": metrics, ...}.

    Image AUROC per defect type from evaluate_images; pixel metrics depend on the smoothing only, so they
    are computed once per smoothing in `pixel_for` (None for the others) and shared by both reductions."""
    masks = [None if m is None else resize_mask(m, size) for m in cat.masks]
    out: dict[str, dict[str, Any]] = {}
    for sig_name, sig in (("none", None), ("sigma", sigma)):
        mean_scores, full = scores_from_maps(maps, (size, size), reduce="mean", sigma=sig)
        pixel, pro = pixel_metrics(full, masks, cat.labels) if sig_name in pixel_for else (None, None)
        for reduce in REDUCES:
            scores = mean_scores if reduce == "mean" else image_score(full, "max").double().numpy()
            image = evaluate_images(scores, cat.labels).image
            per = image.per_category
            worst = min(per, key=per.__getitem__)
            out[f"{reduce}/{sig_name}"] = {
                "image_auroc": image.mean,
                "pixel_auroc": pixel,
                "au_pro": pro,
                "per_defect": dict(per),
                "worst_defect": worst,
                "worst_auroc": per[worst],
            }
    return out


def time_per_image(
    ext: FeatureExtractor, map_fn: Callable[[Tensor], Tensor], frame: np.ndarray, sigma: float, repeats: int
) -> float:
    """Median ms for one uint8 frame: to tensor, features, map, upsample + smooth, mean score."""
    size = ext.config.input_size
    times = []
    with torch.inference_mode():
        for i in range(repeats + 2):
            t0 = time.perf_counter()
            fmap = map_fn(ext.extract(frames_to_tensor(frame)))
            image_score(upsample(fmap, size, sigma=sigma), "mean")
            if i >= 2:  # two warm-up calls
                times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def run_one(
    cfg: Config,
    cat: Category,
    feats: Features,
    args: argparse.Namespace,
    timing: dict[str, float],
    nn_cache: dict[tuple[int, int, str], dict[str, Any]],
) -> dict[str, Any]:
    train_f, test_f, feat_s = feats.get(cfg.block, cfg.input_size, cat)
    torch.manual_seed(cfg.seed)
    model = AST(ASTConfig(channels=train_f.shape[1], teacher_hidden=cfg.width, student_width=cfg.width))
    tcfg = ASTTrainConfig(teacher_epochs=cfg.epochs, student_epochs=cfg.epochs, seed=cfg.seed)
    history = train_ast(model, train_f, tcfg, CPU)
    t0 = time.perf_counter()
    ast_maps = feature_maps(model.anomaly_map, test_f, CPU)
    result: dict[str, Any] = {
        "config": asdict(cfg),
        "name": cfg.name,
        "category": cat.name,
        "channels": int(train_f.shape[1]),
        "feature_size": list(train_f.shape[2:]),
        "n_train": len(train_f),
        "n_test": len(test_f),
        "feature_seconds": feat_s,
        "train_seconds": history.seconds,
        "threads": torch.get_num_threads(),
        "teacher_loss": [history.teacher_loss[0], history.teacher_loss[-1]],
        "student_loss": [history.student_loss[0], history.student_loss[-1]],
        "ast": evaluate_variants(ast_maps, cat, cfg.input_size, args.sigma),
    }
    nll_maps = feature_maps(lambda f: teacher_nll_map(model.teacher, f), test_f, CPU)
    only = (args.scoring.split("/")[1],)
    result["teacher_nll"] = evaluate_variants(nll_maps, cat, cfg.input_size, args.sigma, only)
    nn_key = (cfg.block, cfg.input_size, cat.name)
    if nn_key not in nn_cache:  # the NN baseline depends on the features only
        nn = FeatureNN().fit(train_f)
        nn_cache[nn_key] = evaluate_variants(
            feature_maps(nn.map, test_f, CPU), cat, cfg.input_size, args.sigma
        )
    result["feature_nn"] = nn_cache[nn_key]
    result["eval_seconds"] = time.perf_counter() - t0
    if cfg.name not in timing:  # cost does not depend on the category or the weights
        ext = feats.extractor(cfg.block, cfg.input_size)
        timing[cfg.name] = time_per_image(
            ext, model.anomaly_map, cat.test[0], args.sigma, args.timing_repeats
        )
    result["ms_per_image"] = timing[cfg.name]
    return result


def summarize(results: list[dict[str, Any]], scoring: str) -> list[dict[str, Any]]:
    """Per configuration, the mean over categories of one scoring, plus the worst (category, defect)."""
    rows = []
    names = list(dict.fromkeys(r["name"] for r in results))
    for name in names:
        rs = [r for r in results if r["name"] == name]
        row: dict[str, Any] = {
            "name": name,
            "axis": rs[0]["config"]["axis"],
            "categories": "+".join(r["category"] for r in rs),
        }
        for method in ("ast", "teacher_nll", "feature_nn"):
            for variant in ("mean/none", "max/none", "mean/sigma", "max/sigma"):
                row[f"{method} {variant} image"] = float(
                    np.mean([r[method][variant]["image_auroc"] for r in rs])
                )
            m = [r[method][scoring] for r in rs]
            row[f"{method} pixel"] = float(np.mean([x["pixel_auroc"] for x in m]))
            row[f"{method} pro"] = float(np.mean([x["au_pro"] for x in m]))
            worst = min(zip(rs, m, strict=True), key=lambda p: p[1]["worst_auroc"])
            row[f"{method} worst"] = (
                f"{worst[0]['category']}/{worst[1]['worst_defect']} {worst[1]['worst_auroc']:.3f}"
            )
        row["train_seconds"] = float(np.mean([r["train_seconds"] for r in rs]))
        row["ms_per_image"] = rs[0]["ms_per_image"]
        # the centre on the same categories: an axis run on fewer categories is compared fairly
        cats = {r["category"] for r in rs}
        centre = [r for r in results if r["config"]["axis"] == "centre" and r["category"] in cats]
        if len(centre) == len(cats):
            for key, metric in (("image", "image_auroc"), ("pixel", "pixel_auroc"), ("pro", "au_pro")):
                own = np.mean([r["ast"][scoring][metric] for r in rs])
                row[f"delta {key}"] = float(own - np.mean([r["ast"][scoring][metric] for r in centre]))
        rows.append(row)
    return rows


def _delta(row: dict[str, Any], key: str) -> str:
    return f"{row[f'delta {key}']:+.3f}" if f"delta {key}" in row else "-"


def markdown(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    scoring = meta["scoring"]
    s = meta["sigma"]
    lines = [
        f"Data: {', '.join(meta['categories'])}; {meta['n_train']} train, {meta['n_test_good']} good test, "
        f"{meta['n_per_defect']} per defect x 5 defects, written at {meta['image_size']} px; "
        f"seed {meta['seed']}. "
        f"Non-epoch axes train {meta['epochs']} epochs (teacher and student each). "
        f"{meta['threads']} CPU threads, shared with other jobs.",
        "",
        f"### Summary (mean over categories; pixel metrics and worst defect for {scoring}, sigma = {s:g} px)",
        "",
        "Δ: this configuration minus the centre on the same categories (image AUROC, pixel AUROC, AU-PRO "
        f"for {scoring}).",
        "",
        "| config | axis | categories | img mean | img max | img mean σ | img max σ | pixel AUROC | AU-PRO "
        "| Δ img | Δ pixel | Δ PRO | worst defect | train s | ms/img |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summarize(results, scoring):
        lines.append(
            f"| {r['name']} | {r['axis']} | {r['categories']} | {r['ast mean/none image']:.3f} | "
            f"{r['ast max/none image']:.3f} | "
            f"{r['ast mean/sigma image']:.3f} | {r['ast max/sigma image']:.3f} | {r['ast pixel']:.3f} | "
            f"{r['ast pro']:.3f} | {_delta(r, 'image')} | {_delta(r, 'pixel')} | {_delta(r, 'pro')} | "
            f"{r['ast worst']} | {r['train_seconds']:.0f} | {r['ms_per_image']:.1f} |"
        )
    lines += [
        "",
        f"### Per category (AST; image AUROC for the four scorings, pixel metrics without / with σ {s:g})",
        "",
        "| config | category | img mean | img max | img mean σ | img max σ | pixel | pixel σ | PRO | PRO σ "
        "| worst defect (mean σ) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        a = r["ast"]
        w = a[scoring]
        lines.append(
            f"| {r['name']} | {r['category']} | {a['mean/none']['image_auroc']:.3f} | "
            f"{a['max/none']['image_auroc']:.3f} | {a['mean/sigma']['image_auroc']:.3f} | "
            f"{a['max/sigma']['image_auroc']:.3f} | {a['mean/none']['pixel_auroc']:.3f} | "
            f"{a['mean/sigma']['pixel_auroc']:.3f} | {a['mean/none']['au_pro']:.3f} | "
            f"{a['mean/sigma']['au_pro']:.3f} | {w['worst_defect']} {w['worst_auroc']:.3f} |"
        )
    lines += [
        "",
        f"### Baselines on the same features (mean over categories; {scoring}, and the better of mean/max)",
        "",
        "| config | method | img (this scoring) | img best of 4 | pixel AUROC | AU-PRO | worst defect |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in summarize(results, scoring):
        for method, label in (("ast", "AST"), ("teacher_nll", "teacher NLL"), ("feature_nn", "feature NN")):
            best = max(r[f"{method} {v} image"] for v in ("mean/none", "max/none", "mean/sigma", "max/sigma"))
            lines.append(
                f"| {r['name']} | {label} | {r[f'{method} {scoring} image']:.3f} | {best:.3f} | "
                f"{r[f'{method} pixel']:.3f} | {r[f'{method} pro']:.3f} | {r[f'{method} worst']} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", type=Path, help="reuse (or write once) the image sets here")
    ap.add_argument("--categories", nargs="+", default=["brick", "grass", "gravel"])
    ap.add_argument("--n-train", type=int, default=48)
    ap.add_argument("--n-test-good", type=int, default=20)
    ap.add_argument("--n-per-defect", type=int, default=8)
    ap.add_argument("--image-size", type=int, default=320)
    ap.add_argument("--seed", type=int, default=0, help="seed of the generated data sets")
    ap.add_argument("--epochs", type=int, default=10, help="epochs (each phase) of the non-epoch axes")
    ap.add_argument(
        "--axes",
        nargs="*",
        default=["block", "input", "width", "epochs"],
        choices=["block", "input", "width", "epochs", "seed"],
    )
    ap.add_argument("--block-values", type=int, nargs="+", default=[4, 7, 10, 12])
    ap.add_argument("--input-values", type=int, nargs="+", default=[192, 256, 320])
    ap.add_argument("--width-values", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--epoch-values", type=int, nargs="+", default=[10, 30, 60])
    ap.add_argument(
        "--epoch-categories", nargs="*", help="categories the epoch axis runs on (default: all of them)"
    )
    ap.add_argument(
        "--seed-values",
        type=int,
        nargs="*",
        default=[],
        help="with the seed axis: training seeds to repeat the centre with (how much is noise)",
    )
    ap.add_argument("--seed-categories", nargs="*", help="categories the seed axis runs on (default: all)")
    ap.add_argument("--train-seed", type=int, default=0, help="training seed of every other configuration")
    ap.add_argument("--resume", action="store_true", help="keep the results in --json and add the missing")
    ap.add_argument("--sigma", type=float, default=4.0, help="smoothing in pixels of the input size")
    ap.add_argument(
        "--scoring",
        default="mean/sigma",
        choices=["mean/none", "max/none", "mean/sigma", "max/sigma"],
        help="the scoring the summary's pixel metrics and worst defect refer to",
    )
    ap.add_argument("--timing-repeats", type=int, default=10)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help=f"torch threads (this machine has {os.cpu_count()} cores; on a shared machine 1 thread trains "
        "about 4x faster than threads that contend with other jobs)",
    )
    ap.add_argument("--json", type=Path)
    ap.add_argument("--markdown", type=Path)
    ap.add_argument("--progress", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    configs = configurations(args)
    started = time.perf_counter()

    def progress(text: str) -> None:
        line = f"[{time.perf_counter() - started:7.0f} s] {text}"
        Console(stderr=True).print(line, highlight=False)
        if args.progress:
            with args.progress.open("a") as fh:
                fh.write(line + "\n")

    with tempfile.TemporaryDirectory() as tmp:
        root = args.data_root or Path(tmp)
        cats = [load_category(root, name, args) for name in args.categories]
        progress(
            f"data ready under {root}: " + ", ".join(f"{c.name} {len(c.train)}/{len(c.test)}" for c in cats)
        )
        meta = {
            k: getattr(args, k)
            for k in (
                "categories",
                "n_train",
                "n_test_good",
                "n_per_defect",
                "image_size",
                "seed",
                "epochs",
                "sigma",
                "scoring",
                "threads",
            )
        }
        meta["n_train"] = len(cats[0].train)
        feats = Features()
        timing: dict[str, float] = {}
        nn_cache: dict[tuple[int, int, str], dict[str, Any]] = {}
        results: list[dict[str, Any]] = []

        def save(results: list[dict[str, Any]], meta: dict[str, Any]) -> None:
            meta["seconds"] = meta.get("seconds_before", 0.0) + time.perf_counter() - started
            if args.json:
                args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
            if args.markdown:
                args.markdown.write_text(markdown(results, meta))

        if args.resume and args.json and args.json.exists():
            previous = json.loads(args.json.read_text())
            results = previous["results"]
            meta["seconds_before"] = previous["meta"].get("seconds", 0.0)
            timing.update({r["name"]: r["ms_per_image"] for r in results})
            progress(f"resuming: {len(results)} (configuration, category) results in {args.json}")
        done = {(r["name"], r["category"]) for r in results}
        for i, cfg in enumerate(configs):
            for cat in cats:
                if (cfg.name, cat.name) in done:
                    continue
                if cfg.axis == "epochs" and args.epoch_categories and cat.name not in args.epoch_categories:
                    continue
                if cfg.axis == "seed" and args.seed_categories and cat.name not in args.seed_categories:
                    continue
                r = run_one(cfg, cat, feats, args, timing, nn_cache)
                results.append(r)
                a = r["ast"][args.scoring]
                progress(
                    f"{i + 1}/{len(configs)} {cfg.name} {cat.name}: image {a['image_auroc']:.3f} "
                    f"pixel {a['pixel_auroc']:.3f} PRO {a['au_pro']:.3f} worst {a['worst_defect']} "
                    f"{a['worst_auroc']:.3f}; train {r['train_seconds']:.0f} s, "
                    f"eval {r['eval_seconds']:.0f} s, "
                    f"{r['ms_per_image']:.1f} ms/img"
                )
                save(results, meta)
        save(results, meta)  # also when --resume found nothing missing: the markdown is rendered again
    table = Table(title=f"AST ablation, mean over the categories run ({args.scoring} unless named)")
    for col in (
        "config",
        "categories",
        "img mean",
        "img max",
        "img mean σ",
        "img max σ",
        "pixel",
        "AU-PRO",
        "Δ img",
        "Δ PRO",
        "worst",
        "NLL img",
        "NN img",
        "train s",
        "ms/img",
    ):
        table.add_column(col, justify="right")
    for r in summarize(results, args.scoring):
        table.add_row(
            r["name"],
            r["categories"],
            *(f"{r[f'ast {v} image']:.3f}" for v in ("mean/none", "max/none", "mean/sigma", "max/sigma")),
            f"{r['ast pixel']:.3f}",
            f"{r['ast pro']:.3f}",
            _delta(r, "image"),
            _delta(r, "pro"),
            r["ast worst"],
            f"{r[f'teacher_nll {args.scoring} image']:.3f}",
            f"{r[f'feature_nn {args.scoring} image']:.3f}",
            f"{r['train_seconds']:.0f}",
            f"{r['ms_per_image']:.1f}",
        )
    Console(width=240).print(table)


if __name__ == "__main__":
    main()
