"""GALAH readers (DR3 per-CCD files, IRAF pipeline 6.0, DR4 fit tables) against facts of the real
files in shared/data/galah (see its NOTES.md). Facts are recomputed here from the headers with
astropy wherever possible, independently of the reader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from stellarfield.io.errors import SpectrumReadError, UnknownFormatError
from stellarfield.io.registry import auxiliary_kind, get_reader, identify_format, read_spectra, unit_key
from stellarfield.physics.air_vacuum import air_to_vacuum, vacuum_to_air

C_KMS = 299792.458
H_ALPHA_AIR = 6562.80  # A, rest, air
H_ALPHA_VAC = 6564.61  # A, rest, vacuum

# Air coverage of DR3 ext 0 over the 57 stars (NOTES.md): min start, max end per CCD.
DR3_AIR_COVERAGE = {1: (4712.5, 4902.6), 2: (5647.5, 5873.8), 3: (6476.6, 6738.2), 4: (7584.6, 7887.6)}


@pytest.fixture(scope="module")
def galah(shared_data) -> Path:
    return shared_data / "galah"


@pytest.fixture(scope="module")
def dr3_star_files(galah) -> dict[str, list[Path]]:
    files: dict[str, list[Path]] = {}
    for f in sorted((galah / "dr3").glob("*.fits")):
        files.setdefault(f.name[:15], []).append(f)
    return files


@pytest.fixture(scope="module")
def dr3_records(dr3_star_files) -> dict[str, dict[str, object]]:
    """sobject_id -> {product: record}, reading one file (CCD3) per star."""
    out = {}
    for sid, files in dr3_star_files.items():
        out[sid] = {r.product: r for r in read_spectra(files[2])}
    return out


def _ext_wave(header) -> np.ndarray:
    n = header["NAXIS1"]
    return header["CRVAL1"] + header["CDELT1"] * (np.arange(n) + 1 - header["CRPIX1"])


def _line_core(wave: np.ndarray, flux: np.ndarray, centre: float, half_width: float = 3.0) -> float:
    s = (wave > centre - half_width) & (wave < centre + half_width)
    return float(wave[s][np.argmin(flux[s])])


# ---------------------------------------------------------------------------------------------
# GALAH DR3
# ---------------------------------------------------------------------------------------------
def test_dr3_has_57_stars_of_4_ccds(dr3_star_files):
    assert len(dr3_star_files) == 57
    assert all(len(f) == 4 for f in dr3_star_files.values())


def test_dr3_one_file_per_star_gives_57_unit_keys_shared_by_its_4_ccds(dr3_star_files):
    keys_one_file = {unit_key(files[0], "galah_dr3") for files in dr3_star_files.values()}
    assert len(keys_one_file) == 57
    all_keys = {unit_key(f, "galah_dr3") for files in dr3_star_files.values() for f in files}
    assert all_keys == keys_one_file
    for files in list(dr3_star_files.values())[:3]:
        assert len({unit_key(f, "galah_dr3") for f in files}) == 1


def test_dr3_reads_57_normalised_and_57_observed_records_of_4_ccds(dr3_records):
    products = [p for recs in dr3_records.values() for p in recs]
    assert products.count("galah_dr3") == 57
    assert products.count("galah_dr3_observed") == 57
    for sid, recs in dr3_records.items():
        assert len(recs) == 2
        for r in recs.values():
            assert r.object_id == sid and len(sid) == 15
            assert [s.name for s in r.segments] == ["ccd1", "ccd2", "ccd3", "ccd4"]
            assert r.survey == "GALAH" and r.instrument == "HERMES" and r.resolution == 28000
            assert r.meta["wavelength_medium_in_file"] == "air"
            assert r.meta["missing_ccds"] == ""
        assert (recs["galah_dr3"].frame, recs["galah_dr3"].normalisation) == ("rest", "continuum")
        assert (recs["galah_dr3_observed"].frame, recs["galah_dr3_observed"].normalisation) == ("observed", "flux")


def test_dr3_same_records_whichever_ccd_file_is_read(dr3_star_files):
    files = dr3_star_files["150429004102015"]
    a = read_spectra(files[0])
    b = read_spectra(files[3])
    assert [r.product for r in a] == [r.product for r in b]
    for ra, rb in zip(a, b):
        assert ra.provenance == rb.provenance
        np.testing.assert_array_equal(ra.flux, rb.flux)


def test_dr3_pixel_counts_follow_naxis1(dr3_records, dr3_star_files):
    # 150429004102015: 4111, 4112, 4111, 4111 pixels; 170912002402027: CCD2-4 have 4097.
    for sid in ("150429004102015", "170912002402027", "140310003801049"):
        naxis = [fits.getheader(f, 0)["NAXIS1"] for f in dr3_star_files[sid]]
        for r in dr3_records[sid].values():
            assert [s.n_pixels for s in r.segments] == naxis
    assert [s.n_pixels for s in dr3_records["150429004102015"]["galah_dr3"].segments] == [4111, 4112, 4111, 4111]


def test_dr3_observed_grid_is_ext0_wcs_converted_to_vacuum(dr3_records, dr3_star_files):
    sid = "140310003801049"
    obs = dr3_records[sid]["galah_dr3_observed"]
    norm = dr3_records[sid]["galah_dr3"]
    for ccd, f in enumerate(dr3_star_files[sid], start=1):
        with fits.open(f) as hdul:
            air0, air4 = _ext_wave(hdul[0].header), _ext_wave(hdul[4].header)
        seg_obs, seg_norm = obs.segments[ccd - 1], norm.segments[ccd - 1]
        np.testing.assert_allclose(vacuum_to_air(seg_obs.wavelength), air0, atol=1e-6)
        np.testing.assert_allclose(vacuum_to_air(seg_norm.wavelength), air4, atol=1e-6)
        shift = seg_obs.wavelength - air0
        assert 1.30 < shift.min() and shift.max() < 2.20  # air -> vacuum, +1.32 (4713 A) .. +2.17 A (7888 A)


def test_dr3_air_coverage_matches_notes(dr3_records):
    """Over the 57 stars the ext-0 air grids start and end where NOTES.md says."""
    for ccd, (lo, hi) in DR3_AIR_COVERAGE.items():
        starts = [vacuum_to_air(r["galah_dr3_observed"].segments[ccd - 1].wavelength[[0, -1]]) for r in dr3_records.values()]
        starts = np.array(starts)
        assert starts[:, 0].min() == pytest.approx(lo, abs=0.05)
        assert starts[:, 1].max() == pytest.approx(hi, abs=0.05)


def test_air_to_vacuum_shift_against_raw_crval1(dr3_records, dr3_star_files):
    """The shift near 5000-6563 A is +1.4..+1.8 A: 1.57 A at CCD2's start, 1.79 A at CCD3's."""
    sid = "140311006601089"
    seg = {s.name: s for s in dr3_records[sid]["galah_dr3_observed"].segments}
    crval2 = fits.getheader(dr3_star_files[sid][1], 0)["CRVAL1"]
    crval3 = fits.getheader(dr3_star_files[sid][2], 0)["CRVAL1"]
    assert seg["ccd2"].wavelength[0] - crval2 == pytest.approx(1.57, abs=0.01)
    assert seg["ccd3"].wavelength[0] - crval3 == pytest.approx(1.79, abs=0.01)
    assert 1.4 < seg["ccd2"].wavelength[0] - crval2 < seg["ccd3"].wavelength[0] - crval3 < 1.85


def test_dr3_rv_is_implied_by_the_two_wcs(dr3_records, dr3_star_files):
    sid = "140310003801049"
    rvs = []
    for f in dr3_star_files[sid]:
        with fits.open(f) as hdul:
            rvs.append(C_KMS * (hdul[0].header["CRVAL1"] / hdul[4].header["CRVAL1"] - 1))
    assert np.ptp(rvs) < 1e-6  # identical across CCDs
    assert rvs[0] == pytest.approx(54.515, abs=0.001)
    for r in dr3_records[sid].values():
        assert r.labels["rv_kms"] == pytest.approx(rvs[0], abs=1e-9)
        assert r.meta["rv_spread_kms"] < 1e-6


def test_dr3_rv_range_over_57_stars(dr3_records):
    # NOTES.md quotes the range as "-200 ... +73" with the opposite sign; the formula
    # RV = c (CRVAL1[ext 0] / CRVAL1[ext 4] - 1) gives -72.8 .. +199.7, and the Halpha test
    # below shows that this sign is the physical one (receding star: lines to the red).
    rvs = np.array([r["galah_dr3"].labels["rv_kms"] for r in dr3_records.values()])
    assert rvs.min() == pytest.approx(-72.79, abs=0.01)
    assert rvs.max() == pytest.approx(199.74, abs=0.01)
    assert max(r["galah_dr3"].meta["rv_spread_kms"] for r in dr3_records.values()) < 1e-5


@pytest.mark.parametrize("sid", ["170530003101091", "150429004102015", "140310003801049"])
def test_dr3_halpha_core_sits_at_rest_and_doppler_shifted_vacuum_wavelengths(dr3_records, sid):
    rest = dr3_records[sid]["galah_dr3"].segments[2]
    obs = dr3_records[sid]["galah_dr3_observed"].segments[2]
    rv = dr3_records[sid]["galah_dr3"].labels["rv_kms"]
    assert _line_core(rest.wavelength, rest.flux, H_ALPHA_VAC) == pytest.approx(H_ALPHA_VAC, abs=0.3)
    expected_obs = H_ALPHA_VAC * (1 + rv / C_KMS)
    assert _line_core(obs.wavelength, obs.flux, expected_obs, 6.0) == pytest.approx(expected_obs, abs=0.3)


def test_dr3_snr_is_median_inverse_relative_error_of_ccd2(dr3_records, galah):
    """selected_features.txt (measured independently when the sample was chosen) lists it."""
    table = np.genfromtxt(galah / "dr3" / "selected_features.txt", names=True, dtype=None, encoding="utf-8")
    assert len(table) == 57
    for row in table:
        recs = dr3_records[str(row["sobject_id"])]
        assert recs["galah_dr3"].labels["snr"] == pytest.approx(row["snr_ccd2"], abs=0.051)
        assert recs["galah_dr3_observed"].meta["snr_ccd3"] == pytest.approx(row["snr_ccd3"], abs=0.051)


def test_dr3_noise_and_mask_from_relative_error(dr3_records, dr3_star_files):
    """CCD4 of 140814004801249: 131 pixels with flux <= 0 and 137 with relative error <= 0."""
    sid = "140814004801249"
    with fits.open(dr3_star_files[sid][3]) as hdul:
        flux0 = hdul[0].data.astype(float)
        rel = hdul[1].data.astype(float)
        flux4 = hdul[4].data.astype(float)
    good = (flux0 > 0) & (rel > 0)
    assert (flux0 <= 0).sum() == 131 and (rel <= 0).sum() == 137
    obs = dr3_records[sid]["galah_dr3_observed"].segments[3]
    norm = dr3_records[sid]["galah_dr3"].segments[3]
    np.testing.assert_array_equal(obs.mask, good)
    np.testing.assert_array_equal(norm.mask, good & (flux4 > 0))
    i = np.flatnonzero(good)[2000]
    assert obs.ivar[i] == pytest.approx(1 / (rel[i] * flux0[i]) ** 2, rel=1e-5)
    assert norm.ivar[i] == pytest.approx(1 / (rel[i] * flux4[i]) ** 2, rel=1e-5)
    assert norm.flux[i] == pytest.approx(flux4[i], rel=1e-6)
    assert np.all(obs.ivar[~good] == 0) and np.all(norm.ivar[~norm.mask] == 0)
    # 140310003801049 CCD2 is clean: every pixel good
    assert dr3_records["140310003801049"]["galah_dr3"].segments[1].mask.all()


def test_dr3_missing_ccd_file_is_recorded(dr3_star_files, tmp_path):
    for f in dr3_star_files["140310003801049"][:3]:  # CCD4 left out
        (tmp_path / f.name).symlink_to(f)
    records = read_spectra(tmp_path / "1403100038010491.fits")
    assert [r.product for r in records] == ["galah_dr3", "galah_dr3_observed"]
    for r in records:
        assert r.meta["missing_ccds"] == "ccd4"
        assert [s.name for s in r.segments] == ["ccd1", "ccd2", "ccd3"]
        assert r.labels["rv_kms"] == pytest.approx(54.515, abs=0.001)


def test_dr3_file_without_normalised_extension_gives_observed_record_only(dr3_star_files, tmp_path):
    """227 DR3 stars lack ext 4 (DR3 spectra page): such a CCD still reads, in the observed record."""
    files = dr3_star_files["140310003801049"]
    for f in files[:3]:
        (tmp_path / f.name).symlink_to(f)
    with fits.open(files[3]) as hdul:  # CCD4 without its ext 4, written to the test's temp folder
        fits.HDUList([h.copy() for h in hdul[:4]]).writeto(tmp_path / files[3].name)
    records = {r.product: r for r in read_spectra(tmp_path / files[3].name)}
    assert records["galah_dr3"].meta["missing_normalised_ccds"] == "ccd4"
    assert [s.name for s in records["galah_dr3"].segments] == ["ccd1", "ccd2", "ccd3"]
    assert [s.name for s in records["galah_dr3_observed"].segments] == ["ccd1", "ccd2", "ccd3", "ccd4"]


def test_dr3_file_with_other_name_reads_alone_with_ccd_from_spectid(dr3_star_files, tmp_path):
    link = tmp_path / "green_camera.fits"
    link.symlink_to(dr3_star_files["140310003801049"][1])
    assert identify_format(link) == "galah_dr3"
    records = read_spectra(link)
    assert len(records) == 2
    for r in records:
        assert r.object_id == "140310003801049"  # OBJECT header
        assert [s.name for s in r.segments] == ["ccd2"]
        assert r.meta["missing_ccds"] == "ccd1,ccd3,ccd4"


def test_dr3_unreadable_sibling_is_named_in_the_error(dr3_star_files, tmp_path):
    files = dr3_star_files["140310003801049"]
    (tmp_path / files[0].name).symlink_to(files[0])
    (tmp_path / files[1].name).write_bytes(b"SIMPLE  =                    T" + b" " * 50)
    with pytest.raises(SpectrumReadError, match="1403100038010492.fits"):
        read_spectra(tmp_path / files[0].name)


def test_dr3_reader_declares_both_products():
    assert get_reader("galah_dr3").products == ("galah_dr3", "galah_dr3_observed")


# ---------------------------------------------------------------------------------------------
# GALAH pipeline 6.0
# ---------------------------------------------------------------------------------------------
# sobject_id: (teff_r, logg_r, fe_h_r, rv_com) from NOTES.md (dr6.0.fits)
PIPELINE6_LABELS = {
    "210115000101001": (4688, 2.19, -0.27, -18.7),
    "210115000101002": (4711, 2.40, -0.20, 31.9),
    "210115000101003": (6592, 3.93, -0.82, 23.3),
    "210115000101004": (6943, 3.80, -0.99, -4.7),
    "210115000101005": (5951, 4.11, -0.08, -4.6),
    "210115002201239": (5655, 4.31, 0.02, -21.4),
}


@pytest.fixture(scope="module")
def p6_files(galah) -> dict[str, list[Path]]:
    files: dict[str, list[Path]] = {}
    for f in sorted((galah / "pipeline6").glob("2*.fits")):
        files.setdefault(f.name[:15], []).append(f)
    return files


@pytest.fixture(scope="module")
def p6_records(p6_files) -> dict[str, object]:
    out = {}
    for sid, files in p6_files.items():
        (record,) = read_spectra(files[0])
        out[sid] = record
    return out


def test_pipeline6_six_stars_one_unit_each(p6_files, p6_records):
    assert sorted(p6_files) == sorted(PIPELINE6_LABELS)
    assert len({unit_key(f, "galah_pipeline6") for files in p6_files.values() for f in files}) == 6
    for sid, r in p6_records.items():
        assert r.product == "galah_pipeline6" and r.object_id == sid
        assert (r.frame, r.normalisation, r.resolution) == ("observed", "continuum", None)
        assert [s.name for s in r.segments] == ["ccd1", "ccd2", "ccd3", "ccd4"]
        assert [s.n_pixels for s in r.segments] == [4096] * 4
        assert r.meta["wavelength_medium_in_file"] == "air" and r.meta["missing_ccds"] == ""


def test_pipeline6_labels_from_dr6_table(p6_records):
    for sid, (teff, logg, fe_h, rv) in PIPELINE6_LABELS.items():
        r = p6_records[sid]
        assert r.meta["label_source"] == "dr6.0.fits"
        assert r.labels["teff"] == pytest.approx(teff, abs=0.5)
        assert r.labels["logg"] == pytest.approx(logg, abs=0.005)
        assert r.labels["fe_h"] == pytest.approx(fe_h, abs=0.005)
        assert r.labels["rv_kms"] == pytest.approx(rv, abs=0.05)
    assert p6_records["210115000101001"].labels["alpha_m"] == pytest.approx(0.0908, abs=1e-4)
    assert p6_records["210115002201239"].labels["snr"] == pytest.approx(719.0, abs=0.01)  # Vesta, CCD2
    assert p6_records["210115000101004"].meta["reduction_flags"] == 40960


def test_pipeline6_labels_fall_back_to_headers_without_table(p6_files, tmp_path):
    for f in p6_files["210115000101001"]:
        (tmp_path / f.name).symlink_to(f)
    (record,) = read_spectra(tmp_path / "2101150001010013.fits")
    assert record.meta["label_source"] == "header"
    assert record.labels["teff"] == pytest.approx(4688.426, abs=1e-3)
    assert record.labels["logg"] == pytest.approx(2.1868, abs=1e-4)
    assert record.labels["rv_kms"] == pytest.approx(-18.684, abs=1e-3)
    assert record.labels["snr"] == pytest.approx(43.21, abs=0.01)


def test_pipeline6_lsf_fwhm_is_ext7_in_vacuum_angstrom(p6_records, p6_files):
    for sid, r in p6_records.items():
        for seg, f in zip(r.segments, p6_files[sid]):
            with fits.open(f) as hdul:
                fwhm_air = hdul[7].data.astype(float)
                air = _ext_wave(hdul[1].header)
            assert seg.lsf_fwhm is not None
            assert 0.19 < seg.lsf_fwhm.min() and seg.lsf_fwhm.max() < 0.41
            ratio = seg.lsf_fwhm / fwhm_air
            assert 1.00026 < ratio.min() and ratio.max() < 1.00031  # d(lambda_vac)/d(lambda_air)
            np.testing.assert_allclose(vacuum_to_air(seg.wavelength), air, atol=1e-6)
    seg = p6_records["210115000101001"].segments
    assert 0.20 < np.median(seg[0].lsf_fwhm) < 0.23 and 0.33 < np.median(seg[3].lsf_fwhm) < 0.37
    assert p6_records["210115000101001"].meta["lsf_b_ccd1"] == pytest.approx(2.812)
    assert p6_records["210115000101001"].meta["lsf"] == "exp(-0.693147|2x/fwhm|^B)"


def test_pipeline6_noise_and_mask(p6_records, p6_files):
    """CCD3 of 210115000101004: 121 pixels with fluxed flux <= 0 (relative error <= 0 there too)."""
    with fits.open(p6_files["210115000101004"][2]) as hdul:
        fluxed, norm, rel = (hdul[i].data.astype(float) for i in (0, 1, 2))
    assert (fluxed <= 0).sum() == 121 and np.array_equal(rel <= 0, fluxed <= 0)
    seg = p6_records["210115000101004"].segments[2]
    np.testing.assert_array_equal(seg.mask, (rel > 0) & (norm > 0))
    i = np.flatnonzero(seg.mask)[100]
    assert seg.ivar[i] == pytest.approx(1 / (rel[i] * norm[i]) ** 2, rel=1e-5)


def test_pipeline6_barycentric_grid_is_not_rest_frame(p6_records):
    """The Sun (via Vesta, rv_com = -21.4 km/s): Halpha sits at the Doppler-shifted wavelength."""
    sun = p6_records["210115002201239"]
    seg = sun.segments[2]
    expected = H_ALPHA_VAC * (1 + sun.labels["rv_kms"] / C_KMS)  # 6564.14 A
    assert _line_core(seg.wavelength, seg.flux, expected) == pytest.approx(expected, abs=0.1)


def test_dr6_table_is_auxiliary_not_a_spectrum(galah):
    table = galah / "pipeline6" / "dr6.0.fits"
    assert auxiliary_kind(table) == "galah_dr6_table"
    with pytest.raises(UnknownFormatError):
        identify_format(table)


# ---------------------------------------------------------------------------------------------
# GALAH DR4
# ---------------------------------------------------------------------------------------------
DR4_PIXELS = {"150411003101372": 15097, "170205003401240": 15095, "210919003601115": 15086, "220220002701068": 15077}


@pytest.fixture(scope="module")
def dr4_records(galah) -> dict[str, object]:
    out = {}
    for f in sorted((galah / "dr4").glob("*_allstar_fit_spectrum.fits")):
        (record,) = read_spectra(f)
        out[record.object_id] = record
    return out


def test_dr4_four_stars_four_ccd_windows(dr4_records):
    assert sorted(dr4_records) == sorted(DR4_PIXELS)
    for sid, r in dr4_records.items():
        assert r.product == "galah_dr4" and (r.frame, r.normalisation) == ("rest", "continuum")
        assert r.meta["frame_presumed"] is True and r.meta["wavelength_medium_in_file"] == "air"
        assert r.n_pixels == DR4_PIXELS[sid]
        assert [s.name for s in r.segments] == ["ccd1", "ccd2", "ccd3", "ccd4"]
        assert [s.n_pixels for s in r.segments][:3] == [4096] * 3
        assert 0.85 < r.mask.mean() < 0.95
        assert r.labels == {}


def test_dr4_arrays_match_the_table(dr4_records, galah):
    f = galah / "dr4" / "170205003401240_allstar_fit_spectrum.fits"
    table = fits.getdata(f, 1)
    r = dr4_records["170205003401240"]
    np.testing.assert_allclose(vacuum_to_air(r.wavelength), table["wave"], atol=1e-6)
    np.testing.assert_array_equal(r.mask, table["mob"])
    good = table["mob"]
    np.testing.assert_allclose(r.ivar[good], 1 / table["uob"][good] ** 2, rtol=1e-5)
    assert np.all(r.ivar[~good] == 0)
    assert r.segments[3].wavelength[0] == pytest.approx(air_to_vacuum(7679.604), abs=1e-3)  # CCD4 trimmed


def test_dr4_failed_fit_reads_and_is_flagged(dr4_records):
    assert dr4_records["150411003101372"].meta["suspect_fit"] is True
    assert dr4_records["150411003101372"].meta["model_flux_max"] > 1e5
    for sid in ("170205003401240", "210919003601115", "220220002701068"):
        assert dr4_records[sid].meta["suspect_fit"] is False


def test_dr4_halpha_in_rest_frame(dr4_records):
    seg = dr4_records["170205003401240"].segments[2]
    assert _line_core(seg.wavelength, seg.flux, H_ALPHA_VAC) == pytest.approx(H_ALPHA_VAC, abs=0.1)


# ---------------------------------------------------------------------------------------------
# Identification: exactly one reader per GALAH file
# ---------------------------------------------------------------------------------------------
def test_every_galah_file_matches_exactly_one_reader(galah):
    expected = {"dr3": ("galah_dr3", 228), "pipeline6": ("galah_pipeline6", 24), "dr4": ("galah_dr4", 4)}
    for folder, (fmt, count) in expected.items():
        files = [f for f in sorted((galah / folder).glob("*.fits")) if f.name != "dr6.0.fits"]
        assert len(files) == count
        assert {identify_format(f) for f in files} == {fmt}  # identify_format raises on 0 or >1 matches
