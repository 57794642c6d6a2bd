"""LAMOST low-resolution (LRS, R ~ 1800) 1-D spectra: product ``lamost_lrs``.

One file holds one observation of one star: a PrimaryHDU image of shape (5, NPIX), float32, whose
rows the header keyword ``EXTEN0`` names. Two pipeline generations use two row layouts:

* ``EXTEN0 = 'Flux, Inverse, Wavelength, Andmask, Ormask'`` (DR8-era files, ``DATA_V='LAMOST DR8'``):
  flux, inverse variance, wavelength in Angstrom, and-mask, or-mask.
* ``EXTEN0 = 'Flux Inverse Subcontinuum Andmask Ormask'`` (first-year, DR1-era files): flux,
  inverse variance, continuum-normalised flux, and-mask, or-mask; no wavelength row.

The reader finds the rows by the names in ``EXTEN0``, so both layouts are one product. NPIX varies
from file to file (3820-3909 in DR8 files, 3904 in DR1 files) and is always read from NAXIS1.

Wavelength grid (vacuum, ``VACUUM = T``; observed heliocentric frame, ``HELIO = T``)
    Log-linear: ``lambda_i = 10**(COEFF0 + COEFF1 * i)`` Angstrom for i = 0..NPIX-1 (``COEFF0`` is
    "central wavelength (log10) of first pixel"; the WCS keys CRVAL1 / CD1_1 / CRPIX1 = 1 repeat it).
    Where the file has a wavelength row the reader uses that row, the file's own statement of the
    grid: it agrees with the header formula to 3.2e-7 relative (the row is float32) in the files
    checked, and two DR8 files whose header says ``CRPIX1 = -9999`` start at exactly 3700.0 A
    (and end at 8914.60 A instead of 8914.56 A), which only the row records. Without a wavelength row the grid is
    computed from COEFF0/COEFF1 (falling back to CRVAL1/CD1_1/CRPIX1).
    Spectra are not shifted to the rest frame: the star's radial velocity is ``c * Z`` (header Z).

Flux, noise and mask
    ``flux`` is row 0 (relative flux calibration, arbitrary units: normalisation ``"flux"``), ``ivar``
    row 1. A pixel is good where ``ivar > 0`` and the **and-mask** is 0. LAMOST sets an and-mask bit
    when the condition (BADCCD, BADPROFILE, NOSKY, BRIGHTSKY, BADCENTER, NODATA) holds in *every*
    exposure that went into the combined pixel, an or-mask bit when it holds in *any* exposure; a
    pixel flagged in only some exposures still carries the good exposures' signal, so the or-mask
    is kept out of the mask (LAMOST's and/or masks follow the SDSS spectro convention). In all 189
    files checked, every pixel with a non-zero and-mask or or-mask already has ivar = 0, so the choice
    does not change which pixels are good there. The DR1 continuum-normalised row is not used.

Identifiers
    ``object_id`` is the LAMOST designation (header ``DESIG``, ``"LAMOST Jhhmmss.ss+ddmmss.s"``).
    LAMOST builds it from the input-catalogue position, which differs slightly between plans: of
    the 27 stars observed 2-3 times in the DR8 set, 9 carry two designations (0.01 s and up to
    1.4 arcsec apart). Where the folder holds a repeat-group table (a CSV with columns
    ``combined_obsid``, ``combined_file``, ``GroupID``, such as the CCF study's
    ``20220313_snrg_30_Grpeddata_CCF_test.csv``), every observation of a group gets the
    designation of the group's lowest-OBSID (earliest) observation in the folder, so all
    observations of a star share one ``object_id`` (and one train/test split); ``meta["desig"]``
    keeps the file's own designation. ``observation_id`` is the header ``OBSID`` (DR8), else the
    catalogue obsid, else the file name without ``.fits``/``.fits.gz``.

Labels
    ``rv_kms = c * Z`` (its error ``c * Z_ERR`` in ``meta["rv_err_kms"]``) and ``snr`` = S/N in the
    g band (``SNRG``, DR1 ``SN_G``) from the header. Teff, logg and [Fe/H] come from a LAMOST
    catalogue extract in the same folder (a CSV with columns ``filename``, ``teff``, ``logg``,
    ``feh``, ``rv``, ``rv_err``; joined on the file name), when there is one; its ``rv`` and
    ``rv_err`` go to ``meta["catalogue_rv_kms"]`` and ``meta["catalogue_rv_err_kms"]`` (``rv``
    equals c * Z to 0.01 km/s for 117 of the 131 catalogued spectra here and differs by up to
    112 km/s for 14; the median ``rv_err`` is 12 km/s). The headers carry no stellar parameters.
"""

