"""Fit speed and held-out chi2_nu: the amortised encoder + k refinement steps against today's refinement.

    python benchmarks/encoder_fit.py --model RUN DATASET [DATASET ...] [--threads 2] [--batch 64]
        [--chunk N] [--products P ...] [--max-per-product 256] [--baseline-steps 100] [--json OUT]

``RUN`` is a model with an encoder (``stellarfield.model.amortise`` or ``TrainConfig(objective="encoder")``).
For every dataset and product, on the dataset's **test** split (at most ``--max-per-product``
spectra), in one process, one method after the other on the same spectra:

* ``refine``: today's fit, ``--baseline-steps`` Adam steps from z = 0 with the multi-peak RV search
  (``fit_spectra`` without an encoder);
* ``encoder``: one encoder pass, then the product's fit setting chosen on the validation split and
  saved with the encoder (``k`` Adam or Gauss-Newton steps, velocity search; ``fit_spectra``'s
  default for a model with an encoder), printed in the "setting" column;
* ``k from 0``: the same setting from z = 0 (what the encoder's start is worth).

Speed is "batched": every product's spectra are repeated to at least ``--batch`` spectra, fitted in
chunks as ``fit_spectra`` fits them (by default as many spectra as make 2**18 padded pixels,
:func:`stellarfield.model.inference.chunk_size`: Gaia XP 764, GALAH 16; ``--chunk N`` fixes it;
earlier tables used chunks of ``--batch``), and ms/spectrum is the wall time of ``infer`` over all of
them divided by their number (the trunk on the instrument's grid included, once per product).
chi2_nu is the median over the distinct test spectra (survey errors; see ``inference.py``).
Printed per product: ms/spectrum of each, the speed-up, the medians and the ratio encoder/refine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from stellarfield.data.store import Dataset
from stellarfield.model.batching import TrainingData
from stellarfield.model.checkpoint import load_model
from stellarfield.model.inference import infer


def test_spectra(path: str, products, per_product: int) -> dict[str, list]:
    out: dict[str, list] = {}
    for s in Dataset(path).iter_spectra(split="test"):
        if s.product in products and len(out.setdefault(s.product, [])) < per_product:
            out[s.product].append(s)
    return out


def timed_fit(model, spectra: list, repeat_to: int, chunk: int | None, **kwargs) -> tuple[float, np.ndarray]:
    """(ms per spectrum over the repeated set, chi2_nu of the distinct spectra)."""
    n = len(spectra)
    repeated = (spectra * -(-repeat_to // n))[: max(n, repeat_to)]
    data = TrainingData(repeated, instruments=model.instruments)
    t = time.perf_counter()
    result = next(iter(infer(model, data, chunk=chunk, **kwargs).values()))
    seconds = time.perf_counter() - t
    return 1000 * seconds / len(repeated), result.chi2_nu[:n]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("datasets", nargs="+")
    ap.add_argument("--model", required=True, help="a run folder with an encoder")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64, help="the least spectra timed per product")
    ap.add_argument("--chunk", type=int, default=None, help="spectra fitted together (default: by their pixels)")
    ap.add_argument("--products", nargs="*", default=None, help="only these products")
    ap.add_argument("--max-per-product", type=int, default=256)
    ap.add_argument("--baseline-steps", type=int, default=100)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_model(args.model).model
    if model.encoder is None:
        sys.exit(f"{args.model}: this model has no encoder")
    print(f"encoder + its validated setting per product vs {args.baseline_steps}-step Adam refinement from z = 0 "
          f"(RV search 'full'); {args.threads} threads, at least {args.batch} spectra timed per product, "
          f"chunks of {args.chunk or 'the default size (inference.chunk_size)'}")
    results: dict = {"threads": args.threads, "baseline_steps": args.baseline_steps, "at_least": args.batch,
                     "chunk": args.chunk, "datasets": {}}
    for path in args.datasets:
        rows = {}
        print(f"\n{path} (test split)")
        print("| product | n | setting | refine ms/spec | encoder ms/spec | speed-up | k from 0 ms/spec | "
              "refine chi2_nu | encoder chi2_nu | ratio | k from 0 chi2_nu |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        wanted = [p for p in model.instruments if args.products is None or p in args.products]
        for product, spectra in sorted(test_spectra(path, wanted, args.max_per_product).items()):
            ms_ref, chi_ref = timed_fit(model, spectra, args.batch, args.chunk, method="refine",
                                        refine_steps=args.baseline_steps)
            setting = model.encoder.fit_setting(product)
            ms_enc, chi_enc = timed_fit(model, spectra, args.batch, args.chunk, method="encoder+refine", **setting)
            ms_zero, chi_zero = timed_fit(model, spectra, args.batch, args.chunk, method="refine", **setting)
            label = f"{setting['refiner']} {setting['refine_steps']}, RV {setting['rv_search']}"
            med = lambda c: float(np.nanmedian(c))
            row = {"n": len(spectra), "setting": setting, "refine_ms": ms_ref, "encoder_ms": ms_enc, "k_from_zero_ms": ms_zero,
                   "refine_chi2_nu": med(chi_ref), "encoder_chi2_nu": med(chi_enc), "k_from_zero_chi2_nu": med(chi_zero)}
            row["ratio"] = row["encoder_chi2_nu"] / row["refine_chi2_nu"] if row["refine_chi2_nu"] > 0 else float("nan")
            rows[product] = row
            print(f"| {product} | {row['n']} | {label} | {ms_ref:.1f} | {ms_enc:.2f} | {ms_ref / ms_enc:.0f}x | {ms_zero:.2f} | "
                  f"{row['refine_chi2_nu']:.4g} | {row['encoder_chi2_nu']:.4g} | {row['ratio']:.3f} | "
                  f"{row['k_from_zero_chi2_nu']:.4g} |", flush=True)
        results["datasets"][path] = rows
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
