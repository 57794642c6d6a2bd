"""Small FITS helpers shared by the readers: opening with clear errors, WCS wavelength grids."""

from __future__ import annotations

import contextlib
import functools
import io
import warnings
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np

from stellarfield.io.errors import SpectrumReadError


#: Gzipped FITS files up to this many bytes decompressed are decompressed in memory in one pass
#: (:func:`gunzip`) before astropy parses them (the file is then in memory twice while its data
#: arrays are made: at most ~1 GB more than streaming); larger ones are streamed by astropy.
GUNZIP_IN_MEMORY_BYTES = 512 << 20


def gunzip(path: Path, compressed: bytes) -> bytes:
    """The decompressed bytes of a gzip file (every member), in one pass of zlib: a third faster
    than astropy's streamed reading of a ``.fits.gz``, which decompresses in small pieces and
    again from the start when it seeks back. A cut-short or damaged file raises
    :class:`SpectrumReadError` with the reason."""
    pieces = []
    try:
        while compressed:
            member = zlib.decompressobj(wbits=31)  # 31: a gzip header and trailer (RFC 1952), checked
            pieces.append(member.decompress(compressed))
            if not member.eof:
                raise SpectrumReadError(path, "truncated gzip file: the compressed data ends before its end marker")
            compressed = member.unused_data.lstrip(b"\0")  # the next member, or zero padding
    except zlib.error as exc:
        raise SpectrumReadError(path, f"corrupt gzip file ({exc})") from exc
    return b"".join(pieces)


def is_gzipped(path: Path) -> bool:
    """Whether ``path`` starts with the gzip magic bytes."""
    from stellarfield.io.peek import GZIP_MAGIC

    with open(path, "rb") as fh:
        return fh.read(len(GZIP_MAGIC)) == GZIP_MAGIC


def gunzip_in_memory(path: Path) -> bytes | None:
    """The decompressed bytes of the gzipped file ``path`` (:func:`gunzip`), or None when it is at
    least :data:`GUNZIP_IN_MEMORY_BYTES`, compressed or (by its trailer) decompressed."""
    from stellarfield.io.peek import gzip_trailer_size

    size = path.stat().st_size
    isize = gzip_trailer_size(path, size)
    if isize is None or isize >= GUNZIP_IN_MEMORY_BYTES or size >= GUNZIP_IN_MEMORY_BYTES:  # (ISIZE is modulo 2**32)
        return None
    return gunzip(path, path.read_bytes())


def _fits_source(path: Path):
    """What ``fits.open`` is given: the decompressed bytes of a gzipped file below
    :data:`GUNZIP_IN_MEMORY_BYTES` (:func:`gunzip_in_memory`), else the path."""
    data = gunzip_in_memory(path) if is_gzipped(path) else None
    return path if data is None else io.BytesIO(data)


@contextlib.contextmanager
def open_fits(path: str | Path) -> Iterator:
    """Open a FITS file (plain or gzipped), turning every astropy failure into a
    :class:`SpectrumReadError` that names the file."""
    from astropy.io import fits

    path = Path(path)
    try:
        source = _fits_source(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hdul = fits.open(source, memmap=False)
    except FileNotFoundError as exc:
        raise SpectrumReadError(path, "no such file") from exc
    except SpectrumReadError:
        raise
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


def read_image(path: str | Path, what: str) -> tuple[object, np.ndarray]:
    """``(header, data)`` of HDU 0, an image (``what`` names it in errors). A plain image in an
    uncompressed file is read without astropy (:func:`~stellarfield.io.fits_cards.read_primary_image`:
    the header as a :class:`~stellarfield.io.fits_cards.CardHeader`); anything else through
    :func:`open_fits`, with its errors."""
    from stellarfield.io.fits_cards import read_primary_image

    path = Path(path)
    try:
        image = read_primary_image(path)
    except FileNotFoundError as exc:
        raise SpectrumReadError(path, "no such file") from exc
    if image is not None:
        return image
    with open_fits(path) as hdul:
        return hdul[0].header, hdu_data(hdul, 0, path, what)


def linear_wcs_wavelength(header, n: int, *, log10: bool = False) -> np.ndarray:
    """Pixel-centre wavelengths from a 1-D FITS WCS (CRVAL1, CDELT1 or CD1_1, CRPIX1).

    lambda_i = CRVAL1 + CDELT1 * (i + 1 - CRPIX1) for i = 0..n-1 (FITS pixels count from 1);
    with ``log10=True`` the same expression gives log10(lambda).
    """
    x = _linear_grid(*_linear_wcs(header), n)
    return 10.0**x if log10 else x


def _linear_wcs(header) -> tuple[float, float, float]:
    """(CRVAL1, CDELT1 or CD1_1, CRPIX1) of a 1-D FITS WCS."""
    return float(header["CRVAL1"]), float(header.get("CDELT1", header.get("CD1_1"))), float(header.get("CRPIX1", 1.0))


def _linear_grid(crval: float, cdelt: float, crpix: float, n: int) -> np.ndarray:
    return crval + cdelt * (np.arange(n, dtype=np.float64) + 1.0 - crpix)


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
    A library's files share one WCS (MILES' 984, STELIB's 255): each file's grid is checked against
    the product's range, and a WCS seen before is converted once (:func:`_vacuum_of_air_wcs`,
    cached), each file getting its own copy.
    """
    wcs = _linear_wcs(header)
    problem = profile.wavelength_problem(_linear_grid(*wcs, n))
    if problem is not None:
        raise SpectrumReadError(path, problem)
    wavelength, fwhm = _vacuum_of_air_wcs(*wcs, n, float(fwhm_air))
    return wavelength.copy(), None if fwhm is None else fwhm.copy()


@functools.lru_cache(maxsize=16)
def _vacuum_of_air_wcs(crval: float, cdelt: float, crpix: float, n: int,
                       fwhm_air: float) -> tuple[np.ndarray, np.ndarray | None]:
    """Vacuum wavelengths and FWHM (or None) of one linear air WCS (see :func:`air_wcs_to_vacuum`)."""
    from stellarfield.physics.air_vacuum import air_to_vacuum

    wavelength_air = _linear_grid(crval, cdelt, crpix, n)
    wavelength = air_to_vacuum(wavelength_air)
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
