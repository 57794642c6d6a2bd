"""The ways to get a spectrum's latent with a trained (or training) decoder, all on :func:`spectrum_loss`.

* **GON** (Bond-Taylor & Willcocks 2021, "Gradient Origin Networks", ICLR): the latent is the negative
  gradient of the *inner loss* at ``z = 0``: ``z = -d/dz0 sum_b log(chi2_b / n_b)``, with the nested
  gradient kept (``create_graph=True``) so that training the outer loss teaches the decoder to make one
  step enough. ``log(chi2 / n)`` normalises each spectrum: its gradient is ``grad chi2 / chi2``, which
  does not depend on the number of pixels or the scale of the errors, so an 8575-pixel APOGEE spectrum
  and a 343-sample XP spectrum give latents of the same scale (:func:`gon_latents`).
* **refinement** (inference): start from the GON latent, the encoder's (:mod:`stellarfield.model.encoder`)
  or 0 and take Adam steps on ``z`` and ``v`` minimising the same per-spectrum loss as training
  (:func:`refine_latents`; Gauss-Newton steps: :mod:`stellarfield.model.newton`).

The auto-decoder's latents (one free latent per training star) are parameters of the model
(:attr:`StellarModel.latents`), trained by :func:`stellarfield.model.objectives.training_loss`.
"""

from __future__ import annotations

import torch

from stellarfield.model.likelihood import (Observation, basis_at_pixels, evaluate, evaluate_at_pixels, spectrum_loss,
                                          variance)
from stellarfield.model.stellar_model import StellarModel


def gon_latents(model: StellarModel, observations: list[Observation], bases: list[torch.Tensor],
                create_graph: bool = True, blurred_basis: bool = False,
                variances: list[torch.Tensor] | None = None) -> torch.Tensor:
    """GON latents (sum B, D): ``z = -d/dz0 sum_b log(chi2_b / n_b)`` at ``z0 = 0``.

    With ``create_graph=True`` the result stays a differentiable function of the decoder's weights
    (second-order terms reach the branch and the trunk when the outer loss is back-propagated);
    ``create_graph=False`` gives the same numbers detached from the weights (inference, or the
    "no nested gradient" ablation). ``variances``: each observation's :func:`variance`, if the
    caller has them already (training scores the spectra with the same ones).
    """
    if variances is None:
        variances = [variance(model, o) for o in observations]
    n_total = sum(o.batch.size for o in observations)
    with torch.enable_grad():
        z0 = torch.zeros(n_total, model.latent_dim, device=bases[0].device, requires_grad=True)
        coeffs = model.decoder.coefficients(z0)
        inner, start = 0.0, 0
        for obs, basis, var in zip(observations, bases, variances):
            stop = start + obs.batch.size
            fit = evaluate(obs, coeffs[start:stop], basis, obs.v, var, blurred_basis)
            inner = inner + torch.log(fit.chi2 / fit.n + 1e-12).sum()
            start = stop
        (grad,) = torch.autograd.grad(inner, z0, create_graph=create_graph)
    return -grad


def refine_latents(model: StellarModel, observations: list[Observation], bases: list[torch.Tensor],
                   z: torch.Tensor, steps: int, lr: float = 0.05, blurred_basis: bool = True,
                   fit_velocity: bool = True) -> torch.Tensor:
    """``steps`` Adam steps on the latents and velocities minimising :func:`spectrum_loss`.

    The decoder's weights are not changed (``bases`` should be detached). Velocities are updated
    in place in each ``obs.v`` (parametrised in units of the LSF sigma so one learning rate fits
    all); ``fit_velocity=False`` holds them (a profile likelihood in v). Returns the refined
    latents (detached).
    """
    with torch.enable_grad():
        return _refine(model, observations, bases, z, steps, lr, blurred_basis, fit_velocity)


def _refine(model, observations, bases, z, steps, lr, blurred_basis, fit_velocity=True):
    z = z.detach().clone().requires_grad_(True)
    dv = [torch.zeros(o.batch.size, dtype=torch.float64, device=z.device,
                      requires_grad=fit_velocity and o.inst.rv_scan_kms > 0)
          for o in observations]
    params = [z] + [d for d in dv if d.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    variances = [variance(model, o).detach() for o in observations]
    # a batch whose velocities are held and whose spectra share their pixels: the basis rendered at
    # them once, then one product per step (the same model at the pixels)
    with torch.no_grad():
        at_pixels = [basis_at_pixels(o, basis, o.v) if blurred_basis and not d.requires_grad else None
                     for o, basis, d in zip(observations, bases, dv)]
    for _ in range(steps):
        opt.zero_grad()
        coeffs = model.decoder.coefficients(z)
        loss, start = 0.0, 0
        for obs, basis, d, var, rendered in zip(observations, bases, dv, variances, at_pixels):
            stop = start + obs.batch.size
            if rendered is not None:
                fit = evaluate_at_pixels(obs, coeffs[start:stop], rendered, var)
            else:
                fit = evaluate(obs, coeffs[start:stop], basis, obs.v + d * obs.sigma_v, var, blurred_basis)
            loss = loss + spectrum_loss(model, fit, z[start:stop]).sum()
            start = stop
        loss.backward()
        opt.step()
    for obs, d in zip(observations, dv):
        if d.requires_grad:
            obs.v = (obs.v + d.detach() * obs.sigma_v).clamp(-obs.inst.rv_scan_kms, obs.inst.rv_scan_kms)
    return z.detach()
