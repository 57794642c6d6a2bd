"""Readers for GALAH spectra taken with HERMES at the Anglo-Australian Telescope.

Three products, three registered readers:

``galah_dr3``
    GALAH DR3 reduced spectra, one FITS file per CCD (``<sobject_id><ccd>.fits``, ccd 1..4 =
    blue, green, red, IR). The four files of a star are read together and give **two** records:
    ``galah_dr3`` (continuum-normalised, rest frame, ext 4) and ``galah_dr3_observed``
    (un-normalised counts, barycentric observed frame, ext 0).
``galah_pipeline6``
    IRAF reduction pipeline 6.0 (the DR4-era reduction), also one file per CCD, with the
    line-spread-function FWHM of every pixel (ext 7). One record: the normalised spectrum, in the
    barycentric observed frame.
``galah_dr4``
    GALAH DR4 "allstar" fit tables (observed normalised flux, error, model, fit mask). One record,
    rest frame (presumed).

Wavelengths: every GALAH product gives **air** wavelengths, without saying so in the file (GALAH
convention; the Halpha core of the DR3 ext 4 and DR4 spectra sits at 6562.8 A, its air wavelength,
not at its vacuum wavelength 6564.6 A). The readers convert pixel centres to vacuum on read with
:func:`stellarfield.physics.air_vacuum.air_to_vacuum` and record
``meta["wavelength_medium_in_file"] = "air"``. The shift is +1.32 A at 4713 A, +1.57 A at 5650 A,
+1.79 A at 6480 A and +2.09 A at 7585 A.

Identifiers: ``object_id`` is the 15-digit ``sobject_id`` (``yymmddrrrr`` night + run,
``yy`` combination code, ``ppp`` pivot; see ``db_description.txt`` of pipeline 6). It names an
*observation* of a star, not the star: two sobject_ids can be the same star (the GALAH/Gaia ids
are kept in ``meta`` where the file gives them).

Sources: the GALAH DR3 spectra page (``the-galah-survey.github.io``, ``dr3/the_spectra.md``), the
pipeline 6.0 documentation shipped with the data (``folder_and_file_structure.txt``,
``db_description.txt``, ``flags_description.txt``), and the checks recorded in the NOTES.md of
``shared/data/galah/``.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from stellarfield.io.errors import SpectrumReadError
from stellarfield.io.fits_utils import (
    checked_air_to_vacuum,
    hdu_data,
    header_float,
    header_str,
    linear_wcs_wavelength,
    open_fits,
)
from stellarfield.io.peek import FilePeek
from stellarfield.io.profile import O2_A_BAND_VACUUM_A, HeaderUnit, ProductProfile, RVReferenceKeys
from stellarfield.io.registry import register_auxiliary, register_reader
from stellarfield.physics.air_vacuum import METHOD as AIR_TO_VACUUM_METHOD
from stellarfield.physics.doppler import C_KMS
from stellarfield.spectrum import Segment, Spectrum

SURVEY = "GALAH"
INSTRUMENT = "HERMES"
#: Nominal resolving power of HERMES in its GALAH (high-resolution) mode: R ~ 28,000
#: (Sheinis et al. 2015, JATIS 1, 035002; De Silva et al. 2015, MNRAS 449, 2604).
HERMES_RESOLUTION = 28000.0

#: The four HERMES cameras (CCDs): 1 blue, 2 green, 3 red, 4 IR.
CCDS = (1, 2, 3, 4)
#: Header SPECTID of each camera, as found in the DR3 and pipeline 6 files.
SPECTID_TO_CCD = {"BL": 1, "GN": 2, "RD": 3, "RR": 4}
#: The CCD whose S/N becomes the ``snr`` label (green: the one the GALAH papers usually quote).
SNR_CCD = 2
#: Nominal centre (air Angstrom) of each CCD's window, used to name the DR4 windows.
CCD_CENTRE_AIR_A = {1: 4805.0, 2: 5760.0, 3: 6605.0, 4: 7735.0}

#: ``<sobject_id (15 digits)><ccd 1-4>.fits[.gz]``: the per-CCD file name of DR3 and pipeline 6.
_CCD_FILE_NAME = re.compile(r"^(?P<sobject_id>\d{15})(?P<ccd>[1-4])(?P<suffix>\.fits?(?:\.gz)?)$", re.IGNORECASE)
#: ``<sobject_id>_allstar_fit_spectrum.fits``: the DR4 fit table file name.
_DR4_FILE_NAME = re.compile(r"^(?P<sobject_id>\d{15})_")

AIR_META = {"wavelength_medium_in_file": "air", "air_to_vacuum": AIR_TO_VACUUM_METHOD}

#: The four HERMES windows span 4713-7888 A in air (shared/data/README.md), 4714-7890 A in vacuum;
#: DR4's fit tables start lower, at 4675 A (vacuum, shared/data/galah/dr4).
HERMES_RANGE_A = (4714.0, 7890.0)
DR4_RANGE_A = (4675.0, 7890.0)
#: CCD4 holds the O2 A band: masked in training and scores (:data:`~stellarfield.io.profile.O2_A_BAND_VACUUM_A`).
TELLURIC_BANDS_A = (O2_A_BAND_VACUUM_A,)
#: Wavelength axis unit of the DR3 and pipeline-6 per-CCD files.
_ANGSTROM_AXIS = HeaderUnit(0, "CUNIT1", "angstrom")
DR3_PROFILE = ProductProfile(
    "galah_dr3", "GALAH DR3 (normalised)", HERMES_RANGE_A, frame="rest", normalisation="continuum",
    continuum_degree=1, telluric_bands_A=TELLURIC_BANDS_A, header_units=(_ANGSTROM_AXIS, HeaderUnit(4, "CUNIT1", "angstrom")),
)
DR3_OBSERVED_PROFILE = ProductProfile(
    "galah_dr3_observed", "GALAH DR3 (observed)", HERMES_RANGE_A, frame="observed", normalisation="flux",
    continuum_degree=3, telluric_bands_A=TELLURIC_BANDS_A, bench_normalisation="median",
    rv_references=(RVReferenceKeys("wcs", "fitted (barycentric) vs c (CRVAL1[ext0]/CRVAL1[ext4] - 1) (barycentric)",
                                   "labels.rv_kms"),),
    header_units=(_ANGSTROM_AXIS,),
)
PIPELINE6_PROFILE = ProductProfile(
    "galah_pipeline6", "GALAH pipeline 6", HERMES_RANGE_A, frame="observed", normalisation="continuum",
    continuum_degree=1, telluric_bands_A=TELLURIC_BANDS_A,
    rv_references=(RVReferenceKeys("rv_com", "fitted (barycentric) vs pipeline 6 rv_com (barycentric)", "labels.rv_kms"),),
    header_units=(_ANGSTROM_AXIS,),
)
DR4_PROFILE = ProductProfile(
    "galah_dr4", "GALAH DR4", DR4_RANGE_A, frame="rest", normalisation="continuum", continuum_degree=1,
    telluric_bands_A=TELLURIC_BANDS_A,
)


# ----------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------
def _extname(peek: FilePeek, index: int) -> str | None:
    header = peek.header(index)
    if header is None:
        return None
    return str(header.get("EXTNAME", "")).strip()


def _table_columns(header) -> set[str]:
    """Lower-case column names of a BINTABLE header (empty set for anything else)."""
    if header is None or str(header.get("XTENSION", "")).strip() != "BINTABLE":
        return set()
    n = int(header.get("TFIELDS", 0))
    return {str(header.get(f"TTYPE{i}", "")).strip().lower() for i in range(1, n + 1)}


def _relative_error_segment(
    name: str,
    wavelength_vac: np.ndarray,
    flux: np.ndarray,
    relative_error: np.ndarray,
    good: np.ndarray | None = None,
    lsf_fwhm: np.ndarray | None = None,
) -> Segment:
    """A segment whose noise is given as a relative error: sigma = relative_error * flux.

    A pixel is good where flux and relative error are finite and both > 0 (and ``good``, if
    given). A non-positive flux cannot carry a relative error (sigma = rel * flux would be <= 0;
    in the files the relative error there has either sign), so such pixels are masked: they are
    sky/telluric residuals, mostly at the blue end of CCD4 (O2 A band) and near CCD edges.
    """
    flux = np.asarray(flux, dtype=np.float64)
    rel = np.asarray(relative_error, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(flux) & np.isfinite(rel) & (rel > 0) & (flux > 0)
    if good is not None:
        ok &= good
    sigma = np.where(ok, rel * flux, 1.0)
    ivar = np.where(ok, 1.0 / sigma**2, 0.0)
    return Segment(name, wavelength_vac, flux, ivar, ok, lsf_fwhm=lsf_fwhm)


def _snr_from_relative_error(relative_error: np.ndarray, good: np.ndarray) -> float:
    """Median over good pixels of 1 / relative error: S/N per pixel (NaN if no good pixel).

    This reproduces the pipeline's own SNR keyword: in the pipeline-6 files header SNR equals
    1 / median(relative_error) of the same CCD.
    """
    rel = np.asarray(relative_error, dtype=np.float64)[good]
    return float(np.median(1.0 / rel)) if rel.size else float("nan")


def _wcs_air_wavelength(header, n: int, path: Path, ext: int) -> np.ndarray:
    try:
        return linear_wcs_wavelength(header, n)
    except (KeyError, TypeError, ValueError) as exc:
        raise SpectrumReadError(path, f"extension {ext} has no usable linear wavelength WCS (CRVAL1/CDELT1): {exc}") from None


def _naxis1(header, data: np.ndarray, path: Path, ext: int) -> int:
    """Pixel count from NAXIS1 (it varies from file to file), checked against the data."""
    n = int(header.get("NAXIS1", -1))
    if data.ndim != 1 or data.shape[0] != n:
        raise SpectrumReadError(path, f"extension {ext} holds data of shape {data.shape}, header NAXIS1={n}")
    return n


def _ccd_from_spectid(header) -> int | None:
    return SPECTID_TO_CCD.get(str(header.get("SPECTID", "")).strip().upper())


@dataclass(frozen=True)
class _CcdFiles:
    """The per-CCD files of one observation found next to the file that was asked for."""

    sobject_id: str
    files: dict[int, Path]  # ccd -> file, only those that exist

    @property
    def missing(self) -> list[int]:
        return [ccd for ccd in CCDS if ccd not in self.files]


def _find_ccd_files(path: Path, id_from_header: Callable[[object, Path], str]) -> _CcdFiles:
    """The 1..4 CCD files of ``path``'s observation.

    With the standard name ``<sobject_id><ccd>.fits`` the siblings are found by name in the same
    folder. Otherwise the file is read alone: its CCD comes from the SPECTID header and its
    sobject_id from ``id_from_header``.
    """
    match = _CCD_FILE_NAME.match(path.name)
    if match:
        sid, suffix = match["sobject_id"], match["suffix"]
        files = {ccd: path.with_name(f"{sid}{ccd}{suffix}") for ccd in CCDS}
        return _CcdFiles(sid, {ccd: f for ccd, f in files.items() if f.exists()})
    with open_fits(path) as hdul:
        header = hdul[0].header
        ccd = _ccd_from_spectid(header)
        if ccd is None:
            raise SpectrumReadError(
                path, "cannot tell which HERMES CCD this is: the name is not <sobject_id><ccd>.fits and SPECTID is not BL/GN/RD/RR"
            )
        return _CcdFiles(id_from_header(header, path), {ccd: path})


def _ccd_unit_key(prefix: str, path: Path) -> str:
    """``prefix:<folder>/<sobject_id>`` for per-CCD files (all 4 CCDs share it), else the path."""
    path = Path(path)
    match = _CCD_FILE_NAME.match(path.name)
    if match is None:
        return f"{prefix}:{path.resolve()}"
    return f"{prefix}:{path.parent.resolve() / match['sobject_id']}"


def _check_ccd_header(header, path: Path, ccd: int, sobject_id: str, object_key: str | None) -> None:
    """The file's SPECTID (and OBJECT, where it is the sobject_id) must agree with its name."""
    spectid_ccd = _ccd_from_spectid(header)
    if spectid_ccd is not None and spectid_ccd != ccd:
        raise SpectrumReadError(path, f"file name says CCD {ccd}, header SPECTID={header.get('SPECTID')!r} says CCD {spectid_ccd}")
    if object_key is not None:
        value = header_str(header, object_key, "")
        if re.fullmatch(r"\d{15}", value or "") and value != sobject_id:
            raise SpectrumReadError(path, f"file name says sobject_id {sobject_id}, header {object_key}={value!r}")


