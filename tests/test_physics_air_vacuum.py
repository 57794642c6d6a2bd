"""Air <-> vacuum conversion (physics.air_vacuum, Morton 2000 via specutils).

Facts checked: the refractive index of Morton (2000, ApJS 130, 403; the Birch & Downs 1994
formula he adopted, as used by VALD and SDSS), written out independently here; the shifts it gives
(+1.39 A at 5000 A, +4.10 A at 15000 A, air -> vacuum); the round trip to 1e-8 A; and, on a real
MILES spectrum (air wavelengths per ../shared/data/miles/NOTES.md), that strong lines of Arcturus
land on their laboratory VACUUM wavelengths (NIST ASD) after conversion.

Measured: specutils agrees with the formula written out to 7e-12 A over 3000-17500 A; round trips
to 2e-12 A; Arcturus's Ca II H and K, H beta, Na D1 and D2 and H alpha minima lie 0.02-0.14 A from
the vacuum wavelengths (the conversion moves them by 1.1-1.8 A, i.e. 1.2-2 MILES pixels).
"""

from __future__ import annotations

import astropy.units as u
import numpy as np
import pytest
from astropy.io import fits

from stellarfield.physics.air_vacuum import air_to_vacuum, vacuum_to_air

WAVE = np.linspace(3000.0, 17500.0, 14501)  # UV to the end of the APOGEE H band, Angstrom


def _morton_vacuum_to_air(wave_vacuum):
    """lambda_air = lambda_vac / n, n - 1 = 8.34254e-5 + 2.406147e-2 / (130 - s^2) + 1.5998e-4 / (38.9 - s^2),
    s = 1e4 / lambda_vac in inverse microns (Morton 2000, section 3)."""
    s2 = (1e4 / wave_vacuum) ** 2
    n = 1.0 + 8.34254e-5 + 2.406147e-2 / (130.0 - s2) + 1.5998e-4 / (38.9 - s2)
    return wave_vacuum / n


def test_vacuum_to_air_is_the_morton_formula():
    np.testing.assert_allclose(vacuum_to_air(WAVE), _morton_vacuum_to_air(WAVE), rtol=0, atol=1e-8)


def test_round_trips_to_1e_8_angstrom():
    np.testing.assert_allclose(vacuum_to_air(air_to_vacuum(WAVE)), WAVE, rtol=0, atol=1e-8)
    np.testing.assert_allclose(air_to_vacuum(vacuum_to_air(WAVE)), WAVE, rtol=0, atol=1e-8)


@pytest.mark.parametrize(
    ("wave_air", "shift"),
    [
        (3540.5, 1.0118),  # first MILES pixel
        (5000.0, 1.3948),
        (6562.80, 1.8130),  # H alpha: 6564.61 A in vacuum
        (15000.0, 4.0996),
    ],
)
def test_known_shifts(wave_air, shift):
    assert float(air_to_vacuum(wave_air)) - wave_air == pytest.approx(shift, abs=1e-4)
    assert float(vacuum_to_air(wave_air + shift)) == pytest.approx(wave_air, abs=1e-4)


def test_quantities_and_output_type():
    from_nm = air_to_vacuum(500.0 * u.nm)
    assert isinstance(from_nm, np.ndarray) and from_nm.dtype == np.float64
    assert float(from_nm) == pytest.approx(float(air_to_vacuum(5000.0)), abs=1e-9)
    # The conversion keeps a grid strictly increasing.
    assert np.all(np.diff(air_to_vacuum(3540.5 + 0.9 * np.arange(4300))) > 0)


# Laboratory vacuum wavelengths (Angstrom, NIST Atomic Spectra Database).
VACUUM_LINES = {
    "Ca II K": 3934.777,
    "Ca II H": 3969.591,
    "H beta": 4862.68,
    "Na I D2": 5891.583,
    "Na I D1": 5897.558,
    "H alpha": 6564.61,
}


def test_miles_arcturus_lines_land_on_vacuum_wavelengths(shared_data):
    """MILES is in air: after air_to_vacuum the line minima of Arcturus (m0501, rest frame) sit on the
    vacuum wavelengths within 0.3 A (measured 0.02-0.14 A), and without it they would be 1.1-1.8 A off."""
    with fits.open(shared_data / "miles" / "MILES_res2.50_star_m0501V.fits") as hdul:
        header = hdul[0].header
        flux = hdul[0].data.astype(np.float64)
    wave_air = header["CRVAL1"] + header["CDELT1"] * np.arange(header["NAXIS1"])
    assert (wave_air[0], wave_air[-1]) == pytest.approx((3540.5, 7409.6))
    wave_vacuum = air_to_vacuum(wave_air)
    for name, line in VACUUM_LINES.items():
        near = np.flatnonzero(np.abs(wave_vacuum - line) < 3.0)
        k = near[np.argmin(flux[near])]
        a, b, _ = np.polyfit(wave_vacuum[k - 1 : k + 2] - wave_vacuum[k], flux[k - 1 : k + 2], 2)
        minimum = wave_vacuum[k] - b / (2 * a)
        assert abs(minimum - line) < 0.3, name
        minimum_on_air_grid = wave_air[k] - b / (2 * a)  # read as if the file were in vacuum
        assert abs(minimum_on_air_grid - line) > 1.0, name


def test_equal_bit_for_bit_to_specutils_morton2000():
    """The numpy implementation gives exactly what specutils' air_to_vac(method="Morton2000",
    scheme="iteration") and vac_to_air give (it replaced them to spare ingest workers the import)."""
    from specutils.utils.wcs_utils import air_to_vac, vac_to_air

    grids = [WAVE, 3540.5 + 0.9 * np.arange(4300), np.random.default_rng(0).uniform(2500.0, 25000.0, 20000)]
    for grid in grids:
        assert np.array_equal(air_to_vacuum(grid), air_to_vac(grid * u.AA, method="Morton2000", scheme="iteration").to_value(u.AA))
        assert np.array_equal(vacuum_to_air(grid), vac_to_air(grid * u.AA, method="Morton2000").to_value(u.AA))
    with pytest.raises(ValueError, match="not valid below"):
        air_to_vacuum(1500.0)
