"""Linear resampling of a spectrum onto another wavelength grid, with its errors carried through.

Only the baselines need this (PCA wants every spectrum of a product on one grid); the generative
model never resamples data, it evaluates itself on the native pixels.

Each new pixel at ``x`` between old pixels ``i`` and ``i + 1`` is the linear interpolation

    f(x) = (1 - w) f_i + w f_{i+1},        w = (x - x_i) / (x_{i+1} - x_i)  in [0, 1),

so, for independent pixel errors, its variance is the sum of the squared weights times the old
variances (standard propagation of errors for a linear combination):

    var(x) = (1 - w)^2 var_i + w^2 var_{i+1}.

A new pixel is bad (mask False, ivar 0) when any old pixel with a nonzero weight is bad, and has
ivar 0 when any contributing pixel has ivar 0 (unknown noise); it is also bad outside the old
grid's range (no extrapolation). Neighbouring new pixels share old pixels, so their errors are
correlated: a chi2 on the new grid has fewer effective degrees of freedom than pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class LinearWeights:
    """Where each new pixel falls on the old grid: ``left`` index, weight ``w`` of ``left + 1``.

    ``inside`` is False for new pixels outside ``[x_old[0], x_old[-1]]``.
    """

    left: np.ndarray
    w: np.ndarray
    inside: np.ndarray


def linear_weights(x_old: np.ndarray, x_new: np.ndarray) -> LinearWeights:
    """Interpolation weights from the strictly increasing grid ``x_old`` to the points ``x_new``."""
    x_old = np.asarray(x_old, dtype=np.float64)
    x_new = np.asarray(x_new, dtype=np.float64)
    if x_old.size < 2:
        raise ValueError("need at least two old pixels to interpolate")
    left = np.clip(np.searchsorted(x_old, x_new, side="right") - 1, 0, x_old.size - 2)
    w = (x_new - x_old[left]) / (x_old[left + 1] - x_old[left])
    # Relative tolerance so a new grid equal to the old one (up to rounding) is an exact copy.
    tol = 1e-9 * np.abs(x_old[-1] - x_old[0])
    inside = (x_new >= x_old[0] - tol) & (x_new <= x_old[-1] + tol)
    w = np.clip(w, 0.0, 1.0)
    # Snap weights within rounding of a pixel centre, so an identical grid copies pixels exactly.
    w = np.where(w < 1e-9, 0.0, np.where(w > 1 - 1e-9, 1.0, w))
    return LinearWeights(left=left, w=w, inside=inside)


def interpolate(weights: LinearWeights, values: np.ndarray) -> np.ndarray:
    """Linear interpolation of ``values`` (..., P_old) to the new points; NaN outside the old range."""
    values = np.asarray(values, dtype=np.float64)
    out = (1.0 - weights.w) * values[..., weights.left] + weights.w * values[..., weights.left + 1]
    return np.where(weights.inside, out, np.nan)


def resample_linear(
    wavelength: np.ndarray,
    flux: np.ndarray,
    ivar: np.ndarray,
    mask: np.ndarray,
    new_wavelength: np.ndarray,
    noise_known: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Resample one segment onto ``new_wavelength``; return ``(flux, ivar, mask)`` there.

    ``wavelength`` and ``new_wavelength`` are in the same units and frame (e.g. vacuum Angstrom,
    rest frame). Bad pixels are those with ``mask`` False; with ``noise_known`` True a pixel with
    ``ivar == 0`` is bad as well. With ``noise_known`` False (MILES) ivar is 0 everywhere and only
    the mask is carried. Outside the old range: flux 0, ivar 0, mask False.
    """
    flux = np.asarray(flux, dtype=np.float64)
    ivar = np.asarray(ivar, dtype=np.float64)
    good = np.asarray(mask, dtype=bool) & np.isfinite(flux)
    if noise_known:
        good &= np.isfinite(ivar) & (ivar > 0)
    weights = linear_weights(wavelength, new_wavelength)
    left, right, w = weights.left, weights.left + 1, weights.w

    clean_flux = np.where(good, flux, 0.0)  # bad pixels never leak NaN into a good neighbour's value
    new_flux = (1.0 - w) * clean_flux[left] + w * clean_flux[right]
    # A pixel contributes when its weight is nonzero; any bad contributor makes the new pixel bad.
    new_good = weights.inside & ((w == 1.0) | good[left]) & ((w == 0.0) | good[right])

    if noise_known:
        var = np.where(good, 1.0 / np.where(good, ivar, 1.0), np.inf)
        new_var = (1.0 - w) ** 2 * np.where(w < 1.0, var[left], 0.0) + w**2 * np.where(w > 0.0, var[right], 0.0)
        new_ivar = np.where(new_good, 1.0 / np.where(new_good, new_var, 1.0), 0.0)
        # A new pixel on an old pixel centre keeps that pixel's ivar bit for bit (no 1/(1/x) rounding).
        new_ivar = np.where(new_good & (w == 0.0), ivar[left], np.where(new_good & (w == 1.0), ivar[right], new_ivar))
    else:
        new_ivar = np.zeros_like(new_flux)
    new_flux = np.where(new_good, new_flux, 0.0)
    return new_flux, new_ivar, new_good
