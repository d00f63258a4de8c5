"""The daemon's models: each configured model directory is loaded as what its card says it is (an
MVT-Flow scores signals, an AST scores camera frames), at most one per kind, each on the configured device."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from daemon.frames import FrameModel
from daemon.pipeline import Models, ModelState

KINDS = {"mvt-flow": "signals", "ast": "frames"}


def load_models(
    config: Any, *, expect_signals: list[str] | tuple[str, ...] | None = None
) -> tuple[Models, dict[str, int]]:
    """Load `config.model_list` (raises ModelFormatError or ValueError naming the model and the problem).
    Returns the models and the micro-batch of each kind (the model's own `batch`, else `scoring`'s).

    `expect_signals` (a reload): a new signal model must read the signals the running one reads."""
    from flows.artifact import ModelFormatError, load_model, model_kind
    from flows.scorer import Scorer

    signals: ModelState | None = None
    frames: FrameModel | None = None
    seen: dict[str, Path] = {}
    batches = {"signals": int(config.scoring.batch), "frames": int(config.scoring.frame_batch)}
    for i, entry in enumerate(config.model_list):
        where = "model" if config.model is not None else f"models[{i}]"
        path = Path(entry.path)
        try:
            kind = model_kind(path)
        except ModelFormatError as err:
            raise ModelFormatError(f"{where}.path: {err}") from None
        data_kind = KINDS.get(kind)
        if data_kind is None:
            raise ModelFormatError(
                f"{where}.path: {path} is a {kind!r} model; cellwatch runs {sorted(KINDS)}"
            )
        if data_kind in seen:
            raise ModelFormatError(
                f"{where}.path: {path} is a second {kind!r} model (the first is {seen[data_kind]}); "
                "give one model per kind of data"
            )
        seen[data_kind] = path
        if entry.batch:
            batches[data_kind] = int(entry.batch)
        if data_kind == "signals":
            loaded = load_model(path, expect_signals=expect_signals)
            scorer = Scorer(loaded, device=config.scoring.device, bf16=config.scoring.bf16)
            signals = ModelState(scorer, path.name)
        else:
            from flows.ast.artifact import load_ast
            from flows.ast.scorer import ImageScorer

            image = ImageScorer(load_ast(path), device=config.scoring.device, batch_size=batches["frames"])
            frames = FrameModel(image, path.name)
    return Models(signals, frames), batches
