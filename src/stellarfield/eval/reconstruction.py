"""A reconstructed spectrum and its scores, the same for the model and for every baseline.

The scoring chain, each step written once:

1. :func:`scoring_pixels`: a held-out spectrum's native pixels with the observed-frame bands masked
   (:mod:`.masks`) and divided by the per-spectrum normalisation (:mod:`.normalise`): what the
   model (:func:`reconstruction_from_model`) and every PCA baseline
   (:meth:`.baselines.PCABaseline.prepare`) are compared with;
2. a :class:`Reconstruction` holds those data, errors and good pixels next to a model of them;
   :func:`on_common_pixels` restricts the reconstructions of one spectrum to the pixels every
   method uses;
3. its scores (:meth:`Reconstruction.chi2_nu` with the survey's errors, or, where the product has
   none (MILES, STELIB), :meth:`Reconstruction.rms_residual`), summarised over spectra by
   :func:`summarize_reconstructions`.

chi2 does not depend on the normalisation (data, model and errors are divided alike); residuals
do, which is why the model is normalised too.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from stellarfield.eval.masks import apply_observed_frame_masks
from stellarfield.eval.metrics import chi2_nu, median_abs_residual, normalised_residual, rms_residual, summarize
from stellarfield.eval.normalise import divide_by, normalisation_divisor, usable_divisor, with_pixels
from stellarfield.io.registry import product_profile
from stellarfield.spectrum import Spectrum


def default_normalisation(product: str) -> str:
    """Per-spectrum normalisation used for ``product`` when none is asked for: its profile's
    ``bench_normalisation`` (flux-like products divided by their median, the issue's "LAMOST
    flux/median"; Gaia XP is already divided by its median flux in the source file;
    continuum-normalised products kept as they are); ``"none"`` for a product without a profile."""
    profile = product_profile(product)
    return profile.bench_normalisation if profile else "none"


@dataclass
class ScoringPixels:
    """A spectrum's native pixels as every method is scored on them (segments concatenated, float64).

    ``data``: flux / ``divisor`` (flux units for ``"none"``, dimensionless otherwise); ``ivar``: the
    survey's ivar x ``divisor**2`` (0 where the divisor is unusable; :func:`errors_for_scoring` says
    what counts where the product has no errors); ``mask``: the spectrum's good pixels outside the observed-frame bands where the divisor is
    usable; ``divisor``: what data and model are divided by (1 where the normalisation is undefined,
    those pixels being bad).
    """

    data: np.ndarray
    ivar: np.ndarray
    mask: np.ndarray
    divisor: np.ndarray
    normalisation: str

    def as_spectrum(self, spectrum: Spectrum) -> Spectrum:
        """These pixels in a copy of ``spectrum`` (float32, like every record), the form a PCA is
        trained on; its ``normalisation`` field says ``"continuum"`` after a continuum division."""
        out = with_pixels(spectrum, self.data, self.ivar, self.mask)
        if self.normalisation == "continuum":
            out.normalisation = "continuum"
        return out


def scoring_pixels(spectrum: Spectrum, normalisation: str | None = None, *, mask_observed_bands: bool = True,
                   continuum_window_A: float = 200.0) -> ScoringPixels:
    """The first step of every reconstruction score: ``spectrum``'s pixels with the observed-frame
    bands masked (:func:`~.masks.apply_observed_frame_masks`, before the normalisation so that its
    median is taken over what is left) and divided by its per-spectrum normalisation
    (:func:`~.normalise.normalisation_divisor`, ``normalisation`` defaulting to
    :func:`default_normalisation` of the product; errors scaled alike, :func:`~.normalise.divide_by`).
    """
    how = normalisation or default_normalisation(spectrum.product)
    masked = apply_observed_frame_masks(spectrum) if mask_observed_bands else spectrum
    divisor = normalisation_divisor(masked, how, continuum_window_A)
    data, ivar, mask = divide_by(divisor, masked.flux, masked.ivar, masked.mask)
    return ScoringPixels(data, ivar, mask, usable_divisor(divisor)[1], how)


@dataclass
class Reconstruction:
    """One spectrum and its reconstruction, on the pixels it was scored on (segments concatenated).

    ``mask`` marks the pixels used in the fit and the scores. ``ivar`` is all 0 where the product
    has no errors (then chi2 is NaN and the residual statistics are the scores). ``coefficients``
    are the fitted latent / PCA coefficients; ``n_fitted`` (default: their number) is the number of
    parameters fitted to this spectrum, subtracted from the degrees of freedom.
    """

    key: str
    product: str
    grid: str  # "native" or "common"
    wavelength: np.ndarray
    data: np.ndarray
    ivar: np.ndarray
    mask: np.ndarray
    model: np.ndarray
    coefficients: np.ndarray
    segment_slices: dict[str, slice]
    noise_known: bool = True
    n_fitted: int | None = None

    @property
    def n_params(self) -> int:
        return int(self.coefficients.size) if self.n_fitted is None else int(self.n_fitted)

    def chi2_nu(self) -> float:
        """Reduced chi2 over the used pixels (NaN without errors)."""
        if not self.noise_known:
            return float("nan")
        return chi2_nu(self.data, self.model, self.ivar, self.mask, n_params=self.n_params)

    def chi2_nu_by_segment(self) -> dict[str, float]:
        """Reduced chi2 per segment (each with ``n_params`` subtracted; NaN without errors)."""
        if not self.noise_known:
            return {name: float("nan") for name in self.segment_slices}
        return {
            name: chi2_nu(self.data[s], self.model[s], self.ivar[s], self.mask[s], n_params=self.n_params)
            for name, s in self.segment_slices.items()
        }

    def median_abs_residual(self) -> float:
        return median_abs_residual(self.data, self.model, self.mask)

    def rms_residual(self) -> float:
        return rms_residual(self.data, self.model, self.mask)

    def pulls(self) -> np.ndarray:
        """``(data - model) * sqrt(ivar)`` on the used pixels (``data - model`` where the product has
        no errors), NaN elsewhere: the residuals the scores are made of."""
        if self.noise_known:
            return normalised_residual(self.data, self.model, self.ivar, self.mask)
        return np.where(self.mask, self.data - self.model, np.nan)


def errors_for_scoring(ivar: np.ndarray, mask: np.ndarray, noise_known: bool) -> tuple[np.ndarray, np.ndarray]:
    """``(ivar, mask)`` of a :class:`Reconstruction`: with the survey's errors, the used pixels are
    those with ``ivar > 0`` (chi2 is the score); without (MILES, STELIB) ivar is all 0 and the mask
    is kept (chi2 is NaN, the RMS residual is the score)."""
    if noise_known:
        return ivar, mask & (ivar > 0)
    return np.zeros_like(ivar), mask


def on_common_pixels(recs: dict[str, Reconstruction]) -> dict[str, Reconstruction]:
    """The reconstructions of one spectrum (by method) restricted to the pixels every one of them uses."""
    common = np.logical_and.reduce([r.mask for r in recs.values()])
    return {name: replace(r, mask=r.mask & common) for name, r in recs.items()}


def summarize_reconstructions(reconstructions: list[Reconstruction]) -> dict:
    """Scores over spectra: chi2_nu, per-segment chi2_nu, median |residual|, RMS residual.

    Each entry is a :class:`~.metrics.PercentileSummary` dict (median, p16, p84, n).
    """
    if not reconstructions:
        return {"n": 0}
    segments: dict[str, list[float]] = {}
    for r in reconstructions:
        for name, value in r.chi2_nu_by_segment().items():
            segments.setdefault(name, []).append(value)
    return {
        "n": len(reconstructions),
        "grid": reconstructions[0].grid,
        "n_params": reconstructions[0].n_params,
        "chi2_nu": summarize([r.chi2_nu() for r in reconstructions]).to_dict(),
        "chi2_nu_by_segment": {name: summarize(v).to_dict() for name, v in segments.items()},
        "median_abs_residual": summarize([r.median_abs_residual() for r in reconstructions]).to_dict(),
        "rms_residual": summarize([r.rms_residual() for r in reconstructions]).to_dict(),
    }


def segment_slices(spectrum: Spectrum) -> dict[str, slice]:
    """Slice of each segment in the spectrum's concatenated pixel arrays."""
    out, start = {}, 0
    for segment in spectrum.segments:
        out[segment.name] = slice(start, start + segment.n_pixels)
        start += segment.n_pixels
    return out


