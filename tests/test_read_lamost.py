"""LAMOST LRS reader against facts of the 189 real files in shared/data/lamost (131 DR1-era + 58 DR8)."""

from __future__ import annotations

import csv
import warnings

import numpy as np
import pytest
from astropy.io import fits

from stellarfield.io import identify_format, read_spectra
from stellarfield.io.readers.lamost import SPEED_OF_LIGHT_KMS, row_names

LOG_LAMBDA0 = 3.5682  # COEFF0 of every file: log10 of the first pixel's wavelength
DR1_FILE = "spec-55862-B6212_sp06-003.fits"
DR8_FILE = "spec-55859-F5902_sp03-232.fits.gz"


def _raw(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with fits.open(path) as hdul:
            return hdul[0].header.copy(), np.asarray(hdul[0].data, dtype=np.float64)


@pytest.fixture(scope="module")
def lamost_dir(shared_data):
    return shared_data / "lamost"


@pytest.fixture(scope="module")
def records(lamost_dir):
    """{file name: Spectrum} for every spectrum file (read once for the module)."""
    out = {}
    for path in sorted(lamost_dir.glob("spec-*.fits*")):
        (spectrum,) = read_spectra(path, format="lamost_lrs")
        out[path.name] = spectrum
    return out


def test_row_names_of_both_layouts():
    assert row_names({"EXTEN0": "Flux, Inverse, Wavelength, Andmask, Ormask"}) == [
        "flux", "inverse", "wavelength", "andmask", "ormask"]
    assert row_names({"EXTEN0": "Flux Inverse Subcontinuum Andmask Ormask"})[2] == "subcontinuum"


def test_identify_by_content(lamost_dir):
    assert identify_format(lamost_dir / DR1_FILE) == "lamost_lrs"
    assert identify_format(lamost_dir / DR8_FILE) == "lamost_lrs"


def test_all_files_read_and_repeat_observations_share_object_id(records):
    assert len(records) == 189
    dr1 = {s.object_id for name, s in records.items() if name.endswith(".fits")}
    dr8 = {s.object_id for name, s in records.items() if name.endswith(".fits.gz")}
    assert (len(dr1), len(dr8), len(dr1 | dr8)) == (131, 27, 158)
    # 9 DR8 stars carry two LAMOST designations; their own DESIG stays in meta.
    assert len({s.meta["desig"] for s in records.values()}) == 167
    assert len({s.key for s in records.values()}) == 189


def test_star_with_two_designations_gets_the_earliest_one(records):
    first = records["spec-55859-F5902_sp10-119.fits.gz"]
    repeat = records["spec-56976-EG215014S003621B01_sp13-015.fits.gz"]
    assert first.meta["desig"] == "LAMOST J215932.67+000231.8"
    assert repeat.meta["desig"] == "LAMOST J215932.68+000231.7"
    assert first.object_id == repeat.object_id == "LAMOST J215932.67+000231.8"
    assert first.meta["repeat_group"] == repeat.meta["repeat_group"] == 13


def test_pixel_counts_come_from_naxis1(records, lamost_dir):
    counts_dr8 = set()
    for name, spectrum in records.items():
        header, _ = _raw(lamost_dir / name)
        assert spectrum.n_pixels == header["NAXIS1"]
        if name.endswith(".gz"):
            counts_dr8.add(spectrum.n_pixels)
        else:
            assert spectrum.n_pixels == 3904
    assert (min(counts_dr8), max(counts_dr8)) == (3820, 3909)


def test_dr1_grid_is_the_header_log_linear_solution(records):
    wave = records[DR1_FILE].wavelength
    expected = 10.0 ** (LOG_LAMBDA0 + 1e-4 * np.arange(3904))
    np.testing.assert_allclose(wave, expected, rtol=1e-13)
    assert wave[0] == pytest.approx(3699.98531, abs=1e-5)


def test_dr8_wavelength_row_matches_the_header_solution(records, lamost_dir):
    """Where CRPIX1 = 1 the DR8 row equals 10**(COEFF0 + COEFF1*i) to float32 rounding."""
    checked = 0
    for name, spectrum in records.items():
        if not name.endswith(".gz"):
            continue
        header, data = _raw(lamost_dir / name)
        np.testing.assert_array_equal(spectrum.wavelength, data[2])
        if header["CRPIX1"] != 1:
            # Two files say CRPIX1 = -9999; their row starts at exactly 3700.0 A.
            assert spectrum.wavelength[0] == 3700.0
            continue
        grid = 10.0 ** (header["COEFF0"] + header["COEFF1"] * np.arange(header["NAXIS1"]))
        np.testing.assert_allclose(spectrum.wavelength, grid, rtol=5e-7)
        checked += 1
    assert checked == 56


def test_both_layouts_give_the_same_grid_for_the_same_header_wcs(records, lamost_dir):
    h1, _ = _raw(lamost_dir / DR1_FILE)
    h8, _ = _raw(lamost_dir / DR8_FILE)
    assert (h1["COEFF0"], h1["COEFF1"]) == (h8["COEFF0"], h8["COEFF1"])
    w1, w8 = records[DR1_FILE].wavelength, records[DR8_FILE].wavelength
    n = min(w1.size, w8.size)
    np.testing.assert_allclose(w8[:n], w1[:n], rtol=5e-7)
    assert w8[0] == pytest.approx(10**LOG_LAMBDA0, abs=2e-3)  # 3699.9863 (float32 row) vs 3699.9853


def test_ivar_is_zero_exactly_where_masks_flag_bad(records, lamost_dir):
    # Files with flagged pixels: 1 and-mask pixel and 640 ivar = 0 (DR1); 966 and-mask pixels (DR8).
    for name in ("spec-55862-B6212_sp06-203.fits", "spec-55859-F5907_sp01-092.fits.gz"):
        _, data = _raw(lamost_dir / name)
        rows = dict(zip(["flux", "ivar"], data[:2]))
        andmask = data[3]
        spectrum = records[name]
        good = (rows["ivar"] > 0) & (andmask == 0)
        np.testing.assert_array_equal(spectrum.mask, good)
        np.testing.assert_array_equal(spectrum.ivar, np.where(good, rows["ivar"], 0).astype(np.float32))
        np.testing.assert_array_equal(spectrum.flux, rows["flux"].astype(np.float32))
        assert np.any(andmask != 0) and not spectrum.mask[andmask != 0].any()
        assert (~spectrum.mask).sum() == np.sum((rows["ivar"] == 0) | (andmask != 0)) > 0


def test_every_masked_pixel_already_has_zero_ivar(lamost_dir):
    """Fact that makes and-mask vs or-mask immaterial here: flagged pixels carry ivar = 0."""
    for path in sorted(lamost_dir.glob("spec-*.fits*")):
        _, data = _raw(path)
        flagged = (data[3] != 0) | (data[4] != 0)
        assert np.all(data[1][flagged] == 0), path.name


def test_header_labels_rv_and_snr(records, lamost_dir):
    for name, key in ((DR1_FILE, "SN_G"), (DR8_FILE, "SNRG")):
        header, _ = _raw(lamost_dir / name)
        spectrum = records[name]
        assert spectrum.labels["rv_kms"] == pytest.approx(SPEED_OF_LIGHT_KMS * header["Z"], rel=1e-12)
        assert spectrum.labels["snr"] == pytest.approx(header[key])
    assert records[DR8_FILE].labels["rv_kms"] == pytest.approx(10.199, abs=1e-3)  # Z = 3.402e-5


def test_catalogue_labels_for_a_known_file(records, lamost_dir):
    with open(lamost_dir / "labels_my_data3_subset.csv", newline="") as fh:
        row = next(r for r in csv.DictReader(fh) if r["filename"] == DR1_FILE)
    spectrum = records[DR1_FILE]
    assert spectrum.labels["teff"] == pytest.approx(float(row["teff"]))  # 5456.41 K
    assert spectrum.labels["logg"] == pytest.approx(float(row["logg"]))
    assert spectrum.labels["fe_h"] == pytest.approx(float(row["feh"]))
    assert spectrum.meta["catalogue_rv_kms"] == pytest.approx(float(row["rv"]))
    assert spectrum.observation_id == str(int(float(row["obsid"]))) == "906003"
    assert spectrum.object_id == "LAMOST J063715.90+271356.5"


def test_labelled_and_unlabelled_sets(records):
    dr1 = [s for n, s in records.items() if n.endswith(".fits")]
    dr8 = [s for n, s in records.items() if n.endswith(".gz")]
    assert all({"teff", "logg", "fe_h", "rv_kms", "snr"} <= set(s.labels) for s in dr1)
    assert all("teff" not in s.labels for s in dr8)
    # The catalogue rv equals c*Z to 0.01 km/s for 117 of the 131 DR1 spectra.
    agree = sum(abs(s.labels["rv_kms"] - s.meta["catalogue_rv_kms"]) < 0.01 for s in dr1)
    assert agree == 117


def test_record_conventions(records):
    spectrum = records[DR8_FILE]
    assert (spectrum.frame, spectrum.normalisation, spectrum.resolution) == ("observed", "flux", 1800.0)
    assert [s.name for s in spectrum.segments] == ["full"]
    assert spectrum.observation_id == "103232"
    assert spectrum.provenance["file"].endswith(DR8_FILE)


def test_wrong_file_gives_a_clear_error(shared_data):
    from stellarfield.io.errors import SpectrumReadError

    miles_file = shared_data / "miles" / "MILES_res2.50_star_m0501V.fits"
    with pytest.raises(SpectrumReadError, match=r"m0501V\.fits: .*EXTEN0 rows"):
        read_spectra(miles_file, format="lamost_lrs")
