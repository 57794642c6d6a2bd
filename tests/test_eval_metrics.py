"""Known-answer tests of the benchmark's statistics (stellarfield.eval.metrics)."""

from __future__ import annotations

import numpy as np
import pytest

from stellarfield.eval.metrics import (
    chi2_nu,
    median_abs_residual,
    median_offset,
    normalised_residual,
    rms_residual,
    robust_scatter,
    rv_comparison,
    summarize,
)


def test_chi2_nu_of_truth_plus_unit_gaussian_noise_is_one():
    rng = np.random.default_rng(0)
    truth = 1.0 + 0.3 * np.sin(np.linspace(0, 20, 2000))[None, :] * rng.uniform(0.5, 1.5, size=(200, 1))
    sigma = rng.uniform(0.005, 0.05, size=truth.shape)  # per-pixel errors that differ everywhere
    data = truth + sigma * rng.normal(size=truth.shape)
    values = chi2_nu(data, truth, 1.0 / sigma**2)
    assert values.shape == (200,)
    # Each value is chi2 with 2000 dof / 2000: mean 1, std sqrt(2/2000) = 0.032.
    assert abs(values.mean() - 1.0) < 0.01
    assert 0.02 < values.std() < 0.045


def test_chi2_nu_counts_only_good_pixels_and_subtracts_parameters():
    data = np.array([1.0, 2.0, 3.0, 100.0, 5.0, 7.0])
    model = np.array([0.0, 2.0, 1.0, 0.0, 5.0, 0.0])
    ivar = np.array([1.0, 4.0, 0.25, 1.0, 1.0, 0.0])  # last pixel: unknown noise
    mask = np.array([True, True, True, False, True, True])  # 4th pixel: bad, its residual must not count
    # good pixels: 0, 1, 2, 4 -> chi2 = 1 + 0 + 1 + 0 = 2; dof = 4 - 1
    assert chi2_nu(data, model, ivar, mask, n_params=1) == pytest.approx(2.0 / 3.0)
    assert chi2_nu(data, model, ivar, mask) == pytest.approx(0.5)
    # No degrees of freedom left: NaN, not inf or an error.
    assert np.isnan(chi2_nu(data, model, ivar, mask, n_params=4))


def test_normalised_residual_is_nan_on_bad_pixels():
    r = normalised_residual([1.0, 3.0, 5.0], [0.0, 1.0, 0.0], [4.0, 1.0, 0.0])
    assert r[0] == pytest.approx(2.0) and r[1] == pytest.approx(2.0) and np.isnan(r[2])


def test_median_abs_and_rms_residual_per_spectrum():
    data = np.array([[1.0, -2.0, 3.0, 50.0], [0.0, 0.0, 0.0, 0.0]])
    model = np.zeros_like(data)
    mask = np.array([[True, True, True, False], [False, False, False, False]])
    mar = median_abs_residual(data, model, mask)
    assert mar[0] == pytest.approx(2.0) and np.isnan(mar[1])
    rms = rms_residual(data, model, mask)
    assert rms[0] == pytest.approx(np.sqrt(14.0 / 3.0)) and np.isnan(rms[1])
    assert median_abs_residual(data[0], model[0]) == pytest.approx(2.5)  # no mask: all four pixels
    empty = median_abs_residual(np.zeros((3, 0)), np.zeros((3, 0)))  # spectra without pixels: NaN each
    assert empty.shape == (3,) and np.isnan(empty).all()


def test_robust_scatter_of_a_gaussian_is_its_sigma_and_ignores_outliers():
    rng = np.random.default_rng(1)
    x = rng.normal(3.0, 2.5, size=200_000)
    x[:1000] = 1e6  # 0.5% wild outliers barely move a median-based scatter
    assert robust_scatter(x) == pytest.approx(2.5, rel=0.02)
    assert median_offset(x) == pytest.approx(3.0, abs=0.05)
    assert np.isnan(robust_scatter([np.nan]))


def test_percentile_summary_of_known_values():
    s = summarize(np.concatenate([np.arange(101.0), [np.nan, np.inf]]))
    assert (s.median, s.p16, s.p84, s.n) == (50.0, 16.0, 84.0, 101)
    assert summarize([]).n == 0 and np.isnan(summarize([]).median)


def test_rv_comparison_recovers_offset_and_scatter_per_snr_bin():
    rng = np.random.default_rng(2)
    n = 20_000
    reference = rng.uniform(-200, 200, n)
    snr = rng.uniform(5, 200, n)
    scatter = np.where(snr < 50, 3.0, 0.5)  # noisier at low SNR
    fitted = reference + 1.5 + scatter * rng.normal(size=n)
    fitted[0] = np.nan  # a failed fit is left out, not propagated
    result = rv_comparison(fitted, reference, snr=snr, snr_bins=(0, 50, np.inf))
    assert result["n"] == n - 1
    assert result["offset_kms"] == pytest.approx(1.5, abs=0.05)
    low, high = result["by_snr"]
    assert low["scatter_kms"] == pytest.approx(3.0, rel=0.05)
    assert high["scatter_kms"] == pytest.approx(0.5, rel=0.05)
    assert low["n"] + high["n"] == n - 1
    with pytest.raises(ValueError):
        rv_comparison([1.0, 2.0], [1.0])
