"""Gauss-Newton (Levenberg-Marquardt) refinement of latents and velocities: few steps from a good start.

Adam moves every coordinate by about its step size per step whatever the curvature, so from a start
that is already close (the encoder's latent) it needs tens of steps to settle, and Gaia XP's sharp
chi2 valleys need many more. Here each step solves the local least-squares problem instead. For one
spectrum with parameters ``theta = (z, v / sigma_v)`` (latent, and the velocity in units of the LSF
sigma where the product has one to fit), the continuum ``c`` fixed at its closed-form value for the
current model (it is re-fitted after every step: variable projection), residuals ``r = d - c m`` and
weights ``w = good / var``::

    J_pj  = c_j dm_j / dtheta_p                      dm/dz: the branch's Jacobian through the basis,
                                                     rendered; dm/dv: a central difference of the render
    (J^T W J + s^2 I_z + lambda diag(J^T W J)) delta = J^T W r - s^2 z,      s^2 = chi2 / n

the Gauss-Newton step of the training loss ``0.5 ln(chi2 / n) + 0.5 |z|^2 / n`` (its gradient,
multiplied by ``2 chi2``, is ``-2 J^T W r + 2 s^2 z``; ``s^2`` is held at the current value). A step
is kept only where it lowers :func:`~stellarfield.model.likelihood.spectrum_loss`; ``lambda`` (per
spectrum) shrinks by 3 after a kept step and grows by 4 after a rejected one. Cost of a step: one
branch Jacobian (tiny), ``latent_dim`` renders of the model grid (+2 for the velocity) and two
likelihood evaluations, about one Adam step on these products.
"""

from __future__ import annotations

import torch

from stellarfield.model.likelihood import FitResult, Observation, evaluate, spectrum_loss, variance

#: Starting Levenberg-Marquardt damping (relative to the diagonal of J^T W J).
DAMPING = 1e-3
#: Velocity step of the central difference, in LSF sigma.
DV_SIGMAS = 0.05


def latent_jacobian(model, obs: Observation, basis: torch.Tensor, z: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``dm / dz`` (B, D, K): how the model at each native pixel (rendered at velocity ``v``, before
    the continuum) moves with each latent dimension, at ``z`` (B, D); ``basis``: the blurred trunk on
    ``obs.view`` (full grid). The model is linear in the branch's coefficients, so this is the
    branch's Jacobian (autograd, tiny) times the basis, rendered: ``D`` models of the grid rendered at
    pixel positions computed once per spectrum."""
    branch = lambda zz: model.decoder.coefficients(zz[None])[0]
    with torch.enable_grad():
        jac = torch.func.vmap(torch.func.jacrev(branch))(z.detach())  # (B, H, D)
    directions = torch.einsum("bhd,gh->bdg", jac, basis[:, :-1])  # (B, D, G)
    dm_dz, _ = obs.inst.render(directions, obs.view, obs.batch.u, obs.batch.segment, v)
    return dm_dz


def _select(better: torch.Tensor, new: FitResult, old: FitResult) -> FitResult:
    pick = lambda a, b: torch.where(better.view(-1, *([1] * (a.dim() - 1))), a, b)
    return FitResult(*(pick(getattr(new, f), getattr(old, f)) for f in
                       ("chi2", "n", "nll", "prediction", "continuum", "good")))


@torch.no_grad()
def gauss_newton_latents(model, obs: Observation, basis: torch.Tensor, z: torch.Tensor, steps: int) -> torch.Tensor:
    """``steps`` Levenberg-Marquardt steps on the latents (B, D) and, where the product has a velocity
    to fit, ``obs.v`` (updated in place); ``basis`` is the blurred trunk on ``obs.view`` (full grid).
    Returns the refined latents. See the module docstring."""
    inst, batch = obs.inst, obs.batch
    b, d = z.shape
    fit_rv = inst.rv_scan_kms > 0
    var = variance(model, obs)
    weight_all = 1.0 / var
    z, v = z.detach().clone(), obs.v.clone()

    def loss_at(z, v):
        fit = evaluate(obs, model.decoder.coefficients(z), basis, v, var, blurred_basis=True)
        return spectrum_loss(model, fit, z), fit

    loss, fit = loss_at(z, v)
    damping = torch.full((b,), DAMPING, dtype=torch.float64, device=z.device)
    for _ in range(steps):
        columns = [latent_jacobian(model, obs, basis, z, v)]
        if fit_rv:
            grid = model.decoder(z, basis)
            h = DV_SIGMAS * obs.sigma_v
            plus, _ = inst.render(grid, obs.view, batch.u, batch.segment, v + h)
            minus, _ = inst.render(grid, obs.view, batch.u, batch.segment, v - h)
            columns.append(((plus - minus) / (2 * DV_SIGMAS))[:, None, :])  # per LSF sigma
        jacobian = torch.cat(columns, 1) * fit.continuum[:, None, :]  # (B, P, K)
        weight = torch.where(fit.good, weight_all, 0.0)
        resid = torch.where(fit.good, batch.flux - fit.prediction, 0.0)
        weighted = jacobian * weight[:, None, :]
        normal = torch.bmm(weighted, jacobian.transpose(1, 2)).double()  # (B, P, P)
        gradient = torch.bmm(weighted, resid[:, :, None])[..., 0].double()  # (B, P)
        s2 = (fit.chi2 / fit.n).double()
        p = normal.shape[-1]
        prior = torch.zeros(p, dtype=torch.float64, device=z.device)
        prior[:d] = 1.0
        normal = normal + s2[:, None, None] * torch.diag(prior)
        gradient[:, :d] -= s2[:, None] * z.double()
        diagonal = torch.diagonal(normal, dim1=1, dim2=2)
        damped = normal + torch.diag_embed(damping[:, None] * diagonal + 1e-12 * diagonal.mean(1, keepdim=True))
        delta = torch.linalg.solve(damped, gradient)
        z_new = z + delta[:, :d].to(z.dtype)
        v_new = v
        if fit_rv:
            v_new = (v + delta[:, d] * obs.sigma_v).clamp(-inst.rv_scan_kms, inst.rv_scan_kms)
        loss_new, fit_new = loss_at(z_new, v_new)
        better = torch.isfinite(loss_new) & (loss_new < loss)
        z = torch.where(better[:, None], z_new, z)
        v = torch.where(better, v_new, v)
        loss = torch.where(better, loss_new, loss)
        fit = _select(better, fit_new, fit)
        damping = torch.where(better, damping / 3, damping * 4).clamp(1e-9, 1e9)
    obs.v = v
    return z
