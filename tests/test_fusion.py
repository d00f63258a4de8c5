"""The fused signal detector's parts (flows.residual, flows.fusion) and its artifact: what each part
must catch, that the saved model scores as the trained one, and clear refusals of damaged files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from flows.artifact import ModelCard, ModelFormatError, Threshold, load_model, save_model
from flows.fusion import FusionConfig, Normalizer, SignalFusion
from flows.mvtflow import MVTFlow, MVTFlowConfig
from flows.preprocess import Standardizer
from flows.residual import LinearResidual, StepProfile, axis_groups, moving_average
from flows.scorer import Scorer
from flows.training import fit_fusion, normal_attribution

SIGNALS = ("a_1", "b_1", "c_1", "a_2", "b_2", "robot_voltage")


def related(n: int, t: int = 64, seed: int = 0) -> torch.Tensor:
    """Cycles of 6 signals with fixed relations: c_1 = a_1 + b_1, b_2 = 2·a_2, plus small noise;
    robot_voltage is independent noise."""
    g = torch.Generator().manual_seed(seed)
    phase = torch.linspace(0, 6.28, t)
    a1 = torch.sin(phase + torch.rand(n, 1, generator=g)) + 0.1 * torch.randn(n, t, generator=g)
    b1 = torch.cos(2 * phase) + 0.1 * torch.randn(n, t, generator=g)
    a2 = torch.randn(n, t, generator=g)
    x = torch.stack(
        [
            a1,
            b1,
            a1 + b1 + 0.01 * torch.randn(n, t, generator=g),
            a2,
            2 * a2 + 0.01 * torch.randn(n, t, generator=g),
            torch.randn(n, t, generator=g),
        ],
        dim=1,
    )
    return x


def test_linear_residual_sees_a_broken_relation_and_names_the_signal() -> None:
    train = related(40)
    lin = LinearResidual.fit(train, variance=0.99)
    normal = lin.residual(related(10, seed=1))
    assert float(normal.mean()) == pytest.approx(1.0, rel=0.3)  # unit: the normal residual
    broken = related(10, seed=2)
    broken[:, 2, 20:30] += 0.5  # c_1 no longer equals a_1 + b_1 for 10 steps
    res = lin.residual(broken)
    assert float(res[:, :, 20:30].mean()) > 20 * float(res[:, :, :20].mean())
    # the signals of the broken relation carry the residual, the unrelated ones do not
    per_signal = res[:, :, 20:30].mean((0, 2))
    assert set(per_signal.argsort(descending=True)[:3].tolist()) == {0, 1, 2}


def test_lags_let_the_residual_see_relations_in_time() -> None:
    """b = a(t) − a(t−1) is invisible at lag 0 (b's own variance is kept) but a lag-1 relation."""
    g = torch.Generator().manual_seed(3)
    a = torch.cumsum(torch.randn(30, 1, 80, generator=g), dim=2)
    b = torch.nn.functional.pad(a[:, :, 1:] - a[:, :, :-1], (1, 0))
    x = torch.cat([a, b, torch.randn(30, 1, 80, generator=g)], dim=1)
    lagged = LinearResidual.fit(x, variance=0.999, lags=1)
    test = x[:5].clone()
    test[:, 1, 40] += 0.5  # the difference signal jumps once
    jump = lagged.residual(test).sum(1)
    assert int(jump[0].argmax()) in (40, 41)
    assert float(jump[:, 40:42].mean()) > 10 * float(jump[:, 10:30].mean())


def test_chunked_fit_equals_one_pass() -> None:
    x = related(50)
    lengths = torch.full((50,), 60)
    one = LinearResidual.fit(x, lengths, variance=0.99, lags=2, chunk=1000)
    many = LinearResidual.fit(x, lengths, variance=0.99, lags=2, chunk=7)
    probe = related(4, seed=9)
    torch.testing.assert_close(one.residual(probe), many.residual(probe), rtol=1e-3, atol=1e-4)
    energy = one.residual(x)
    single = StepProfile.fit(energy, 5)
    chunked = StepProfile.fit([energy[:20], energy[20:]], 5)
    # the first chunk sets the log offset; with equal offsets the moments agree
    chunked = StepProfile.fit([energy[:50]], 5)
    torch.testing.assert_close(single.mean, chunked.mean)
    torch.testing.assert_close(single.spread, chunked.spread)


def test_step_profile_flags_an_event_in_a_quiet_phase_not_a_busy_one() -> None:
    g = torch.Generator().manual_seed(4)
    busy = torch.ones(100)
    busy[40:60] = 30.0  # every normal cycle has a loud phase here
    normal = busy * torch.exp(0.2 * torch.randn(60, 100, generator=g))
    profile = StepProfile.fit(normal, 5)
    scores = profile.score(busy * torch.exp(0.2 * torch.randn(20, 100, generator=g)))
    event = busy * torch.exp(0.2 * torch.randn(20, 100, generator=g))
    event[:, 10:15] *= 8.0  # in the quiet phase: 8× the normal energy for 5 steps
    flagged = profile.score(event)
    assert float(flagged.min()) > float(scores.max())
    std = profile.standardize(normal)
    assert abs(float(std.mean())) < 0.05
    assert float(std.std()) == pytest.approx(1.0, rel=0.05)


def test_moving_average_and_axis_groups() -> None:
    x = torch.arange(10.0)[None]
    assert torch.allclose(moving_average(x, 3)[0, 1:-1], x[0, 1:-1])  # linear ramp is kept
    assert moving_average(x, 1) is x
    names, groups = axis_groups(SIGNALS)
    assert names == ["robot", "axis 1", "axis 2"]
    assert [g.tolist() for g in groups] == [[5], [0, 1, 2], [3, 4]]


def test_normalizer_is_robust_to_an_outlier() -> None:
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 1e6])
    norm = Normalizer.fit(scores)
    assert norm.center == pytest.approx(3.5)
    assert norm.scale < 10  # one extreme calibration score does not flatten every other score
    with pytest.raises(ValueError, match="at least two finite"):
        Normalizer.fit(torch.tensor([1.0, float("nan")]))


