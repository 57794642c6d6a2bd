"""The PCA baseline per survey product: fitted on the TRAIN split, scored on the TEST split.

    python benchmarks/pca_baseline.py DATASET [DATASET ...] [--components 16 32] [--products P ...]
                                      [--on native|common] [--max-train N] [--json OUT.json]

For every product of every dataset (with at least 2 training and 1 test spectra) and every K: a
weighted EM-PCA with K components on the product's common grid (stellarfield.eval.baselines), and a
plain (unweighted) PCA, the kind the issue's reference numbers were measured with (with ``--pca both``
both come from one preparation of the spectra, the EM-PCA starting from the plain PCA's SVD); then
for each test spectrum K coefficients by weighted least squares and its chi2_nu (on the native
pixels by default), reported as median (16th-84th percentile) over test spectra with their number;
per segment for multi-segment products; median |residual| and RMS residual (the score for MILES,
which has no errors). Flux-like products are divided by their median; LAMOST is also shown divided
by a running-median pseudo-continuum (the issue's "LAMOST normalised"). GALAH's observed-frame O2
band (7592-7702 A vacuum) is masked everywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from stellarfield.data.store import Dataset
from stellarfield.eval.baselines import PCABaseline, default_normalisation, fit_plain_and_weighted

#: Extra normalisations shown next to a product's default.
EXTRA_NORMALISATIONS = {"lamost_lrs": ["continuum"], "apogee_apvisit": [], "miles": ["none"]}


def load(dataset: Dataset, product: str, split: str, limit: int | None, seed: int = 0) -> list:
    spectra = list(dataset.iter_spectra(split=split, products=[product]))
    if limit is not None and len(spectra) > limit:
        rows = np.sort(np.random.default_rng(seed).choice(len(spectra), size=limit, replace=False))
        spectra = [spectra[i] for i in rows]
    return spectra


def fmt(summary: dict, digits: int = 3) -> str:
    if not summary or summary.get("n", 0) == 0:
        return "-"
    return f"{summary['median']:.{digits}g} ({summary['p16']:.{digits}g}-{summary['p84']:.{digits}g})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("datasets", nargs="+", type=Path)
    parser.add_argument("--components", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--products", nargs="+", default=None, help="only these products")
    parser.add_argument("--on", choices=["native", "common"], default="native", help="pixels the test chi2 is computed on")
    parser.add_argument("--max-train", type=int, default=None, help="random subset of at most N training spectra per product")
    parser.add_argument("--max-iter", type=int, default=30)
    parser.add_argument(
        "--pca", choices=["weighted", "plain", "both"], default="both",
        help="weighted EM-PCA, plain (unweighted SVD) PCA, or both (default)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write all results to this JSON file")
    args = parser.parse_args(argv)

    print(f"# PCA baseline, train split -> test split, chi2_nu on {args.on} pixels; {os.cpu_count()} CPU cores")
    variants = {"weighted": [True], "plain": [False], "both": [True, False]}[args.pca]
    header = f"{'dataset':<10} {'product':<20} {'pca':<8} {'norm':<9} {'K':>3} {'train':>6} {'test':>5}  {'chi2_nu median (16-84)':<26} {'RMS resid':<22} {'fit s':>6}  per segment"
    print(header)
    results = []
    for path in args.datasets:
        dataset = Dataset(path)
        products = [p for p in dataset.counts() if args.products is None or p in args.products]
        for product in products:
            train = load(dataset, product, "train", args.max_train)
            test = load(dataset, product, "test", None)
            if len(train) < 2 or not test:
                print(f"{path.name:<10} {product:<20} skipped: {len(train)} train / {len(test)} test spectra", flush=True)
                continue
            for normalisation in [default_normalisation(product)] + EXTRA_NORMALISATIONS.get(product, []):
                fitted = []
                for k in args.components:
                    if len(variants) == 2:  # one preparation and one SVD for both
                        pair = fit_plain_and_weighted(train, k, normalisation=normalisation, max_iter=args.max_iter)
                        fitted += [pair["weighted"], pair["plain"]]
                    else:
                        fitted.append(PCABaseline(n_components=k, normalisation=normalisation, max_iter=args.max_iter,
                                                  weighted=variants[0]).fit(train))
                for baseline in fitted:
                    k, weighted, fit_s = baseline.n_components, baseline.weighted, baseline.fit_seconds
                    score = baseline.score(test, on=args.on)
                    score.update({"dataset": str(path), "requested_components": k, "fit_seconds": fit_s,
                                  "em_iterations": len(baseline.pca.chi2_history_)})
                    results.append(score)
                    segments = score["chi2_nu_by_segment"]
                    per_segment = " ".join(f"{name}:{s['median']:.3g}" for name, s in segments.items()) if len(segments) > 1 else ""
                    print(
                        f"{path.name:<10} {product:<20} {'weighted' if weighted else 'plain':<8} {normalisation:<9} {score['n_components']:>3} {score['n_train']:>6} "
                        f"{score['n']:>5}  {fmt(score['chi2_nu']):<26} {fmt(score['rms_residual']):<22} {fit_s:>6.1f}  {per_segment}",
                        flush=True,
                    )
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
