"""Radial-velocity search: cross-correlation candidates, chi2 scans, and the choice between them.

The velocity of a spectrum is found in three steps (:func:`refine_velocity`):

1. **candidates**: the ``n_peaks`` highest local maxima of the cross-correlation of the spectrum with
   a model spectrum over the instrument's whole scan range (:func:`ccf_candidates`), at least
   ``separation_sigmas`` LSF sigma apart; and whatever start the caller already has (``obs.v``);
2. **a chi2 scan around each candidate** against the model at the star's own latent, +-3 LSF sigma in
   steps of sigma/2 (:func:`scan_velocity`); when the minimum is at an end of the scan the scan moves
   there and goes on (:func:`descend_velocity`), so a start a few sigma off on a broad chi2 valley
   still reaches its bottom;
3. **the lowest chi2 per pixel wins** (:func:`best_velocity`): each candidate's velocity gets the full
   closed-form continuum fit and its chi2, all on the same pixels (those every candidate can see).

Why not just the highest CCF peak: the CCF is a start value, computed on binned, high-pass filtered
data against a template that is not the star (the mean model, z = 0). Stars with dense, repeating
molecular bands (APOGEE M dwarfs: OH, CO, FeH) have CCF side peaks of nearly the height of the main
one, 50-80 km/s away; on one APOGEE visit the highest CCF peak was one where the chi2 is worse, and a
+-3 sigma scan from there never left it. The chi2 against the star's model at the candidates
decides instead; the likelihood, not the start value, then says where the star is.

Cost: ``(1 + n_peaks) x (1 + moves)`` scans of ``13 x pixels`` renders per spectrum, plus one FFT
cross-correlation per segment; all under ``no_grad``.

Everything takes an :class:`~stellarfield.model.likelihood.Observation` (``obs.v`` the current
velocities (B,), ``obs.v_candidates`` (B, K) more starts or None) and a blurred model ``grid`` on
``obs.view`` (B or 1, G). Velocities are km/s, ``lambda_obs = (1 + v/c) lambda_rest``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from stellarfield.model.decoder import combine
from stellarfield.physics.doppler import C_KMS, log_shift, velocity_from_log_shift
from stellarfield.physics.lsf import gaussian_blur_uniform

if TYPE_CHECKING:
    from stellarfield.model.likelihood import Observation

#: CCF peaks tried as starting velocities (the highest, then the next ones).
N_PEAKS = 5
#: Minimum distance between two CCF peaks taken as candidates, in LSF sigma (the fine scan's half-width:
#: closer peaks are reached by the scan around the higher one).
PEAK_SEPARATION_SIGMAS = 3.0
#: Half-width of the fine chi2 scan, in LSF sigma; its step is sigma / 2.
SCAN_HALF_WIDTH_SIGMAS = 3.0
#: How many times a scan whose minimum is at one of its ends moves on (each move: one half-width further).
MAX_SCAN_MOVES = 6


def _likelihood(obs, flux, inside, var):
    # the likelihood lives in objectives, which imports this module: imported when called
    from stellarfield.model.likelihood import likelihood

    return likelihood(obs, flux, inside, var)


def _parabola_offset(c: torch.Tensor, maximum: bool) -> torch.Tensor:
    """Vertex of the parabola through ``c`` (..., 3) at x = -1, 0, 1, in [-1, 1]; 0 where the three
    points do not bracket an extremum of the requested kind (or are not finite)."""
    curvature = c[..., 0] - 2 * c[..., 1] + c[..., 2]
    ok = torch.isfinite(curvature) & ((curvature < 0) if maximum else (curvature > 0))
    safe = torch.where(ok, curvature, -1.0 if maximum else 1.0)
    return torch.where(ok, 0.5 * (c[..., 0] - c[..., 2]) / safe, 0.0).clamp(-1, 1)


# --- chi2 scans ---------------------------------------------------------------------------
def _scan_rows(obs: Observation, grid: torch.Tensor, var: torch.Tensor, continuum: torch.Tensor,
               velocities: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """chi2 per pixel (R, V) of spectra ``rows`` (R,) of the batch (all when None) at trial velocities
    (R, V), with a fixed ``continuum`` (B, K) and the best scale factor per trial. A trial whose
    shifted pixels leave the grid view (it sees fewer pixels than the best covered trial of its row)
    gets +inf: chi2 on fewer pixels is not comparable."""
    b = obs.batch
    u, segment, good, flux = b.u, b.segment, b.good, b.flux
    if rows is not None:
        u, segment, good, flux, var, continuum = u[rows], segment[rows], good[rows], flux[rows], var[rows], continuum[rows]
        grid = grid if grid.shape[0] == 1 else grid[rows]
    trial, inside = obs.inst.render(grid.expand(u.shape[0], -1), obs.view, u, segment, velocities)  # (R, V, K)
    # chi2 at the best scale a of each trial: sum w (f - a s)^2 = sum w f^2 - (sum w f s)^2 / sum w s^2,
    # s = trial x continuum, w = good / var on the pixels the trial sees: four batched dot products
    # over pixels (float64: the difference cancels most of sum w f^2)
    w = torch.where(good, 1.0 / var, 0.0).double()
    c, f = continuum.double(), flux.double()
    per_pixel = torch.stack([w * f * c, w * c * c, w * f * f, good.double()], -1)  # (R, K, 4)
    seen = torch.where(inside, trial, 0.0).double()
    fs, ss = torch.bmm(seen, per_pixel[..., :1])[..., 0], torch.bmm(seen * seen, per_pixel[..., 1:2])[..., 0]
    ff_n = torch.bmm(inside.double(), per_pixel[..., 2:])  # (R, V, 2): sum w f^2, pixels seen
    n = ff_n[..., 1].round()
    chi2 = (ff_n[..., 0] - fs**2 / ss.clamp(min=1e-300)).clamp(min=0) / n.clamp(min=1)
    return torch.where(n >= n.max(1, keepdim=True).values, chi2, float("inf"))


def _continuum(obs: Observation, grid: torch.Tensor, var: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The closed-form continuum (B, K) of each spectrum with the model ``grid`` at velocities ``v`` (B,)."""
    b = obs.batch
    flux, inside = obs.inst.render(grid.expand(b.size, -1), obs.view, b.u, b.segment, v)
    return _likelihood(obs, flux, inside, var).continuum


