"""Per-category AUROC, ROC curve and FPR thresholds (flows.metrics); 1-NN and PCA baselines."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flows.baselines import OneNN, PCABaseline
from flows.metrics import per_category_auroc, roc_auc, roc_curve, threshold_at_fpr

# ---------------------------------------------------------------- per_category_auroc

# normals 0, 1, 2, 3; A above all, B below all, C between, D mixed with a tie
_SCORES = [0.0, 5.0, 1.0, -1.0, 2.5, 1.5, 2.0, 6.0, 0.5, 3.0, 1.5, 3.0]
_CATS = ["N", "A", "N", "B", "D", "C", "N", "A", "D", "N", "C", "D"]
_ANOM = [False, True, False, True, True, True, False, True, True, False, True, True]


def test_per_category_auroc_hand_computed_values() -> None:
    res = per_category_auroc(_SCORES, _CATS, _ANOM)
    # D: 2.5 beats 3 normals, 0.5 beats 1, 3.0 beats 3 and ties 1 → (3 + 1 + 3.5) / (3·4)
    assert res.per_category == {"A": 1.0, "B": 0.0, "D": 0.625, "C": 0.5}
    assert list(res.per_category) == ["A", "B", "D", "C"]  # order of first appearance
    assert res.counts == {"A": 2, "B": 1, "D": 3, "C": 2}
    assert res.normals == 4


def test_per_category_mean_is_unweighted_not_pooled() -> None:
    res = per_category_auroc(_SCORES, _CATS, _ANOM)
    assert res.mean == pytest.approx((1.0 + 0.0 + 0.625 + 0.5) / 4)
    s, a = np.array(_SCORES), np.array(_ANOM)
    pooled = roc_auc(s[~a], s[a])
    count_weighted = sum(res.per_category[c] * n for c, n in res.counts.items()) / sum(res.counts.values())
    assert pooled == pytest.approx(count_weighted)  # pooling weights by count ...
    assert res.mean != pytest.approx(pooled)  # ... which the protocol does not do


def test_per_category_all_ties_give_half() -> None:
    res = per_category_auroc([1.0] * 5, ["N", "N", "X", "X", "N"], [0, 0, 1, 1, 0])
    assert res.per_category == {"X": 0.5}
    assert res.mean == 0.5


def test_per_category_normals_are_shared_and_their_labels_ignored() -> None:
    # normals labelled with an anomaly category's name do not become anomalies of it
    cats = ["A", "B", "A", "B", "A"]
    res = per_category_auroc([0.0, 1.0, 2.0, 3.0, 4.0], cats, [False, False, True, True, False])
    assert res.normals == 3
    assert res.counts == {"A": 1, "B": 1}
    # every category is ranked against all three normals (0, 1, 4)
    assert res.per_category == {"A": pytest.approx(2 / 3), "B": pytest.approx(2 / 3)}
    # moving one normal above everything lowers every category's AUROC
    res2 = per_category_auroc([0.0, 9.0, 2.0, 3.0, 4.0], cats, [False, False, True, True, False])
    assert res2.per_category == {"A": pytest.approx(1 / 3), "B": pytest.approx(1 / 3)}


def test_per_category_matches_roc_auc_per_category_on_random_data() -> None:
    rng = np.random.default_rng(0)
    n = 400
    scores = rng.integers(0, 20, n).astype(float)  # many ties
    cats = rng.choice(["x", "y", "z"], n)
    anomaly = rng.random(n) < 0.6
    res = per_category_auroc(scores, cats, anomaly)
    for c in ("x", "y", "z"):
        assert res.per_category[c] == pytest.approx(roc_auc(scores[~anomaly], scores[anomaly & (cats == c)]))
        assert res.counts[c] == int((anomaly & (cats == c)).sum())
    assert res.mean == pytest.approx(np.mean(list(res.per_category.values())))


def test_per_category_order_argument() -> None:
    res = per_category_auroc(_SCORES, _CATS, _ANOM, order=["D", "C", "Q", "B", "A"])
    assert list(res.per_category) == ["D", "C", "B", "A"]  # "Q" has no anomalies: left out
    assert list(res.counts) == ["D", "C", "B", "A"]
    with pytest.raises(ValueError, match=r"does not name.*'A'"):
        per_category_auroc(_SCORES, _CATS, _ANOM, order=["D", "C", "B"])
    with pytest.raises(ValueError, match="duplicate"):
        per_category_auroc(_SCORES, _CATS, _ANOM, order=["A", "A", "B", "C", "D"])


@pytest.mark.parametrize(
    ("scores", "cats", "anomaly", "message"),
    [
        ([1.0, 2.0], ["A", "B"], [True, True], "needs normal cycles"),
        ([1.0, 2.0], ["N", "N"], [False, False], "needs anomalous cycles"),
        ([1.0, 2.0, 3.0], ["N", "A"], [False, True, True], "same length"),
        ([1.0, 2.0], ["N", "A", "A"], [False, True], "same length"),
        ([1.0, 2.0], ["N", "A"], [False, True, True], "same length"),
        ([1.0, np.nan], ["N", "A"], [False, True], "finite"),
        ([1.0, np.inf], ["N", "A"], [False, True], "finite"),
        ([1.0, 2.0], ["N", 3], [False, True], "str"),
        ([1.0, 2.0], ["N", "A"], [0, 2], "0/1"),
        ([[1.0, 2.0]], ["N", "A"], [False, True], "1-D"),
    ],
)
def test_per_category_errors(scores: list, cats: list, anomaly: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        per_category_auroc(scores, cats, anomaly)


def test_per_category_accepts_zero_one_anomaly_flags() -> None:
    res = per_category_auroc([0.0, 1.0], ["N", "A"], np.array([0, 1]))
    assert res.per_category == {"A": 1.0}


# ---------------------------------------------------------------- roc_auc


def test_roc_auc_equals_scipy_mann_whitney_with_ties() -> None:
    """Independent reference: AUROC = U / (n_pos n_neg), ties counted half (scipy's Mann-Whitney U)."""
    from scipy.stats import mannwhitneyu

    rng = np.random.default_rng(7)
    for _ in range(30):
        neg = rng.integers(0, 12, rng.integers(1, 80)).astype(float)  # small integers: many ties
        pos = (rng.integers(0, 12, rng.integers(1, 80)) + rng.integers(0, 4)).astype(float)
        u = mannwhitneyu(pos, neg, alternative="two-sided").statistic
        assert roc_auc(neg, pos) == pytest.approx(u / (len(pos) * len(neg)), abs=1e-12)


def test_roc_auc_of_an_obvious_anomaly_a_constant_and_a_random_scorer() -> None:
    rng = np.random.default_rng(3)
    normal = rng.normal(size=2000)
    anomalous = rng.normal(loc=4.0, size=300)  # four standard deviations off: a detector sees it
    assert roc_auc(normal, anomalous) > 0.99
    assert roc_auc(anomalous, normal) < 0.01  # the score the wrong way round
    assert roc_auc(np.zeros(50), np.zeros(7)) == 0.5  # a constant score tells nothing
    random = rng.random(20000)  # a scorer that ignores the data
    assert roc_auc(random[:10000], random[10000:]) == pytest.approx(0.5, abs=0.02)


# ---------------------------------------------------------------- roc_curve


def test_roc_curve_small_example_exact() -> None:
    fpr, tpr, thr = roc_curve([1.0, 2.0, 3.0], [2.0, 4.0])
    np.testing.assert_array_equal(thr, [np.inf, 4.0, 3.0, 2.0, 1.0])
    np.testing.assert_allclose(fpr, [0, 0, 1 / 3, 2 / 3, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 0.5, 1, 1])


def test_roc_curve_endpoints_monotone_and_area_equals_roc_auc() -> None:
    rng = np.random.default_rng(1)
    for _ in range(20):
        neg = rng.integers(0, 15, rng.integers(1, 60)).astype(float)
        pos = rng.integers(3, 20, rng.integers(1, 60)).astype(float)
        fpr, tpr, thr = roc_curve(neg, pos)
        assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
        assert np.all(np.diff(fpr) >= 0)
        assert np.all(np.diff(tpr) >= 0)
        assert thr[0] == np.inf
        assert np.all(np.diff(thr) < 0)
        area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
        assert area == pytest.approx(roc_auc(neg, pos), abs=1e-12)


def test_roc_curve_errors() -> None:
    with pytest.raises(ValueError, match="both classes"):
        roc_curve([], [1.0])
    with pytest.raises(ValueError, match="finite"):
        roc_curve([1.0], [np.nan])


# ---------------------------------------------------------------- threshold_at_fpr


def test_threshold_at_fpr_on_1_to_100() -> None:
    scores = np.random.default_rng(2).permutation(np.arange(1.0, 101.0))
    assert threshold_at_fpr(scores, 0.05) == 95.0
    assert threshold_at_fpr(scores, 0.29) == 71.0  # 100 · 0.29 is 28.999… in floating point
    assert threshold_at_fpr(scores, 0.055) == 95.0  # 5.5 normals allowed → 5
    assert threshold_at_fpr(scores, 0.0) == 100.0
    assert threshold_at_fpr(scores, 0.009) == 100.0  # n · fpr < 1 → the maximum
    assert threshold_at_fpr(scores, 1.0) == 1.0


def test_threshold_at_fpr_with_ties() -> None:
    assert threshold_at_fpr([1.0, 1.0, 1.0, 1.0, 5.0], 0.2) == 1.0  # only the 5 is above
    assert threshold_at_fpr([1.0, 1.0, 1.0, 1.0, 5.0], 0.19) == 5.0
    assert threshold_at_fpr([1.0, 1.0, 1.0, 1.0, 5.0], 0.9) == 1.0  # nothing lies below the ties


def test_threshold_at_fpr_is_the_smallest_normal_score_meeting_the_fpr() -> None:
    rng = np.random.default_rng(3)
    for _ in range(50):
        scores = rng.integers(0, 30, rng.integers(1, 80)).astype(float)
        fpr = float(rng.random())
        t = threshold_at_fpr(scores, fpr)
        assert t in scores
        assert np.mean(scores > t) <= fpr
        lower = scores[scores < t]
        if lower.size:  # the next lower normal score would flag too many
            assert np.mean(scores > lower.max()) > fpr


@pytest.mark.parametrize(("scores", "fpr"), [([], 0.1), ([1.0, np.nan], 0.1), ([1.0], -0.1), ([1.0], 1.5)])
def test_threshold_at_fpr_errors(scores: list, fpr: float) -> None:
    with pytest.raises(ValueError):
        threshold_at_fpr(scores, fpr)


# ---------------------------------------------------------------- OneNN


def _brute_force_l1_nn(train: np.ndarray, test: np.ndarray) -> np.ndarray:
    tr = train.reshape(len(train), -1).astype(np.float64)
    te = test.reshape(len(test), -1).astype(np.float64)
    return np.abs(te[:, None, :] - tr[None, :, :]).sum(axis=2).min(axis=1)


def _data(n: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))


