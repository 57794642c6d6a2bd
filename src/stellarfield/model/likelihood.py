"""The likelihood of a spectrum under the model: from a latent to chi2 at the survey's own pixels.

For one spectrum with native pixels ``u_p`` (observed or rest frame, as the product is), flux
``d_p``, inverse variance ``ivar_p`` and good-pixel mask, given a latent ``z`` and a radial
velocity ``v``::

    m_p   = render( blur_LSF( f(z, u_rest) ), u_p - ln(1 + v/c) )      model at the native pixels
    c     = argmin_c sum_p w_p (d_p - m_p c_p)^2,  c = Legendre_seg(u_p) @ coeffs     closed form
    var_p = 1/ivar_p + (floor * median|d|)^2     (+ learned scatter (s_inst(u_p) median|d|)^2 with "nll")
    chi2  = sum_p w_p (d_p - m_p c_p)^2,  w_p = good_p / var_p
    loss  = 0.5 ln(chi2 / n) + 0.5 |z|^2 / n       (default "logchi2", see spectrum_loss)
    nll   = 0.5 * mean_p [ w_p r_p^2 + ln(var_p / median|d|^2) ]   (the "nll" alternative)

:func:`observe` binds a batch to its instrument and finds each spectrum's starting velocity (the
highest peaks of the cross-correlation with the model at ``z = 0``, :mod:`stellarfield.model.rv`);
:func:`model_at_pixels` is the chain in the first line, :func:`likelihood` the rest, and
:func:`evaluate` both.

The other jobs live beside it: the radial-velocity search in :mod:`~stellarfield.model.rv`, the ways
to get a spectrum's latent in :mod:`~stellarfield.model.latents` (GON step, refinement) and
:mod:`~stellarfield.model.encoder`, the training objective in :mod:`~stellarfield.model.objectives`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from stellarfield.model.batching import Batch
from stellarfield.model.decoder import combine
from stellarfield.model.instrument import Instrument
from stellarfield.model.rv import ccf_candidates
from stellarfield.model.stellar_model import StellarModel
from stellarfield.physics.continuum import SegmentedBasis, fit_segment_continuum


@dataclass
class Observation:
    """A batch bound to its instrument: the grid view it needs, its velocities and continuum design."""

    batch: Batch
    inst: Instrument
    view: list
    v: torch.Tensor  # (B,) float64 km/s
    design: torch.Tensor  # (B, K, n_segments * (degree + 1))
    v_candidates: torch.Tensor | None = None  # (B, C) other starting velocities for refine_velocity (CCF peaks)
    _continuum_basis: SegmentedBasis | None = field(default=None, repr=False, compare=False)

    def continuum_basis(self) -> SegmentedBasis:
        """``design`` as the per-segment fit wants it (:class:`SegmentedBasis`), built on first use
        and kept: a batch is scored many times (refinement steps) on the same pixels."""
        if self._continuum_basis is None:
            self._continuum_basis = SegmentedBasis.from_design(self.design, self.batch.segment,
                                                               len(self.inst.segments), self.batch.good)
        return self._continuum_basis

    @property
    def sigma_v(self) -> float:
        """LSF sigma in km/s: the natural velocity step."""
        return self.inst.sigma_kms


def mean_model(model: StellarModel, basis: torch.Tensor) -> torch.Tensor:
    """The model at z = 0 on ``basis``'s grid, (1, G): the template of the first velocity search."""
    return combine(model.decoder.coefficients(torch.zeros(1, model.latent_dim, device=basis.device)), basis)


def continuum_design(inst: Instrument, batch: Batch) -> torch.Tensor:
    """Legendre polynomials (degree ``inst.continuum_degree``) of u scaled to [-1, 1] over each
    segment's pixel range, one block of columns per segment: (B, K, n_segments * (degree + 1))."""
    dev = batch.u.device
    lo = torch.tensor([s.pixel_u_min for s in inst.segments], dtype=torch.float64, device=dev)[batch.segment]
    hi = torch.tensor([s.pixel_u_max for s in inst.segments], dtype=torch.float64, device=dev)[batch.segment]
    x = (2 * (batch.u - lo) / (hi - lo) - 1).clamp(-1, 1).nan_to_num(0.0).float()
    cols = torch.stack([torch.special.legendre_polynomial_p(x, k) for k in range(inst.continuum_degree + 1)], -1)
    onehot = F.one_hot(batch.segment, len(inst.segments)).float()
    return (onehot[..., :, None] * cols[..., None, :]).flatten(-2)


def variance(model: StellarModel, obs: Observation) -> torch.Tensor:
    """Per-pixel variance (B, K): survey noise where known, plus the noise floor
    (``model.likelihood["noise_floor"]`` x median |flux|) and, with the "nll" likelihood, the learned
    intrinsic scatter. Where the noise is unknown (MILES) and nothing is learned, every pixel gets
    the spectrum's median |flux| squared: the "logchi2" loss profiles that scale out anyway."""
    b = obs.batch
    scale2 = b.scale[:, None] ** 2
    floor = max(float(model.likelihood["noise_floor"]), 1e-6)  # 1e-6: softplus may underflow to 0
    var = (floor**2) * scale2.expand_as(b.flux)
    if model.learns_scatter:
        var = var + model.scatter(obs.inst.name, b.u) ** 2 * scale2
    if obs.inst.noise_known:
        var = var + torch.where(b.ivar > 0, 1.0 / b.ivar.clamp(min=1e-30), 0.0)
    elif not model.learns_scatter:
        var = var + scale2
    return var