def test_fusion_config_refuses_unknown_parts() -> None:
    with pytest.raises(ValueError, match="fusion components"):
        FusionConfig(components=("nll", "magic"))
    with pytest.raises(ValueError, match="variance"):
        FusionConfig(variance=1.0)
    with pytest.raises(ValueError, match="unknown fusion config keys"):
        FusionConfig.from_dict({"lagz": 2})
    with pytest.raises(ValueError, match="rule must be"):
        FusionConfig(rule="mean")


def test_fusion_rules_take_the_top_part_or_the_sum() -> None:
    parts = {
        "nll": torch.tensor([1.0, 10.0]),
        "linres": torch.tensor([3.0, 0.0]),
        "pca": torch.tensor([2.0, 1.0]),
    }
    for rule, expected in (("max", [3.0, 10.0]), ("sum", [6.0, 11.0])):
        fusion = SignalFusion(
            FusionConfig(rule=rule), {k: Normalizer(0.0, 1.0) for k in parts}, None, None, None
        )
        assert fusion.fuse(parts).tolist() == expected


# --- the artifact -----------------------------------------------------------------------------------
def plain_card(flow: MVTFlow, threshold: Threshold, **extra: Any) -> ModelCard:
    """A card for the 6 test signals at 20 Hz, identity scaler; `extra` sets the detector fields."""
    return ModelCard(
        signals=SIGNALS,
        rate_hz=20.0,
        mode="cycle",
        time_steps=64,
        window=None,
        hop=None,
        scaler=Standardizer(mean=np.zeros(6), std=np.ones(6)),
        threshold=threshold,
        architecture=flow.config,
        training={},
        **extra,
    )


def fused_model(tmp_path: Path) -> tuple[Path, torch.Tensor]:
    torch.manual_seed(0)
    x = related(48)
    flow = MVTFlow(MVTFlowConfig(signals=6, time_steps=64)).eval()
    fusion, cal_scores = fit_fusion(
        flow, x[:40], None, x[40:], 20.0, FusionConfig(pca_components=8), torch.device("cpu")
    )
    card = plain_card(
        flow,
        Threshold.calibrate(cal_scores, 0.1),
        detector="fusion",
        fusion=fusion.meta(),
        attribution_reference=tuple(normal_attribution(flow, x[:40], torch.device("cpu")).tolist()),
    )
    path = tmp_path / "fused"
    save_model(path, flow, card, fusion)
    return path, x


