"""Classifier two-sample test: 0.5 for one distribution against itself, near 1 against noise."""

from __future__ import annotations

import numpy as np
import pytest

from stellarfield.eval.two_sample import auc_mann_whitney, classifier_two_sample_test, fit_logistic


def test_auc_known_values_and_ties():
    assert auc_mann_whitney([3, 4], [1, 2]) == 1.0
    assert auc_mann_whitney([1, 2], [3, 4]) == 0.0
    assert auc_mann_whitney([1.0], [1.0]) == 0.5
    assert auc_mann_whitney([1, 3], [2, 2]) == 0.5  # one pair above, one below
    assert np.isnan(auc_mann_whitney([], [1.0]))


def test_auc_equals_the_fraction_of_correctly_ordered_pairs():
    rng = np.random.default_rng(0)
    pos, neg = np.round(rng.normal(0.5, 1, 300), 1), np.round(rng.normal(0, 1, 200), 1)  # rounding makes ties
    pairs = (pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()
    assert auc_mann_whitney(pos, neg) == pytest.approx(pairs, abs=1e-12)


def _spectra(n, rng, depth=0.5):
    """Toy absorption-line spectra on 60 pixels: a line of random depth, plus noise."""
    x = np.linspace(-3, 3, 60)
    depths = rng.uniform(0.2, 0.8, n)[:, None] * depth / 0.5
    return 1 - depths * np.exp(-0.5 * x**2) + 0.01 * rng.normal(size=(n, 60))


def test_two_samples_of_one_distribution_are_indistinguishable():
    rng = np.random.default_rng(1)
    result = classifier_two_sample_test(_spectra(400, rng), _spectra(400, rng))
    assert result["auc"] == pytest.approx(0.5, abs=0.06)
    assert result["n_real"] == 400 and result["n_generated"] == 400 and len(result["auc_folds"]) == 5


def test_a_set_against_itself_gives_half():
    rng = np.random.default_rng(2)
    real = _spectra(300, rng)
    # Each spectrum's twin stays in its fold: the classifier never learns one copy to score the other.
    assert classifier_two_sample_test(real, real.copy())["auc"] == pytest.approx(0.5, abs=0.06)


def test_spectra_against_noise_are_told_apart():
    rng = np.random.default_rng(3)
    real = _spectra(200, rng)
    noise = 1 + 0.3 * rng.normal(size=real.shape)
    assert classifier_two_sample_test(real, noise)["auc"] > 0.97


def test_a_subtle_difference_is_detected_and_projection_keeps_it():
    rng = np.random.default_rng(4)
    real, generated = _spectra(400, rng), _spectra(400, rng, depth=0.7)  # lines 40% too deep on average
    full = classifier_two_sample_test(real, generated)
    projected = classifier_two_sample_test(real, generated, n_components=5)
    assert full["auc"] > 0.6 and projected["auc"] > 0.6
    assert projected["n_features"] == 60


def test_missing_values_are_filled_and_bad_shapes_refused():
    rng = np.random.default_rng(5)
    real, generated = _spectra(100, rng), _spectra(100, rng)
    real[::7, 10] = np.nan
    assert np.isfinite(classifier_two_sample_test(real, generated)["auc"])
    with pytest.raises(ValueError):
        classifier_two_sample_test(real, generated[:, :50])


def test_logistic_regression_finds_the_separating_direction():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(2000, 3))
    y = (x[:, 0] - 2 * x[:, 2] + 0.3 * rng.normal(size=2000) > 0).astype(float)
    w, b = fit_logistic(x, y, l2=1e-4)
    direction = w / np.linalg.norm(w)
    assert direction @ np.array([1, 0, -2]) / np.sqrt(5) > 0.99
    assert abs(b) < 0.3