from __future__ import annotations

import csv
import functools
import re
from pathlib import Path

import numpy as np

from stellarfield.io.errors import SpectrumReadError
from stellarfield.io.fits_utils import hdu_data, header_float, header_str, linear_wcs_wavelength, open_fits
from stellarfield.io.peek import FilePeek
from stellarfield.io.profile import ProductProfile, RVReferenceKeys
from stellarfield.io.registry import register_reader
from stellarfield.paths import real_path
from stellarfield.physics.doppler import C_KMS
from stellarfield.spectrum import Segment, Spectrum

PRODUCT = "lamost_lrs"
#: Speed of light in km/s (:data:`stellarfield.physics.doppler.C_KMS`), for rv = c * z.
SPEED_OF_LIGHT_KMS = C_KMS
#: Nominal resolving power of LAMOST low-resolution spectra (Zhao et al. 2012, RAA 12, 723).
RESOLUTION = 1800.0
#: Row names every LAMOST LRS file has in ``EXTEN0``.
REQUIRED_ROWS = ("flux", "inverse", "andmask", "ormask")
#: Catalogue values meaning "no measurement".
MISSING_SENTINEL = -9999.0
#: Columns that make a CSV a catalogue of labels for the spectra in its folder.
LABEL_TABLE_COLUMNS = {"filename", "teff", "logg", "feh"}
#: Columns that make a CSV a table of repeat observations of the same stars.
REPEAT_TABLE_COLUMNS = {"combined_obsid", "combined_file", "GroupID"}

#: 3700-9100 A, vacuum, heliocentric (shared/data/README.md, lamost/NOTES.md).
PROFILE = ProductProfile(
    PRODUCT, "LAMOST LRS", (3700.0, 9100.0), frame="observed", normalisation="flux", continuum_degree=2,
    bench_normalisation="median",
    rv_references=(
        RVReferenceKeys("c_z", "fitted (heliocentric) vs c * Z (header; heliocentric)", "labels.rv_kms",
                        error="meta.rv_err_kms"),
        RVReferenceKeys("catalogue", "fitted (heliocentric) vs LAMOST catalogue rv", "meta.catalogue_rv_kms",
                        error="meta.catalogue_rv_err_kms"),
    ),
)


def row_names(header) -> list[str]:
    """The image rows named by ``EXTEN0``, lower case: e.g. ``['flux', 'inverse', 'wavelength', ...]``."""
    exten0 = header_str(header, "EXTEN0", "") or ""
    return [name for name in re.split(r"[\s,]+", exten0.lower()) if name]


def identify(peek: FilePeek) -> bool:
    """A LAMOST telescope header whose 2-D primary image has the five rows named in EXTEN0."""
    header = peek.header(0)
    if header is None:
        return False
    if not str(header.get("TELESCOP", "")).strip().upper().startswith("LAMOST"):
        return False
    rows = row_names(header)
    return (
        header.get("NAXIS") == 2
        and header.get("NAXIS2") == len(rows) == 5
        and all(name in rows for name in REQUIRED_ROWS)
    )


