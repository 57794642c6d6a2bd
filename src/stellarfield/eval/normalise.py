"""Per-spectrum normalisations applied before a baseline is fitted (never to the model's inputs).

Flux-like products (LAMOST relative flux, APOGEE apStar, GALAH observed counts) differ from star to
star by an overall scale (distance, exposure, throughput) that a PCA would otherwise spend its first
components on. Two choices, each a division of the flux by a positive per-spectrum array ``s`` with
``ivar`` multiplied by ``s**2`` (so ``(data - model)**2 * ivar`` is unchanged by the division):

* ``"median"``: ``s`` = the median of the good pixels' flux over all segments (a scalar);
* ``"continuum"``: ``s`` = a pseudo-continuum per segment, the running median of the good pixels
  over ``continuum_window_A`` Angstrom (a median follows the upper envelope only roughly: it sits
  below the true continuum where lines are dense, the same way for every spectrum of a product);
* ``"none"``: unchanged.
"""

from __future__ import annotations

import copy

import numpy as np
from scipy.ndimage import median_filter

from stellarfield.spectrum import Spectrum

NORMALISATIONS = ("none", "median", "continuum")


def _good(segment) -> np.ndarray:
    return segment.mask & np.isfinite(segment.flux)


def spectrum_median(spectrum: Spectrum) -> float:
    """Median flux of the good pixels over all segments (NaN if there are none)."""
    values = np.concatenate([s.flux[_good(s)] for s in spectrum.segments])
    return float(np.median(values)) if values.size else float("nan")


def running_median_continuum(wavelength: np.ndarray, flux: np.ndarray, good: np.ndarray, window_A: float) -> np.ndarray:
    """Pseudo-continuum of one segment: running median of the good pixels over ``window_A`` Angstrom.

    The window is converted to a pixel count with the segment's median pixel step; bad pixels are
    skipped (the filter runs over the good pixels only) and the result is linearly interpolated back
    to every pixel. All NaN when the segment has fewer than 3 good pixels.
    """
    wavelength = np.asarray(wavelength, dtype=np.float64)
    flux = np.asarray(flux, dtype=np.float64)
    good = np.asarray(good, dtype=bool) & np.isfinite(flux)
    if good.sum() < 3:
        return np.full(wavelength.shape, np.nan)
    step = np.median(np.diff(wavelength))
    size = max(3, int(round(window_A / step)) | 1)  # odd number of pixels
    smooth = median_filter(flux[good], size=size, mode="nearest")
    return np.interp(wavelength, wavelength[good], smooth)


def normalisation_divisor(spectrum: Spectrum, how: str = "median", continuum_window_A: float = 200.0) -> np.ndarray:
    """The per-pixel divisor ``s`` of a normalisation (all segments concatenated; 1 for ``"none"``).

    NaN or non-positive values mark pixels that cannot be normalised (they become bad).
    """
    if how not in NORMALISATIONS:
        raise ValueError(f"normalisation must be one of {NORMALISATIONS}, got {how!r}")
    if how == "none":
        return np.ones(spectrum.n_pixels)
    if how == "median":
        return np.full(spectrum.n_pixels, spectrum_median(spectrum))
    return np.concatenate(
        [running_median_continuum(s.wavelength, s.flux, _good(s), continuum_window_A) for s in spectrum.segments]
    )


def usable_divisor(divisor: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(ok, safe)``: where ``divisor`` is finite and > 0, and the divisor with 1 elsewhere (what a
    pixel that cannot be normalised is divided by; it is bad)."""
    ok = np.isfinite(divisor) & (divisor > 0)
    return ok, np.where(ok, divisor, 1.0)


def divide_by(divisor: np.ndarray, flux: np.ndarray, ivar: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(flux / s, ivar * s**2, mask & ok)`` in float64, ``s`` = ``divisor``, ``ok`` where ``s`` is finite and > 0.

    The arithmetic of every normalisation: data and errors divided alike (so ``(data - model)**2 *
    ivar`` is unchanged when the model is divided by the same ``s``). Pixels where ``s`` is not
    positive and finite are divided by 1 and become bad (mask False, ivar 0).
    """
    ok, safe = usable_divisor(divisor)
    return flux / safe, np.where(ok, ivar * safe**2, 0.0), mask & ok


def with_pixels(spectrum: Spectrum, flux: np.ndarray, ivar: np.ndarray, mask: np.ndarray) -> Spectrum:
    """A copy of ``spectrum`` with these per-pixel arrays (segments concatenated) in its segments,
    flux and ivar stored as float32 like every record."""
    out = copy.deepcopy(spectrum)
    start = 0
    for segment in out.segments:
        part = slice(start, start + segment.n_pixels)
        start += segment.n_pixels
        segment.flux = flux[part].astype(np.float32)
        segment.ivar = ivar[part].astype(np.float32)
        segment.mask = mask[part]
    return out


def normalise(spectrum: Spectrum, how: str = "median", continuum_window_A: float = 200.0) -> Spectrum:
    """A copy of ``spectrum`` divided by its median (``"median"``) or pseudo-continuum (``"continuum"``).

    ``ivar`` is scaled by the square of the divisor (:func:`divide_by`). Pixels where the divisor is
    not positive and finite become bad. ``"none"`` returns the record itself. The copy's
    ``normalisation`` field is set to ``"continuum"`` for ``how="continuum"`` and left as is for
    ``"median"`` (still flux-like).
    """
    divisor = normalisation_divisor(spectrum, how, continuum_window_A)
    if how == "none":
        return spectrum
    out = with_pixels(spectrum, *divide_by(divisor, spectrum.flux, spectrum.ivar, spectrum.mask))
    if how == "continuum":
        out.normalisation = "continuum"
    return out
