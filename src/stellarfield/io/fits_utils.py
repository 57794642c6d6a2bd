"""Small FITS helpers shared by the readers: opening with clear errors, WCS wavelength grids."""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np

from stellarfield.io.errors import SpectrumReadError


@contextlib.contextmanager
def open_fits(path: str | Path) -> Iterator:
    """Open a FITS file (plain or gzipped), turning every astropy failure into a
    :class:`SpectrumReadError` that names the file."""
    from astropy.io import fits

    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hdul = fits.open(path, memmap=False)
    except FileNotFoundError as exc:
        raise SpectrumReadError(path, "no such file") from exc
    except Exception as exc:
        raise SpectrumReadError(path, f"cannot open as FITS ({type(exc).__name__}: {exc})") from exc
    try:
        yield hdul
    finally:
        hdul.close()


def hdu_data(hdul, index: int | str, path: str | Path, what: str) -> np.ndarray:
    """Data of HDU ``index``; a clear error if the extension is missing, empty or unreadable."""
    try:
        hdu = hdul[index]
    except (IndexError, KeyError):
        raise SpectrumReadError(path, f"missing FITS extension {index!r} ({what}); the file has {len(hdul)} HDUs") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data = hdu.data
    except Exception as exc:
        raise SpectrumReadError(path, f"cannot read extension {index!r} ({what}): {type(exc).__name__}: {exc}") from exc
    if data is None:
        raise SpectrumReadError(path, f"extension {index!r} ({what}) holds no data")
    return data


def linear_wcs_wavelength(header, n: int, *, log10: bool = False) -> np.ndarray:
    """Pixel-centre wavelengths from a 1-D FITS WCS (CRVAL1, CDELT1 or CD1_1, CRPIX1).

    lambda_i = CRVAL1 + CDELT1 * (i + 1 - CRPIX1) for i = 0..n-1 (FITS pixels count from 1);
    with ``log10=True`` the same expression gives log10(lambda).
    """
    crval = float(header["CRVAL1"])
    cdelt = float(header.get("CDELT1", header.get("CD1_1")))
    crpix = float(header.get("CRPIX1", 1.0))
    x = crval + cdelt * (np.arange(n, dtype=np.float64) + 1.0 - crpix)
    return 10.0**x if log10 else x


def checked_air_to_vacuum(wavelength_air: np.ndarray, path: str | Path, profile) -> np.ndarray:
    """Vacuum wavelengths (A) of air wavelengths (A) read from ``path``, once they are checked to lie in
    the product's known range (``profile``: its :class:`~stellarfield.io.profile.ProductProfile`):
    a WCS in nm or micron is refused with that reason, not by the conversion's domain. The range is
    in vacuum; air wavelengths are 0.03% shorter, far inside the check's tolerance."""
    from stellarfield.physics.air_vacuum import air_to_vacuum

    problem = profile.wavelength_problem(wavelength_air)
    if problem is not None:
        raise SpectrumReadError(path, problem)
    return air_to_vacuum(wavelength_air)


def air_wcs_to_vacuum(header, n: int, fwhm_air: float, path: str | Path, profile) -> tuple[np.ndarray, np.ndarray | None]:
    """Vacuum wavelengths of a linear WCS given in air (checked by :func:`checked_air_to_vacuum`),
    and a constant FWHM in air Angstrom as a per-pixel FWHM in vacuum Angstrom (None when
    ``fwhm_air`` is not finite).

    The width follows the local stretch of the grid: ``fwhm_air * d(lambda_vac)/d(lambda_air)``.
    """
    wavelength_air = linear_wcs_wavelength(header, n)
    wavelength = checked_air_to_vacuum(wavelength_air, path, profile)
    if not np.isfinite(fwhm_air):
        return wavelength, None
    return wavelength, fwhm_air * np.gradient(wavelength) / np.gradient(wavelength_air)


def header_float(header, key: str, default: float = np.nan) -> float:
    """A header value as float, NaN (or ``default``) when absent or not a number."""
    try:
        value = header[key]
    except KeyError:
        return default
    try:
        value = float(value)
    except (TypeError, ValueError):
        return default
    return value if np.isfinite(value) else default


def header_str(header, key: str, default: str | None = None) -> str | None:
    value = header.get(key, default)
    return None if value is None else str(value).strip()
