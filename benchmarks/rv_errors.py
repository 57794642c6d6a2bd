"""Fitted RV errors with the latent held and with it marginalised: are the errors what the differences say?

    python benchmarks/rv_errors.py --model reference --data DS [--split validation] [--products P ...]
                                   [--polish N ...]

Each product with a velocity to fit (default: GALAH DR3 observed frame, GALAH pipeline 6, LAMOST LRS
and MRS, apVisit) is fitted twice on ``--split`` (validation by default: choices are made there) as
the bench fits it (:func:`stellarfield.bench.model.fit_records`): once with the RV error of a fit
marginalised over the latent (the default, :func:`stellarfield.model.rv.velocity_error` given the
latent's Jacobian) and once with the latent held (the error before). The velocities are the same; per
product it prints the bench's headline comparison with the survey
(:func:`stellarfield.bench.rv.rv_section`): n, median fitted error, the robust scatter of
(fitted - survey) / both errors in quadrature (about 1 where the errors are right; "pull"), and the
spectra more than 5 sigma from the survey's value at S/N > 20, and the fits' time both ways.

``--polish N ...``: the fit again with N Levenberg-Marquardt steps on latent and velocity together
after it (``infer(polish_steps=N)``, :func:`stellarfield.model.newton.gauss_newton_latents`): where a
latent direction and the velocity trade off, the scans (velocity with the latent held) can stop short
of the joint minimum; these steps move both. Prints the same line, the median chi2_nu and the time.
"""

from __future__ import annotations

import argparse
import functools
from unittest import mock

import numpy as np
import torch

from stellarfield.bench.model import fit_records
from stellarfield.bench.rv import rv_section
from stellarfield.data.store import Dataset
from stellarfield.model import fit as fit_module
from stellarfield.model import inference
from stellarfield.model.checkpoint import load_model
from stellarfield.model.reference import resolve_model_path

PRODUCTS = ("galah_dr3_observed", "galah_pipeline6", "lamost_lrs", "lamost_mrs", "apogee_apvisit")


def headline(section) -> str:
    ref = section.headline
    outliers = ref.get("outliers", {})
    pull = ref.get("pull_scatter")
    pull = "-" if pull is None else f"{pull:.2f}"
    return (f"n {ref.get('n', 0):3d}  median error {section.rv_err_median_kms or float('nan'):7.3f} km/s  "
            f"pull {pull:>5}  beyond 5 sigma at S/N > 20: {outliers.get('n_beyond', 0)} of {outliers.get('n', 0)}")


def scatter(section, rows: dict) -> str:
    """Offset and robust scatter of fitted - survey, and the fits' median chi2_nu."""
    ref = section.headline
    chi2 = np.median([r["chi2_nu"] for r in rows.values() if r["chi2_nu"] is not None])
    return (f"offset {ref.get('offset_kms', float('nan')):+.2f}, scatter {ref.get('scatter_kms', float('nan')):.2f} km/s, "
            f"median chi2_nu {chi2:.3f}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="reference", help="run folder or 'reference'")
    ap.add_argument("--data", nargs="+", required=True, help="dataset folder(s)")
    ap.add_argument("--split", default="validation")
    ap.add_argument("--products", nargs="+", default=list(PRODUCTS))
    ap.add_argument("--polish", type=int, nargs="*", default=[], help="Levenberg-Marquardt steps after the fit, tried")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    trained = load_model(resolve_model_path(args.model))
    for product in args.products:
        if product not in trained.model.instruments or trained.model.instrument(product).rv_scan_kms <= 0:
            print(f"{product}: the model fits no radial velocity")
            continue
        records = [s for d in args.data for s in Dataset(d).iter_spectra(split=args.split, products=[product])]
        if not records:
            print(f"{product}: no spectra in the {args.split} split")
            continue
        fit_records(trained, records[:1])  # first-call costs (the product's basis, caches) out of the timings
        marginal, marginal_s = fit_records(trained, records)
        with mock.patch.object(inference, "latent_jacobian", lambda *a, **k: None):
            held, held_s = fit_records(trained, records)
        marginal_section = rv_section(records, marginal)
        print(f"{product} ({args.split}, {len(records)} spectra; survey: {next(iter(marginal_section.references))})")
        print(f"  latent held:         {headline(rv_section(records, held))}")
        print(f"  latent marginalised: {headline(marginal_section)}")
        print(f"  fit time: {1e3 * marginal_s / len(records):.0f} ms per spectrum marginalised, "
              f"{1e3 * held_s / len(records):.0f} held ({marginal_s / held_s:.2f}x)")
        print(f"  no polish:           {scatter(marginal_section, marginal)}")
        for steps in args.polish:
            with mock.patch.object(fit_module, "infer", functools.partial(inference.infer, polish_steps=steps)):
                polished, seconds = fit_records(trained, records)
            section = rv_section(records, polished)
            print(f"  polish {steps:2d}:           {scatter(section, polished)}; {headline(section)}; "
                  f"{1e3 * seconds / len(records):.0f} ms per spectrum")


if __name__ == "__main__":
    main()
