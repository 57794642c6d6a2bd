"""Readers for SDSS APOGEE spectra: combined apStar, ASPCAP aspcapStar and single-visit apVisit files.

APOGEE is an H-band (15,100-17,000 A) fibre spectrograph with resolving power R ~ 22,500
(Wilson et al. 2019, PASP 131, 055001). Its light falls on three detectors ("chips"), named
a (red), b (green) and c (blue), with two gaps between them. All APOGEE wavelengths are in
**vacuum** (Nidever et al. 2015, AJ 150, 173). Three products are read here:

``apogee_apstar`` (``apStar-<apred>-<APOGEE_ID>.fits``)
    Visits shifted to the star's rest frame and combined on one log-linear grid,
    ``lambda_i = 10**(CRVAL1 + CDELT1 * i)`` with CRVAL1 = 4.179, CDELT1 = 6e-6, 8575 pixels
    (15100.8-16999.8 A; the same in DR13 and DR17). Images in HDU1 flux, HDU2 error, HDU3
    APOGEE_PIXMASK bitmask have one row per spectrum: row 0 is the combined spectrum, row 1 an
    alternative combination, rows 2.. the individual visits (resampled, rest frame) when NVISITS > 1.
    A DR13 star with one visit has 1-D images; a DR17 star with one visit has two rows, the second
    all zero. Flux unit 1e-17 erg/s/cm^2/A (header BUNIT).
``apogee_aspcapstar`` (``aspcapStar-<apred>-<aspcap>-<APOGEE_ID>.fits``)
    The apStar combined spectrum divided by ASPCAP's pseudo-continuum (Garcia Perez et al. 2016,
    AJ 151, 144), same grid: HDU1 flux, HDU2 error, HDU3 best-fit model (not read), HDU4 a one-row
    table of the star's allStar entry (APOGEE_ID, SNR, VHELIO, PARAM ...). Masked pixels are 0.
``apogee_apvisit`` (``apVisit-<apred>-<plate>-<mjd>-<fiber>.fits``)
    One visit, not shifted: images (3 chips x 4096 pixels) with HDU4 holding each pixel's vacuum
    wavelength, **decreasing** along each row; row 0 is chip a (red), row 2 chip c (blue). The
    wavelengths are topocentric: the spectrum carries the star's velocity relative to the telescope,
    VRAD = VHELIO - BC (header). Measured on the files here: cross-correlating visits against their
    star's apStar gives shifts of apStar VHELIO - visit BC to a few km/s, e.g. -64.5 km/s vs
    -65.8 km/s for apVisit-2M11194647+0820356-0.

Pixel quality (all three products)
    A pixel is good when its flux is finite and non-zero (APOGEE writes 0 in chip gaps and in
    pixels it rejected; DR17 writes NaN there), its error is finite, positive and below
    ``ERROR_SENTINEL`` (DR13 writes error = 1e10 at rejected pixels, DR17 errors >= 1e9 occur only at
    pixels with bad bits set), and, where the product has a bitmask, none of ``BAD_PIXMASK_BITS``
    is set. Bad pixels get ivar 0. See ``BAD_PIXMASK_BITS`` for the choice of bits.

Segments
    Each spectrum is cut into the three chips, named "blue", "green", "red" (chips c, b, a) in
    increasing wavelength. apVisit keeps one segment per chip row (reversed to increase). The
    apStar/aspcapStar grid is cut at fixed wavelengths ``CHIP_GAP_CENTRES_A``, the centres of the
    two detector gaps, so every apStar/aspcapStar record has identical segments (blue pixels
    0-3429, green 3430-6209, red 6210-8574). The gaps' pixel positions in apStar move with the
    star's velocity (measured here: gap 1 starts between pixels 3300 and 3376 and ends between 3537
    and 3613, for VHELIO from -270 to +39 km/s), but the cut stays inside both gaps for
    |v| <~ 330 km/s; beyond that a few gap pixels (masked anyway) land in the neighbouring segment.

Identifiers and labels
    ``object_id`` is the APOGEE_ID exactly as APOGEE writes it, the 2MASS designation with its
    "2M" prefix (e.g. "2M00452143+1634446"), for all three products. apVisit and the visit rows of
    apStar get ``observation_id = "<plate>-<mjd>-<fiber:03d>"``, the apVisit file name's own key.
    Labels: ``rv_kms`` = VHELIO (barycentric RV, km/s; for apStar the visits' weighted mean) and
    ``snr`` = SNR from the file; DR17 apStar adds its Doppler RV-fit RV_TEFF/RV_LOGG/RV_FEH as
    teff/logg/fe_h (a coarse template fit, not ASPCAP); aspcapStar gives ASPCAP's calibrated PARAM
    (Teff, logg, [M/H] as fe_h, [alpha/M]). The sentinel -9999 means "not measured": that label is
    left out. DR13 apVisit headers hold some absurd RVs (e.g. VHELIO 596 km/s for a star whose
    apStar says 6.7 km/s); they are passed on as written, not corrected.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from stellarfield.io.errors import SpectrumReadError
from stellarfield.io.fits_utils import hdu_data, header_float, header_str, linear_wcs_wavelength, open_fits
from stellarfield.io.peek import FilePeek
from stellarfield.io.profile import HeaderUnit, ProductProfile, RVReferenceKeys
from stellarfield.io.registry import register_reader
from stellarfield.spectrum import Segment, Spectrum

SURVEY = "APOGEE"
#: Resolving power lambda / FWHM of the APOGEE spectrographs (Wilson et al. 2019, PASP 131, 055001).
RESOLUTION = 22_500.0

#: Chip names in increasing wavelength: chips c, b, a of the APOGEE detectors.
CHIP_NAMES = ("blue", "green", "red")
#: Vacuum wavelengths (A) at which the apStar/aspcapStar grid is cut into chips: the centres of the
#: two detector gaps, measured on the apVisit wavelength arrays here (chip c ends at ~15810 A,
#: chip b spans ~15857-16435 A, chip a starts at ~16472 A).
CHIP_GAP_CENTRES_A = (15833.5, 16453.5)

#: APOGEE_PIXMASK bit numbers (SDSS "APOGEE_PIXMASK" bitmask documentation; Nidever et al. 2015).
PIXMASK_BITS = {
    "BADPIX": 0,
    "CRPIX": 1,
    "SATPIX": 2,
    "UNFIXABLE": 3,
    "BADDARK": 4,
    "BADFLAT": 5,
    "BADERR": 6,
    "NOSKY": 7,
    "LITTROW_GHOST": 8,
    "PERSIST_HIGH": 9,
    "PERSIST_MED": 10,
    "PERSIST_LOW": 11,
    "SIG_SKYLINE": 12,
    "SIG_TELLURIC": 13,
    "NOT_ENOUGH_PSF": 14,
}
#: Bits that make a pixel bad: the flags the APOGEE reduction pipeline itself classes as bad
#: (level/"badflag" 1 in the pipeline's PIXMASK definition: bits 0-7 and 14), plus SIG_SKYLINE,
#: as Price-Jones & Bovy (2018, MNRAS 475, 1410) mask it for a data-driven model of APOGEE spectra.
#: SIG_SKYLINE marks pixels where an airglow (OH) line has significant flux compared with the star;
#: its subtraction leaves residual spikes at fixed observed wavelengths, with errors 30-40x the
#: neighbouring pixels', still 3-4 sigma above the star in the DR17 files here. A decoder of the
#: rest-frame star learns those spikes as stellar features when they are kept (measured: generated
#: APOGEE spectra full of emission spikes at the OH lines). The other bits are the pipeline's
#: warnings ("may be affected") and are NOT masked here:
#:
#: - PERSIST_HIGH/MED/LOW: the blue chip's persistence regions; in the DR13 files here PERSIST_HIGH
#:   alone covers up to 46% of a spectrum's good pixels, so masking it would throw away most of the
#:   blue chip.
#: - SIG_TELLURIC: a strong telluric line falls on this pixel; telluric absorption has been corrected
#:   (a multiplicative correction, no spike) and the error includes its uncertainty.
#: - LITTROW_GHOST: a known optical ghost that "may affect" the pixel.
#:
#: In apStar row 0 of DR13 the bitmask is the bitwise OR of the visits' masks (header HISTORY),
#: so a pixel flagged in any one visit is masked in the combined spectrum: conservative (with
#: SIG_SKYLINE, 2-37% of the otherwise good pixels of the apStar files here).
BAD_PIXMASK_BITS = (
    "BADPIX", "CRPIX", "SATPIX", "UNFIXABLE", "BADDARK", "BADFLAT", "BADERR", "NOSKY", "SIG_SKYLINE",
    "NOT_ENOUGH_PSF",
)
BAD_PIXMASK = sum(1 << PIXMASK_BITS[name] for name in BAD_PIXMASK_BITS)  # = 20735
#: Errors at or above this are "no information" markers: DR13 writes exactly 1e10 at rejected
#: pixels; DR17 errors >= 1e9 occur only where bad bits are set. Finite errors below it (up to
#: ~1e8 in DR17) are kept: their ivar is tiny but honest.
ERROR_SENTINEL = 1e9
#: APOGEE writes -9999 (or -9999.99) for a parameter it did not measure.
MISSING_VALUE = -9999.0

#: apred (reduction) version -> public data release, for the versions checked on files here.
APRED_RELEASE = {"r6": "DR13", "dr17": "DR17"}
#: Telescope (header TELESCOP) -> spectrograph: APO telescopes feed APOGEE-N, LCO's du Pont APOGEE-S.
TELESCOPE_INSTRUMENT = {"apo25m": "APOGEE-N", "apo1m": "APOGEE-N", "lco25m": "APOGEE-S"}
#: APOGEE file-name prefixes: "ap..." products come from APO (APOGEE-N), "as..." from LCO (APOGEE-S).
_PREFIX_INSTRUMENT = {"ap": "APOGEE-N", "as": "APOGEE-S"}
#: "apVisit-r6-6561-56587-131.fits", "apStar-dr17-2M19485057+5005279" -> prefix, apred, rest.
_FILE_NAME = re.compile(r"^(?P<prefix>a[ps])(?:Visit|Star)-(?P<apred>[^-]+)-(?P<rest>.+?)(?:\.fits)?$")
_VISIT_KEY = re.compile(r"^(?P<plate>[^-]+)-(?P<mjd>\d+)-(?P<fiber>\d+)$")

FLUX_UNIT = "1e-17 erg / (s cm2 Angstrom)"
#: Row of the apStar images holding the combined spectrum (row 1: another combination; rows 2..: visits).
APSTAR_COMBINED_ROW = 0

#: The apStar/aspcapStar grid covers 15,100-17,000 A (vacuum; CRVAL1 = 4.179, CDELT1 = 6e-6 dex,
#: 8575 pixels); apVisit chips see 15,140-16,960 A in the observed frame (shared/data/apogee/NOTES.md).
APOGEE_RANGE_A = (15100.0, 17000.0)
#: BUNIT of the apStar/apVisit flux HDU (1) and its error HDU (2): "Flux (10^-17 erg/s/cm^2/Ang)",
#: "Err (...)" (DR17) or "Error (...)" (DR13), "Flux Error (...)" (apVisit).
_FLUX_HDU_UNIT = HeaderUnit(1, "BUNIT", "Flux (10^-17 erg/s/cm^2/Ang)")
APSTAR_PROFILE = ProductProfile(
    "apogee_apstar", "APOGEE apStar", APOGEE_RANGE_A, frame="rest", normalisation="flux",
    flux_unit=FLUX_UNIT, continuum_degree=2, bench_normalisation="median",
    header_units=(_FLUX_HDU_UNIT, HeaderUnit(2, "BUNIT", "Err")),
)
ASPCAPSTAR_PROFILE = ProductProfile(
    "apogee_aspcapstar", "APOGEE aspcapStar", APOGEE_RANGE_A, frame="rest", normalisation="continuum",
    continuum_degree=1,
)
APVISIT_PROFILE = ProductProfile(
    "apogee_apvisit", "APOGEE apVisit", APOGEE_RANGE_A, frame="observed", normalisation="flux",
    flux_unit=FLUX_UNIT, continuum_degree=2, bench_normalisation="median",
    rv_references=(
        RVReferenceKeys("vhelio", "fitted (topocentric) + BC (visit header) vs VHELIO (visit header; barycentric; "
                        "unreliable in DR13)", "labels.rv_kms", "meta.bc_kms"),
        RVReferenceKeys("vrad", "fitted (topocentric) vs VRAD (visit header; topocentric)", "meta.vrad_kms",
                        topocentric=True),
    ),
    header_units=(_FLUX_HDU_UNIT, HeaderUnit(2, "BUNIT", "Flux Error"), HeaderUnit(4, "BUNIT", "Wavelength")),
)


# --------------------------------------------------------------------------------------------
# pixel quality, grids, segments
# --------------------------------------------------------------------------------------------
def good_pixels(flux: np.ndarray, error: np.ndarray, bitmask: np.ndarray | None = None) -> np.ndarray:
    """True where a pixel carries information: finite non-zero flux, an error in
    (0, ``ERROR_SENTINEL``), and (if given) no ``BAD_PIXMASK`` bit set in the APOGEE_PIXMASK."""
    flux = np.asarray(flux)
    error = np.asarray(error, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        good = np.isfinite(flux) & (flux != 0) & np.isfinite(error) & (error > 0) & (error < ERROR_SENTINEL)
    if bitmask is not None:
        good &= (np.asarray(bitmask).astype(np.int64) & BAD_PIXMASK) == 0
    return good


def inverse_variance(error: np.ndarray, good: np.ndarray) -> np.ndarray:
    """1 / error**2 at good pixels, 0 elsewhere (error in flux units; result in 1 / flux-unit**2)."""
    error = np.asarray(error, dtype=np.float64)
    ivar = np.zeros(error.shape, dtype=np.float64)
    ivar[good] = 1.0 / error[good] ** 2
    return ivar


def split_into_chips(
    wavelength: np.ndarray, flux: np.ndarray, ivar: np.ndarray, good: np.ndarray
) -> list[Segment]:
    """Cut one spectrum on the apStar grid into the blue, green and red chips at
    ``CHIP_GAP_CENTRES_A`` (vacuum A). Every pixel lands in exactly one segment."""
    cuts = np.searchsorted(wavelength, CHIP_GAP_CENTRES_A)
    edges = [0, *(int(c) for c in cuts), len(wavelength)]
    return [
        Segment(name, wavelength[a:b], flux[a:b], ivar[a:b], good[a:b])
        for name, a, b in zip(CHIP_NAMES, edges[:-1], edges[1:])
        if b > a
    ]


def _grid_from_header(header, fallback_header, n_pixels: int, path: Path) -> np.ndarray:
    """The log-linear apStar grid, vacuum A: 10**(CRVAL1 + CDELT1 * (i + 1 - CRPIX1))."""
    for hdr in (header, fallback_header):
        if hdr is not None and "CRVAL1" in hdr and ("CDELT1" in hdr or "CD1_1" in hdr):
            return linear_wcs_wavelength(hdr, n_pixels, log10=True)
    raise SpectrumReadError(path, "no CRVAL1/CDELT1 log-linear wavelength keywords in HDU1 or the primary header")


# --------------------------------------------------------------------------------------------
# small header helpers
# --------------------------------------------------------------------------------------------
def _value(x) -> float | None:
    """A measured value as float, None when missing (not a number, not finite, or APOGEE's -9999)."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    if not np.isfinite(v) or v <= MISSING_VALUE:
        return None
    return v


def _labels(**values) -> dict[str, float]:
    """Keep only the labels that were measured."""
    return {k: v for k, v in ((k, _value(x)) for k, x in values.items()) if v is not None}


def _parse_file_name(name: str | None) -> dict[str, str] | None:
    """``apVisit-r6-6561-56587-131.fits`` -> {"prefix": "ap", "apred": "r6", "rest": "6561-56587-131"}."""
    if not name:
        return None
    match = _FILE_NAME.match(Path(str(name).strip()).name)
    return match.groupdict() if match else None


def visit_key(plate, mjd, fiber) -> str:
    """Observation id of a visit, as in its file name: ``"<plate>-<mjd>-<fiber:03d>"``."""
    return f"{str(plate).strip()}-{int(mjd)}-{int(fiber):03d}"


def _visit_key_from_file_name(name: str | None) -> str | None:
    parsed = _parse_file_name(name)
    if parsed is None:
        return None
    match = _VISIT_KEY.match(parsed["rest"])
    return visit_key(match["plate"], match["mjd"], match["fiber"]) if match else None


def _instrument(telescope: str | None, source_name: str | None = None) -> str:
    """Spectrograph name from TELESCOP; else from an APOGEE file-name prefix (ap/as); else "APOGEE"."""
    if telescope:
        return TELESCOPE_INSTRUMENT.get(telescope, telescope)
    parsed = _parse_file_name(source_name)
    if parsed is not None:
        return _PREFIX_INSTRUMENT[parsed["prefix"]]
    return SURVEY


def _release_meta(source_name: str | None) -> dict[str, str]:
    """{"apred": ..., "release": ...} from a file name that carries the reduction version."""
    parsed = _parse_file_name(source_name)
    if parsed is None:
        return {}
    meta = {"apred": parsed["apred"]}
    if parsed["apred"] in APRED_RELEASE:
        meta["release"] = APRED_RELEASE[parsed["apred"]]
    return meta


def _text(value) -> str | None:
    """A FITS string value (str or bytes) without padding; None when empty."""
    if value is None:
        return None
    if isinstance(value, (bytes, np.bytes_)):
        value = value.decode("ascii", errors="replace")
    return str(value).strip() or None


def _meta(**values) -> dict:
    """Meta entries as JSON scalars, dropping the missing ones."""
    out = {}
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, (np.integer,)):
            value = int(value)
        elif isinstance(value, (np.floating, float)):
            value = float(value)
            if not np.isfinite(value):
                continue
        elif isinstance(value, (str, bytes, np.bytes_)):
            value = _text(value)
            if value is None:
                continue
        out[key] = value
    return out


