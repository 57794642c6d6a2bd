"""Latents, velocities and goodness of fit for spectra held in a :class:`TrainingData` (no training).

Used by validation during training and by :func:`stellarfield.model.fit.fit_spectra`. For each
product the trunk is evaluated once on the instrument's whole model grid and blurred there
(blur-by-basis), then spectra are processed in chunks:

1. RV candidates: the highest peaks of the cross-correlation with the mean model (z = 0) over the
   instrument's scan range;
2. latent: the GON step (``method`` "gon" or "gon+refine", at the highest peak), the model's encoder
   ("encoder", "encoder+refine": one pass, :mod:`stellarfield.model.encoder`) or zero ("refine");
3. RV: a fine chi2 scan around every candidate against the model at that latent, the lowest chi2
   per pixel wins (:func:`stellarfield.model.rv.refine_velocity`); a GON or encoder latent is
   recomputed at the new velocity where it moved by more than the scan's half-width. With
   ``rv_search="ccf"`` this search (and the second one in step 4) is skipped: the highest peak is the
   start and the refinement steps move the velocity (the fast path of the encoder);
4. ``refine_steps`` Adam steps on latent and RV ("gon+refine", "refine"; or Gauss-Newton steps with
   ``refiner="gauss-newton"``, :mod:`stellarfield.model.newton`), in two halves with a second
   search between them: the peaks of the cross-correlation with the star's own model and the current
   velocity, each scanned against the star's model, the lowest chi2 wins; so a start on a wrong peak
   of the mean model is corrected, and a right one is not traded for a higher CCF peak;
5. chi2 with the survey's own errors, the RV uncertainty from the chi2 curvature, widened where
   the spectrum's parts disagree and marginalised over the latent
   (:func:`stellarfield.model.rv.velocity_error`).

``chi2_nu = sum_good ivar r^2 / (n_good - n_params)`` uses the survey's errors only (the learned
scatter is left out so the number says how well the model fits the data as published); for
products without errors (MILES) the learned scatter is the only noise there is and is used.
``n_params`` = latent dimension + continuum coefficients + 1 for the RV where fitted.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from stellarfield.model.batching import TrainingData
from stellarfield.model.decoder import combine
from stellarfield.model.encoder import encode
from stellarfield.model.newton import gauss_newton_latents, latent_jacobian
from stellarfield.model.latents import gon_latents, refine_latents
from stellarfield.model.likelihood import evaluate, mean_model, observe, survey_chi2, variance
from stellarfield.model.rv import SCAN_HALF_WIDTH_SIGMAS, ccf_candidates, refine_velocity, velocity_error
from stellarfield.model.stellar_model import StellarModel

METHODS = ("gon", "gon+refine", "refine", "encoder", "encoder+refine")
#: How the velocity is searched: "full" (multi-peak chi2 scans, see the module docstring) or "ccf".
RV_SEARCHES = ("full", "ccf")
#: How latent and velocity are refined: Adam steps, or Gauss-Newton steps (:mod:`stellarfield.model.newton`).
REFINERS = ("adam", "gauss-newton")
#: Padded pixels fitted together when ``chunk`` is not given (:func:`chunk_size`): spectra x pixels.
#: ``python benchmarks/fit_chunk.py DEMO DS`` (fixed chunks and this default side by side; 2 threads,
#: 100 Adam steps, full RV search): fewer pixels per chunk pay each step's fixed overhead on fewer
#: spectra (Gaia XP, 343 pixels: 11.4 ms per spectrum at 64, 3.5 ms at 764); more make temporaries
#: above glibc's 32 MB mmap threshold, page-faulted afresh on every use (GALAH, 16,385 pixels: 920 ms
#: at 64, half the CPU time in the kernel; 486 ms at 15). This budget was within noise of the best
#: fixed chunk on every product (docs/experiments.md, "Fitting: how many spectra at once").
PIXELS_PER_CHUNK = 2**18
#: At most this many spectra in a chunk (Gaia XP: 764 fill the pixel budget; this bounds products of fewer pixels).
MAX_CHUNK = 1024


def chunk_size(n_pixels: int, chunk: int | None = None) -> int:
    """Spectra fitted together: ``chunk`` when given, else :data:`PIXELS_PER_CHUNK` padded pixels'
    worth of spectra of ``n_pixels`` each (1 to :data:`MAX_CHUNK`). The results do not depend on it:
    every spectrum's fit is its own (the batch's loss is a sum over spectra)."""
    if chunk is not None:
        if chunk < 1:
            raise ValueError(f"chunk must be at least 1, got {chunk}")
        return int(chunk)
    return max(1, min(MAX_CHUNK, PIXELS_PER_CHUNK // max(1, n_pixels)))


@dataclass
class ProductResult:
    """Per-spectrum results of one product (numpy arrays, rows in the order of the ProductData)."""

    product: str
    keys: list[str]
    latent: np.ndarray  # (N, D)
    rv_kms: np.ndarray  # (N,) NaN where not fitted
    rv_err_kms: np.ndarray
    chi2_nu: np.ndarray
    n_pixels: np.ndarray  # good pixels used
    nll: np.ndarray
    prediction: list[np.ndarray] | None = None  # model * continuum at the native pixels, NaN where unused


def blurred_basis(model: StellarModel, product: str) -> torch.Tensor:
    """The trunk on the instrument's whole model grid, blurred by its LSF: (G, n_basis + 1)."""
    inst = model.instrument(product)
    view = inst.full_view()
    with torch.no_grad():
        dev = model.device
        return inst.blur(model.decoder.basis(inst.view_u(view).to(dev), inst.view_sigma_u(view).to(dev)), view, dim=0)