def test_one_nn_equals_brute_force_numpy() -> None:
    train, test = _data(23, (3, 17), 0), _data(11, (3, 17), 1)
    scores = OneNN().fit(train).score(test)
    assert scores.dtype == torch.float64
    assert scores.shape == (11,)
    np.testing.assert_allclose(scores.numpy(), _brute_force_l1_nn(train.numpy(), test.numpy()), rtol=1e-6)


def test_one_nn_training_samples_score_zero() -> None:
    train = _data(15, (4, 9), 2)
    model = OneNN().fit(train)
    np.testing.assert_array_equal(model.score(train).numpy(), np.zeros(15))
    probe = train[[3]].clone()
    probe[0, 1, 2] += 0.5
    assert model.score(probe).item() == pytest.approx(0.5, abs=1e-6)


def test_one_nn_chunking_does_not_change_scores() -> None:
    train, test = _data(37, (5, 13), 3), _data(29, (5, 13), 4)
    model = OneNN().fit(train)
    whole = model.score(test, batch_size=1000, train_batch_size=1000, dim_chunk=10_000).numpy()
    for bs, tbs, dc in [(1, 1, 1), (4, 7, 9), (29, 36, 64), (5, 1000, 65)]:
        chunked = model.score(test, batch_size=bs, train_batch_size=tbs, dim_chunk=dc).numpy()
        np.testing.assert_allclose(chunked, whole, rtol=1e-6)
    np.testing.assert_allclose(whole, _brute_force_l1_nn(train.numpy(), test.numpy()), rtol=1e-6)