def spectrum_loss(model: StellarModel, fit: "FitResult", z: torch.Tensor) -> torch.Tensor:
    """The objective of each spectrum (B,), per good pixel; the same in training and inference.

    ``"logchi2"`` (default): ``0.5 ln(chi2 / n) + 0.5 |z|^2 / n``. This is the negative log posterior
    per pixel of a Gaussian likelihood whose error bars are right up to an unknown overall factor s
    (minimising ``n ln s + chi2 / 2 s^2`` over s gives ``n/2 ln(chi2/n)`` + const), with a unit-normal
    prior on z. The log makes each spectrum's gradient ``grad chi2 / chi2``: a spectrum the model
    cannot fit yet (or whose errors are too small) does not dominate the batch, and 343 Gaia XP
    samples weigh like 8,575 APOGEE pixels.
    ``"nll"``: the Gaussian NLL per pixel with the learned scatter, plus ``latent_l2 |z|^2``.
    """
    if model.likelihood["loss"] == "logchi2":
        n = fit.n.to(fit.chi2.dtype)
        return 0.5 * torch.log(fit.chi2 / n + 1e-12) + 0.5 * (z**2).sum(-1) / n
    return fit.nll + model.likelihood["latent_l2"] * (z**2).sum(-1)


@dataclass
class FitResult:
    chi2: torch.Tensor  # (B,) sum of w r^2 (variance with scatter)
    n: torch.Tensor  # (B,) good pixels used
    nll: torch.Tensor  # (B,) Gaussian NLL per good pixel
    prediction: torch.Tensor  # (B, K) model * continuum
    continuum: torch.Tensor  # (B, K)
    good: torch.Tensor  # (B, K)


def likelihood(obs: Observation, model_flux: torch.Tensor, inside: torch.Tensor, var: torch.Tensor) -> FitResult:
    """Closed-form continuum, then chi2 and NLL of each spectrum (see the module docstring)."""
    b = obs.batch
    good = b.good & inside
    weight = torch.where(good, 1.0 / var, 0.0)
    model_flux = torch.where(good, model_flux, 0.0)
    # float64 normal equations: weights span many decades (1/var of bright vs masked pixels), and
    # float32 made the solve numerically singular in a long run. The design is block diagonal (one
    # Legendre block per segment): fit_segment_continuum sums per segment (the products w m^2 and
    # w m d, and all sums, in float64) instead of forming (B, K, n_seg (degree + 1)) arrays, the
    # same fit as fit_multiplicative_continuum(flux, model, weight, design) up to float64 rounding
    _, continuum = fit_segment_continuum(b.flux, model_flux, weight, obs.continuum_basis())
    continuum = continuum.to(model_flux.dtype)
    prediction = model_flux * continuum
    resid = torch.where(good, b.flux - prediction, 0.0)
    chi2 = (weight * resid**2).sum(-1)
    n = good.sum(-1).clamp(min=1)
    log_var = torch.where(good, torch.log(var / b.scale[:, None] ** 2), 0.0)
    nll = 0.5 * (chi2 + log_var.sum(-1)) / n
    return FitResult(chi2, n, nll, prediction, continuum, good)


