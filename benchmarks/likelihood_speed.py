"""Speed of the likelihood's closed-form continuum: the old dense solve vs the per-segment one.

    python benchmarks/likelihood_speed.py [--model reference] [--batch 64] [--repeats 7] [--threads 1]

For the APOGEE apStar grid (8,575 pixels, 3 chips) and the GALAH DR3 grid (4 CCDs x 4,096 pixels;
once all spectra on one grid, once each on its own, as real DR3 spectra are) it builds a batch of ``--batch`` spectra the way inference does (Spectrum records ->
:class:`~stellarfield.model.batching.ProductData` -> ``batch`` -> :func:`observe`), with data made
by the model itself (a random latent, a random smooth continuum per segment, 1% noise), and times
forward + backward of :func:`~stellarfield.model.likelihood.likelihood` (loss: the default
``spectrum_loss`` summed over the batch, differentiated w.r.t. the model flux) for

* ``old``: the dense solve used before (``fit_multiplicative_continuum`` on the ``(B, K, n_seg (d+1))``
  block design, everything cast to float64 per call), the library's likelihood with that solve
  patched in;
* ``new``: the library's :func:`likelihood` (per-segment sums, :func:`fit_segment_continuum`),

interleaved in one process, best of ``--repeats``; also the whole chain (:func:`evaluate`: latent ->
pixels -> likelihood, forward + backward w.r.t. the latent) with the new likelihood for scale. It prints
ms per call, the ratio, and the largest relative differences of chi2, continuum and the gradient
(of the likelihood's float32 results, and of the float64 solve itself).

Measured (2026-12-01, one thread, 2-core machine, best of 7, reference model): APOGEE 195 -> 14.7
ms (x13.3), GALAH one grid 337 -> 26.7 ms (x12.6), GALAH own grids 340 -> 37.8 ms (x9.0); chi2,
continuum and gradient bit-identical in float32, the float64 continuum within 1.4e-14.
"""

from __future__ import annotations

import argparse
import sys
from unittest import mock
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate_speed import record  # noqa: E402

from stellarfield.eval.speed import best_seconds  # noqa: E402
from stellarfield.model import load_model  # noqa: E402
from stellarfield.model.batching import ProductData  # noqa: E402
from stellarfield.model.inference import blurred_basis  # noqa: E402
import stellarfield.model.likelihood as likelihood_module  # noqa: E402
from stellarfield.model.likelihood import (FitResult, evaluate, likelihood, model_at_pixels, observe,  # noqa: E402
                                           spectrum_loss, variance)
from stellarfield.physics.continuum import fit_multiplicative_continuum, fit_segment_continuum  # noqa: E402


def old_likelihood(obs, model_flux, inside, var) -> FitResult:
    """The library's :func:`likelihood` with the continuum solved as before the per-segment sums:
    ``fit_multiplicative_continuum`` on the dense block design, everything cast to float64 per call."""
    def dense(flux, model, weight, _basis):
        return fit_multiplicative_continuum(flux.double(), model.double(), weight.double(), obs.design.double())

    with mock.patch.object(likelihood_module, "fit_segment_continuum", dense):
        return likelihood(obs, model_flux, inside, var)


