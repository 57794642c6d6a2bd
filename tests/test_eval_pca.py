"""Weighted EM-PCA and the per-product PCA baseline, on data with known answers and on real MILES."""

from __future__ import annotations

import numpy as np
import pytest

from stellarfield.eval.baselines import PCABaseline
from stellarfield.eval.pca import WeightedPCA, weighted_coefficients
from stellarfield.spectrum import Segment, Spectrum


def _low_rank(n, p, k, rng, smooth_grid=None):
    """Spectra = 1 + sum of k components (smooth in wavelength if a grid is given) with random amplitudes."""
    if smooth_grid is None:
        comps = rng.normal(size=(k, p))
    else:
        x = (smooth_grid - smooth_grid[0]) / (smooth_grid[-1] - smooth_grid[0])
        comps = np.array([np.sin((j + 1) * np.pi * x + j) for j in range(k)])
    coeffs = rng.normal(size=(n, k)) * np.linspace(0.2, 0.05, k)
    return 1.0 + coeffs @ comps


def test_noiseless_rank_k_data_with_gaps_is_reconstructed_exactly():
    rng = np.random.default_rng(0)
    truth = _low_rank(300, 120, 4, rng)
    weight = (rng.random(truth.shape) > 0.2).astype(float)  # 20% missing pixels
    pca = WeightedPCA(4, max_iter=60, tol=1e-12).fit(np.where(weight > 0, truth, np.nan), weight)
    model = pca.reconstruct(pca.transform(truth, weight))
    # Missing pixels are predicted too: they lie on the same 4-dimensional plane.
    assert np.abs(model - truth).max() < 1e-6
    assert np.allclose(pca.components_ @ pca.components_.T, np.eye(4), atol=1e-10)


def test_chi2_of_rank_k_data_with_heteroscedastic_noise_is_one_on_train_and_held_out():
    rng = np.random.default_rng(1)
    truth = _low_rank(700, 200, 5, rng)
    sigma = rng.uniform(0.005, 0.03, truth.shape)  # errors differ from pixel to pixel and star to star
    data = truth + sigma * rng.normal(size=truth.shape)
    weight = np.where(rng.random(truth.shape) > 0.15, 1.0 / sigma**2, 0.0)
    train, test = slice(0, 500), slice(500, 700)
    pca = WeightedPCA(5, max_iter=100).fit(data[train], weight[train])
    assert all(b <= a * (1 + 1e-9) for a, b in zip(pca.chi2_history_, pca.chi2_history_[1:]))  # never increases
    coeffs = pca.transform(data[test], weight[test])
    resid = data[test] - pca.reconstruct(coeffs)
    chi2 = (resid**2 * weight[test]).sum(axis=1) / ((weight[test] > 0).sum(axis=1) - 5)
    assert np.median(chi2) == pytest.approx(1.0, abs=0.03)


def test_weighted_coefficients_are_weighted_least_squares():
    rng = np.random.default_rng(2)
    basis = rng.normal(size=(3, 50))
    y = rng.normal(size=(1, 50))
    w = rng.uniform(0.5, 2.0, size=(1, 50))
    c = weighted_coefficients(basis, y, w)
    sw = np.sqrt(w[0])
    expected, *_ = np.linalg.lstsq((basis * sw).T, y[0] * sw, rcond=None)
    assert np.allclose(c[0], expected, atol=1e-8)


def _spectra(product, n, k, rng, *, noise_known=True, sigma=0.01, jitter_A=0.0):
    """Synthetic records of one product: smooth rank-k spectra on slightly shifted grids, with noise."""
    spectra = []
    for i in range(n):
        start = 5000.0 + rng.uniform(-jitter_A, jitter_A)
        waves = [np.linspace(start, start + 200, 800), np.linspace(start + 300, start + 450, 600)]
        segments = []
        for j, w in enumerate(waves):
            truth = _low_rank(1, w.size, k, np.random.default_rng(1000 + i), smooth_grid=w)[0]
            flux = truth + sigma * rng.normal(size=w.size)
            ivar = np.full(w.size, 1 / sigma**2 if noise_known else 0.0)
            segments.append(Segment(f"ccd{j + 1}", w, flux, ivar, np.ones(w.size, bool)))
        spectra.append(Spectrum(f"s{i}", "T", "T", product, segments, "rest", "continuum", noise_known=noise_known))
    return spectra


@pytest.mark.parametrize("on", ["native", "common"])
def test_baseline_on_shifted_grids_gives_chi2_one_on_held_out_spectra(on):
    rng = np.random.default_rng(3)
    spectra = _spectra("synthetic", 230, 3, rng, jitter_A=0.5)
    baseline = PCABaseline(n_components=3, normalisation="none").fit(spectra[:200])
    score = baseline.score(spectra[200:], on=on)
    assert score["n"] == 30 and score["n_components"] == 3 and score["grid"] == on
    # The mean and components learnt from 200 noisy spectra add ~(K + 1) / 200 = 2% (3% on the
    # common grid, where the resampled test noise is smaller) to a perfect model's chi2 of 1.
    assert score["chi2_nu"]["median"] == pytest.approx(1.0, abs=0.045)
    assert set(score["chi2_nu_by_segment"]) == {"ccd1", "ccd2"}
    # Pixels at the ends of the common grid that fewer than half the training spectra reach are dropped.
    assert score["grid_pixels_modelled"] <= score["grid_pixels"] == 1400


def test_baseline_without_errors_reports_rms_instead_of_chi2():
    rng = np.random.default_rng(4)
    spectra = _spectra("miles_like", 40, 2, rng, noise_known=False, sigma=0.02)
    baseline = PCABaseline(n_components=2, normalisation="none").fit(spectra[:30])
    score = baseline.score(spectra[30:])
    assert score["chi2_nu"]["n"] == 0 and not score["noise_known"]
    assert score["rms_residual"]["median"] == pytest.approx(0.02, rel=0.1)


