"""Doppler shifts between the rest frame of a star and the frame it is observed in.

Convention (the one the model uses everywhere)::

    lambda_obs = (1 + v / c) * lambda_rest          v > 0: receding star, lines move to the red

This is the first-order (non-relativistic) Doppler formula, the convention of most survey pipelines
for stellar radial velocities; the relativistic factor sqrt((1 + v/c) / (1 - v/c)) differs from it
by (v/c)^2 / 2 ~ 1e-6 relative at 400 km/s, i.e. 0.3 km/s of velocity, well inside the velocity
range but far below the width of a resolution element (>= 10 km/s for the surveys here).

In ``u = ln(lambda)`` a Doppler shift is a translation by the same amount at every wavelength::

    u_obs = u_rest + ln(1 + v / c)

which is why the model works in ``u``: shifting a spectrum never stretches it there.

Every function here is plain arithmetic, so it accepts Python floats, numpy arrays or torch tensors
(differentiable in ``v_kms``), and broadcasts by the usual rules: for one velocity per spectrum on
a shared grid pass ``v_kms[:, None]`` against a ``(n_pixels,)`` wavelength array.
Wavelengths may be in any unit (the factor is dimensionless); the package uses vacuum Angstrom.
"""

from __future__ import annotations

import math
import sys

import numpy as np
from astropy.constants import c as _speed_of_light

C_KMS: float = float(_speed_of_light.to_value("km/s"))
"""Speed of light in vacuum, km/s: 299792.458 exactly (SI definition, via ``astropy.constants.c``)."""

FASTEST_STAR_KMS: float = 1100.0
"""A radial velocity (km/s) beyond any star measured in the Milky Way: the fastest known, the
hypervelocity star S5-HVS1, recedes at 1,017 km/s (Koposov et al. 2020, MNRAS 491, 2465)."""


def velocity_problem(v_kms: float) -> str | None:
    """Why ``v_kms`` cannot be a star's radial velocity (not finite, or ``|v| >= c``, where
    ``1 + v/c <= 0`` or the first-order formula is meaningless), or None where it can."""
    if not math.isfinite(v_kms):
        return f"a radial velocity must be a finite number of km/s, got {v_kms}"
    if abs(v_kms) >= C_KMS:
        return f"|v| = {abs(v_kms):g} km/s is not below the speed of light ({C_KMS:.3f} km/s)"
    return None


def _is_tensor(x) -> bool:
    """True for a torch tensor, without importing torch (the readers use this module, and ingest's
    worker processes would otherwise each pay torch's ~1.5 s import for nothing)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _log1p(x):
    """ln(1 + x) for floats, numpy arrays and torch tensors (accurate for small x)."""
    if _is_tensor(x):
        return x.log1p()
    if np.ndim(x) == 0 and not isinstance(x, np.ndarray):
        return math.log1p(x)
    return np.log1p(x)


def _expm1(x):
    """exp(x) - 1 for floats, numpy arrays and torch tensors (accurate for small x)."""
    if _is_tensor(x):
        return x.expm1()
    if np.ndim(x) == 0 and not isinstance(x, np.ndarray):
        return math.expm1(x)
    return np.expm1(x)


def doppler_shift(wave_rest, v_kms):
    """Observed wavelength of light emitted at ``wave_rest`` by a source moving at ``v_kms``.

    Args:
        wave_rest: rest-frame wavelength (any unit; vacuum Angstrom in this package).
        v_kms: radial velocity in km/s, positive when the source recedes.

    Returns:
        ``wave_rest * (1 + v_kms / C_KMS)``, in the unit of ``wave_rest`` (observed frame).
    """
    return wave_rest * (1.0 + v_kms / C_KMS)


def rest_wavelength(wave_obs, v_kms):
    """Rest-frame wavelength of light observed at ``wave_obs`` from a source moving at ``v_kms``.

    The exact inverse of :func:`doppler_shift`: ``wave_obs / (1 + v_kms / C_KMS)``.
    The model evaluates its rest-frame decoder at ``rest_wavelength(native_pixels, v)``, so the
    data are never resampled.
    """
    return wave_obs / (1.0 + v_kms / C_KMS)


def log_shift(v_kms):
    """Translation in ``u = ln(lambda)`` caused by a radial velocity ``v_kms`` (km/s).

    ``u_obs = u_rest + log_shift(v)``, i.e. ``log_shift(v) = ln(1 + v / c)``; about
    ``v / c = 3.3356e-6`` per km/s. Dimensionless (natural-log units).
    """
    return _log1p(v_kms / C_KMS)


def velocity_from_log_shift(du):
    """Radial velocity in km/s that translates ``u = ln(lambda)`` by ``du``: ``c * (exp(du) - 1)``.

    The exact inverse of :func:`log_shift`.
    """
    return C_KMS * _expm1(du)
