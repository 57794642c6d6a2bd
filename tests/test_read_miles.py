"""MILES reader against facts of the 550 real library files in shared/data/miles."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits

from stellarfield.io import identify_format, read_spectra
from stellarfield.io.peek import peek_file
from stellarfield.io.readers import miles

ARCTURUS = "MILES_res2.50_star_m0501V.fits"


@pytest.fixture(scope="module")
def miles_dir(shared_data):
    return shared_data / "miles"


@pytest.fixture(scope="module")
def arcturus(miles_dir):
    (spectrum,) = read_spectra(miles_dir / ARCTURUS)
    return spectrum


def test_identify_by_content(miles_dir):
    assert identify_format(miles_dir / ARCTURUS) == "miles"


def test_grid_is_air_converted_to_vacuum(arcturus):
    wave = arcturus.wavelength
    air = 3540.5 + 0.9 * np.arange(4300)
    assert arcturus.n_pixels == 4300
    # Morton (2000) shift: +1.01 A at 3540.5 A, +1.39-1.40 A near 5000 A, +2.04 A at 7409.6 A.
    assert wave[0] - air[0] == pytest.approx(1.012, abs=0.002)
    near_5000 = np.argmin(np.abs(air - 5000.0))
    assert 1.39 <= wave[near_5000] - air[near_5000] <= 1.40
    assert wave[-1] - air[-1] == pytest.approx(2.041, abs=0.002)


def test_lsf_is_the_header_fwhm_in_vacuum_angstrom(arcturus):
    lsf = arcturus.segments[0].lsf_fwhm
    assert lsf is not None and lsf.shape == (4300,)
    # 2.50 A in air is 2.5006-2.5007 A in vacuum (the grid stretches by n_air ~ 1.00026-1.00028).
    assert np.all((lsf > 2.5005) & (lsf < 2.5008))
    assert arcturus.resolution is None
    assert arcturus.meta["fwhm_air_A"] == 2.5


def test_no_noise_is_invented(arcturus):
    assert arcturus.noise_known is False
    assert np.all(arcturus.ivar == 0)
    assert (arcturus.frame, arcturus.normalisation) == ("rest", "flux")


def test_flux_is_the_file_data(arcturus, miles_dir):
    raw = fits.getdata(miles_dir / ARCTURUS)
    np.testing.assert_array_equal(arcturus.flux, raw.astype(np.float32))
    assert arcturus.mask.all()


def test_negative_flux_is_kept(miles_dir):
    (spectrum,) = read_spectra(miles_dir / "MILES_res2.50_star_m0838V.fits")
    negative = spectrum.flux < 0
    assert negative.sum() == 30 == spectrum.meta["n_nonpositive_flux"]
    assert spectrum.mask[negative].all()


def test_arcturus_labels(arcturus):
    assert arcturus.object_id == "m0501"
    assert arcturus.labels == {"teff": 4361.0, "logg": 1.93, "fe_h": -0.53}
    assert arcturus.meta["star_name"] == "HD124897"
    assert arcturus.meta["spectral_type"] == "K2 IIIp"


def test_m0221_found_despite_the_typo(miles_dir):
    (spectrum,) = read_spectra(miles_dir / "MILES_res2.50_star_m0221V.fits")
    assert spectrum.labels == {"teff": 7950.0, "logg": 3.95, "fe_h": 0.35}
    assert spectrum.meta["star_name"] == "HD044691A"


def test_missing_metallicity_is_left_out(miles_dir):
    (spectrum,) = read_spectra(miles_dir / "MILES_res2.50_star_m0838V.fits")  # '--' for [Fe/H]
    assert spectrum.labels == {"teff": 2748.0, "logg": 5.09}


def test_iac_and_dap_tables_agree_for_all_985_stars(miles_dir):
    iac = miles.parse_iac_parameter_table(miles_dir / "paramsMILES_v9.1.txt")
    dap = miles.parse_dap_parameter_table(miles_dir / "MILES_params.db")
    assert len(iac) == len(dap) == 985 and set(iac) == set(dap)
    assert "m0221" in iac
    for key in iac:
        for label in ("teff", "logg", "fe_h"):
            np.testing.assert_equal(iac[key][label], dap[key][label], err_msg=f"{key} {label}")
    # The three stars with no parameters at all.
    assert all(np.isnan(iac[k]["teff"]) for k in ("m0407", "m0443", "m0445"))


def test_all_550_read(miles_dir):
    paths = sorted(miles_dir.glob("MILES_res2.50_star_m*V.fits"))
    assert len(paths) == 550
    spectra = [s for p in paths for s in miles.read_miles(p)]
    assert len({s.object_id for s in spectra}) == 550
    assert all(s.n_pixels == 4300 and s.mask.any() for s in spectra)
    # 20 selected stars have Teff and logg but no [Fe/H]; none lacks Teff.
    assert sum("fe_h" not in s.labels for s in spectra) == 20
    assert all("teff" in s.labels and "logg" in s.labels for s in spectra)
    assert sum(s.meta["n_nonpositive_flux"] > 0 for s in spectra) == 21


def test_dap_averaged_templates_are_not_miles_stars():
    """The DAP's MILES-AVG / MILES-THIN templates (sdss-mangadap) are averages, not stars."""
    from importlib import metadata

    try:
        dist = metadata.distribution("sdss-mangadap")
    except metadata.PackageNotFoundError:
        pytest.skip("sdss-mangadap not installed")
    folder = dist.locate_file("mangadap/data/spectral_templates/miles_avg")
    sample = sorted(folder.glob("*.fits"))[:1]
    if not sample:
        pytest.skip("no miles_avg templates in this sdss-mangadap install")
    peek = peek_file(sample[0])
    try:
        assert miles.identify(peek) is False
    finally:
        peek.close()


def test_files_sharing_a_wcs_get_their_own_copy_of_its_vacuum_grid(shared_data):
    """The air-to-vacuum conversion of a WCS is made once per WCS (``fits_utils._vacuum_of_air_wcs``);
    each record still owns its arrays."""
    files = sorted((shared_data / "miles").glob("MILES_res2.50_star_m000*V.fits"))[:2]
    a, b = (read_spectra(f)[0] for f in files)
    np.testing.assert_array_equal(a.wavelength, b.wavelength)
    assert not np.shares_memory(a.segments[0].wavelength, b.segments[0].wavelength)
    a.segments[0].wavelength[0] = -1.0
    assert read_spectra(files[1])[0].wavelength[0] == b.wavelength[0] > 3500
