"""One star, two telescopes: fit one latent to all of a star's spectra, render it as another instrument sees it.

>>> from stellarfield.model.predict import predict
>>> p = predict("reference", read_spectra("stelib_HD002857.fits"), to="miles")       # doctest: +SKIP
>>> p.wavelength, p.flux, p.flux_lo, p.flux_hi, p.latent, p.rv_kms, p.chi2_nu        # doctest: +SKIP
>>> p.write("HD2857_as_miles.fits")                                                  # doctest: +SKIP

**The joint fit.** The spectra (any products, any number) are one star: ONE latent ``z`` is shared by
all of them, while each spectrum keeps its own radial velocity ``v_i`` and its own closed-form
continuum (:mod:`stellarfield.model.objectives`: each :class:`Observation` is a product's spectra,
bound to its instrument). The objective is the star's negative log posterior::

    L(z, v) = sum_i n_i * spectrum_loss_i(z, v_i)  -  (K - 1) * 0.5 |z|^2            ("logchi2")
            = sum_i (n_i / 2) ln(chi2_i / n_i)  +  0.5 |z|^2

(``n_i`` good pixels of spectrum i, K spectra: each spectrum's overall error scale is profiled out
as in training, the unit-normal prior on ``z`` is counted once; with the "nll" likelihood,
``sum_i n_i * spectrum_loss_i``). For one spectrum this is ``n`` times the loss that
:func:`~stellarfield.model.inference.infer` minimises, so the same latent comes out. The steps mirror
``infer``: RV candidates from the cross-correlation with the mean model (every spectrum), a latent
start (0, or the mean of the spectra's GON latents for a GON model), a chi2 scan for each spectrum's
RV, ``refine_steps`` Adam steps on ``(z, v_1..v_K)`` in two halves with a second RV search between
them (against the star's own model), then up to :data:`NEWTON_STEPS` safeguarded Newton steps with
the exact Hessian (so the Laplace approximation below is taken at the minimum, not where Adam
stopped: after 200 Adam steps the gradient was still far from 0 on a STELIB spectrum).

**The error band** (a Laplace approximation). ``H``, the Hessian of ``L`` in ``(z, v)`` at the
minimum (autograd, exact), gives the posterior covariance ``H^-1``; its latent block, marginalised
over the velocities, is :attr:`PredictedSpectrum.latent_cov`. ``n_samples`` latents drawn from
``N(z, cov)`` are rendered on the target grid; ``flux_lo`` / ``flux_hi`` are the 16th / 84th
percentiles of those spectra at each pixel, ``flux`` the spectrum of ``z`` itself. Because the
"logchi2" likelihood profiles each spectrum's error scale, the band is the one the errors would give
if they were rescaled to ``chi2_nu = 1`` (a MILES or STELIB spectrum, which has no errors, gets its
scale from its own residuals). The band covers the model's uncertainty about the star given these
spectra; not the model's own systematic error (what the decoder cannot represent), nor the target
instrument's noise. Where an eigenvalue of the Hessian is below the latent prior's curvature
(:func:`prior_curvature`: 1 for "logchi2"; a fit off the minimum, or a direction the spectra do
not constrain) it is raised to it, so no direction is wider than the prior, and the result says so
(``flags``: "hessian_clamped"). Measured on synthetic stars whose model is exact (a decoder's own
spectra plus Gaussian noise, ``tests/test_model_predict.py``): predicting one instrument from the
other, the band held the noiseless truth at 65% of the pixels over 40 stars, and the fitted
latents' Mahalanobis distances from the truth had the median of a chi2 with D degrees of freedom
(3.2 for D = 4). On real spectra the band is much narrower than the cross-prediction's error
(STELIB -> MILES with the reference model, 6 test stars: band 0.9% of the flux, RMS 2.9%): what the
decoder cannot represent dominates there, and no band from the latent alone shows it.

**The target.** ``to=PRODUCT`` renders on that product's typical native grid, through its LSF (a
product among the inputs that the model never saw gets an instrument built from those records, as
:func:`~stellarfield.model.fit.fit_spectra` does); ``to=PRODUCT`` with ``wave_grid`` renders through
its LSF at the given pixels (e.g. a real spectrum of that product, to compare); ``wave_range`` +
``resolution`` or ``wave_grid`` (+ ``resolution``) render on any grid with a Gaussian LSF, as
:func:`~stellarfield.model.generate.generate` does (the same :class:`RenderedBasis`). The flux is the
model's rest-frame flux (or at ``rv_kms``): for a continuum-normalised product's grid divided by a
pseudo-continuum as the survey normalises (as :func:`~stellarfield.model.generate.generate` does;
``normalise=False`` keeps the model's flux); for a fluxed product (MILES) its shape up to an overall
scale (no continuum is known for an instrument that did not observe the star). Pixels outside what
the model was trained on are NaN.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from stellarfield.atomic import atomic_path
from stellarfield.errors import StellarfieldError
from stellarfield.model.decoder import combine
from stellarfield.model.generate import (
    RenderedBasis,
    as_trained,
    mask_outside_coverage,
    normalise_like_the_survey,
    resolve_grid,
    trained_coverage,
)
from stellarfield.model.inference import blurred_basis
from stellarfield.model.instrument import instruments_for
from stellarfield.model.latents import gon_latents
from stellarfield.model.likelihood import (
    Observation,
    evaluate,
    mean_model,
    observe,
    spectrum_loss,
    survey_chi2,
    variance,
)
from stellarfield.model.rv import ccf_candidates, refine_velocity
from stellarfield.physics.doppler import rest_wavelength

#: Latents drawn from the Laplace posterior for the error band.
N_SAMPLES = 200
#: Newton steps after Adam, at most (each kept only if it lowers the loss; see _newton).
NEWTON_STEPS = 10
#: Band percentiles (1 sigma of a Gaussian).
BAND_PERCENTILES = (15.865, 84.135)


class PredictionError(StellarfieldError, ValueError):
    """Inputs a prediction cannot be made from (no spectrum, different stars, no usable pixel, a bad grid)."""


class DifferentStarsError(PredictionError):
    """The inputs name more than one star; ``stars`` maps each star id to its spectra's keys."""

    def __init__(self, message: str, stars: dict[str, list[str]]):
        super().__init__(message)
        self.stars = stars


