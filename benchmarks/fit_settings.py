"""Does the fit (Adam step size, number of steps, starts) limit what the latents know? Validation split.

    python benchmarks/fit_settings.py --model reference --data DS DEMO --product gaia_xp
                                      [--settings '[{"steps": 100, "lr": 0.05}, {"steps": 100, "lr": 0.15}]']
                                      [--n-train 2000] [--n-val 500] [--score-split validation]

For each setting, a seeded sample of ``--n-train`` train-split and ``--n-val`` validation-split
spectra of one product is fitted from z = 0 (:func:`stellarfield.model.inference.infer`, method
"refine": Adam steps on latent and RV, or ``"refiner": "gauss-newton"``; ``"then_gauss_newton": N``
adds N Levenberg-Marquardt steps after them; ``"noise_floor": F`` fits with the likelihood's noise
floor F x median |flux| instead of the model's; ``"starts": K`` fits from z = 0 and from K - 1 draws
of the model's prior and keeps each spectrum's best fit), and the bench's label
probes (10-NN and ridge, :func:`stellarfield.eval.probes.evaluate_probes`) are fitted on the train
latents and scored on the validation ones. Prints per setting: median chi2_nu (validation, train),
the probes' median absolute errors, the median of each latent's largest |z_k|, and the seconds.
Settings are compared on the validation split; ``--score-split test`` scores a setting already
chosen there on the test split instead (as the bench does: probes fitted on the train latents), to
report it, never to choose.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from stellarfield.bench.data import load_split
from stellarfield.bench.run import probe_labels
from stellarfield.eval.probes import evaluate_probes
from stellarfield.model import load_model
from stellarfield.model.batching import TrainingData
from stellarfield.model.inference import infer
from stellarfield.model.instrument import instruments_for

DEFAULT_SETTINGS = '[{"steps": 100, "lr": 0.05}, {"steps": 100, "lr": 0.15}, {"steps": 300, "lr": 0.05}]'


def fitted(model, spectra, setting: dict, product: str, prior=None) -> tuple[np.ndarray, np.ndarray]:
    """Latents (N, D) and chi2_nu (N,) of ``spectra``, in their order; NaN rows for spectra the data
    loading dropped (no good pixels), which the probes then skip. ``"starts": K`` fits from z = 0 and
    from K - 1 draws of the model's prior (seeds 1 .. K - 1) and keeps, per spectrum, the fit with
    the lowest ``ln chi2_nu + |z|^2 / n_pixels`` (the fit's objective, with the survey's errors)."""
    data = TrainingData(spectra, instruments=instruments_for(model, spectra))
    trained_floor = model.likelihood["noise_floor"]
    model.likelihood["noise_floor"] = setting.get("noise_floor", trained_floor)
    starts = [None] + [prior.sample(1, seed=k, product=product)[0] for k in range(1, setting.get("starts", 1))]
    best = None
    try:
        for start in starts:
            r = infer(model, data, method="refine", refine_steps=setting["steps"], lr=setting.get("lr", 0.05),
                      refiner=setting.get("refiner", "adam"), polish_steps=setting.get("then_gauss_newton", 0),
                      start=start)[product]
            objective = np.log(r.chi2_nu) + (r.latent ** 2).sum(1) / np.maximum(r.n_pixels, 1)
            if best is None:
                best = (r, objective)
            else:
                better = objective < best[1]
                best[0].latent[better], best[0].chi2_nu[better] = r.latent[better], r.chi2_nu[better]
                best[1][better] = objective[better]
    finally:
        model.likelihood["noise_floor"] = trained_floor
    r = best[0]
    order = {key: i for i, key in enumerate(r.keys)}
    latent = np.full((len(spectra), r.latent.shape[1]), np.nan)
    chi2_nu = np.full(len(spectra), np.nan)
    for i, s in enumerate(spectra):
        if s.key in order:
            latent[i], chi2_nu[i] = r.latent[order[s.key]], r.chi2_nu[order[s.key]]
    return latent, chi2_nu


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="reference")
    ap.add_argument("--data", nargs="+", required=True)
    ap.add_argument("--product", default="gaia_xp")
    ap.add_argument("--settings", default=DEFAULT_SETTINGS,
                    help="JSON list of {steps, lr, refiner, then_gauss_newton, noise_floor, starts}")
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--n-val", type=int, default=500, help="spectra of the scored split")
    ap.add_argument("--score-split", choices=["validation", "test"], default="validation",
                    help="where the probes are scored (test: only for a setting chosen on validation)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    trained = load_model(args.model)
    model = trained.model
    product = args.product
    train = load_split(args.data, "train", args.n_train, seed=0, products=[product]).spectra.get(product, [])
    val = load_split(args.data, args.score_split, args.n_val, seed=0, products=[product]).spectra.get(product, [])
    if len(train) < 10 or not val:
        raise SystemExit(f"{product}: {len(train)} train and {len(val)} {args.score_split} spectra; too few to probe")
    names = probe_labels(product)
    labels = lambda spectra: {n: np.array([s.label(n) for s in spectra], dtype=np.float64) for n in names}
    out = []
    for setting in json.loads(args.settings):
        t0 = time.time()
        z_train, chi2_train = fitted(model, train, setting, product, trained.prior)
        z_val, chi2_val = fitted(model, val, setting, product, trained.prior)
        scores = evaluate_probes(z_train, labels(train), z_val, labels(val), names)
        row = {"setting": setting, "chi2_nu_val": float(np.nanmedian(chi2_val)),
               "chi2_nu_train": float(np.nanmedian(chi2_train)),
               "knn_mad": {n: scores["knn"][n]["mad"] for n in names},
               "ridge_mad": {n: scores["ridge"][n]["mad"] for n in names},
               "max_abs_z_median": float(np.nanmedian(np.abs(z_val).max(1))), "seconds": time.time() - t0}
        out.append(row)
        print(f"{json.dumps(setting)}: chi2_nu {args.score_split} {row['chi2_nu_val']:.4g} (train {row['chi2_nu_train']:.4g}); "
              f"10-NN {' '.join(f'{n} {v:.3g}' for n, v in row['knn_mad'].items())}; "
              f"ridge {' '.join(f'{n} {v:.3g}' for n, v in row['ridge_mad'].items())}; "
              f"|z|max {row['max_abs_z_median']:.2f}; {row['seconds']:.0f} s", flush=True)
    return out


if __name__ == "__main__":
    main()
