"""LAMOST medium-resolution (MRS, R ~ 7,500) spectra: products ``lamost_mrs`` and ``lamost_mrs_exposure``.

One file (``med-<LMJD>-<PLANID>_sp<SPID>-<FIBER>.fits[.gz]``, LAMOST DR6/DR7 format) holds one star
observed on one night, through two arms:

* HDU 0 ``Information``: header only. ``TELESCOP = 'LAMOST'``, ``OBSID``, ``DESIG``, ``RA``/``DEC``
  (input-catalogue position, J2000), ``LMJD`` (local, Beijing, MJD of the night), ``MJD``,
  ``DATE-OBS`` (UTC middle of the first exposure), ``HELIO = T`` with ``HELIO_RV`` (the heliocentric
  correction applied, km/s), ``VACUUM = T``, ``NEXP_B``/``NEXP_R``, ``DATA_V``.
* ``COADD_B``, ``COADD_R``: the co-added blue (~4,900-5,390 A, 4,101-4,156 rows) and red
  (~6,270-6,870 A, 3,692-3,824 rows) arms, binary tables with one row **per pixel**: ``FLUX``,
  ``IVAR``, ``LOGLAM`` (log10 vacuum Angstrom, float32; d log10 lambda = 1e-5 exactly, the float32
  values scatter by their rounding, 0.08 km/s), ``ANDMASK``, ``ORMASK``. Header ``SNR``.
* ``B-<LMJM>``, ``R-<LMJM>``: each single exposure of each arm (``LMJM`` = local modified Julian
  **minute** of the exposure start, ``EXPTIME`` s), 4,136 rows of ``FLUX``, ``IVAR``, ``LOGLAM``,
  ``PIXMASK`` on the exposure's own, non-log-linear grid; the red exposures' LOGLAM **descends**.
  3 to 9 exposures per arm in the files checked, always paired blue/red by LMJM.

Records
    :func:`read_lamost_mrs` (the registered reader, what ingest reads) gives one record per file:
    the co-added arms as two segments ``blue`` and ``red``, ``observation_id`` = ``OBSID``.
    :func:`read_lamost_mrs_exposures` (or ``read_spectra(path, format="lamost_mrs_exposure")``) gives
    one record per exposure (its blue and red HDUs as two segments), ``observation_id`` =
    ``"<OBSID>-<LMJM>"``, with its time in ``meta``: ``lmjm``, ``exptime_s``, ``mjd_start_utc`` =
    LMJM / 1440 - 8 / 24 (LAMOST's local time is Beijing time, UTC+8: the first exposure of
    med-58268 starts at LMJM 83906016 = 01:36 local = 17:36 UTC, and ``DATE-OBS``, the middle of that
    10-minute exposure, is 17:41 UTC), ``mjd_mid_utc`` = start + EXPTIME / 2 (LMJM is truncated to
    the minute: +-1 min).

Wavelength, frame, flux
    Vacuum wavelengths, ``10**LOGLAM``, sorted to increase. Heliocentric (observed) frame: the
    spectra are not shifted to rest, and the headers give no stellar RV, so there is no ``rv_kms``.
    Flux is in counts, not flux-calibrated (normalisation ``"flux"``, ``flux_unit`` ""); ``ivar``
    is its inverse variance. Good pixels: ``IVAR > 0`` and ``ANDMASK == 0`` (co-adds; the or-mask
    is kept out as for LAMOST LRS, see :mod:`.lamost`) or ``PIXMASK == 0`` (exposures).

Bad data
    An arm whose good pixels have a median signal-to-noise (``FLUX * sqrt(IVAR)``) below
    :data:`MIN_ARM_SNR` carries no usable starlight: all its pixels are masked, and ``meta`` says
    so (``quality = "bad"``, ``bad_arms``, ``quality_reason``; every record has ``quality`` and the
    per-arm ``snr_blue`` / ``snr_red``). In the 8 files here the first two nights of KIC 8098300
    (LMJD 58268 and 58269) are such: median S/N -0.1 and 1.0 (blue, red) and 0.2 and 1.0, their
    single exposures -0.2 to 0.9, against 26-281 in the co-adds and 3.9-106 in the exposures of the
    other nights. Both arms are masked, so their records have no good pixel and ingest skips them
    with that reason; they are never trained on.

Identifiers
    ``object_id`` is the LAMOST designation ``DESIG`` (``"LAMOST J192814.09+435531.0"``). LAMOST
    builds it from the input catalogue of each plan, so one star can carry several: KIC 8098300 is
    ``J192814.09+435531.0`` in six MRS files, ``J192814.09+435530.7`` in med-58649 (0.3 arcsec away)
    and ``J192814.09+435530.8`` in its LRS file. ``star_id`` starts as the designation and ``meta``
    keeps the position (``ra_deg``, ``dec_deg``), by which a dataset resolves them into one star
    (:mod:`stellarfield.data.stars`). ``meta["objname"]``/``["tsource"]`` keep the input-catalogue
    name and source (different catalogues for different plans).

Labels
    ``snr``: the blue co-add's header ``SNR`` (exposure records: that exposure's blue ``SNR``);
    no stellar parameters in the files.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from stellarfield.io.errors import SpectrumReadError
from stellarfield.io.fits_utils import header_float, header_str, open_fits
from stellarfield.io.peek import FilePeek
from stellarfield.io.profile import ProductProfile
from stellarfield.io.registry import register_reader
from stellarfield.spectrum import Segment, Spectrum

PRODUCT = "lamost_mrs"
EXPOSURE_PRODUCT = "lamost_mrs_exposure"
#: Nominal resolving power of LAMOST MRS (Liu et al. 2020, arXiv:2005.07210).
RESOLUTION = 7500.0
#: Below this median per-pixel S/N an arm holds no usable starlight and is masked.
MIN_ARM_SNR = 2.0
#: Local (Beijing) time minus UTC, in days: LMJD / LMJM count in local time.
LOCAL_MINUS_UTC_DAYS = 8.0 / 24.0
#: Extension names: co-added arms and single exposures.
COADD_EXTENSIONS = {"blue": "COADD_B", "red": "COADD_R"}
EXPOSURE_EXTENSION = re.compile(r"^([BR])-(\d+)$")
ARM_OF_LETTER = {"B": "blue", "R": "red"}

#: Blue arm 4900-5390 A, red arm 6310-6870 A, vacuum, heliocentric (shared/data/lamost_laspec/NOTES.md).
MRS_RANGE_A = (4900.0, 6870.0)
PROFILE = ProductProfile(PRODUCT, "LAMOST MRS", MRS_RANGE_A, frame="observed", normalisation="flux", continuum_degree=2)
EXPOSURE_PROFILE = ProductProfile(EXPOSURE_PRODUCT, "LAMOST MRS exposure", MRS_RANGE_A, frame="observed",
                                  normalisation="flux", continuum_degree=2)


def _is_mrs_table(header) -> bool:
    if header is None or str(header.get("XTENSION", "")).strip() != "BINTABLE":
        return False
    name = str(header.get("EXTNAME", "")).strip()
    columns = {str(header.get(f"TTYPE{i}", "")).strip().upper() for i in range(1, int(header.get("TFIELDS", 0)) + 1)}
    return (name in COADD_EXTENSIONS.values() or bool(EXPOSURE_EXTENSION.match(name))) and {"FLUX", "IVAR", "LOGLAM"} <= columns


def identify(peek: FilePeek) -> bool:
    """A LAMOST header-only primary HDU followed by MRS arm tables (COADD_B/COADD_R or B-/R-<LMJM>) with FLUX, IVAR, LOGLAM."""
    header = peek.header(0)
    if header is None or header.get("NAXIS") != 0:
        return False
    if not str(header.get("TELESCOP", "")).strip().upper().startswith("LAMOST"):
        return False
    return _is_mrs_table(peek.header(1))


def _never(peek: FilePeek) -> bool:
    """The exposure product is read on request only; ingest reads the co-adds."""
    return False


@register_reader(
    PRODUCT,
    identify=identify,
    description="LAMOST MRS file: TELESCOP='LAMOST' header-only primary, then binary tables COADD_B/COADD_R "
    "and B-/R-<LMJM> exposures with columns FLUX, IVAR, LOGLAM",
    profiles=PROFILE,
)
def read_lamost_mrs(path: str | Path) -> list[Spectrum]:
    """Read one LAMOST MRS file into one record: the co-added blue and red arms."""
    path = Path(path)
    with open_fits(path) as hdul:
        header = hdul[0].header
        names = [hdu.name for hdu in hdul]
        arms = {}
        for arm, extension in COADD_EXTENSIONS.items():
            if extension in names:
                arms[arm] = _arm(hdul[extension], path, "ANDMASK")
    if not arms:
        raise SpectrumReadError(path, f"no co-added arm (extensions {sorted(COADD_EXTENSIONS.values())}); HDUs: {names}")
    meta = _file_meta(header, path)
    meta["nexp_blue"] = int(header_float(header, "NEXP_B", 0))
    meta["nexp_red"] = int(header_float(header, "NEXP_R", 0))
    meta["exposures_lmjm"] = ",".join(sorted({m.group(2) for n in names if (m := EXPOSURE_EXTENSION.match(n))}))
    meta["mask_rule"] = "IVAR > 0 and ANDMASK == 0; an arm with median S/N < 2 is masked whole"
    return [_record(path, header, arms, PRODUCT, str(meta["obsid"]), meta, "COADD_B/COADD_R")]


@register_reader(
    EXPOSURE_PRODUCT,
    identify=_never,
    description="LAMOST MRS single exposures (on request only: read_spectra(path, format='lamost_mrs_exposure'))",
    profiles=EXPOSURE_PROFILE,
)
def read_lamost_mrs_exposures(path: str | Path) -> list[Spectrum]:
    """Read every single exposure of a LAMOST MRS file: one record per LMJM, blue and red arms as segments."""
    path = Path(path)
    with open_fits(path) as hdul:
        header = hdul[0].header
        by_time: dict[str, dict[str, tuple]] = {}
        exptime: dict[str, float] = {}
        for hdu in hdul[1:]:
            match = EXPOSURE_EXTENSION.match(hdu.name)
            if not match:
                continue
            letter, lmjm = match.groups()
            by_time.setdefault(lmjm, {})[ARM_OF_LETTER[letter]] = _arm(hdu, path, "PIXMASK")
            exptime.setdefault(lmjm, header_float(hdu.header, "EXPTIME"))
    if not by_time:
        raise SpectrumReadError(path, "no single-exposure extension (B-<LMJM> / R-<LMJM>) in the file")
    base = _file_meta(header, path)
    obsid = base["obsid"]
    records = []
    for lmjm in sorted(by_time):
        start = int(lmjm) / 1440.0 - LOCAL_MINUS_UTC_DAYS
        meta = dict(base)
        meta.update(
            lmjm=int(lmjm),
            exptime_s=exptime[lmjm],
            mjd_start_utc=start,
            mjd_mid_utc=start + (exptime[lmjm] / 2.0 / 86400.0 if np.isfinite(exptime[lmjm]) else 0.0),
            mask_rule="IVAR > 0 and PIXMASK == 0; an arm with median S/N < 2 is masked whole",
        )
        records.append(
            _record(path, header, by_time[lmjm], EXPOSURE_PRODUCT, f"{obsid}-{lmjm}", meta, f"B-{lmjm}/R-{lmjm}")
        )
    return records


def _arm(hdu, path: Path, mask_column: str) -> tuple[Segment, float, float]:
    """(segment on an increasing grid, median S/N of its good pixels, header SNR) of one arm table."""
    data = hdu.data
    if data is None or len(data) == 0:
        raise SpectrumReadError(path, f"extension {hdu.name!r} holds no rows")
    columns = {c.upper() for c in data.columns.names}
    missing = [c for c in ("FLUX", "IVAR", "LOGLAM") if c not in columns]
    if missing:
        raise SpectrumReadError(path, f"extension {hdu.name!r} lacks column(s) {missing}")
    loglam = np.asarray(data["LOGLAM"], dtype=np.float64)
    flux = np.asarray(data["FLUX"], dtype=np.float64)
    ivar = np.asarray(data["IVAR"], dtype=np.float64)
    flags = np.asarray(data[mask_column], dtype=np.int64) if mask_column in columns else np.zeros(len(flux), np.int64)
    order = np.argsort(loglam, kind="stable")
    loglam, flux, ivar, flags = loglam[order], flux[order], ivar[order], flags[order]
    if len(loglam) > 1 and not np.all(np.diff(loglam) > 0):
        raise SpectrumReadError(path, f"extension {hdu.name!r}: LOGLAM has repeated values")
    mask = (ivar > 0) & (flags == 0) & np.isfinite(flux) & np.isfinite(ivar)
    snr = float(np.median(flux[mask] * np.sqrt(ivar[mask]))) if mask.any() else float("nan")
    arm = "blue" if hdu.name.endswith("_B") or hdu.name.startswith("B-") else "red"
    return Segment(arm, 10.0**loglam, flux, ivar, mask), snr, header_float(hdu.header, "SNR")


def _record(path: Path, header, arms: dict, product: str, observation_id: str, meta: dict, hdus: str) -> Spectrum:
    segments, bad = [], []
    for arm in ("blue", "red"):
        if arm not in arms:
            continue
        segment, snr, _ = arms[arm]
        meta[f"snr_{arm}"] = snr
        if not snr >= MIN_ARM_SNR:  # NaN (no good pixel) is bad too
            bad.append(f"{arm} median S/N {snr:.2f}")
            segment = Segment(segment.name, segment.wavelength, segment.flux, segment.ivar,
                              np.zeros(segment.n_pixels, dtype=bool))
        segments.append(segment)
    meta["quality"] = "bad" if bad else "good"
    if bad:
        meta["bad_arms"] = ",".join(b.split()[0] for b in bad)
        meta["quality_reason"] = (f"no usable starlight: {'; '.join(bad)} < {MIN_ARM_SNR:g}; "
                                  "the arm's pixels are masked")
    snr_label = arms["blue"][2] if "blue" in arms else float("nan")
    labels = {"snr": snr_label} if snr_label > 0 else {}
    meta = {k: v for k, v in meta.items() if not (isinstance(v, float) and not np.isfinite(v))}
    desig = meta.get("desig") or ""
    return Spectrum(
        object_id=desig,
        survey="LAMOST",
        instrument="LAMOST-MRS",
        product=product,
        segments=segments,
        frame="observed",
        normalisation="flux",
        observation_id=observation_id,
        resolution=RESOLUTION,
        noise_known=True,
        flux_unit="",
        labels=labels,
        provenance={"file": str(path), "hdu": f"{hdus} (binary tables, one row per pixel)"},
        meta=meta,
        star_id=desig,
    )


def _obsid(header, path: Path) -> int:
    value = header_float(header, "OBSID")
    if not np.isfinite(value):
        raise SpectrumReadError(path, "header has no OBSID")
    return int(value)


def _file_meta(header, path: Path) -> dict:
    desig = header_str(header, "DESIG", "") or ""
    if not desig:
        raise SpectrumReadError(path, "header has no DESIG (LAMOST designation) to identify the star")
    return {
        "desig": desig,
        "obsid": _obsid(header, path),
        "ra_deg": header_float(header, "RA"),
        "dec_deg": header_float(header, "DEC"),
        "lmjd": header_float(header, "LMJD"),
        "mjd": header_float(header, "MJD"),
        "date_obs": header_str(header, "DATE-OBS", "") or "",
        "planid": header_str(header, "PLANID", "") or "",
        "spid": header_float(header, "SPID"),
        "fiberid": header_float(header, "FIBERID"),
        "objname": header_str(header, "OBJNAME", "") or "",
        "tsource": header_str(header, "TSOURCE", "") or "",
        "helio_rv_correction_kms": header_float(header, "HELIO_RV"),
        "data_release": header_str(header, "DATA_V", "") or "",
        "flux": "counts, not flux-calibrated",
    }