@dataclass
class InputFit:
    """What the joint fit says about one input spectrum."""

    key: str
    product: str
    star_id: str | None
    rv_kms: float | None  # None where the product has no RV fit (Gaia XP, MILES)
    rv_err_kms: float | None  # 1 sigma, from the joint Laplace covariance (marginalised over z)
    chi2_nu: float  # with the survey's errors (MILES: the likelihood's), see predict()
    n_pixels: int  # good pixels used
    flags: list[str] = field(default_factory=list)


@dataclass
class PredictedSpectrum:
    """A star rendered on a target grid from its joint latent, with a 1-sigma band (see the module docstring)."""

    wavelength: np.ndarray  # (P,) vacuum A
    flux: np.ndarray  # (P,) the spectrum of the fitted latent
    flux_lo: np.ndarray  # (P,) 16th percentile of the spectra of latents drawn from the Laplace posterior
    flux_hi: np.ndarray  # (P,) 84th percentile
    latent: np.ndarray  # (D,)
    latent_cov: np.ndarray  # (D, D) Laplace covariance, marginalised over the inputs' velocities
    inputs: list[InputFit]
    grid: str  # "instrument:<name>", "instrument:<name>+pixels" or "custom"
    frame: str  # "rest" (the star's rest frame), or "observed" (rendered at render_rv_kms)
    resolution: float | None
    render_rv_kms: float  # the velocity the target spectrum is rendered at (0: rest frame)
    segment_names: list[str]
    segment_lengths: list[int]
    n_samples: int
    loss: float  # L at the fitted latent (see the module docstring)
    flags: list[str] = field(default_factory=list)

    @property
    def latent_err(self) -> np.ndarray:
        """1-sigma of each latent dimension (square root of the covariance's diagonal)."""
        return np.sqrt(np.clip(np.diag(self.latent_cov), 0, None))

    @property
    def rv_kms(self) -> np.ndarray:
        """Fitted velocity of each input (NaN where none is fitted)."""
        return np.array([np.nan if i.rv_kms is None else i.rv_kms for i in self.inputs])

    @property
    def rv_err_kms(self) -> np.ndarray:
        return np.array([np.nan if i.rv_err_kms is None else i.rv_err_kms for i in self.inputs])

    @property
    def chi2_nu(self) -> np.ndarray:
        return np.array([i.chi2_nu for i in self.inputs])

    def write(self, path: str | os.PathLike) -> Path:
        """Write to ``.fits`` (HDUs WAVELENGTH, FLUX, FLUX_LO, FLUX_HI, LATENT, LATENT_COV and an INPUTS
        table) or ``.parquet`` (one row per pixel; latent, covariance and inputs in the schema
        metadata under ``stellarfield``), atomically (temporary file + rename)."""
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix not in (".fits", ".fit", ".parquet"):
            raise PredictionError(f"unknown output format {path.suffix!r}: use .fits or .parquet")
        with atomic_path(path) as tmp:
            self._write(tmp, suffix)
        return path

    def _write(self, tmp: Path, suffix: str) -> None:
        inputs = [dataclasses.asdict(i) for i in self.inputs]
        if suffix in (".fits", ".fit"):
            from astropy.io import fits

            primary = fits.PrimaryHDU()
            h = primary.header
            h["ORIGIN"] = "stellarfield predict"
            h["GRID"] = self.grid
            h["FRAME"] = (self.frame, "rest frame of the star, or observed at RV_KMS")
            h["RESOLV"] = (self.resolution or -1.0, "Gaussian LSF resolving power (-1: instrument's)")
            h["RV_KMS"] = (self.render_rv_kms, "velocity the prediction is rendered at")
            h["NINPUT"] = (len(self.inputs), "spectra fitted jointly")
            h["NSAMPLE"] = (self.n_samples, "latents drawn for the band")
            h["BAND"] = ("16-84 percentile", "FLUX_LO / FLUX_HI")
            h["LOSS"] = (self.loss, "negative log posterior at LATENT")
            h["SEGMENTS"] = ",".join(f"{n}:{k}" for n, k in zip(self.segment_names, self.segment_lengths))
            h["FLAGS"] = ",".join(self.flags)
            cols = [
                fits.Column("KEY", "A200", array=[i.key for i in self.inputs]),
                fits.Column("PRODUCT", "A40", array=[i.product for i in self.inputs]),
                fits.Column("STAR_ID", "A80", array=[i.star_id or "" for i in self.inputs]),
                fits.Column("RV_KMS", "D", array=self.rv_kms),
                fits.Column("RV_ERR_KMS", "D", array=self.rv_err_kms),
                fits.Column("CHI2_NU", "D", array=self.chi2_nu),
                fits.Column("N_PIXELS", "K", array=[i.n_pixels for i in self.inputs]),
                fits.Column("FLAGS", "A200", array=[",".join(i.flags) for i in self.inputs]),
            ]
            hdus = [primary, fits.ImageHDU(self.wavelength, name="WAVELENGTH"),
                    fits.ImageHDU(self.flux.astype(np.float32), name="FLUX"),
                    fits.ImageHDU(self.flux_lo.astype(np.float32), name="FLUX_LO"),
                    fits.ImageHDU(self.flux_hi.astype(np.float32), name="FLUX_HI"),
                    fits.ImageHDU(self.latent.astype(np.float32), name="LATENT"),
                    fits.ImageHDU(self.latent_cov.astype(np.float64), name="LATENT_COV"),
                    fits.BinTableHDU.from_columns(cols, name="INPUTS")]
            hdus[1].header["BUNIT"] = "Angstrom (vacuum)"
            fits.HDUList(hdus).writeto(tmp, overwrite=True)
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.table({"wavelength": self.wavelength, "flux": self.flux.astype(np.float32),
                              "flux_lo": self.flux_lo.astype(np.float32), "flux_hi": self.flux_hi.astype(np.float32)})
            meta = {"grid": self.grid, "frame": self.frame, "resolution": self.resolution,
                    "render_rv_kms": self.render_rv_kms, "segment_names": self.segment_names,
                    "segment_lengths": self.segment_lengths, "n_samples": self.n_samples, "loss": self.loss,
                    "latent": self.latent.tolist(), "latent_cov": self.latent_cov.tolist(), "inputs": inputs,
                    "flags": self.flags}
            table = table.replace_schema_metadata({"stellarfield": json.dumps(meta, default=_json_number)})
            pq.write_table(table, tmp)


