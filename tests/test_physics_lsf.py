"""Gaussian LSF in u = ln(lambda): widths, the fast uniform-grid blur, and the direct reference.

The real-spectrum tests read a MILES file directly with astropy (facts from
``../shared/data/miles/NOTES.md``, checked here): one PrimaryHDU of 4300 float64 pixels,
lambda = 3540.5 + 0.9 i Angstrom in AIR (converted to vacuum with physics.air_vacuum), FWHM = 2.5 A.
The star is Arcturus (m0501).

Measured on this machine (Arcturus, vacuum, resampled by linear interpolation onto a grid uniform
in u with the finest native step, 1.215e-4):
* fast blur vs convolve_direct on that grid: max pointwise relative difference 6.0e-5 at R = 1000
  (sigma 3.5 px, conv1d) and 5.4e-5 at R = 50 (sigma 70 px, FFT) -- the 4-sigma truncation of the
  fast kernel (Gaussian mass 6.3e-5 beyond);
* the sum of the flux over the grid changes by 1.5e-6 (R = 1000) and 4.8e-5 (R = 50): the edges only;
* convolve_direct on the NATIVE grid (linear in lambda) vs the fast blur on the uniform grid
  interpolated back, at R = 300: median 5e-5, max 2.0e-3 (at the Ca II H and K cores); the max
  stays at 1.2e-3 however fine the uniform grid, so it is the two discretisations of MILES's
  marginally sampled lines (2.8 px per FWHM), not the blur. At R = 1000 the same max is 1.0e-2.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from astropy.io import fits

from stellarfield.physics.air_vacuum import air_to_vacuum
from stellarfield.physics.doppler import C_KMS
from stellarfield.physics.lsf import (
    FWHM_PER_SIGMA,
    MIN_SIGMA_PIXELS,
    convolve_direct,
    fwhm_to_sigma_u,
    gaussian_blur_uniform,
    gaussian_kernel,
    resolution_to_sigma_u,
)

# --------------------------------------------------------------------------------------------
# Widths
# --------------------------------------------------------------------------------------------


def test_fwhm_per_sigma():
    assert FWHM_PER_SIGMA == pytest.approx(2.354820045, abs=1e-9)


def test_resolution_to_sigma_u_values():
    # APOGEE, R = 22,500: FWHM = c / R = 13.32 km/s, sigma = 5.66 km/s.
    sigma_u = resolution_to_sigma_u(22500.0)
    assert sigma_u == pytest.approx(1.8874e-5, rel=1e-4)
    assert C_KMS * sigma_u * FWHM_PER_SIGMA == pytest.approx(C_KMS / 22500.0, rel=1e-12)
    assert C_KMS * sigma_u == pytest.approx(5.658, abs=1e-3)
    # Works on arrays and tensors alike.
    np.testing.assert_allclose(resolution_to_sigma_u(np.array([50.0, 28000.0])), [8.4932e-3, 1.5166e-5], rtol=1e-4)
    torch.testing.assert_close(resolution_to_sigma_u(torch.tensor([2000.0])), torch.tensor([2.1233e-4]), rtol=1e-4, atol=0)


def test_fwhm_to_sigma_u_is_resolution_at_that_wavelength():
    # MILES: 2.5 A FWHM at 5000 A is R = 2000.
    assert fwhm_to_sigma_u(2.5, 5000.0) == pytest.approx(resolution_to_sigma_u(2000.0), rel=1e-14)
    wave = np.array([3540.5, 5000.0, 7409.6])
    np.testing.assert_allclose(fwhm_to_sigma_u(2.5, wave), resolution_to_sigma_u(wave / 2.5), rtol=1e-14)


def test_kernel_is_normalised_and_has_the_right_width():
    kernel = gaussian_kernel(5.0)
    assert kernel.size == 2 * 20 + 1
    assert kernel.sum() == pytest.approx(1.0, abs=1e-15)
    offsets = np.arange(-20, 21)
    assert np.sum(kernel * offsets**2) == pytest.approx(25.0, rel=2e-3)  # variance sigma^2 (cut at 4 sigma)


# --------------------------------------------------------------------------------------------
# The fast blur on synthetic data
# --------------------------------------------------------------------------------------------


def _absorption_line(n: int, centre: float, width: float, depth: float) -> np.ndarray:
    x = np.arange(n, dtype=np.float64)
    return 1.0 - depth * np.exp(-0.5 * ((x - centre) / width) ** 2)


@pytest.mark.parametrize("method", ["conv", "fft"])
def test_blurred_line_matches_the_analytic_convolution(method):
    """A Gaussian line of width s0 blurred by sigma is a Gaussian of width sqrt(s0^2 + sigma^2) with
    the same equivalent width; the sampled kernel reproduces it to its 4-sigma truncation (< 1e-4)."""
    n, s0, sigma = 2001, 3.0, 4.0
    line = _absorption_line(n, 1000.3, s0, 0.8)
    blurred = gaussian_blur_uniform(torch.from_numpy(line), sigma, method=method).numpy()
    s1 = math.hypot(s0, sigma)
    expected = _absorption_line(n, 1000.3, s1, 0.8 * s0 / s1)
    assert np.abs(blurred - expected).max() < 1e-4
    # Flux (equivalent width) is conserved exactly away from the edges.
    assert np.sum(1.0 - blurred) == pytest.approx(np.sum(1.0 - line), rel=1e-12)


@pytest.mark.parametrize("method", ["conv", "fft"])
def test_constant_stays_constant_up_to_the_edges(method):
    values = torch.full((3, 257), 2.5, dtype=torch.float64)
    blurred = gaussian_blur_uniform(values, 11.0, method=method)
    torch.testing.assert_close(blurred, values, rtol=1e-14, atol=0)


def test_a_delta_keeps_its_flux_and_gets_the_kernel_shape():
    values = torch.zeros(301, dtype=torch.float64)
    values[150] = 1.0
    blurred = gaussian_blur_uniform(values, 6.0).numpy()
    assert blurred.sum() == pytest.approx(1.0, abs=1e-14)
    np.testing.assert_allclose(blurred[126:175], gaussian_kernel(6.0), rtol=1e-12)
    assert blurred[149] == blurred[151]  # symmetric: no half-pixel shift


def test_fft_and_conv1d_agree():
    values = torch.randn(4, 1000, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for sigma in (2.0, 40.0):
        conv = gaussian_blur_uniform(values, sigma, method="conv")
        fft = gaussian_blur_uniform(values, sigma, method="fft")
        torch.testing.assert_close(conv, fft, rtol=0, atol=1e-12)


def test_blurs_along_any_axis_with_batch_axes():
    values = torch.randn(2, 500, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    along_1 = gaussian_blur_uniform(values, 3.0, dim=1)
    assert along_1.shape == values.shape
    for i in range(2):
        for j in range(3):
            torch.testing.assert_close(along_1[i, :, j], gaussian_blur_uniform(values[i, :, j], 3.0), rtol=0, atol=1e-14)
    torch.testing.assert_close(gaussian_blur_uniform(values.transpose(1, 2), 3.0), along_1.transpose(1, 2))


def test_float32_follows_float64():
    values = torch.from_numpy(_absorption_line(4000, 2000.0, 2.0, 0.9))
    blurred64 = gaussian_blur_uniform(values, 3.7)
    blurred32 = gaussian_blur_uniform(values.float(), 3.7)
    assert blurred32.dtype == torch.float32
    assert (blurred32.double() - blurred64).abs().max() < 1e-6


def test_narrow_kernels_are_a_no_op_and_bad_widths_are_refused():
    values = torch.randn(10)
    assert gaussian_blur_uniform(values, 0.0) is values
    assert gaussian_blur_uniform(values, MIN_SIGMA_PIXELS * 0.99) is values
    assert not torch.equal(gaussian_blur_uniform(values, 1.0), values)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="sigma_pixels"):
            gaussian_blur_uniform(values, bad)
    with pytest.raises(ValueError, match="method"):
        gaussian_blur_uniform(values, 2.0, method="spline")


def test_blur_is_differentiable():
    values = torch.randn(2, 12, dtype=torch.float64, requires_grad=True)
    for method in ("conv", "fft"):
        assert torch.autograd.gradcheck(lambda x: gaussian_blur_uniform(x, 1.5, method=method), (values,), fast_mode=True)


# --------------------------------------------------------------------------------------------
# The direct reference
# --------------------------------------------------------------------------------------------


def test_direct_convolution_on_a_non_uniform_grid_matches_the_analytic_result():
    """A well-sampled Gaussian line in u on a grid linear in lambda (MILES-like, so non-uniform in u):
    convolve_direct gives the analytic Gaussian of width sqrt(s0^2 + sigma^2) to < 1e-5."""
    wave = 3540.5 + 0.9 * np.arange(4300)
    u = np.log(wave)
    u0, s0, sigma = math.log(5000.0), 6e-4, resolution_to_sigma_u(1000.0)
    line = 1.0 - 0.7 * np.exp(-0.5 * ((u - u0) / s0) ** 2)
    s1 = math.hypot(s0, sigma)
    expected = 1.0 - 0.7 * (s0 / s1) * np.exp(-0.5 * ((u - u0) / s1) ** 2)
    assert np.abs(convolve_direct(wave, line, sigma) - expected).max() < 1e-5


def test_direct_convolution_batches_and_accepts_a_per_pixel_width():
    wave = np.geomspace(4700.0, 4900.0, 800)
    flux = np.stack([_absorption_line(800, 400.0, 3.0, 0.5), _absorption_line(800, 200.0, 1.0, 0.9)])
    sigma = resolution_to_sigma_u(20000.0)
    both = convolve_direct(wave, flux, sigma)
    np.testing.assert_allclose(both[1], convolve_direct(wave, flux[1], sigma), rtol=0, atol=1e-15)
    np.testing.assert_allclose(convolve_direct(wave, flux, np.full(800, sigma)), both, rtol=0, atol=1e-15)
    # A wider LSF over half of the grid blurs a line there more (lower depth).
    wider = np.where(np.arange(800) < 300, 3 * sigma, sigma)
    assert convolve_direct(wave, flux[1], wider)[200] > both[1, 200] + 0.1
    with pytest.raises(ValueError, match="increasing"):
        convolve_direct(wave[::-1], flux, sigma)


# --------------------------------------------------------------------------------------------
# A real MILES spectrum
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def arcturus(shared_data):
    path = shared_data / "miles" / "MILES_res2.50_star_m0501V.fits"
    with fits.open(path) as hdul:
        assert len(hdul) == 1
        header = hdul[0].header
        assert (header["CRVAL1"], header["CDELT1"], header["NAXIS1"], header["FWHM"]) == (3540.5, 0.9, 4300, 2.5)
        flux = hdul[0].data.astype(np.float64)
    wave_vac = air_to_vacuum(3540.5 + 0.9 * np.arange(4300))
    return wave_vac, flux


def _on_uniform_u_grid(wave, flux):
    u = np.log(wave)
    step = np.diff(u).min()  # 1.215e-4 at the red end
    u_grid = np.arange(u[0], u[-1] + step / 2, step)
    return u_grid, step, np.interp(u_grid, u, flux)


@pytest.mark.parametrize("resolution", [1000.0, 50.0])
def test_fast_blur_matches_direct_convolution_on_miles(arcturus, resolution):
    """Arcturus on a uniform u grid: fast blur == convolve_direct to < 1e-4 pointwise (measured
    6.0e-5 at R = 1000, conv1d, 3.5 px; 5.4e-5 at R = 50, FFT, 70 px), flux sum to < 1e-4."""
    wave, flux = arcturus
    u_grid, step, values = _on_uniform_u_grid(wave, flux)
    assert step == pytest.approx(1.215e-4, rel=1e-3)
    sigma_u = resolution_to_sigma_u(resolution)
    fast = gaussian_blur_uniform(torch.from_numpy(values), sigma_u / step).numpy()
    direct = convolve_direct(np.exp(u_grid), values, sigma_u)
    assert np.max(np.abs(fast - direct) / np.abs(direct)) < 1e-4
    assert abs(fast.sum() / values.sum() - 1.0) < 1e-4
    # The blur did something: the Ca II K core (3934.8 A vacuum) fills in.
    k_core = np.argmin(np.abs(np.exp(u_grid) - 3934.8))
    assert fast[k_core] > 1.2 * values[k_core]


def test_uniform_grid_blur_matches_direct_convolution_on_the_native_miles_grid(arcturus):
    """R = 300: convolve_direct on MILES's own grid (linear in lambda) vs the fast blur on the
    uniform u grid, linearly interpolated back: median 5e-5, max 2.0e-3 (Ca II H, K cores).
    Edges (5 sigma) excluded."""
    wave, flux = arcturus
    u_grid, step, values = _on_uniform_u_grid(wave, flux)
    sigma_u = resolution_to_sigma_u(300.0)
    fast = gaussian_blur_uniform(torch.from_numpy(values), sigma_u / step).numpy()
    direct_native = convolve_direct(wave, flux, sigma_u)
    u = np.log(wave)
    interior = (u > u[0] + 5 * sigma_u) & (u < u[-1] - 5 * sigma_u)
    relative = np.abs(np.interp(u, u_grid, fast) - direct_native)[interior] / direct_native[interior]
    assert np.median(relative) < 1e-4
    assert relative.max() < 3e-3
