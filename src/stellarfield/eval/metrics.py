"""Goodness-of-fit and comparison statistics used by the benchmark.

Everything here takes plain arrays and returns numbers with the count of spectra behind them, so
the same functions score the generative model, the PCA baseline and anything else.

Conventions
-----------
* A *good* pixel is one with ``mask`` True and ``ivar > 0`` (ivar is 0 wherever the noise is unknown
  or the pixel is bad, see :class:`stellarfield.spectrum.Segment`).
* Robust scatter is ``1.4826 * median(|x - median(x)|)``: the standard deviation of a Gaussian
  with the same median absolute deviation (1.4826 = 1 / Phi^-1(3/4); e.g. Rousseeuw & Croux 1993,
  JASA 88, 1273).
* Percentile summaries report the median and the 16th / 84th percentiles (the +-1 sigma points of
  a Gaussian) over spectra, ignoring NaN, with ``n`` the number of finite values used.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from stellarfield.arrays import nanmedian_rows

#: Scale factor from the median absolute deviation to a Gaussian standard deviation.
MAD_TO_SIGMA = 1.4826


def good_pixels(ivar: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Boolean array of pixels that count in a chi2: ``mask`` True (if given) and ``ivar > 0``."""
    ivar = np.asarray(ivar)
    good = np.isfinite(ivar) & (ivar > 0)
    if mask is not None:
        good &= np.asarray(mask, dtype=bool)
    return good


def chi2_nu(
    data: np.ndarray,
    model: np.ndarray,
    ivar: np.ndarray,
    mask: np.ndarray | None = None,
    n_params: int = 0,
) -> np.ndarray | float:
    """Reduced chi-square per spectrum.

    ``chi2_nu = sum_good (data - model)**2 * ivar / (n_good - n_params)``, where the sum runs over
    good pixels (``mask`` True and ``ivar > 0``) along the last axis. Arrays of shape ``(P,)`` give a
    float, ``(N, P)`` an array of N values. NaN where ``n_good - n_params <= 0``.

    ``n_params`` is the number of parameters fitted to this spectrum (e.g. K PCA coefficients).
    """
    data = np.asarray(data, dtype=np.float64)
    model = np.asarray(model, dtype=np.float64)
    ivar = np.asarray(ivar, dtype=np.float64)
    good = good_pixels(ivar, mask) & np.isfinite(data) & np.isfinite(model)
    resid2 = np.where(good, (data - model) ** 2 * np.where(good, ivar, 0.0), 0.0)
    chi2 = resid2.sum(axis=-1)
    dof = good.sum(axis=-1) - n_params
    with np.errstate(invalid="ignore", divide="ignore"):
        value = np.where(dof > 0, chi2 / np.maximum(dof, 1), np.nan)
    return _per_spectrum(value)


