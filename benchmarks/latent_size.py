"""How the latent size changes what the model reconstructs and what its latents know (validation split).

    python benchmarks/latent_size.py DEMO [--sizes 8 16 32] [--steps 3000] [--n-xp 8000] [--json OUT]

For each latent size K (same seed, same step count, the default recipe otherwise) the model is
trained on the train split of Gaia XP (the first ``--n-xp`` spectra), MILES and STELIB of the
dataset; then the validation-split spectra and a subset of the train split are fitted with 100
refinement steps. Printed per K and product: the median chi2_nu of the validation spectra (Gaia XP:
survey errors; MILES and STELIB have none, so theirs is against the model's noise floor, comparable
between sizes only), and the
10-nearest-neighbour probe (fitted latents of train stars -> validation stars) median absolute
error of Teff, logg and [Fe/H]. Everything here is on the validation split: the latent size is a
choice, and choices are never made on the test split. Used to choose the default K (README).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from stellarfield.data.store import Dataset
from stellarfield.eval.probes import evaluate_probes
from stellarfield.model.batching import TrainingData
from stellarfield.model.inference import infer
from stellarfield.model.train import TrainConfig, train

PRODUCTS = ("gaia_xp", "miles", "stelib")
LABELS = ("teff", "logg", "fe_h")


def load(dataset: str, split: str, n_xp: int) -> list:
    """The split's spectra of :data:`PRODUCTS`, at most ``n_xp`` of Gaia XP (in dataset order)."""
    out, n = [], 0
    for s in Dataset(dataset).iter_spectra(split=split, products=list(PRODUCTS)):
        if s.product == "gaia_xp":
            if n >= n_xp:
                continue
            n += 1
        out.append(s)
    return out


def fitted(model, spectra: list) -> dict:
    """``{product: (latents (N, K), labels {name: (N,)}, chi2_nu (N,))}`` of 100-step refinement fits."""
    results = infer(model, TrainingData(spectra, instruments=model.instruments), method="refine", refine_steps=100)
    by_key = {s.key: s for s in spectra}
    out = {}
    for product, r in results.items():
        labels = {name: np.array([by_key[k].labels.get(name, np.nan) for k in r.keys], dtype=float) for name in LABELS}
        out[product] = (np.asarray(r.latent), labels, np.asarray(r.chi2_nu))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset", help="a dataset with Gaia XP, MILES, STELIB (stellarfield ingest demo --out DEMO)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 32], help="latent sizes K to compare")
    ap.add_argument("--steps", type=int, default=3000, help="training steps per K")
    ap.add_argument("--n-xp", type=int, default=8000, help="Gaia XP training spectra")
    ap.add_argument("--n-xp-val", type=int, default=500, help="Gaia XP validation spectra fitted")
    ap.add_argument("--n-xp-probe", type=int, default=2000, help="Gaia XP train spectra fitted for the probes")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    train_set = load(args.dataset, "train", args.n_xp)
    val_set = load(args.dataset, "validation", args.n_xp_val)
    probe_set = [s for s in train_set if s.product != "gaia_xp"] + \
                [s for s in train_set if s.product == "gaia_xp"][: args.n_xp_probe]
    count = lambda spectra: {p: sum(s.product == p for s in spectra) for p in PRODUCTS}  # noqa: E731
    print(f"train {count(train_set)}; validation {count(val_set)}; {args.steps} steps per K, "
          f"{args.threads} torch thread(s)")
    results = {}
    for k in args.sizes:
        config = TrainConfig(latent_dim=k, minutes=None, max_steps=args.steps, split_spectra=False, prior_steps=10,
                             final_val_max_per_product=1, validate_every_s=None, threads=args.threads)
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            run = train(train_set, Path(tmp) / "run", config, progress=False)
            seconds = time.perf_counter() - t0
            val = fitted(run.model, val_set)
            ref = fitted(run.model, probe_set)
        row = {"train_seconds": seconds}
        for product in PRODUCTS:
            if product not in val:
                continue
            z_val, y_val, chi2 = val[product]
            z_ref, y_ref, _ = ref[product]
            probes = evaluate_probes(z_ref, y_ref, z_val, y_val, kinds=("knn",))["knn"]
            row[product] = {"chi2_nu_median": float(np.nanmedian(chi2)), "n": int(len(chi2)),
                            **{f"{name}_mad": probes[name].get("mad") for name in LABELS}}
        results[k] = row
        cells = "; ".join(f"{p} chi2 {row[p]['chi2_nu_median']:.3g} (n {row[p]['n']}), 10-NN MAD "
                          + " / ".join(f"{row[p][f'{n}_mad']:.3g}" for n in LABELS)
                          for p in PRODUCTS if p in row)
        print(f"K = {k:3d} ({seconds:.0f} s): {cells}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
