"""Realism of generated stars: generated vs held-out real spectra of one instrument, side by side.

1. ``n`` latents are drawn from the model's prior and rendered on the instrument's typical native
   grid (:func:`stellarfield.model.generate.generate`, rest frame: no velocity).
2. The real held-out spectra are moved to the rest frame with the velocity **the model fitted**
   to them (``lambda_rest = lambda_obs / (1 + v/c)``; rest-frame products are used as they are) and
   resampled linearly onto the same grid, segment by segment (:class:`~.common_grid.CommonGrid`).
3. Both are divided by a per-spectrum pseudo-continuum, because generated spectra carry no
   instrument response (the model fits that per spectrum as a smooth continuum, see
   :mod:`stellarfield.model.objectives`): a running median over ``window`` Angstrom per segment
   (window = min(200 A, segment span / 5)) for products whose model continuum is a polynomial,
   the median flux for flux-calibrated SEDs (Gaia XP, MILES), whose shape is information.
4. A classifier two-sample test (:func:`~.two_sample.classifier_two_sample_test`, logistic
   regression on the first 10 principal components, 5-fold held-out AUC; 0.5 = indistinguishable)
   on the grid pixels good in at least 90% of the real spectra; and the depths and equivalent
   widths of the strong lines the grid covers (:mod:`.lines`), generated vs real.

The prior is shared by every instrument, so the generated population is that of all training
stars, while one instrument's held-out stars are its survey's selection: an AUC above 0.5 measures
a difference of populations as well as of realism.
"""

from __future__ import annotations

import copy

import numpy as np

from stellarfield.data.spectrum import Spectrum
from stellarfield.eval.common_grid import CommonGrid
from stellarfield.eval.lines import STRONG_LINES, compare_line_distributions, features_covered, measure_features
from stellarfield.eval.normalise import running_median_continuum
from stellarfield.eval.two_sample import classifier_two_sample_test
from stellarfield.model.checkpoint import TrainedModel
from stellarfield.model.generate import GeneratedSpectra, generate
from stellarfield.physics.doppler import rest_wavelength

#: Principal components the two-sample classifier sees.
C2ST_COMPONENTS = 10
#: A grid pixel is a feature when at least this fraction of the real spectra are good there.
MIN_GOOD_FRACTION = 0.9
#: Largest running-median window of the pseudo-continuum, Angstrom.
CONTINUUM_WINDOW_A = 200.0


def rest_frame_copy(spectrum: Spectrum, v_kms: float) -> Spectrum:
    """A copy of ``spectrum`` with every wavelength divided by ``1 + v/c`` (frame set to rest)."""
    out = copy.deepcopy(spectrum)
    if v_kms:
        for segment in out.segments:
            segment.wavelength = rest_wavelength(segment.wavelength, float(v_kms))
    out.frame = "rest"
    return out


def grid_of(generated: GeneratedSpectra) -> CommonGrid:
    """The generated spectra's grid as a :class:`CommonGrid` (one segment per generated segment)."""
    edges = np.concatenate([[0], np.cumsum(generated.segment_lengths)])
    waves = [generated.wavelength[a:b] for a, b in zip(edges[:-1], edges[1:])]
    return CommonGrid(list(generated.segment_names), waves)


def pseudo_continuum_normalised(grid: CommonGrid, flux: np.ndarray, good: np.ndarray, how: str) -> np.ndarray:
    """Rows of ``flux`` (N, P) on ``grid`` divided by their pseudo-continuum; NaN where not good.

    ``how``: ``"continuum"`` (running median per segment) or ``"median"`` (one number per spectrum).
    """
    out = np.full(flux.shape, np.nan)
    for i in range(flux.shape[0]):
        if how == "median":
            values = flux[i][good[i]]
            divisor = np.full(flux.shape[1], np.median(values) if values.size else np.nan)
        else:
            parts = []
            for sl, wave in zip(grid.segment_slices.values(), grid.segment_wavelengths):
                window = min(CONTINUUM_WINDOW_A, (wave[-1] - wave[0]) / 5.0)
                parts.append(running_median_continuum(wave, flux[i, sl], good[i, sl], window))
            divisor = np.concatenate(parts)
        ok = good[i] & np.isfinite(divisor) & (divisor > 0)
        out[i, ok] = flux[i, ok] / divisor[ok]
    return out