def normalised_residual(data: np.ndarray, model: np.ndarray, ivar: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """``(data - model) * sqrt(ivar)`` on good pixels, NaN elsewhere (the per-pixel 'pull')."""
    data = np.asarray(data, dtype=np.float64)
    model = np.asarray(model, dtype=np.float64)
    ivar = np.asarray(ivar, dtype=np.float64)
    good = good_pixels(ivar, mask)
    return np.where(good, (data - model) * np.sqrt(np.where(good, ivar, 0.0)), np.nan)


def _kept_residuals(data, model, mask) -> np.ndarray:
    """``data - model`` with NaN where ``mask`` is False or either value is not finite."""
    resid = np.asarray(data, dtype=np.float64) - np.asarray(model, dtype=np.float64)
    if mask is not None:
        resid = np.where(np.asarray(mask, dtype=bool), resid, np.nan)
    return resid


def _per_spectrum(values: np.ndarray) -> np.ndarray | float:
    return float(values) if np.ndim(values) == 0 else values


def median_abs_residual(data: np.ndarray, model: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray | float:
    """Median over pixels of ``|data - model|`` per spectrum (flux units), over pixels with ``mask`` True.

    Needs no errors, so it also scores products without them (MILES). NaN for a spectrum without
    any kept pixel.
    """
    resid = np.abs(_kept_residuals(data, model, mask))
    rows = int(np.prod(resid.shape[:-1], dtype=np.int64))  # (explicit: -1 is ambiguous for zero pixels)
    value = nanmedian_rows(resid.reshape(rows, resid.shape[-1])).reshape(resid.shape[:-1])  # NaN: no kept pixel
    return _per_spectrum(value)


def rms_residual(data: np.ndarray, model: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray | float:
    """Root-mean-square of ``data - model`` per spectrum over pixels with ``mask`` True (flux units)."""
    resid = _kept_residuals(data, model, mask)
    kept = np.isfinite(resid)
    n = kept.sum(axis=-1)
    sum_sq = np.where(kept, resid, 0.0) ** 2
    with np.errstate(invalid="ignore", divide="ignore"):
        value = np.where(n > 0, np.sqrt(sum_sq.sum(axis=-1) / np.maximum(n, 1)), np.nan)
    return _per_spectrum(value)


def robust_scatter(values: np.ndarray) -> float:
    """``1.4826 * median(|x - median(x)|)`` of the finite values (NaN if there are none)."""
    x = np.asarray(values, dtype=np.float64).ravel()
    x = x[np.isfinite(x)]
    if x.size == 0:
        return float("nan")
    return float(MAD_TO_SIGMA * np.median(np.abs(x - np.median(x))))


def median_offset(values: np.ndarray) -> float:
    """Median of the finite values (NaN if there are none)."""
    x = np.asarray(values, dtype=np.float64).ravel()
    x = x[np.isfinite(x)]
    return float(np.median(x)) if x.size else float("nan")


@dataclass
class PercentileSummary:
    """Median and 16th / 84th percentiles of a per-spectrum statistic, over ``n`` spectra."""

    median: float
    p16: float
    p84: float
    n: int

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.median:.3g} ({self.p16:.3g}-{self.p84:.3g}, n={self.n})"


def summarize(values: np.ndarray) -> PercentileSummary:
    """:class:`PercentileSummary` of the finite entries of ``values`` (NaN summary when none)."""
    x = np.asarray(values, dtype=np.float64).ravel()
    x = x[np.isfinite(x)]
    if x.size == 0:
        return PercentileSummary(float("nan"), float("nan"), float("nan"), 0)
    p16, p50, p84 = np.percentile(x, [16, 50, 84])
    return PercentileSummary(float(p50), float(p16), float(p84), int(x.size))


#: Default signal-to-noise bin edges for :func:`rv_comparison` (per pixel).
DEFAULT_SNR_BINS = (0.0, 20.0, 50.0, 100.0, np.inf)


def rv_comparison(
    fitted: np.ndarray,
    reference: np.ndarray,
    snr: np.ndarray | None = None,
    snr_bins=DEFAULT_SNR_BINS,
) -> dict:
    """Compare fitted radial velocities with reference ones (both km/s, in the SAME frame).

    The caller is responsible for the frames: e.g. a fit to an observed-frame (barycentric) spectrum
    gives a barycentric RV, to compare with a survey's barycentric/heliocentric value (they differ by
    < ~0.03 km/s for the Earth's orbit), not with a topocentric one.

    Returns ``{"offset_kms": median(fitted - reference), "scatter_kms": robust scatter of the
    difference, "n": pairs with both finite, "by_snr": [{"snr_min", "snr_max", "offset_kms",
    "scatter_kms", "n"}, ...]}`` (``by_snr`` only when ``snr`` is given; bins are ``[min, max)``).
    """
    fitted = np.asarray(fitted, dtype=np.float64).ravel()
    reference = np.asarray(reference, dtype=np.float64).ravel()
    if fitted.shape != reference.shape:
        raise ValueError(f"fitted has {fitted.size} values, reference {reference.size}")
    diff = fitted - reference
    ok = np.isfinite(diff)
    result = {
        "offset_kms": median_offset(diff[ok]),
        "scatter_kms": robust_scatter(diff[ok]),
        "n": int(ok.sum()),
    }
    if snr is not None:
        snr = np.asarray(snr, dtype=np.float64).ravel()
        if snr.shape != diff.shape:
            raise ValueError(f"snr has {snr.size} values, fitted {diff.size}")
        bins = []
        edges = list(snr_bins)
        for lo, hi in zip(edges[:-1], edges[1:]):
            sel = ok & (snr >= lo) & (snr < hi)
            bins.append(
                {
                    "snr_min": float(lo),
                    "snr_max": float(hi),
                    "offset_kms": median_offset(diff[sel]),
                    "scatter_kms": robust_scatter(diff[sel]),
                    "n": int(sel.sum()),
                }
            )
        result["by_snr"] = bins
    return result