def test_one_nn_accepts_numpy_2d_and_copies_training_data() -> None:
    train = np.random.default_rng(5).normal(size=(10, 6)).astype(np.float32)
    test = np.random.default_rng(6).normal(size=(4, 6))  # float64 is cast to float32
    model = OneNN().fit(train)
    before = model.score(test).numpy()
    train[:] = 0.0  # the caller reusing its buffer does not change the fitted model
    np.testing.assert_array_equal(model.score(test).numpy(), before)
    assert model.score(np.empty((0, 6))).shape == (0,)


def test_one_nn_errors() -> None:
    with pytest.raises(RuntimeError, match="before fit"):
        OneNN().score(_data(2, (3, 4), 0))
    model = OneNN().fit(_data(5, (3, 4), 0))
    with pytest.raises(ValueError, match=r"\(M, 3, 4\).*\(2, 4, 3\)"):
        model.score(_data(2, (4, 3), 1))
    with pytest.raises(ValueError, match=r"\(M, 3, 4\).*\(2, 12\)"):
        model.score(_data(2, (12,), 1))
    with pytest.raises(ValueError, match=r"\(N, S, T\) or \(N, D\).*\(5,\)"):
        OneNN().fit(torch.zeros(5))
    bad = _data(2, (3, 4), 1)
    bad[1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        model.score(bad)
    with pytest.raises(ValueError, match="batch_size"):
        model.score(_data(2, (3, 4), 1), batch_size=0)
    with pytest.raises(ValueError, match="at least one"):
        OneNN().fit(torch.zeros(0, 3))


# ---------------------------------------------------------------- PCABaseline


def _affine_subspace(n: int, dim: int, rank: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(dim, rank)))[0].T  # (rank, dim), orthonormal rows
    offset = rng.normal(size=dim)
    points = offset + rng.normal(size=(n, rank)) * 3.0 @ basis
    return points, basis, offset