@register_reader(
    PRODUCT,
    identify=identify,
    description="LAMOST LRS 1-D spectrum: TELESCOP='LAMOST', primary image (5, NPIX) with rows named in EXTEN0 "
    "('Flux, Inverse, Wavelength, Andmask, Ormask' or 'Flux Inverse Subcontinuum Andmask Ormask')",
    profiles=PROFILE,
)
def read_lamost_lrs(path: str | Path) -> list[Spectrum]:
    """Read one LAMOST LRS file (``.fits`` or ``.fits.gz``) into one :class:`Spectrum`."""
    path = Path(path)
    with open_fits(path) as hdul:
        header = hdul[0].header
        data = np.asarray(hdu_data(hdul, 0, path, "flux/ivar/mask image"), dtype=np.float64)
    rows = row_names(header)
    missing = [name for name in REQUIRED_ROWS if name not in rows]
    if data.ndim != 2 or data.shape[0] != len(rows) or missing:
        raise SpectrumReadError(
            path, f"primary image of shape {data.shape} does not match EXTEN0 rows {rows} (need {REQUIRED_ROWS})"
        )
    row = {name: data[i] for i, name in enumerate(rows)}
    n_pixels = data.shape[1]

    if "wavelength" in row:
        wavelength = row["wavelength"]
        wavelength_source = "wavelength row"
    else:
        wavelength = _header_wavelength(header, n_pixels, path)
        wavelength_source = "header COEFF0/COEFF1 (log-linear)"

    flux, ivar = row["flux"], row["inverse"]
    mask = (ivar > 0) & (row["andmask"] == 0) & np.isfinite(flux) & np.isfinite(ivar)
    segment = Segment("full", wavelength, flux, ivar, mask)

    folder = real_path(path).parent
    file_key = _file_key(path.name)
    catalogue = _label_table(str(folder)).get(file_key, {})

    desig = header_str(header, "DESIG") or ""
    obsid = _obsid(header)
    if obsid is None and catalogue and np.isfinite(catalogue["obsid"]):
        obsid = int(catalogue["obsid"])  # DR1-era headers have no OBSID; the catalogue has it
    object_id = desig
    meta: dict = {
        "desig": desig,
        "layout": " ".join(rows),
        "wavelength_source": wavelength_source,
        "mask_rule": "ivar > 0 and andmask == 0",
        "class": header_str(header, "CLASS", "") or "",
        "subclass": header_str(header, "SUBCLASS", "") or "",
        "z": header_float(header, "Z"),
        "z_err": header_float(header, "Z_ERR"),
        "rv_err_kms": SPEED_OF_LIGHT_KMS * _positive(header_float(header, "Z_ERR")),  # the error of labels["rv_kms"]
        "helio_rv_correction_kms": header_float(header, "HELIO_RV"),
        "mjd": header_float(header, "MJD"),
        "planid": header_str(header, "PLANID", "") or "",
        "ra_deg": header_float(header, "RA"),
        "dec_deg": header_float(header, "DEC"),
        "pipeline_version": header_str(header, "VERSPIPE", "") or "",
        "data_release": header_str(header, "DATA_V", "") or "",
    }
    if obsid is not None:
        group = _repeat_table(str(folder)).get(obsid, (None, ""))[0]
        if group is not None:
            group_desig = _group_designation(str(folder), group)
            if group_desig:
                object_id = group_desig
            meta["repeat_group"] = group
    if not object_id:
        raise SpectrumReadError(path, "header has no DESIG (LAMOST designation) to identify the star")

    labels = {
        "rv_kms": SPEED_OF_LIGHT_KMS * header_float(header, "Z"),
        "snr": _positive(header_float(header, "SNRG", header_float(header, "SN_G"))),
    }
    provenance = {"file": str(path), "hdu": f"0 (image rows: {', '.join(rows)})"}
    if catalogue:
        labels.update(teff=catalogue["teff"], logg=catalogue["logg"], fe_h=catalogue["feh"])
        meta["catalogue_rv_kms"] = catalogue["rv"]
        meta["catalogue_rv_err_kms"] = catalogue["rv_err"]
        provenance["label_table"] = catalogue["table"]
    labels = {k: v for k, v in labels.items() if np.isfinite(v)}
    meta = {k: v for k, v in meta.items() if not (isinstance(v, float) and not np.isfinite(v))}

    return [
        Spectrum(
            object_id=object_id,
            survey="LAMOST",
            instrument="LAMOST-LRS",
            product=PRODUCT,
            segments=[segment],
            frame="observed",
            normalisation="flux",
            observation_id=str(obsid) if obsid is not None else file_key.removesuffix(".fits"),
            resolution=RESOLUTION,
            noise_known=True,
            flux_unit="",
            labels=labels,
            provenance=provenance,
            meta=meta,
        )
    ]


