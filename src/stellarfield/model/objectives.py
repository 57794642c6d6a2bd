"""The likelihood of a spectrum under the model, and the ways to get a spectrum's latent.

For one spectrum with native pixels ``u_p`` (observed or rest frame, as the product is), flux
``d_p``, inverse variance ``ivar_p`` and good-pixel mask, given a latent ``z`` and a radial
velocity ``v``::

    m_p   = render( blur_LSF( f(z, u_rest) ), u_p - ln(1 + v/c) )      model at the native pixels
    c     = argmin_c sum_p w_p (d_p - m_p c_p)^2,  c = Legendre_seg(u_p) @ coeffs     closed form
    var_p = 1/ivar_p + (floor * median|d|)^2     (+ learned scatter (s_inst(u_p) median|d|)^2 with "nll")
    chi2  = sum_p w_p (d_p - m_p c_p)^2,  w_p = good_p / var_p
    loss  = 0.5 ln(chi2 / n) + 0.5 |z|^2 / n       (default "logchi2", see spectrum_loss)
    nll   = 0.5 * mean_p [ w_p r_p^2 + ln(var_p / median|d|^2) ]   (the "nll" alternative)

Ways to get ``z`` (all share the code below):

* **GON** (Bond-Taylor & Willcocks 2021, "Gradient Origin Networks", ICLR): the latent is the negative
  gradient of the *inner loss* at ``z = 0``: ``z = -d/dz0 sum_b log(chi2_b / n_b)``, with the nested
  gradient kept (``create_graph=True``) so that training the outer loss teaches the decoder to make one
  step enough. ``log(chi2 / n)`` normalises each spectrum: its gradient is ``grad chi2 / chi2``, which
  does not depend on the number of pixels or the scale of the errors, so an 8575-pixel APOGEE spectrum
  and a 343-sample XP spectrum give latents of the same scale.
* **auto-decoder**: one free latent per training spectrum, optimised with the decoder.
* **encoder** (amortised, VAE-style without the sampling): a network maps the spectrum's pixels to
  its latent (:mod:`stellarfield.model.encoder`), trained with the decoder on the same loss.
* **refinement** (inference): start from the GON latent (or 0) and take Adam steps on ``z`` and ``v``
  minimising the same per-spectrum loss as training.

Radial velocity (:mod:`stellarfield.model.rv`, re-exported here): for products with an RV scan range
the highest peaks of the cross-correlation with the model at ``z = 0`` (the mean spectrum as
template) over the whole range are the candidate velocities (:func:`observe`); a chi2 scan around each
against the model at the star's latent, and the candidate with the lowest chi2 per pixel, give the
velocity (:func:`refine_velocity`); at inference gradient steps refine it together with the latent.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from stellarfield.model.batching import Batch
from stellarfield.model.decoder import combine
from stellarfield.model.instrument import Instrument
from stellarfield.model.stellar_model import StellarModel
from stellarfield.model.rv import (  # noqa: F401  (re-exported: the RV search lives in model/rv.py)
    _interp,
    ccf_candidates,
    ccf_velocity,
    refine_velocity,
    scan_velocity,
    velocity_error,
    velocity_grid,
)
from stellarfield.physics.continuum import fit_multiplicative_continuum


@dataclass
class Observation:
    """A batch bound to its instrument: the grid view it needs, its velocities and continuum design."""

    batch: Batch
    inst: Instrument
    view: list
    v: torch.Tensor  # (B,) float64 km/s
    design: torch.Tensor  # (B, K, n_segments * (degree + 1))
    v_candidates: torch.Tensor | None = None  # (B, C) other starting velocities for refine_velocity (CCF peaks)

    @property
    def sigma_v(self) -> float:
        """LSF sigma in km/s: the natural velocity step."""
        return self.inst.sigma_kms


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
    # float32 made the solve numerically singular in a long run
    _, continuum = fit_multiplicative_continuum(b.flux.double(), model_flux.double(), weight.double(),
                                                obs.design.double())
    continuum = continuum.to(model_flux.dtype)
    prediction = model_flux * continuum
    resid = torch.where(good, b.flux - prediction, 0.0)
    chi2 = (weight * resid**2).sum(-1)
    n = good.sum(-1).clamp(min=1)
    log_var = torch.where(good, torch.log(var / b.scale[:, None] ** 2), 0.0)
    nll = 0.5 * (chi2 + log_var.sum(-1)) / n
    return FitResult(chi2, n, nll, prediction, continuum, good)


def model_at_pixels(obs: Observation, coeffs: torch.Tensor, basis: torch.Tensor, v: torch.Tensor,
                    blurred_basis: bool = False):
    """Model flux at the batch's pixels: (B, K) and ``inside`` (see :meth:`Instrument.render`)."""
    grid = combine(coeffs, basis)
    if not blurred_basis:
        grid = obs.inst.blur(grid, obs.view)
    return obs.inst.render(grid, obs.view, obs.batch.u, obs.batch.segment, v)


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
                mean_grid = inst.blur(combine(model.decoder.coefficients(torch.zeros(1, model.latent_dim, device=zero.device)),
                                              basis), obs.view)
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


