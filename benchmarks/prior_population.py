"""Whose stars should ``generate --instrument P`` draw: P's own population, or the whole training set?

    python benchmarks/prior_population.py --model reference --data DS DEMO [--max-per-product 500] [--seed 0]
                                          [--compare-model RUN]

On the **validation** split (the choice of the default is made here, never on the test split; a
seeded random sample of at most ``--max-per-product`` spectra of each product: a dataset's order
follows its source files), for every product with at least 20 validation spectra, the bench's realism test
(:func:`stellarfield.eval.realism.realism_for_product`: generated stars with the instrument's
noise drawn from the real error arrays, a classifier two-sample test against the real spectra,
AUC 0.5 = indistinguishable) is run twice with the same seed: stars drawn from the product's own
population (``population=P``, :mod:`stellarfield.model.prior`) and from every product's
(``population="all"``). Observed-frame spectra are put in the rest frame with the model's fitted
RVs (``fit_spectra``), as the bench does. ``--compare-model``: a third column, the same test with
the prior of another run with the same decoder (e.g. the reference model before its prior was made
conditional). Prints one row per product.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from stellarfield.data.store import iter_spectra_of
from stellarfield.eval.realism import realism_for_product
from stellarfield.model import fit_spectra, load_model
from stellarfield.model.train import random_per_product

MIN_SPECTRA = 20


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="reference")
    ap.add_argument("--data", nargs="+", required=True)
    ap.add_argument("--max-per-product", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compare-model", help="a run whose prior is tested too (its own population choice: 'auto')")
    args = ap.parse_args(argv)

    trained = load_model(args.model)
    other = load_model(args.compare_model) if args.compare_model else None
    if not getattr(trained.prior, "products", None):
        raise SystemExit(f"{args.model}: its prior is not conditional on the product (refit it: stellarfield prior)")
    by_product: dict[str, list] = {}
    for s in random_per_product(iter_spectra_of(args.data, "validation"), sorted(trained.model.instruments),
                                args.max_per_product, args.seed):
        by_product.setdefault(s.product, []).append(s)
    out = {}
    print(f"{'product':20s} {'n real':>6s}  {'AUC own population':>18s}  {'AUC all products':>16s}  "
          f"{'AUC --compare-model':>19s}  seconds")
    for product, spectra in sorted(by_product.items()):
        if len(spectra) < MIN_SPECTRA:
            continue
        t0 = time.time()
        fits = {r["key"]: r["rv_kms"] for r in fit_spectra(trained, spectra, keep_model_flux=False).to_pylist()}
        n_generated = max(len(spectra), 100)
        row = {}
        for population in (product, "all"):
            result, _ = realism_for_product(trained, product, spectra, fits, n_generated, seed=args.seed,
                                            population=population)
            row[population if population == "all" else "own"] = result
        if other is not None:
            row["compare"], _ = realism_for_product(other, product, spectra, fits, n_generated, seed=args.seed)
        out[product] = row
        own, every = row["own"].get("c2st_auc", np.nan), row["all"].get("c2st_auc", np.nan)
        compared = row["compare"].get("c2st_auc", np.nan) if other is not None else np.nan
        print(f"{product:20s} {row['own']['n_real']:6d}  {own:18.3f}  {every:16.3f}  {compared:19.3f}  "
              f"{time.time() - t0:7.0f}")
    return out


if __name__ == "__main__":
    main()