def _header_wavelength(header, n_pixels: int, path: Path) -> np.ndarray:
    """Vacuum Angstrom of each pixel from the log-linear header solution."""
    coeff0, coeff1 = header_float(header, "COEFF0"), header_float(header, "COEFF1")
    if np.isfinite(coeff0) and np.isfinite(coeff1):
        return 10.0 ** (coeff0 + coeff1 * np.arange(n_pixels, dtype=np.float64))
    try:
        return linear_wcs_wavelength(header, n_pixels, log10=True)
    except (KeyError, TypeError, ValueError) as exc:
        raise SpectrumReadError(path, f"no wavelength row and no usable COEFF0/COEFF1 or CRVAL1/CD1_1 ({exc})") from exc


def _obsid(header) -> int | None:
    value = header_float(header, "OBSID")
    return int(value) if np.isfinite(value) else None


def _positive(value: float) -> float:
    return value if value > 0 else np.nan


def _file_key(name: str) -> str:
    """File name without a ``.gz`` ending, the key catalogue tables use."""
    return name[:-3] if name.endswith(".gz") else name


def _csv_tables(folder: str, columns: set[str]) -> list[Path]:
    """CSV files in ``folder`` whose header row holds all of ``columns``."""
    tables = []
    for candidate in sorted(Path(folder).glob("*.csv")):
        try:
            with open(candidate, newline="") as fh:
                header = next(csv.reader(fh), [])
        except (OSError, UnicodeDecodeError):
            continue
        if columns <= set(header):
            tables.append(candidate)
    return tables


def _catalogue_float(text: str | None) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return np.nan
    return np.nan if value <= MISSING_SENTINEL or not np.isfinite(value) else value


@functools.lru_cache(maxsize=64)
def _label_table(folder: str) -> dict[str, dict]:
    """``{file name: {teff, logg, feh, rv, rv_err, obsid, table}}`` from the label catalogue(s) in ``folder``.

    The catalogue's first column is an unnamed pandas index; it is ignored. Values <= -9999 are missing.
    """
    out: dict[str, dict] = {}
    for table in _csv_tables(folder, LABEL_TABLE_COLUMNS):
        with open(table, newline="") as fh:
            for record in csv.DictReader(fh):
                name = (record.get("filename") or "").strip()
                if not name:
                    continue
                out[_file_key(Path(name).name)] = {
                    "teff": _catalogue_float(record.get("teff")),
                    "logg": _catalogue_float(record.get("logg")),
                    "feh": _catalogue_float(record.get("feh")),
                    "rv": _catalogue_float(record.get("rv")),
                    "rv_err": _catalogue_float(record.get("rv_err")),
                    "obsid": _catalogue_float(record.get("obsid")),
                    "table": str(table),
                }
    return out


@functools.lru_cache(maxsize=64)
def _repeat_table(folder: str) -> dict[int, tuple[int, str]]:
    """``{obsid: (group id, file name without .gz)}`` from the repeat-observation table(s) in ``folder``."""
    out: dict[int, tuple[int, str]] = {}
    for table in _csv_tables(folder, REPEAT_TABLE_COLUMNS):
        with open(table, newline="") as fh:
            for record in csv.DictReader(fh):
                obsid, group = _catalogue_float(record["combined_obsid"]), _catalogue_float(record["GroupID"])
                if np.isfinite(obsid) and np.isfinite(group):
                    out[int(obsid)] = (int(group), _file_key(Path(record["combined_file"].strip()).name))
    return out


@functools.lru_cache(maxsize=1024)
def _group_designation(folder: str, group: int) -> str | None:
    """DESIG of the lowest-OBSID (earliest) observation of repeat group ``group`` whose file is in ``folder``."""
    from astropy.io import fits

    members = sorted((obsid, name) for obsid, (g, name) in _repeat_table(folder).items() if g == group)
    for _, name in members:
        for candidate in (Path(folder) / name, Path(folder) / (name + ".gz")):
            if not candidate.is_file():
                continue
            try:
                desig = header_str(fits.getheader(candidate, 0), "DESIG")
            except OSError:
                continue
            if desig:
                return desig
    return None