# --- latents --------------------------------------------------------------------------------
def gon_latents(model: StellarModel, observations: list[Observation], bases: list[torch.Tensor],
                create_graph: bool = True, blurred_basis: bool = False) -> torch.Tensor:
    """GON latents (sum B, D): ``z = -d/dz0 sum_b log(chi2_b / n_b)`` at ``z0 = 0``.

    With ``create_graph=True`` the result stays a differentiable function of the decoder's weights
    (second-order terms reach the branch and the trunk when the outer loss is back-propagated);
    ``create_graph=False`` gives the same numbers detached from the weights (inference, or the
    "no nested gradient" ablation).
    """
    n_total = sum(o.batch.size for o in observations)
    with torch.enable_grad():
        z0 = torch.zeros(n_total, model.latent_dim, device=bases[0].device, requires_grad=True)
        coeffs = model.decoder.coefficients(z0)
        inner, start = 0.0, 0
        for obs, basis in zip(observations, bases):
            stop = start + obs.batch.size
            flux, inside = model_at_pixels(obs, coeffs[start:stop], basis, obs.v, blurred_basis)
            fit = likelihood(obs, flux, inside, variance(model, obs))
            inner = inner + torch.log(fit.chi2 / fit.n + 1e-12).sum()
            start = stop
        (grad,) = torch.autograd.grad(inner, z0, create_graph=create_graph)
    return -grad


def refine_latents(model: StellarModel, observations: list[Observation], bases: list[torch.Tensor],
                   z: torch.Tensor, steps: int, lr: float = 0.05, blurred_basis: bool = True) -> torch.Tensor:
    """``steps`` Adam steps on the latents and velocities minimising :func:`spectrum_loss`.

    The decoder's weights are not changed (``bases`` should be detached). Velocities are updated
    in place in each ``obs.v`` (parametrised in units of the LSF sigma so one learning rate fits
    all). Returns the refined latents (detached).
    """
    with torch.enable_grad():
        return _refine(model, observations, bases, z, steps, lr, blurred_basis)


def _refine(model, observations, bases, z, steps, lr, blurred_basis):
    z = z.detach().clone().requires_grad_(True)
    dv = [torch.zeros(o.batch.size, dtype=torch.float64, device=z.device, requires_grad=o.inst.rv_scan_kms > 0)
          for o in observations]
    params = [z] + [d for d in dv if d.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    variances = [variance(model, o).detach() for o in observations]
    for _ in range(steps):
        opt.zero_grad()
        coeffs = model.decoder.coefficients(z)
        loss, start = 0.0, 0
        for obs, basis, d, var in zip(observations, bases, dv, variances):
            stop = start + obs.batch.size
            flux, inside = model_at_pixels(obs, coeffs[start:stop], basis, obs.v + d * obs.sigma_v, blurred_basis)
            loss = loss + spectrum_loss(model, likelihood(obs, flux, inside, var), z[start:stop]).sum()
            start = stop
        loss.backward()
        opt.step()
    for obs, d in zip(observations, dv):
        if obs.inst.rv_scan_kms > 0:
            obs.v = (obs.v + d.detach() * obs.sigma_v).clamp(-obs.inst.rv_scan_kms, obs.inst.rv_scan_kms)
    return z.detach()


# --- the training objective -------------------------------------------------------------------
def training_loss(model: StellarModel, batches: list[Batch], objective: str = "gon",
                  nested: bool = True) -> tuple[torch.Tensor, dict]:
    """Mean over products of the mean :func:`spectrum_loss` of their spectra (one batch per product).

    ``objective``: "gon" (latents from the inner gradient; ``nested=False`` detaches them, the
    ablation), "autodecoder" (latents from ``model.latents``) or "encoder" (latents from
    ``model.encoder``, :mod:`stellarfield.model.encoder`: amortised, nothing stored per spectrum). The trunk is evaluated once, on the
    concatenated grid views of all batches. Returns the loss and per-product statistics
    (mean chi2 per pixel with the likelihood's variance, mean NLL, mean |v|).
    """
    observations = [observe(model, b, fit_rest_frame_rv=False) for b in batches]
    sizes = [sum(i1 - i0 for _, i0, i1 in o.view) for o in observations]
    dev = batches[0].u.device
    basis_all = model.decoder.basis(torch.cat([o.inst.view_u(o.view) for o in observations]).to(dev),
                                    torch.cat([o.inst.view_sigma_u(o.view) for o in observations]).to(dev))
    bases = list(torch.split(basis_all, sizes))
    if objective == "gon":
        z = gon_latents(model, observations, bases, create_graph=nested)
        if not nested:
            z = z.detach()
    elif objective == "autodecoder":
        z = model.latents(torch.cat([o.batch.index for o in observations]))
    elif objective == "encoder":
        from stellarfield.model.encoder import encode  # the encoder's pooling uses this module

        z = encode(model, observations, bases)
    else:
        raise ValueError(f"unknown objective {objective!r}; choose 'gon', 'autodecoder' or 'encoder'")
    coeffs = model.decoder.coefficients(z)
    nll, stats, start = [], {}, 0
    for obs, basis in zip(observations, bases):
        stop = start + obs.batch.size
        var = variance(model, obs)
        if obs.inst.frame == "observed":
            obs.v = refine_velocity(obs, coeffs[start:stop], basis, var)
        flux, inside = model_at_pixels(obs, coeffs[start:stop], basis, obs.v)
        fit = likelihood(obs, flux, inside, var)
        nll.append(spectrum_loss(model, fit, z[start:stop]))
        stats[obs.batch.product] = {
            "chi2_per_pixel": (fit.chi2 / fit.n).mean().item(),
            "nll": fit.nll.mean().item(),
            "grid_points": sizes[len(nll) - 1],
        }
        start = stop
    loss = torch.stack([x.mean() for x in nll]).mean()  # every product weighs the same, whatever its batch
    return loss, stats
