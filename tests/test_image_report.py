"""`cellwatch report` on an image folder: one self-contained HTML file whose metrics table agrees with the
MVTec protocol computed independently, whose figures are real PNGs, and whose anomaly maps are those of
the images the model scores highest (good ones too, so false alarms are seen); a model of the other kind
is refused with a message that says which is which."""

from __future__ import annotations

import base64
import html
import io
import re
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch

from daemon.cli import main
from daemon.image_jobs import ScoredSet, open_dataset, score_dataset
from flows.artifact import Threshold
from flows.ast.artifact import ASTCard, ScoringConfig, data_fingerprint, load_ast, save_ast
from flows.ast.evaluation import ImageMetrics, evaluate_images
from flows.ast.features import FeatureExtractor, FeatureExtractorConfig
from flows.ast.model import AST, ASTConfig
from flows.ast.scorer import ImageScorer
from flows.ast.training import ASTTrainConfig, extract_features, feature_maps, scores_from_maps, train_ast
from flows.metrics import threshold_at_fpr
from ingest.sim.images import DEFECTS, write_image_dataset


def cell(row: str, key: str) -> float:
    """The full-precision number a table cell carries in its data-<key> attribute."""
    found = re.search(rf'data-{key}="([^"]+)"', row)
    assert found is not None, f"no data-{key} in {row}"
    return float(found.group(1))


PNG_URI = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')
TOP, TOP_GOOD = 3, 2


