"""STELIB stellar library spectra (Le Borgne et al. 2003, A&A 402, 433; version 3.2): product ``stelib``.

The files read here are those of ``stelib_V3.2_corr_fits.tar.gz`` from the library's site, as the
MaNGA DAP ships them (``sdss-mangadap``'s ``mangadap/data/spectral_templates/stelib/``, renamed
``STELIB_v3.2_<star>.fits``): 255 spectra of 254 stars, one per file, a 1-D PrimaryHDU of 6700
float32 pixels written by IRAF. 214 were taken with the Jacobus Kapteyn Telescope (``TELESCOP``
'Jacobus Kaptein Telescope, RMO, La Palma', ``INSTRUME = 'RBS'``), 41 with the Siding Spring 2.3 m
(``INSTRUME = 'DBS'``); HD 53929 was observed by both (files ``HD053929lp`` and ``HD053929ss``).
The header has the library's own keys ``STARIDEN``, ``SPECTYPE``, ``ISEXTINC``, ``TEFF``,
``LOG_G``, ``FE_H`` and ``RADVEL``, by which the reader recognises the format.

Wavelength
    A linear WCS per file, ``lambda_i = CRVAL1 + CDELT1 * (i + 1 - CRPIX1)``: CRVAL1 = 3196-3204 A and
    CDELT1 = 0.9988-1.0013 A, different in every file, because the library put each spectrum in
    the star's **rest frame** by scaling the WCS: ``c (1 / CDELT1 - 1)`` equals ``RADVEL - VHELIO``
    (the star's heliocentric velocity less the observation's heliocentric correction) to a few
    km/s (correlation 0.98 over the 255 files; up to 380 km/s for HD 161817). Measured line centres
    confirm it: H-alpha sits at its rest **air** wavelength (median offset -0.3 A over the library;
    in vacuum it would be +1.5 A), as the DAP's ``stelib.ini`` says (``in_vacuum = False``). The
    reader converts air to vacuum (:func:`~stellarfield.physics.air_vacuum.air_to_vacuum`) and
    records ``frame = "rest"``.

Line-spread function
    The paper gives "<~ 3 A" FWHM; the DAP uses 3.40 A (Maraston & Stromback 2011). Degrading the
    MILES spectra (2.50 A) of the 112 stars both libraries share to the STELIB spectra, the best
    Gaussian FWHM has a median of 3.4 A (16-84%: 3.2-3.8 A), so ``lsf_fwhm`` is 3.40 A in air,
    stored per pixel in vacuum Angstrom (3.4009 A) like MILES', and ``resolution`` is None.

Flux and noise
    Flux in erg/s/cm2/A (``BUNIT``), corrected for interstellar extinction (``A_V = ISEXTINC``, in
    ``meta``); normalisation ``"flux"``. No error array: ``ivar`` is 0 and ``noise_known`` False. A
    pixel is good where the flux is finite and not exactly 0: exact zeros pad the ends and the gaps
    between the spectrograph set-ups (193 files have one run of data, 62 have 2-11, e.g. HD 5820:
    3463-4547, 5530-7522 and 8551-9614 A), and no file holds a negative or non-finite value.

Identifiers and labels
    ``object_id`` is the library's star name from the file name (``HD015318``), without the
    observatory tag of HD 53929's two spectra, which becomes the ``observation_id`` (``lp`` La
    Palma, ``ss`` Siding Spring); a file renamed to something that is not a star name gets the
    header's ``OBJECT``. The header's ``OBJECT`` / ``STARIDEN`` may name the star
    differently (``HR718`` for HD 15318, ``HD26630`` unpadded): they are kept in
    ``meta["star_aliases"]``, and ``star_id`` is the normalised name (:mod:`stellarfield.data.stars`),
    ``"HD 15318"``. Labels: ``teff``, ``logg``, ``fe_h`` from ``TEFF``, ``LOG_G``, ``FE_H`` ('-' =
    missing; the library's compilation from the literature), ``rv_kms`` = ``RADVEL``.

Position
    ``meta["ra_deg"]``, ``meta["dec_deg"]`` (ICRS): 110 files give J2000 sexagesimal strings, 104
    B1950 sexagesimal strings, and the 41 Siding Spring files B1950 values in radians whose
    declination lost the sign of its minutes (-5 26 37 stored as -4.556 deg): for those the
    reader parses the header comment ("Mean Dec  -5 26 37"). B1950 positions are precessed to
    ICRS without proper motion (ERFA ``fk45z``), so they are good to tens of arcseconds for
    fast-moving stars; names, not positions, link STELIB stars to other libraries.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from stellarfield.data.stars import CATALOGUE_RANK, candidate_id, catalogue_of
from stellarfield.io.fits_utils import air_wcs_to_vacuum, header_float, header_str, read_image
from stellarfield.io.peek import FilePeek
from stellarfield.io.profile import HeaderUnit, ProductProfile
from stellarfield.io.registry import register_reader
from stellarfield.spectrum import Segment, Spectrum

PRODUCT = "stelib"
#: LSF FWHM in air Angstrom (DAP / Maraston & Stromback 2011; median 3.4 A measured against MILES).
LSF_FWHM_AIR_A = 3.40
#: Keys only STELIB headers have, together.
STELIB_KEYS = ("STARIDEN", "ISEXTINC", "SPECTYPE", "RADVEL")
#: ``STELIB_v3.2_HD015318.fits`` -> ``HD015318``.
FILE_PREFIX = re.compile(r"^STELIB_v[\d.]+_", re.IGNORECASE)
#: The two spectra of one star taken at two observatories: ``HD053929lp`` / ``HD053929ss``.
OBSERVATORY_TAGS = {"lp": "La Palma (JKT)", "ss": "Siding Spring (2.3 m)"}
#: Instruments by INSTRUME key.
INSTRUMENTS = {"RBS": "JKT-RBS", "DBS": "SSO2.3m-DBS"}

#: 3200-9900 A in 1 A pixels (Le Borgne et al. 2003; shared/data/README.md), flux in erg/s/cm2/A
#: (header BUNIT 'erg /s /cm2 /angstroms').
PROFILE = ProductProfile(PRODUCT, "STELIB", (3200.0, 9900.0), frame="rest", normalisation="flux",
                         flux_unit="erg /s /cm2 /angstroms", continuum_degree=2,
                         header_units=(HeaderUnit(0, "BUNIT", "erg"),))


def identify(peek: FilePeek) -> bool:
    """A 1-D primary image with STELIB's own keys (STARIDEN, ISEXTINC, SPECTYPE, RADVEL) and a linear WCS."""
    header = peek.header(0)
    if header is None:
        return False
    return (
        header.get("NAXIS") == 1
        and all(key in header for key in STELIB_KEYS)
        and "CRVAL1" in header
        and ("CDELT1" in header or "CD1_1" in header)
    )


