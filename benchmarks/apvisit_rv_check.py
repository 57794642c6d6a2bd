"""Where a fitted apVisit velocity disagrees with APOGEE's: which of the two does the model's likelihood prefer?

    python benchmarks/apvisit_rv_check.py --model reference --star 2M12241699+2453335

For each apVisit of ``--star`` that its apStar lists (``SFILE<k>`` in the apStar's primary header), the
visit is fitted as ``stellarfield fit`` does (latent and velocity from scratch, 100 refinement steps);
then fitted again starting from the apStar's per-visit topocentric ``VRAD<k>`` (latent from zero,
``--steps`` Adam steps on latent and velocity: the local solution there). Prints both velocities and the
survey-error chi2 per good pixel at each, so a disagreement reads as "the search missed a better
solution" (lower chi2 at APOGEE's velocity) or "the data, through this model, prefer the fitted one".
Files are read from ``../shared/data/apogee`` (``--folder``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from stellarfield.bench.rv import apstar_visit_velocities
from stellarfield.io import read_spectra
from stellarfield.model.batching import TrainingData
from stellarfield.model.checkpoint import load_model
from stellarfield.model.inference import blurred_basis, infer
from stellarfield.model.latents import refine_latents
from stellarfield.model.likelihood import evaluate, mean_model, observe, survey_chi2, variance
from stellarfield.model.reference import resolve_model_path

PRODUCT = "apogee_apvisit"


def chi2_per_pixel(model, obs, basis, z: torch.Tensor) -> float:
    with torch.no_grad():
        var = variance(model, obs)
        fit = evaluate(obs, model.decoder.coefficients(z), basis, obs.v, var, blurred_basis=True)
        chi2, _ = survey_chi2(obs, fit, var)
    return float(chi2.sum() / fit.good.sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="reference", help="run folder or 'reference'")
    ap.add_argument("--star", required=True, help="2MASS id, e.g. 2M12241699+2453335")
    ap.add_argument("--folder", default="../shared/data/apogee", help="folder with apstar/ and apvisit/")
    ap.add_argument("--steps", type=int, default=200, help="refinement steps from the apStar's velocity")
    args = ap.parse_args()
    torch.set_num_threads(1)
    folder = Path(args.folder)
    apstars = sorted((folder / "apstar").glob(f"apStar-*{args.star}.fits"))
    if not apstars:
        raise SystemExit(f"no apStar file for {args.star} in {folder / 'apstar'}")
    visits = apstar_visit_velocities(apstars[0])
    records = [s for f in sorted((folder / "apvisit").glob(f"apVisit-*{args.star}*.fits")) for s in read_spectra(f)]
    records = [s for s in records if s.observation_id in visits]
    if not records:
        raise SystemExit(f"none of the apVisits of {args.star} is listed in {apstars[0].name}")
    model = load_model(resolve_model_path(args.model)).model
    data = TrainingData(records, instruments=model.instruments)
    fitted = infer(model, data, method="refine", refine_steps=100)[PRODUCT]
    basis = blurred_basis(model, PRODUCT)
    mean_grid = mean_model(model, basis).detach()
    print(f"{args.star}: {len(records)} visits listed in {apstars[0].name}; model {args.model}")
    print("visit            S/N  APOGEE VRAD | fitted v  chi2/px | from APOGEE's: v  chi2/px")
    batch_of = data.products[PRODUCT]
    for i, key in enumerate(fitted.keys):
        record = next(r for r in records if r.key == key)
        visit = visits[record.observation_id]
        batch = batch_of.batch(torch.tensor([i])).to(model.device)
        rows = []
        for v0, z0, steps in ((fitted.rv_kms[i], fitted.latent[i], 0), (visit["vrad_kms"], None, args.steps)):
            obs = observe(model, batch, full_grid=True, mean_grid=mean_grid)
            obs.v = torch.tensor([float(v0)], dtype=torch.float64, device=model.device)
            z = (torch.zeros(1, model.latent_dim) if z0 is None else torch.as_tensor(z0[None], dtype=torch.float32)).to(model.device)
            if steps:
                z = refine_latents(model, [obs], [basis], z, steps)
            rows.append((float(obs.v[0]), chi2_per_pixel(model, obs, basis, z)))
        print(f"{record.observation_id:16s} {visit['snr']:4.1f} {visit['vrad_kms']:9.1f}   | {rows[0][0]:8.1f} "
              f"{rows[0][1]:8.3f} | {rows[1][0]:16.1f} {rows[1][1]:8.3f}")


if __name__ == "__main__":
    main()