def _json_number(x):
    x = float(x)
    return x if math.isfinite(x) else None


# --- the inputs -------------------------------------------------------------------------------
def check_one_star(spectra: list) -> str | None:
    """The star all ``spectra`` are (resolved by name and position, :func:`~stellarfield.data.stars.resolve_star_ids`),
    or None where none names a star; a :class:`PredictionError` naming them where they are several."""
    from stellarfield.data.stars import identity_of, resolve_star_ids

    resolved = resolve_star_ids({str(i): identity_of(s) for i, s in enumerate(spectra)})
    stars: dict[str, list[str]] = {}
    for i, s in enumerate(spectra):
        star = resolved[str(i)]
        if star is not None:
            stars.setdefault(star, []).append(s.key)
    if len(stars) > 1:
        listed = "; ".join(f"{star}: {', '.join(keys[:2])}{' ...' if len(keys) > 2 else ''}"
                           for star, keys in sorted(stars.items()))
        raise DifferentStarsError(f"the inputs are {len(stars)} different stars ({listed}); a prediction fits one "
                                  "star (same_star=False fits them together anyway)", stars)
    return next(iter(stars), None)


def _prepare(model, spectra: list) -> tuple[list, dict, dict, dict]:
    """(records, {key: flags}, instruments incl. new ones, {key: star_id}): non-finite pixels and pixels
    outside the trained wavelengths masked on copies, products the model never saw observed through
    an instrument built from the records (as :func:`~stellarfield.model.fit.fit_spectra` does)."""
    from stellarfield.model.fit import _sanitise

    instruments = instruments_for(model, spectra)
    new = set(instruments) - set(model.instruments)
    cover = trained_coverage(model)
    records, flags = [], {}
    for s in spectra:
        s, f = _sanitise(s)
        masked = mask_outside_coverage(s, cover)
        if masked is not s:
            s = masked
            f.append("pixels_outside_training_range")
        if s.product in new:
            f.append("new_instrument")
        if s.key in flags:
            raise PredictionError(f"the spectrum {s.key} is given twice")
        flags[s.key] = f
        records.append(s)
    return records, flags, instruments, {s.key: s.star_id for s in spectra}


