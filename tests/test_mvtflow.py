"""MVT-Flow as published: invertibility, log-det consistency, the NLL's constants, shape checks and
the temporal localization gradient (thesis Eq. 8.6)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from flows.mvtflow import InternalNetwork, MVTFlow, MVTFlowConfig


def small(signals: int = 10, steps: int = 48, **kw) -> MVTFlow:
    torch.manual_seed(0)
    return MVTFlow(MVTFlowConfig(signals=signals, time_steps=steps, **kw)).eval()


@pytest.mark.parametrize(("signals", "steps"), [(10, 48), (7, 33), (40, 64), (130, 40)])
def test_inverse_recovers_the_input(signals: int, steps: int) -> None:
    flow = small(signals, steps)
    x = torch.randn(3, signals, steps)
    with torch.no_grad():
        z, log_det = flow.transform(x)
        back, log_det_rev = flow.inverse(z)
    assert torch.allclose(back, x, atol=1e-4)
    # forward and reverse log-dets cancel (relative to their size)
    assert torch.allclose(log_det, -log_det_rev, rtol=1e-4, atol=1e-3 * (1 + log_det.abs().max().item()))


def test_log_det_matches_the_jacobian_of_a_tiny_flow() -> None:
    flow = small(4, 6).double()
    x = torch.randn(1, 4, 6, dtype=torch.float64)
    with torch.no_grad():
        _, log_det = flow.transform(x)
    jac = torch.autograd.functional.jacobian(
        lambda v: flow.transform(v.view(1, 4, 6))[0].flatten(), x.flatten()
    )
    assert torch.slogdet(jac).logabsdet.item() == pytest.approx(log_det.item(), rel=1e-6, abs=1e-6)


def test_nll_of_base_distribution_data_under_a_volume_preserving_flow() -> None:
    """With the coupling scales and shifts at zero the flow only permutes signals: then for x ~ N(0, I)
    the score per dimension is E[x²]/2 = 0.5 and −log p(x)/D is the normal entropy ½(1 + log 2π)."""
    flow = small(12, 64)
    for module in flow.modules():
        if isinstance(module, InternalNetwork):
            last = module.net[-1]
            torch.nn.init.zeros_(last.weight)
            torch.nn.init.zeros_(last.bias)
    x = torch.randn(64, 12, 64)
    with torch.no_grad():
        per_dim = flow.score(x) / flow.dims
        nll = -flow.log_prob(x) / flow.dims
        _, log_det = flow.transform(x)
    assert torch.all(log_det.abs() < 1e-5)
    assert per_dim.mean().item() == pytest.approx(0.5, abs=0.01)
    assert nll.mean().item() == pytest.approx(0.5 * (1 + math.log(2 * math.pi)), abs=0.01)
    assert flow.loss(x).item() == pytest.approx(per_dim.mean().item(), rel=1e-5)  # same ½ in loss and score


def test_samples_of_the_flow_score_as_their_latents_say() -> None:
    flow = small(10, 40)
    z = torch.randn(16, 10, 40)
    with torch.no_grad():
        x, log_det_rev = flow.inverse(z)
        expected = 0.5 * z.pow(2).flatten(1).sum(1) + log_det_rev
        assert torch.allclose(flow.score(x), expected, rtol=1e-4, atol=1e-2)


def test_wrong_shape_names_expected_and_received() -> None:
    flow = small(10, 48)
    with pytest.raises(ValueError, match=r"signals=10, time_steps=48\), got \(2, 9, 48\)"):
        flow.score(torch.randn(2, 9, 48))
    with pytest.raises(ValueError, match=r"MVTFlowConfig\.kernel_sizes"):
        MVTFlowConfig(signals=10, time_steps=10, kernel_sizes=(13,), dilations=(2,))


def test_published_architecture() -> None:
    flow = MVTFlow(MVTFlowConfig(signals=130, time_steps=16))
    nets = [m for m in flow.modules() if isinstance(m, InternalNetwork)]
    assert len(nets) == 8  # 4 GLOW blocks x 2 subnets (one per half)
    convs = [m for m in nets[0].net if isinstance(m, torch.nn.Conv1d)]
    assert [c.kernel_size[0] for c in convs] == [13, 1, 1]
    assert [c.dilation[0] for c in convs] == [2, 1, 1]
    assert convs[0].out_channels == 260  # hidden = signals x 2
    assert convs[0].in_channels == 65  # one half of the signals in ...
    assert convs[-1].out_channels == 130  # ... [s, t] for the other half out
    # permutations are fixed (not trained) and saved with the weights
    perms = [k for k in flow.state_dict() if k.endswith(".perm")]
    assert len(perms) == 4
    assert all(not p.requires_grad for n, p in flow.named_parameters() if n.endswith("perm"))


def test_permutation_seed_is_reproducible_and_leaves_numpy_alone() -> None:
    np.random.seed(5)
    before = np.random.random()
    np.random.seed(5)
    a = MVTFlow(MVTFlowConfig(signals=20, time_steps=8, permutation_seed=3))
    assert np.random.random() == before  # FrEIA reseeds numpy internally; the caller's state survives
    b = MVTFlow(MVTFlowConfig(signals=20, time_steps=8, permutation_seed=3))
    for (ka, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        if ka.endswith("perm"):
            assert torch.equal(va, vb)


def test_localize_is_the_input_gradient_of_the_score() -> None:
    flow = small(6, 20).double()
    x = torch.randn(2, 6, 20, dtype=torch.float64)
    grad = flow.localize(x)
    assert grad.shape == x.shape
    eps = 1e-6
    for s, t in [(0, 0), (3, 11), (5, 19)]:
        bumped = x.clone()
        bumped[0, s, t] += eps
        with torch.no_grad():
            numeric = (flow.score(bumped)[0] - flow.score(x)[0]).item() / eps
        assert grad[0, s, t].item() == pytest.approx(abs(numeric), rel=1e-3, abs=1e-5)