def library_name(path: str | Path) -> tuple[str, str | None]:
    """(star name, observatory tag or None) from a file name: ``STELIB_v3.2_HD053929lp.fits`` -> ``("HD053929", "lp")``."""
    stem = Path(path).name
    for suffix in (".fits.gz", ".fits", ".fit"):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    stem = FILE_PREFIX.sub("", stem)
    match = re.fullmatch(r"(.+?)(lp|ss)", stem)
    if match and candidate_id(match.group(1)):
        return match.group(1), match.group(2)
    return stem, None


@register_reader(
    PRODUCT,
    identify=identify,
    description="STELIB library star: 1-D primary image with STARIDEN/ISEXTINC/SPECTYPE/RADVEL keys, "
    "linear WCS CRVAL1/CDELT1 in air, rest frame",
    profiles=PROFILE,
)
def read_stelib(path: str | Path) -> list[Spectrum]:
    """Read one STELIB star file into one :class:`Spectrum` (vacuum wavelengths, rest frame, no noise)."""
    path = Path(path)
    header, flux = read_image(path, "flux")
    flux = np.array(flux, dtype=np.float64)  # a native, writable copy
    wavelength, lsf_fwhm = air_wcs_to_vacuum(header, flux.shape[0], LSF_FWHM_AIR_A, path, PROFILE)
    mask = np.isfinite(flux) & (flux != 0)
    segment = Segment("full", wavelength, flux, np.zeros_like(flux), mask, lsf_fwhm=lsf_fwhm)

    name, tag = library_name(path)
    object_name = header_str(header, "OBJECT", "") or ""
    star_iden = header_str(header, "STARIDEN", "") or ""
    if candidate_id(name) is None and name not in (object_name, star_iden) and (object_name or star_iden):
        name, tag = object_name or star_iden, None  # a renamed file: the header names the star
    aliases = [n for n in dict.fromkeys((object_name, star_iden)) if n and n != name]
    star_id = _best_id([name, *aliases])

    labels = {
        "teff": header_float(header, "TEFF"),
        "logg": header_float(header, "LOG_G"),
        "fe_h": header_float(header, "FE_H"),
        "rv_kms": header_float(header, "RADVEL"),
    }
    labels = {k: v for k, v in labels.items() if np.isfinite(v)}
    ra, dec, coordinates = _position(header)
    instrument = header_str(header, "INSTRUME", "") or ""
    meta = {
        "object": object_name,
        "star_aliases": ",".join(aliases),
        "spectral_type": header_str(header, "SPECTYPE", "") or "",
        "telescope": header_str(header, "TELESCOP", "") or "",
        "observatory": header_str(header, "OBSERVAT", "") or "",
        "observer": header_str(header, "OBSERVER", "") or "",
        "date_obs": header_str(header, "DATE-OBS", "") or "",
        "extinction_av_corrected": header_float(header, "ISEXTINC"),
        "vhelio_correction_kms": header_float(header, "VHELIO"),
        "mag_u": header_float(header, "U"),
        "mag_b": header_float(header, "B"),
        "mag_v": header_float(header, "V"),
        "mag_r": header_float(header, "R"),
        "ra_deg": ra,
        "dec_deg": dec,
        "coordinates": coordinates,
        "fwhm_air_A": LSF_FWHM_AIR_A,
        "wavelength_medium_in_file": "air",
        "n_zero_flux": int(np.sum(flux == 0)),
    }
    if tag:
        meta["observatory_tag"] = OBSERVATORY_TAGS[tag]
    meta = {k: v for k, v in meta.items() if not (isinstance(v, float) and not np.isfinite(v)) and v != ""}
    return [
        Spectrum(
            object_id=name,
            survey="STELIB",
            instrument=INSTRUMENTS.get(instrument, instrument or "unknown"),
            product=PRODUCT,
            segments=[segment],
            frame="rest",
            normalisation="flux",
            observation_id=tag,
            resolution=None,
            noise_known=False,
            flux_unit=header_str(header, "BUNIT", "") or "",
            labels=labels,
            provenance={"file": str(path), "hdu": "0 (flux image; wavelength from CRVAL1/CDELT1, air, rest frame)"},
            meta=meta,
            star_id=star_id,
        )
    ]


