"""The likelihood of a spectrum under the model, and the ways to get a spectrum's latent.

For one spectrum with native pixels ``u_p`` (observed or rest frame, as the product is), flux
``d_p``, inverse variance ``ivar_p`` and good-pixel mask, given a latent ``z`` and a radial
velocity ``v``::

    m_p   = render( blur_LSF( f(z, u_rest) ), u_p - ln(1 + v/c) )      model at the native pixels
    c     = argmin_c sum_p w_p (d_p - m_p c_p)^2,  c = Legendre_seg(u_p) @ coeffs     closed form
    var_p = 1/ivar_p + (s_inst(u_p) * median|d|)^2        (1/ivar term absent when the noise is unknown)
    chi2  = sum_p w_p (d_p - m_p c_p)^2,  w_p = good_p / var_p
    nll   = 0.5 * mean_p [ w_p r_p^2 + ln(var_p / median|d|^2) ]   (Gaussian NLL per good pixel)

Ways to get ``z`` (all share the code below):

* **GON** (Bond-Taylor & Willcocks 2021, "Gradient Origin Networks", ICLR): the latent is the negative
  gradient of the *inner loss* at ``z = 0``: ``z = -d/dz0 sum_b log(chi2_b / n_b)``, with the nested
  gradient kept (``create_graph=True``) so that training the outer loss teaches the decoder to make one
  step enough. ``log(chi2 / n)`` normalises each spectrum: its gradient is ``grad chi2 / chi2``, which
  does not depend on the number of pixels or the scale of the errors, so an 8575-pixel APOGEE spectrum
  and a 343-sample XP spectrum give latents of the same scale.
* **auto-decoder**: one free latent per training spectrum, optimised with the decoder.
* **refinement** (inference): start from the GON latent (or 0) and take Adam steps on ``z`` and ``v``
  minimising the NLL.

Radial velocity: for products with an RV scan range the velocity is first found by cross-correlation
with the model at ``z = 0`` (the mean spectrum as template, :func:`ccf_velocity`), then refined by a
chi2 scan of +-3 LSF sigma against the model at the star's latent (parabola through the three best
points), and, at inference, by gradient steps together with the latent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from stellarfield.model.batching import Batch
from stellarfield.model.decoder import combine
from stellarfield.model.instrument import Instrument
from stellarfield.model.stellar_model import StellarModel
from stellarfield.physics.continuum import fit_multiplicative_continuum
from stellarfield.physics.doppler import C_KMS, log_shift, velocity_from_log_shift
from stellarfield.physics.lsf import gaussian_blur_uniform


@dataclass
class Observation:
    """A batch bound to its instrument: the grid view it needs, its velocities and continuum design."""

    batch: Batch
    inst: Instrument
    view: list
    v: torch.Tensor  # (B,) float64 km/s
    design: torch.Tensor  # (B, K, n_segments * (degree + 1))

    @property
    def sigma_v(self) -> float:
        """LSF sigma in km/s: the natural velocity step."""
        return self.inst.sigma_kms


def continuum_design(inst: Instrument, batch: Batch) -> torch.Tensor:
    """Legendre polynomials (degree ``inst.continuum_degree``) of u scaled to [-1, 1] over each
    segment's pixel range, one block of columns per segment: (B, K, n_segments * (degree + 1))."""
    lo = torch.tensor([s.pixel_u_min for s in inst.segments], dtype=torch.float64)[batch.segment]
    hi = torch.tensor([s.pixel_u_max for s in inst.segments], dtype=torch.float64)[batch.segment]
    x = (2 * (batch.u - lo) / (hi - lo) - 1).clamp(-1, 1).nan_to_num(0.0).float()
    cols = torch.stack([torch.special.legendre_polynomial_p(x, k) for k in range(inst.continuum_degree + 1)], -1)
    onehot = F.one_hot(batch.segment, len(inst.segments)).float()
    return (onehot[..., :, None] * cols[..., None, :]).flatten(-2)


def variance(model: StellarModel, obs: Observation) -> torch.Tensor:
    """Per-pixel variance (B, K): survey noise (where known) + learned intrinsic scatter."""
    b = obs.batch
    scatter = model.scatter(obs.inst.name, b.u) * b.scale[:, None]
    var = scatter**2 + (1e-6 * b.scale[:, None]) ** 2  # a floor: softplus may underflow to 0
    if obs.inst.noise_known:
        var = var + torch.where(b.ivar > 0, 1.0 / b.ivar.clamp(min=1e-30), 0.0)
    return var


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


