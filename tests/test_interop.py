"""Interchange with specutils: conventions on the specutils side and an exact round trip."""

from __future__ import annotations

import math
import warnings

import astropy.units as u
import numpy as np
import pytest
import specutils
from astropy.io import fits
from astropy.nddata import InverseVariance, StdDevUncertainty
from spectrum_asserts import assert_same_spectrum

from stellarfield.data.interop import from_specutils, to_specutils
from stellarfield.spectrum import Segment, Spectrum


def three_chips() -> Spectrum:
    rng = np.random.default_rng(3)
    segments = []
    for name, start, n in (("blue", 15100.8, 50), ("green", 15833.6, 40), ("red", 16453.6, 30)):
        wave = start * 10 ** (6e-6 * np.arange(n))
        flux = rng.normal(1e3, 10, n).astype(np.float32)
        mask = rng.random(n) > 0.2
        lsf = np.full(n, 0.7, np.float32) if name == "red" else None
        segments.append(Segment(name, wave, flux, rng.uniform(1e-3, 1e-2, n), mask, lsf))
    return Spectrum(
        "2M00452143+1634446", "APOGEE", "APOGEE-N", "apogee_apstar", segments, "rest", "flux",
        resolution=22500.0, flux_unit="1e-17 erg / (s cm2 Angstrom)",
        labels={"teff": 4651.0, "logg": float("nan"), "snr": 79.0},
        provenance={"file": "/x/apStar.fits", "hdu": "1,2,3"}, meta={"telescope": "apo25m", "nvisits": 4},
    )


def miles_like() -> Spectrum:
    wave = np.linspace(3541.5, 7411.6, 200)
    return Spectrum("m0002", "MILES", "INT-IDS", "miles",
                    [Segment("full", wave, np.linspace(1, 2, 200), np.zeros(200), np.ones(200, bool))],
                    "rest", "flux", noise_known=False)


def test_segments_become_a_spectrum_list_with_specutils_conventions():
    record = three_chips()
    out = to_specutils(record)
    assert isinstance(out, specutils.SpectrumList) and len(out) == 3
    blue = out[0]
    assert type(blue) is specutils.Spectrum  # the specutils 2.x class, not the deprecated Spectrum1D
    assert blue.spectral_axis.unit == u.AA
    assert blue.spectral_axis.value[0] == 15100.8
    assert blue.flux.unit == u.Unit("1e-17 erg / (s cm2 Angstrom)")
    assert np.array_equal(blue.flux.value, record.segments[0].flux)
    assert isinstance(blue.uncertainty, InverseVariance)
    assert blue.uncertainty.unit == u.Unit("1e-17 erg / (s cm2 Angstrom)") ** -2
    assert np.array_equal(blue.uncertainty.array, record.segments[0].ivar)
    # specutils: True = bad; the record: True = good
    assert np.array_equal(blue.mask, ~record.segments[0].mask) and blue.mask.any()
    assert blue.meta["medium"] == "vacuum" and blue.meta["frame"] == "rest"
    assert blue.meta["segment"] == "blue" and out[2].meta["segment"] == "red"
    assert blue.meta["object_id"] == "2M00452143+1634446" and blue.meta["labels"]["teff"] == 4651.0
    assert "lsf_fwhm" not in blue.meta and out[2].meta["lsf_fwhm"].unit == u.AA


def test_round_trip_several_segments_is_exact():
    record = three_chips()
    assert_same_spectrum(record, from_specutils(to_specutils(record)))
    assert_same_spectrum(record, Spectrum.from_specutils(record.to_specutils()))


def test_round_trip_without_noise_model():
    record = miles_like()
    out = to_specutils(record)
    assert isinstance(out, specutils.Spectrum) and out.uncertainty is None  # unknown, not infinite
    assert out.flux.unit == u.dimensionless_unscaled
    back = from_specutils(out)
    assert_same_spectrum(record, back)
    assert back.noise_known is False and back.segments[0].name == "full"


def test_unparseable_flux_unit_is_kept_as_a_string():
    record = miles_like()
    record.flux_unit = "Flux (10^-17 erg/s/cm^2/Ang)"
    with pytest.warns(UserWarning, match="cannot parse the flux unit"):
        out = to_specutils(record)
    assert out.flux.unit == u.dimensionless_unscaled and out.meta["flux_unit"] == record.flux_unit
    assert from_specutils(out).flux_unit == "Flux (10^-17 erg/s/cm^2/Ang)"


