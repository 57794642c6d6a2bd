"""Drawing new stars from the latent prior: autoregressive against coupling spline flows, side by side.

    python benchmarks/prior_flow.py --model RUN --data DS [DS ...] [--per-product 1666] [--steps 500]
                                    [--seeds 0 1 2] [--variants autoregressive:3 coupling:3 coupling:6]

The prior (:mod:`stellarfield.model.prior`) is a neural spline flow conditional on the product. An
autoregressive flow (zuko's default, ``passes=None``) draws a sample in one pass per latent
dimension (16); a coupling flow (``passes=2``) in two (``--variants``: kind:number of spline
layers, the shipped prior has 3 layers). All are fitted here the same way
(:meth:`LatentPrior.fit`, the same steps and seed) to the same latents: the model's fits (100
refinement steps) of a seeded sample of train-split spectra, at most ``--per-product`` of each
product, as ``stellarfield prior`` takes them. For each flow, on the **validation** split (choices
are made here, never on the test split):

* ``draws/s``: latents drawn per second (10,000 of Gaia XP's population, 1 torch thread; best of
  3 calls, the flows alternated in this process);
* ``NLL``: mean negative log density per latent dimension of the validation spectra's own latents
  under their product's population (lower: the flow describes stars it was not fitted to better);
* ``AUC``: the bench's realism test (:func:`stellarfield.eval.realism.realism_for_product`, generated
  stars with the instrument's noise against the validation spectra; 0.5 = indistinguishable),
  the mean over ``--seeds`` (different generated stars, the same real ones) with its spread.

Products with at least ``--min-spectra`` (20) validation spectra are scored.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import torch

from stellarfield.data.store import iter_spectra_of
from stellarfield.eval.realism import realism_for_product
from stellarfield.model import fit_spectra, load_model
from stellarfield.model.batching import TrainingData
from stellarfield.model.inference import infer
from stellarfield.model.prior import LatentPrior
from stellarfield.model.train import random_per_product

MIN_SPECTRA = 20
PASSES = {"autoregressive": None, "coupling": 2}


def train_latents(trained, datasets, per_product: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Latents (N, D) of a seeded sample of train-split spectra, their product index (N,), the products."""
    model = trained.model
    sample = random_per_product(iter_spectra_of(datasets, "train"), sorted(model.instruments), per_product, seed)
    data = TrainingData(sample, instruments=model.instruments)
    results = infer(model, data, method="refine", refine_steps=100)
    products = sorted(results)
    z = torch.from_numpy(np.concatenate([results[p].latent for p in products])).float()
    index = torch.cat([torch.full((len(results[p].latent),), k, dtype=torch.long) for k, p in enumerate(products)])
    return z, index, products


def draws_per_second(prior: LatentPrior, product: str, n: int = 10_000) -> float:
    t = time.perf_counter()
    prior.sample(n, seed=0, product=product)
    return n / (time.perf_counter() - t)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="reference")
    ap.add_argument("--data", nargs="+", required=True)
    ap.add_argument("--per-product", type=int, default=1666, help="train spectra per product the flows are fitted to")
    ap.add_argument("--max-val-per-product", type=int, default=500)
    ap.add_argument("--steps", type=int, default=500, help="the flows' Adam steps")
    ap.add_argument("--variants", nargs="+", default=["autoregressive:3", "coupling:3", "coupling:6"],
                    help="flows to compare, kind:layers (kind: autoregressive or coupling)")
    ap.add_argument("--min-spectra", type=int, default=MIN_SPECTRA, help="validation spectra a product needs to be scored")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the generated stars")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    trained = load_model(args.model)
    t0 = time.time()
    z, index, products = train_latents(trained, args.data, args.per_product, seed=0)
    print(f"fitted {len(z):,} train spectra of {len(products)} products in {time.time() - t0:.0f} s")
    priors = {}
    for name in args.variants:
        kind, layers = name.split(":")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            prior = LatentPrior(trained.model.latent_dim, int(layers), products=products, passes=PASSES[kind])
            t = time.time()
            prior.fit(z, steps=args.steps, seed=0, product_index=index)
        priors[name] = prior.eval()
        print(f"{name}: fitted in {time.time() - t:.0f} s")

    rates = {name: [] for name in priors}
    for _ in range(3):  # alternated, so both see the same machine load
        for name, prior in priors.items():
            rates[name].append(draws_per_second(prior, "gaia_xp" if "gaia_xp" in products else products[0]))
    out: dict = {"draws_per_s": {name: max(r) for name, r in rates.items()}, "products": {}}
    print("draws/s (10,000, 1 thread): " + ", ".join(f"{k} {v:,.0f}" for k, v in out["draws_per_s"].items()))

    by_product: dict[str, list] = {}
    for s in random_per_product(iter_spectra_of(args.data, "validation"), products, args.max_val_per_product, 0):
        by_product.setdefault(s.product, []).append(s)
    print(f"{'product':20s} {'n':>4s}  " + "  ".join(f"{name + ' NLL':>20s}  {name + ' AUC':>22s}" for name in priors))
    for product, spectra in sorted(by_product.items()):
        if len(spectra) < args.min_spectra or not next(iter(priors.values())).has_population(product):
            continue
        rows = fit_spectra(trained, spectra, keep_model_flux=False).to_pylist()
        fits = {r["key"]: r["rv_kms"] for r in rows}
        latents = [r["latent"] for r in rows if r["latent"] is not None]
        if not latents:
            print(f"{product:20s} {len(spectra):4d}  no fit converged: skipped")
            continue
        z_val = torch.tensor(np.stack(latents))
        entry = {}
        for name, prior in priors.items():
            nll = float(-prior.log_prob(z_val, product).mean()) / z_val.shape[1]
            with_prior = dataclasses.replace(trained, prior=prior)
            aucs = [realism_for_product(with_prior, product, spectra, fits, max(len(spectra), 100), seed=seed)[0]
                    .get("c2st_auc", np.nan) for seed in args.seeds]
            entry[name] = {"nll": nll, "auc": float(np.mean(aucs)), "auc_sd": float(np.std(aucs))}
        out["products"][product] = {"n": len(spectra), **entry}
        print(f"{product:20s} {len(spectra):4d}  " + "  ".join(
            f"{e['nll']:20.3f}  {e['auc']:14.3f} +- {e['auc_sd']:.3f}" for e in entry.values()), flush=True)
    return out


if __name__ == "__main__":
    main()
