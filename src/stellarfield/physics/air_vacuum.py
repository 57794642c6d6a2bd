"""Air <-> vacuum wavelength conversion.

Uses the IAU standard of Morton (2000, ApJS 130, 403, eq. 8; the formula adopted by SDSS and VALD)
as implemented in the maintained ``specutils.utils.wcs_utils`` module. Morton's formula gives
air from vacuum; the inverse is solved by fixed-point iteration to 1e-12 relative precision, so
``vacuum_to_air(air_to_vacuum(x)) == x`` to machine precision. Near 5000 A the shift is +1.39 A.
"""

from __future__ import annotations

import numpy as np

try:  # astropy is a hard dependency; units are optional on input
    import astropy.units as u
except ImportError:  # pragma: no cover
    u = None

METHOD = "Morton2000"


def _as_angstrom(wavelength) -> np.ndarray:
    if u is not None and isinstance(wavelength, u.Quantity):
        return wavelength.to_value(u.AA, equivalencies=u.spectral())
    return np.asarray(wavelength, dtype=np.float64)


def air_to_vacuum(wavelength_air) -> np.ndarray:
    """Vacuum wavelength (Angstrom) of air wavelengths (Angstrom, or any astropy length Quantity)."""
    from specutils.utils.wcs_utils import air_to_vac

    w = _as_angstrom(wavelength_air)
    return np.asarray(air_to_vac(w * u.AA, method=METHOD, scheme="iteration").to_value(u.AA), dtype=np.float64)


def vacuum_to_air(wavelength_vacuum) -> np.ndarray:
    """Air wavelength (Angstrom) of vacuum wavelengths (Angstrom, or any astropy length Quantity)."""
    from specutils.utils.wcs_utils import vac_to_air

    w = _as_angstrom(wavelength_vacuum)
    return np.asarray(vac_to_air(w * u.AA, method=METHOD).to_value(u.AA), dtype=np.float64)
