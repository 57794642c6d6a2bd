"""How the latent probes depend on the number of training stars and on the coordinates (validation split).

    python benchmarks/probe_train_size.py --model reference --data DS DEMO [--product gaia_xp]
        [--n-train 2000 20000] [--n-val 2000]

Fits the model to ``max(--n-train)`` train and ``--n-val`` validation spectra of one product (100
refinement steps, as the bench does), then fits the 10-NN and ridge probes of
:func:`stellarfield.eval.probes.evaluate_probes` on the first N train latents for each N, scored on
the validation latents, in two sets of coordinates: the latent itself, and the latent prior's base
coordinates (the flow's map to a standard normal, conditional on the product), which would make
distances comparable across the latent space if the prior were the right metric.

What it decided: the bench fits its probes on up to 20,000 train stars per product (its default
``--max-train-per-product``), the number behind issue 12's reference figures (a plain Gaia XP
auto-decoder's 77 K / 0.19 / 0.14 from 20,000 training stars); from 2,000 a 10-NN probe's nearest
neighbours are simply farther away. The flow's base coordinates did worse than the latent at both
sizes, so the probes keep the latent (standardised per dimension, as the PCA coefficients are).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fit_settings import fitted  # noqa: E402  (the same fit as the bench's, in the spectra's order)

from stellarfield.bench.run import load_split, probe_labels  # noqa: E402
from stellarfield.eval.probes import evaluate_probes  # noqa: E402
from stellarfield.model import load_model  # noqa: E402


def flow_base(prior, z: np.ndarray, product: str) -> np.ndarray:
    """The prior's base coordinates (N, D) of latents ``z`` (NaN rows stay NaN)."""
    ok = np.isfinite(z).all(1)
    x = (torch.tensor(np.nan_to_num(z), dtype=torch.float32) - prior.mean) / prior.std
    with torch.no_grad():
        context = torch.full((len(x),), prior.product_index(product)) if prior.conditional else None
        base = prior.flow(prior._context(context)).transform(x).double().numpy()
    return np.where(ok[:, None], base, np.nan)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="reference")
    ap.add_argument("--data", nargs="+", required=True)
    ap.add_argument("--product", default="gaia_xp")
    ap.add_argument("--n-train", type=int, nargs="+", default=[2000, 20000])
    ap.add_argument("--n-val", type=int, default=2000)
    args = ap.parse_args(argv)
    trained = load_model(args.model)
    product, t0 = args.product, time.time()
    train = load_split(args.data, "train", max(args.n_train), seed=0, products=[product]).spectra.get(product, [])
    val = load_split(args.data, "validation", args.n_val, seed=0, products=[product]).spectra.get(product, [])
    if len(train) < 10 or not val:
        raise SystemExit(f"{product}: {len(train)} train and {len(val)} validation spectra; too few to probe")
    setting = {"steps": 100, "lr": 0.05}
    z_train, _ = fitted(trained.model, train, setting, product)
    z_val, chi2_val = fitted(trained.model, val, setting, product)
    print(f"{product}: {len(train)} train and {len(val)} validation spectra fitted in {time.time() - t0:.0f} s "
          f"(validation chi2_nu {np.nanmedian(chi2_val):.3f})", flush=True)
    names = probe_labels(product)
    labels = lambda spectra: {n: np.array([s.label(n) for s in spectra], dtype=np.float64) for n in names}
    y_train, y_val = labels(train), labels(val)
    coordinates = {"latent": (z_train, z_val)}
    if trained.prior is not None and (not trained.prior.conditional or trained.prior.has_population(product)):
        coordinates["flow base"] = (flow_base(trained.prior, z_train, product), flow_base(trained.prior, z_val, product))
    out = []
    for n in sorted(set(min(n, len(train)) for n in args.n_train)):
        for name, (a, b) in coordinates.items():
            scores = evaluate_probes(a[:n], {k: v[:n] for k, v in y_train.items()}, b, y_val, names)
            row = {"n_train": n, "coordinates": name, "knn_mad": {k: scores["knn"][k]["mad"] for k in names},
                   "ridge_mad": {k: scores["ridge"][k]["mad"] for k in names}}
            out.append(row)
            print(f"n_train {n:6d}  {name:10s} 10-NN MAD " + " ".join(f"{k} {v:.3g}" for k, v in row["knn_mad"].items())
                  + " | ridge MAD " + " ".join(f"{k} {v:.3g}" for k, v in row["ridge_mad"].items()), flush=True)
    return out


if __name__ == "__main__":
    main()