def _line_values(measurements: list[dict], name: str, what: str) -> np.ndarray:
    return np.array([getattr(m[name], what) for m in measurements], dtype=np.float64)


def realism_for_product(
    trained: TrainedModel,
    product: str,
    real: list[Spectrum],
    fitted_rv_kms: dict[str, float | None],
    n_generated: int,
    seed: int = 0,
) -> tuple[dict, GeneratedSpectra]:
    """Two-sample AUC and line distributions of ``n_generated`` generated vs ``real`` spectra.

    ``fitted_rv_kms``: the model's fitted RV of each real spectrum by key (None where not fitted;
    such spectra of an observed-frame product are left out). Returns the section's numbers and
    the generated spectra (for the gallery).
    """
    inst = trained.model.instrument(product)
    generated = generate(trained, n_generated, instrument=product, seed=seed)
    grid = grid_of(generated)
    rest_records, skipped = [], 0
    for s in real:
        v = fitted_rv_kms.get(s.key)
        if s.frame == "observed" and inst.rv_scan_kms > 0:
            if v is None or not np.isfinite(v):
                skipped += 1
                continue
            rest_records.append(rest_frame_copy(s, v))
        else:
            rest_records.append(rest_frame_copy(s, 0.0))
    how = "continuum" if inst.continuum_degree > 0 else "median"
    result: dict = {
        "n_real": len(rest_records),
        "n_generated": n_generated,
        "n_real_without_rv": skipped,
        "normalisation": how,
        "grid": generated.grid,
        "grid_pixels": int(len(generated.wavelength)),
    }
    if len(rest_records) < 2:
        result.update({"c2st_auc": float("nan"), "note": "fewer than 2 real spectra"})
        return result, generated

    resampled = [grid.resample(s) for s in rest_records]
    real_flux = np.stack([r[0] for r in resampled])
    real_good = np.stack([r[2] for r in resampled])
    real_norm = pseudo_continuum_normalised(grid, real_flux, real_good, how)
    gen_flux = generated.flux.astype(np.float64)
    gen_norm = pseudo_continuum_normalised(grid, gen_flux, np.isfinite(gen_flux), how)
    columns = (np.isfinite(real_norm).mean(axis=0) >= MIN_GOOD_FRACTION) & np.isfinite(gen_norm).all(axis=0)
    result["feature_pixels"] = int(columns.sum())
    if columns.sum() < 2:
        result.update({"c2st_auc": float("nan"), "note": "no pixels good in enough real spectra"})
    else:
        test = classifier_two_sample_test(real_norm[:, columns], gen_norm[:, columns], n_components=C2ST_COMPONENTS, seed=seed)
        result.update({"c2st_auc": test["auc"], "c2st_auc_std": test["auc_std"], "c2st_folds": len(test["auc_folds"])})

    features = features_covered(generated.wavelength, STRONG_LINES)
    if features:
        real_lines = [measure_features([(seg.wavelength, seg.flux, seg.mask) for seg in s.segments], features)
                      for s in rest_records]
        edges = np.concatenate([[0], np.cumsum(generated.segment_lengths)])
        gen_lines = [
            measure_features([(generated.wavelength[a:b], f[a:b], None) for a, b in zip(edges[:-1], edges[1:])], features)
            for f in gen_flux
        ]
        result["lines"] = {
            f.name: {
                "depth": compare_line_distributions(_line_values(real_lines, f.name, "depth"), _line_values(gen_lines, f.name, "depth")),
                "ew_A": compare_line_distributions(_line_values(real_lines, f.name, "ew_A"), _line_values(gen_lines, f.name, "ew_A")),
            }
            for f in features
        }
    else:
        result["lines"] = {}
    return result, generated
