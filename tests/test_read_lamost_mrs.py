"""LAMOST MRS reader against facts of the 8 real files in shared/data/lamost_laspec (7 nights of KIC 8098300 + 1 star)."""

from __future__ import annotations

import gzip
import shutil

import numpy as np
import pytest
from astropy.io import fits

from stellarfield.io import SpectrumReadError, UnknownFormatError, identify_format, read_spectra
from stellarfield.io.readers.lamost_mrs import read_lamost_mrs_exposures

NIGHT_58270 = "med-58270-HIP95119KP01_sp12-076.fits.gz"
BAD_NIGHTS = ("med-58268-HIP95119KP01_sp12-076.fits.gz", "med-58269-HIP95119KP01_sp12-076.fits.gz")


@pytest.fixture(scope="module")
def laspec(shared_data):
    return shared_data / "lamost_laspec"


@pytest.fixture(scope="module")
def records(laspec):
    return {p.name: read_spectra(p) for p in sorted(laspec.glob("med-*"))}


def test_all_eight_files_are_mrs_one_record_each(records, laspec):
    assert len(records) == 8
    assert {identify_format(laspec / name) for name in records} == {"lamost_mrs"}
    assert all(len(r) == 1 and r[0].product == "lamost_mrs" for r in records.values())
    assert len({r[0].key for r in records.values()}) == 8
    # the LRS files next to them stay LRS
    assert {identify_format(p) for p in laspec.glob("spec-*")} == {"lamost_lrs"}


def test_identified_by_content(laspec, tmp_path):
    renamed = tmp_path / "a.fits.gz"
    shutil.copy(laspec / NIGHT_58270, renamed)
    assert identify_format(renamed) == "lamost_mrs"


def test_coadd_facts(records):
    (s,) = records[NIGHT_58270]
    assert s.object_id == "LAMOST J192814.09+435531.0" and s.observation_id == "666912076"
    assert s.star_id == "LAMOST J192814.09+435531.0"
    assert (s.frame, s.normalisation, s.resolution, s.noise_known) == ("observed", "flux", 7500.0, True)
    blue, red = s.segments
    assert (blue.name, blue.n_pixels, red.name, red.n_pixels) == ("blue", 4151, "red", 3726)
    assert blue.wavelength[0] == pytest.approx(4899.8166, abs=1e-3)
    assert blue.wavelength[-1] == pytest.approx(5391.1314, abs=1e-3)
    assert red.wavelength[0] == pytest.approx(6308.4090, abs=1e-3)
    assert red.wavelength[-1] == pytest.approx(6873.3726, abs=1e-3)
    assert np.all(np.diff(np.log10(blue.wavelength)) == pytest.approx(1e-5, abs=2.5e-7))
    assert blue.flux[2000] == pytest.approx(2781.749, rel=1e-6)
    assert blue.ivar[2000] == pytest.approx(0.00064062345, rel=1e-6)
    assert (blue.mask.sum(), red.mask.sum()) == (4147, 3721)  # IVAR > 0 and ANDMASK == 0
    assert s.meta["lmjd"] == 58270 and s.meta["helio_rv_correction_kms"] == pytest.approx(-10.97296)
    assert s.meta["ra_deg"] == pytest.approx(292.058716) and s.meta["dec_deg"] == pytest.approx(43.925304)
    assert (s.meta["nexp_blue"], s.meta["nexp_red"]) == (4, 4)
    assert s.meta["quality"] == "good" and s.labels == {"snr": pytest.approx(65.28)}


