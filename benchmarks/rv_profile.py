"""Where a fitted velocity disagrees with the survey's: did the search miss, or does the likelihood disagree?

    python benchmarks/rv_profile.py --model reference --data DS --product galah_dr3_observed
        [--split test|all] [--keys KEY ...] [--all] [--half-width 10] [--points 21] [--steps 150]
        [--reference-kms V --reference-what TEXT]

Each spectrum of ``--product`` in ``--split`` (or only the records ``--keys``) is fitted as the bench
fits it (:func:`stellarfield.bench.model.fit_records`: ``fit_spectra``, the model's own method, 100
refinement steps, pixels outside the model's coverage masked). The survey's velocity is the
bench's headline comparison for the product (:func:`stellarfield.bench.rv.references_for`: e.g. GALAH's
``c (CRVAL1[ext0]/CRVAL1[ext4] - 1)``, the apStar's per-visit VHELIO for an apVisit), brought into the
fit's frame (its correction, e.g. APOGEE's barycentric one, taken off); ``--reference-kms`` puts
one given velocity in its place for every record (e.g. LAMOST LRS's c*Z of a star whose MRS files
state no velocity). Without ``--all`` only the
bench's outliers are profiled (:func:`stellarfield.bench.rv.outlier_count`: more than 5 sigma, the
fit's and the survey's errors in quadrature, from the survey at the survey's S/N > 20).

The profile likelihood in v: at ``--points`` velocities within ``--half-width`` km/s of the fitted
value and as many about the survey's (one evenly spaced span where the two overlap), the latent is
refined for ``--steps`` Adam steps with the velocity held, starting from the fitted latent, and the
survey-error chi2 is summed over the pixels good at every velocity tried (at the fitted and the
survey's velocity too, with the same refinement, so that only the velocity differs). Printed per
spectrum: the survey's and the fitted velocity, the profile's minimum (a parabola through its lowest
point and the two beside it, never more than the tolerance below the lowest chi2 measured), and the
chi2 above that minimum at the fit and at the survey's velocity, with a verdict:

* ``agree``: the survey's velocity is as good as the minimum (its chi2 within the tolerance): the
  difference is inside the likelihood's own width;
* ``likelihood``: the fit sits at the profile's minimum (within 2 fitted errors or one grid step) and
  the survey's velocity is worse: through this model the data prefer the fitted velocity (template
  mismatch, or the survey's value);
* ``search``: the profile's minimum lies away from the fit and nearer the survey's velocity: a better
  solution the fit did not reach;
* ``neither``: the minimum lies away from the fit and no nearer the survey.

Last, the fitted velocity in the survey's frame (the correction put back: heliocentric for an
apVisit, so that the visits of one star, whose barycentric corrections differ, can be compared).

The tolerance is 1, or 3 times the change of the fit's chi2 when the latent is refined for twice as
many steps, whichever is larger. The chi2 use the survey's errors: a difference of 1 is one sigma
only where those errors are right. Each velocity's latent is refined from the same start, so the
profile is not perfectly smooth (a few chi2 on ~15,000 pixels): read "chi2 above the minimum at the
fit" as a guide only.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import numpy as np
import torch

from stellarfield.bench.model import fit_records
from stellarfield.bench.rv import apstar_visit_table, outlier_count, references_for
from stellarfield.data.store import Dataset
from stellarfield.model.batching import TrainingData
from stellarfield.model.checkpoint import load_model
from stellarfield.model.generate import mask_outside_coverage, trained_coverage
from stellarfield.model.inference import blurred_basis
from stellarfield.model.instrument import instruments_for
from stellarfield.model.latents import refine_latents
from stellarfield.model.likelihood import evaluate, mean_model, observe, variance
from stellarfield.model.reference import resolve_model_path


def chi2_per_pixel(model, obs, basis, z: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Survey-error chi2 of each pixel of one observation at ``obs.v`` and latent ``z`` (1, D), and
    which pixels count (good and inside the model's grid at this velocity)."""
    with torch.no_grad():
        var = variance(model, obs)
        fit = evaluate(obs, model.decoder.coefficients(z), basis, obs.v, var, blurred_basis=True)
        chi2 = torch.where(fit.good, (obs.batch.flux - fit.prediction) ** 2 / var, 0.0)
    return chi2[0].double().cpu().numpy(), fit.good[0].cpu().numpy()


