"""Readers check what they read (issue 15, item 3): wavelengths against the product's known range,
header units against the product's, data sizes against the file before anything is allocated. Each
bad variant is made from a real file in a temporary folder; the one-line error names the file and
the reason, and ingest skips the file with that reason while the rest of the batch lands."""

from __future__ import annotations

import gzip
import resource
import shutil

import numpy as np
import pytest
from astropy.io import fits
from real_files import SHARED_FILE_OF_FORMAT, real_file, replace_card

from stellarfield.errors import StellarfieldError
from stellarfield.io import SpectrumReadError, read_spectra

MILES = SHARED_FILE_OF_FORMAT["miles"]
LAMOST_WITH_WAVELENGTH_ROW = "lamost/spec-55859-F5902_sp03-232.fits.gz"  # rows: flux, inverse, wavelength, ...
APSTAR = "apogee/apstar/apStar-r6-2M00452143+1634446.fits"


def _refused(path, *words) -> SpectrumReadError:
    with pytest.raises(SpectrumReadError) as err:
        read_spectra(path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(str(path)), message
    for word in words:
        assert word in err.value.reason, (word, message)
    return err.value


def test_read_errors_are_stellarfield_errors():
    assert issubclass(SpectrumReadError, StellarfieldError)


def test_miles_wcs_in_microns_is_refused(shared_data, tmp_path):
    out = tmp_path / "m0002_microns.fits"
    with fits.open(shared_data / MILES) as hdul:
        header = hdul[0].header
        assert header["CRVAL1"] == 3540.5  # Angstrom (air) in the real file
        header["CRVAL1"] /= 1e4
        header["CDELT1"] /= 1e4
        hdul.writeto(out)
    _refused(out, "outside the MILES range 3526-7502 A")


def test_lamost_wavelength_row_in_nm_is_refused(shared_data, tmp_path):
    out = tmp_path / "spec_nm.fits"
    with fits.open(shared_data / LAMOST_WITH_WAVELENGTH_ROW) as hdul:
        data = hdul[0].data.copy()
        assert 3690 < data[2].min() < 3710 and 9080 < data[2].max() < 9110  # vacuum Angstrom
        data[2] /= 10.0  # nm
        fits.PrimaryHDU(data, header=hdul[0].header).writeto(out)
    error = _refused(out, "outside the LAMOST LRS range 3700-9100 A")
    assert "369." in error.reason  # the range read, in A, is in the message


def test_a_small_gzip_declaring_300_million_pixels_is_refused_before_allocating(shared_data, tmp_path):
    raw = gzip.decompress((shared_data / LAMOST_WITH_WAVELENGTH_ROW).read_bytes())
    out = tmp_path / "spec-huge.fits.gz"
    out.write_bytes(gzip.compress(replace_card(raw, "NAXIS1", "60000000")))  # 5 rows x 60 M = 300 M pixels
    assert out.stat().st_size < 1_000_000
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    error = _refused(out, "truncated FITS file", "1200", "decompressed file has")
    grown_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kb < 200_000, grown_kb  # nothing near the 1.2 GB the header declares
    assert "announce" in error.reason


def test_apstar_without_its_flux_hdu_is_refused(shared_data, tmp_path):
    out = tmp_path / "apStar-no-flux.fits"
    with fits.open(shared_data / APSTAR) as hdul:
        assert hdul[1].header["BUNIT"].startswith("Flux")
        assert np.nanmax(hdul[2].data) == 1e10  # the error array's "no information" value
        fits.HDUList([hdul[0]] + list(hdul[2:])).writeto(out)
    _refused(out, "HDU 1 BUNIT is 'Error (10^-17 erg/s/cm^2/Ang)'", "APOGEE apStar")


def test_stelib_in_another_flux_unit_is_refused(shared_data, tmp_path):
    src = real_file("stelib", shared_data)
    if src is None:
        pytest.skip("STELIB comes with the [demo] extra")
    assert fits.getheader(src)["BUNIT"] == "erg /s /cm2 /angstroms"
    out = tmp_path / src.name
    out.write_bytes(replace_card(src.read_bytes(), "BUNIT", "'Jy'"))
    _refused(out, "HDU 0 BUNIT is 'Jy'")


def test_galah_wavelength_axis_in_nm_is_refused(shared_data, tmp_path):
    src = shared_data / SHARED_FILE_OF_FORMAT["galah_dr3"]
    for ccd in "1234":  # the reader reads the star's four CCD files
        shutil.copy(src.with_name(src.name[:-6] + ccd + ".fits"), tmp_path)
    out = tmp_path / src.name
    with fits.open(out, mode="update") as hdul:
        hdul[0].header["CUNIT1"] = "nm"
    _refused(out, "HDU 0 CUNIT1 is 'nm'")


def test_ingest_skips_each_bad_file_with_its_reason_and_the_rest_lands(shared_data, tmp_path):
    from stellarfield.data.store import Dataset
    from stellarfield.ingest import ingest

    folder = tmp_path / "in"
    folder.mkdir()
    good = sorted((shared_data / "miles").glob("MILES_res2.50_star_m000*V.fits"))[:3]
    for f in good:
        shutil.copy(f, folder)
    with fits.open(good[0]) as hdul:
        hdul[0].header["CRVAL1"] /= 1e4
        hdul[0].header["CDELT1"] /= 1e4
        hdul.writeto(folder / "microns.fits")
    with fits.open(shared_data / APSTAR) as hdul:
        fits.HDUList([hdul[0]] + list(hdul[2:])).writeto(folder / "apStar-no-flux.fits")
    report = ingest([folder], tmp_path / "DS", workers=1, progress=False)
    assert Dataset(tmp_path / "DS").counts() == {"miles": 3}
    reasons = {s["file"].split("/")[-1]: s["reason"] for s in report.skipped}
    assert set(reasons) == {"microns.fits", "apStar-no-flux.fits"}
    assert "outside the MILES range" in reasons["microns.fits"]
    assert "HDU 1 BUNIT" in reasons["apStar-no-flux.fits"]


def test_a_read_given_the_identification_peek_refuses_and_reads_as_a_fresh_one(shared_data, tmp_path):
    """``read_spectra(path, fmt, peek=...)`` with the compact peek of ``classify_peek`` (after a trip
    through pickle, as between ingest's processes) refuses a bad file with the very message a fresh
    read gives, and reads a good one into the same records, without looking at the file again."""
    import pickle

    from spectrum_asserts import assert_same_spectrum

    from stellarfield.io import registry

    bad = tmp_path / "apStar-no-flux.fits"
    with fits.open(shared_data / APSTAR) as hdul:
        fits.HDUList([hdul[0]] + list(hdul[2:])).writeto(bad)
    fresh = _refused(bad, "HDU 1 BUNIT")
    kind, fmt, peek = registry.classify_peek(bad)
    assert (kind, fmt) == ("spectrum", "apogee_apstar") and peek._raw_headers is None
    peek = pickle.loads(pickle.dumps(peek))
    looks = []
    real_peek_file = registry.peek_file
    try:
        registry.peek_file = lambda path: looks.append(path) or real_peek_file(path)
        with pytest.raises(SpectrumReadError) as err:
            registry.read_spectra(bad, fmt, peek=peek)
        assert str(err.value) == str(fresh)
        good = shared_data / APSTAR
        kind, fmt, peek = registry.classify_peek(good)
        looks.clear()
        with_peek = registry.read_spectra(good, fmt, peek=pickle.loads(pickle.dumps(peek)))
        assert looks == []  # no second look at the file
    finally:
        registry.peek_file = real_peek_file
    without = read_spectra(good)
    assert len(with_peek) == len(without) >= 1
    for a, b in zip(with_peek, without):
        assert_same_spectrum(a, b)
    with pytest.raises(ValueError, match="peek given is of"):
        read_spectra(bad, fmt, peek=peek)  # the peek of another file


class _CountingStream:
    """A stream that counts the bytes read from it."""

    def __init__(self, stream):
        self.stream, self.n_read = stream, 0

    def read(self, n=-1):
        data = self.stream.read(n)
        self.n_read += len(data)
        return data


def test_a_whole_gzip_is_checked_from_its_trailer_without_decompressing_its_data(shared_data):
    from stellarfield.io.peek import _check_structure, gzip_trailer_size

    src = shared_data / LAMOST_WITH_WAVELENGTH_ROW
    raw = gzip.decompress(src.read_bytes())
    assert gzip_trailer_size(src, src.stat().st_size) == len(raw)  # RFC 1952 ISIZE
    with fits.open(src) as hdul:
        n_hdus, data_bytes = len(hdul), sum(h.data.nbytes for h in hdul if h.data is not None)
    assert data_bytes > 50_000
    with gzip.open(src, "rb") as gz:
        stream = _CountingStream(gz)
        assert _check_structure(src, stream, None, [], gzip_size=len(raw)) == n_hdus
    assert stream.n_read < len(raw) - data_bytes + 2880  # headers only (the last HDU's data not decompressed)
    with gzip.open(src, "rb") as gz:  # without the trailer: the whole file is walked, same answer
        stream = _CountingStream(gz)
        assert _check_structure(src, stream, None, [], gzip_size=None) == n_hdus
    assert stream.n_read >= len(raw)


@pytest.mark.parametrize("variant", ["plain", "two gzip members", "zero padding after the last HDU"])
def test_gzip_variants_read_as_the_plain_file(shared_data, tmp_path, variant):
    """A ``.fits.gz`` is decompressed in one pass (``fits_utils.gunzip``): several gzip members and a
    trailer that does not name the end of the last HDU (padding) read as the plain FITS file does."""
    src = shared_data / LAMOST_WITH_WAVELENGTH_ROW
    raw = gzip.decompress(src.read_bytes())
    plain = tmp_path / "spec-plain.fits"
    plain.write_bytes(raw)
    out = tmp_path / "spec-variant.fits.gz"
    if variant == "plain":
        out.write_bytes(src.read_bytes())
    elif variant == "two gzip members":
        half = len(raw) // 2
        out.write_bytes(gzip.compress(raw[:half]) + gzip.compress(raw[half:]))
    else:
        out.write_bytes(gzip.compress(raw + b"\0" * 2880))
    expected, got = read_spectra(plain)[0], read_spectra(out)[0]
    np.testing.assert_array_equal(got.flux, expected.flux)
    np.testing.assert_array_equal(got.ivar, expected.ivar)
    np.testing.assert_array_equal(got.wavelength, expected.wavelength)


def test_a_gzip_cut_inside_its_last_hdu_is_refused_with_the_reason(shared_data, tmp_path):
    src = shared_data / LAMOST_WITH_WAVELENGTH_ROW
    out = tmp_path / "spec-cut.fits.gz"
    out.write_bytes(src.read_bytes()[:-5000])
    _refused(out, "truncated")


def test_a_gzip_above_the_in_memory_limit_is_streamed_by_astropy_with_the_same_values(shared_data, monkeypatch):
    from stellarfield.io import fits_utils

    src = shared_data / LAMOST_WITH_WAVELENGTH_ROW
    in_memory = read_spectra(src)[0]
    assert isinstance(fits_utils._fits_source(src), fits_utils.io.BytesIO)
    monkeypatch.setattr(fits_utils, "GUNZIP_IN_MEMORY_BYTES", 1000)
    assert fits_utils._fits_source(src) == src
    streamed = read_spectra(src)[0]
    np.testing.assert_array_equal(streamed.flux, in_memory.flux)
    np.testing.assert_array_equal(streamed.ivar, in_memory.ivar)
