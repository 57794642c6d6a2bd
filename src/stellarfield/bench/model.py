"""The benchmark's view of a trained model: its fits.

Everything here goes through the model's public API (:func:`stellarfield.model.fit.fit_spectra`);
nothing is re-implemented.

* :func:`fit_records` fits spectra and returns one dict per key (latent, rv_kms, chi2_nu, the model
  spectrum on the native pixels) plus the time it took (``fit_spectra`` leaves the records as
  they are).
* :func:`fitted_parameters` counts the parameters fitted to one spectrum (latent, continuum
  coefficients of each segment, RV), the degrees of freedom a chi2_nu subtracts.
* :func:`instrument_for`: the instrument a product's spectra are fitted with.

The generation speed against the Payne emulator is a measurement: :mod:`stellarfield.eval.speed`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import numpy as np

from stellarfield.model.checkpoint import TrainedModel
from stellarfield.model.fit import fit_spectra
from stellarfield.model.instrument import Instrument, ProductStats, build_instrument
from stellarfield.spectrum import Spectrum


def fit_records(trained: TrainedModel, spectra: Iterable[Spectrum], refine_steps: int = 100,
                batch: int | None = None, method: str | None = None, progress: bool = False) -> tuple[dict[str, dict], float]:
    """Fit ``spectra`` (fit_spectra leaves them unchanged); return ``({key: row}, seconds)``.

    ``progress``: fit_spectra's tqdm bar (total = spectra, rate in spectra/s).

    Each row is a :func:`~stellarfield.model.fit.fit_spectra` row as a dict, with ``latent`` and
    ``model_flux`` as numpy arrays (``model_flux`` NaN at pixels the fit did not use).
    """
    records = list(spectra)
    if not records:
        return {}, 0.0
    start = time.perf_counter()
    table = fit_spectra(trained, records, method=method, refine_steps=refine_steps, batch=batch, keep_model_flux=True,
                        progress=progress)
    seconds = time.perf_counter() - start
    rows = {}
    for row in table.to_pylist():
        row["latent"] = None if row["latent"] is None else np.asarray(row["latent"], dtype=np.float64)
        flux = row.get("model_flux")
        row["model_flux"] = None if flux is None else np.array([np.nan if v is None else v for v in flux], dtype=np.float64)
        row.pop("wavelength", None)
        rows[row["key"]] = row
    return rows, seconds


def instrument_for(trained: TrainedModel, product: str, spectra: Iterable[Spectrum]) -> Instrument:
    """The model's instrument of ``product``, or the one ``fit_spectra`` builds for a product it never saw."""
    if product in trained.model.instruments:
        return trained.model.instruments[product]
    stats = ProductStats(product)
    for s in spectra:
        stats.add(s)
    return build_instrument(stats)


def fitted_parameters(inst: Instrument, spectrum: Spectrum, latent_dim: int, rv_fitted: bool) -> int:
    """Latent dimension + (continuum degree + 1) per segment with good pixels + 1 if an RV was fitted."""
    segments = sum(1 for seg in spectrum.segments if seg.name in inst.segment_names and seg.mask.any())
    return inst.fitted_parameters(latent_dim, segments, rv_fitted)
