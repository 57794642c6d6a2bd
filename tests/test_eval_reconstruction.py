"""Scoring a model's native-pixel output exactly like the PCA baseline (same pixels, same units)."""

from __future__ import annotations

import numpy as np
import pytest

from stellarfield.eval.baselines import PCABaseline
from stellarfield.eval.masks import apply_observed_frame_masks
from stellarfield.eval.normalise import normalisation_divisor
from stellarfield.eval.reconstruction import reconstruction_from_model, summarize_reconstructions
from stellarfield.spectrum import Segment, Spectrum


def _galah_like(i, rng, sigma=2.0):
    """A flux-like, observed-frame GALAH-like record (counts ~ 1000) with CCD4 covering the O2 band."""
    waves = [np.linspace(6480.0, 6740.0, 1500), np.linspace(7585.0, 7888.0, 1500)]
    segments, truths = [], []
    for j, w in enumerate(waves):
        truth = 1000.0 * (1 + 0.1 * np.sin(w / 40.0 + i)) * (1 - 0.3 * np.exp(-0.5 * ((w - 6564.6 - j * 1100) / 1.5) ** 2))
        truths.append(truth)
        segments.append(Segment(f"ccd{j + 3}", w, truth + sigma * rng.normal(size=w.size), np.full(w.size, 1 / sigma**2), np.ones(w.size, bool)))
    spectrum = Spectrum(f"s{i}", "GALAH", "HERMES", "galah_dr3_observed", segments, "observed", "flux")
    return spectrum, np.concatenate(truths)


def test_true_model_scores_chi2_one_with_o2_band_and_median_normalisation_applied():
    rng = np.random.default_rng(0)
    recs = []
    for i in range(40):
        spectrum, truth = _galah_like(i, rng)
        recs.append(reconstruction_from_model(spectrum, truth, n_params=5, coefficients=np.zeros(32)))
    r = recs[0]
    assert r.n_params == 5  # n_params given, not the latent size
    w = r.wavelength
    assert not r.mask[(w >= 7592) & (w <= 7702)].any() and r.mask[w < 7592].all()
    # Divided by the median (~1000): residuals in units of the median flux, chi2 unchanged.
    assert np.median(r.data[r.mask]) == pytest.approx(1.0, abs=1e-3)
    summary = summarize_reconstructions(recs)
    assert summary["n"] == 40 and summary["chi2_nu"]["median"] == pytest.approx(1.0, abs=0.03)
    assert summary["rms_residual"]["median"] == pytest.approx(2.0 / 1000, rel=0.05)
    assert set(summary["chi2_nu_by_segment"]) == {"ccd3", "ccd4"}
    with pytest.raises(ValueError, match="pixels"):
        reconstruction_from_model(spectrum, truth[:-1], n_params=5)


def test_model_and_pca_are_scored_on_the_same_pixels():
    rng = np.random.default_rng(1)
    spectra = [_galah_like(i, rng)[0] for i in range(30)]
    baseline = PCABaseline(n_components=4).fit(spectra[:25])
    for spectrum in spectra[25:]:
        pca = baseline.reconstruct(spectrum)
        # The PCA's own model, handed over in flux units as a model's output would be.
        scale = normalisation_divisor(apply_observed_frame_masks(spectrum), "median")
        as_model = reconstruction_from_model(spectrum, pca.model * scale, n_params=4, used=np.isfinite(pca.model))
        assert np.array_equal(as_model.mask, pca.mask)
        assert as_model.chi2_nu() == pytest.approx(pca.chi2_nu(), rel=1e-5)
        assert as_model.rms_residual() == pytest.approx(pca.rms_residual(), rel=1e-4)
