"""AST beyond the modules: training (teacher then student), the artifact and its card checks, the scoring
API on uint8 frames, the baselines and the MVTec evaluation, on generated images of real textures.

The model here is tiny (64 px input, width 16, a few epochs): the tests claim what any trained AST must do
(losses fall, a hole is found and located better than chance by a wide margin, scoring is batch-invariant),
not published numbers; those are measured by benchmarks/ast_ablation.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from flows.artifact import ModelFormatError, Threshold, model_kind
from flows.ast.artifact import ASTCard, ScoringConfig, data_fingerprint, load_ast, save_ast
from flows.ast.baselines import FeatureNN, teacher_nll_map
from flows.ast.evaluation import evaluate_images
from flows.ast.features import FeatureExtractor, FeatureExtractorConfig
from flows.ast.model import AST, ASTConfig
from flows.ast.scorer import ImageScorer
from flows.ast.training import ASTTrainConfig, extract_features, feature_maps, scores_from_maps, train_ast
from ingest.images import MvtecDataset
from ingest.sim.images import write_image_dataset

SIZE = (64, 64)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("images") / "brick"
    write_image_dataset(
        root, seed=5, n_train=16, n_test_good=6, n_per_defect=4, size=96, defects=("hole", "stain")
    )
    return root


@pytest.fixture(scope="module")
def extractor() -> FeatureExtractor:
    return FeatureExtractor(FeatureExtractorConfig(block=10, input_size=SIZE))


@pytest.fixture(scope="module")
def trained(
    data: Path, extractor: FeatureExtractor, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    ds = MvtecDataset(data)
    items = list(ds.train())
    features = extract_features(extractor, (item.image for item in items), batch_size=5)
    torch.manual_seed(0)
    model = AST(ASTConfig(channels=extractor.channels, teacher_hidden=16, student_width=16, student_blocks=1))
    history = train_ast(
        model, features, ASTTrainConfig(teacher_epochs=8, student_epochs=8, batch_size=4, seed=1), CPU
    )
    maps = feature_maps(model.anomaly_map, features, CPU)
    scores, _ = scores_from_maps(maps, SIZE, reduce="mean", sigma=2.0)
    card = ASTCard(
        features=extractor.config,
        channels=extractor.channels,
        feature_size=extractor.feature_size,
        architecture=model.config,
        scoring=ScoringConfig(reduce="mean", sigma=2.0),
        threshold=Threshold(
            value=float(scores.max()),
            reference=float(np.median(scores)),
            target_fpr=0.01,
            calibration_fpr=0.0,
            calibration_windows=len(scores),
        ),
        training={"data_fingerprint": data_fingerprint([i.path for i in items], data)},
    )
    out = tmp_path_factory.mktemp("model") / "ast"
    save_ast(out, model, card)
    return {"dir": out, "model": model, "history": history, "features": features, "card": card}


def test_training_lowers_both_losses_and_freezes_nothing_for_good(trained: dict[str, Any]) -> None:
    history = trained["history"]
    assert len(history.teacher_loss) == 8
    assert len(history.student_loss) == 8
    assert history.teacher_loss[-1] < history.teacher_loss[0]
    assert history.student_loss[-1] < 0.8 * history.student_loss[0]
    model = trained["model"]
    # after training every trainable parameter is trainable again; the permutations never are
    assert all(p.requires_grad for n, p in model.named_parameters() if "perm" not in n)
    assert not any(p.requires_grad for p in model.teacher.permutations.parameters())


def test_training_is_reproducible_from_the_seed(trained: dict[str, Any], extractor: FeatureExtractor) -> None:
    features = trained["features"][:6]
    losses = []
    for _ in range(2):
        torch.manual_seed(0)
        model = AST(
            ASTConfig(channels=extractor.channels, teacher_hidden=8, student_width=8, student_blocks=1)
        )
        history = train_ast(model, features, ASTTrainConfig(teacher_epochs=2, student_epochs=2, seed=3), CPU)
        losses.append(history.teacher_loss + history.student_loss)
    assert losses[0] == losses[1]


def test_artifact_round_trip_scores_identically(trained: dict[str, Any], data: Path) -> None:
    assert model_kind(trained["dir"]) == "ast"
    loaded = load_ast(trained["dir"])
    assert loaded.card == trained["card"]
    meta = json.loads((trained["dir"] / "model.json").read_text())
    assert meta["features"]["backbone"] == "efficientnet-lite0"
    assert meta["features"]["block"] == 10
    assert meta["features"]["input_size"] == [64, 64]
    assert meta["features"]["normalization"]["mean"] == [0.485, 0.456, 0.406]
    assert meta["threshold"]["target_fpr"] == 0.01
    features = trained["features"][:4]
    with torch.no_grad():
        assert torch.equal(loaded.model.anomaly_map(features), trained["model"].anomaly_map(features))


def test_signal_loader_refuses_an_image_model(trained: dict[str, Any]) -> None:
    from flows.artifact import load_model

    with pytest.raises(ModelFormatError, match="'ast' model, not a signal model"):
        load_model(trained["dir"])


def _edit_card(src: Path, dst: Path, edit: Any) -> Path:
    shutil.copytree(src, dst)
    meta = json.loads((dst / "model.json").read_text())
    edit(meta)
    (dst / "model.json").write_text(json.dumps(meta))
    return dst


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m["features"].update(backbone="efficientnet-b5"), "features.backbone"),
        (lambda m: m["features"]["normalization"].update(mean=[0.5, 0.5, 0.5]), "features.normalization"),
        (lambda m: m["features"].update(channels=40), "features.channels is 40"),
        (lambda m: m["features"].update(block=99), "blocks 0..15"),
        (lambda m: m.update(kind="mvt-flow"), "expected 'ast'"),
        (lambda m: m.update(format_version=7), "format_version"),
        (lambda m: m["scoring"].update(reduce="median"), "reduce"),
        (lambda m: m.pop("threshold"), "threshold"),
    ],
)
def test_card_problems_fail_at_load_naming_the_field(
    trained: dict[str, Any], tmp_path: Path, edit: Any, message: str
) -> None:
    broken = _edit_card(trained["dir"], tmp_path / "m", edit)
    with pytest.raises(ModelFormatError, match=message):
        load_ast(broken)


def test_block_change_with_consistent_channels_fails_when_the_scorer_checks_the_extractor(
    trained: dict[str, Any], tmp_path: Path
) -> None:
    # block 9 also has 112 channels but the card's feature size and the weights were made for block 10:
    # a card edited to block 4 (40 channels) with channels left at 112 must not score silently
    broken = _edit_card(trained["dir"], tmp_path / "m", lambda m: m["features"].update(block=4))
    with pytest.raises(ModelFormatError, match="the extractor gives 40 channels"):
        ImageScorer(load_ast(broken), device="cpu")


def test_weights_that_do_not_fit_fail_at_load(trained: dict[str, Any], tmp_path: Path) -> None:
    broken = _edit_card(trained["dir"], tmp_path / "m", lambda m: m["architecture"].update(student_width=32))
    with pytest.raises(ModelFormatError, match="shape"):
        load_ast(broken)
    (tmp_path / "m" / "weights.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ModelFormatError, match="safetensors"):
        load_ast(tmp_path / "m")


def test_scorer_takes_any_uint8_batch_and_is_batch_invariant(trained: dict[str, Any], data: Path) -> None:
    scorer = ImageScorer(load_ast(trained["dir"]), device="cpu", batch_size=3)
    items = list(MvtecDataset(data).test())
    frames = np.stack([item.image for item in items])  # (B, 96, 96, 3): resized to 64 inside
    batched = scorer.score(frames)
    assert batched.raw.shape == (len(items),)
    assert batched.maps.shape == (len(items), 64, 64)
    assert batched.maps.dtype == np.float32
    assert (batched.maps >= 0).all()
    one = scorer.score(frames[4])
    assert np.allclose(one.raw, batched.raw[4:5], rtol=1e-4)
    threshold = scorer.card.threshold
    assert np.array_equal(batched.is_anomaly, batched.raw > threshold.value)
    assert np.allclose(
        batched.normalized, (batched.raw - threshold.reference) / (threshold.value - threshold.reference)
    )
    # grey, RGBA and other sizes are frames too
    grey = scorer.score(frames[0].mean(axis=2).astype(np.uint8))
    rgba = scorer.score(np.concatenate([frames[0], np.full((96, 96, 1), 7, np.uint8)], axis=2))
    assert np.isfinite(grey.raw).all()
    assert np.allclose(rgba.raw, batched.raw[:1], rtol=1e-4)
    assert scorer.score(np.zeros((1, 480, 640, 3), np.uint8)).maps.shape == (1, 64, 64)
    with pytest.raises(ValueError, match="uint8"):
        scorer.score(frames.astype(np.float32))
    with pytest.raises(ValueError, match="shape"):
        scorer.score(np.zeros((2, 3, 8, 8, 3), np.uint8))


def test_ast_finds_and_locates_holes(trained: dict[str, Any], data: Path) -> None:
    from daemon.image_jobs import score_dataset

    scorer = ImageScorer(load_ast(trained["dir"]), device="cpu")
    scored = score_dataset(scorer, MvtecDataset(data).test())
    metrics = evaluate_images(scored.scores, scored.labels, scored.maps, scored.masks)
    assert set(metrics.image.per_category) == {"hole", "stain"}
    assert metrics.image.per_category["hole"] >= 0.9
    assert metrics.pixel_per_defect["hole"] >= 0.85
    assert metrics.pixel_auroc is not None
    assert metrics.au_pro is not None
    assert 0.5 < metrics.pixel_auroc <= 1
    assert 0 < metrics.au_pro <= 1
    out = metrics.to_json()
    assert set(out) >= {"image_auroc", "pixel_auroc", "au_pro", "per_defect"}
    json.dumps(out)  # plain JSON types


def test_baselines_give_maps_on_the_same_features(trained: dict[str, Any]) -> None:
    features = trained["features"]
    nn = FeatureNN(max_bank=10_000).fit(features[:12])
    seen = nn.map(features[:2])
    assert seen.shape == features[:2, 0].shape
    assert torch.allclose(seen, torch.zeros_like(seen), atol=1e-3)  # every training position is in the bank
    unseen = nn.map(features[12:])
    assert (unseen > 0).all()
    with pytest.raises(ValueError, match="expected features"):
        nn.map(features[:, :8])
    capped = FeatureNN(max_bank=50, seed=1).fit(features)
    assert capped.bank is not None
    assert len(capped.bank) == 50
    with torch.no_grad():
        nll = teacher_nll_map(trained["model"].teacher, features[:3])
    assert nll.shape == features[:3, 0].shape
    assert torch.isfinite(nll).all()


def test_evaluation_needs_both_classes_and_handles_missing_masks() -> None:
    maps = [np.zeros((4, 4)) for _ in range(3)]
    with pytest.raises(ValueError, match="good and defect"):
        evaluate_images([1.0, 2.0, 3.0], ["good"] * 3, maps, [None] * 3)
    hit = np.zeros((4, 4))
    hit[1, 1] = 5
    mask = np.zeros((4, 4), bool)
    mask[1, 1] = True
    metrics = evaluate_images(
        [0.1, 0.9, 0.8], ["good", "hole", "hole"], [maps[0], hit, hit], [None, mask, None]
    )
    assert metrics.image.per_category == {"hole": 1.0}
    assert metrics.masked_images == 1
    assert metrics.pixel_auroc == 1.0
    assert metrics.au_pro == 1.0
    no_masks = evaluate_images([0.1, 0.9], ["good", "hole"], [maps[0], hit], [None, None])
    assert no_masks.pixel_auroc is None
    assert no_masks.au_pro is None
    assert no_masks.to_json()["au_pro"] is None


def test_fingerprint_follows_the_content_not_the_location(data: Path, tmp_path: Path) -> None:
    files = sorted((data / "train" / "good").glob("*.png"))
    moved = tmp_path / "copy"
    shutil.copytree(data, moved)
    moved_files = sorted((moved / "train" / "good").glob("*.png"))
    assert data_fingerprint(files, data) == data_fingerprint(moved_files, moved)
    moved_files[0].write_bytes(moved_files[1].read_bytes())
    assert data_fingerprint(files, data) != data_fingerprint(moved_files, moved)
