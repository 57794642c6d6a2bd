"""Fit a trained model to spectra: latent, radial velocity, goodness of fit, anomaly score, model spectrum.

>>> from stellarfield.model import fit_spectra
>>> table = fit_spectra("runs/demo", read_spectra("apStar-r6-2M00452143+1634446.fits"))   # doctest: +SKIP
>>> table.column("rv_kms"), table.column("chi2_nu")                                         # doctest: +SKIP

One row per spectrum (a ``pyarrow.Table``; :func:`write_fit_table` saves it as Parquet):

============== =============================================================================
key, object_id, product, survey, instrument    identifiers of the record
latent         list<float32>, the star's latent
rv_kms         fitted radial velocity (km/s; lambda_obs = (1 + v/c) lambda_rest); null where
               the product's frame or resolution gives none to fit (rest-frame low-res, Gaia XP)
rv_err_kms     1-sigma RV error: the chi2(v) curvature, widened where parts of the spectrum disagree,
               marginalised over the latent (model.rv.velocity_error)
chi2_nu        chi2 with the survey's errors / (pixels - parameters), see inference.py
n_pixels       good pixels used
anomaly_score  -log p(z | product) / D under the latent prior, of the stars the product observes
               (every product's for a product with fewer than 20 stars in the prior or unknown
               to it; ~1.4 typical; null without a prior)
wavelength     list<float64>, the native pixels (vacuum A, product frame, segments concatenated)
model_flux     list<float32>, model x fitted continuum at those pixels (null where unused)
flags          list<string>: "nan_pixels_masked" (non-finite input flux/ivar, masked),
               "new_instrument" (product unknown to the model: observed through an instrument
               built from the records, default scatter), "pixels_outside_training_range"
               (masked), "no_usable_pixels" (nothing left to fit: results are null)
============== =============================================================================
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from stellarfield.model.batching import TrainingData
from stellarfield.model.generate import as_trained, mask_outside_coverage, trained_coverage
from stellarfield.model.inference import METHODS, infer
from stellarfield.model.instrument import instruments_for

#: Refinement without an encoder: Adam steps from the starting latent, and their step size.
DEFAULT_REFINE_STEPS = 50
DEFAULT_REFINE_LR = 0.05


def _sanitise(spectrum):
    """(record with non-finite pixels masked, flag list). The Segment constructor already masks
    non-finite flux/ivar; this records that it happened."""
    flags = []
    bad = sum(int((~np.isfinite(s.flux)).sum() + (~np.isfinite(s.ivar)).sum()) for s in spectrum.segments)
    if bad:
        flags.append("nan_pixels_masked")
    return spectrum, flags


def default_method(trained) -> str:
    """The latent's starting point a run's objective gives without an encoder: "gon+refine" for a GON
    model, "refine" (from z = 0) otherwise."""
    objective = (trained.config.get("train_config") or {}).get("objective", "autodecoder")
    return "gon+refine" if objective == "gon" else "refine"


def fit_spectra(model, spectra, method: str | None = None, refine_steps: int | None = None, batch: int | None = None,
                keep_model_flux: bool = True, progress: bool = False, rv_search: str | None = None) -> pa.Table:
    """Fit every spectrum in ``spectra`` (any iterable of Spectrum) with a trained model.

    Args:
        model: run folder, :class:`TrainedModel` or :class:`RunResult`.
        method: "gon", "gon+refine", "refine", "encoder" or "encoder+refine" (default: "encoder+refine"
            for a model with an encoder, else "gon+refine" for a GON model, "refine" for an
            auto-decoder), see :mod:`stellarfield.model.inference`.
        refine_steps: Adam steps on latent and RV. Default: after an encoder, each product's steps,
            refiner and velocity search chosen on the validation split and saved with the encoder
            (``model.encoder.fit_settings``); otherwise 50 (measured on validation spectra: 100 steps
            lower the median chi2_nu by 2-10% and take twice as long; 30 steps lose 5-50% on Gaia XP).
        rv_search: "full" (multi-peak chi2 scans) or "ccf" (the cross-correlation peak, refined by the
            gradient steps); default "full" (after an encoder: the validated setting).
        batch: spectra fitted together (default: as many as make 2**18 padded pixels, at most 1,024,
            :func:`stellarfield.model.inference.chunk_size`; the results do not depend on it).
        keep_model_flux: include wavelength and model_flux columns.
    """
    trained = as_trained(model)
    m = trained.model
    if method is None and m.encoder is not None:
        method = "encoder+refine"
    elif method is None:
        method = default_method(trained)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    # after an encoder, each product's validated setting, unless the caller sets the steps or the search
    validated = method.startswith("encoder") and refine_steps is None and rv_search is None
    settings = {name: m.encoder.fit_setting(name) for name in m.instruments} if validated else None
    refine_steps = DEFAULT_REFINE_STEPS if refine_steps is None else refine_steps
    rv_search = rv_search or "full"
    records, flags = [], {}
    for s in spectra:
        s, f = _sanitise(s)
        records.append(s)
        flags[s.key] = f
    if not records:
        return _table([], keep_model_flux)

    # products the model never saw: an instrument from the records themselves (documented fallback)
    instruments = instruments_for(m, records)
    new = set(instruments) - set(m.instruments)

    # pixels outside the wavelengths the model was trained on carry no information: mask them
    # (on copies of the segments: the caller's records are never modified)
    cover = trained_coverage(m)
    for i, s in enumerate(records):
        masked = mask_outside_coverage(s, cover)
        if masked is not s:
            records[i] = masked
            flags[s.key].append("pixels_outside_training_range")
        if s.product in new:
            flags[s.key].append("new_instrument")

    data = TrainingData(records, instruments=instruments)
    from tqdm.auto import tqdm

    bar = tqdm(total=len(data), disable=not progress, unit="spectrum")
    results = infer(m.with_instruments(instruments), data, method=method, refine_steps=refine_steps, chunk=batch,
                    keep_prediction=keep_model_flux, progress=bar, lr=DEFAULT_REFINE_LR, rv_search=rv_search,
                    per_product=settings)
    bar.close()

    by_key = {s.key: s for s in records}
    rows = []
    for name, r in results.items():
        # how unusual the latent is for the stars this product observes (every product's, for a product the prior does not know)
        score = trained.prior.anomaly_score(torch.from_numpy(r.latent), name).numpy() if trained.prior is not None else None
        for i, key in enumerate(r.keys):
            s = by_key[key]
            f = list(flags[key])
            usable = int(r.n_pixels[i]) > 0
            if not usable:
                f.append("no_usable_pixels")
            row = {
                "key": key, "object_id": s.object_id, "product": s.product, "survey": s.survey,
                "instrument": s.instrument,
                "latent": r.latent[i].astype(np.float32) if usable else None,
                "rv_kms": _num(r.rv_kms[i]) if usable else None,
                "rv_err_kms": _num(r.rv_err_kms[i]) if usable else None,
                "chi2_nu": _num(r.chi2_nu[i]) if usable else None,
                "n_pixels": int(r.n_pixels[i]),
                "anomaly_score": _num(score[i]) if usable and score is not None else None,
                "flags": f,
            }
            if keep_model_flux:
                row["wavelength"] = s.wavelength
                row["model_flux"] = r.prediction[i].astype(np.float32) if usable else None
            rows.append(row)
    for p, n in data.skipped.items():  # cannot happen (every product has an instrument), kept for safety
        raise RuntimeError(f"{n} spectra of {p} were not fitted")
    return _table(rows, keep_model_flux)


def _num(x) -> float | None:
    x = float(x)
    return x if np.isfinite(x) else None


def _table(rows: list[dict], keep_model_flux: bool) -> pa.Table:
    fields = [
        ("key", pa.string()), ("object_id", pa.string()), ("product", pa.string()), ("survey", pa.string()),
        ("instrument", pa.string()), ("latent", pa.list_(pa.float32())), ("rv_kms", pa.float64()),
        ("rv_err_kms", pa.float64()), ("chi2_nu", pa.float64()), ("n_pixels", pa.int64()),
        ("anomaly_score", pa.float64()), ("flags", pa.list_(pa.string())),
    ]
    if keep_model_flux:
        fields += [("wavelength", pa.list_(pa.float64())), ("model_flux", pa.list_(pa.float32()))]
    schema = pa.schema(fields)
    columns = {name: [row.get(name) for row in rows] for name, _ in fields}
    return pa.table({name: pa.array(columns[name], type=t) for name, t in fields}, schema=schema)


def write_fit_table(table: pa.Table, path: str | os.PathLike) -> Path:
    """Write a :func:`fit_spectra` table to Parquet atomically (temporary file + rename)."""
    from stellarfield.atomic import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path