def profile_minimum(velocities: np.ndarray, chi2: np.ndarray) -> tuple[float, float]:
    """Velocity and chi2 at the vertex of the parabola through the lowest point and its neighbours
    (the lowest point itself at either end of the grid, or where the three are not convex).
    ``velocities`` increasing."""
    k = int(np.argmin(chi2))
    if k in (0, len(chi2) - 1):
        return float(velocities[k]), float(chi2[k])
    a, b, c = np.polyfit(velocities[k - 1: k + 2], chi2[k - 1: k + 2], 2)
    if a <= 0:
        return float(velocities[k]), float(chi2[k])
    v = -b / (2 * a)
    return float(v), float(c - b * b / (4 * a))


def profile_velocities(v_fit: float, v_survey: float, half_width: float, points: int) -> np.ndarray:
    """``points`` velocities within ``half_width`` km/s of each of the two values, evenly spaced; where
    the two spans overlap, one even grid over both (no two velocities closer than the step, so that a
    parabola through neighbours is not thrown by the refinement's noise)."""
    step = 2 * half_width / (points - 1)
    lo, hi = min(v_fit, v_survey) - half_width, max(v_fit, v_survey) + half_width
    if hi - lo <= 4 * half_width + step:
        return np.linspace(lo, hi, int(round((hi - lo) / step)) + 1)
    return np.concatenate([np.linspace(v - half_width, v + half_width, points) for v in sorted((v_fit, v_survey))])


