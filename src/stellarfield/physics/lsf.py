"""Line-spread functions (LSF): how an instrument blurs a spectrum, as a Gaussian in ``u = ln(lambda)``.

A spectrograph of resolving power ``R = lambda / FWHM`` blurs by a kernel whose width is constant
in ``u = ln(lambda)`` (``d lambda / lambda = du``), so one Gaussian of standard deviation
``sigma_u`` describes it at every wavelength. For a Gaussian, FWHM = 2 sqrt(2 ln 2) sigma
~= 2.3548 sigma.

Two implementations of the same operation:

* :func:`gaussian_blur_uniform` (torch): the fast path used by the model. It blurs values sampled
  on a grid UNIFORM in ``u`` (the model's trunk grid) with a sampled, normalised Gaussian. Because
  the decoder's output is linear in its trunk basis functions, blurring each basis function once
  per instrument grid is the same as blurring every generated spectrum.
* :func:`convolve_direct` (numpy): the slow, obvious reference for tests and benchmarks. It writes
  the convolution integral as an explicit weighted sum over the pixels of ANY increasing grid
  (e.g. MILES, linear in lambda), with each pixel standing for its cell of width ``du``.

Both treat the ends of the grid the same way: the kernel is cut at the grid edge and renormalised
over the part that lies on the grid, so a constant stays exactly constant. Away from the edges
(more than 4 sigma) the fast blur conserves flux: the sum of the values over its uniform grid
is unchanged (and so is the integral over u).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy.fft import next_fast_len

FWHM_PER_SIGMA: float = 2.0 * math.sqrt(2.0 * math.log(2.0))
"""FWHM / sigma of a Gaussian, 2 sqrt(2 ln 2) = 2.35482."""

TRUNCATE_SIGMAS: float = 4.0
"""The fast blur cuts its kernel at this many sigma (the Gaussian mass beyond is 6.3e-5)."""

MIN_SIGMA_PIXELS: float = 0.25
"""Below this width (in grid pixels) :func:`gaussian_blur_uniform` returns its input unchanged: a
sampled Gaussian of sigma 0.25 px puts only exp(-8) = 3.4e-4 of the central weight on each
neighbour, and a kernel narrower than a pixel is not resolved by the grid anyway."""

FFT_MIN_TAPS: int = 129
"""Kernels with at least this many taps (sigma >~ 16 px) are applied by FFT instead of conv1d."""


def resolution_to_sigma_u(resolution):
    """Gaussian sigma in ``u = ln(lambda)`` (dimensionless) of resolving power ``R = lambda / FWHM``.

    ``sigma_u = 1 / (R * 2 sqrt(2 ln 2))``; e.g. R = 22,500 (APOGEE) gives 1.887e-5, i.e. a
    velocity sigma of c * sigma_u = 5.658 km/s (FWHM c / R = 13.32 km/s). Accepts floats, numpy arrays or torch tensors.
    """
    return 1.0 / (resolution * FWHM_PER_SIGMA)


def fwhm_to_sigma_u(fwhm_A, wave_A):
    """Gaussian sigma in ``u = ln(lambda)`` of an LSF with FWHM ``fwhm_A`` at wavelength ``wave_A``.

    Both arguments in the same unit (Angstrom in this package; the frame does not matter since the
    result is a ratio). ``sigma_u = (fwhm / wave) / 2.3548``; e.g. MILES (2.5 A FWHM) at 5000 A
    gives 2.123e-4, i.e. R = 2000.
    """
    return fwhm_A / wave_A / FWHM_PER_SIGMA


def gaussian_kernel(sigma_pixels: float, truncate: float = TRUNCATE_SIGMAS) -> np.ndarray:
    """Sampled Gaussian of standard deviation ``sigma_pixels`` on integer offsets, summing to 1.

    Length ``2 * ceil(truncate * sigma_pixels) + 1``, centred on the middle tap (float64).
    """
    half = int(math.ceil(truncate * sigma_pixels))
    offsets = np.arange(-half, half + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (offsets / sigma_pixels) ** 2)
    return kernel / kernel.sum()


def _convolve_same(rows: torch.Tensor, kernel: torch.Tensor, use_fft: bool) -> torch.Tensor:
    """Zero-padded 'same'-size convolution of each row of ``rows`` (B, G) with a symmetric kernel."""
    n_grid = rows.shape[-1]
    half = (kernel.numel() - 1) // 2
    if not use_fft:
        out = F.conv1d(rows.unsqueeze(1), kernel.view(1, 1, -1), padding=half)
        return out.squeeze(1)
    # Long enough that the circular convolution does not wrap, rounded up to a length with small
    # prime factors (torch's FFT is several times slower on lengths like 20240 = 2^4 5 11 23).
    n_fft = next_fast_len(n_grid + kernel.numel() - 1, real=True)
    spectrum = torch.fft.rfft(rows, n=n_fft) * torch.fft.rfft(kernel, n=n_fft)
    return torch.fft.irfft(spectrum, n=n_fft)[:, half : half + n_grid]


def gaussian_blur_uniform(values: torch.Tensor, sigma_pixels: float, dim: int = -1, *, method: str = "auto") -> torch.Tensor:
    """Blur ``values`` sampled on a grid uniform in ``u`` by a Gaussian of ``sigma_pixels`` grid steps.

    The LSF of resolving power R on a grid of step ``du`` is ``sigma_pixels =
    resolution_to_sigma_u(R) / du``. The kernel is a sampled Gaussian cut at 4 sigma and normalised
    to sum 1; at the two ends of the grid it is renormalised over the part that lies on the grid
    (output = conv(values) / conv(ones)), so a constant stays constant and, away from the ends,
    the sum of ``values`` (the flux) is unchanged.

    Args:
        values: tensor ``(..., G, ...)`` of any float dtype; blurred along ``dim``, every other axis is
            an independent row (e.g. ``(n_basis, G)`` trunk basis functions, or ``(B, G)`` spectra).
        sigma_pixels: Gaussian standard deviation in grid steps (a float or 0-d tensor; not learned).
        dim: axis of the uniform grid.
        method: ``"conv"`` (direct conv1d), ``"fft"``, or ``"auto"`` (FFT for kernels of >= 129 taps).

    Returns:
        Tensor of the shape and dtype of ``values``; differentiable with respect to ``values``.
        ``values`` itself when ``sigma_pixels < MIN_SIGMA_PIXELS`` (0.25): nothing to blur.
    """
    sigma = float(sigma_pixels)
    if not math.isfinite(sigma) or sigma < 0:
        raise ValueError(f"sigma_pixels must be a finite number >= 0, got {sigma_pixels!r}")
    if method not in ("auto", "conv", "fft"):
        raise ValueError(f"method must be 'auto', 'conv' or 'fft', got {method!r}")
    if not torch.is_floating_point(values):
        raise TypeError(f"values must be a floating-point tensor, got {values.dtype}")
    if sigma < MIN_SIGMA_PIXELS:
        return values

    kernel_np = gaussian_kernel(sigma)
    use_fft = method == "fft" or (method == "auto" and kernel_np.size >= FFT_MIN_TAPS)
    kernel = torch.as_tensor(kernel_np, dtype=values.dtype, device=values.device)

    moved = values.movedim(dim, -1)
    if moved.numel() == 0:
        return values
    rows = moved.reshape(-1, moved.shape[-1])
    blurred = _convolve_same(rows, kernel, use_fft)
    # Edge renormalisation: the kernel weight that falls on the grid, per output pixel.
    on_grid = _convolve_same(torch.ones_like(rows[:1]), kernel, use_fft)  # (1, G), broadcast
    blurred = blurred / on_grid
    return blurred.reshape(moved.shape).movedim(-1, dim)


def convolve_direct(wave, flux, sigma_u, *, truncate: float = 8.0, chunk: int = 512) -> np.ndarray:
    """Reference Gaussian LSF convolution in ``u = ln(wave)`` on any increasing grid (numpy, float64).

    Writes the convolution integral as a sum over pixels, each pixel j standing for its cell of
    width ``du_j`` (``numpy.gradient`` of ``u``: half the distance between its neighbours)::

        out_i = sum_j K_ij f_j / sum_j K_ij,   K_ij = du_j * exp(-(u_i - u_j)^2 / (2 sigma_i^2))

    summed over every pixel within ``truncate`` (8) sigma of pixel i (the Gaussian mass beyond is
    1e-15): the midpoint-rule quadrature of the convolution integral, with no truncation error to
    speak of and no assumption of a uniform grid. Dividing by ``sum_j K_ij`` renormalises the
    kernel at the grid ends, as :func:`gaussian_blur_uniform` does; on a uniform grid the two
    differ only by the fast kernel's 4-sigma cut (measured <= 1.1e-4 of the largest value).
    Cost O(N x window), computed in chunks of ``chunk`` output pixels.

    Args:
        wave: ``(N,)`` strictly increasing wavelengths (any unit; vacuum Angstrom in this package).
        flux: ``(..., N)`` values on ``wave``; leading axes are independent spectra.
        sigma_u: Gaussian sigma in ``u`` (dimensionless), a scalar or ``(N,)`` (the LSF width at each
            OUTPUT pixel, e.g. a per-pixel LSF).

    Returns:
        ``(..., N)`` float64 array, the blurred flux on ``wave``.
    """
    u = np.log(np.asarray(wave, dtype=np.float64))
    flux = np.asarray(flux, dtype=np.float64)
    n = u.size
    if u.ndim != 1 or flux.shape[-1] != n:
        raise ValueError(f"wave must be (N,) and flux (..., N); got {u.shape} and {flux.shape}")
    if n > 1 and not np.all(np.diff(u) > 0):
        raise ValueError("wave must be strictly increasing")
    sigma = np.broadcast_to(np.asarray(sigma_u, dtype=np.float64), (n,))
    if not np.all(sigma > 0):
        raise ValueError("sigma_u must be > 0")
    cell = np.gradient(u) if n > 1 else np.ones(1)

    rows = flux.reshape(-1, n)
    out = np.empty_like(rows)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        reach = truncate * sigma[start:stop].max()
        lo = np.searchsorted(u, u[start] - reach, side="left")
        hi = np.searchsorted(u, u[stop - 1] + reach, side="right")
        offsets = (u[start:stop, None] - u[None, lo:hi]) / sigma[start:stop, None]
        weights = np.exp(-0.5 * offsets**2) * cell[None, lo:hi]
        weights[np.abs(offsets) > truncate] = 0.0
        out[:, start:stop] = (rows[:, lo:hi] @ weights.T) / weights.sum(axis=1)
    return out.reshape(flux.shape)
