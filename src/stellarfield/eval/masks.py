"""Observed-frame bands excluded from every reconstruction score (the same for model and baselines).

Telluric absorption is fixed in the observed frame: it does not move with the star. The bands are
the product's ``telluric_bands_A`` (:class:`~stellarfield.io.profile.ProductProfile`, the same the
instruments mask in training): the O2 A band in GALAH's CCD4
(:data:`~stellarfield.io.profile.O2_A_BAND_VACUUM_A`). Without masking it a CCD4 chi2 measures the
atmosphere, not the star.

For a rest-frame record the band is moved to the rest frame with the record's own RV label
(``lambda_rest = lambda_obs / (1 + v/c)``, the convention of :mod:`stellarfield.physics.doppler`);
when the RV is unknown the band is widened by +-``unknown_rv_margin_kms`` instead. The RV label is
used only to place this mask, never as an input to a fit.
"""

from __future__ import annotations

import numpy as np

from stellarfield.eval.normalise import with_pixels
from stellarfield.io.registry import product_profile
from stellarfield.physics.doppler import rest_wavelength
from stellarfield.spectrum import Spectrum


def observed_frame_bands(product: str) -> tuple[tuple[float, float], ...]:
    """Observed-frame bands (vacuum A) masked for ``product``: its profile's telluric bands (none
    for a product without a profile)."""
    profile = product_profile(product)
    return profile.telluric_bands_A if profile else ()


def observed_frame_band_mask(spectrum: Spectrum, unknown_rv_margin_kms: float = 500.0) -> np.ndarray:
    """Per-pixel bool over all segments (concatenated): True where the pixel is NOT in a masked band."""
    wave = spectrum.wavelength
    keep = np.ones(wave.shape, dtype=bool)
    bands = observed_frame_bands(spectrum.product)
    if not bands:
        return keep
    if spectrum.frame == "rest":
        rv = spectrum.label("rv_kms")
        # Known RV: the band's rest-frame position; unknown: cover every RV within +-margin.
        v_lo, v_hi = (rv, rv) if np.isfinite(rv) else (unknown_rv_margin_kms, -unknown_rv_margin_kms)
    else:
        v_lo = v_hi = 0.0
    for lo, hi in bands:
        keep &= ~((wave >= rest_wavelength(lo, v_lo)) & (wave <= rest_wavelength(hi, v_hi)))
    return keep


def apply_observed_frame_masks(spectrum: Spectrum, unknown_rv_margin_kms: float = 500.0) -> Spectrum:
    """A copy of ``spectrum`` with the pixels of :func:`observed_frame_bands` set bad (mask False, ivar 0)."""
    keep = observed_frame_band_mask(spectrum, unknown_rv_margin_kms)
    if keep.all():
        return spectrum
    return with_pixels(spectrum, spectrum.flux, np.where(keep, spectrum.ivar, 0.0), spectrum.mask & keep)
