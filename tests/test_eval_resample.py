"""Resampling with error propagation, common grids, normalisation and observed-frame masks."""

from __future__ import annotations

import numpy as np
import pytest

from stellarfield.eval.common_grid import CommonGrid
from stellarfield.eval.masks import apply_observed_frame_masks, observed_frame_band_mask
from stellarfield.eval.normalise import normalise
from stellarfield.eval.resample import resample_linear
from stellarfield.spectrum import Segment, Spectrum


def test_identical_grid_copies_pixels_exactly():
    rng = np.random.default_rng(0)
    w = np.linspace(5000.0, 5100.0, 401)
    f, ivar = rng.normal(1, 0.1, w.size), rng.uniform(10, 100, w.size)
    mask = rng.random(w.size) > 0.1
    nf, niv, nm = resample_linear(w, f, ivar, mask, w.copy())
    assert np.array_equal(nm, mask)
    assert np.array_equal(nf[mask], f[mask]) and np.array_equal(niv[mask], ivar[mask])
    assert np.all(niv[~mask] == 0)


def test_midpoint_variance_is_a_quarter_of_each_neighbour():
    w = np.array([1.0, 2.0, 3.0])
    var = np.array([4.0, 1.0, 9.0])
    f, ivar, mask = resample_linear(w, [1.0, 3.0, 7.0], 1.0 / var, np.ones(3, bool), np.array([1.5, 2.25]))
    assert f == pytest.approx([2.0, 4.0])  # 0.5*1 + 0.5*3; 0.75*3 + 0.25*7
    # var = (1-w)^2 var_i + w^2 var_{i+1}
    assert 1.0 / ivar == pytest.approx([0.25 * 4 + 0.25 * 1, 0.75**2 * 1 + 0.25**2 * 9])
    assert mask.all()


def test_propagated_variance_matches_monte_carlo():
    rng = np.random.default_rng(1)
    w = np.linspace(6000.0, 6010.0, 200)
    sigma = rng.uniform(0.01, 0.1, w.size)
    new_w = np.sort(rng.uniform(w[0], w[-1], 150))
    draws = []
    for _ in range(4000):
        f, ivar, _ = resample_linear(w, sigma * rng.normal(size=w.size), 1 / sigma**2, np.ones(w.size, bool), new_w)
        draws.append(f)
    empirical = np.var(np.array(draws), axis=0)
    predicted = 1.0 / ivar
    # 4000 draws: the sample variance has a relative error of sqrt(2/4000) = 2.2% per pixel.
    assert np.median(np.abs(empirical / predicted - 1)) < 0.03
    assert np.all(np.abs(empirical / predicted - 1) < 0.12)


def test_bad_pixels_spoil_their_neighbours_only_when_they_contribute():
    w = np.arange(10.0)
    mask = np.ones(10, bool)
    mask[4] = False
    f, ivar, good = resample_linear(w, np.ones(10), np.ones(10), mask, np.array([3.0, 3.5, 4.5, 5.0, 9.5, 12.0]))
    # 3.0 sits on good pixel 3 (weight of pixel 4 is 0); 3.5 and 4.5 use the bad pixel 4; 5.0 on pixel 5;
    # 9.5 and 12.0 lie beyond the last pixel (no extrapolation).
    assert good.tolist() == [True, False, False, True, False, False]
    assert np.all(ivar[~good] == 0) and np.all(f[~good] == 0)


def test_linear_function_is_resampled_exactly_and_unknown_noise_stays_unknown():
    w = np.linspace(4000.0, 4100.0, 300)
    new_w = np.linspace(4001.0, 4099.0, 517)
    f, ivar, good = resample_linear(w, 2.0 + 0.01 * w, np.zeros(w.size), np.ones(w.size, bool), new_w, noise_known=False)
    assert np.allclose(f, 2.0 + 0.01 * new_w, rtol=0, atol=1e-10)
    assert good.all() and np.all(ivar == 0)


def _spectrum(product, waves, fluxes, ivars=None, frame="rest", survey="TEST", rv=None, noise_known=True):
    segments = []
    for i, (w, f) in enumerate(zip(waves, fluxes)):
        iv = np.full(w.size, 100.0) if ivars is None else ivars[i]
        segments.append(Segment(f"seg{i}", w, f, iv, np.ones(w.size, bool)))
    labels = {} if rv is None else {"rv_kms": rv}
    return Spectrum("star", survey, "X", product, segments, frame, "flux", labels=labels, noise_known=noise_known)