def foreign(spectral_axis, flux=None, **kwargs) -> specutils.Spectrum:
    n = len(spectral_axis)
    flux = np.linspace(1.0, 2.0, n) * u.Jy if flux is None else flux
    return specutils.Spectrum(flux=flux, spectral_axis=spectral_axis, **kwargs)


IDS = dict(object_id="HD 1", survey="X", instrument="Y", product="x_y", frame="observed", normalisation="flux")


def test_foreign_spectrum_needs_ids_and_a_medium():
    spec = foreign(np.linspace(500.0, 600.0, 11) * u.nm)
    with pytest.raises(ValueError, match="medium"):
        from_specutils(spec, **IDS)
    with pytest.raises(ValueError, match="object_id"):
        from_specutils(spec, medium="vacuum", **{k: v for k, v in IDS.items() if k != "object_id"})
    record = from_specutils(spec, medium="vacuum", **IDS)
    assert record.segments[0].wavelength[0] == pytest.approx(5000.0, rel=1e-15)  # nm -> Angstrom
    assert record.flux_unit == "Jy" and record.noise_known is False
    assert np.all(record.segments[0].ivar == 0) and np.all(record.segments[0].mask)


def test_air_wavelengths_are_converted_only_when_asked():
    air = foreign(np.array([5000.0, 6562.8]) * u.AA, meta={"header": fits.Header([("AIRORVAC", "air")])})
    with pytest.raises(ValueError, match="says its wavelengths are in air"):
        from_specutils(air, **IDS)
    record = from_specutils(air, medium="air", **IDS)
    # Morton (2000): n - 1 = 2.79e-4 at 5000 A, so vacuum = air + 1.39 A; H-alpha 6562.8 air = 6564.6 vacuum
    assert record.segments[0].wavelength[0] == pytest.approx(5001.39, abs=0.01)
    assert record.segments[0].wavelength[1] == pytest.approx(6564.61, abs=0.01)
    vacuum = foreign(np.array([5000.0, 6562.8]) * u.AA, meta={"header": fits.Header([("AIRORVAC", "vac")])})
    assert from_specutils(vacuum, **IDS).segments[0].wavelength[0] == 5000.0


def test_frequency_axis_and_stddev_uncertainty():
    # Increasing frequency: wavelengths 5002, 5001, 5000 A, so the arrays must be turned around.
    freq = (np.array([5002.0, 5001.0, 5000.0]) * u.AA).to(u.Hz, equivalencies=u.spectral())
    spec = foreign(freq, flux=np.array([1.0, 2.0, 3.0]) * u.Jy,
                   uncertainty=StdDevUncertainty(np.array([0.1, 0.5, 0.0]) * u.Jy),
                   mask=np.array([False, True, False]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no divide-by-zero warning for the zero error
        record = from_specutils(spec, medium="vacuum", **IDS)
    seg = record.segments[0]
    assert seg.wavelength == pytest.approx([5000.0, 5001.0, 5002.0], rel=1e-12)  # increasing again
    assert seg.flux.tolist() == [3.0, 2.0, 1.0]
    # ivar = 1 / sigma**2; a zero error is no noise estimate at all: a bad pixel with ivar 0
    assert seg.ivar.tolist() == pytest.approx([0.0, 0.0, 100.0])
    assert seg.mask.tolist() == [False, False, True]
    assert record.noise_known is True


def test_real_apstar_round_trips_through_specutils(shared_data):
    from stellarfield.io import identify_format, read_spectra
    from stellarfield.io.errors import SpectrumReadError

    path = shared_data / "apogee/apstar/apStar-r6-2M00452143+1634446.fits"
    try:
        identify_format(path)
    except SpectrumReadError as exc:
        pytest.skip(f"no apStar reader registered yet: {exc}")
    record = read_spectra(path)[0]
    out = record.to_specutils()
    n_segments = len(record.segments)
    if n_segments > 1:
        assert isinstance(out, specutils.SpectrumList) and len(out) == n_segments
    pieces = list(out) if n_segments > 1 else [out]
    # The apStar grid is log-linear from 10**CRVAL1 (HDU 1), vacuum Angstrom, 8575 pixels in all.
    header = fits.getheader(path, 1)
    assert pieces[0].spectral_axis[0].to_value(u.AA) == pytest.approx(10 ** header["CRVAL1"], rel=1e-12)
    assert sum(p.flux.shape[0] for p in pieces) == header["NAXIS1"]
    assert_same_spectrum(record, Spectrum.from_specutils(out))