def make_observation(model, product: str, n: int, seed: int, own_grids: bool = False):
    """A batch of ``n`` model spectra (random latent x random smooth continuum x 1% noise) on the
    instrument's native pixels (``own_grids``: each spectrum's wavelengths scaled by its own
    1 + 2e-5 i, as GALAH DR3 spectra each have their own grid), observed as inference does; also the
    blurred basis and a second latent to score."""
    inst = model.instrument(product)
    segments = [(seg.name, seg.native_wavelength()) for seg in inst.segments]  # its own segments, as generate_speed
    spectra = []
    for i in range(n):
        stretch = 1 + 2e-5 * i if own_grids else 1.0
        s = record(product, [(name, wave * stretch) for name, wave in segments])
        s.object_id = f"bench{i}"
        spectra.append(s)
    pd = ProductData(inst, spectra)
    batch = pd.batch(torch.arange(n))
    g = torch.Generator().manual_seed(seed)
    basis = blurred_basis(model, product)
    obs = observe(model, batch, full_grid=True, v_init=torch.zeros(n, dtype=torch.float64))
    with torch.no_grad():
        z_true = 0.5 * torch.randn(n, model.latent_dim, generator=g)
        flux, _ = model_at_pixels(obs, model.decoder.coefficients(z_true), basis, obs.v, blurred_basis=True)
        x = torch.rand(n, 1, generator=g) * 0 + torch.linspace(-1, 1, flux.shape[1])  # a smooth trend
        cont = 1e3 * (1 + 0.2 * torch.randn(n, 1, generator=g) * x + 0.1 * torch.randn(n, 1, generator=g) * x**2)
        data = flux * cont * (1 + 0.01 * torch.randn(flux.shape, generator=g))
    batch.flux = torch.where(batch.good, data, 0.0).float()
    batch.ivar = torch.where(batch.good, 1 / (0.01 * data.abs().clamp(min=1e-3)) ** 2, 0.0).float()
    batch.scale = torch.where(batch.good, batch.flux.abs(), float("nan")).nanmedian(1).values
    obs = observe(model, batch, full_grid=True, v_init=torch.zeros(n, dtype=torch.float64))
    z = (z_true + 0.1 * torch.randn(n, model.latent_dim, generator=g))
    return obs, basis, z


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="reference")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_model(args.model).model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    cases = {"apogee": ("apogee_apstar", False), "galah": ("galah_dr3", False), "galah*": ("galah_dr3", True)}
    print(f"torch threads: {torch.get_num_threads()}, batch {args.batch}; galah*: each spectrum on its own grid")
    for key, (product, own_grids) in cases.items():
        obs, basis, z = make_observation(model, product, args.batch, seed=len(key), own_grids=own_grids)
        with torch.no_grad():
            var = variance(model, obs)
            flux0, inside = model_at_pixels(obs, model.decoder.coefficients(z), basis, obs.v, blurred_basis=True)

        def step(fn):
            flux = flux0.clone().requires_grad_(True)
            fit = fn(obs, flux, inside, var)
            spectrum_loss(model, fit, z).sum().backward()
            return fit, flux.grad

        def chain():
            zz = z.clone().requires_grad_(True)
            fit = evaluate(obs, model.decoder.coefficients(zz), basis, obs.v, var, blurred_basis=True)
            spectrum_loss(model, fit, zz).sum().backward()

        old = lambda: step(old_likelihood)
        new = lambda: step(likelihood)
        old(), new(), chain()  # warm up (the new path builds its per-segment basis on the first call)
        times = {"old": [], "new": [], "chain": []}
        for _ in range(args.repeats):  # interleaved: both see the same machine load
            times["old"].append(best_seconds(old, 1))
            times["new"].append(best_seconds(new, 1))
            times["chain"].append(best_seconds(chain, 1))
        t_old, t_new, t_chain = (1e3 * min(times[k]) for k in ("old", "new", "chain"))
        (fit_o, grad_o), (fit_n, grad_n) = old(), new()
        rel = lambda a, b: float(((a.detach().double() - b.detach().double()).abs() / b.detach().double().abs().clamp(min=1e-300)).max())
        good = fit_o.good
        grad_scale = grad_o.double().abs().amax(-1, keepdim=True)
        d_grad = float(((grad_n.double() - grad_o.double()).abs() / grad_scale).max())
        d_grad_pix = rel(grad_n[good & (grad_o.abs() > 1e-3 * grad_scale)], grad_o[good & (grad_o.abs() > 1e-3 * grad_scale)])
        with torch.no_grad():  # the solve itself, float64, before the likelihood rounds the continuum to float32
            flux = torch.where(good, flux0, 0.0)
            weight = torch.where(good, 1 / var, 0.0)
            c_old, cont_old = fit_multiplicative_continuum(obs.batch.flux.double(), flux.double(), weight.double(),
                                                           obs.design.double())
            c_new, cont_new = fit_segment_continuum(obs.batch.flux, flux, weight, obs.continuum_basis())
        n_seg, degree = len(obs.inst.segments), obs.inst.continuum_degree
        print(f"{key:7s} {product:14s} {obs.batch.flux.shape[1]:6d} px, {n_seg} segments, degree {degree}: "
              f"likelihood fwd+bwd old {t_old:7.2f} ms  new {t_new:7.2f} ms  ratio {t_old / t_new:5.2f}   "
              f"(whole chain latent -> loss with new: {t_chain:.2f} ms)")
        print(f"{'':7s} max rel diff: chi2 {rel(fit_n.chi2, fit_o.chi2):.2e}  continuum "
              f"{rel(fit_n.continuum[good], fit_o.continuum[good]):.2e}  grad {d_grad:.2e} (of each spectrum's largest), "
              f"{d_grad_pix:.2e} (per pixel, where > 1e-3 of it)")
        print(f"{'':7s} float64 solve: max rel diff of the continuum {rel(cont_new[good], cont_old[good]):.2e}, "
              f"max |coeffs diff| / |coeffs| {float(((c_new - c_old).abs().amax(-1) / c_old.abs().amax(-1)).max()):.2e}")


if __name__ == "__main__":
    main(sys.argv[1:])