def _best_id(names: list[str]) -> str | None:
    """The best-ranked star id among ``names`` (file name first on a tie), or None."""
    candidates = [c for c in (candidate_id(n) for n in names) if c]
    if not candidates:
        return None
    rank = {catalogue: i for i, catalogue in enumerate(CATALOGUE_RANK)}
    return min(candidates, key=lambda c: (rank.get(catalogue_of(c) or "", len(rank)), candidates.index(c)))


def _sexagesimal(text: str) -> float | None:
    """``' 4:11:11.54'``, ``'-0:32:40.30'``, ``'-5 26 37'`` -> signed value in units of the first field."""
    fields = re.findall(r"\d+(?:\.\d*)?", text)
    if len(fields) != 3:
        return None
    value = float(fields[0]) + float(fields[1]) / 60.0 + float(fields[2]) / 3600.0
    return -value if text.strip().startswith("-") else value


def _position(header) -> tuple[float, float, str]:
    """(RA, Dec) in ICRS degrees and how they were read; NaN where the header gives none."""
    ra_text, dec_text = header.get("RA"), header.get("DEC")
    if isinstance(ra_text, str) and isinstance(dec_text, str):
        ra_h, dec_d = _sexagesimal(ra_text), _sexagesimal(dec_text)
        source = "RA/DEC sexagesimal"
    else:  # the SSO files: radians with a broken sign; the comment holds the sexagesimal value
        comment_ra = re.sub(r"^\s*Mean RA", "", header.comments["RA"]) if "RA" in header else ""
        comment_dec = re.sub(r"^\s*Mean Dec", "", header.comments["DEC"]) if "DEC" in header else ""
        ra_h, dec_d = _sexagesimal(comment_ra), _sexagesimal(comment_dec)
        source = "RA/DEC header comments"
    if ra_h is None or dec_d is None:
        return np.nan, np.nan, ""
    equinox = str(header.get("EQUINOX", "J2000")).strip().upper()
    ra_deg, dec_deg = 15.0 * ra_h, dec_d
    if equinox.startswith("B1950"):
        ra_deg, dec_deg = _fk4_to_icrs(ra_deg, dec_deg)
        return ra_deg, dec_deg, f"{source}, B1950 precessed to ICRS (no proper motion)"
    return ra_deg, dec_deg, f"{source}, {equinox}"


def _fk4_to_icrs(ra_deg: float, dec_deg: float) -> tuple[float, float]:
    """B1950 (FK4) to J2000 (FK5, within 0.02 arcsec of ICRS), assuming no proper motion (ERFA ``fk45z``,
    which astropy's FK4 -> ICRS transformation agrees with to 0.03 arcsec here)."""
    import erfa

    ra, dec = erfa.fk45z(np.radians(ra_deg), np.radians(dec_deg), 1950.0)
    return float(np.degrees(ra)) % 360.0, float(np.degrees(dec))