def _provenance(files: dict[int, Path], hdu: str) -> dict[str, str]:
    ordered = [str(files[ccd]) for ccd in sorted(files)]
    return {"file": ordered[0], "files": ";".join(ordered), "hdu": hdu}


def _scalar(value):
    """A header value as a JSON scalar (astropy may hand back numpy or Undefined values)."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    return None if value is None else str(value).strip()


# ----------------------------------------------------------------------------------------------
# GALAH DR3: <sobject_id><ccd>.fits, 5 image HDUs
# ----------------------------------------------------------------------------------------------
#: EXTNAMEs of DR3 extensions 1-4 (8 of the 228 files here leave ext 1 and ext 3 unnamed).
DR3_EXTNAMES = {1: "input_sigma", 2: "no_sky_subspectrum", 3: "no_sky_sigma", 4: "normalised spectra"}


def identify_galah_dr3(peek: FilePeek) -> bool:
    """A GALAH DR3 per-CCD file: ext 0 says ORIGIN='GALAH DR3', or at least two of extensions
    1-4 carry their DR3 names (input_sigma, no_sky_subspectrum, no_sky_sigma, normalised spectra)."""
    try:
        header = peek.header(0)
        if header is None:
            return False
        if str(header.get("ORIGIN", "")).strip().upper() == "GALAH DR3":
            return True
        return sum(_extname(peek, i) == name for i, name in DR3_EXTNAMES.items()) >= 2
    except Exception:
        return False


def _dr3_object_id(header, path: Path) -> str:
    return header_str(header, "OBJECT", "") or path.stem


@dataclass
class _Dr3Ccd:
    ccd: int
    observed: Segment  # ext 0, barycentric observed frame
    normalised: Segment | None  # ext 4, rest frame (None where the file lacks ext 4)
    rv_kms: float  # implied by the ext 0 and ext 4 WCSs (NaN without ext 4)
    snr: float
    header: object  # ext 0 header


def _read_dr3_ccd(path: Path, ccd: int, sobject_id: str) -> _Dr3Ccd:
    name = f"ccd{ccd}"
    with open_fits(path) as hdul:
        h0 = hdul[0].header
        _check_ccd_header(h0, path, ccd, sobject_id, "OBJECT")
        flux = np.asarray(hdu_data(hdul, 0, path, "flux, observed frame"), dtype=np.float64)
        rel = np.asarray(hdu_data(hdul, 1, path, "input_sigma, relative error"), dtype=np.float64)
        n = _naxis1(h0, flux, path, 0)
        _naxis1(hdul[1].header, rel, path, 1)
        observed_air = _wcs_air_wavelength(h0, n, path, 0)
        normalised_flux = h4 = None
        if len(hdul) > 4:  # 227 DR3 stars lack the normalised extension (DR3 spectra page)
            h4 = hdul[4].header
            normalised_flux = np.asarray(hdu_data(hdul, 4, path, "normalised spectra, rest frame"), dtype=np.float64)
            _naxis1(h4, normalised_flux, path, 4)
            if normalised_flux.shape[0] != n:
                raise SpectrumReadError(path, f"ext 4 has {normalised_flux.shape[0]} pixels, ext 0 has {n}")
            rest_air = _wcs_air_wavelength(h4, n, path, 4)

    observed = _relative_error_segment(name, checked_air_to_vacuum(observed_air, path, DR3_OBSERVED_PROFILE), flux, rel)
    normalised, rv_kms = None, float("nan")
    if normalised_flux is not None:
        # ext 4 is ext 0's pixels relabelled to the rest frame (CDELT1 and CRVAL1 scale by the
        # same factor 1 + v/c), so the relative error of ext 1 applies pixel by pixel.
        normalised = _relative_error_segment(name, checked_air_to_vacuum(rest_air, path, DR3_PROFILE), normalised_flux, rel,
                                             good=observed.mask)
        rv_kms = C_KMS * (float(h0["CRVAL1"]) / float(h4["CRVAL1"]) - 1.0)
    return _Dr3Ccd(ccd, observed, normalised, rv_kms, _snr_from_relative_error(rel, observed.mask), h0)


@register_reader(
    "galah_dr3",
    identify=identify_galah_dr3,
    description="GALAH DR3 per-CCD FITS <sobject_id><ccd>.fits: ext 0 flux (ORIGIN='GALAH DR3'), ext 1 input_sigma, ext 4 normalised spectra",
    unit_key=functools.partial(_ccd_unit_key, "galah_dr3"),
    profiles=(DR3_PROFILE, DR3_OBSERVED_PROFILE),
)
def read_galah_dr3(path: str | Path) -> list[Spectrum]:
    """Read the four CCD files of a GALAH DR3 star, given any one of them.

    Returns up to two records with one segment per CCD present (``"ccd1"``..``"ccd4"``, each on
    its own grid from its own WCS; NAXIS1 is 4096, 4097, 4111 or 4112 in the files here):

    ``galah_dr3``
        ext 4, pseudo-continuum normalised, **rest frame**. Error: the relative error of ext 1
        times the ext 4 flux, as the DR3 spectra page says ("To calculate absolute error multiply
        with first extension for unnormalised error, and [the] fifth extension for
        pseudo-continuum normalised error"; the-galah-survey.github.io, ``dr3/the_spectra.md``).
    ``galah_dr3_observed``
        ext 0, sky-subtracted counts (no unit in the file), **observed frame**: barycentric. (Sky
        emission lines in ext 2 - ext 0, which are topocentric, move by 1.00 x BARYEFF between
        the CCD4 spectra of 55 stars here, so ext 0's wavelengths are barycentric-corrected.)
        Error: relative error (ext 1) times ext 0.

    Masks (both records): a pixel is good where flux and relative error are finite and > 0 in
    ext 0 (and in ext 4 for the normalised record). Over the 228 files here no value is NaN;
    up to 137 pixels per file have flux <= 0 (ext 0 and ext 4 agree in sign) and up to 137 a
    relative error <= 0, mostly at the blue end of CCD4 (O2 A band).

    Labels (same in both records): ``rv_kms`` = c (CRVAL1[ext 0] / CRVAL1[ext 4] - 1), the
    barycentric radial velocity implied by the two WCSs, median over CCDs (they agree to 1e-8
    km/s; spread in ``meta["rv_spread_kms"]``); ``snr`` = median of 1 / relative error over the
    good pixels of CCD2 (per pixel; every CCD's value is in ``meta["snr_ccdN"]``). DR3 files have
    no stellar labels.

    A missing CCD file is skipped and named in ``meta["missing_ccds"]`` (e.g. ``"ccd4"``, the
    HERMES IR-camera fault of December 2018); a CCD file without ext 4 in
    ``meta["missing_normalised_ccds"]``.
    """
    path = Path(path)
    group = _find_ccd_files(path, _dr3_object_id)
    ccds = [_read_dr3_ccd(f, ccd, group.sobject_id) for ccd, f in sorted(group.files.items())]

    rvs = np.array([c.rv_kms for c in ccds if np.isfinite(c.rv_kms)])
    by_ccd = {c.ccd: c for c in ccds}
    labels = {
        "rv_kms": float(np.median(rvs)) if rvs.size else float("nan"),
        "snr": by_ccd[SNR_CCD].snr if SNR_CCD in by_ccd else float("nan"),
    }
    h0 = ccds[0].header
    meta = {
        **AIR_META,
        "sobject_id": group.sobject_id,
        "missing_ccds": ",".join(f"ccd{k}" for k in group.missing),
        "missing_normalised_ccds": ",".join(f"ccd{c.ccd}" for c in ccds if c.normalised is None),
        "rv_spread_kms": float(np.ptp(rvs)) if rvs.size else None,
        "rv_source": "c*(CRVAL1[ext0]/CRVAL1[ext4]-1)",
        "snr_ccd": SNR_CCD,
        **{f"snr_ccd{c.ccd}": c.snr for c in ccds},
        "pipe_ver": _scalar(h0.get("PIPE_VER")),
        "baryeff_kms": header_float(h0, "BARYEFF", None),
        "utmjd": header_float(h0, "UTMJD", None),
        "molecfit": _scalar(h0.get("MOLECFIT")),
    }
    records = []
    normalised = [c.normalised for c in ccds if c.normalised is not None]
    if normalised:
        records.append(
            Spectrum(
                object_id=group.sobject_id,
                survey=SURVEY,
                instrument=INSTRUMENT,
                product="galah_dr3",
                segments=normalised,
                frame="rest",
                normalisation="continuum",
                resolution=HERMES_RESOLUTION,
                labels=dict(labels),
                provenance=_provenance(group.files, "4 (normalised spectra, rest frame); 1 (input_sigma, relative error)"),
                meta=dict(meta),
            )
        )
    records.append(
        Spectrum(
            object_id=group.sobject_id,
            survey=SURVEY,
            instrument=INSTRUMENT,
            product="galah_dr3_observed",
            segments=[c.observed for c in ccds],
            frame="observed",
            normalisation="flux",
            resolution=HERMES_RESOLUTION,
            flux_unit="",
            labels=dict(labels),
            provenance=_provenance(group.files, "0 (sky-subtracted counts, barycentric); 1 (input_sigma, relative error)"),
            meta={**meta, "velocity_frame": "barycentric", "flux_description": "sky-subtracted counts, not normalised"},
        )
    )
    return records


# ----------------------------------------------------------------------------------------------
# GALAH IRAF pipeline 6.0: <sobject_id><ccd>.fits, 8 image HDUs, + dr6.0.fits table
# ----------------------------------------------------------------------------------------------
def identify_galah_pipeline6(peek: FilePeek) -> bool:
    """A pipeline-6 per-CCD file: ext 1 ``normalized``, ext 2 ``relative_error``, ext 7
    ``resolution_profile``."""
    try:
        return (
            peek.header(0) is not None
            and _extname(peek, 1) == "normalized"
            and _extname(peek, 2) == "relative_error"
            and _extname(peek, 7) == "resolution_profile"
        )
    except Exception:
        return False


def identify_galah_dr6_table(peek: FilePeek) -> bool:
    """The pipeline-6 database (``dr6.0.fits``, nightly ``db/yymmdd.fits``): ext 1 a BINTABLE with
    sobject_id, teff_r and pipeline_version columns."""
    try:
        return {"sobject_id", "teff_r", "pipeline_version"} <= _table_columns(peek.header(1))
    except Exception:
        return False


register_auxiliary("galah_dr6_table", identify_galah_dr6_table)

#: Reduction flag bits (flags_description.txt): 16 = combined RV not computed, 17 = atmospheric
#: parameters not computed. A flagged value is "very unreliable, if it exists": set to NaN.
_FLAG_NO_RV_COMBINED = 1 << 16
_FLAG_NO_PARAMETERS = 1 << 17


def _dr6_table_candidates(folder: Path) -> list[Path]:
    """Where the pipeline-6 database of a spectrum may be (folder_and_file_structure.txt):
    ``dr6.0.fits`` next to the spectra, or ``results/yymmdd/db/yymmdd.fits`` for spectra in
    ``results/yymmdd/spectra/{all,com}/``."""
    night = folder.parent.parent
    return [folder / "dr6.0.fits", folder / "dr6.0.fits.gz", night / "db" / f"{night.name}.fits"]


@functools.lru_cache(maxsize=8)
def _dr6_table_rows(path_str: str, _mtime_ns: int) -> dict[str, dict]:
    """sobject_id -> {labels, flags} of a pipeline-6 database (cached per file version)."""
    path = Path(path_str)
    rows: dict[str, dict] = {}
    with open_fits(path) as hdul:
        table = hdu_data(hdul, 1, path, "pipeline 6 database table")
        names = {n.lower(): n for n in table.columns.names}

        def column(name: str):
            return table[names[name]] if name in names else None

        sids = column("sobject_id")
        if sids is None:
            raise SpectrumReadError(path, "database table has no sobject_id column")
        snr = column("snr")
        for i, sid in enumerate(sids):
            flags = int(column("reduction_flags")[i]) if "reduction_flags" in names else 0
            labels = {}
            for label, col in (("teff", "teff_r"), ("logg", "logg_r"), ("fe_h", "fe_h_r"), ("alpha_m", "alpha_fe_r"), ("rv_kms", "rv_com")):
                values = column(col)
                labels[label] = _as_float(values[i]) if values is not None else float("nan")
            labels["snr"] = _as_float(np.ravel(snr[i])[SNR_CCD - 1]) if snr is not None else float("nan")
            rows[str(int(sid))] = {"labels": labels, "reduction_flags": flags}
    return rows


def _as_float(value) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return float("nan")
    return value if np.isfinite(value) else float("nan")


def _pipeline6_labels(folder: Path, sobject_id: str, headers: dict[int, object]) -> tuple[dict[str, float], dict]:
    """Labels of one pipeline-6 observation from its database table, else from the headers.

    Mapping: teff_r -> teff, logg_r -> logg, fe_h_r -> fe_h, alpha_fe_r ([alpha/Fe]) -> alpha_m,
    rv_com -> rv_kms, snr[CCD2] -> snr. These are the reduction pipeline's quick neural-network
    estimates (db_description.txt), not final DR4 labels. Header fallback: TEFF_R, LOGG_R,
    FE_H_R, A_FE_R, RVCOM, SNR (of CCD2), with PAR_OK / RVCOM_OK = 0 giving NaN.
    """
    for table in _dr6_table_candidates(folder):
        if not table.is_file():
            continue
        try:
            row = _dr6_table_rows(str(table.resolve()), table.stat().st_mtime_ns).get(sobject_id)
        except SpectrumReadError:
            continue
        if row is None:
            continue
        labels, flags = dict(row["labels"]), row["reduction_flags"]
        if flags & _FLAG_NO_RV_COMBINED:
            labels["rv_kms"] = float("nan")
        if flags & _FLAG_NO_PARAMETERS:
            labels.update(teff=float("nan"), logg=float("nan"), fe_h=float("nan"), alpha_m=float("nan"))
        return labels, {"label_source": table.name, "reduction_flags": flags}

    h = headers.get(SNR_CCD) or next(iter(headers.values()))
    labels = {
        "teff": header_float(h, "TEFF_R"),
        "logg": header_float(h, "LOGG_R"),
        "fe_h": header_float(h, "FE_H_R"),
        "alpha_m": header_float(h, "A_FE_R"),
        "rv_kms": header_float(h, "RVCOM"),
        "snr": header_float(headers[SNR_CCD], "SNR") if SNR_CCD in headers else float("nan"),
    }
    if header_float(h, "PAR_OK", 1.0) == 0:
        labels.update(teff=float("nan"), logg=float("nan"), fe_h=float("nan"), alpha_m=float("nan"))
    if header_float(h, "RVCOM_OK", 1.0) == 0:
        labels["rv_kms"] = float("nan")
    return labels, {"label_source": "header"}


def _pipeline6_object_id(header, path: Path) -> str:
    """Pipeline-6 headers do not carry the sobject_id (only the file name does)."""
    return path.name.split(".")[0]


def _read_pipeline6_ccd(path: Path, ccd: int) -> tuple[Segment, object]:
    with open_fits(path) as hdul:
        h0 = hdul[0].header
        _check_ccd_header(h0, path, ccd, "", None)
        h1 = hdul[1].header
        flux = np.asarray(hdu_data(hdul, 1, path, "normalized"), dtype=np.float64)
        rel = np.asarray(hdu_data(hdul, 2, path, "relative_error"), dtype=np.float64)
        fwhm_air = np.asarray(hdu_data(hdul, 7, path, "resolution_profile, LSF FWHM in air Angstrom"), dtype=np.float64)
        n = _naxis1(h1, flux, path, 1)
        _naxis1(hdul[2].header, rel, path, 2)
        _naxis1(hdul[7].header, fwhm_air, path, 7)
        wave_air = _wcs_air_wavelength(h1, n, path, 1)
    wave_vac = checked_air_to_vacuum(wave_air, path, PIPELINE6_PROFILE)
    # A width in air Angstrom becomes a width in vacuum Angstrom through the local derivative
    # d(lambda_vac)/d(lambda_air) = 1.00028-1.00029 over 4700-7900 A.
    if n > 1:
        fwhm_vac = fwhm_air * np.gradient(wave_vac) / np.gradient(wave_air)
    else:
        fwhm_vac = fwhm_air * wave_vac / wave_air
    with np.errstate(invalid="ignore"):
        lsf_ok = np.isfinite(fwhm_vac) & (fwhm_vac > 0)
    segment = _relative_error_segment(f"ccd{ccd}", wave_vac, flux, rel, good=lsf_ok, lsf_fwhm=np.where(lsf_ok, fwhm_vac, np.nan))
    return segment, h0


@register_reader(
    "galah_pipeline6",
    identify=identify_galah_pipeline6,
    description="GALAH IRAF pipeline 6.0 per-CCD FITS <sobject_id><ccd>.fits: 8 image HDUs, ext 1 normalized, ext 2 relative_error, ext 7 resolution_profile",
    unit_key=functools.partial(_ccd_unit_key, "galah_pipeline6"),
    profiles=PIPELINE6_PROFILE,
)
def read_galah_pipeline6(path: str | Path) -> list[Spectrum]:
    """Read the four CCD files of a GALAH pipeline-6.0 observation, given any one of them.

    One record, product ``galah_pipeline6``: the **normalised** spectrum (ext 1, 5th-order
    Legendre continuum, cosmics cleaned in combined spectra), chosen over the fluxed ext 0 because
    it is the one a model of normalised spectra uses and the fluxed one is the same pixels times a
    smooth continuum. Frame ``"observed"``: the wavelengths are barycentric-corrected but not
    shifted by the star's RV (folder_and_file_structure.txt). All 8 extensions share one WCS.

    Error: sigma = relative_error (ext 2) x normalised flux ("Relative error of fluxed or
    normalised spectrum", folder_and_file_structure.txt). Mask: flux and relative error finite
    and > 0 (the relative error has the sign of ext 0: it is <= 0 exactly where the fluxed
    spectrum is, up to 121 pixels per file here, in CCD3 and CCD4 only), and a positive LSF width.

    ``Segment.lsf_fwhm``: ext 7 (``resolution_profile``) is the LSF FWHM per pixel in **air**
    Angstrom (0.20-0.40 A here); it is converted to vacuum Angstrom with the local derivative
    d(lambda_vac)/d(lambda_air). The LSF shape is exp(-0.693147 |2x/fwhm|^B), B per CCD in
    ``meta["lsf_b_ccdN"]``. ``resolution`` is None since the per-pixel LSF is given.

    Labels from the pipeline database (``dr6.0.fits``) when it is found next to the files, else
    from the headers (see :func:`_pipeline6_labels`). A missing CCD file is skipped and named
    in ``meta["missing_ccds"]``.
    """
    path = Path(path)
    group = _find_ccd_files(path, _pipeline6_object_id)
    segments, headers = [], {}
    for ccd, f in sorted(group.files.items()):
        segment, header = _read_pipeline6_ccd(f, ccd)
        segments.append(segment)
        headers[ccd] = header
    labels, label_meta = _pipeline6_labels(path.parent, group.sobject_id, headers)
    h0 = headers[min(headers)]
    meta = {
        **AIR_META,
        "sobject_id": group.sobject_id,
        "missing_ccds": ",".join(f"ccd{k}" for k in group.missing),
        **label_meta,
        "velocity_frame": "barycentric",
        "lsf": _scalar(h0.get("LSF")),
        "lsf_fwhm_medium": "vacuum (converted from air)",
        **{f"lsf_b_ccd{ccd}": header_float(h, "B", None) for ccd, h in headers.items()},
        **{f"lsf_full_ccd{ccd}": _scalar(h.get("LSF_FULL")) for ccd, h in headers.items()},
        **{f"snr_ccd{ccd}": header_float(h, "SNR", None) for ccd, h in headers.items()},
        "pipe_ver": _scalar(h0.get("PIPE_VER")),
        "baryeff_kms": header_float(h0, "BARYEFF", None),
        "utmjd": header_float(h0, "UTMJD", None),
        "gaia_id": _scalar(h0.get("GAIA_ID")),
        "obj_name": _scalar(h0.get("OBJ_NAME")),
    }
    return [
        Spectrum(
            object_id=group.sobject_id,
            survey=SURVEY,
            instrument=INSTRUMENT,
            product="galah_pipeline6",
            segments=segments,
            frame="observed",
            normalisation="continuum",
            resolution=None,
            labels=labels,
            provenance=_provenance(group.files, "1 (normalized); 2 (relative_error); 7 (resolution_profile, LSF FWHM)"),
            meta=meta,
        )
    ]


# ----------------------------------------------------------------------------------------------
# GALAH DR4: <sobject_id>_allstar_fit_spectrum.fits, BINTABLE wave/sob/uob/smod/mob
# ----------------------------------------------------------------------------------------------
DR4_COLUMNS = ("wave", "sob", "uob", "mob")
#: A jump between neighbouring DR4 wavelengths larger than this (air Angstrom) separates two CCD
#: windows: within a window the step is 0.046-0.074 A, between windows 700-950 A.
DR4_WINDOW_GAP_A = 1.0
#: A best-fit model flux above this marks a failed fit (150411003101372 reaches 4e5; sane fits <= 1.1).
DR4_SUSPECT_MODEL_FLUX = 100.0


def identify_galah_dr4(peek: FilePeek) -> bool:
    """A GALAH DR4 fit table: ext 1 a BINTABLE with columns wave, sob, uob, mob (and smod)."""
    try:
        return set(DR4_COLUMNS) <= _table_columns(peek.header(1))
    except Exception:
        return False


@register_reader(
    "galah_dr4",
    identify=identify_galah_dr4,
    description="GALAH DR4 allstar fit table: ext 1 BINTABLE with columns wave, sob, uob, smod, mob",
    profiles=DR4_PROFILE,
)
def read_galah_dr4(path: str | Path) -> list[Spectrum]:
    """Read a GALAH DR4 ``*_allstar_fit_spectrum.fits`` table (one star, one record).

    ``wave`` (air Angstrom) concatenates the four CCD windows; it is split at the jumps between
    windows into segments named by the nearest CCD (``"ccd1"``..``"ccd4"``). ``sob`` is the
    observed normalised flux, ``uob`` its absolute 1-sigma error (ivar = 1 / uob^2), ``mob`` True
    where the pixel entered the fit: mask = mob & finite & uob > 0. The model ``smod`` is dropped
    (it is the fit, not data); only its maximum is kept as a sanity check: a fit whose model
    exceeds 100 is flagged ``meta["suspect_fit"] = True`` (150411003101372, whose grid is also
    shifted by ~40 A, i.e. a wrong RV).

    The file states neither frame nor medium. Frame ``"rest"`` is presumed
    (``meta["frame_presumed"] = True``): DR4 fits are made in the rest frame, and in the three
    sane fits here the Halpha core lies at 6562.8 A, its rest air wavelength. No labels.
    """
    path = Path(path)
    with open_fits(path) as hdul:
        table = hdu_data(hdul, 1, path, "fit table wave/sob/uob/smod/mob")
        names = {n.lower(): n for n in table.columns.names} if hasattr(table, "columns") else {}
        missing = [c for c in DR4_COLUMNS if c not in names]
        if missing:
            raise SpectrumReadError(path, f"fit table lacks column(s) {missing}; has {sorted(names)}")
        wave = np.asarray(table[names["wave"]], dtype=np.float64)
        sob = np.asarray(table[names["sob"]], dtype=np.float64)
        uob = np.asarray(table[names["uob"]], dtype=np.float64)
        mob = np.asarray(table[names["mob"]], dtype=bool)
        model_max = float(np.nanmax(np.asarray(table[names["smod"]], dtype=np.float64))) if "smod" in names and len(wave) else float("nan")

    if wave.size == 0:
        raise SpectrumReadError(path, "fit table has no rows")
    starts = np.concatenate([[0], np.flatnonzero(np.diff(wave) > DR4_WINDOW_GAP_A) + 1, [wave.size]])
    segments = []
    for lo, hi in zip(starts[:-1], starts[1:]):
        w = wave[lo:hi]
        ccd = min(CCD_CENTRE_AIR_A, key=lambda k: abs(CCD_CENTRE_AIR_A[k] - np.median(w)))
        with np.errstate(invalid="ignore", divide="ignore"):
            good = mob[lo:hi] & np.isfinite(sob[lo:hi]) & np.isfinite(uob[lo:hi]) & (uob[lo:hi] > 0)
            ivar = np.where(good, 1.0 / uob[lo:hi] ** 2, 0.0)
        try:
            segments.append(Segment(f"ccd{ccd}", checked_air_to_vacuum(w, path, DR4_PROFILE), sob[lo:hi], ivar, good))
        except ValueError as exc:  # e.g. a window that is not increasing
            raise SpectrumReadError(path, f"wavelength window {w[0]:.1f}-{w[-1]:.1f} A: {exc}") from None
    names_seen = [s.name for s in segments]
    if len(set(names_seen)) != len(names_seen):
        raise SpectrumReadError(path, f"wavelength windows do not map onto the 4 HERMES CCDs one to one: {names_seen}")

    match = _DR4_FILE_NAME.match(path.name)
    object_id = match["sobject_id"] if match else path.name.split(".")[0]
    return [
        Spectrum(
            object_id=object_id,
            survey=SURVEY,
            instrument=INSTRUMENT,
            product="galah_dr4",
            segments=segments,
            frame="rest",
            normalisation="continuum",
            resolution=HERMES_RESOLUTION,
            provenance={"file": str(path), "hdu": "1 (BINTABLE: wave, sob, uob, mob; smod dropped)"},
            meta={
                **AIR_META,
                "sobject_id": object_id,
                "frame_presumed": True,
                "model_flux_max": model_max if np.isfinite(model_max) else None,
                "suspect_fit": bool(np.isfinite(model_max) and model_max > DR4_SUSPECT_MODEL_FLUX),
            },
        )
    ]
