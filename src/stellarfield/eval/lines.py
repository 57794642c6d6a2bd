"""Depths and equivalent widths of strong lines, to compare generated and real spectra.

Each :class:`LineFeature` is an integration band and two flanking pseudo-continuum windows, all in
**vacuum Angstrom, rest frame** (shift observed-frame wavelengths to the rest frame first, e.g.
with :func:`stellarfield.physics.doppler.rest_wavelength`). On a spectrum of any grid:

* pseudo-continuum ``c(lambda)``: the straight line through the median flux of each window, at the
  window centres (the Lick-index construction, Worthey et al. 1994, ApJS 94, 687, with medians
  instead of means so a bad pixel cannot drag it);
* equivalent width ``EW = integral over the band of (1 - f / c) d lambda`` (Angstrom; positive for
  absorption), by the trapezoid rule over the good pixels, with the band edges linearly
  interpolated;
* depth ``1 - min(f / c)`` over the good pixels of the band.

A feature is measured only when one segment covers both windows and the band, with at least one
good pixel in each window and two in the band; otherwise the values are NaN.

Wavelengths (air values as published, converted to vacuum with
:func:`stellarfield.physics.air_vacuum.air_to_vacuum`, Morton 2000):

* Lick indices H-beta, Mg b (the 5167/5173/5184 A Mg I triplet) and Na D (5890/5896 A): bands of
  Trager et al. (1998, ApJS 116, 1, table 2; the definitions of Worthey et al. 1994);
* H-alpha 6562.79 A, Ca II triplet 8498.02 / 8542.09 / 8662.14 A (NIST Atomic Spectra Database,
  air): bands of +-10 A (H-alpha) and +-5 A (Ca II) with windows 20-35 A and 10-20 A from the
  centre: local choices wide enough for R ~ 2000 (MILES, LAMOST) and resolved at R ~ 28,000;
* APOGEE H band, Fe I 15207.526 A and Mg I 15740.716, 15748.9, 15765.8 A (air wavelengths of the
  lines used with the APOGEE line list by Smith et al. 2013, ApJ 765, 16): bands +-1.2 A, windows
  2-4 A from the centre (R ~ 22,500). In vacuum these are 15211.68, 15745.02, 15753.2, 15770.11 A.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import ks_2samp

from stellarfield.physics.air_vacuum import air_to_vacuum


@dataclass(frozen=True)
class LineFeature:
    """A line (or blend) and its windows, vacuum Angstrom, rest frame."""

    name: str
    center: float
    band: tuple[float, float]
    blue: tuple[float, float]
    red: tuple[float, float]
    source: str

    @property
    def span(self) -> tuple[float, float]:
        """Wavelength range a spectrum must cover to measure the feature."""
        return (self.blue[0], self.red[1])


def _vacuum(pair) -> tuple[float, float]:
    lo, hi = air_to_vacuum(np.asarray(pair, dtype=np.float64))
    return (float(lo), float(hi))


def _lick(name: str, center_air: float, band_air, blue_air, red_air) -> LineFeature:
    """A Lick index (air definitions of Trager et al. 1998) converted to vacuum."""
    return LineFeature(
        name,
        float(air_to_vacuum(center_air)),
        _vacuum(band_air),
        _vacuum(blue_air),
        _vacuum(red_air),
        "Lick index, Trager et al. 1998 (air -> vacuum)",
    )


def _around(name: str, center_air: float, half_width: float, inner: float, outer: float, source: str) -> LineFeature:
    """Band ``center +- half_width`` and windows ``[center - outer, center - inner]``, ``[center + inner, center + outer]``."""
    c = float(air_to_vacuum(center_air))
    return LineFeature(name, c, (c - half_width, c + half_width), (c - outer, c - inner), (c + inner, c + outer), source)


_NIST = "NIST ASD air wavelength -> vacuum"
_APOGEE = "Smith et al. 2013 (APOGEE H-band lines), air -> vacuum"

#: The default strong-line set (see the module docstring for the sources).
STRONG_LINES: tuple[LineFeature, ...] = (
    _lick("H-beta", 4861.35, (4847.875, 4876.625), (4827.875, 4847.875), (4876.625, 4891.625)),
    _lick("Mg b", 5172.68, (5160.125, 5192.625), (5142.625, 5161.375), (5191.375, 5206.375)),
    _lick("Na D", 5889.95, (5876.875, 5909.375), (5860.625, 5875.625), (5922.125, 5948.125)),
    _around("H-alpha", 6562.79, 10.0, 20.0, 35.0, _NIST),
    _around("Ca II 8498", 8498.02, 5.0, 10.0, 20.0, _NIST),
    _around("Ca II 8542", 8542.09, 5.0, 10.0, 20.0, _NIST),
    _around("Ca II 8662", 8662.14, 5.0, 10.0, 20.0, _NIST),
    _around("Fe I 15207", 15207.526, 1.2, 2.0, 4.0, _APOGEE),
    _around("Mg I 15741", 15740.716, 1.2, 2.0, 4.0, _APOGEE),
    _around("Mg I 15749", 15748.9, 1.2, 2.0, 4.0, _APOGEE),
    _around("Mg I 15766", 15765.8, 1.2, 2.0, 4.0, _APOGEE),
)


@dataclass
class LineMeasurement:
    """Depth (dimensionless), equivalent width (Angstrom) and pseudo-continuum at the line centre."""

    depth: float
    ew_A: float
    continuum: float
    n_band_pixels: int

    @classmethod
    def missing(cls) -> "LineMeasurement":
        return cls(float("nan"), float("nan"), float("nan"), 0)

    def to_dict(self) -> dict:
        return asdict(self)


def _inside(wavelength: np.ndarray, good: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    return good & (wavelength >= window[0]) & (wavelength <= window[1])


def measure_feature(
    wavelength: np.ndarray, flux: np.ndarray, feature: LineFeature, mask: np.ndarray | None = None
) -> LineMeasurement:
    """Measure ``feature`` on one contiguous segment (rest-frame vacuum Angstrom); NaN if not covered."""
    wavelength = np.asarray(wavelength, dtype=np.float64)
    flux = np.asarray(flux, dtype=np.float64)
    good = np.isfinite(flux) if mask is None else (np.asarray(mask, dtype=bool) & np.isfinite(flux))
    if wavelength.size < 2 or wavelength[0] > feature.span[0] or wavelength[-1] < feature.span[1]:
        return LineMeasurement.missing()
    in_blue = _inside(wavelength, good, feature.blue)
    in_red = _inside(wavelength, good, feature.red)
    in_band = _inside(wavelength, good, feature.band)
    if not in_blue.any() or not in_red.any() or in_band.sum() < 2:
        return LineMeasurement.missing()

    x_blue, x_red = np.mean(feature.blue), np.mean(feature.red)
    f_blue, f_red = np.median(flux[in_blue]), np.median(flux[in_red])

    def continuum(x):
        return f_blue + (f_red - f_blue) * (x - x_blue) / (x_red - x_blue)

    # Band pixels plus the band edges (linear interpolation over the good pixels).
    gx, gf = wavelength[good], flux[good]
    x = np.concatenate([[feature.band[0]], wavelength[in_band], [feature.band[1]]])
    f = np.concatenate([[np.interp(feature.band[0], gx, gf)], flux[in_band], [np.interp(feature.band[1], gx, gf)]])
    ratio = f / continuum(x)
    absorbed = 1.0 - ratio
    ew = float(np.sum(0.5 * (absorbed[1:] + absorbed[:-1]) * np.diff(x)))
    depth = float(1.0 - np.min(flux[in_band] / continuum(wavelength[in_band])))
    return LineMeasurement(depth, ew, float(continuum(feature.center)), int(in_band.sum()))


def measure_features(
    segments: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray | None]],
    features: Sequence[LineFeature] = STRONG_LINES,
) -> dict[str, LineMeasurement]:
    """Measure each feature on the first segment ``(wavelength, flux, mask_or_None)`` that covers it."""
    segments = list(segments)
    out = {}
    for feature in features:
        result = LineMeasurement.missing()
        for wavelength, flux, mask in segments:
            if wavelength[0] <= feature.span[0] and wavelength[-1] >= feature.span[1]:
                result = measure_feature(wavelength, flux, feature, mask)
                break
        out[feature.name] = result
    return out


def spectrum_segments(spectrum) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``(wavelength, flux, mask)`` per segment of a :class:`~stellarfield.spectrum.Spectrum`."""
    return [(s.wavelength, s.flux, s.mask) for s in spectrum.segments]