def _header_int(header, key: str) -> int | None:
    value = header_float(header, key)
    return int(value) if np.isfinite(value) else None


# --------------------------------------------------------------------------------------------
# identify (headers only)
# --------------------------------------------------------------------------------------------
def _is_image(header, naxis: int) -> bool:
    if header is None or header.get("NAXIS") != naxis:
        return False
    return str(header.get("XTENSION", "IMAGE")).strip() == "IMAGE"


def is_apstar(peek: FilePeek) -> bool:
    """apStar: primary header with OBJID, NVISITS and NWAVE (the grid size), and HDU1 an image whose
    rows are NWAVE long on a log-linear grid (CTYPE1 'LOG-LINEAR')."""
    h0 = peek.header(0)
    if h0 is None or not all(key in h0 for key in ("OBJID", "NVISITS", "NWAVE", "CRVAL1")):
        return False
    h1 = peek.header(1)
    if h1 is None or h1.get("NAXIS") not in (1, 2):
        return False
    return h1.get("NAXIS1") == h0["NWAVE"] and str(h1.get("CTYPE1", "")).strip().upper() == "LOG-LINEAR"


def is_aspcapstar(peek: FilePeek) -> bool:
    """aspcapStar: HDU1 a 1-D log-linear image, HDU4 a table with APOGEE_ID and PARAM columns."""
    h1 = peek.header(1)
    if not _is_image(h1, 1) or str(h1.get("CTYPE1", "")).strip().upper() != "LOG-LINEAR":
        return False
    h4 = peek.header(4)
    if h4 is None or str(h4.get("XTENSION", "")).strip() != "BINTABLE":
        return False
    n_columns = int(h4.get("TFIELDS", 0))
    columns = {str(h4.get(f"TTYPE{i}", "")).strip().upper() for i in range(1, n_columns + 1)}
    return {"APOGEE_ID", "PARAM"} <= columns


