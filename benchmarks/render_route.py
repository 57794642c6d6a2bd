"""Predicting STELIB from a MILES fit: through STELIB's own instrument, or MILES's blurred to STELIB's LSF?

    python benchmarks/render_route.py --model reference --data DS DEMO [--split validation]
        [--refine-steps 200] [--threads 1]

The model renders a latent through each product's instrument: its LSF, and a trunk band-limited at
that product's resolution, trained on that product's spectra. So "this star as STELIB would see it"
(what ``predict --to stelib`` renders) is not only "as MILES would see it, blurred to STELIB's
LSF". For the stars of ``--split`` with both spectra (:func:`stellarfield.eval.pairs.load_pairs`),
the MILES spectrum is fitted alone (:func:`~stellarfield.model.predict.fit_star_spectra`) and
rendered on the STELIB spectrum's pixels inside MILES's range two ways:

* **through STELIB's instrument** (``render(to="stelib")``, as the cross-prediction is made);
* **through MILES's instrument** on MILES's pixels, blurred to STELIB's LSF
  and interpolated onto STELIB's pixels (:func:`~stellarfield.eval.pairs.observed_as`);

and each is scored against the STELIB spectrum with the pairs benchmark's RMS
(:func:`~stellarfield.eval.pairs.continuum_rms`, Legendre degree 2), beside STELIB's own fit on the
same pixels. Lower through STELIB's instrument: what the model learned of STELIB beyond its LSF
carries to a star it saw only through MILES. Per star and the medians are printed.
"""

from __future__ import annotations

import argparse


def main(argv=None) -> int:
    import numpy as np
    import torch

    from stellarfield.eval.pairs import continuum_rms, load_pairs, observed_as, with_flux
    from stellarfield.model.checkpoint import load_model
    from stellarfield.model.predict import fit_star_spectra

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="run folder, or 'reference'")
    p.add_argument("--data", nargs="+", required=True, help="dataset folder(s)")
    p.add_argument("--split", default="validation", help="split of the pairs (default validation)")
    p.add_argument("--refine-steps", type=int, default=200, help="Adam steps per fit (default 200)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    trained = load_model(args.model)
    pairs = load_pairs(args.data, args.split, ("stelib", "miles"))
    if not pairs:
        print(f"no star of split {args.split!r} has both a STELIB and a MILES spectrum")
        return 1
    render = dict(n_samples=0, normalise=False)
    scores = {"through STELIB": [], "through MILES, blurred": [], "STELIB own fit": []}
    for pair in pairs:
        miles, stelib = pair["miles"], pair["stelib"]
        fit = fit_star_spectra(trained, [miles], refine_steps=args.refine_steps)
        through_stelib = fit.render(to="stelib", wave_grid=stelib.wavelength, **render).flux
        on_miles = fit.render(to="miles", wave_grid=miles.wavelength, **render).flux
        through_miles = observed_as(with_flux(miles, on_miles), stelib)  # blurred to STELIB's LSF, on its pixels
        own = fit_star_spectra(trained, [stelib], refine_steps=args.refine_steps).render(
            to="stelib", wave_grid=stelib.wavelength, **render).flux
        same_pixels = np.isfinite(through_miles)
        row = {}
        for name, flux in zip(scores, (through_stelib, through_miles, own)):
            row[name] = continuum_rms(stelib, np.where(same_pixels, flux, np.nan))[0]
            scores[name].append(row[name])
        print(f"{pair['star_id']}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items()), flush=True)
    medians = {k: float(np.median(v)) for k, v in scores.items()}
    better = int(np.sum(np.array(scores["through STELIB"]) < np.array(scores["through MILES, blurred"])))
    print(f"median RMS over {len(pairs)} stars of split {args.split!r}: "
          + ", ".join(f"{k} {v:.4f}" for k, v in medians.items())
          + f"; through STELIB's instrument lower for {better} of {len(pairs)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