# --- radial velocity ------------------------------------------------------------------------
@torch.no_grad()
def scan_velocity(obs: Observation, grid: torch.Tensor, var: torch.Tensor, velocities: torch.Tensor) -> torch.Tensor:
    """Best velocity (B,) km/s from a chi2 scan over ``velocities`` (B, V).

    ``grid`` (B or 1, G) is the blurred model on ``obs.view``. The continuum is fitted once at the
    central velocity and each trial velocity gets its best scale factor, which keeps the scan cheap
    (O(B V K)); the minimum is refined by a parabola through it and its two neighbours.
    """
    b = obs.batch
    grid = grid.expand(b.size, -1)
    centre = velocities[:, velocities.shape[1] // 2]
    flux0, inside0 = obs.inst.render(grid, obs.view, b.u, b.segment, centre)
    fit0 = likelihood(obs, flux0, inside0, var)
    continuum = fit0.continuum
    trial, inside = obs.inst.render(grid, obs.view, b.u, b.segment, velocities)  # (B, V, K)
    weight = torch.where(b.good[:, None] & inside, 1.0 / var[:, None], 0.0)
    shape = trial * continuum[:, None]
    scale = (weight * b.flux[:, None] * shape).sum(-1) / (weight * shape**2).sum(-1).clamp(min=1e-30)
    chi2 = (weight * (b.flux[:, None] - scale[..., None] * shape) ** 2).sum(-1)
    chi2 = chi2 / weight.gt(0).sum(-1).clamp(min=1)  # per pixel: trial shifts see different pixels
    best = chi2.argmin(1).clamp(1, velocities.shape[1] - 2)
    c = chi2.gather(1, torch.stack([best - 1, best, best + 1], 1)).double()
    step = (velocities[:, 1] - velocities[:, 0]).double()
    curvature = c[:, 0] - 2 * c[:, 1] + c[:, 2]
    offset = torch.where(curvature > 0, 0.5 * (c[:, 0] - c[:, 2]) / curvature.clamp(min=1e-30), 0.0).clamp(-1, 1)
    return velocities.gather(1, best[:, None])[:, 0].double() + offset * step


@torch.no_grad()
def ccf_velocity(obs: Observation, grid: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """Coarse RV (B,) km/s: peak of the cross-correlation of each spectrum with the model ``grid``
    (B or 1, G; blurred, on ``obs.view``), over the instrument's scan range.

    The continuum-normalised data (fitted at v = 0) are binned onto the model grid (nearest grid
    point, inverse-variance weights: a start value, not a fit, so the data may be binned here), both
    are high-pass filtered (minus a Gaussian smoothing of 25 LSF sigma), and the correlation at every
    lag comes from one FFT per piece of the grid; the peak is refined by a parabola. Lags are shifts
    in u (log grids) converted to velocity by :func:`velocity_from_log_shift`. Cost O(B G log G)
    instead of the O(B V K) of a chi2 scan at every trial velocity.
    """
    b, inst = obs.batch, obs.inst
    v_max = inst.rv_scan_kms
    zero = torch.zeros(b.size, dtype=torch.float64)
    flux0, inside0 = inst.render(grid.expand(b.size, -1), obs.view, b.u, b.segment, zero)
    fit0 = likelihood(obs, flux0, inside0, var)
    good = fit0.good & (fit0.continuum.abs() > 0)
    weight = torch.where(good, 1.0 / var, 0.0)
    signal = torch.where(good, b.flux / fit0.continuum.where(good, 1.0), 0.0)
    v_step = min(C_KMS * inst.segments[k].step for k, _, _ in obs.view)
    velocities = torch.arange(-v_max, v_max + v_step, v_step, dtype=torch.float64)
    total = torch.zeros(b.size, len(velocities), dtype=torch.float64)
    start = 0
    for k, i0, i1 in obs.view:
        seg, n = inst.segments[k], i1 - i0
        model = grid[:, start : start + n].double().expand(b.size, -1)
        start += n
        if seg.scale != "log" or n < 8:
            continue
        index = torch.round((b.u - (seg.start + i0 * seg.step)) / seg.step)
        on = (b.segment == k) & good & (index >= 0) & (index < n)
        index = torch.where(on, index, 0).long()
        num = torch.zeros(b.size, n, dtype=torch.float64).scatter_add_(1, index, torch.where(on, weight * signal, 0.0).double())
        den = torch.zeros(b.size, n, dtype=torch.float64).scatter_add_(1, index, torch.where(on, weight, 0.0).double())
        data = torch.where(den > 0, num / den.clamp(min=1e-300), 0.0)
        smooth = 25 * seg.sigma_pixels
        model_hp = model - gaussian_blur_uniform(model, smooth)
        data_hp = torch.where(den > 0, data - gaussian_blur_uniform(data, smooth), 0.0) * (den > 0)
        max_lag = int(math.ceil(float(log_shift(v_max)) / seg.step)) + 1
        n_fft = n + max_lag + 1
        ccf = torch.fft.irfft(torch.fft.rfft(data_hp, n_fft) * torch.fft.rfft(model_hp, n_fft).conj(), n_fft)
        lags = torch.arange(-max_lag, max_lag + 1)
        values = ccf[:, lags % n_fft]  # (B, 2 max_lag + 1): sum_g data(g) model(g - lag)
        lag_v = velocity_from_log_shift(lags.double() * seg.step)
        total += _interp(velocities, lag_v, values)
    best = total.argmax(1).clamp(1, len(velocities) - 2)
    c = total.gather(1, torch.stack([best - 1, best, best + 1], 1))
    curvature = c[:, 0] - 2 * c[:, 1] + c[:, 2]
    offset = torch.where(curvature < 0, 0.5 * (c[:, 0] - c[:, 2]) / curvature.clamp(max=-1e-300), 0.0).clamp(-1, 1)
    return (velocities[best] + offset * v_step).clamp(-v_max, v_max)


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Linear interpolation of rows ``fp`` (B, N) given at increasing ``xp`` (N,) onto ``x`` (M,)."""
    i = torch.searchsorted(xp, x).clamp(1, len(xp) - 1)
    w = ((x - xp[i - 1]) / (xp[i] - xp[i - 1])).clamp(0, 1)
    return fp[:, i - 1] * (1 - w) + fp[:, i] * w


def velocity_grid(centre: torch.Tensor, half_width: float, step: float) -> torch.Tensor:
    """(B, V) velocities ``centre - half_width .. centre + half_width`` in steps of ``step`` km/s."""
    n = max(1, int(round(half_width / step)))
    return centre[:, None] + step * torch.arange(-n, n + 1, dtype=torch.float64)


# --- getting a batch ready ------------------------------------------------------------------
def observe(model: StellarModel, batch: Batch, full_grid: bool = False,
            v_init: torch.Tensor | None = None, mean_grid: torch.Tensor | None = None,
            fit_rest_frame_rv: bool = True) -> Observation:
    """Bind ``batch`` to its instrument and find each spectrum's starting velocity.

    For products with an RV scan range, a scan of the whole range against the model at ``z = 0``
    (no gradient) gives the velocity (unless ``v_init`` is given); the grid view is then the part
    of the model grid those velocities need (or the whole grid with ``full_grid``). ``mean_grid``
    (1, G): the blurred model at z = 0 on the full grid, if the caller has it already.
    ``fit_rest_frame_rv=False`` keeps v = 0 for rest-frame products (training: the surveys' rest
    frames anchor the model's; their residual velocities are only fitted at inference).
    """
    inst = model.instrument(batch.product)
    zero = torch.zeros(batch.size, dtype=torch.float64)
    obs = Observation(batch, inst, inst.full_view(), zero, continuum_design(inst, batch))
    rv = inst.rv_scan_kms if (fit_rest_frame_rv or inst.frame != "rest") else 0.0
    if rv > 0 and v_init is None:
        if batch.window is not None:
            obs.view = inst.window_view(batch.window[0], batch.window[1], batch.window[2], -rv, rv)
        with torch.no_grad():
            if mean_grid is None or batch.window is not None:
                basis = model.decoder.basis(inst.view_u(obs.view), inst.view_sigma_u(obs.view))
                mean_grid = inst.blur(combine(model.decoder.coefficients(torch.zeros(1, model.latent_dim)), basis), obs.view)
            obs.v = ccf_velocity(obs, mean_grid, variance(model, obs))
    elif v_init is not None:
        obs.v = v_init.double()
    if batch.window is not None and not full_grid:
        margin = 4 * obs.sigma_v + 1.0
        v_lo, v_hi = float(obs.v.min()) - margin, float(obs.v.max()) + margin
        obs.view = inst.window_view(batch.window[0], batch.window[1], batch.window[2], v_lo, v_hi)
    else:
        obs.view = inst.full_view()
    return obs


def refine_velocity(obs: Observation, coeffs: torch.Tensor, basis: torch.Tensor, var: torch.Tensor,
                    blurred_basis: bool = False, half_width_sigmas: float = 3.0) -> torch.Tensor:
    """Fine RV scan (+-3 LSF sigma in steps of sigma/2) around ``obs.v`` against the model at ``coeffs``."""
    if obs.inst.rv_scan_kms <= 0:
        return obs.v
    with torch.no_grad():
        grid = combine(coeffs, basis)
        if not blurred_basis:
            grid = obs.inst.blur(grid, obs.view)
        step = obs.sigma_v / 2
        v = scan_velocity(obs, grid, var, velocity_grid(obs.v, half_width_sigmas * obs.sigma_v, step))
    return v.clamp(-obs.inst.rv_scan_kms, obs.inst.rv_scan_kms)


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
        z0 = torch.zeros(n_total, model.latent_dim, requires_grad=True)
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
                   z: torch.Tensor, steps: int, lr: float = 0.05, latent_l2: float = 1e-3,
                   blurred_basis: bool = True) -> torch.Tensor:
    """``steps`` Adam steps on the latents and velocities minimising NLL + latent_l2 |z|^2.

    The decoder's weights are not changed (``bases`` should be detached). Velocities are updated
    in place in each ``obs.v`` (parametrised in units of the LSF sigma so one learning rate fits
    all). Returns the refined latents (detached).
    """
    with torch.enable_grad():
        return _refine(model, observations, bases, z, steps, lr, latent_l2, blurred_basis)


def _refine(model, observations, bases, z, steps, lr, latent_l2, blurred_basis):
    z = z.detach().clone().requires_grad_(True)
    dv = [torch.zeros(o.batch.size, dtype=torch.float64, requires_grad=o.inst.rv_scan_kms > 0) for o in observations]
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
            loss = loss + likelihood(obs, flux, inside, var).nll.sum()
            start = stop
        loss = loss + latent_l2 * (z**2).sum()
        loss.backward()
        opt.step()
    for obs, d in zip(observations, dv):
        if obs.inst.rv_scan_kms > 0:
            obs.v = (obs.v + d.detach() * obs.sigma_v).clamp(-obs.inst.rv_scan_kms, obs.inst.rv_scan_kms)
    return z.detach()


def velocity_error(obs: Observation, coeffs: torch.Tensor, basis: torch.Tensor, var: torch.Tensor,
                   blurred_basis: bool = True) -> torch.Tensor:
    """1-sigma RV uncertainty (B,) km/s from the curvature of chi2(v) at ``obs.v``:
    ``sigma_v^2 = 2 / (d^2 chi2 / dv^2)`` (Delta chi2 = 1), with the likelihood's variance.
    NaN for products without an RV fit."""
    if obs.inst.rv_scan_kms <= 0:
        return torch.full((obs.batch.size,), float("nan"), dtype=torch.float64)
    with torch.no_grad():
        h = obs.sigma_v / 4
        chi2 = []
        for dv in (-h, 0.0, h):
            flux, inside = model_at_pixels(obs, coeffs, basis, obs.v + dv, blurred_basis)
            chi2.append(likelihood(obs, flux, inside, var).chi2.double())
        curvature = (chi2[0] - 2 * chi2[1] + chi2[2]) / h**2
    return torch.where(curvature > 0, torch.sqrt(2.0 / curvature.clamp(min=1e-30)), float("inf"))


# --- the training objective -------------------------------------------------------------------
def training_loss(model: StellarModel, batches: list[Batch], objective: str = "gon", nested: bool = True,
                  latent_l2: float = 1e-3) -> tuple[torch.Tensor, dict]:
    """Mean over products of the mean NLL per good pixel of their spectra (one batch per product).

    ``objective``: "gon" (latents from the inner gradient; ``nested=False`` detaches them, the
    ablation) or "autodecoder" (latents from ``model.latents``). The trunk is evaluated once, on the
    concatenated grid views of all batches. Returns the loss and per-product statistics
    (mean chi2 per pixel with the likelihood's variance, mean NLL, mean |v|).
    """
    observations = [observe(model, b, fit_rest_frame_rv=False) for b in batches]
    sizes = [sum(i1 - i0 for _, i0, i1 in o.view) for o in observations]
    basis_all = model.decoder.basis(torch.cat([o.inst.view_u(o.view) for o in observations]),
                                    torch.cat([o.inst.view_sigma_u(o.view) for o in observations]))
    bases = list(torch.split(basis_all, sizes))
    if objective == "gon":
        z = gon_latents(model, observations, bases, create_graph=nested)
        if not nested:
            z = z.detach()
    elif objective == "autodecoder":
        z = model.latents(torch.cat([o.batch.index for o in observations]))
    else:
        raise ValueError(f"unknown objective {objective!r}; choose 'gon' or 'autodecoder'")
    coeffs = model.decoder.coefficients(z)
    nll, stats, start = [], {}, 0
    for obs, basis in zip(observations, bases):
        stop = start + obs.batch.size
        var = variance(model, obs)
        if obs.inst.frame == "observed":
            obs.v = refine_velocity(obs, coeffs[start:stop], basis, var)
        flux, inside = model_at_pixels(obs, coeffs[start:stop], basis, obs.v)
        fit = likelihood(obs, flux, inside, var)
        nll.append(fit.nll)
        stats[obs.batch.product] = {
            "chi2_per_pixel": (fit.chi2 / fit.n).mean().item(),
            "nll": fit.nll.mean().item(),
            "grid_points": sizes[len(nll) - 1],
        }
        start = stop
    loss = torch.stack([x.mean() for x in nll]).mean()  # every product weighs the same, whatever its batch
    if objective == "autodecoder":
        loss = loss + latent_l2 * (z**2).sum(1).mean()
    return loss, stats
