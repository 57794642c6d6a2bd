"""Realism test inputs: generated spectra get the instrument's noise and masks from real spectra."""

from __future__ import annotations

import numpy as np
import pytest

from stellarfield.eval.realism import (
    NoiseTemplates,
    add_instrument_noise,
    der_snr_sigma,
    noise_templates,
    pseudo_continuum,
    pseudo_continuum_normalised,
)
from stellarfield.eval.common_grid import CommonGrid
from stellarfield.eval.two_sample import classifier_two_sample_test
from stellarfield.spectrum import Segment, Spectrum


def _spectrum(wave, flux, ivar, mask, noise_known=True, key="s"):
    seg = Segment("full", wave, flux.astype(np.float32), ivar.astype(np.float32), mask)
    return Spectrum(object_id=key, survey="t", instrument="t", product="p", segments=[seg], frame="rest",
                    normalisation="flux", noise_known=noise_known)


def test_noise_drawn_from_an_error_array_has_its_sigma_scaled_to_the_flux_level():
    wave = np.linspace(5000.0, 5200.0, 4000)
    grid = CommonGrid(["full"], [wave])
    mask = np.ones(wave.size, bool)
    mask[1000:1100] = False  # a bad stretch the generated spectra must inherit
    # real spectrum: continuum 2, sigma 0.02 -> 1 % of the continuum
    real = _spectrum(wave, np.full(wave.size, 2.0), np.full(wave.size, 1 / 0.02**2), mask)
    for how in ("median", "continuum"):
        t = noise_templates(grid, [real], how)
        assert t.source == "error arrays" and t.median_snr == pytest.approx(100.0, rel=1e-4)
        assert np.nanmedian(t.sigma_rel) == pytest.approx(0.01, rel=1e-4)
        assert (t.good == mask).all()
        rng = np.random.default_rng(0)
        clean = np.array([np.full(wave.size, 1.0), np.full(wave.size, 3.0)])  # two flux levels
        noisy, good, index = add_instrument_noise(clean, clean, t, rng)
        assert (index == 0).all() and (good == mask).all() and np.isnan(noisy[:, 1000:1100]).all()
        # 1 % of each generated spectrum's own continuum: 0.01 and 0.03
        assert np.std(noisy[0, mask] - 1.0) == pytest.approx(0.01, rel=0.05)
        assert np.std(noisy[1, mask] - 3.0) == pytest.approx(0.03, rel=0.05)
        assert abs(np.mean(noisy[1, mask] - 3.0)) < 0.002


def test_each_generated_spectrum_takes_the_mask_and_sigma_of_its_template():
    sigma_rel = np.array([[0.1, 0.1, 0.1, 0.1], [0.001, 0.001, 0.001, 0.001]])
    good = np.array([[True, False, True, True], [True, True, True, False]])
    t = NoiseTemplates(np.where(good, sigma_rel, np.nan), good, "error arrays")
    flux = np.ones((2, 4))
    noisy, ok, index = add_instrument_noise(flux, 1.0, t, np.random.default_rng(1), index=np.array([1, 0]))
    assert (ok == good[[1, 0]]).all() and np.isnan(noisy[0, 3]) and np.isnan(noisy[1, 1])
    assert np.nanmax(np.abs(noisy[0] - 1)) < 0.01 and index.tolist() == [1, 0]


def test_der_snr_recovers_white_noise_and_products_without_errors_use_it_with_their_masks():
    rng = np.random.default_rng(2)
    wave = np.linspace(4000.0, 6000.0, 20000)
    smooth = 1.0 + 0.3 * (wave - 4000.0) / 2000.0
    flux = smooth + 0.02 * rng.normal(size=wave.size)
    assert der_snr_sigma(flux) == pytest.approx(0.02, rel=0.03)
    assert der_snr_sigma(smooth) == pytest.approx(0.0, abs=1e-9)  # a straight line has no noise
    assert np.isnan(der_snr_sigma(flux[:4]))
    # MILES-like: no error array (ivar 0), some masked pixels; the mask is kept, sigma from DER_SNR
    mask = rng.random(wave.size) > 0.1
    real = _spectrum(wave, 5.0 * flux, np.zeros(wave.size), mask, noise_known=False)
    t = noise_templates(CommonGrid(["full"], [wave]), [real], "median")
    assert t.source == "DER_SNR" and (t.good == mask).all()
    # sigma 5 * 0.02 over a median flux of about 5 * 1.15
    assert np.nanmedian(t.sigma_rel) == pytest.approx(0.1 / (5.0 * np.median(smooth)), rel=0.05)


def test_noise_added_to_generated_spectra_removes_the_classifiers_easy_win():
    """A generated set from the same population as the real one: without noise a classifier
    separates them (the noise biases the real spectra's pseudo-continuum), with the instrument's
    noise from the real error arrays it cannot."""
    rng = np.random.default_rng(0)
    wave = np.linspace(5000.0, 5400.0, 800)
    grid = CommonGrid(["full"], [wave])
    centres = rng.uniform(5005.0, 5395.0, 120)
    strength = rng.uniform(0.5, 1.0, (1, 120, 1))

    def population(n):
        depth = rng.uniform(0.2, 0.6, (n, 1, 1)) * strength
        lines = 1 - (depth * np.exp(-0.5 * ((wave - centres[None, :, None]) / 0.6) ** 2)).sum(axis=1).clip(0, 0.95)
        return lines * rng.uniform(50.0, 200.0, (n, 1)) * (1 + 0.3 * (wave - 5200.0) / 200.0)

    n, sn = 100, 20.0
    real_clean, generated = population(n), population(n)
    sigma = pseudo_continuum(grid, real_clean, np.ones(real_clean.shape, bool), "continuum") / sn
    real = [_spectrum(wave, f + s * rng.normal(size=wave.size), 1 / s**2, rng.random(wave.size) > 0.02, key=f"r{i}")
            for i, (f, s) in enumerate(zip(real_clean, sigma))]
    resampled = [grid.resample(s) for s in real]
    real_norm = pseudo_continuum_normalised(grid, np.stack([r[0] for r in resampled]),
                                            np.stack([r[2] for r in resampled]), "continuum")
    everywhere = np.ones(generated.shape, bool)
    clean_norm = pseudo_continuum_normalised(grid, generated, everywhere, "continuum")
    t = noise_templates(grid, real, "continuum", resampled)
    assert t.median_snr == pytest.approx(sn, rel=0.05)
    noisy, good, _ = add_instrument_noise(generated, pseudo_continuum(grid, generated, everywhere, "continuum"), t, rng)
    noisy_norm = pseudo_continuum_normalised(grid, noisy, good, "continuum")
    auc_clean = classifier_two_sample_test(real_norm, clean_norm, n_components=10)["auc"]
    auc_noisy = classifier_two_sample_test(real_norm, noisy_norm, n_components=10)["auc"]
    assert auc_clean > 0.9
    assert auc_noisy < 0.65 and auc_noisy < auc_clean - 0.3