def is_apvisit(peek: FilePeek) -> bool:
    """apVisit: primary header with OBJID, PLATE, MJD5, FIBERID; HDU1 an image of chip rows and
    HDU4 a float64 image of the same shape (the per-pixel wavelengths)."""
    h0 = peek.header(0)
    if h0 is None or not all(key in h0 for key in ("OBJID", "PLATE", "MJD5", "FIBERID")):
        return False
    h1, h4 = peek.header(1), peek.header(4)
    if not (_is_image(h1, 2) and _is_image(h4, 2)):
        return False
    same_shape = h4.get("NAXIS1") == h1.get("NAXIS1") and h4.get("NAXIS2") == h1.get("NAXIS2")
    return same_shape and h4.get("BITPIX") == -64


# --------------------------------------------------------------------------------------------
# apStar
# --------------------------------------------------------------------------------------------
@register_reader(
    "apogee_apstar",
    identify=is_apstar,
    description="APOGEE apStar file: primary header with OBJID, NVISITS, NWAVE; HDU1-3 flux, error, bitmask "
    "on the log-linear grid (CRVAL1=4.179, CDELT1=6e-6)",
    profiles=APSTAR_PROFILE,
)
def read_apstar(path: str | Path, visits: bool = False) -> list[Spectrum]:
    """Read an apStar file: the combined spectrum (row 0), and with ``visits=True`` also each visit.

    Returns records on the apStar grid (vacuum A, **rest frame**), cut into blue/green/red chips.
    The combined record has no ``observation_id``; visit records (rows 2.., only when NVISITS > 1;
    with one visit the combined spectrum is that visit) carry ``"<plate>-<mjd>-<fiber>"`` from the
    header's SFILE<k>, with VHELIO<k> and SNRVIS<k> as labels.
    """
    path = Path(path)
    with open_fits(path) as hdul:
        header = hdul[0].header
        flux_header = hdul[1].header if len(hdul) > 1 else None
        flux = np.atleast_2d(hdu_data(hdul, 1, path, "flux"))
        error = np.atleast_2d(hdu_data(hdul, 2, path, "flux error"))
        bitmask = np.atleast_2d(hdu_data(hdul, 3, path, "APOGEE_PIXMASK bitmask"))
    if not (flux.shape == error.shape == bitmask.shape):
        raise SpectrumReadError(
            path, f"flux {flux.shape}, error {error.shape} and bitmask {bitmask.shape} images differ in shape"
        )
    n_pixels = flux.shape[1]
    nwave = _header_int(header, "NWAVE")
    if nwave is not None and nwave != n_pixels:
        raise SpectrumReadError(path, f"header NWAVE={nwave} but the flux rows hold {n_pixels} pixels")
    wavelength = _grid_from_header(flux_header, header, n_pixels, path)

    object_id = header_str(header, "OBJID") or ""
    if not object_id:
        raise SpectrumReadError(path, "no OBJID in the primary header")
    nvisits = _header_int(header, "NVISITS") or 1
    first_visit_file = header_str(header, "SFILE1")
    telescope = header_str(header, "TELESCOP")
    common = dict(
        object_id=object_id,
        survey=SURVEY,
        instrument=_instrument(telescope, first_visit_file or path.name),
        product="apogee_apstar",
        frame="rest",
        normalisation="flux",
        resolution=RESOLUTION,
        flux_unit=FLUX_UNIT,
    )
    release = _release_meta(first_visit_file) or _release_meta(path.name)

    def record(row: int, observation_id, labels, meta) -> Spectrum:
        good = good_pixels(flux[row], error[row], bitmask[row])
        ivar = inverse_variance(error[row], good)
        return Spectrum(
            **common,
            observation_id=observation_id,
            segments=split_into_chips(wavelength, flux[row], ivar, good),
            labels=labels,
            provenance={"file": str(path), "hdu": f"1 flux, 2 error, 3 APOGEE_PIXMASK; row {row}"},
            meta=_meta(row=row, telescope=telescope, **release, **meta),
        )

    combined = record(
        APSTAR_COMBINED_ROW,
        None,
        _labels(
            rv_kms=header.get("VHELIO"),
            snr=header.get("SNR"),
            # DR17 only: the Doppler RV fit's template parameters (DR13 has no such keys).
            teff=header.get("RV_TEFF"),
            logg=header.get("RV_LOGG"),
            fe_h=header.get("RV_FEH"),
        ),
        dict(
            nvisits=nvisits,
            vscatter_kms=header.get("VSCATTER"),
            verr_kms=header.get("VERR"),
            labels_source="header VHELIO, SNR"
            + (", Doppler RV fit RV_TEFF/RV_LOGG/RV_FEH" if "RV_TEFF" in header else ""),
        ),
    )
    if not combined.mask.any():
        raise SpectrumReadError(path, "the combined spectrum (row 0) has no good pixel")
    records = [combined]

    if visits and nvisits > 1:
        for k in range(1, nvisits + 1):
            row = k + 1  # rows 0 and 1 are combinations
            if row >= flux.shape[0]:
                raise SpectrumReadError(path, f"NVISITS={nvisits} but the images hold only {flux.shape[0]} rows")
            visit_file = header_str(header, f"SFILE{k}")
            records.append(
                record(
                    row,
                    _visit_key_from_file_name(visit_file) or f"visit{k}",
                    _labels(rv_kms=header.get(f"VHELIO{k}"), snr=header.get(f"SNRVIS{k}")),
                    dict(
                        visit=k,
                        visit_file=visit_file,
                        bc_kms=header.get(f"BC{k}"),
                        vrad_kms=header.get(f"VRAD{k}"),
                    ),
                )
            )
    return records