def test_a_saved_fusion_model_scores_as_trained_and_explains_relative_to_normal(tmp_path: Path) -> None:
    path, _ = fused_model(tmp_path)
    assert sorted(p.name for p in path.iterdir()) == [
        "detector.safetensors",
        "model.json",
        "weights.safetensors",
    ]
    meta = json.loads((path / "model.json").read_text())
    assert (meta["format_version"], meta["detector"]) == (2, "fusion")
    loaded = load_model(path)
    assert loaded.fusion is not None
    scorer = Scorer(loaded, device="cpu")
    probe = related(6, seed=5)
    probe[3, 2, 30:36] += 1.0  # one broken relation in cycle 3
    result = scorer.score(probe.numpy())
    assert result.components is not None
    assert set(result.components) == {"nll", "linres", "pca"}
    assert int(np.argmax(result.components["linres"])) == 3
    assert int(np.argmax(result.raw)) == 3
    # the same scores as the in-memory parts it was saved from
    with torch.no_grad():
        nll = loaded.flow.score(probe).double()
    again = loaded.fusion.fuse(loaded.fusion.components(probe, nll)).numpy()
    np.testing.assert_allclose(result.raw, again, rtol=1e-6)
    # explanations: the gradient map divided by each signal's normal attribution
    loc = scorer.localize(probe[3:4].numpy(), top=2)
    with torch.no_grad():
        raw = loaded.flow.localize(probe[3:4]).double().numpy()[0]
    ref = np.asarray(loaded.card.attribution_reference)
    np.testing.assert_allclose(loc.per_signal[0], (raw / ref[:, None]).sum(1), rtol=1e-5)
    # when: the local residual's curve is mixed in, and it points at the broken steps
    assert 28 <= int(np.argmax(loc.per_time[0])) <= 38
    assert loc.per_time[0].sum() == pytest.approx(1.0)


def test_a_version_1_model_still_loads_as_plain_mvt_flow(tmp_path: Path) -> None:
    flow = MVTFlow(MVTFlowConfig(signals=6, time_steps=64)).eval()
    card = plain_card(flow, Threshold(1.0, 0.0, 0.01, 0.0, 10))
    path = tmp_path / "v1"
    save_model(path, flow, card)
    meta = json.loads((path / "model.json").read_text())
    meta["format_version"] = 1
    for key in ("detector", "fusion", "attribution_reference"):
        meta.pop(key, None)
    (path / "model.json").write_text(json.dumps(meta))
    loaded = load_model(path)
    assert (loaded.card.detector, loaded.fusion, loaded.card.attribution_reference) == (
        "mvt-flow",
        None,
        None,
    )
    x = related(2)
    with torch.no_grad():
        np.testing.assert_allclose(Scorer(loaded).score(x.numpy()).raw, loaded.flow.score(x).double().numpy())


def test_damaged_fusion_files_are_clear_errors(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    path, _ = fused_model(tmp_path)
    state = load_file(str(path / "detector.safetensors"))
    state["profile.mean"] = state["profile.mean"][:, :10].contiguous()
    save_file(state, str(path / "detector.safetensors"))
    with pytest.raises(ModelFormatError, match=r"profile\.mean has shape"):
        load_model(path)
    (path / "detector.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelFormatError, match="not a readable safetensors file"):
        load_model(path)
    (path / "detector.safetensors").unlink()
    with pytest.raises(ModelFormatError, match=r"detector\.safetensors is missing"):
        load_model(path)
    path2, _ = fused_model(tmp_path / "b")
    meta = json.loads((path2 / "model.json").read_text())
    del meta["fusion"]
    (path2 / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelFormatError, match="fusion model needs its 'fusion' settings"):
        load_model(path2)
    meta["detector"] = "magic"
    (path2 / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelFormatError, match="detector is 'magic'"):
        load_model(path2)


def test_fusion_of_an_extreme_input_stays_finite_and_flagged(tmp_path: Path) -> None:
    """A gateway glitch (1e20) is clipped to ±100 σ before scoring: every part stays finite and the
    fused score is far above the threshold."""
    path, _ = fused_model(tmp_path)
    scorer = Scorer(load_model(path), device="cpu")
    cycle = related(1, seed=8)[0].T.numpy().astype(np.float64)
    cycle[10, 2] = 1e20
    result = scorer.score(scorer.prepare_cycle(cycle)[None])
    assert np.isfinite(result.raw).all()
    assert result.is_anomaly[0]
    assert result.components is not None
    assert all(np.isfinite(v).all() for v in result.components.values())
