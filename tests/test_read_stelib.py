"""STELIB reader against facts of the 255 library files that sdss-mangadap installs (the [demo] extra)."""

from __future__ import annotations

import shutil
from importlib import metadata

import numpy as np
import pytest
from astropy.io import fits

from stellarfield.io import SpectrumReadError, UnknownFormatError, identify_format, read_spectra
from stellarfield.io.registry import classify
from stellarfield.physics.air_vacuum import air_to_vacuum


@pytest.fixture(scope="module")
def stelib_files():
    try:
        metadata.distribution("sdss-mangadap")
    except metadata.PackageNotFoundError:
        pytest.skip("sdss-mangadap (part of the [demo] extra) is not installed")
    from stellarfield.io.demo_sources import demo_files

    return {p.name.removeprefix("STELIB_v3.2_").removesuffix(".fits"): p for p in demo_files(["stelib"])["stelib"]}


@pytest.fixture(scope="module")
def hd15318(stelib_files):
    (spectrum,) = read_spectra(stelib_files["HD015318"])
    return spectrum


def test_the_library_is_255_files_of_one_format(stelib_files):
    assert len(stelib_files) == 255
    assert {classify(p) for p in list(stelib_files.values())[::17]} == {("spectrum", "stelib")}


def test_identified_by_content_not_name(stelib_files, tmp_path):
    renamed = tmp_path / "spectrum.fits"
    shutil.copy(stelib_files["HD015318"], renamed)
    assert identify_format(renamed) == "stelib"
    (spectrum,) = read_spectra(renamed)
    # the file name says nothing: the header's OBJECT names the star
    assert spectrum.object_id == "HR718" and spectrum.star_id == "HR 718"


def test_header_facts(hd15318, stelib_files):
    header = fits.getheader(stelib_files["HD015318"])
    assert (header["CRVAL1"], header["CDELT1"], header["NAXIS1"]) == (3199.973, 0.999947135356191, 6700)
    assert hd15318.object_id == "HD015318" and hd15318.observation_id is None
    assert hd15318.meta["object"] == "HR718" and hd15318.meta["star_aliases"] == "HR718"
    assert hd15318.star_id == "HD 15318"
    assert hd15318.labels == {"teff": 11300.0, "rv_kms": -13.9}  # LOG_G and FE_H are '-'
    assert hd15318.meta["spectral_type"] == "B9III" and hd15318.meta["extinction_av_corrected"] == 0.08
    assert hd15318.instrument == "SSO2.3m-DBS" and hd15318.survey == "STELIB"
    assert hd15318.flux_unit == "erg /s /cm2 /angstroms"


def test_air_grid_converted_to_vacuum(hd15318):
    air = 3199.973 + 0.999947135356191 * np.arange(6700)
    assert hd15318.n_pixels == 6700
    np.testing.assert_allclose(hd15318.wavelength, air_to_vacuum(air), rtol=0, atol=1e-9)
    assert hd15318.wavelength[0] == pytest.approx(3200.898, abs=0.001)  # +0.925 A at 3200 A
    assert hd15318.wavelength[-1] == pytest.approx(9901.333, abs=0.001)  # +2.72 A at 9898.6 A


def test_rest_frame_lines_sit_at_their_vacuum_wavelengths(hd15318):
    """A B9 giant's Balmer lines: within 0.5 A of vacuum rest wavelengths (air ones are 1.4-1.8 A lower)."""
    w, f = hd15318.wavelength, hd15318.flux.astype(float)
    for rest, half_width in ((6564.61, 15), (4862.68, 12)):
        sel = np.flatnonzero(np.abs(w - rest) < half_width)
        i = sel[np.argmin(f[sel])]
        a, b, _ = np.polyfit(w[i - 2 : i + 3], f[i - 2 : i + 3], 2)
        assert abs(-b / (2 * a) - rest) < 0.5
    assert hd15318.frame == "rest"


def test_flux_zero_padding_masked_no_noise(hd15318, stelib_files):
    raw = fits.getdata(stelib_files["HD015318"])
    np.testing.assert_array_equal(hd15318.flux, raw)
    assert hd15318.flux[1000] == pytest.approx(1.7195619e-10, rel=1e-6)
    assert int((raw == 0).sum()) == 544 == hd15318.meta["n_zero_flux"]
    np.testing.assert_array_equal(hd15318.mask, raw != 0)
    assert hd15318.noise_known is False and not hd15318.ivar.any()
    # HD 5820 was observed in three set-ups: three runs of good pixels with zeros between
    (hd5820,) = read_spectra(stelib_files["HD005820"])
    runs = np.flatnonzero(np.diff(np.r_[0, hd5820.mask.astype(int)]) == 1)
    assert len(runs) == 3 and hd5820.mask.sum() == 4142


def test_lsf_is_3p4_angstrom_in_air(hd15318):
    lsf = hd15318.segments[0].lsf_fwhm
    assert lsf is not None and np.all((lsf > 3.4007) & (lsf < 3.4011)) and hd15318.resolution is None


def test_two_observatories_one_star(stelib_files):
    (lp,) = read_spectra(stelib_files["HD053929lp"])
    (ss,) = read_spectra(stelib_files["HD053929ss"])
    assert (lp.key, ss.key) == ("stelib/HD053929/lp", "stelib/HD053929/ss")
    assert lp.star_id == ss.star_id == "HD 53929"
    assert (lp.instrument, ss.instrument) == ("JKT-RBS", "SSO2.3m-DBS")


def test_positions_from_both_header_styles(stelib_files):
    # Siding Spring: RA/DEC in radians with the sign lost on the minutes (-5 26 37 -> -4.556 deg);
    # the comment's B1950 value, precessed, lands 15 arcsec from Feige 110's J2000 position (-5.1656 deg)
    (feige,) = read_spectra(stelib_files["Feige110"])
    assert fits.getheader(stelib_files["Feige110"])["DEC"] == pytest.approx(-0.07952399)
    assert feige.meta["dec_deg"] == pytest.approx(-5.1697, abs=0.001)
    assert feige.meta["ra_deg"] == pytest.approx(349.9899, abs=0.001)
    # La Palma, J2000 sexagesimal strings taken as they are
    (lp,) = read_spectra(stelib_files["HD053929lp"])
    assert (lp.meta["ra_deg"], lp.meta["dec_deg"]) == pytest.approx((15 * (7 + 7 / 60 + 6.64 / 3600), 4 + 54 / 60 + 28.7 / 3600))


def test_bad_input_names_the_file(stelib_files, tmp_path):
    raw = stelib_files["HD015318"].read_bytes()
    cut = tmp_path / "cut.fits"
    cut.write_bytes(raw[:10000])
    with pytest.raises(SpectrumReadError) as err:
        read_spectra(cut)
    assert str(cut) in str(err.value) and "truncated" in err.value.reason
    # STELIB keys but no wavelength solution: not a format stellarfield can read
    header = fits.getheader(stelib_files["HD015318"])
    del header["CRVAL1"]
    odd = tmp_path / "no_wcs.fits"
    del header["APNUM1"]  # IRAF's non-standard card, which astropy will not write back
    fits.PrimaryHDU(fits.getdata(stelib_files["HD015318"]), header=header).writeto(odd)
    with pytest.raises(UnknownFormatError) as err:
        read_spectra(odd)
    assert str(odd) in str(err.value) and "stelib" in err.value.reason