@torch.no_grad()
def scan_chi2(obs: Observation, grid: torch.Tensor, var: torch.Tensor, velocities: torch.Tensor) -> torch.Tensor:
    """chi2 per pixel (B, V) of each spectrum at each trial velocity ``velocities`` (B, V).

    ``grid`` (B or 1, G) is the blurred model on ``obs.view``. The continuum is fitted once at the
    central velocity and each trial velocity gets its best scale factor, which keeps the scan cheap
    (O(B V K)). Trials that lose pixels off the grid view get +inf.
    """
    continuum = _continuum(obs, grid, var, velocities[:, velocities.shape[1] // 2])
    return _scan_rows(obs, grid, var, continuum, velocities)


def _vertex(chi2: torch.Tensor, velocities: torch.Tensor) -> torch.Tensor:
    """Velocity (B,) of the minimum of ``chi2`` (B, V), refined by a parabola through it and its neighbours."""
    best = chi2.argmin(1).clamp(1, velocities.shape[1] - 2)
    c = chi2.gather(1, torch.stack([best - 1, best, best + 1], 1)).double()
    step = (velocities[:, 1] - velocities[:, 0]).double()
    return velocities.gather(1, best[:, None])[:, 0].double() + _parabola_offset(c, maximum=False) * step


@torch.no_grad()
def scan_velocity(obs: Observation, grid: torch.Tensor, var: torch.Tensor, velocities: torch.Tensor) -> torch.Tensor:
    """Best velocity (B,) km/s from a chi2 scan (:func:`scan_chi2`) over ``velocities`` (B, V); the
    minimum is refined by a parabola through it and its two neighbours."""
    return _vertex(scan_chi2(obs, grid, var, velocities), velocities)


@torch.no_grad()
def descend_velocity(obs: Observation, grid: torch.Tensor, var: torch.Tensor, starts: torch.Tensor,
                     half_width_sigmas: float = SCAN_HALF_WIDTH_SIGMAS, max_moves: int = MAX_SCAN_MOVES,
                     continuum: torch.Tensor | None = None) -> torch.Tensor:
    """Fine chi2 scans (+-``half_width_sigmas`` LSF sigma in steps of sigma/2) around each of
    ``starts`` (B, S) -> (B, S) km/s, parabola-refined minima.

    While a scan's minimum is at one of its ends, that scan is centred there and repeated (at most
    ``max_moves`` times, never beyond the instrument's scan range); only the scans that move are
    recomputed. All scans share one continuum per spectrum (``continuum`` (B, K), else fitted at
    ``starts[:, 0]``): the trial's scale factor absorbs the rest, and the final choice between
    starts (:func:`best_velocity`) refits it.
    """
    b = obs.batch
    v_max = obs.inst.rv_scan_kms
    n_starts = starts.shape[1]
    centre = starts.double().clamp(-v_max, v_max).reshape(-1)  # row r: spectrum r // S, start r % S
    if continuum is None:
        continuum = _continuum(obs, grid, var, centre.reshape(b.size, n_starts)[:, 0])
    spectrum = torch.arange(b.size, device=centre.device).repeat_interleave(n_starts)
    result = centre.clone()
    rows = torch.arange(len(centre), device=centre.device)
    for move in range(max_moves + 1):
        velocities = velocity_grid(centre[rows], half_width_sigmas * obs.sigma_v, obs.sigma_v / 2)
        chi2 = _scan_rows(obs, grid, var, continuum, velocities, spectrum[rows])
        result[rows] = _vertex(chi2, velocities)
        best = chi2.argmin(1)
        at_end = (best == 0) | (best == velocities.shape[1] - 1)
        new_centre = velocities.gather(1, best[:, None])[:, 0].clamp(-v_max, v_max)
        moving = at_end & torch.isfinite(chi2.gather(1, best[:, None])[:, 0]) & (new_centre != centre[rows])
        if move == max_moves or not moving.any():
            break
        centre[rows[moving]] = new_centre[moving]
        rows = rows[moving]
    return result.clamp(-v_max, v_max).reshape(b.size, n_starts)


@torch.no_grad()
def best_velocity(obs: Observation, grid: torch.Tensor, var: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """The candidate velocity (B, K) -> (B,) with the lowest chi2 per pixel against ``grid``.

    Each candidate gets the full closed-form continuum fit (:func:`~stellarfield.model.likelihood.likelihood`)
    on the same pixels: those inside the grid view at every candidate of the spectrum. A candidate
    that would lose pixels the others see (shifted off the view) is not eligible.
    """
    b = obs.batch
    if candidates.shape[1] == 1:
        return candidates[:, 0]
    grid = grid.expand(b.size, -1)
    flux, inside = obs.inst.render(grid, obs.view, b.u, b.segment, candidates)  # (B, K, P)
    seen = (b.good[:, None] & inside).sum(-1)
    eligible = seen >= seen.max(1, keepdim=True).values
    common = (inside | ~eligible[..., None]).all(1)
    chi2 = []
    for k in range(candidates.shape[1]):
        fit = _likelihood(obs, flux[:, k], common, var)
        chi2.append((fit.chi2 / fit.n).double())
    chi2 = torch.where(eligible, torch.stack(chi2, 1), float("inf"))
    chi2 = torch.where(torch.isnan(chi2), float("inf"), chi2)
    return candidates.gather(1, chi2.argmin(1, keepdim=True))[:, 0]


def velocity_grid(centre: torch.Tensor, half_width: float, step: float) -> torch.Tensor:
    """(B, V) velocities ``centre - half_width .. centre + half_width`` in steps of ``step`` km/s."""
    n = max(1, int(round(half_width / step)))
    return centre[:, None] + step * torch.arange(-n, n + 1, dtype=torch.float64, device=centre.device)


# --- cross-correlation ----------------------------------------------------------------------
@torch.no_grad()
def ccf_curve(obs: Observation, grid: torch.Tensor, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-correlation of each spectrum with the model ``grid`` (B or 1, G; blurred, on ``obs.view``)
    over the instrument's scan range: ``(velocities (V,), ccf (B, V))``, float64.

    The continuum-normalised data (fitted at v = 0) are binned onto the model grid (nearest grid
    point, inverse-variance weights: a start value, not a fit, so the data may be binned here), both
    are high-pass filtered (minus a Gaussian smoothing of 25 LSF sigma), and the correlation at every
    lag comes from one FFT per piece of the grid; the pieces' correlations are summed on a common
    velocity axis (step: the finest grid step). Lags are shifts in u (log grids) converted to
    velocity by :func:`velocity_from_log_shift`. Cost O(B G log G) instead of the O(B V K) of a chi2
    scan at every trial velocity.
    """
    b, inst = obs.batch, obs.inst
    v_max = inst.rv_scan_kms
    device = b.u.device
    zero = torch.zeros(b.size, dtype=torch.float64, device=device)
    flux0, inside0 = inst.render(grid.expand(b.size, -1), obs.view, b.u, b.segment, zero)
    fit0 = _likelihood(obs, flux0, inside0, var)
    good = fit0.good & (fit0.continuum.abs() > 0)
    weight = torch.where(good, 1.0 / var, 0.0)
    signal = torch.where(good, b.flux / fit0.continuum.where(good, 1.0), 0.0)
    v_step = min(C_KMS * inst.segments[k].step for k, _, _ in obs.view)
    velocities = torch.arange(-v_max, v_max + v_step, v_step, dtype=torch.float64, device=device)
    total = torch.zeros(b.size, len(velocities), dtype=torch.float64, device=device)
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
        num = torch.zeros(b.size, n, dtype=torch.float64, device=device).scatter_add_(
            1, index, torch.where(on, weight * signal, 0.0).double())
        den = torch.zeros(b.size, n, dtype=torch.float64, device=device).scatter_add_(
            1, index, torch.where(on, weight, 0.0).double())
        data = torch.where(den > 0, num / den.clamp(min=1e-300), 0.0)
        smooth = 25 * seg.sigma_pixels
        model_hp = model - gaussian_blur_uniform(model, smooth)
        data_hp = torch.where(den > 0, data - gaussian_blur_uniform(data, smooth), 0.0) * (den > 0)
        max_lag = int(math.ceil(float(log_shift(v_max)) / seg.step)) + 1
        n_fft = n + max_lag + 1
        ccf = torch.fft.irfft(torch.fft.rfft(data_hp, n_fft) * torch.fft.rfft(model_hp, n_fft).conj(), n_fft)
        lags = torch.arange(-max_lag, max_lag + 1, device=device)
        values = ccf[:, lags % n_fft]  # (B, 2 max_lag + 1): sum_g data(g) model(g - lag)
        lag_v = velocity_from_log_shift(lags.double() * seg.step)
        total += _interp(velocities, lag_v, values)
    return velocities, total


def ccf_peaks(velocities: torch.Tensor, ccf: torch.Tensor, n_peaks: int, separation_kms: float) -> torch.Tensor:
    """The ``n_peaks`` highest local maxima of each row of ``ccf`` (B, V) on ``velocities`` (V,),
    each at least ``separation_kms`` from every higher one chosen (greedy), refined by a parabola:
    (B, n_peaks) km/s, highest first. The ends of the range count as maxima when they are above
    their neighbour; a row with fewer peaks repeats its highest. All within the velocity range."""
    if len(velocities) < 3:
        return velocities[ccf.argmax(1)][:, None].expand(-1, n_peaks).clone()
    pad = torch.full((ccf.shape[0], 1), -math.inf, dtype=ccf.dtype, device=ccf.device)
    padded = torch.cat([pad, ccf, pad], 1)
    is_peak = (ccf >= padded[:, :-2]) & (ccf > padded[:, 2:]) & torch.isfinite(ccf)
    score = torch.where(is_peak, ccf, -math.inf)
    chosen = []
    for _ in range(n_peaks):
        j = score.argmax(1)
        found = torch.isfinite(score.gather(1, j[:, None])[:, 0])
        j = torch.where(found, j, chosen[0]) if chosen else torch.where(found, j, ccf.argmax(1))
        chosen.append(j)
        near = (velocities[None, :] - velocities[j][:, None]).abs() < separation_kms
        score = score.masked_fill(near, -math.inf)
    index = torch.stack(chosen, 1)  # (B, n_peaks)
    middle = index.clamp(1, len(velocities) - 2)
    c = torch.stack([ccf.gather(1, middle - 1), ccf.gather(1, middle), ccf.gather(1, middle + 1)], -1)
    v_step = velocities[1] - velocities[0]
    v = torch.where(index == middle, velocities[middle] + _parabola_offset(c, maximum=True) * v_step, velocities[index])
    return v.clamp(float(velocities[0]), float(velocities[-1]))


@torch.no_grad()
def ccf_candidates(obs: Observation, grid: torch.Tensor, var: torch.Tensor, n_peaks: int = N_PEAKS,
                   separation_sigmas: float = PEAK_SEPARATION_SIGMAS) -> torch.Tensor:
    """Starting velocities (B, n_peaks) km/s: the highest peaks of :func:`ccf_curve`, at least
    ``separation_sigmas`` LSF sigma apart, highest first (see :func:`ccf_peaks`)."""
    velocities, total = ccf_curve(obs, grid, var)
    return ccf_peaks(velocities, total, n_peaks, separation_sigmas * obs.sigma_v).clamp(-obs.inst.rv_scan_kms,
                                                                                        obs.inst.rv_scan_kms)


@torch.no_grad()
def ccf_velocity(obs: Observation, grid: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """Coarse RV (B,) km/s: the highest peak of the cross-correlation with ``grid`` (:func:`ccf_curve`),
    refined by a parabola. A start value only: see :func:`refine_velocity` for why one peak is not enough."""
    return ccf_candidates(obs, grid, var, n_peaks=1)[:, 0]


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Linear interpolation of rows ``fp`` (B, N) given at increasing ``xp`` (N,) onto ``x`` (M,)."""
    i = torch.searchsorted(xp, x).clamp(1, len(xp) - 1)
    w = ((x - xp[i - 1]) / (xp[i] - xp[i - 1])).clamp(0, 1)
    return fp[:, i - 1] * (1 - w) + fp[:, i] * w


# --- the search -----------------------------------------------------------------------------
def refine_velocity(obs: Observation, coeffs: torch.Tensor, basis: torch.Tensor, var: torch.Tensor,
                    blurred_basis: bool = False, half_width_sigmas: float = SCAN_HALF_WIDTH_SIGMAS,
                    candidates: torch.Tensor | None = None, max_moves: int = MAX_SCAN_MOVES) -> torch.Tensor:
    """Velocity (B,) km/s against the model at ``coeffs`` (the star's latent): a descending chi2 scan
    (:func:`descend_velocity`) from ``obs.v``, from each of ``obs.v_candidates`` and ``candidates``
    (B, K) where given, and the start whose scan ends at the lowest chi2 per pixel (:func:`best_velocity`).
    ``obs`` is not changed. Products without an RV fit keep ``obs.v``."""
    if obs.inst.rv_scan_kms <= 0:
        return obs.v
    starts = [obs.v.double()[:, None]]
    for more in (getattr(obs, "v_candidates", None), candidates):
        if more is not None:
            starts.append(more.double().reshape(obs.batch.size, -1))
    starts = torch.cat(starts, 1)
    with torch.no_grad():
        grid = combine(coeffs, basis)
        if not blurred_basis:
            grid = obs.inst.blur(grid, obs.view)
        ends = descend_velocity(obs, grid, var, starts, half_width_sigmas, max_moves)
        v = best_velocity(obs, grid, var, ends)
    return v.clamp(-obs.inst.rv_scan_kms, obs.inst.rv_scan_kms)


#: Contiguous parts of a spectrum whose own velocities test its RV error (:func:`velocity_error`).
RV_ERROR_BLOCKS = 8
#: a block takes part in the Birge ratio when its chi2 curvature exceeds this share of the mean block's
MIN_BLOCK_CURVATURE_SHARE = 0.05


def velocity_error(obs: Observation, coeffs: torch.Tensor, basis: torch.Tensor, var: torch.Tensor,
                   blurred_basis: bool = True, blocks: int = RV_ERROR_BLOCKS,
                   latent_jacobian: torch.Tensor | None = None) -> torch.Tensor:
    """1-sigma RV uncertainty (B,) km/s: the curvature of chi2(v) at ``obs.v``,
    ``sigma_v^2 = 2 / (d^2 chi2 / dv^2)`` (Delta chi2 = 1, the likelihood's variance), widened where
    the parts of the spectrum disagree about the velocity by more than that error allows.

    The good pixels are split into ``blocks`` contiguous parts of equal count; part b's share of the
    chi2's slope g_b and curvature H_b give its own velocity offset ``-g_b / H_b`` (one Newton step)
    with variance ``2 / H_b``, and their Birge ratio ``R^2 = sum_b (H_b / 2) (dv_b - dv)^2 / (n - 1)``
    (dv: the parts used, together; a part is used where H_b exceeds 5% of the mean part's,
    negative curvatures counted as 0) scales the error by ``sqrt(max(1, R^2))`` (Birge
    1932, Phys. Rev. 40, 207). Where the model places the lines within the noise, R ~ 1 and the
    curvature's error stands; template mismatch, which pulls parts of the spectrum to different
    velocities (GALAH's four CCDs disagreed by 0.3-8 km/s where the curvature said 0.03-0.4),
    widens it.

    With ``latent_jacobian`` (``dm / dz`` (B, D, K) at the fitted latent, before the continuum:
    :func:`stellarfield.model.newton.latent_jacobian`) the error is also marginalised over the
    latent, fitted with the velocity: where a latent direction can mimic part of a shift (the broad
    Balmer lines of a hot star, with few metal lines to pin the velocity), the curvature at a fixed
    latent is too narrow. With the Gauss-Newton normal matrix ``N = J^T W J`` of ``(v, n)``, n the
    nuisance parameters fitted with it (latent and continuum coefficients; ``J``: the prediction's
    derivatives; the latent prior adds ``s^2 I`` to the latent block as in
    :mod:`~stellarfield.model.newton`, ``s^2 = chi2 / n``) the error grows by
    ``sqrt(N_vv / (N_vv - N_vn N_nn^-1 N_nv))`` (the Schur complement: the velocity's variance
    with the latent free, over its variance with it held), as :mod:`~stellarfield.model.predict`'s
    joint covariance gives it. NaN for products without an RV fit."""
    if obs.inst.rv_scan_kms <= 0:
        return torch.full((obs.batch.size,), float("nan"), dtype=torch.float64, device=obs.batch.u.device)
    from stellarfield.model.likelihood import evaluate

    with torch.no_grad():
        h = obs.sigma_v / 4
        fits = [evaluate(obs, coeffs, basis, obs.v + dv, var, blurred_basis) for dv in (-h, 0.0, h)]
        good = fits[0].good & fits[1].good & fits[2].good  # one set of pixels for all three chi2
        minus, centre, plus = (torch.where(good, (obs.batch.flux - f.prediction) ** 2 / var, 0.0).double()
                               for f in fits)
        slope = (plus - minus) / (2 * h)
        curve = (minus - 2 * centre + plus) / h**2
        curvature = curve.sum(-1)
        sigma = torch.where(curvature > 0, torch.sqrt(2.0 / curvature.clamp(min=1e-30)), float("inf"))
        sigma = sigma * torch.sqrt(_birge_ratio_squared(slope, curve, good, blocks).clamp(min=1.0))
        if latent_jacobian is not None:
            centre = fits[1]
            d_v = (fits[2].prediction - fits[0].prediction) / (2 * h)  # dp/dv per km/s, continuum re-fitted
            # the continuum's own columns (model x Legendre block), free with the latent
            model_flux = torch.where(centre.continuum != 0, centre.prediction / centre.continuum, 0.0)
            d_continuum = (model_flux[..., None] * obs.design).transpose(1, 2)
            d_z = latent_jacobian * centre.continuum[:, None, :]
            prior = torch.cat([(centre.chi2 / centre.n.clamp(min=1))[:, None].expand(-1, d_z.shape[1]),
                               torch.zeros_like(d_continuum[:, :, 0])], 1)
            sigma = sigma * _nuisance_inflation(d_v, torch.cat([d_z, d_continuum], 1),
                                                torch.where(good, 1.0 / var, 0.0), prior)
        return sigma


def _nuisance_inflation(d_v: torch.Tensor, d_n: torch.Tensor, weight: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
    """``sqrt(N_vv / (N_vv - N_vn N_nn^-1 N_nv))`` (B,) >= 1: how much freeing the nuisance parameters
    n (latent and continuum) widens the velocity's error (see :func:`velocity_error`); ``d_v`` (B, K)
    and ``d_n`` (B, P, K) the prediction's derivatives, ``weight`` (B, K) = good / var, ``prior``
    (B, P) the curvature each nuisance parameter's prior adds (0: none)."""
    d_v, d_n, weight = d_v.double(), d_n.double(), weight.double()
    n_vv = (weight * d_v * d_v).sum(-1)
    n_nv = torch.einsum("bpk,bk->bp", d_n, weight * d_v)
    n_nn = torch.einsum("bpk,bqk->bpq", d_n * weight[:, None, :], d_n)
    diagonal = torch.diagonal(n_nn, dim1=1, dim2=2)
    # + a trace of the diagonal (a continuum block of a segment with few good pixels is near-singular)
    # and 1 on empty columns (a segment without good pixels)
    n_nn = n_nn + torch.diag_embed(prior.double() + 1e-12 * diagonal + (diagonal <= 0).double())
    explained = (n_nv * torch.linalg.solve(n_nn, n_nv[..., None])[..., 0]).sum(-1)
    schur = (n_vv - explained).clamp(min=1e-12 * n_vv.clamp(min=1e-300))
    return torch.sqrt((n_vv / schur).clamp(min=1.0))


def _birge_ratio_squared(slope: torch.Tensor, curve: torch.Tensor, good: torch.Tensor, blocks: int) -> torch.Tensor:
    """R^2 (B,) of the blocks' own velocity offsets about the whole spectrum's (see :func:`velocity_error`);
    1 where fewer than two blocks carry lines."""
    n_good = good.sum(-1, keepdim=True).clamp(min=1)
    block = ((torch.cumsum(good, -1) - 1).clamp(min=0) * blocks // n_good).clamp(max=blocks - 1)
    block = torch.where(good, block, 0)
    g = torch.zeros(good.shape[0], blocks, dtype=torch.float64, device=good.device).scatter_add_(1, block, slope)
    c = torch.zeros_like(g).scatter_add_(1, block, torch.where(good, curve, 0.0))
    # a part without lines (curvature near 0) has no velocity of its own: it neither votes nor counts
    # as a degree of freedom, which would bias R^2 low
    used = c > MIN_BLOCK_CURVATURE_SHARE * c.clamp(min=0).sum(-1, keepdim=True) / blocks
    own = torch.where(used, -g / c.clamp(min=1e-30), 0.0)
    whole = -(g * used).sum(-1) / (c * used).sum(-1).clamp(min=1e-30)
    n = used.sum(-1)
    r2 = (torch.where(used, 0.5 * c * (own - whole[:, None]) ** 2, 0.0)).sum(-1) / (n - 1).clamp(min=1)
    return torch.where(n >= 2, r2, torch.ones_like(r2))
