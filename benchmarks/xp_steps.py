"""Gaia XP alone: how held-out chi2_nu falls with decoder steps (the default recipe, XP only).

    python benchmarks/xp_steps.py DEMO --steps 800 4000

Trains the default recipe on the first ``--n-train`` Gaia XP spectra of the dataset's train split
for each step count (same seed), fits ``--n-val`` validation-split spectra with 100 refinement steps
(``--refine-steps``) and prints the median chi2_nu (Gaia XP errors) and the training time. Used to choose how often the
cheap product is in a step (README, "The model"). ``--resolution R`` gives the records a per-pixel
LSF FWHM of lambda / R (the LSF the model blurs Gaia XP with: otherwise the profile's
``model_resolution``; R ~ 30-100 across the range). ``--config`` sets other :class:`TrainConfig`
fields (JSON), e.g. ``'{"encoding": "fourier"}'`` for the trunk's encoding.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from stellarfield.data.store import Dataset
from stellarfield.model.batching import TrainingData
from stellarfield.model.inference import infer, summarise
from stellarfield.model.train import TrainConfig, train


def xp_spectra(dataset: str, split: str, n: int, resolution: float | None) -> list:
    out = []
    for s in Dataset(dataset).iter_spectra(split=split, products=["gaia_xp"]):
        if resolution:  # a per-pixel LSF overrides the product profile's model_resolution
            for seg in s.segments:
                seg.lsf_fwhm = seg.wavelength / resolution
        out.append(s)
        if len(out) >= n:
            break
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dataset", help="a dataset with Gaia XP spectra (stellarfield ingest demo --out DEMO)")
    ap.add_argument("--steps", type=int, nargs="+", default=[800, 4000], help="training step counts to compare")
    ap.add_argument("--n-train", type=int, default=4000, help="training spectra")
    ap.add_argument("--n-val", type=int, default=64, help="validation spectra fitted")
    ap.add_argument("--config", default="{}", help='TrainConfig fields as JSON, e.g. \'{"encoding": "fourier"}\'')
    ap.add_argument("--resolution", type=float, default=None, help="blur Gaia XP with R instead of the profile's model_resolution")
    ap.add_argument("--refine-steps", type=int, nargs="+", default=[100],
                    help="Adam steps of the validation fit from z = 0 (several: each is scored; the reference "
                         "model's Gaia XP fit converges by 300)")
    ap.add_argument("--runs", default=None,
                    help="keep each run in this folder (RUNS/steps-N; its metrics.jsonl has the training loss "
                         "against steps, to compare recipes at equal steps); default: a temporary folder")
    args = ap.parse_args()
    torch.set_num_threads(1)
    train_set = xp_spectra(args.dataset, "train", args.n_train, args.resolution)
    val_set = xp_spectra(args.dataset, "validation", args.n_val, args.resolution)
    print(f"Gaia XP: {len(train_set)} training, {len(val_set)} validation spectra; 1 torch thread")
    for steps in args.steps:
        config = TrainConfig(**json.loads(args.config), minutes=None, max_steps=steps, split_spectra=False, prior_steps=10,
                             final_val_max_per_product=1, validate_every_s=None)
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            run_dir = Path(args.runs) / f"steps-{steps}" if args.runs else Path(tmp) / "run"
            run = train(train_set, run_dir, config, progress=False)
            seconds = time.perf_counter() - t0
            data = TrainingData(val_set, instruments=run.model.instruments)
            scores = {n: summarise(infer(run.model, data, method="refine", refine_steps=n))["gaia_xp"]
                      for n in args.refine_steps}
        fits = ", ".join(f"{v['chi2_nu_median']:.3f} after {n} fit steps" for n, v in scores.items())
        print(f"steps {steps:6d}: validation chi2_nu median {fits} (n = {len(val_set)}), trained in {seconds:.0f} s")


if __name__ == "__main__":
    main()