@pytest.fixture(scope="module")
def images_and_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny generated brick set (96 px) and a tiny AST (64 px input, width 16, 2 epochs) with its
    threshold calibrated on the training images at 10 % FPR: not a good detector, a real one."""
    root = tmp_path_factory.mktemp("images")
    data, model_dir = root / "data", root / "model"
    write_image_dataset(data, seed=3, n_train=16, n_test_good=6, n_per_defect=3, size=96)
    dataset = open_dataset(data)
    config = FeatureExtractorConfig(block=10, input_size=(64, 64))
    extractor = FeatureExtractor(config)
    train = list(dataset.train())
    features = extract_features(extractor, (item.image for item in train))
    model = AST(ASTConfig(channels=extractor.channels, teacher_hidden=16, student_width=16, student_blocks=1))
    cpu = torch.device("cpu")
    train_ast(model, features, ASTTrainConfig(teacher_epochs=2, student_epochs=2), cpu)
    scoring = ScoringConfig()
    train_scores, _ = scores_from_maps(
        feature_maps(model.eval().anomaly_map, features, cpu), config.input_size, sigma=scoring.sigma
    )
    value = threshold_at_fpr(train_scores, 0.1)
    card = ASTCard(
        features=config,
        channels=extractor.channels,
        feature_size=extractor.feature_size,
        architecture=model.config,
        scoring=scoring,
        threshold=Threshold(value, float(np.median(train_scores)), 0.1, 0.0625, len(train)),
        training={"data_fingerprint": data_fingerprint([item.path for item in train], dataset.root)},
    )
    save_ast(model_dir, model, card)
    return data, model_dir


@pytest.fixture(scope="module")
def report(images_and_model: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    data, model = images_and_model
    out = tmp_path_factory.mktemp("report") / "sub" / "image-report.html"
    argv = ["report", "--data", str(data), "--model", str(model), "--out", str(out)]
    assert main([*argv, "--top", str(TOP), "--top-good", str(TOP_GOOD)]) == 0
    return out, out.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def scored(images_and_model: tuple[Path, Path]) -> tuple[ScoredSet, ImageMetrics]:
    """The test split scored and evaluated here, through the API, not the command."""
    data, model = images_and_model
    result = score_dataset(ImageScorer(load_ast(model), device="cpu"), open_dataset(data).test())
    return result, evaluate_images(result.scores, result.labels, result.maps, result.masks)


def test_report_is_one_self_contained_html_file(report: tuple[Path, str]) -> None:
    out, text = report
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # nothing written beside it
    assert text.startswith("<!DOCTYPE html>")
    assert text.rstrip().endswith("</html>")
    assert "<script" not in text.lower()
    for attr in re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', text, flags=re.IGNORECASE):
        assert attr.startswith("data:image/png;base64,"), attr[:80]
    assert "url(" not in text
    assert "@import" not in text
    assert out.stat().st_size < 3 * 1024 * 1024


def test_report_has_the_figures_and_they_are_real_pictures(report: tuple[Path, str]) -> None:
    _, text = report
    images = PNG_URI.findall(text)
    assert len(images) == 2 + TOP + TOP_GOOD  # ROC, histograms, one row per shown map
    for encoded in images:
        pixels = matplotlib.image.imread(io.BytesIO(base64.b64decode(encoded, validate=True)), format="png")
        height, width = pixels.shape[:2]
        assert 300 < width < 2000
        assert 250 < height < 2000
        rgb = pixels[..., :3]
        assert (rgb.max(-1) - rgb.min(-1) > 0.2).mean() > 0.005  # colour is drawn, not only axes
    # a map row shows a photograph and a heat map: far more distinct colours than a line plot
    row = matplotlib.image.imread(io.BytesIO(base64.b64decode(images[2])), format="png")[..., :3]
    assert len(np.unique((row * 255).astype(np.uint8).reshape(-1, 3), axis=0)) > 1000


def test_metrics_table_matches_the_protocol_for_every_defect_type(
    report: tuple[Path, str], scored: tuple[ScoredSet, ImageMetrics]
) -> None:
    _, text = report
    _, metrics = scored
    table = text[text.index('<table class="metrics"') : text.index("</table>", text.index('class="metrics"'))]
    rows = dict(re.findall(r'<tr data-defect="([^"]+)">(.*?)</tr>', table))
    assert set(rows) == {*DEFECTS, "good"}
    for defect in DEFECTS:
        image, pixel, pro = (cell(rows[defect], key) for key in ("auroc", "pixel-auroc", "au-pro"))
        assert image == pytest.approx(metrics.image.per_category[defect])
        assert pixel == pytest.approx(metrics.pixel_per_defect[defect])
        assert pro == pytest.approx(metrics.pro_per_defect[defect])
    mean = re.search(r'<tr class="mean">.*?data-auroc="([^"]+)"', table)
    assert mean is not None
    assert float(mean.group(1)) == pytest.approx(metrics.image.mean)
    assert "21 (6 good, 15 defect)" in text  # the header counts the test split


def test_maps_are_those_of_the_highest_scoring_defect_and_good_images(
    report: tuple[Path, str], scored: tuple[ScoredSet, ImageMetrics], images_and_model: tuple[Path, Path]
) -> None:
    _, text = report
    result, _ = scored
    data, _ = images_and_model
    scores = np.asarray(result.scores)
    labels = np.asarray(result.labels)
    names = [str(Path(p).relative_to(data)) for p in result.paths]

    def top(which: np.ndarray, n: int) -> list[str]:
        index = np.flatnonzero(which)
        return [names[i] for i in index[np.argsort(-scores[index], kind="stable")][:n]]

    expected = top(labels != "good", TOP) + top(labels == "good", TOP_GOOD)
    section = text[text.index('id="maps"') :]
    shown = re.findall(r'<div class="case" data-image="([^"]+)" data-label="([^"]+)">', section)
    assert [name for name, _ in shown] == expected
    assert [label for _, label in shown] == [Path(name).parent.name for name in expected]
    for name in expected:  # the caption names the file too, where a reader sees it
        assert f"<code>{html.escape(name)}</code>" in section
    assert section.count("no mask") == TOP_GOOD  # good images have no ground truth
    assert "One colour scale for every map" in section


def test_signal_model_with_image_folder_is_refused_saying_which_is_which(
    tiny_cell_and_model: tuple[Path, Path],
    images_and_model: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cell, signal_model = tiny_cell_and_model
    images, image_model = images_and_model
    out = tmp_path / "r.html"
    assert main(["report", "--data", str(images), "--model", str(signal_model), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "signal model" in err
    assert "image folder" in err
    assert str(images) in err
    assert main(["report", "--data", str(cell), "--model", str(image_model), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "image model" in err
    assert "not an image folder" in err
    assert str(cell) in err
    assert not out.exists()


def test_demo_image_half_trains_evaluates_and_reports_with_maps(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`cellwatch demo --only images`, shrunk: the CLI verbs on a generated image set end in a report
    with anomaly maps, and the signal half is left out."""
    work = tmp_path / "demo"
    argv = ["demo", "--dir", str(work), "--only", "images", "--image-size", "64", "--image-epochs", "2"]
    assert main([*argv, "--image-counts", "12,4,2", "--image-width", "16"]) == 0
    out = capsys.readouterr().out
    assert sorted(p.name for p in (work / "images" / "test").iterdir()) == sorted(["good", *DEFECTS])
    assert len(list((work / "images" / "train" / "good").glob("*.png"))) == 12
    loaded = load_ast(work / "image-model")  # a real, loadable AST artifact
    assert loaded.card.input_size == (64, 64)
    text = (work / "image-report.html").read_text(encoding="utf-8")
    cases = re.findall(r'<div class="case" data-image="(test/[^"]+)"', text)
    assert len(cases) == 5 + 2  # the default top 5 defect images and top 2 good ones
    assert len(PNG_URI.findall(text)) == 2 + len(cases)
    assert "AU-PRO" in out  # evaluate printed the protocol's table
    assert not (work / "cell.parquet").exists()  # --only images: no signal half