# --------------------------------------------------------------------------------------------
# aspcapStar
# --------------------------------------------------------------------------------------------
#: Positions in the DR13 aspcapStar PARAM array: Teff, logg, vmicro, [M/H], [C/M], [N/M], [alpha/M], ...
ASPCAP_PARAM_INDEX = {"teff": 0, "logg": 1, "fe_h": 3, "alpha_m": 6}


@register_reader(
    "apogee_aspcapstar",
    identify=is_aspcapstar,
    description="APOGEE aspcapStar file: HDU1-2 continuum-normalised flux and error on the log-linear apStar grid, "
    "HDU4 a table with APOGEE_ID and PARAM",
    profiles=ASPCAPSTAR_PROFILE,
)
def read_aspcapstar(path: str | Path) -> list[Spectrum]:
    """Read an aspcapStar file: one continuum-normalised spectrum (vacuum A, rest frame) with
    ASPCAP's calibrated Teff, logg, [M/H] (stored as ``fe_h``) and [alpha/M] as labels."""
    path = Path(path)
    with open_fits(path) as hdul:
        header = hdul[0].header
        flux_header = hdul[1].header if len(hdul) > 1 else None
        flux = np.ravel(hdu_data(hdul, 1, path, "normalised flux"))
        error = np.ravel(hdu_data(hdul, 2, path, "flux error"))
        table = hdu_data(hdul, 4, path, "allStar table")
        wanted = ("APOGEE_ID", "PARAM", "VHELIO", "SNR", "NVISITS", "FILE")
        names = {name.upper(): name for name in table.columns.names}
        star = {key: table[names[key]][0] for key in wanted if key in names} if len(table) else {}
    if flux.shape != error.shape:
        raise SpectrumReadError(path, f"flux {flux.shape} and error {error.shape} differ in shape")
    wavelength = _grid_from_header(flux_header, header, flux.shape[0], path)

    object_id = _text(star.get("APOGEE_ID")) or header_str(header, "OBJ") or ""
    if not object_id:
        raise SpectrumReadError(path, "no APOGEE_ID in the HDU4 table and no OBJ in the primary header")
    param = np.ravel(star["PARAM"]) if "PARAM" in star else np.array([])
    from_param = {name: (param[i] if i < param.size else None) for name, i in ASPCAP_PARAM_INDEX.items()}
    labels = _labels(
        rv_kms=star.get("VHELIO", header.get("VHELIO")),
        snr=star.get("SNR", header.get("SNR")),
        **from_param,
    )

    good = good_pixels(flux, error)
    ivar = inverse_variance(error, good)
    source_file = _text(star.get("FILE"))  # e.g. "apStar-r6-2M00452143+1634446"
    return [
        Spectrum(
            object_id=object_id,
            survey=SURVEY,
            instrument=_instrument(header_str(header, "TELESCOP"), source_file),
            product="apogee_aspcapstar",
            segments=split_into_chips(wavelength, flux, ivar, good),
            frame="rest",
            normalisation="continuum",
            resolution=RESOLUTION,
            flux_unit="",
            labels=labels,
            provenance={"file": str(path), "hdu": "1 normalised flux, 2 error, 4 table (PARAM, VHELIO, SNR)"},
            meta=_meta(
                nvisits=star.get("NVISITS", header.get("NVISITS")),
                source_file=source_file,
                labels_source="ASPCAP PARAM (calibrated); fe_h is [M/H]",
                **_release_meta(source_file),
            ),
        )
    ]


