"""Latent-to-label probes: they must recover relations that are there and find none where there is none."""

from __future__ import annotations

import numpy as np
import pytest

from stellarfield.eval.probes import (
    KNNProbe,
    RidgeProbe,
    cross_source_probe,
    evaluate_probes,
    latent_neighbour_agreement,
    nearest_neighbours,
    regression_scores,
)


def test_ridge_recovers_a_linear_relation():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 8)) * rng.uniform(0.1, 10, 8)  # features of very different scales
    true_w = rng.normal(size=8)
    y = 5000 + x @ true_w * 100 + rng.normal(0, 20, 2000)  # "Teff" with 20 K noise
    probe = RidgeProbe().fit(x[:1500], y[:1500])
    scores = regression_scores(probe.predict(x[1500:]), y[1500:])
    # Median |residual| of Gaussian noise is 0.6745 sigma = 13.5 K; RMSE = sigma.
    assert scores["mad"] == pytest.approx(13.5, rel=0.15)
    assert scores["rmse"] == pytest.approx(20.0, rel=0.1)
    assert scores["n"] == 500 and abs(scores["bias"]) < 3
    assert probe.alpha_ <= 1e-3  # almost no regularisation wanted for clean linear data


def test_ridge_cross_validation_shrinks_when_there_is_nothing_to_learn():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(60, 40))
    y = rng.normal(size=60)  # unrelated to x: 40 features, 60 stars would overfit without shrinkage
    probe = RidgeProbe().fit(x, y)
    assert probe.alpha_ >= 1.0
    assert np.abs(probe.coef_).max() < 0.2


def test_nearest_neighbours_match_brute_force():
    rng = np.random.default_rng(2)
    ref, query = rng.normal(size=(500, 5)), rng.normal(size=(70, 5))
    got = nearest_neighbours(query, ref, k=10, chunk=16)
    d = ((query[:, None, :] - ref[None, :, :]) ** 2).sum(-1)
    assert np.array_equal(got, np.argsort(d, axis=1)[:, :10])
    assert nearest_neighbours(query, ref[:4], k=4).shape == (70, 4)


def test_knn_recovers_a_smooth_nonlinear_relation_that_ridge_cannot():
    rng = np.random.default_rng(3)
    x = rng.uniform(-1, 1, size=(6000, 2))
    y = x[:, 0] ** 2 + x[:, 1] ** 2  # a bowl: no linear trend at all
    result = evaluate_probes(x[:5000], {"logg": y[:5000]}, x[5000:], {"logg": y[5000:]})
    assert result["knn"]["logg"]["mad"] < 0.02
    assert result["ridge"]["logg"]["mad"] > 0.2
    assert result["knn"]["logg"]["n"] == 1000 and result["knn"]["logg"]["n_train"] == 5000


def test_missing_labels_are_dropped_per_label():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(300, 3))
    labels = {"teff": x[:, 0] * 100, "fe_h": x[:, 1] * 0.1}
    labels["fe_h"][:100] = np.nan  # e.g. [Fe/H] missing for some stars, Teff known for all
    test_labels = {"teff": x[:, 0] * 100, "fe_h": np.where(np.arange(300) < 50, np.nan, x[:, 1] * 0.1)}
    result = evaluate_probes(x, labels, x, test_labels, kinds=("ridge",))
    assert result["ridge"]["teff"]["n"] == 300 and result["ridge"]["teff"]["n_train"] == 300
    assert result["ridge"]["fe_h"]["n"] == 250 and result["ridge"]["fe_h"]["n_train"] == 200
    # The (N, L) array form gives the same numbers.
    arr = np.column_stack([labels["teff"], labels["fe_h"]])
    arr_test = np.column_stack([test_labels["teff"], test_labels["fe_h"]])
    again = evaluate_probes(x, arr, x, arr_test, label_names=["teff", "fe_h"], kinds=("ridge",))
    assert again["ridge"]["fe_h"]["mad"] == pytest.approx(result["ridge"]["fe_h"]["mad"])


def _latents(labels, rng, instrument_offset=0.0, noise=0.05):
    """A 6-D latent that is a fixed non-linear map of (Teff, logg) plus an optional instrument offset."""
    t, g = (labels["teff"] - 5000) / 1000, labels["logg"] - 3
    z = np.column_stack([t, g, t * g, np.sin(t), g**2, t + g])
    z = z + noise * rng.normal(size=z.shape)
    z[:, 0] += instrument_offset
    return z


def _labels(n, rng):
    return {"teff": rng.uniform(4000, 6500, n), "logg": rng.uniform(1, 5, n)}


def test_cross_source_probe_passes_for_an_invariant_latent_and_fails_for_an_instrument_offset():
    rng = np.random.default_rng(5)
    la, lb_train, lb_test = _labels(3000, rng), _labels(500, rng), _labels(300, rng)
    za = _latents(la, rng)
    invariant = cross_source_probe(
        za, la, _latents(lb_train, rng), lb_train, _latents(lb_test, rng), lb_test, kinds=("knn",)
    )
    cross, own = invariant["cross"]["knn"]["teff"]["mad"], invariant["self"]["knn"]["teff"]["mad"]
    assert cross < 1.5 * own + 20  # same latent map: A's probe works on B about as well as B's own
    shifted = cross_source_probe(
        za, la, _latents(lb_train, rng, 8.0), lb_train, _latents(lb_test, rng, 8.0), lb_test, kinds=("knn",)
    )
    # The instrument moved B's stars far from A's in latent space: A's probe no longer applies.
    assert shifted["cross"]["knn"]["teff"]["mad"] > 3 * shifted["self"]["knn"]["teff"]["mad"]


def test_latent_neighbour_agreement_near_one_when_invariant_near_zero_when_not():
    rng = np.random.default_rng(6)
    la, lb = _labels(3000, rng), _labels(400, rng)
    za = _latents(la, rng)
    good = latent_neighbour_agreement(za, la, _latents(lb, rng), lb)
    assert good["teff"]["agreement"] > 0.8 and good["logg"]["agreement"] > 0.8
    assert good["teff"]["n"] == 400
    # B's latents unrelated to its labels: its stars' neighbours are as good as random stars ...
    spread = za[rng.permutation(len(za))[:400]]  # A-like latent positions, shuffled away from B's labels
    unrelated = latent_neighbour_agreement(za, la, spread, lb)
    assert abs(unrelated["teff"]["agreement"]) < 0.15
    assert unrelated["teff"]["random_mad"] == pytest.approx(good["teff"]["random_mad"], rel=0.15)
    # ... and worse than random when the instrument pushes all of B into one corner of A's space.
    cornered = latent_neighbour_agreement(za, la, rng.normal(size=(400, 6)) + 5.0, lb)
    assert cornered["teff"]["agreement"] < 0.0


def test_knn_probe_predicts_the_mean_of_its_neighbours():
    x = np.arange(20.0)[:, None]
    y = np.arange(20.0) * 10
    probe = KNNProbe(k=3).fit(x, y)
    assert probe.predict(np.array([[10.2]]))[0] == pytest.approx((90 + 100 + 110) / 3)
