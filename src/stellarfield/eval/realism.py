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
4. Generated spectra get the instrument's noise and masks (:func:`add_instrument_noise`), so a
   classifier cannot tell them apart by the absence of noise: each generated spectrum takes the
   error array and good-pixel mask of a randomly chosen real spectrum of the product (on the same
   grid, relative to that spectrum's pseudo-continuum), scaled to its own pseudo-continuum, adds
   Gaussian noise of that sigma and drops the pixels that spectrum had bad. MILES has no error
   arrays: its sigma is the DER_SNR estimate (Stoehr et al. 2008, ASPC 394, 505) of each real
   spectrum, the scatter of the flux about its local smooth shape,
   ``1.482602 / sqrt(6) * median|2 f_i - f_(i-2) - f_(i+2)|``, constant per segment (an upper
   bound where lines are barely resolved), with the real good-pixel masks.
5. A classifier two-sample test (:func:`~.two_sample.classifier_two_sample_test`, logistic
   regression on the first 10 principal components, 5-fold held-out AUC; 0.5 = indistinguishable)
   on the grid pixels good in at least half of the real (and of the noisy generated) spectra;
   missing pixels are filled with the training fold's mean, and since the generated spectra carry
   real masks, missingness says nothing about the class. The AUC against the noiseless generated
   spectra is reported next to it. And the depths and equivalent widths of the strong lines the
   grid covers (:mod:`.lines`), generated (with noise) vs real.

The stars are drawn from the product's own population by default (``population="auto"``: the
prior conditional on the product, :mod:`stellarfield.model.prior`), so the generated stars and one
instrument's held-out stars are the same survey's selection; with ``population="all"`` an AUC
above 0.5 measures a difference of populations as well as of realism.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np

from stellarfield.eval.common_grid import CommonGrid
from stellarfield.eval.lines import STRONG_LINES, compare_line_distributions, features_covered, measure_features
from stellarfield.eval.normalise import running_median_continuum
from stellarfield.eval.two_sample import classifier_two_sample_test
from stellarfield.model.checkpoint import TrainedModel
from stellarfield.model.generate import GeneratedSpectra, generate, resolve_population
from stellarfield.physics.doppler import rest_wavelength
from stellarfield.spectrum import Spectrum

#: Principal components the two-sample classifier sees.
C2ST_COMPONENTS = 10
#: A grid pixel is a feature when at least this fraction of the real (and of the noisy generated)
#: spectra are good there. Not close to 1: with a handful of real spectra (9 APOGEE visits) a single
#: masked spectrum would remove the pixel; the rest are filled, which the shared masks make fair.
MIN_GOOD_FRACTION = 0.5
#: DER_SNR constant: 1.482602 / sqrt(6) (Stoehr et al. 2008).
DER_SNR_CONSTANT = 1.482602 / np.sqrt(6.0)
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


def pseudo_continuum(grid: CommonGrid, flux: np.ndarray, good: np.ndarray, how: str) -> np.ndarray:
    """The pseudo-continuum (N, P) of the rows of ``flux`` (N, P) on ``grid``; NaN where undefined.

    ``how``: ``"continuum"`` (running median of the good pixels per segment) or ``"median"`` (the
    median good flux, one number per spectrum).
    """
    flux = np.asarray(flux, dtype=np.float64)
    good = np.asarray(good, dtype=bool) & np.isfinite(flux)
    out = np.full(flux.shape, np.nan)
    for i in range(flux.shape[0]):
        if how == "median":
            values = flux[i][good[i]]
            out[i] = np.median(values) if values.size else np.nan
        else:
            parts = []
            for sl, wave in zip(grid.segment_slices.values(), grid.segment_wavelengths):
                window = min(CONTINUUM_WINDOW_A, (wave[-1] - wave[0]) / 5.0)
                parts.append(running_median_continuum(wave, flux[i, sl], good[i, sl], window))
            out[i] = np.concatenate(parts)
    return out


def pseudo_continuum_normalised(grid: CommonGrid, flux: np.ndarray, good: np.ndarray, how: str) -> np.ndarray:
    """Rows of ``flux`` (N, P) on ``grid`` divided by their :func:`pseudo_continuum`; NaN where not good.

    ``how``: ``"continuum"`` (running median per segment) or ``"median"`` (one number per spectrum).
    """
    flux = np.asarray(flux, dtype=np.float64)
    good = np.asarray(good, dtype=bool) & np.isfinite(flux)
    divisor = pseudo_continuum(grid, flux, good, how)
    ok = good & np.isfinite(divisor) & (divisor > 0)
    return np.where(ok, flux / np.where(ok, divisor, 1.0), np.nan)


