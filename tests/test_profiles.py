"""Every registered product has one complete ProductProfile, declared next to its reader, and the
tables that used to be scattered (telluric bands, continuum degree, bench normalisation, RV
references, probe labels, demo choices) are lookups into it."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from real_files import DEMO_FILE_OF_FORMAT, SHARED_FILE_OF_FORMAT, real_file

from stellarfield.io import profile as profile_module
from stellarfield.io.profile import O2_A_BAND_VACUUM_A, ProductProfile
from stellarfield.io.registry import product_profile, profiles, read_spectra, readers
from stellarfield.spectrum import LABEL_NAMES

SRC = Path(profile_module.__file__).resolve().parents[1]


def test_every_registered_product_has_a_complete_profile():
    registered = {p for r in readers().values() for p in r.products}
    assert set(profiles()) == registered
    # the products of the files in ../shared/data and the demo extra, as the README lists them
    assert registered == {"apogee_apstar", "apogee_aspcapstar", "apogee_apvisit", "gaia_xp", "galah_dr3",
                          "galah_dr3_observed", "galah_pipeline6", "galah_dr4", "lamost_lrs", "lamost_mrs",
                          "lamost_mrs_exposure", "miles", "stelib"}
    for name, p in profiles().items():
        assert isinstance(p, ProductProfile) and p.product == name and p.title
        assert 1000.0 < p.wavelength_range_A[0] < p.wavelength_range_A[1] < 30000.0, name
        assert set(p.probe_labels) <= set(LABEL_NAMES), name
        for ref in p.rv_references:
            where, key = ref.reference.split(".", 1)
            assert where in ("labels", "meta") and (where == "meta" or key in LABEL_NAMES), (name, ref)
    # a reader's own product comes first among its profiles, and the profile is the reader module's
    for r in readers().values():
        assert r.profiles[0].product == r.name
        module = r.read.__module__
        assert module.startswith("stellarfield.io.readers."), (r.name, module)


def test_profiles_keep_the_values_of_the_tables_they_replace():
    # continuum degree: SEDs one scale, flux-like 2 (GALAH's observed flux 3), normalised 1
    degree = {n: p.continuum_degree for n, p in profiles().items()}
    assert degree["gaia_xp"] == degree["miles"] == 0
    assert degree["galah_dr3_observed"] == 3
    assert degree["apogee_apstar"] == degree["lamost_lrs"] == degree["stelib"] == degree["lamost_mrs"] == 2
    assert degree["galah_dr3"] == degree["apogee_aspcapstar"] == 1
    median = {n for n, p in profiles().items() if p.bench_normalisation == "median"}
    assert median == {"apogee_apstar", "apogee_apvisit", "galah_dr3_observed", "lamost_lrs", "miles"}
    assert {n for n, p in profiles().items() if p.rv_references} == {
        "apogee_apvisit", "galah_dr3_observed", "galah_pipeline6", "lamost_lrs"}
    assert [r.name for r in product_profile("apogee_apvisit").rv_references] == ["vhelio", "vrad"]
    assert product_profile("gaia_xp").probe_labels == ("teff", "logg", "fe_h", "alpha_m")
    assert product_profile("gaia_xp").demo_line_zooms == 0 and product_profile("miles").demo_line_zooms == 3


def test_telluric_bands_come_from_one_place():
    with_bands = {n for n, p in profiles().items() if p.telluric_bands_A}
    assert with_bands == {"galah_dr3", "galah_dr3_observed", "galah_pipeline6", "galah_dr4"}
    for name in with_bands:
        assert profiles()[name].telluric_bands_A == (O2_A_BAND_VACUUM_A,)
    # 7590-7700 A in air (GALAH DR3, Buder et al. 2021) is 7592-7702 A in vacuum
    from stellarfield.physics.air_vacuum import air_to_vacuum

    assert np.allclose(air_to_vacuum(np.array([7590.0, 7700.0])), O2_A_BAND_VACUUM_A, atol=0.5)
    # the numbers are written in one module only
    writes = [str(f.relative_to(SRC)) for f in SRC.rglob("*.py") if re.search(r"\b7592(\.0)?\b", f.read_text())]
    assert writes == ["io/profile.py"]
    # the instruments' training mask and the bench's score mask both read the profile
    from stellarfield.eval.masks import observed_frame_bands
    from stellarfield.model.instrument import FALLBACK_CONTINUUM_DEGREE

    assert FALLBACK_CONTINUUM_DEGREE == {"continuum": 1, "flux": 2}
    for name, p in profiles().items():
        assert observed_frame_bands(name) == p.telluric_bands_A


@pytest.mark.parametrize("fmt", sorted({**SHARED_FILE_OF_FORMAT, **DEMO_FILE_OF_FORMAT}))
def test_records_of_a_real_file_agree_with_their_profile(fmt, shared_data, tmp_path):
    path = real_file(fmt, shared_data, tmp_path)
    if path is None:
        pytest.skip(f"no {fmt} file on this machine")
    records = read_spectra(path, format=fmt)
    assert records
    for s in records:
        p = product_profile(s.product)
        assert s.product in readers()[fmt].products
        assert (s.frame, s.normalisation, s.flux_unit) == (p.frame, p.normalisation, p.flux_unit), s.key
        assert p.wavelength_problem(s.wavelength) is None, s.key
        lo, hi = p.wavelength_range_A  # the range is the product's, not a loose bound: within 1%
        assert s.wavelength.min() < lo * 1.01 or s.wavelength.max() > hi * 0.99, s.key


def test_instruments_take_continuum_degree_and_telluric_bands_from_the_profile(shared_data):
    from stellarfield.model.instrument import build_instruments

    records = read_spectra(shared_data / SHARED_FILE_OF_FORMAT["galah_dr3"])
    instruments = build_instruments(records)
    assert set(instruments) == {"galah_dr3", "galah_dr3_observed"}
    for name, inst in instruments.items():
        assert inst.continuum_degree == product_profile(name).continuum_degree
        assert inst.telluric_bands_A == [O2_A_BAND_VACUUM_A]
        assert not inst.pixel_mask(np.array([7650.0])).any()


def test_stellarfield_io_readers_is_always_the_readers_package():
    # stellarfield.io used to re-export registry.readers(), which the subpackage of the same name
    # replaced as soon as the readers loaded: the name meant a function or a package depending on when.
    import types

    import stellarfield.io as io_package

    before = io_package.readers if hasattr(io_package, "readers") else None
    assert before is None or isinstance(before, types.ModuleType)
    profiles()  # loads the readers
    from stellarfield.io import readers as after

    assert isinstance(after, types.ModuleType) and after.__name__ == "stellarfield.io.readers"