def test_common_grid_takes_the_median_grid_and_maps_back_to_native():
    starts = [5000.0, 5000.2, 5000.4, 5000.1, 5000.3]
    spectra = [
        _spectrum("p", [np.linspace(s, s + 100, 1001), np.linspace(s + 200, s + 300, 801)], [np.ones(1001), np.ones(801)])
        for s in starts
    ]
    grid = CommonGrid.from_spectra(spectra)
    assert grid.segment_names == ["seg0", "seg1"]
    assert grid.segment_wavelengths[0][0] == 5000.2  # the median start; a real spectrum's own grid
    assert grid.n_pixels == 1802 and grid.segment_slices["seg1"] == slice(1001, 1802)
    # A smooth function on the grid, taken to another spectrum's native pixels, stays that function.
    values = np.sin(grid.wavelength / 30.0)
    native = grid.to_native(values, spectra[0])
    inside = np.isfinite(native)
    assert inside.sum() == 1001 - 2 + 801 - 2  # 0.2 A of each segment start lies below the grid
    assert np.allclose(native[inside], np.sin(spectra[0].wavelength[inside] / 30.0), atol=1e-4)
    # The spectrum that owns the grid is copied exactly.
    flux, ivar, mask = grid.resample(spectra[1])
    assert mask.all() and np.all(ivar == 100.0)


def test_normalise_by_median_keeps_chi2_and_sets_median_to_one():
    w = np.linspace(4000, 5000, 500)
    s = _spectrum("p", [w], [np.full(500, 250.0) + np.linspace(0, 10, 500)], ivars=[np.full(500, 0.04)])
    n = normalise(s, "median")
    assert np.median(n.flux) == pytest.approx(1.0)
    # (d - m)^2 ivar is unchanged when data and model are divided by the same number.
    scale = np.median(s.flux)
    assert np.allclose(n.ivar, s.ivar * scale**2)
    assert normalise(s, "none") is s and s.flux[0] == 250.0  # the input is never modified


def test_continuum_normalisation_flattens_a_sloped_continuum_with_a_line():
    w = np.linspace(6000, 7000, 2001)
    continuum = 100.0 + 0.05 * (w - 6000)
    flux = continuum * (1 - 0.5 * np.exp(-0.5 * ((w - 6500) / 1.0) ** 2))
    n = normalise(_spectrum("p", [w], [flux]), "continuum", continuum_window_A=100.0)
    far = np.abs(w - 6500) > 10
    # A line's few depressed pixels move a running median on a slope by a pixel or two: < 0.5%.
    assert np.allclose(n.flux[far], 1.0, atol=5e-3)
    assert n.flux[np.argmin(np.abs(w - 6500))] == pytest.approx(0.5, abs=0.01)
    assert n.normalisation == "continuum"


def test_galah_o2_band_is_masked_in_the_observed_frame_and_moved_to_the_rest_frame():
    w = np.linspace(7580.0, 7720.0, 1401)
    observed = _spectrum("galah_dr3_observed", [w], [np.ones(w.size)], frame="observed", survey="GALAH")
    keep = observed_frame_band_mask(observed)
    assert not keep[(w >= 7592) & (w <= 7702)].any() and keep[(w < 7592) | (w > 7702)].all()
    # Rest frame, star receding at 300 km/s: the band sits at 7592/(1 + 300/c) = 7584.41 A ...
    rest = _spectrum("galah_dr3", [w], [np.ones(w.size)], frame="rest", survey="GALAH", rv=300.0)
    keep = observed_frame_band_mask(rest)
    assert not keep[(w >= 7584.5) & (w <= 7694.2)].any() and keep[(w > 7694.4)].all()
    # ... and with an unknown RV it is widened to cover +-500 km/s.
    unknown = _spectrum("galah_dr3", [w], [np.ones(w.size)], frame="rest", survey="GALAH")
    keep = observed_frame_band_mask(unknown)
    assert not keep[(w >= 7580) & (w <= 7714)].any()
    masked = apply_observed_frame_masks(observed)
    assert masked.segments[0].ivar[700] == 0 and not masked.segments[0].mask[700] and observed.segments[0].mask[700]
    # Other surveys are untouched.
    assert observed_frame_band_mask(_spectrum("x", [w], [np.ones(w.size)])).all()


def test_real_galah_dr3_ccd4_loses_the_o2_band(shared_data):
    from stellarfield.io import read_spectra

    records = {r.product: r for r in read_spectra(shared_data / "galah" / "dr3" / "1403100038010494.fits")}
    rest = records["galah_dr3"]  # rv_kms 54.5 from the file's two WCSs
    ccd4 = rest.segments[3]
    start = sum(s.n_pixels for s in rest.segments[:3])
    keep = observed_frame_band_mask(rest)[start:]
    masked_w = ccd4.wavelength[~keep]
    shift = 1 + rest.label("rv_kms") / 299792.458
    assert masked_w.min() == pytest.approx(7592.0 / shift, abs=0.08)  # one pixel is 0.074 A
    assert masked_w.max() == pytest.approx(7702.0 / shift, abs=0.08)
    assert 0.35 < (~keep).mean() < 0.38  # 110 A of CCD4's 301 A