def der_snr_sigma(flux: np.ndarray, good: np.ndarray | None = None) -> float:
    """Noise sigma of one segment by DER_SNR (Stoehr et al. 2008): ``1.482602 / sqrt(6) *
    median |2 f_i - f_(i-2) - f_(i+2)|`` over the pixels where all three are good; NaN if fewer than 5.

    Exact for white Gaussian noise on a spectrum that is locally linear over 5 pixels; features
    sharper than that add to it (an upper bound on the noise).
    """
    f = np.asarray(flux, dtype=np.float64)
    ok = np.isfinite(f) if good is None else (np.asarray(good, dtype=bool) & np.isfinite(f))
    if f.size < 5:
        return float("nan")
    both = ok[2:-2] & ok[:-4] & ok[4:]
    if both.sum() < 5:
        return float("nan")
    d = np.abs(2.0 * f[2:-2] - f[:-4] - f[4:])[both]
    return float(DER_SNR_CONSTANT * np.median(d))


@dataclass
class NoiseTemplates:
    """Noise of real spectra on a grid, relative to their pseudo-continuum, to give generated spectra.

    ``sigma_rel`` (M, P): sigma / pseudo-continuum (NaN where the spectrum is bad); ``good`` (M, P):
    its good pixels; ``source``: ``"error arrays"`` or ``"DER_SNR"`` (products without errors).
    """

    sigma_rel: np.ndarray
    good: np.ndarray
    source: str
    keys: list[str] = field(default_factory=list)

    @property
    def median_snr(self) -> float:
        """Median over templates of the median continuum S/N (1 / sigma_rel) of their good pixels."""
        values = [np.nanmedian(1.0 / s[g]) for s, g in zip(self.sigma_rel, self.good) if g.any()]
        return float(np.median(values)) if values else float("nan")


def noise_templates(
    grid: CommonGrid, spectra: list[Spectrum], how: str, resampled: list[tuple] | None = None
) -> NoiseTemplates:
    """The :class:`NoiseTemplates` of real ``spectra`` (already in the grid's frame) on ``grid``.

    Where the noise is known: sigma = 1/sqrt(ivar) resampled onto the grid (:meth:`CommonGrid.resample`
    propagates the errors). Where it is not (MILES): the :func:`der_snr_sigma` of each native
    segment, constant over the grid segment of that name. Either way divided by the spectrum's
    :func:`pseudo_continuum` on the grid. ``resampled``: the ``grid.resample`` of each spectrum, if
    already computed.
    """
    resampled = resampled if resampled is not None else [grid.resample(s) for s in spectra]
    flux = np.stack([r[0] for r in resampled])
    ivar = np.stack([r[1] for r in resampled])
    good = np.stack([r[2] for r in resampled]) & np.isfinite(flux)
    divisor = pseudo_continuum(grid, flux, good, how)
    known = all(s.noise_known for s in spectra)
    if known:
        good &= ivar > 0
        sigma = np.where(good, 1.0 / np.sqrt(np.where(good, ivar, 1.0)), np.nan)
    else:
        sigma = np.full(flux.shape, np.nan)
        slices = grid.segment_slices
        for i, s in enumerate(spectra):
            for segment in s.segments:
                if segment.name in slices:
                    sigma[i, slices[segment.name]] = der_snr_sigma(segment.flux, segment.mask)
        good &= np.isfinite(sigma)
    good &= np.isfinite(divisor) & (divisor > 0)
    sigma_rel = np.where(good, sigma / np.where(good, divisor, 1.0), np.nan)
    return NoiseTemplates(sigma_rel, good, "error arrays" if known else "DER_SNR", [s.key for s in spectra])


