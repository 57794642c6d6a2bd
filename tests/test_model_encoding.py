"""Encodings of the wavelength coordinate (model/encoding.py): synthetic invariants, no survey files."""

from __future__ import annotations

import math

import pytest
import torch

from stellarfield.model.decoder import SpectrumDecoder
from stellarfield.model.encoding import (
    ENCODING_DEFAULTS,
    U_MAX,
    U_MIN,
    FourierFeatures,
    GridEncoding,
    HybridEncoding,
    encoding_arguments,
    make_encoding,
)

GRID = dict(levels=6, features=2, coarsest_step=2e-2, finest_step=1e-4)
FOURIER = dict(n_freq=8, w_min=1.0, w_max=1e3)


def test_hybrid_is_the_grid_and_the_fourier_features_side_by_side():
    torch.manual_seed(0)
    hybrid = HybridEncoding(**GRID, **FOURIER)
    grid, fourier = GridEncoding(**GRID), FourierFeatures(**FOURIER)
    grid.load_state_dict({k: v for k, v in hybrid.state_dict().items() if k.startswith("tables.")})
    u = torch.linspace(U_MIN + 0.1, U_MAX - 0.1, 257, dtype=torch.float64)
    sigma_u = torch.full_like(u, 4.2e-3)  # Gaia XP's LSF at R = 100
    for sigma in (None, sigma_u):
        expected = torch.cat([grid(u, sigma), fourier(u, sigma)], dim=1)
        assert torch.equal(hybrid(u, sigma), expected)
    assert hybrid.out_dim == grid.out_dim + fourier.out_dim == 6 * 2 + 2 * 8


def test_hybrid_band_limit_switches_off_fine_levels_and_high_frequencies():
    """At Gaia XP's LSF (sigma_u 4.2e-3) the grid levels with step < 0.4 sigma and the frequencies
    with w sigma > 2 give 0; at GALAH's (1.5e-5) everything is on."""
    hybrid = HybridEncoding(**GRID, **FOURIER)
    u = torch.linspace(U_MIN + 0.1, U_MAX - 0.1, 101, dtype=torch.float64)
    xp = hybrid(u, torch.full_like(u, 4.2e-3))
    galah = hybrid(u, torch.full_like(u, 1.5e-5))
    grid_on = [h >= 0.4 * 4.2e-3 for h in hybrid.steps]
    w_u = torch.logspace(0, 3, 8, dtype=torch.float64) * 2.0 / (U_MAX - U_MIN)
    freq_on = (w_u * 4.2e-3 <= 2.0).tolist()
    columns_on = [on for on in grid_on for _ in range(2)] + freq_on + freq_on
    assert 0 < sum(grid_on) < len(grid_on) and 0 < sum(freq_on) < len(freq_on)  # the case is a real test
    for column, on in enumerate(columns_on):
        assert bool(xp[:, column].abs().max() > 0) == on, column
    assert bool((galah.abs().amax(0) > 0).all())


def test_hybrid_tables_keep_their_names_for_sparse_updates_and_export():
    """SparseAdam and the float16 export find the grid tables by the name ``encoding.tables.*``."""
    dec = SpectrumDecoder(latent_dim=4, n_basis=8, trunk_hidden=(16,), branch_hidden=(8,), encoding="hybrid",
                          encoding_kwargs={**GRID, **FOURIER})
    names = [n for n, _ in dec.named_parameters() if ".tables." in n]
    assert len(names) == GRID["levels"] and all(n.startswith("trunk.encoding.tables.") for n in names)


@pytest.mark.parametrize("kind", sorted(ENCODING_DEFAULTS))
def test_gradients_reach_every_decoder_parameter(kind):
    torch.manual_seed(1)
    dec = SpectrumDecoder(latent_dim=4, n_basis=8, trunk_hidden=(16,), branch_hidden=(8,), encoding=kind,
                          encoding_kwargs=encoding_arguments(kind, None))
    u = torch.linspace(math.log(4000.0), math.log(9000.0), 300, dtype=torch.float64)
    flux = dec(torch.randn(3, 4), dec.basis(u))  # no band limit: every level and frequency on
    flux.square().sum().backward()
    for name, param in dec.named_parameters():
        assert param.grad is not None, name
        grad = param.grad.coalesce().values() if param.grad.is_sparse else param.grad
        assert grad.abs().sum() > 0, name


def test_unknown_encoding_and_arguments_are_named():
    with pytest.raises(ValueError, match="'wavelet'"):
        make_encoding("wavelet")
    with pytest.raises(ValueError, match="n_freq"):
        make_encoding("grid", n_freq=3)
    assert set(ENCODING_DEFAULTS["hybrid"]) == set(ENCODING_DEFAULTS["grid"]) | set(ENCODING_DEFAULTS["fourier"])