def features_covered(wavelength: np.ndarray, features: Sequence[LineFeature] = STRONG_LINES, gap_factor: float = 5.0) -> list[LineFeature]:
    """Features whose windows and band lie inside the pixels ``wavelength`` (vacuum Angstrom, sorted).

    A feature that falls in a gap between segments (pixels more than ``gap_factor`` median steps
    apart inside its span) is not covered.
    """
    w = np.sort(np.asarray(wavelength, dtype=np.float64).ravel())
    if w.size < 2:
        return []
    typical = np.median(np.diff(w))
    covered = []
    for feature in features:
        lo, hi = feature.span
        if w[0] > lo or w[-1] < hi:
            continue
        inside = w[(w >= lo) & (w <= hi)]
        edges = np.concatenate([[lo], inside, [hi]])
        if np.diff(edges).max() <= gap_factor * typical:
            covered.append(feature)
    return covered


def compare_line_distributions(real: Sequence[float], generated: Sequence[float]) -> dict:
    """Medians, 16/84 percentiles and counts of a line quantity in real vs generated spectra, and the
    two-sample Kolmogorov-Smirnov statistic and p-value (scipy.stats.ks_2samp)."""
    r = np.asarray(real, dtype=np.float64)
    g = np.asarray(generated, dtype=np.float64)
    r, g = r[np.isfinite(r)], g[np.isfinite(g)]

    def summary(x):
        if x.size == 0:
            return {"median": float("nan"), "p16": float("nan"), "p84": float("nan"), "n": 0}
        p16, p50, p84 = np.percentile(x, [16, 50, 84])
        return {"median": float(p50), "p16": float(p16), "p84": float(p84), "n": int(x.size)}

    out = {"real": summary(r), "generated": summary(g)}
    if r.size and g.size:
        test = ks_2samp(r, g)
        out.update({"ks_statistic": float(test.statistic), "ks_pvalue": float(test.pvalue)})
    else:
        out.update({"ks_statistic": float("nan"), "ks_pvalue": float("nan")})
    return out
