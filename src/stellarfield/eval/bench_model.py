"""The benchmark's view of a trained model: fits, speed.

Everything here goes through the model's public API (:func:`stellarfield.model.fit.fit_spectra`,
:class:`stellarfield.model.generate.RenderedBasis`); nothing is re-implemented.

* :func:`fit_records` fits spectra and returns one dict per key (latent, rv_kms, chi2_nu, the model
  spectrum on the native pixels) plus the time it took. The records are copied first:
  ``fit_spectra`` masks, in place, pixels outside the wavelengths the model was trained on.
* :func:`fitted_parameters` counts the parameters fitted to one spectrum (latent, continuum
  coefficients of each segment, RV), the degrees of freedom a chi2_nu subtracts.
* :func:`generation_speed` times generation on an instrument's native grid against
  :class:`~stellarfield.eval.payne.PayneEmulator` on as many pixels, interleaved in one process,
  both on the CPU (a model on a GPU is timed through a CPU copy, :func:`on_cpu`).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable
from dataclasses import replace

import numpy as np
import torch

from stellarfield.eval.payne import PayneEmulator
from stellarfield.model.checkpoint import TrainedModel
from stellarfield.model.fit import fit_spectra
from stellarfield.model.generate import RenderedBasis
from stellarfield.model.instrument import Instrument, ProductStats, build_instrument
from stellarfield.spectrum import Spectrum

#: Labels of the Payne emulator timed against the model (The Payne's 25 APOGEE labels; the cost
#: is dominated by the last layer, 300 x pixels, so this number hardly matters).
PAYNE_LABELS = 25


def fit_records(trained: TrainedModel, spectra: Iterable[Spectrum], refine_steps: int = 100,
                batch: int = 64, method: str | None = None, progress: bool = False) -> tuple[dict[str, dict], float]:
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


def on_cpu(trained: TrainedModel) -> TrainedModel:
    """``trained`` itself when its model is on the CPU, else a copy with a CPU copy of the model
    (the original stays where it is)."""
    if trained.model.device.type == "cpu":
        return trained
    return replace(trained, model=copy.deepcopy(trained.model).to("cpu"))


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


def best_seconds(fn, repeats: int) -> float:
    """The shortest wall time (s) of ``repeats`` calls of ``fn()``: the speed the machine allows,
    least disturbed by other work."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def generation_speed(trained: TrainedModel, product: str, batch: int = 1024, repeats: int = 5, seed: int = 0) -> dict:
    """Spectra per second generating ``batch`` spectra on ``product``'s native grid, model vs Payne.

    Both run on the CPU (the model through :func:`on_cpu` if it lives on a GPU), so the comparison
    is side by side on one device. Model: the branch MLP on random latents and one matrix product with the cached, blurred trunk
    (:class:`RenderedBasis`, built once, its build time reported apart), written into a
    preallocated array as :func:`~stellarfield.model.generate.generate` does. Payne: labels ->
    300 -> 300 -> pixels. Timed alternately (so both see the same machine load), best of
    ``repeats`` each, after one warm-up call.
    """
    model = on_cpu(trained).model
    inst = model.instrument(product)
    start = time.perf_counter()
    basis = RenderedBasis.build(model, inst, [s.native_wavelength() for s in inst.segments])
    build_s = time.perf_counter() - start
    n_pixels = int(basis.u_pixels.shape[0])
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, model.latent_dim, generator=g)
    labels = torch.rand(batch, PAYNE_LABELS, generator=g)
    emulator = PayneEmulator(PAYNE_LABELS, n_pixels).eval()
    buffer = torch.empty(batch, n_pixels)
    with torch.no_grad():
        ours = lambda: basis.spectra(model.decoder.coefficients(z), out=buffer)  # noqa: E731
        theirs = lambda: emulator(labels)  # noqa: E731
        ours(), theirs()
        model_s, payne_s = float("inf"), float("inf")
        for _ in range(repeats):
            model_s = min(model_s, best_seconds(ours, 1))
            payne_s = min(payne_s, best_seconds(theirs, 1))
    return {
        "model_spectra_per_s": batch / model_s,
        "payne_spectra_per_s": batch / payne_s,
        "ratio": payne_s / model_s,
        "pixels": n_pixels,
        "batch": batch,
        "repeats": repeats,
        "basis_build_s": build_s,
        "device": "cpu",
    }