def add_instrument_noise(
    flux: np.ndarray, continuum: np.ndarray | float, templates: NoiseTemplates, rng: np.random.Generator,
    index: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Give each row of ``flux`` (N, P) the noise and mask of a random template (drawn with replacement).

    Row i gets template ``j = index[i]`` (default: drawn uniformly by ``rng``): Gaussian noise of
    sigma ``templates.sigma_rel[j] * continuum[i]`` (the template's errors relative to its
    continuum, at this spectrum's flux level) and the template's mask. ``continuum``: the rows'
    pseudo-continua (N, P), or a number (1 for continuum-normalised spectra). Returns ``(noisy
    flux, good, index)``; bad pixels are NaN.
    """
    flux = np.asarray(flux, dtype=np.float64)
    m = templates.sigma_rel.shape[0]
    if m == 0:
        raise ValueError("no noise templates")
    if index is None:
        index = rng.integers(0, m, size=flux.shape[0])
    sigma = templates.sigma_rel[index] * np.abs(np.broadcast_to(np.asarray(continuum, dtype=np.float64), flux.shape))
    good = templates.good[index] & np.isfinite(flux) & np.isfinite(sigma)
    noise = rng.standard_normal(flux.shape) * np.where(good, sigma, 0.0)
    return np.where(good, flux + noise, np.nan), good, np.asarray(index)


def _line_values(measurements: list[dict], name: str, what: str) -> np.ndarray:
    return np.array([getattr(m[name], what) for m in measurements], dtype=np.float64)


@dataclass
class RealismDetail:
    """Arrays behind a product's realism numbers, for the plots.

    ``generated``: the noiseless generated spectra; ``noisy_flux``: the same with the instrument's
    noise and masks (NaN = masked); ``line_depths``: ``{line: {"real": (n,), "generated": (m,)}}``
    (generated measured with noise).
    """

    generated: GeneratedSpectra
    noisy_flux: np.ndarray | None = None
    line_depths: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)


def realism_for_product(
    trained: TrainedModel,
    product: str,
    real: list[Spectrum],
    fitted_rv_kms: dict[str, float | None],
    n_generated: int,
    seed: int = 0,
    population: str | None = "auto",
) -> tuple[dict, RealismDetail]:
    """Two-sample AUC and line distributions of ``n_generated`` generated vs ``real`` spectra.

    ``fitted_rv_kms``: the model's fitted RV of each real spectrum by key (None where not fitted;
    such spectra of an observed-frame product are left out). The generated spectra get the noise
    and masks of the real ones (see the module docstring; the real spectra are the templates).
    ``population``: whose stars are generated (:func:`~stellarfield.model.generate.resolve_population`;
    default the product's own). Returns the section's numbers and a :class:`RealismDetail`
    (generated spectra, line depths).
    """
    inst = trained.model.instrument(product)
    generated = generate(trained, n_generated, instrument=product, seed=seed, population=population)
    drawn_from = resolve_population(trained.prior, population, f"instrument:{product}")
    detail = RealismDetail(generated)
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
        "population": drawn_from or "all",
        "normalisation": how,
        "grid": generated.grid,
        "grid_pixels": int(len(generated.wavelength)),
        "min_good_fraction": MIN_GOOD_FRACTION,
    }
    if len(rest_records) < 2:
        result.update({"c2st_auc": float("nan"), "note": "fewer than 2 real spectra"})
        return result, detail

    resampled = [grid.resample(s) for s in rest_records]
    real_flux = np.stack([r[0] for r in resampled])
    real_good = np.stack([r[2] for r in resampled])
    real_norm = pseudo_continuum_normalised(grid, real_flux, real_good, how)

    # The instrument's noise and masks, from the real spectra themselves (templates drawn at random).
    rng = np.random.default_rng(seed + 1)
    templates = noise_templates(grid, rest_records, how, resampled)
    gen_flux = generated.flux.astype(np.float64)
    gen_good = np.isfinite(gen_flux)
    gen_norm = pseudo_continuum_normalised(grid, gen_flux, gen_good, how)
    usable = np.flatnonzero(templates.good.any(axis=1))
    result["noise"] = {"source": templates.source, "n_templates": int(usable.size),
                       "median_continuum_snr": templates.median_snr}
    if usable.size:
        index = usable[rng.integers(0, usable.size, size=gen_flux.shape[0])]
        noisy, noisy_good, _ = add_instrument_noise(gen_flux, pseudo_continuum(grid, gen_flux, gen_good, how),
                                                    templates, rng, index=index)
        noisy_norm = pseudo_continuum_normalised(grid, noisy, noisy_good, how)
        detail.noisy_flux = noisy
    else:
        result["noise"]["note"] = "no noise added: no real spectrum has usable errors (or a DER_SNR estimate)"
        noisy, noisy_good, noisy_norm = gen_flux, gen_good, gen_norm

    columns = ((np.isfinite(real_norm).mean(axis=0) >= MIN_GOOD_FRACTION)
               & (np.isfinite(noisy_norm).mean(axis=0) >= MIN_GOOD_FRACTION)
               & np.isfinite(gen_norm).all(axis=0))
    result["feature_pixels"] = int(columns.sum())
    if columns.sum() < 2:
        result.update({"c2st_auc": float("nan"),
                       "note": f"fewer than 2 pixels good in {MIN_GOOD_FRACTION:.0%} of the real spectra"})
    else:
        test = classifier_two_sample_test(real_norm[:, columns], noisy_norm[:, columns], n_components=C2ST_COMPONENTS,
                                          seed=seed)
        clean = classifier_two_sample_test(real_norm[:, columns], gen_norm[:, columns], n_components=C2ST_COMPONENTS,
                                           seed=seed)
        result.update({"c2st_auc": test["auc"], "c2st_auc_std": test["auc_std"], "c2st_folds": len(test["auc_folds"]),
                       "c2st_auc_noiseless": clean["auc"], "c2st_auc_noiseless_std": clean["auc_std"]})

    features = features_covered(generated.wavelength, STRONG_LINES)
    result["lines"] = {}
    if features:
        real_lines = [measure_features([(seg.wavelength, seg.flux, seg.mask) for seg in s.segments], features)
                      for s in rest_records]
        edges = np.concatenate([[0], np.cumsum(generated.segment_lengths)])
        gen_lines = [
            measure_features([(generated.wavelength[a:b], f[a:b], g[a:b]) for a, b in zip(edges[:-1], edges[1:])],
                             features)
            for f, g in zip(noisy, noisy_good)
        ]
        for f in features:
            depths = {"real": _line_values(real_lines, f.name, "depth"), "generated": _line_values(gen_lines, f.name, "depth")}
            detail.line_depths[f.name] = depths
            result["lines"][f.name] = {
                "depth": compare_line_distributions(depths["real"], depths["generated"]),
                "ew_A": compare_line_distributions(_line_values(real_lines, f.name, "ew_A"),
                                                   _line_values(gen_lines, f.name, "ew_A")),
            }
    return result, detail