def verdict(v_fit: float, err: float, v_survey: float, v_min: float, above_survey: float,
            tolerance: float, step: float) -> str:
    """See the module docstring."""
    if above_survey <= tolerance:
        return "agree"
    if abs(v_min - v_fit) <= max(2 * err, step):
        return "likelihood"
    return "search" if abs(v_min - v_survey) < abs(v_fit - v_survey) else "neither"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="reference", help="run folder or 'reference'")
    ap.add_argument("--data", nargs="+", required=True, help="dataset folder(s)")
    ap.add_argument("--product", required=True)
    ap.add_argument("--split", default="test")
    ap.add_argument("--keys", nargs="*", help="only these records (dataset keys)")
    ap.add_argument("--all", action="store_true", help="profile every spectrum, not only the outliers")
    ap.add_argument("--half-width", type=float, default=10.0, help="km/s beyond the two velocities")
    ap.add_argument("--points", type=int, default=21, help="velocities about each of the two values (>= 3)")
    ap.add_argument("--steps", type=int, default=150, help="Adam steps on the latent at each velocity")
    ap.add_argument("--reference-kms", type=float,
                    help="compare with this velocity (km/s, the survey's frame) instead of the product's survey "
                         "value: e.g. another survey's velocity of the same star, for a product that states none")
    ap.add_argument("--reference-what", default="the velocity given", help="what --reference-kms is (printed)")
    args = ap.parse_args(argv)
    if args.points < 3 or args.steps < 1 or args.half_width <= 0:
        ap.error("--points must be >= 3, --steps >= 1 and --half-width > 0")
    torch.set_num_threads(1)

    split = None if args.split == "all" else args.split
    records = [s for d in args.data for s in Dataset(d).iter_spectra(split=split, products=[args.product])]
    if args.keys:
        wanted = set(args.keys)
        records = [s for s in records if s.key in wanted]
    if not records:
        raise SystemExit(f"no {args.product} spectra in the {args.split} split of {args.data}")
    trained = load_model(resolve_model_path(args.model))
    model = trained.model
    if model.instrument(args.product).rv_scan_kms <= 0:
        raise SystemExit(f"the model fits no radial velocity for {args.product}")
    visits = apstar_visit_table(records) if args.product == "apogee_apvisit" else None
    reference = references_for(args.product, records[0].frame, visits)[0]
    if args.reference_kms is not None:  # one value for every record, in the frame the product's own would be
        reference = replace(reference, description=f"{args.reference_what}: {args.reference_kms:g} km/s",
                            reference=lambda s: args.reference_kms, error=lambda s: float("nan"))
    print(f"{args.product}, {args.split} split: {len(records)} spectra; survey velocity: {reference.description}")

    rows, _ = fit_records(trained, records, refine_steps=100)  # as the bench fits them
    cover = trained_coverage(model)
    records = [mask_outside_coverage(s, cover) for s in records if s.key in rows]  # as fit_spectra masks them
    data = TrainingData(records, instruments=instruments_for(model, records))
    basis = blurred_basis(model, args.product)
    mean_grid = mean_model(model, basis).detach()
    product_data = data.products[args.product]
    by_key = {s.key: s for s in records}
    step = 2 * args.half_width / (args.points - 1)  # of the profile's velocities (profile_velocities)
    print(f"{'record':34s} {'S/N':>5s} {'survey':>8s} {'fitted':>8s} {'+-':>5s} {'minimum':>8s} "
          f"{'chi2: fit':>9s} {'survey':>9s} {'tolerance':>9s}  {'verdict':10s} {'fit, survey frame':>17s}"
          "   (velocities km/s; chi2 above the minimum)")
    for i, key in enumerate(product_data.keys):
        s, row = by_key[key], rows[key]
        v_fit, err = row["rv_kms"], row["rv_err_kms"]
        correction = reference.correction(s)
        v_survey = reference.reference(s) - correction
        if v_fit is None or err is None or not np.isfinite(v_survey):
            continue
        difference, survey_error = np.array([v_fit - v_survey]), np.array([reference.error(s)])
        outlier = outlier_count(difference, np.array([err]), survey_error, np.array([s.label("snr")]))["n_beyond"]
        if not (args.all or outlier):
            continue
        batch = product_data.batch(torch.tensor([i])).to(model.device)
        z_fit = torch.as_tensor(row["latent"][None], dtype=torch.float32, device=model.device)
        velocities = profile_velocities(v_fit, v_survey, args.half_width, args.points)
        per_velocity = []
        for v, steps in [(v_fit, args.steps), (v_fit, 2 * args.steps), (v_survey, args.steps),
                         *((v, args.steps) for v in velocities)]:
            v0 = torch.tensor([v], dtype=torch.float64, device=model.device)
            obs = observe(model, batch, full_grid=True, v_init=v0, mean_grid=mean_grid)
            z = refine_latents(model, [obs], [basis], z_fit, steps, fit_velocity=False)
            per_velocity.append(chi2_per_pixel(model, obs, basis, z))
        common = np.logical_and.reduce([good for _, good in per_velocity])  # one pixel set for every velocity
        chi2 = [float(c[common].sum()) for c, _ in per_velocity]
        at_fit, at_fit_longer, at_survey, profile = chi2[0], chi2[1], chi2[2], np.array(chi2[3:])
        tolerance = max(1.0, 3 * abs(at_fit - at_fit_longer))
        v_min, chi2_min = profile_minimum(velocities, profile)
        chi2_min = max(min(chi2_min, at_fit, at_survey), min(profile.min(), at_fit, at_survey) - tolerance)
        above_fit, above_survey = at_fit - chi2_min, at_survey - chi2_min
        print(f"{key:34s} {s.label('snr'):5.1f} {v_survey:8.2f} {v_fit:8.2f} {err:5.2f} {v_min:8.2f} "
              f"{above_fit:9.1f} {above_survey:9.1f} {tolerance:9.1f}  "
              f"{verdict(v_fit, err, v_survey, v_min, above_survey, tolerance, step):10s} "
              f"{v_fit + correction:17.2f}", flush=True)


if __name__ == "__main__":
    main()
