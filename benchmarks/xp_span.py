"""Gaia XP: how much of the model's misfit lies outside the span that XP sampled spectra can have?

    python benchmarks/xp_span.py --model reference --data DEMO [--n-train 6000] [--n-val 300] [--ranks 70 80 90 100]

Gaia DR3 XP spectra are expansions in 55 basis functions per photometer (Carrasco et al. 2021,
A&A 652, A86; De Angeli et al. 2023, A&A 674, A2) and the sampled spectra a linear map of those
coefficients, so every such spectrum, and its noise, lies in one low-dimensional subspace of the
343 samples. A model spectrum need not: the
coordinate decoder renders smooth functions of wavelength through a Gaussian LSF, and the part of
it outside that subspace is misfit no star can remove. This script measures the subspace on
``--n-train`` train-split spectra (:class:`~stellarfield.model.instrument.SampleSpan`, as the
instrument measures its own: singular values of the median-normalised flux matrix, the rank where
they fall below ``SAMPLE_SPAN_TOLERANCE`` of the first), fits ``--n-val`` validation-split spectra as the bench does
(:func:`stellarfield.bench.model.fit_records`: 100 refinement steps) and prints the median chi2_nu
of the model and of the model projected onto the top-k singular vectors, for each k of ``--ranks``.
A drop says what an XP forward model that projects onto the data's own basis could gain.
``--refit K`` then fits the validation spectra again with the top-K span as the Gaia XP
instrument's ``sample_basis`` (every model it renders on the native samples is projected onto it, as
for a model trained since; the decoder is not retrained).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from stellarfield.bench.data import load_split
from stellarfield.bench.model import fit_records
from stellarfield.model.checkpoint import load_model
from stellarfield.model.instrument import SAMPLE_SPAN_TOLERANCE, SampleSpan
from stellarfield.model.reference import resolve_model_path

PRODUCT = "gaia_xp"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="reference", help="run folder or 'reference'")
    ap.add_argument("--data", nargs="+", required=True, help="dataset folder(s) with Gaia XP spectra")
    ap.add_argument("--n-train", type=int, default=6000, help="train-split spectra that give the subspace")
    ap.add_argument("--n-val", type=int, default=300, help="validation-split spectra fitted")
    ap.add_argument("--ranks", type=int, nargs="+", default=[70, 80, 90, 100])
    ap.add_argument("--refit", type=int, default=None, metavar="K",
                    help="fit again with the instrument projecting onto the top-K span (0: no refit)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    train = load_split(args.data, "train", args.n_train, seed=0, products=[PRODUCT]).spectra.get(PRODUCT, [])
    val = load_split(args.data, "validation", args.n_val, seed=0, products=[PRODUCT]).spectra.get(PRODUCT, [])
    if len(train) < max(args.ranks) or not val:
        raise SystemExit(f"{len(train)} train and {len(val)} validation Gaia XP spectra: too few")
    span = SampleSpan()  # the span as the instrument measures it (the same spectra, the same normalisation)
    for s in train:
        span.add(s)
    singular, basis = span.decomposition()
    relative = singular / singular[0]
    print(f"{span.n} of {len(train)} train spectra: rank {int((relative > SAMPLE_SPAN_TOLERANCE).sum())} of {len(singular)} samples "
          f"(singular values / the first: " + ", ".join(f"{k}: {relative[k]:.1e}" for k in args.ranks) + ")")
    trained = load_model(resolve_model_path(args.model))
    rows, _ = fit_records(trained, val)
    n_params = trained.model.latent_dim + 1  # the latent and the continuum's scale (degree 0)
    for k in args.ranks:
        top = basis[:k]
        model_chi2, projected_chi2 = [], []
        for s in (s for s in val if s.key in rows):  # a spectrum the loading dropped has no row
            model = rows[s.key]["model_flux"]
            good = np.isfinite(model) & (s.ivar > 0)
            projected = (np.nan_to_num(model) @ top.T) @ top
            dof = max(int(good.sum()) - n_params, 1)
            model_chi2.append(float(np.sum((s.flux - model)[good] ** 2 * s.ivar[good])) / dof)
            projected_chi2.append(float(np.sum((s.flux - projected)[good] ** 2 * s.ivar[good])) / dof)
        print(f"top {k:3d}: median chi2_nu {np.median(model_chi2):.3f}, projected onto the span "
              f"{np.median(projected_chi2):.3f} (n = {len(val)} validation spectra)")
    if args.refit:
        inst = trained.model.instrument(PRODUCT)  # what an instrument built with this basis does (new
        # objects: the instrument's cached tensors of its basis follow)
        inst.sample_basis, inst.sample_u = basis[:args.refit].tolist(), np.log(val[0].wavelength).tolist()
        rows, _ = fit_records(trained, val)
        print(f"fitted with the instrument projecting onto the top {args.refit}: median chi2_nu "
              f"{np.median([r['chi2_nu'] for r in rows.values()]):.3f} (the fit's own, n = {len(val)})")


if __name__ == "__main__":
    main()