def test_single_exposures_with_their_times(laspec):
    exposures = read_lamost_mrs_exposures(laspec / NIGHT_58270)
    assert len(exposures) == 4
    assert read_spectra(laspec / NIGHT_58270, format="lamost_mrs_exposure")[0].key == exposures[0].key
    first = exposures[0]
    assert first.product == "lamost_mrs_exposure" and first.observation_id == "666912076-83908922"
    assert first.meta["lmjm"] == 83908922 and first.meta["exptime_s"] == 1200
    # LMJM counts Beijing local minutes: UTC = LMJM / 1440 - 8 h
    assert first.meta["mjd_start_utc"] == pytest.approx(83908922 / 1440 - 8 / 24)
    assert first.meta["mjd_mid_utc"] == pytest.approx(first.meta["mjd_start_utc"] + 600 / 86400)
    blue, red = first.segments
    assert blue.n_pixels == red.n_pixels == 4136
    # the red exposure's LOGLAM descends in the file: the record's grid increases
    assert red.wavelength[0] == pytest.approx(6308.3224, abs=1e-3) and red.wavelength[-1] == pytest.approx(6872.7198, abs=1e-3)
    assert red.flux[-1] == pytest.approx(fits.getdata(laspec / NIGHT_58270, "R-83908922")["FLUX"][0])
    assert first.labels == {"snr": pytest.approx(25.88)}
    assert [e.meta["lmjm"] for e in exposures] == sorted(e.meta["lmjm"] for e in exposures)


@pytest.mark.parametrize("name", BAD_NIGHTS)
def test_nights_without_starlight_are_flagged_and_masked(records, laspec, name):
    (s,) = records[name]
    assert s.meta["quality"] == "bad" and s.meta["bad_arms"] == "blue,red"
    assert "no usable starlight" in s.meta["quality_reason"]
    assert not s.mask.any() and not s.ivar.any()  # nothing of it can be trained on
    assert max(s.meta["snr_blue"], s.meta["snr_red"]) < 1.1
    # the flux stays as the file has it
    np.testing.assert_array_equal(s.segments[0].flux, fits.getdata(laspec / name, "COADD_B")["FLUX"])
    assert all(e.meta["quality"] == "bad" and not e.mask.any() for e in read_lamost_mrs_exposures(laspec / name))


def test_the_other_nights_are_good(records, laspec):
    good = [n for n in records if n not in BAD_NIGHTS]
    assert len(good) == 6
    for name in good:
        (s,) = records[name]
        assert s.meta["quality"] == "good" and min(s.meta["snr_blue"], s.meta["snr_red"]) > 20
        assert s.mask.mean() > 0.99
    # the weakest exposure of the good nights (med-58625, S/N 3.9 blue) is still kept
    weakest = read_lamost_mrs_exposures(laspec / "med-58625-TD192102N424113K01_sp12-076.fits.gz")[2]
    assert weakest.meta["quality"] == "good" and 3.5 < weakest.meta["snr_blue"] < 4.5


def test_bad_input_names_the_file(laspec, tmp_path):
    raw = gzip.decompress((laspec / NIGHT_58270).read_bytes())
    cut = tmp_path / "med-cut.fits"
    cut.write_bytes(raw[: len(raw) // 3])
    with pytest.raises(SpectrumReadError) as err:
        read_spectra(cut)
    assert str(cut) in str(err.value) and "truncated" in err.value.reason

    # exposures only, no co-added arm: the file is MRS, but the co-add record cannot be made
    with fits.open(laspec / NIGHT_58270) as hdul:
        no_coadd = tmp_path / "no_coadd.fits"
        fits.HDUList([hdul[0].copy()] + [h.copy() for h in hdul[3:]]).writeto(no_coadd)
        no_ivar = tmp_path / "no_ivar.fits"
        table = hdul["COADD_B"].data
        columns = [c for c in hdul["COADD_B"].columns if c.name != "IVAR"]
        fits.HDUList([hdul[0].copy(), fits.BinTableHDU.from_columns(columns, name="COADD_B")]).writeto(no_ivar)
        assert len(table) == 4151
    with pytest.raises(SpectrumReadError) as err:
        read_spectra(no_coadd)
    assert str(no_coadd) in str(err.value) and "no co-added arm" in err.value.reason
    assert len(read_lamost_mrs_exposures(no_coadd)) == 4
    with pytest.raises(UnknownFormatError) as err:
        read_spectra(no_ivar)
    assert str(no_ivar) in str(err.value) and "lamost_mrs" in err.value.reason


def test_info_shows_the_flag(laspec, capsys):
    from stellarfield.cli import main

    assert main(["info", str(laspec / BAD_NIGHTS[0])]) == 0
    out = capsys.readouterr().out
    assert "0 good" in out and "quality: bad: no usable starlight" in out
    assert "star: LAMOST J192814.09+435531.0" in out
