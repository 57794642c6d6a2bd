"""Smooth multiplicative continua, fitted in closed form (weighted linear least squares).

Survey spectra come with different normalisations: flux-calibrated (MILES, Gaia XP), instrumental
counts (GALAH), flux-like with a chip-dependent shape (APOGEE apStar) or continuum-normalised by a
pipeline. Instead of guessing the normalisation, the model multiplies its spectrum by a smooth
polynomial per segment and solves for that polynomial exactly inside the loss::

    data ~= model * continuum,     continuum = design @ coeffs

For a fixed model this is linear in ``coeffs``, so the best coefficients (weighted by inverse
variance) come from the normal equations -- no inner optimisation, and torch differentiates
through the solve, so the decoder is trained against the best continuum for each spectrum.

The design matrix is a Legendre basis of the wavelength (or any coordinate) scaled to [-1, 1]
over the segment: well conditioned for the low degrees used here (0 to 3).
"""

from __future__ import annotations

import torch

RIDGE_RELATIVE: float = 1e-6
"""Ridge strength, relative to the mean diagonal of the normal matrix. It pulls the coefficients
towards (1, 0, ..., 0) -- a continuum of exactly 1 for a Legendre design. It biases a
well-constrained fit by ~1e-6 of the continuum level (8e-7 measured on an APOGEE chip, degree 2),
far below the noise, but keeps a fully masked segment finite (continuum 1)."""


def legendre_design(x, degree: int) -> torch.Tensor:
    """Legendre polynomials P_0..P_degree of ``x`` mapped linearly onto [-1, 1] over its own range.

    Args:
        x: ``(..., N)`` coordinates (e.g. wavelength in Angstrom, or u = ln(lambda)); array-like or
            tensor. Each row (leading index) is scaled by its own minimum and maximum, so
            ``x.min() -> -1`` and ``x.max() -> +1``; a row of identical values maps to 0.
        degree: highest polynomial degree (>= 0); degree 0 is a constant (a scale factor).

    Returns:
        ``(..., N, degree + 1)`` tensor (float dtype of ``x``, float64 for integer input), column k
        is P_k (Bonnet's recursion (k+1) P_{k+1} = (2k+1) t P_k - k P_{k-1}; P_0 = 1, P_1 = t).
    """
    if degree < 0:
        raise ValueError(f"degree must be >= 0, got {degree}")
    x = torch.as_tensor(x)
    if not torch.is_floating_point(x):
        x = x.to(torch.float64)
    lo = x.amin(dim=-1, keepdim=True)
    hi = x.amax(dim=-1, keepdim=True)
    span = hi - lo
    t = torch.where(span > 0, (2.0 * (x - lo) / torch.where(span > 0, span, 1.0)) - 1.0, 0.0)
    columns = [torch.ones_like(t)]
    if degree >= 1:
        columns.append(t)
    for k in range(1, degree):
        columns.append(((2 * k + 1) * t * columns[k] - k * columns[k - 1]) / (k + 1))
    return torch.stack(columns, dim=-1)


def fit_multiplicative_continuum(
    data: torch.Tensor, model: torch.Tensor, weight: torch.Tensor, design: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best smooth continuum c = design @ coeffs for ``data ~= model * c`` by weighted least squares.

    Minimises ``sum_n weight_n (data_n - model_n * c_n)^2 + ridge * |coeffs - (s, 0, ..., 0)|^2``
    (``s``: the best constant scale, data / model, of the first coefficient's pixels; 1 if none)
    in closed form (normal equations, ``torch.linalg.solve``), batched over leading axes and
    differentiable with respect to every input. The ridge (1e-6 of the mean diagonal of the normal
    matrix) only matters where the data cannot constrain a coefficient: a fully masked segment gets
    coeffs (1, 0, ..., 0), i.e. continuum 1 for a Legendre design, never NaN; fluxes of any unit
    (1e-13 erg/s/cm2/A or 1e3 counts) get the same relative precision.

    Args:
        data: ``(..., N)`` observed flux (any unit; the continuum carries the unit ratio).
        model: ``(..., N)`` model flux on the same pixels.
        weight: ``(..., N)`` least-squares weights, normally the inverse variance; 0 on masked
            pixels, where ``data`` and ``model`` are ignored (even if NaN).
        design: ``(..., N, K)`` basis functions, e.g. :func:`legendre_design`; broadcast against the
            leading axes (one ``(N, K)`` design may serve a whole batch).

    Returns:
        ``(coeffs, continuum)``: ``(..., K)`` and ``(..., N)`` tensors.
    """
    data, model, weight = torch.broadcast_tensors(data, model, weight)
    used = weight > 0
    weight = torch.where(used, weight, 0.0)
    data = torch.where(used, data, 0.0)
    model = torch.where(used, model, 0.0)

    basis = model.unsqueeze(-1) * design  # (..., N, K): d(model * continuum) / d coeffs
    normal = torch.einsum("...nk,...n,...nl->...kl", basis, weight, basis)
    rhs = torch.einsum("...nk,...n->...k", basis, weight * data)

    n_coeffs = normal.shape[-1]
    mean_diagonal = torch.diagonal(normal, dim1=-2, dim2=-1).mean(dim=-1)
    ridge = torch.where(mean_diagonal > 0, RIDGE_RELATIVE * mean_diagonal, 1.0)[..., None]
    # the ridge pulls towards (s, 0, ..., 0), s the best constant scale of the data (1 where nothing
    # constrains it): a pull towards 1 itself would dominate fluxes in physical units (STELIB's
    # erg/s/cm2/A ~ 1e-13 need a continuum of ~1e-13)
    n00 = normal[..., 0, 0]
    scale = torch.where(n00 > 0, rhs[..., 0] / torch.where(n00 > 0, n00, 1.0), 1.0)
    prior = torch.zeros(normal.shape[:-1], dtype=normal.dtype, device=normal.device)
    prior[..., 0] = scale
    eye = torch.eye(n_coeffs, dtype=normal.dtype, device=normal.device)
    coeffs = torch.linalg.solve(normal + ridge[..., None] * eye, rhs + ridge * prior)
    continuum = (design @ coeffs.unsqueeze(-1)).squeeze(-1)
    return coeffs, continuum
