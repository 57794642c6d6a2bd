"""Bad input gets a clear error naming the file and the reason, and never aborts a batch."""

from __future__ import annotations

import os

import numpy as np
import pytest
from astropy.io import fits

from stellarfield.io import SpectrumReadError, UnknownFormatError, identify_format, read_spectra

MILES_FILE = "miles/MILES_res2.50_star_m0501V.fits"


def test_missing_path_names_the_file(tmp_path):
    missing = tmp_path / "nope.fits"
    with pytest.raises(SpectrumReadError) as err:
        read_spectra(missing)
    assert str(missing) in str(err.value) and "no such file" in str(err.value)


def test_empty_file(tmp_path):
    empty = tmp_path / "empty.fits"
    empty.write_bytes(b"")
    with pytest.raises(SpectrumReadError) as err:
        read_spectra(empty)
    assert str(empty) in str(err.value) and "empty file" in err.value.reason


def test_random_bytes_named_fits(tmp_path):
    bad = tmp_path / "random.fits"
    bad.write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(SpectrumReadError) as err:
        identify_format(bad)
    assert "not a FITS file" in err.value.reason and str(bad) in str(err.value)


def test_truncated_fits(tmp_path, shared_data):
    raw = (shared_data / MILES_FILE).read_bytes()
    cut = tmp_path / "truncated.fits"
    cut.write_bytes(raw[:20000])
    with pytest.raises(SpectrumReadError) as err:
        read_spectra(cut)
    assert "truncated" in err.value.reason
    assert f"{len(raw)}" in err.value.reason or "announce" in err.value.reason


def test_fits_that_is_no_known_format_says_what_was_expected(tmp_path):
    odd = tmp_path / "image.fits"
    fits.PrimaryHDU(np.zeros((4, 4), dtype=np.float32)).writeto(odd)
    with pytest.raises(UnknownFormatError) as err:
        read_spectra(odd)
    assert "Expected one of" in err.value.reason and "apogee_apstar" in err.value.reason


def test_fits_with_a_missing_extension(tmp_path, shared_data):
    """An apStar cut after its flux HDU (no error, no bitmask): the error names the missing extension."""
    src = shared_data / "apogee" / "apstar" / "apStar-r6-2M00452143+1634446.fits"
    cut = tmp_path / src.name
    with fits.open(src) as hdul:
        fits.HDUList([h.copy() for h in hdul[:2]]).writeto(cut)
    with pytest.raises(SpectrumReadError) as err:
        read_spectra(cut)
    assert str(cut) in str(err.value)
    assert "extension" in err.value.reason


def test_galah_ccd_without_normalised_extension_keeps_the_rest(tmp_path, shared_data):
    """GALAH DR3 stars may lack ext 4 (the official DR3 page says so): the observed record still lands."""
    star = sorted((shared_data / "galah" / "dr3").glob("*1.fits"))[0].stem[:-1]
    for ccd in "1234":
        with fits.open(shared_data / "galah" / "dr3" / f"{star}{ccd}.fits") as hdul:
            fits.HDUList([h.copy() for h in hdul[:4]]).writeto(tmp_path / f"{star}{ccd}.fits")
    records = read_spectra(tmp_path / f"{star}1.fits")
    assert [r.product for r in records] == ["galah_dr3_observed"]
    assert len(records[0].segments) == 4


def test_nan_and_negative_errors_are_masked_not_fatal(tmp_path, shared_data):
    """An apStar with NaN flux and negative errors: those pixels get ivar 0 and mask False, the rest survive."""
    src = shared_data / "apogee" / "apstar" / "apStar-r6-2M00452143+1634446.fits"
    with fits.open(src) as hdul:
        hdul = fits.HDUList([h.copy() for h in hdul])
    flux, err = hdul[1].data, hdul[2].data
    row = (0,) if flux.ndim == 2 else ()
    nan_px, neg_px = np.arange(1000, 1010), np.arange(2000, 2010)
    flux[row + (nan_px,)] = np.nan
    err[row + (neg_px,)] = -1.0
    bad = tmp_path / "apStar-r6-2M00452143+1634446.fits"
    hdul.writeto(bad)
    (clean,) = read_spectra(src)
    (spec,) = read_spectra(bad)
    ivar, mask = spec.ivar, spec.mask
    assert np.all(ivar[nan_px] == 0) and not mask[nan_px].any()
    assert np.all(ivar[neg_px] == 0) and not mask[neg_px].any()
    assert np.isfinite(ivar).all()
    others = np.setdiff1d(np.arange(spec.n_pixels), np.concatenate([nan_px, neg_px]))
    np.testing.assert_array_equal(ivar[others], clean.ivar[others])
    assert mask.sum() == clean.mask.sum() - (clean.mask[nan_px].sum() + clean.mask[neg_px].sum())