# --- the joint fit ----------------------------------------------------------------------------
@dataclass
class _Joint:
    """The star's observations (one per product), their blurred bases and variances."""

    observations: list[Observation]
    bases: list[torch.Tensor]
    variances: list[torch.Tensor]

    @property
    def n_spectra(self) -> int:
        return sum(o.batch.size for o in self.observations)

    @property
    def fits_rv(self) -> list[bool]:
        return [o.inst.rv_scan_kms > 0 for o in self.observations]


def joint_loss(model, joint: _Joint, z: torch.Tensor, dv: list[torch.Tensor | None]):
    """``L(z, v)`` (see the module docstring) for one latent ``z`` (D,) and velocity offsets ``dv``
    (per observation: (B,) in units of its LSF sigma, or None where no RV is fitted). Returns
    ``(L, [FitResult per observation])``."""
    coeffs = model.decoder.coefficients(z[None])
    total = z.new_zeros((), dtype=torch.float64)
    fits = []
    for obs, basis, var, d in zip(joint.observations, joint.bases, joint.variances, dv):
        b = obs.batch.size
        v = obs.v if d is None else obs.v + d * obs.sigma_v
        fit = evaluate(obs, coeffs.expand(b, -1), basis, v, var, blurred_basis=True)
        per_pixel = spectrum_loss(model, fit, z[None].expand(b, -1))
        total = total + (fit.n.to(per_pixel.dtype) * per_pixel).double().sum()
        fits.append(fit)
    if model.likelihood["loss"] == "logchi2":  # the prior once, not once per spectrum
        total = total - (joint.n_spectra - 1) * 0.5 * (z.double() ** 2).sum()
    return total, fits


def _offsets(joint: _Joint, device, requires_grad: bool) -> list[torch.Tensor | None]:
    return [torch.zeros(o.batch.size, dtype=torch.float64, device=device, requires_grad=requires_grad)
            if fits else None for o, fits in zip(joint.observations, joint.fits_rv)]


def _apply_offsets(joint: _Joint, dv: list[torch.Tensor | None]) -> None:
    for obs, d in zip(joint.observations, dv):
        if d is not None:
            obs.v = (obs.v + d.detach() * obs.sigma_v).clamp(-obs.inst.rv_scan_kms, obs.inst.rv_scan_kms)


def refine_joint(model, joint: _Joint, z: torch.Tensor, steps: int, lr: float = 0.05) -> torch.Tensor:
    """``steps`` Adam steps on the shared latent ``z`` (D,) and every spectrum's velocity, minimising
    :func:`joint_loss` (the joint counterpart of :func:`~stellarfield.model.latents.refine_latents`,
    whose latents are one per spectrum). Velocities are updated in place in each ``obs.v``. The loss
    is divided by the number of good pixels, so the step sizes are those of ``refine_latents``."""
    if steps <= 0:
        return z.detach()
    with torch.enable_grad():
        z = z.detach().clone().requires_grad_(True)
        dv = _offsets(joint, z.device, True)
        opt = torch.optim.Adam([z] + [d for d in dv if d is not None], lr=lr)
        with torch.no_grad():
            _, fits = joint_loss(model, joint, z, dv)
            scale = 1.0 / max(float(sum(f.n.sum() for f in fits)), 1.0)
        for _ in range(steps):
            opt.zero_grad()
            loss, _ = joint_loss(model, joint, z, dv)
            (loss * scale).backward()
            opt.step()
    _apply_offsets(joint, dv)
    return z.detach()