def test_baseline_caps_components_at_training_size_and_refuses_mixed_products():
    rng = np.random.default_rng(5)
    spectra = _spectra("tiny", 6, 2, rng)
    baseline = PCABaseline(n_components=16).fit(spectra[:4])
    assert baseline.pca.n_components_ == 3
    with pytest.raises(ValueError, match="per product"):
        PCABaseline().fit(spectra[:2] + _spectra("other", 2, 2, rng))
    with pytest.raises(ValueError, match="reconstruct"):
        baseline.reconstruct(_spectra("other", 1, 2, rng)[0])


def test_real_miles_pca16_rms_residual(shared_data):
    """PCA 16 on 48 real MILES stars (median-normalised), scored on 12 others: the issue measured an
    RMS residual of 0.021 on MILES with 16 components (more training stars)."""
    from stellarfield.io import read_spectra

    files = sorted((shared_data / "miles").glob("MILES_res2.50_star_m0*V.fits"))[:60]
    spectra = [read_spectra(f)[0] for f in files]
    baseline = PCABaseline(n_components=16).fit(spectra[:48])
    assert baseline.normalisation == "median" and not baseline.noise_known
    score = baseline.score(spectra[48:])
    assert score["n"] == 12 and score["grid_pixels"] == 4300
    assert 0.005 < score["rms_residual"]["median"] < 0.05


def test_batched_coefficients_match_one_by_one_fits():
    rng = np.random.default_rng(6)
    spectra = _spectra("synthetic", 40, 3, rng)  # identical grids: common = native
    baseline = PCABaseline(n_components=3, normalisation="none").fit(spectra[:30])
    batched = baseline.coefficients(spectra[30:])
    single = baseline.coefficients(spectra[30:], on="native")
    assert batched.shape == (10, 3) and np.allclose(batched, single, rtol=1e-6, atol=1e-9)


def test_weighted_pca_beats_plain_pca_when_some_stars_are_noisy_and_start_reuses_the_svd():
    """Rank-3 spectra, a quarter of the training stars 100x noisier: the plain PCA's axes chase their
    noise, the weighted EM-PCA (weights 1/sigma^2) finds the true plane, so held-out chi2_nu is ~1."""
    rng = np.random.default_rng(7)
    truth = _low_rank(500, 150, 3, rng)
    sigma = np.where(rng.random((500, 1)) < 0.25, 0.5, 0.005) * np.ones((1, 150))
    sigma[400:] = 0.005  # held-out stars: all good
    data = truth + sigma * rng.normal(size=truth.shape)
    weight = 1.0 / sigma**2
    plain = WeightedPCA(3, max_iter=0).fit(data[:400], weight[:400])
    weighted = WeightedPCA(3, max_iter=50, tol=1e-9).fit(data[:400], weight[:400])
    resumed = WeightedPCA(3, max_iter=50, tol=1e-9).fit(data[:400], weight[:400], start=plain.start_)
    assert np.allclose(resumed.mean_, weighted.mean_) and np.allclose(resumed.components_, weighted.components_)

    def chi2_nu(pca):
        resid = data[400:] - pca.reconstruct(pca.transform(data[400:], weight[400:]))
        return np.median((resid**2 * weight[400:]).sum(axis=1) / (150 - 3))

    assert chi2_nu(weighted) == pytest.approx(1.0, abs=0.1)
    assert chi2_nu(plain) > 3.0
    with pytest.raises(ValueError, match="start"):
        WeightedPCA(3).fit(data[:400], weight[:400], start=(plain.start_[0][:10], plain.start_[1]))


def test_plain_and_weighted_baselines_from_one_preparation_match_separate_fits():
    from stellarfield.eval.baselines import fit_plain_and_weighted

    rng = np.random.default_rng(8)
    spectra = _spectra("synthetic", 50, 3, rng, jitter_A=0.5)
    pair = fit_plain_and_weighted(spectra[:40], 3, normalisation="none")
    plain = PCABaseline(n_components=3, normalisation="none", weighted=False).fit(spectra[:40])
    weighted = PCABaseline(n_components=3, normalisation="none", weighted=True).fit(spectra[:40])
    assert not pair["plain"].weighted and pair["weighted"].weighted
    assert pair["plain"].em_iterations == 0 and pair["weighted"].em_iterations == weighted.em_iterations > 0
    for mine, theirs in ((pair["plain"], plain), (pair["weighted"], weighted)):
        assert mine.n_train == 40 and mine.pca.n_components_ == 3
        assert np.allclose(mine.pca.components_, theirs.pca.components_, atol=1e-8)
        assert np.allclose(mine.coefficients(spectra[40:]), theirs.coefficients(spectra[40:]), atol=1e-8)


def test_leading_axes_match_the_svd_for_wide_and_tall_matrices():
    from stellarfield.eval.pca import leading_axes

    rng = np.random.default_rng(9)
    for shape in ((40, 300), (300, 40)):
        x = rng.normal(size=shape) * np.linspace(3.0, 0.1, shape[1])  # distinct singular values
        vt = np.linalg.svd(x, full_matrices=False)[2][:5]
        axes = leading_axes(x, 5)
        assert axes.shape == (5, shape[1])
        assert np.allclose(np.abs((axes * vt).sum(axis=1)), 1.0, atol=1e-8)  # the same axes, up to sign
    rank_one = np.outer(rng.normal(size=10), rng.normal(size=50))  # rank-deficient: SVD fallback, still orthonormal
    axes = leading_axes(rank_one, 3)
    assert np.allclose(axes @ axes.T, np.eye(3), atol=1e-8)