def reconstruction_from_model(
    spectrum: Spectrum,
    model_flux: np.ndarray,
    n_params: int,
    coefficients: np.ndarray | None = None,
    *,
    normalisation: str | None = None,
    mask_observed_bands: bool = True,
    used: np.ndarray | None = None,
) -> Reconstruction:
    """Score a model evaluated on ``spectrum``'s native pixels (all segments concatenated, flux units).

    ``n_params``: parameters fitted to this spectrum (latent dimension + RV + continuum
    coefficients ...). ``normalisation`` defaults to :func:`default_normalisation` of the product,
    as for the PCA baseline; ``used`` optionally restricts the pixels further (e.g. the model's own
    pixel mask). Pixels with a non-finite model are left out.
    """
    model_flux = np.asarray(model_flux, dtype=np.float64)
    if model_flux.shape != (spectrum.n_pixels,):
        raise ValueError(f"model has shape {model_flux.shape}, spectrum {spectrum.key} has {spectrum.n_pixels} pixels")
    pixels = scoring_pixels(spectrum, normalisation, mask_observed_bands=mask_observed_bands)
    mask = pixels.mask & np.isfinite(model_flux) & np.isfinite(spectrum.flux)
    if used is not None:
        mask &= np.asarray(used, dtype=bool)
    ivar, mask = errors_for_scoring(np.where(mask, pixels.ivar, 0.0), mask, spectrum.noise_known)
    return Reconstruction(
        key=spectrum.key,
        product=spectrum.product,
        grid="native",
        wavelength=spectrum.wavelength,
        data=pixels.data,
        ivar=ivar,
        mask=mask,
        model=model_flux / pixels.divisor,
        coefficients=np.zeros(0) if coefficients is None else np.asarray(coefficients, dtype=np.float64),
        segment_slices=segment_slices(spectrum),
        noise_known=spectrum.noise_known,
        n_fitted=n_params,
    )
