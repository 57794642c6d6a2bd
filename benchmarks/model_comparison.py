"""Compare training objectives and encodings on the same held-out spectra (validation split: choices).

    python benchmarks/model_comparison.py DATASET [DATASET ...] [--minutes 3] [--max-per-product 2000]
        [--split validation|test] [--eval-per-product 24]
        [--variants gon gon_detached autodecoder autodecoder_fourier encoder] [--json OUT]

Each variant trains for the same wall-clock time with the same seed on the "train" split (at most
``--max-per-product`` spectra per product), then every model fits the same held-out spectra of
``--split`` (at most ``--eval-per-product`` per product) with each inference method it supports.
Choices (the default objective, whether the reference model has an encoder) are made on the
``validation`` split, the default; ``--split test`` reports a choice already made:

* GON models: "gon" (the single gradient step from z = 0, the latent as trained) and "gon+refine"
  (that step, then 100 Adam steps on latent and RV);
* auto-decoder models: "refine" (100 Adam steps from z = 0; the decoder is what was trained);
* encoder models (the amortised, VAE-style alternative: an encoder trained with the decoder, no
  latent table, :mod:`stellarfield.model.encoder`): "encoder" (one pass) and "encoder+refine" (then
  each product's setting, k Adam or Gauss-Newton steps and the velocity search, chosen on the
  validation spectra by :func:`stellarfield.model.amortise.choose_fit_settings`), and "refine"
  (100 steps from z = 0 on its decoder).

Printed: the median chi2_nu per product (survey errors; learned scatter for MILES, which has none),
so every number is on spectra no variant trained on. (The encoder's per-product fit settings are
chosen on 8 validation spectra per product, which the validation scores then include.)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from stellarfield.data.store import Dataset
from stellarfield.model.amortise import AmortiseConfig, choose_fit_settings
from stellarfield.model.batching import TrainingData
from stellarfield.model.inference import infer, summarise
from stellarfield.model.train import TrainConfig, train

VARIANTS = {
    "gon": dict(objective="gon"),
    "gon_detached": dict(objective="gon", gon_nested=False),
    "autodecoder": dict(objective="autodecoder"),
    "autodecoder_fourier": dict(objective="autodecoder", encoding="fourier"),
    "gon_fourier": dict(objective="gon", encoding="fourier"),
    "encoder": dict(objective="encoder"),
}


def load(paths, split: str, per_product: int):
    seen, out, keys = {}, [], set()
    for path in paths:
        for s in Dataset(path).iter_spectra(split=split):
            if s.key in keys or seen.get(s.product, 0) >= per_product:
                continue
            keys.add(s.key)
            seen[s.product] = seen.get(s.product, 0) + 1
            out.append(s)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("datasets", nargs="+")
    ap.add_argument("--minutes", type=float, default=3.0)
    ap.add_argument("--max-per-product", type=int, default=2000)
    ap.add_argument("--split", choices=["validation", "test"], default="validation",
                    help="the held-out spectra scored (default validation: where choices are made)")
    ap.add_argument("--eval-per-product", type=int, default=24, help="held-out spectra per product scored")
    ap.add_argument("--refine-steps", type=int, default=100)
    ap.add_argument("--variants", nargs="+", default=["gon", "gon_detached", "autodecoder", "autodecoder_fourier", "encoder"])
    ap.add_argument("--out", default=None, help="folder for the runs (default: a temporary folder)")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    train_spectra = load(args.datasets, "train", args.max_per_product)
    val_spectra = load(args.datasets, "validation", 8)
    test_spectra = load(args.datasets, args.split, args.eval_per_product)
    out_dir = Path(args.out or tempfile.mkdtemp(prefix="sf-compare-"))
    results: dict = {"minutes": args.minutes, "split": args.split, "train_counts": {}, "test_counts": {}, "variants": {}}
    for name in args.variants:
        config = TrainConfig(**VARIANTS[name], minutes=args.minutes, final_val_max_per_product=4,
                             final_val_refine_steps=10, prior_steps=100, validate_every_s=None)
        t = time.time()
        run = train(train_spectra + val_spectra, out_dir / name, config, progress=False)
        train_s = time.time() - t
        test = TrainingData(test_spectra, instruments=run.model.instruments)
        results["test_counts"] = test.counts()
        methods = {"gon": {"method": "gon"}, "gon+refine": {"method": "gon+refine"}} if config.objective == "gon" \
            else {"refine": {"method": "refine"}}
        if config.objective == "encoder":
            _, _, settings = choose_fit_settings(
                run.model, TrainingData(val_spectra, instruments=run.model.instruments), AmortiseConfig())
            methods = {"encoder": {"method": "encoder", "rv_search": "ccf"},
                       "encoder+refine (validated per product)": {"method": "encoder+refine", "per_product": settings},
                       "refine": {"method": "refine"}}
            entry_settings = settings
        entry = {"steps": run.steps, "train_s": round(train_s, 1), "methods": {}}
        if config.objective == "encoder":
            entry["fit_settings"] = entry_settings
        for label, kwargs in methods.items():
            t = time.time()
            summary = summarise(infer(run.model, test, **{"refine_steps": args.refine_steps, **kwargs}))
            entry["methods"][label] = {"fit_s": round(time.time() - t, 1),
                                       "chi2_nu_median": {k: round(v["chi2_nu_median"], 3) for k, v in summary.items()}}
        results["variants"][name] = entry
        print(json.dumps({name: entry}), flush=True)

    products = sorted(results["test_counts"])
    counts = ", ".join(f"{p} {results['test_counts'][p]}" for p in products)
    print(f"\nmedian chi2_nu on {args.split}-split spectra ({counts}); {args.minutes} min of training each")
    print("| variant | steps | method | " + " | ".join(products) + " |")
    print("|---|---|---|" + "---|" * len(products))
    for name, entry in results["variants"].items():
        for method, m in entry["methods"].items():
            cells = " | ".join(f"{m['chi2_nu_median'].get(p, float('nan')):.2f}" for p in products)
            print(f"| {name} | {entry['steps']} | {method} | {cells} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