# --------------------------------------------------------------------------------------------
# apVisit
# --------------------------------------------------------------------------------------------
@register_reader(
    "apogee_apvisit",
    identify=is_apvisit,
    description="APOGEE apVisit file: primary header with OBJID, PLATE, MJD5, FIBERID; HDU1-3 flux, error, bitmask "
    "(chips x pixels), HDU4 per-pixel wavelength",
    profiles=APVISIT_PROFILE,
)
def read_apvisit(path: str | Path) -> list[Spectrum]:
    """Read an apVisit file: one visit, three chip segments in increasing wavelength, vacuum A,
    **observed (topocentric) frame**, not shifted by any velocity."""
    path = Path(path)
    with open_fits(path) as hdul:
        header = hdul[0].header
        flux = np.atleast_2d(hdu_data(hdul, 1, path, "flux"))
        error = np.atleast_2d(hdu_data(hdul, 2, path, "flux error"))
        bitmask = np.atleast_2d(hdu_data(hdul, 3, path, "APOGEE_PIXMASK bitmask"))
        wavelength = np.atleast_2d(hdu_data(hdul, 4, path, "wavelength")).astype(np.float64)
    if not (flux.shape == error.shape == bitmask.shape == wavelength.shape):
        raise SpectrumReadError(
            path,
            f"flux {flux.shape}, error {error.shape}, bitmask {bitmask.shape} and wavelength {wavelength.shape} "
            "images differ in shape",
        )
    if flux.shape[0] != len(CHIP_NAMES):
        raise SpectrumReadError(path, f"expected {len(CHIP_NAMES)} chip rows, found {flux.shape[0]}")

    chips = []
    for row in range(flux.shape[0]):
        order = slice(None, None, -1) if wavelength[row, 0] > wavelength[row, -1] else slice(None)
        good = good_pixels(flux[row], error[row], bitmask[row])
        chips.append(
            (wavelength[row][order], flux[row][order], inverse_variance(error[row], good)[order], good[order])
        )
    chips.sort(key=lambda chip: chip[0][0])
    segments = [Segment(name, *chip) for name, chip in zip(CHIP_NAMES, chips)]

    object_id = header_str(header, "OBJID") or ""
    if not object_id:
        raise SpectrumReadError(path, "no OBJID in the primary header")
    plate, mjd, fiber = header_str(header, "PLATE"), _header_int(header, "MJD5"), _header_int(header, "FIBERID")
    if not plate or mjd is None or fiber is None:
        raise SpectrumReadError(path, "PLATE, MJD5 or FIBERID missing from the primary header")
    telescope = header_str(header, "TELESCOP")
    return [
        Spectrum(
            object_id=object_id,
            survey=SURVEY,
            instrument=_instrument(telescope, path.name),
            product="apogee_apvisit",
            observation_id=visit_key(plate, mjd, fiber),
            segments=segments,
            frame="observed",
            normalisation="flux",
            resolution=RESOLUTION,
            flux_unit=FLUX_UNIT,
            labels=_labels(rv_kms=header.get("VHELIO"), snr=header.get("SNR")),
            provenance={"file": str(path), "hdu": "1 flux, 2 error, 3 APOGEE_PIXMASK, 4 wavelength"},
            meta=_meta(
                frame_detail="topocentric (not barycentric-corrected, not RV-shifted)",
                vrad_kms=header.get("VRAD"),
                bc_kms=header.get("BC"),
                mjd=mjd,
                plate=plate,
                fiber=fiber,
                telescope=telescope,
                v_apred=header.get("V_APRED"),  # reduction software version, e.g. "v3_15" (DR13)
            ),
        )
    ]
