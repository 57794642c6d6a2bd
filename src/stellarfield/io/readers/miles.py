"""MILES stellar library spectra (Sanchez-Blazquez et al. 2006, MNRAS 371, 703; library v9.1): product ``miles``.

The files read here are the MaNGA DAP's FITS conversion of the MILES v9.1 library (the same format in
``sdss-mangadap``'s ``mangadap/data/spectral_templates/miles/``): one star per file,
``MILES_res2.50_star_m<NNNN>V.fits``, a single 1-D PrimaryHDU of 4300 float64 pixels whose header
holds only ``TPLLIB = 'MILES'``, ``FWHM`` and a linear WCS (``CRVAL1 = 3540.5``, ``CDELT1 = 0.9``,
``CRPIX1 = 1``). The DAP's averaged templates (``TPLLIB`` 'MILES-AVG', 'MILES-THIN', 'MILES_CLUSTER')
are not single stars and are not this format.

Wavelength
    MILES wavelengths are in **air** (the library's convention; the header does not say so):
    ``lambda_air_i = CRVAL1 + CDELT1 * (i + 1 - CRPIX1)`` = 3540.5 ... 7409.6 A. The reader converts
    them to vacuum (:func:`~stellarfield.physics.air_vacuum.air_to_vacuum`, Morton 2000): +1.01 A at
    the first pixel, +1.39 A near 5000 A, +2.04 A at the last. The spectra are in the **rest** frame
    (MILES spectra are corrected for radial velocity).

Line-spread function
    Gaussian FWHM 2.50 A in air wavelength (header ``FWHM``; Falcon-Barroso et al. 2011, A&A 532,
    A95 measured 2.51 A), constant over the range. It is stored per pixel in *vacuum* Angstrom as
    ``lsf_fwhm = FWHM * d(lambda_vac)/d(lambda_air)`` (2.5006-2.5007 A), and ``resolution`` is None
    (R = lambda / FWHM runs from 1400 to 2960 across the range).

Flux and noise
    Relative flux (flux-calibrated SED shape, arbitrary normalisation): normalisation ``"flux"``.
    MILES gives **no error array**: ``ivar`` is 0 everywhere and ``noise_known`` is False; the noise
    is never invented. A pixel is good where the flux is finite and not exactly 0.0 (an exact zero
    marks padding where no data were taken, as in the 270 trailing zeros of m0970, the star the DAP
    omits for its short range; 4 exact zeros occur in two other stars). Negative fluxes are **kept**:
    29 of the DAP's 984 spectra (20 of the 550 in the test set, 219 pixels) have 1-38 negative
    pixels, at the blue end of very cool stars or in the last few red pixels, where the true flux is
    near zero; the negative values are noise around it, and masking only them would bias the flux
    upward there. ``meta["n_nonpositive_flux"]`` counts the pixels <= 0.

Labels
    Teff, logg and [Fe/H] from the MILES parameter table in the same folder: the original IAC
    ``paramsMILES_v9.1.txt`` (fixed-width; '--' = missing) or, where that is absent, the DAP's
    ``MILES_params.db`` (99999 / 9999 = missing). Both list m0221 (HD044691A) as "022.", a typo in
    the original file; it is read as 0221 (no other row has that number). ``object_id`` is the MILES
    id from the file name (``"m0501"`` for Arcturus).
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import numpy as np

from stellarfield.io.fits_utils import air_wcs_to_vacuum, header_float, read_image
from stellarfield.io.peek import FilePeek
from stellarfield.io.profile import ProductProfile
from stellarfield.io.registry import register_reader
from stellarfield.paths import real_path
from stellarfield.spectrum import Segment, Spectrum

PRODUCT = "miles"
#: Header value of TPLLIB that marks a single MILES star (the DAP's averaged templates use other values).
TEMPLATE_LIBRARY = "MILES"
#: MILES id in a file name: ``MILES_res2.50_star_m0501V.fits`` -> ``m0501``.
MILES_ID_PATTERN = re.compile(r"m(\d{4})V", re.IGNORECASE)
#: Parameter tables looked for next to the spectra, best first.
PARAMETER_TABLE = "paramsMILES_v9.1.txt"
DAP_PARAMETER_TABLE = "MILES_params.db"
#: Column slices of paramsMILES_v9.1.txt (fixed width; numbers are right-aligned under their heading).
#: Checked against MILES_params.db for all 985 rows (see tests/test_read_miles.py).
PARAMS_COLUMNS = {"name": slice(0, 22), "miles": slice(22, 27), "spectral_type": slice(36, 49),
                  "teff": slice(49, 56), "logg": slice(56, 64), "fe_h": slice(64, 72)}
#: MILES ids mistyped in the parameter tables: HD044691A is m0221 (m0221V.fits exists).
MILES_ID_TYPOS = {"022.": "0221"}
#: Values meaning "no parameter": '--' in the IAC table, 99999 (Teff) and 9999 (logg, [Fe/H]) in the DAP's.
MISSING_VALUES = {"--", "", "9999", "99999"}

#: 3525-7500 A in air (Sanchez-Blazquez et al. 2006; the files here: 3540.5-7410 A), 3526-7502 A in
#: vacuum; a flux-calibrated SED whose shape is information (continuum: one scale factor).
PROFILE = ProductProfile(PRODUCT, "MILES", (3526.0, 7502.0), frame="rest", normalisation="flux",
                         continuum_degree=0, bench_normalisation="median")


def identify(peek: FilePeek) -> bool:
    """A 1-D primary image with ``TPLLIB = 'MILES'`` and a linear wavelength WCS."""
    header = peek.header(0)
    if header is None:
        return False
    return (
        str(header.get("TPLLIB", "")).strip() == TEMPLATE_LIBRARY
        and header.get("NAXIS") == 1
        and "CRVAL1" in header
        and ("CDELT1" in header or "CD1_1" in header)
    )


def miles_id(path: str | Path) -> str | None:
    """The MILES star id (``"m0501"``) in a file name, or None."""
    match = MILES_ID_PATTERN.search(Path(path).name)
    return f"m{match.group(1)}" if match else None


@register_reader(
    PRODUCT,
    identify=identify,
    description="MILES library star (MaNGA DAP FITS): 1-D primary image, TPLLIB='MILES', linear WCS CRVAL1/CDELT1 in air",
    profiles=PROFILE,
)
def read_miles(path: str | Path) -> list[Spectrum]:
    """Read one MILES star file into one :class:`Spectrum` (vacuum wavelengths, rest frame, no noise)."""
    path = Path(path)
    header, flux = read_image(path, "flux")
    flux = np.array(flux, dtype=np.float64)  # a native, writable copy
    fwhm_air = header_float(header, "FWHM")
    wavelength, lsf_fwhm = air_wcs_to_vacuum(header, flux.shape[0], fwhm_air, path, PROFILE)
    mask = np.isfinite(flux) & (flux != 0)
    segment = Segment("full", wavelength, flux, np.zeros_like(flux), mask, lsf_fwhm=lsf_fwhm)

    star = miles_id(path)
    parameters = _parameter_table(str(real_path(path).parent)).get(star, {}) if star else {}  # the file's own folder, through links
    labels = {k: parameters[k] for k in ("teff", "logg", "fe_h") if np.isfinite(parameters.get(k, np.nan))}
    meta = {"fwhm_air_A": fwhm_air, "wavelength_medium_in_file": "air",
            "n_nonpositive_flux": int(np.sum(flux <= 0))}
    meta.update({k: parameters[k] for k in ("star_name", "spectral_type") if parameters.get(k)})
    meta = {k: v for k, v in meta.items() if not (isinstance(v, float) and not np.isfinite(v))}
    provenance = {"file": str(path), "hdu": "0 (flux image; wavelength from CRVAL1/CDELT1, air)"}
    if parameters:
        provenance["label_table"] = parameters["table"]
    return [
        Spectrum(
            object_id=star or path.name.removesuffix(".fits"),
            survey="MILES",
            instrument="INT-IDS",
            product=PRODUCT,
            segments=[segment],
            frame="rest",
            normalisation="flux",
            observation_id=None,
            resolution=None,
            noise_known=False,
            flux_unit="",
            labels=labels,
            provenance=provenance,
            meta=meta,
        )
    ]


def _parameter_value(text: str) -> float:
    text = text.strip()
    if text in MISSING_VALUES:
        return np.nan
    try:
        return float(text)
    except ValueError:
        return np.nan


def _star_key(miles_number: str) -> str | None:
    """``"0501"`` -> ``"m0501"``; fixes the known typos; None for anything else."""
    number = MILES_ID_TYPOS.get(miles_number.strip(), miles_number.strip())
    return f"m{number}" if re.fullmatch(r"\d{4}", number) else None


@functools.lru_cache(maxsize=16)
def _parameter_table(folder: str) -> dict[str, dict]:
    """``{"m0501": {teff, logg, fe_h, star_name, spectral_type, table}}`` from the table in ``folder``."""
    folder_path = Path(folder)
    iac, dap = folder_path / PARAMETER_TABLE, folder_path / DAP_PARAMETER_TABLE
    if iac.is_file():
        return parse_iac_parameter_table(iac)
    if dap.is_file():
        return parse_dap_parameter_table(dap)
    return {}


def parse_iac_parameter_table(path: str | Path) -> dict[str, dict]:
    """Parse the IAC's fixed-width ``paramsMILES_v9.1.txt`` (three header lines, then one star a line)."""
    out: dict[str, dict] = {}
    with open(path, encoding="latin-1") as fh:
        lines = fh.read().splitlines()
    for line in lines[3:]:
        if not line.strip():
            continue
        key = _star_key(line[PARAMS_COLUMNS["miles"]])
        if key is None:
            continue
        out[key] = {
            "teff": _parameter_value(line[PARAMS_COLUMNS["teff"]]),
            "logg": _parameter_value(line[PARAMS_COLUMNS["logg"]]),
            "fe_h": _parameter_value(line[PARAMS_COLUMNS["fe_h"]]),
            "star_name": line[PARAMS_COLUMNS["name"]].strip(),
            "spectral_type": line[PARAMS_COLUMNS["spectral_type"]].strip(),
            "table": str(path),
        }
    return out


def parse_dap_parameter_table(path: str | Path) -> dict[str, dict]:
    """Parse the DAP's ``MILES_params.db``: ``#`` comments, then ``MILES Teff logg [Fe/H]`` per line."""
    out: dict[str, dict] = {}
    with open(path, encoding="latin-1") as fh:
        for line in fh:
            fields = line.split()
            if line.startswith("#") or len(fields) != 4:
                continue
            key = _star_key(fields[0])
            if key is None:
                continue
            teff, logg, fe_h = (_parameter_value(v) for v in fields[1:])
            out[key] = {"teff": teff, "logg": logg, "fe_h": fe_h, "table": str(path)}
    return out