def infer(model: StellarModel, data: TrainingData, method: str = "gon+refine", refine_steps: int = 100,
          chunk: int | None = None, lr: float = 0.05, keep_prediction: bool = False,
          max_per_product: int | None = None, progress=None, rv_search: str = "full",
          refiner: str = "adam", per_product: dict[str, dict] | None = None,
          polish_steps: int = 0, start: torch.Tensor | None = None) -> dict[str, ProductResult]:
    """Fit every spectrum of ``data`` (see the module docstring). Returns one result per product.

    ``chunk``: spectra fitted together (default: by the product's pixels, :func:`chunk_size`).
    ``lr``: Adam's step size on the latent (``refiner="adam"``; Gauss-Newton steps need none).
    ``polish_steps``: Levenberg-Marquardt steps on latent and velocity after the refinement
    (:func:`~stellarfield.model.newton.gauss_newton_latents`; 0: none).
    ``start``: the latent (D,) every spectrum starts from with ``method="refine"`` (default 0).
    ``per_product``: per product name, any of ``refine_steps``, ``refiner``, ``lr``, ``rv_search``
    replacing the arguments for that product (an encoder's validated fit settings)."""
    defaults = {"refine_steps": refine_steps, "refiner": refiner, "lr": lr, "rv_search": rv_search}
    for setting in [defaults, *(per_product or {}).values()]:
        if setting.get("refiner", refiner) not in REFINERS:
            raise ValueError(f"unknown refiner {setting['refiner']!r}; choose one of {REFINERS}")
        if setting.get("rv_search", rv_search) not in RV_SEARCHES:
            raise ValueError(f"unknown rv_search {setting['rv_search']!r}; choose one of {RV_SEARCHES}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    if method.startswith("encoder") and model.encoder is None:
        raise ValueError(f"method {method!r} needs a model with an encoder; this one has none "
                         "(train with objective='encoder', or add one with stellarfield.model.amortise)")
    first_latent = _first_latent(method, start)
    results = {}
    for name, pd in data.products.items():
        inst = model.instrument(name)
        setting = {**defaults, **(per_product or {}).get(name, {})}
        steps = setting["refine_steps"] if method not in ("gon", "encoder") else 0
        rv_search = setting["rv_search"]
        basis = blurred_basis(model, name)

        def refine(z: torch.Tensor, n_steps: int, setting: dict = setting) -> torch.Tensor:  # obs: the chunk's
            if setting["refiner"] == "adam":
                return refine_latents(model, [obs], [basis], z, n_steps, lr=setting["lr"])
            return gauss_newton_latents(model, obs, basis, z, n_steps)

        with torch.no_grad():
            mean_grid = mean_model(model, basis)
        n = len(pd) if max_per_product is None else min(len(pd), max_per_product)
        out = {k: [] for k in ("latent", "rv", "rv_err", "chi2_nu", "n", "nll", "prediction")}
        rows = chunk_size(pd.u.shape[1], chunk)
        for start in range(0, n, rows):
            batch = pd.batch(torch.arange(start, min(start + rows, n))).to(model.device)
            obs = observe(model, batch, full_grid=True, mean_grid=mean_grid)
            z = first_latent(model, obs, basis)
            with torch.no_grad():
                var = variance(model, obs)
                v_start = obs.v
                if rv_search == "full":
                    obs.v = refine_velocity(obs, model.decoder.coefficients(z), basis, var, blurred_basis=True)
                obs.v_candidates = None  # tried; the second search starts from the star's own model
            moved = (obs.v - v_start).abs() > SCAN_HALF_WIDTH_SIGMAS * obs.sigma_v
            if method != "refine" and moved.any():  # the first latent again, at the velocity found
                z = torch.where(moved[:, None], first_latent(model, obs, basis), z)
            if steps:
                z = refine(z, steps - steps // 2)
                if inst.rv_scan_kms > 0 and rv_search == "full":  # second pass: CCF with the star's own model
                    with torch.no_grad():
                        coeffs = model.decoder.coefficients(z)
                        obs.v = refine_velocity(obs, coeffs, basis, var, blurred_basis=True,
                                                candidates=ccf_candidates(obs, combine(coeffs, basis), var))
                z = refine(z, steps // 2)
            if polish_steps:
                z = gauss_newton_latents(model, obs, basis, z, polish_steps)
            with torch.no_grad():
                coeffs = model.decoder.coefficients(z)
                fit = evaluate(obs, coeffs, basis, obs.v, var, blurred_basis=True)
                chi2, n_seg_used = survey_chi2(obs, fit, var)
                n_params = inst.fitted_parameters(model.latent_dim, n_seg_used, inst.rv_scan_kms > 0)
                dof = (fit.n - n_params).clamp(min=1)
                jacobian = latent_jacobian(model, obs, basis, z, obs.v) if inst.rv_scan_kms > 0 else None
                rv_err = velocity_error(obs, coeffs, basis, var, latent_jacobian=jacobian)
            host = lambda t: t.detach().cpu().numpy()
            out["latent"].append(host(z))
            out["rv"].append(host(obs.v) if inst.rv_scan_kms > 0 else np.full(batch.size, np.nan))
            out["rv_err"].append(host(rv_err))
            out["chi2_nu"].append(host(chi2 / dof))
            out["n"].append(host(fit.good.sum(-1)))
            out["nll"].append(host(fit.nll))
            if keep_prediction:
                lengths = torch.isfinite(batch.u).sum(-1)
                pred = torch.where(fit.good, fit.prediction, float("nan"))  # NaN: pixel not used
                out["prediction"].extend(host(pred[i, : lengths[i]]).copy() for i in range(batch.size))
            if progress is not None:
                progress.update(batch.size)
        cat = lambda k: np.concatenate(out[k]) if out[k] else np.zeros(0)
        results[name] = ProductResult(
            name, pd.keys[:n], np.concatenate(out["latent"]), cat("rv"), cat("rv_err"), cat("chi2_nu"), cat("n"),
            cat("nll"), out["prediction"] if keep_prediction else None,
        )
    return results


def _first_latent(method: str, start: torch.Tensor | None = None):
    """The starting latent of ``method``: a function (model, obs, blurred basis) -> z (B, D), detached
    (``start`` (D,), else zero, for "refine")."""
    if method.startswith("gon"):
        return lambda model, obs, basis: gon_latents(model, [obs], [basis], create_graph=False,
                                                     blurred_basis=True).detach()
    if method.startswith("encoder"):
        def from_encoder(model, obs, basis):
            with torch.no_grad():  # the pooling takes its own gradient inside
                return encode(model, [obs], [basis], blurred_basis=True)
        return from_encoder
    if start is not None:
        return lambda model, obs, basis: start.to(model.device, torch.float32).expand(obs.batch.size, -1).clone()
    return lambda model, obs, basis: torch.zeros(obs.batch.size, model.latent_dim, device=model.device)


def summarise(results: dict[str, ProductResult]) -> dict[str, dict]:
    """Per product: number of spectra, median and mean chi2_nu (finite values), median NLL."""
    summary = {}
    for name, r in results.items():
        finite = r.chi2_nu[np.isfinite(r.chi2_nu)]
        summary[name] = {
            "n": int(len(r.keys)),
            "chi2_nu_median": float(np.median(finite)) if finite.size else float("nan"),
            "chi2_nu_mean": float(np.mean(finite)) if finite.size else float("nan"),
            "nll_median": float(np.median(r.nll)) if r.nll.size else float("nan"),
        }
    return summary