@pytest.mark.parametrize("dim", [200, 8])  # Gram path (D > N) and SVD path (D <= N)
def test_pca_reconstructs_the_training_span_and_measures_the_orthogonal_part(dim: int) -> None:
    points, basis, offset = _affine_subspace(30, dim, 3, seed=dim)
    model = PCABaseline(n_components=3).fit(points)
    assert model.n_components_ == 3
    rng = np.random.default_rng(7)
    inside = offset + rng.normal(size=(6, 3)) * 3.0 @ basis
    scale = float(np.square(inside).sum(axis=1).max())
    assert model.score(inside).numpy().max() < 1e-5 * scale
    # off the span: the error is the squared norm of the part orthogonal to it
    w = rng.normal(size=(6, dim))
    w -= w @ basis.T @ basis
    np.testing.assert_allclose(model.score(inside + w).numpy(), np.square(w).sum(axis=1), rtol=1e-4)


def test_pca_matches_numpy_svd_reconstruction_error() -> None:
    rng = np.random.default_rng(8)
    train = rng.normal(size=(40, 5, 30)) * np.linspace(0.1, 3.0, 30)
    test = rng.normal(size=(12, 5, 30))
    model = PCABaseline(n_components=7).fit(train)
    tr = train.reshape(40, -1)
    mean = tr.mean(axis=0)
    comps = np.linalg.svd(tr - mean, full_matrices=False)[2][:7]
    tc = test.reshape(12, -1) - mean
    expected = np.square(tc - tc @ comps.T @ comps).sum(axis=1)
    np.testing.assert_allclose(model.score(test).numpy(), expected, rtol=1e-5)
    c = model.components_
    assert c is not None
    assert c.shape == (7, 150)
    np.testing.assert_allclose((c @ c.T).numpy(), np.eye(7), atol=1e-5)


def test_pca_n_components_clipping() -> None:
    rng = np.random.default_rng(9)
    assert PCABaseline(90).fit(rng.normal(size=(5, 50))).n_components_ == 4  # N - 1
    assert PCABaseline(90).fit(rng.normal(size=(20, 6))).n_components_ == 6  # D
    assert PCABaseline(2).fit(rng.normal(size=(20, 6))).n_components_ == 2
    points, _, _ = _affine_subspace(10, 40, 3, seed=10)
    low_rank = PCABaseline(90).fit(points)
    assert low_rank.n_components_ == 3  # numerical rank: the other directions would be arbitrary
    # with all N - 1 components every training point is reconstructed
    train = rng.normal(size=(6, 30))
    full = PCABaseline(90).fit(train)
    assert full.score(train).numpy().max() < 1e-8 * np.square(train).sum(axis=1).max()


def test_pca_chunking_does_not_change_the_result() -> None:
    train, test = _data(25, (4, 20), 11), _data(9, (4, 20), 12)
    reference = PCABaseline(5).fit(train, dim_chunk=10_000)
    whole = reference.score(test, batch_size=1000).numpy()
    np.testing.assert_allclose(reference.score(test, batch_size=1).numpy(), whole, rtol=1e-6)
    np.testing.assert_allclose(PCABaseline(5).fit(train, dim_chunk=7).score(test).numpy(), whole, rtol=1e-5)


def test_pca_errors() -> None:
    with pytest.raises(RuntimeError, match="before fit"):
        PCABaseline().score(_data(2, (3, 4), 0))
    model = PCABaseline(2).fit(_data(5, (3, 4), 0))
    with pytest.raises(ValueError, match=r"\(M, 3, 4\).*\(2, 3, 5\)"):
        model.score(_data(2, (3, 5), 1))
    with pytest.raises(ValueError, match="at least 2"):
        PCABaseline().fit(_data(1, (3, 4), 0))
    with pytest.raises(ValueError, match="n_components"):
        PCABaseline(0)
    with pytest.raises(ValueError, match=r"\(N, S, T\) or \(N, D\)"):
        PCABaseline().fit(torch.zeros(4, 2, 3, 5))
    bad = _data(5, (3, 4), 2)
    bad[0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        PCABaseline(2).fit(bad)
