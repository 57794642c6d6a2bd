"""Fit speed against the number of spectra fitted together: fixed chunks vs the pixel-budget default.

    python benchmarks/fit_chunk.py DATASET [DATASET ...] [--model reference] [--threads 2]
        [--chunks 4 16 64 auto] [--at-least 64] [--steps 100] [--products P ...] [--json OUT]

For every product of the datasets' **test** split, in one process, one chunk size after the other
on the same spectra (repeated to at least ``--at-least`` spectra and to at least the default chunk; a
larger chunk is then one chunk of them all): ``infer(method="refine", refine_steps=STEPS,
chunk=C)`` as :func:`stellarfield.model.fit_spectra` runs it (the trunk on the instrument's grid
included, once per call), ms per spectrum, and the kernel's share of the CPU time (``sys / (user +
sys)``, from ``getrusage``: page faults of large temporaries). ``auto`` is
:func:`stellarfield.model.inference.chunk_size` (2**18 padded pixels' worth of spectra, at most 1,024),
the default. The median chi2_nu of the distinct spectra is printed per chunk: it must not depend on
the chunk (each spectrum's fit is its own).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

from encoder_fit import test_spectra  # the same test spectra per product (benchmarks/ is on sys.path)
from stellarfield.model.batching import TrainingData
from stellarfield.model.checkpoint import load_model
from stellarfield.model.inference import chunk_size, infer


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("datasets", nargs="+")
    ap.add_argument("--model", default="reference")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--chunks", nargs="+", default=["4", "16", "64", "auto"])
    ap.add_argument("--at-least", type=int, default=64, help="spectra timed per product and chunk, at least")
    ap.add_argument("--steps", type=int, default=100, help="Adam refinement steps (the fit's default is 100)")
    ap.add_argument("--max-per-product", type=int, default=256, help="distinct test spectra per product, at most")
    ap.add_argument("--products", nargs="*", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_model(args.model).model
    print(f"refine {args.steps} steps, RV search 'full', {args.threads} threads; ms per spectrum by chunk")
    results: dict = {"threads": args.threads, "steps": args.steps, "products": {}}
    for path in args.datasets:
        wanted = [p for p in model.instruments if args.products is None or p in args.products]
        for product, distinct in sorted(test_spectra(path, wanted, args.max_per_product).items()):
            pixels = max(s.n_pixels for s in distinct)
            total = max(args.at_least, chunk_size(pixels), len(distinct))
            chunks = [min(total, chunk_size(pixels) if c == "auto" else int(c)) for c in args.chunks]
            data = TrainingData((distinct * -(-total // len(distinct)))[:total], instruments=model.instruments)
            infer(model, TrainingData(distinct[:1], instruments=model.instruments), method="refine", refine_steps=2)
            rows = []
            for label, chunk in zip(args.chunks, chunks):
                before, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
                result = infer(model, data, method="refine", refine_steps=args.steps, chunk=chunk)[product]
                seconds = time.perf_counter() - t
                after = resource.getrusage(resource.RUSAGE_SELF)
                user, kernel = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
                rows.append({"chunk": label, "spectra_per_chunk": chunk, "ms_per_spectrum": 1000 * seconds / total,
                             "kernel_share": kernel / max(user + kernel, 1e-9),
                             "chi2_nu_median": float(np.nanmedian(result.chi2_nu[: len(distinct)]))})
            results["products"][f"{path}:{product}"] = {"pixels": pixels, "n_distinct": len(distinct),
                                                         "n_timed": total, "rows": rows}
            print(f"\n{product} ({len(distinct)} test spectra, {pixels} pixels, timed on {total})")
            print("| chunk | spectra | ms/spectrum | kernel share of CPU | chi2_nu median |")
            print("|---|---|---|---|---|")
            for r in rows:
                print(f"| {r['chunk']} | {r['spectra_per_chunk']} | {r['ms_per_spectrum']:.1f} | "
                      f"{r['kernel_share']:.0%} | {r['chi2_nu_median']:.5g} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