def hessian(model, joint: _Joint, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(H, g, L)``: Hessian (D + V, D + V) and gradient of :func:`joint_loss` in ``(z, dv)`` at the
    current velocities (``dv`` in units of each spectrum's LSF sigma, V = spectra with an RV fit),
    float64 on the host. Exact second derivatives by autograd (one backward pass per parameter)."""
    with torch.enable_grad():
        zz = z.detach().clone().requires_grad_(True)
        dv = _offsets(joint, z.device, True)
        params = [zz] + [d for d in dv if d is not None]
        loss, _ = joint_loss(model, joint, zz, dv)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        g = torch.cat([x.reshape(-1).double() for x in grads])
        rows = []
        for i in range(g.numel()):
            second = torch.autograd.grad(g[i], params, retain_graph=i < g.numel() - 1, allow_unused=True)
            rows.append(torch.cat([torch.zeros(p.numel(), dtype=torch.float64, device=p.device) if s is None
                                   else s.reshape(-1).double() for s, p in zip(second, params)]))
        h = torch.stack(rows)
    h = 0.5 * (h + h.T)
    return h.detach().cpu(), g.detach().cpu(), float(loss.detach())


def prior_curvature(model, n_pixels: float) -> float:
    """Curvature of the latent prior term of :func:`joint_loss` in each latent direction: 1 with the
    "logchi2" likelihood (``0.5 |z|^2``), ``2 latent_l2 N`` with "nll" (N good pixels in all)."""
    if model.likelihood["loss"] == "logchi2":
        return 1.0
    return max(2.0 * float(model.likelihood["latent_l2"]) * n_pixels, 1e-6)


def _clamped_inverse(h: torch.Tensor, floor: float) -> tuple[torch.Tensor, bool]:
    """``H^-1`` with every eigenvalue of ``H`` raised to at least ``floor`` (no direction is more
    uncertain than the latent prior allows); True where an eigenvalue was raised."""
    evals, evecs = torch.linalg.eigh(h)
    clamped = bool((evals < floor).any())
    return (evecs / evals.clamp(min=floor)) @ evecs.T, clamped


def _split_step(joint: _Joint, step: torch.Tensor, d_lat: int, z: torch.Tensor):
    """A flat step over ``(z, dv)`` as ``(dz, [dv per observation or None])``."""
    dz = step[:d_lat].to(z.dtype).to(z.device)
    dv, j = [], d_lat
    for obs, fits in zip(joint.observations, joint.fits_rv):
        if fits:
            b = obs.batch.size
            dv.append(step[j: j + b].to(obs.v.device))
            j += b
        else:
            dv.append(None)
    return dz, dv


def _newton(model, joint: _Joint, z: torch.Tensor, steps: int, floor: float):
    """Up to ``steps`` Newton steps on ``(z, dv)`` with the exact Hessian, made safe where it is not
    positive definite (eigenvalues replaced by ``max(|lambda|, floor) + mu``, Levenberg-Marquardt
    damping ``mu``; a step is kept only if the loss falls); stops once the step is below 1e-3 of the
    posterior width. Returns ``(z, H, L)`` at the final point."""
    d_lat = z.numel()
    h, g, loss = hessian(model, joint, z)
    mu = 0.0
    for _ in range(steps):
        evals, evecs = torch.linalg.eigh(h)
        moved = False
        for _try in range(6):
            scale = evals.abs().clamp(min=floor) + mu
            step = -(evecs @ ((evecs.T @ g) / scale))
            dz, dv = _split_step(joint, step, d_lat, z)
            with torch.no_grad():
                trial, _ = joint_loss(model, joint, z + dz, dv)
            trial = float(trial)
            if math.isfinite(trial) and trial < loss:
                z = z + dz
                _apply_offsets(joint, dv)
                mu = mu / 4
                moved = True
                break
            mu = max(4 * mu, floor)
        if not moved:
            break
        small = float((step * step * scale).sum()) < 1e-6  # the step in units of the posterior width
        h, g, loss = hessian(model, joint, z)
        if small:
            break
    return z, h, loss


def _observations(model, data) -> _Joint:
    observations, bases, variances = [], [], []
    dev = model.device
    for name, pd in data.products.items():
        basis = blurred_basis(model, name)
        with torch.no_grad():
            mean_grid = mean_model(model, basis)
            batch = pd.batch(torch.arange(len(pd))).to(dev)
            obs = observe(model, batch, full_grid=True, mean_grid=mean_grid)
            variances.append(variance(model, obs).detach())
        observations.append(obs)
        bases.append(basis)
    return _Joint(observations, bases, variances)


def fit_star(model, data, method: str = "refine", refine_steps: int = 200, lr: float = 0.05,
             newton_steps: int = NEWTON_STEPS) -> dict:
    """The joint fit of one star's spectra held in a :class:`TrainingData` (see the module docstring).

    Returns ``{"z", "cov" (D, D), "cov_full", "hessian", "loss", "joint", "clamped"}``; the velocities
    are in ``joint.observations[k].v``."""
    joint = _observations(model, data)
    dev = model.device
    if method.startswith("gon"):
        z = gon_latents(model, joint.observations, joint.bases, create_graph=False, blurred_basis=True).detach().mean(0)
    else:
        z = torch.zeros(model.latent_dim, device=dev)
    with torch.no_grad():
        for obs, basis, var in zip(joint.observations, joint.bases, joint.variances):
            coeffs = model.decoder.coefficients(z[None]).expand(obs.batch.size, -1)
            obs.v = refine_velocity(obs, coeffs, basis, var, blurred_basis=True)
            obs.v_candidates = None
    z = refine_joint(model, joint, z, refine_steps - refine_steps // 2, lr)
    with torch.no_grad():  # second RV search: the cross-correlation with the star's own model
        for obs, basis, var in zip(joint.observations, joint.bases, joint.variances):
            if obs.inst.rv_scan_kms > 0:
                coeffs = model.decoder.coefficients(z[None]).expand(obs.batch.size, -1)
                own = combine(coeffs, basis)
                obs.v = refine_velocity(obs, coeffs, basis, var, blurred_basis=True,
                                        candidates=ccf_candidates(obs, own, var))
    z = refine_joint(model, joint, z, refine_steps // 2, lr)
    n_pixels = float(sum(o.batch.good.sum() for o in joint.observations))
    floor = prior_curvature(model, n_pixels)
    z, h, loss = _newton(model, joint, z, newton_steps, floor)
    cov_full, clamped = _clamped_inverse(h, floor)
    d = model.latent_dim
    return {"z": z.detach(), "cov": cov_full[:d, :d], "cov_full": cov_full, "hessian": h, "loss": loss,
            "joint": joint, "clamped": clamped}


def _input_results(model, joint: _Joint, z: torch.Tensor, cov_full: torch.Tensor, data, flags: dict,
                   star_ids: dict) -> list[InputFit]:
    """Per input: velocity and its error (from the joint covariance), chi2_nu with the survey's errors.

    ``chi2_nu = chi2 / (n - p)`` with ``p`` = continuum coefficients of the segments used + 1 for a
    fitted RV + the latent dimension x this spectrum's share of all good pixels (the latent is fitted
    once for all inputs)."""
    d = model.latent_dim
    with torch.no_grad():
        _, fits = joint_loss(model, joint, z, [None] * len(joint.observations))
    n_all = max(float(sum(f.n.sum() for f in fits)), 1.0)
    out, j = {}, d
    for obs, fit, pd, var in zip(joint.observations, fits, data.products.values(), joint.variances):
        inst = obs.inst
        chi2, n_seg = survey_chi2(obs, fit, var)
        n_cont = int(obs.design.shape[-1] // len(inst.segments))
        n_good = fit.good.sum(-1)
        p = d * n_good.double() / n_all + n_cont * n_seg + (1 if inst.rv_scan_kms > 0 else 0)
        chi2_nu = (chi2.double() / (n_good.double() - p).clamp(min=1)).cpu().numpy()
        for i, key in enumerate(pd.keys):
            rv = rv_err = None
            if inst.rv_scan_kms > 0:
                rv = float(obs.v[i])
                rv_err = float(math.sqrt(max(float(cov_full[j, j]), 0.0)) * obs.sigma_v)
                j += 1
            out[key] = InputFit(key, inst.name, star_ids.get(key), rv, rv_err, float(chi2_nu[i]), int(n_good[i]),
                                list(flags.get(key, [])))
    return out


# --- the target grid --------------------------------------------------------------------------
def _target(model, to, wave_range, resolution, wave_grid):
    """(instrument, pixel wavelengths per segment, segment names, grid name)."""
    try:
        if to is not None and wave_grid is not None:  # the instrument's LSF at the caller's pixels
            if resolution is not None:
                raise PredictionError("to= renders through that instrument's own LSF; resolution is for "
                                      "wave_range / wave_grid without to=")
            inst = model.instrument(to)
            grid = np.asarray(wave_grid, dtype=np.float64).ravel()
            if grid.size < 2 or not np.all(np.isfinite(grid)) or not np.all(np.diff(grid) > 0):
                raise PredictionError("wave_grid must be >= 2 finite, increasing vacuum wavelengths in A")
            u = np.log(grid)
            # each pixel to the segment whose pixel range holds it (else the nearest one)
            distance = np.stack([np.where((u >= s.pixel_u_min) & (u <= s.pixel_u_max), 0.0,
                                          np.minimum(abs(u - s.pixel_u_min), abs(u - s.pixel_u_max)))
                                 for s in inst.segments])
            owner = distance.argmin(0)
            if np.any(np.diff(owner) < 0):
                raise PredictionError(f"wave_grid: the pixels of {to}'s segments must come in the segments' order")
            keep = [k for k in range(len(inst.segments)) if (owner == k).any()]
            wavelengths = [grid[owner == k] for k in keep]
            if keep != list(range(len(inst.segments))):
                inst = dataclasses.replace(inst, segments=[inst.segments[k] for k in keep])
            return inst, wavelengths, inst.segment_names, f"instrument:{to}+pixels"
        if to is not None and (wave_range is not None or resolution is not None):
            raise PredictionError("give to= (that instrument's grid and LSF), or wave_range + resolution, not both")
        return resolve_grid(model, to, wave_range, resolution, wave_grid)
    except KeyError as exc:
        raise PredictionError(str(exc.args[0]) if exc.args else str(exc)) from None
    except PredictionError:
        raise
    except ValueError as exc:
        if type(exc).__name__ == "OutOfRangeError":
            raise
        raise PredictionError(str(exc)) from None


def _outside_coverage(model, wavelength: np.ndarray, rv_kms: float) -> np.ndarray:
    """True at output pixels whose rest wavelength the model was not trained on."""
    rest = rest_wavelength(wavelength, rv_kms)
    ok = np.zeros(len(wavelength), dtype=bool)
    for lo, hi in trained_coverage(model):
        ok |= (rest >= lo * (1 - 2e-3)) & (rest <= hi * (1 + 2e-3))
    return ~ok


# --- the API ----------------------------------------------------------------------------------
@dataclass
class StarFit:
    """One star's joint fit (:func:`fit_star_spectra`): its latent, Laplace covariance and inputs;
    :meth:`render` shows it on any target grid."""

    trained: object  # TrainedModel
    instruments: dict  # the model's and those built for inputs of products it never saw
    latent: np.ndarray  # (D,)
    latent_cov: np.ndarray  # (D, D)
    inputs: list[InputFit]
    loss: float
    flags: list[str] = field(default_factory=list)

    @property
    def latent_err(self) -> np.ndarray:
        return np.sqrt(np.clip(np.diag(self.latent_cov), 0, None))

    def render(self, to: str | None = None, *, wave_range=None, resolution: float | None = None, wave_grid=None,
               rv_kms: float | None = None, n_samples: int = N_SAMPLES, seed: int = 0,
               normalise: bool | None = None) -> PredictedSpectrum:
        """The star on a target grid (see the module docstring), with the 16-84% band of ``n_samples``
        latents drawn from ``N(latent, latent_cov)`` (0: no band, lo = hi = flux). ``normalise``:
        divide by a pseudo-continuum as the survey does (:func:`~stellarfield.model.generate.normalise_like_the_survey`,
        each drawn spectrum apart); None: where the target is a continuum-normalised product's
        instrument, as :func:`~stellarfield.model.generate.generate` does."""
        m = self.trained.model.with_instruments(self.instruments)
        inst, wavelengths, names, grid_name = _target(m, to, wave_range, resolution, wave_grid)
        basis = RenderedBasis.build(m, inst, wavelengths)
        z = torch.as_tensor(self.latent, dtype=torch.float64)
        latents = [z[None]]
        if n_samples > 0:
            g = torch.Generator().manual_seed(seed)
            evals, evecs = torch.linalg.eigh(torch.as_tensor(self.latent_cov, dtype=torch.float64))
            root = evecs * evals.clamp(min=0).sqrt()
            eps = torch.randn(n_samples, len(z), generator=g, dtype=torch.float64)
            latents.append(z[None] + eps @ root.T)
        zs = torch.cat(latents).float()
        rv = None if rv_kms is None else torch.full((len(zs),), float(rv_kms), dtype=torch.float64)
        with torch.no_grad():
            coeffs = m.decoder.coefficients(zs.to(m.device)).cpu()
            flux = basis.spectra(coeffs, rv).numpy().astype(np.float64)
        wavelength = np.concatenate(wavelengths)
        flags = list(self.flags)
        outside = _outside_coverage(m, wavelength, float(rv_kms or 0.0))
        if outside.any():
            flux[:, outside] = np.nan
            flags.append("pixels_outside_training_range")
        if normalise is None:
            normalise = inst.normalisation == "continuum" and grid_name.startswith("instrument:")
        if normalise:
            flux = normalise_like_the_survey(flux, wavelengths, inst.continuum_degree).astype(np.float64)
            flags.append("pseudo_continuum_normalised")
        best = flux[0]
        with np.errstate(all="ignore"):
            lo, hi = (np.nanpercentile(flux[1:], BAND_PERCENTILES, axis=0) if n_samples > 0
                      else (best.copy(), best.copy()))
        if inst.name not in m.instruments and grid_name.startswith("instrument:"):
            flags.append("new_instrument")
        return PredictedSpectrum(
            wavelength=wavelength, flux=best, flux_lo=lo, flux_hi=hi, latent=self.latent.copy(),
            latent_cov=self.latent_cov.copy(), inputs=list(self.inputs), grid=grid_name,
            frame="rest" if rv_kms is None else "observed",
            resolution=resolution, render_rv_kms=float(rv_kms or 0.0), segment_names=list(names),
            segment_lengths=[len(w) for w in wavelengths], n_samples=int(n_samples), loss=self.loss, flags=flags,
        )


def fit_star_spectra(model, spectra, *, method: str | None = None, refine_steps: int = 200, lr: float = 0.05,
                     same_star: bool = True, newton_steps: int = NEWTON_STEPS) -> StarFit:
    """Fit one latent to all ``spectra`` of one star (see the module docstring and :func:`predict`)."""
    from stellarfield.model.batching import TrainingData

    trained = as_trained(model)
    m = trained.model
    spectra = list(spectra)
    if not spectra:
        raise PredictionError("no spectrum to fit: a prediction needs at least one spectrum of the star")
    if same_star:
        check_one_star(spectra)
    if method is None:
        from stellarfield.model.fit import default_method

        method = default_method(trained)
    if method not in ("refine", "gon+refine"):
        raise PredictionError(f"unknown method {method!r}; choose 'refine' or 'gon+refine'")
    records, flags, instruments, star_ids = _prepare(m, spectra)
    m = m.with_instruments(instruments)
    data = TrainingData(records, instruments=instruments)
    unusable = {k for pd in data.products.values() for k, ok in zip(pd.keys, pd.good.any(1).tolist()) if not ok}
    for key in unusable:
        flags[key].append("no_usable_pixels")
    if len(unusable) == len(records):
        raise PredictionError(f"no usable pixel in any of the {len(records)} input spectra "
                              "(all masked, or outside the wavelengths the model was trained on)")
    if unusable:
        data = TrainingData([s for s in records if s.key not in unusable], instruments=instruments)
    result = fit_star(m, data, method, refine_steps, lr, newton_steps)
    by_key = _input_results(m, result["joint"], result["z"], result["cov_full"], data, flags, star_ids)
    inputs = [by_key.get(s.key) or InputFit(s.key, s.product, star_ids.get(s.key), None, None, float("nan"), 0,
                                            flags[s.key]) for s in records]
    return StarFit(trained, instruments, result["z"].detach().cpu().double().numpy(),
                   result["cov"].double().numpy(), inputs, float(result["loss"]),
                   ["hessian_clamped"] if result["clamped"] else [])


def predict(model, spectra, to: str | None = None, *, wave_range=None, resolution: float | None = None,
            wave_grid=None, rv_kms: float | None = None, method: str | None = None, refine_steps: int = 200,
            lr: float = 0.05, n_samples: int = N_SAMPLES, seed: int = 0, same_star: bool = True,
            newton_steps: int = NEWTON_STEPS, normalise: bool | None = None) -> PredictedSpectrum:
    """Fit one latent to all ``spectra`` of one star and render it on a target grid, with a 1-sigma band.

    Args:
        model: run folder, ``"reference"``, :class:`TrainedModel` or :class:`RunResult`.
        spectra: the star's spectra (an iterable of Spectrum; any products, observed or rest frame).
        to | wave_range (+ resolution) | wave_grid (+ resolution) | to + wave_grid: the target (see the
            module docstring).
        rv_kms: render at this velocity (default: the star's rest frame).
        method: "refine" (latent from 0) or "gon+refine" (from the mean GON latent); default as
            :func:`~stellarfield.model.fit.fit_spectra` chooses (by the run's objective).
        refine_steps: Adam steps on the latent and the velocities.
        n_samples: latents drawn from the Laplace posterior for the band (0: no band, lo = hi = flux).
        seed: of those draws.
        same_star: refuse spectra that name different stars (:func:`check_one_star`).
        newton_steps: Newton steps after Adam, at most.
        normalise: divide by a pseudo-continuum as the survey does (None: for a continuum-normalised
            product's grid, as :func:`~stellarfield.model.generate.generate` does; see :meth:`StarFit.render`).

    Equivalent to ``fit_star_spectra(model, spectra, ...).render(to, ...)``; the target is checked
    before anything is fitted.
    """
    trained = as_trained(model)
    spectra = list(spectra)
    m = trained.model.with_instruments(instruments_for(trained.model, spectra))
    _target(m, to, wave_range, resolution, wave_grid)  # a bad target fails before the fit
    fit = fit_star_spectra(trained, spectra, method=method, refine_steps=refine_steps, lr=lr, same_star=same_star,
                           newton_steps=newton_steps)
    return fit.render(to, wave_range=wave_range, resolution=resolution, wave_grid=wave_grid, rv_kms=rv_kms,
                      n_samples=n_samples, seed=seed, normalise=normalise)
