"""The generative model of stellar spectra: a coordinate-based decoder observed through each survey's
instrument, trained without labels (auto-decoder or GON), with a latent prior to sample new stars.

Public API (see each module for details)::

    train(data, out_dir, config=TrainConfig(), resume=False, progress=True) -> RunResult
    load_model(run_dir) -> TrainedModel
    generate(model, n, instrument=None | wave_range=(A, B), resolution=R | wave_grid=..., rv_kms=None, seed=0)
        -> GeneratedSpectra (.write("x.fits" | "x.parquet"), .plot("x.png"))
    fit_spectra(model, spectra, method=None, refine_steps=100, batch=None) -> pyarrow.Table
    write_fit_table(table, path)
    predict(model, spectra_of_one_star, to=PRODUCT | wave_range=(A, B), resolution=R | wave_grid=...)
        -> PredictedSpectrum (flux, flux_lo, flux_hi, latent, per-input rv/chi2; .write("x.fits"))
"""

from stellarfield.model.checkpoint import ModelLoadError, TrainedModel, load_model
from stellarfield.model.fit import fit_spectra, write_fit_table
from stellarfield.model.generate import GeneratedSpectra, OutOfRangeError, generate
from stellarfield.model.predict import PredictedSpectrum, predict
from stellarfield.model.stellar_model import StellarModel
from stellarfield.model.train import RunResult, TrainConfig, train

__all__ = [
    "GeneratedSpectra", "ModelLoadError", "OutOfRangeError", "PredictedSpectrum", "RunResult", "StellarModel",
    "TrainConfig", "TrainedModel", "fit_spectra", "generate", "load_model", "predict", "train", "write_fit_table",
]