def survey_chi2(obs: Observation, fit: FitResult, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(chi2, segments)`` per spectrum (B,): chi2 over the good pixels with the survey's own errors
    (``var``, the likelihood's variance, where the product has none), and how many segments have a
    good pixel (each fits its own continuum): what a reported chi2_nu is made of."""
    b = obs.batch
    resid = torch.where(fit.good, b.flux - fit.prediction, 0.0)
    noise_var = torch.where(b.ivar > 0, 1 / b.ivar.clamp(min=1e-30), float("inf")) if obs.inst.noise_known else var
    chi2 = torch.where(fit.good, resid**2 / noise_var, 0.0).sum(-1)
    segments = torch.stack([(fit.good & (b.segment == k)).any(-1) for k in range(len(obs.inst.segments))], -1).sum(-1)
    return chi2, segments


def model_at_pixels(obs: Observation, coeffs: torch.Tensor, basis: torch.Tensor, v: torch.Tensor,
                    blurred_basis: bool = False):
    """Model flux at the batch's pixels: (B, K) and ``inside`` (see :meth:`Instrument.render`)."""
    grid = combine(coeffs, basis)
    if not blurred_basis:
        grid = obs.inst.blur(grid, obs.view)
    return obs.inst.render(grid, obs.view, obs.batch.u, obs.batch.segment, v)


def evaluate(obs: Observation, coeffs: torch.Tensor, basis: torch.Tensor, v: torch.Tensor, var: torch.Tensor,
             blurred_basis: bool = False) -> FitResult:
    """The whole chain for branch coefficients ``coeffs`` (B, H) at velocities ``v`` (B,) km/s:
    :func:`model_at_pixels`, then :func:`likelihood` (closed-form continuum, chi2) with ``var``.
    Every objective (training loss, GON step, refinement, Gauss-Newton, encoder, prediction, the RV
    error) scores a latent through here; :func:`spectrum_loss` turns the result into the loss."""
    flux, inside = model_at_pixels(obs, coeffs, basis, v, blurred_basis)
    return likelihood(obs, flux, inside, var)


@dataclass
class BasisAtPixels:
    """The blurred basis rendered at a batch's pixels, for a batch whose spectra share their pixels
    and velocity (Gaia XP, MILES: one grid per product, no velocity fitted): rendering is
    linear in the grid values, so the model at the pixels of any latent is then ONE product
    ``[coeffs, 1] @ values^T`` (:func:`~stellarfield.model.decoder.combine`), with no model on the
    grid and no interpolation per step (:func:`evaluate_at_pixels`)."""

    values: torch.Tensor  # (P, H + 1): the basis functions and the mean at the pixels (Instrument.render_basis)
    inside: torch.Tensor  # (B, P): see Instrument.render


def basis_at_pixels(obs: Observation, basis: torch.Tensor, v: torch.Tensor) -> BasisAtPixels | None:
    """:class:`BasisAtPixels` of the blurred ``basis`` (G, H + 1) at velocities ``v`` (B,), or None
    where the batch's spectra differ in pixels or velocity (then :func:`evaluate` it is)."""
    b = obs.batch
    same = lambda t: bool(torch.equal(t, t[:1].expand_as(t)))
    if not (same(b.u) and same(b.segment) and same(v.detach())):
        return None
    values, inside = obs.inst.render_basis(basis, obs.view, b.u[0], b.segment[0], v[:1])
    return BasisAtPixels(values.T.contiguous(), inside.expand(b.size, -1))


def evaluate_at_pixels(obs: Observation, coeffs: torch.Tensor, at_pixels: BasisAtPixels, var: torch.Tensor) -> FitResult:
    """:func:`evaluate` at the velocities ``at_pixels`` was rendered for: the same result, to float
    rounding, from one product per call."""
    return likelihood(obs, combine(coeffs, at_pixels.values), at_pixels.inside, var)


# --- getting a batch ready ------------------------------------------------------------------
def observe(model: StellarModel, batch: Batch, full_grid: bool = False,
            v_init: torch.Tensor | None = None, mean_grid: torch.Tensor | None = None,
            fit_rest_frame_rv: bool = True) -> Observation:
    """Bind ``batch`` to its instrument and find each spectrum's starting velocity.

    For products with an RV scan range, the cross-correlation over the whole range with the model at
    ``z = 0`` (no gradient) gives the velocity, its highest peak, and ``obs.v_candidates``, the next
    highest peaks (:func:`~stellarfield.model.rv.ccf_candidates`), unless ``v_init`` is given; the
    grid view is then the part of the model grid the velocities need (or the whole grid with
    ``full_grid``). A window (training) keeps the highest peak only: scanning the other peaks too
    made a training step ~20% slower (measured on APOGEE visits), and the view would have to be
    widened to cover them; the scan from the highest peak still moves down a chi2 valley
    (:func:`~stellarfield.model.rv.descend_velocity`). ``mean_grid``
    (1, G): the blurred model at z = 0 on the full grid, if the caller has it already.
    ``fit_rest_frame_rv=False`` keeps v = 0 for rest-frame products (training: the surveys' rest
    frames anchor the model's; their residual velocities are only fitted at inference).
    """
    inst = model.instrument(batch.product)
    zero = torch.zeros(batch.size, dtype=torch.float64, device=batch.u.device)
    obs = Observation(batch, inst, inst.full_view(), zero, continuum_design(inst, batch))
    rv = inst.rv_scan_kms if (fit_rest_frame_rv or inst.frame != "rest") else 0.0
    if rv > 0 and v_init is None:
        if batch.window is not None:
            obs.view = inst.window_view(batch.window[0], batch.window[1], batch.window[2], -rv, rv)
        with torch.no_grad():
            if mean_grid is None or batch.window is not None:
                basis = model.decoder.basis(inst.view_u(obs.view).to(zero.device), inst.view_sigma_u(obs.view).to(zero.device))
                mean_grid = inst.blur(mean_model(model, basis), obs.view)
            candidates = ccf_candidates(obs, mean_grid, variance(model, obs))
            obs.v, obs.v_candidates = candidates[:, 0], candidates[:, 1:]
    elif v_init is not None:
        obs.v = v_init.double()
    if batch.window is not None and not full_grid:
        margin = 4 * obs.sigma_v + 1.0
        v_lo, v_hi = float(obs.v.min()) - margin, float(obs.v.max()) + margin
        obs.view = inst.window_view(batch.window[0], batch.window[1], batch.window[2], v_lo, v_hi)
        obs.v_candidates = None  # training windows: see the docstring
    else:
        obs.view = inst.full_view()
    return obs
