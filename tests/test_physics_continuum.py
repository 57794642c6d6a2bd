"""Closed-form multiplicative continuum: Legendre design and weighted least squares.

The real-spectrum tests read an apStar file directly with astropy (facts from
``../shared/data/apogee/NOTES.md``, checked here): HDU1/HDU2 row 0 = combined flux/error on
lambda = 10**(4.179 + 6e-6 i) vacuum Angstrom; the green chip is pixels 3540-6107 of
2M14305591+0858023 (chip gaps are exactly 0).

Measured: a known degree-2 continuum (1.3, 0.2, -0.05) times the real green-chip spectrum is
recovered to 8e-7 absolute without noise (the bias of the 1e-6 relative ridge), and with the
file's own noise (seed 0) to within 2.0 formal sigma (sigma 1.7e-4 on the constant term), chi2_nu 0.998.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from astropy.io import fits

from stellarfield.physics.continuum import (SegmentedBasis, fit_multiplicative_continuum, fit_segment_continuum,
                                            legendre_design)

GREEN_CHIP = slice(3540, 6108)


def test_legendre_design_values():
    design = legendre_design(torch.tensor([10.0, 15.0, 20.0], dtype=torch.float64), 3)
    assert design.shape == (3, 4)
    expected = torch.tensor(
        [[1.0, -1.0, 1.0, -1.0], [1.0, 0.0, -0.5, 0.0], [1.0, 1.0, 1.0, 1.0]], dtype=torch.float64
    )  # P2 = (3t^2 - 1)/2, P3 = (5t^3 - 3t)/2
    torch.testing.assert_close(design, expected, rtol=0, atol=1e-15)


def test_legendre_columns_are_orthogonal_over_the_range():
    x = torch.linspace(15100.0, 17000.0, 20001, dtype=torch.float64)
    design = legendre_design(x, 3)
    gram = design.T @ design / x.numel()  # -> integral over [-1, 1] / 2 = diag(1, 1/3, 1/5, 1/7)
    torch.testing.assert_close(gram, torch.diag(torch.tensor([1.0, 1 / 3, 1 / 5, 1 / 7], dtype=torch.float64)), rtol=0, atol=2e-4)


def test_legendre_rows_use_their_own_range_and_accept_numpy():
    x = np.array([[0.0, 1.0, 2.0], [100.0, 300.0, 500.0], [7.0, 7.0, 7.0]])
    design = legendre_design(x, 2)
    assert design.dtype == torch.float64 and design.shape == (3, 3, 3)
    torch.testing.assert_close(design[0], design[1])
    torch.testing.assert_close(design[2], torch.tensor([[1.0, 0.0, -0.5]] * 3, dtype=torch.float64))  # no range: t = 0
    assert legendre_design([1, 2, 3], 0).dtype == torch.float64  # integers -> float64
    with pytest.raises(ValueError):
        legendre_design(x, -1)


@pytest.fixture(scope="module")
def green_chip(shared_data):
    path = shared_data / "apogee" / "apstar" / "apStar-r6-2M14305591+0858023.fits"
    with fits.open(path) as hdul:
        assert (hdul[1].header["CRVAL1"], hdul[1].header["CDELT1"]) == (4.179, 6e-6)
        flux = hdul[1].data[0].astype(np.float64)
        error = hdul[2].data[0].astype(np.float64)
    assert flux[3539] == 0 and flux[3540] > 0 and flux[6107] > 0 and flux[6108] == 0
    wave = 10.0 ** (4.179 + 6e-6 * np.arange(8575))
    return torch.from_numpy(wave[GREEN_CHIP]), torch.from_numpy(flux[GREEN_CHIP]), torch.from_numpy(error[GREEN_CHIP])


TRUE_COEFFS = torch.tensor([1.3, 0.2, -0.05], dtype=torch.float64)


def test_recovers_a_known_continuum_times_a_real_spectrum(green_chip):
    wave, model, error = green_chip
    design = legendre_design(wave, 2)
    data = model * (design @ TRUE_COEFFS)
    weight = 1.0 / error**2

    coeffs, continuum = fit_multiplicative_continuum(data, model, weight, design)
    torch.testing.assert_close(coeffs, TRUE_COEFFS, rtol=0, atol=2e-6)  # the 1e-6 ridge
    torch.testing.assert_close(continuum, design @ TRUE_COEFFS, rtol=2e-6, atol=0)

    # With the file's own noise (scaled by the continuum, as counts would be): within 4 formal sigma.
    noise = torch.from_numpy(np.random.default_rng(0).normal(size=data.numel())) * error * (design @ TRUE_COEFFS)
    noisy_weight = 1.0 / (error * (design @ TRUE_COEFFS)) ** 2
    coeffs, continuum = fit_multiplicative_continuum(data + noise, model, noisy_weight, design)
    basis = model[:, None] * design
    covariance = torch.linalg.inv(basis.T @ (noisy_weight[:, None] * basis))
    sigma = covariance.diagonal().sqrt()
    assert torch.all((coeffs - TRUE_COEFFS).abs() < 4 * sigma)
    assert sigma[0] < 1e-3
    chi2_nu = float((noisy_weight * (data + noise - model * continuum) ** 2).sum()) / (data.numel() - 3)
    assert 0.95 < chi2_nu < 1.05


def test_a_flux_calibrated_scale_is_a_degree_zero_fit(green_chip):
    wave, model, error = green_chip
    coeffs, continuum = fit_multiplicative_continuum(3.7 * model, model, 1.0 / error**2, legendre_design(wave, 0))
    assert coeffs.shape == (1,)
    assert float(coeffs[0]) == pytest.approx(3.7, rel=1e-6)


def test_masked_pixels_are_ignored_even_if_nan(green_chip):
    wave, model, error = green_chip
    design = legendre_design(wave, 2)
    data = model * (design @ TRUE_COEFFS)
    weight = 1.0 / error**2
    corrupted = data.clone()
    corrupted[100:400] = 1e6
    corrupted[900:950] = float("nan")
    masked_weight = weight.clone()
    masked_weight[100:400] = 0.0
    masked_weight[900:950] = 0.0
    coeffs, continuum = fit_multiplicative_continuum(corrupted, model, masked_weight, design)
    torch.testing.assert_close(coeffs, TRUE_COEFFS, rtol=0, atol=2e-6)
    assert torch.isfinite(continuum).all()


def test_batched_fit_equals_one_by_one(green_chip):
    wave, model, error = green_chip
    design = legendre_design(wave, 2)  # one (N, K) design shared by the batch
    truths = torch.tensor([[1.3, 0.2, -0.05], [0.7, -0.1, 0.02], [2.0, 0.0, 0.3]], dtype=torch.float64)
    data = model * (truths @ design.T)  # (3, N)
    weights = (1.0 / error**2).expand(3, -1).clone()
    weights[2, :1000] = 0.0
    coeffs, continuum = fit_multiplicative_continuum(data, model.expand(3, -1), weights, design)
    assert coeffs.shape == (3, 3) and continuum.shape == data.shape
    for b in range(3):
        single, _ = fit_multiplicative_continuum(data[b], model, weights[b], design)
        torch.testing.assert_close(coeffs[b], single, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(coeffs, truths, rtol=0, atol=5e-5)  # ridge; spectrum 2 lost 40% of its pixels


def test_fully_masked_segment_gives_continuum_one_not_nan():
    design = legendre_design(torch.linspace(5000.0, 5100.0, 50, dtype=torch.float64), 2)
    data = torch.full((2, 50), float("nan"), dtype=torch.float64)
    model = torch.ones(2, 50, dtype=torch.float64, requires_grad=True)
    coeffs, continuum = fit_multiplicative_continuum(data, model, torch.zeros(2, 50, dtype=torch.float64), design)
    torch.testing.assert_close(coeffs, torch.tensor([[1.0, 0.0, 0.0]] * 2, dtype=torch.float64))
    torch.testing.assert_close(continuum, torch.ones(2, 50, dtype=torch.float64))
    continuum.sum().backward()
    assert torch.isfinite(model.grad).all()


def test_fewer_good_pixels_than_coefficients_stays_finite():
    design = legendre_design(torch.linspace(0.0, 1.0, 20, dtype=torch.float64), 3)
    weight = torch.zeros(20, dtype=torch.float64)
    weight[5] = 1.0  # one good pixel, four coefficients
    coeffs, continuum = fit_multiplicative_continuum(2.0 * torch.ones(20, dtype=torch.float64), torch.ones(20, dtype=torch.float64), weight, design)
    assert torch.isfinite(coeffs).all()
    assert float(continuum[5]) == pytest.approx(2.0, rel=1e-4)  # fits the one pixel it sees


def test_fit_is_differentiable():
    generator = torch.Generator().manual_seed(0)
    design = legendre_design(torch.linspace(0.0, 1.0, 15, dtype=torch.float64), 2)
    data = 1.0 + 0.1 * torch.randn(2, 15, dtype=torch.float64, generator=generator)
    model = (1.0 + 0.1 * torch.randn(2, 15, dtype=torch.float64, generator=generator)).requires_grad_()
    weight = torch.rand(2, 15, dtype=torch.float64, generator=generator) + 0.5

    def residual(m, d):
        _, continuum = fit_multiplicative_continuum(d, m, weight, design)
        return d - m * continuum

    assert torch.autograd.gradcheck(residual, (model, data.requires_grad_()), fast_mode=True)


def test_float32_inputs_give_float32_results(green_chip):
    wave, model, error = green_chip
    design = legendre_design(wave.float(), 2)
    data = model.float() * (design @ TRUE_COEFFS.float())
    coeffs, continuum = fit_multiplicative_continuum(data, model.float(), (1.0 / error**2).float(), design)
    assert coeffs.dtype == torch.float32 and continuum.dtype == torch.float32
    torch.testing.assert_close(coeffs, TRUE_COEFFS.float(), rtol=1e-4, atol=1e-5)


def test_fluxes_in_physical_units_get_the_same_relative_precision(green_chip):
    """Data in erg/s/cm2/A (~1e-13, STELIB) against a model of order 1: the continuum carries the
    1e-13 and is as exact, relative to it, as for data of order 1 (the ridge must not pull to 1)."""
    wave, model, error = green_chip
    design = legendre_design(wave, 2)
    truth = design @ TRUE_COEFFS
    for unit in (1.0, 1e-13):
        _, continuum = fit_multiplicative_continuum(model * truth * unit, model, 1.0 / (error * unit) ** 2, design)
        torch.testing.assert_close(continuum / unit, truth, rtol=2e-6, atol=0)


# --- the per-segment fit (block design) the likelihood uses ------------------------------------
def _block_design(legendre, segment, n_segments):
    onehot = torch.nn.functional.one_hot(segment, n_segments).to(legendre.dtype)
    return (onehot[..., :, None] * legendre[..., None, :]).flatten(-2)


def _segmented_case(layout: str, degree: int = 2, seed: int = 0, chip: int = 20):
    """(data, model, weight, legendre (float32 values, as the likelihood's design), segment, mask) of
    3 spectra x 3 segments of ``chip`` pixels: "shared" (one grid, contiguous chips), "own" (each spectrum
    its own grid, the last one shorter: padding of segment 0 inside chip 2's columns, masked and NaN
    pixels, a fully masked segment), "interleaved" (segments mixed: the general path)."""
    g = torch.Generator().manual_seed(seed)
    b, n, s_count = 3, 3 * chip, 3
    segment = torch.arange(n).div(chip, rounding_mode="floor").expand(b, n).clone()
    x = torch.linspace(-1, 1, chip).repeat(3).expand(b, n).clone()
    pad = 2 * chip + chip // 2
    mask = torch.ones(b, n, dtype=torch.bool)
    if layout == "own":
        x = (x * (1 - 0.05 * torch.arange(b)[:, None]) + 0.01 * torch.arange(b)[:, None]).clamp(-1, 1)
        segment[2, pad:] = 0  # padding
        mask[2, pad:] = False
    if layout == "interleaved":
        segment = torch.randint(0, s_count, (b, n), generator=g)
    legendre = torch.stack([torch.special.legendre_polynomial_p(x.float(), k) for k in range(degree + 1)], -1)
    model = 1 + 0.3 * torch.rand(b, n, dtype=torch.float64, generator=g)
    data = model * (2 + 0.3 * x + 0.1 * x**2 + 0.5 * segment) * (1 + 0.01 * torch.randn(b, n, generator=g))
    weight = (0.5 + torch.rand(b, n, dtype=torch.float64, generator=g)) * mask
    if layout == "own":
        weight[0, 1:4] = 0.0
        data[0, 1:4] = float("nan")
        model[0, 2] = float("nan")
        weight[1, chip : 2 * chip] = 0.0  # spectrum 1: chip 1 fully masked
        weight[2, pad:] = 0.0
        data[2, pad:] = float("nan")
    return data, model, weight, legendre, segment, mask


@pytest.mark.parametrize("layout", ["shared", "own", "interleaved"])
@pytest.mark.parametrize("degree", [0, 1, 3])
def test_segment_fit_equals_the_dense_fit_on_the_block_design(layout, degree):
    data, model, weight, legendre, segment, mask = _segmented_case(layout, degree)
    basis = SegmentedBasis(legendre, segment, 3, mask)
    assert basis.shared == (layout == "shared")
    assert (basis.ranges is None) == (layout == "interleaved")
    if layout == "own":
        assert basis.irregular is not None and basis.intruders is not None  # the padding
    design = _block_design(legendre.double(), segment, 3)
    assert torch.equal(SegmentedBasis.from_design(design.float(), segment, 3).features["legendre"],
                       basis.features["legendre"])
    m_dense, m_fast = model.clone().requires_grad_(), model.clone().requires_grad_()
    w_dense, w_fast = weight.clone().requires_grad_(), weight.clone().requires_grad_()
    d_dense, d_fast = data.clone().requires_grad_(), data.clone().requires_grad_()
    c_dense, cont_dense = fit_multiplicative_continuum(d_dense, m_dense, w_dense, design)
    c_fast, cont_fast = fit_segment_continuum(d_fast, m_fast, w_fast, basis)
    torch.testing.assert_close(c_fast, c_dense, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cont_fast, cont_dense, rtol=1e-12, atol=1e-12)
    g = torch.Generator().manual_seed(1)
    probe_c, probe_k = torch.randn(cont_fast.shape, generator=g, dtype=torch.float64), torch.randn(c_fast.shape, generator=g, dtype=torch.float64)
    ((probe_c * cont_dense).sum() + (probe_k * c_dense).sum()).backward()
    ((probe_c * cont_fast).sum() + (probe_k * c_fast).sum()).backward()
    for fast, dense in ((m_fast, m_dense), (w_fast, w_dense), (d_fast, d_dense)):
        torch.testing.assert_close(fast.grad, dense.grad, rtol=1e-10, atol=1e-12)
        assert torch.isfinite(fast.grad).all()


def test_segment_fit_ridge_keeps_masked_segments_as_the_dense_fit():
    """Every pixel masked: coeffs (1, 0, ...) for the first block, continuum 1 there, as the dense fit
    (the ridge and its pull towards (s, 0, ..., 0) are the same code)."""
    data, model, weight, legendre, segment, mask = _segmented_case("own", 2)
    weight = torch.zeros_like(weight)
    design = _block_design(legendre.double(), segment, 3)
    c_dense, cont_dense = fit_multiplicative_continuum(data, model, weight, design)
    c_fast, cont_fast = fit_segment_continuum(data, model, weight, SegmentedBasis(legendre, segment, 3, mask))
    assert torch.equal(c_fast, c_dense) and torch.equal(cont_fast, cont_dense)
    torch.testing.assert_close(cont_fast[segment == 0], torch.ones_like(cont_fast[segment == 0]))


@pytest.mark.parametrize("layout", ["own", "interleaved"])
def test_segment_fit_has_exact_first_and_second_derivatives(layout):
    """gradcheck and gradgradcheck (GON's nested gradient differentiates the loss gradient again)."""
    data, model, weight, legendre, segment, mask = _segmented_case(layout, 1, chip=12)  # >= 2 pixels per block
    keep = weight > 0
    data, model = torch.where(keep, data, 1.0), torch.where(keep, model, 1.0)
    weight = torch.where(keep, weight, 1.0) * mask  # no pixel near the w = 0 switch, except the padding
    basis = SegmentedBasis(legendre, segment, 3, mask)

    def fit(d, m, w):
        coeffs, continuum = fit_segment_continuum(d, m, w, basis)
        return coeffs, d - m * continuum

    inputs = tuple(t.clone().requires_grad_() for t in (data, model, weight))
    inputs[2].requires_grad_(False)
    assert torch.autograd.gradcheck(fit, inputs)
    assert torch.autograd.gradgradcheck(fit, inputs, fast_mode=True)
