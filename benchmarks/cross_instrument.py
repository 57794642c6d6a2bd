"""One star, two telescopes: cross-instrument prediction and latent agreement on test-split pairs,
and the RV and latent stability of one star over several nights.

    python benchmarks/cross_instrument.py --model RUN --data DATASET... [--split test]
        [--products stelib miles] [--star "LAMOST J192814.09+435531.0" --star-product lamost_mrs]
        [--refine-steps 200] [--threads 1] [--device cpu] [--json OUT.json]

Pairs: stars of the split with a spectrum in both products (star_id), each spectrum fitted alone and
rendered on both spectra's pixels: "fit STELIB, predict MILES" and back, scored against each
instrument's own fit by the RMS after a per-comparison continuum (Legendre degree 2 in wavelength);
the latent distance of a star's two spectra against that of random stars. Multi-epoch: the spectra
of ``--star`` in ``--star-product`` (any split), each night alone and all jointly. Everything is
described in :mod:`stellarfield.eval.pairs`; the figures are printed, and written as JSON with
``--json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main(argv=None) -> int:
    from stellarfield.eval.pairs import (
        DEFAULT_PRODUCTS,
        MULTI_EPOCH_PRODUCT,
        MULTI_EPOCH_STAR,
        format_pairs,
        load_star,
        multi_epoch_section,
        pairs_section,
        random_distance,
    )
    from stellarfield.eval.report_text import finite_or_none

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="run folder, or 'reference'")
    p.add_argument("--data", nargs="+", required=True, help="dataset folder(s)")
    p.add_argument("--split", default="test", help="split of the pairs (default test; 'all' for every split)")
    p.add_argument("--products", nargs=2, default=list(DEFAULT_PRODUCTS), help="the two products compared")
    p.add_argument("--star", default=MULTI_EPOCH_STAR, help="the multi-epoch star's star_id ('' to skip)")
    p.add_argument("--star-product", default=MULTI_EPOCH_PRODUCT, help="the multi-epoch star's product")
    p.add_argument("--refine-steps", type=int, default=200, help="Adam steps per fit (default 200)")
    p.add_argument("--samples", type=int, default=100, help="latents drawn for the band (default 100)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--device", default="cpu", help="where the model runs (cpu, cuda, auto)")
    p.add_argument("--json", help="write the figures to this JSON file")
    args = p.parse_args(argv)

    import torch

    from stellarfield.model.checkpoint import load_model

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    trained = load_model(args.model, device=args.device)
    split = None if args.split == "all" else args.split
    pairs = pairs_section(trained, args.data, split, tuple(args.products), args.refine_steps, args.samples,
                          progress=True)
    t1 = time.perf_counter()
    epochs = None
    if args.star:
        spectra = load_star(args.data, args.star, args.star_product)
        epochs = multi_epoch_section(trained, spectra, random_distance(pairs), args.refine_steps)
        epochs["star_id"] = args.star
    t2 = time.perf_counter()
    print(format_pairs(pairs, epochs))
    print(f"model {args.model} (latent dimension {trained.model.latent_dim}); pairs {t1 - t0:.0f} s, "
          f"multi-epoch {t2 - t1:.0f} s on {args.device}, {args.threads} thread(s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(finite_or_none({"model": str(args.model), "pairs": pairs, "multi_epoch": epochs}), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
