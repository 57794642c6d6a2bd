"""A reconstructed spectrum and its scores, the same for the model and for every baseline.

A :class:`Reconstruction` holds one spectrum's data, errors and good-pixel mask next to a model of
it, on the pixels it is scored on. :func:`summarize_reconstructions` turns a list of them into the
benchmark's numbers. :func:`reconstruction_from_model` builds one from any model evaluated on a
spectrum's native pixels (the generative model's fit output), applying the SAME observed-frame
masks (:mod:`.masks`) and the same per-spectrum normalisation (:mod:`.normalise`) as the PCA
baseline, so model and baseline are scored on the same pixels in the same units. chi2 does not
depend on the normalisation (data, model and errors are divided alike); residuals do, which is why
it is applied here too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stellarfield.eval.masks import apply_observed_frame_masks
from stellarfield.eval.metrics import chi2_nu, median_abs_residual, rms_residual, summarize
from stellarfield.eval.normalise import normalisation_divisor
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
    how = normalisation or default_normalisation(spectrum.product)
    # Bands first, then the normalisation (its median) over what is left: the PCA's order.
    masked = apply_observed_frame_masks(spectrum) if mask_observed_bands else spectrum
    divisor = normalisation_divisor(masked, how)
    ok = np.isfinite(divisor) & (divisor > 0)
    safe = np.where(ok, divisor, 1.0)
    mask = masked.mask & ok & np.isfinite(model_flux) & np.isfinite(spectrum.flux)
    if used is not None:
        mask &= np.asarray(used, dtype=bool)
    ivar = np.where(mask, spectrum.ivar * safe**2, 0.0)
    if spectrum.noise_known:
        mask &= ivar > 0
    return Reconstruction(
        key=spectrum.key,
        product=spectrum.product,
        grid="native",
        wavelength=spectrum.wavelength,
        data=spectrum.flux / safe,
        ivar=ivar if spectrum.noise_known else np.zeros_like(ivar),
        mask=mask,
        model=model_flux / safe,
        coefficients=np.zeros(0) if coefficients is None else np.asarray(coefficients, dtype=np.float64),
        segment_slices=segment_slices(spectrum),
        noise_known=spectrum.noise_known,
        n_fitted=n_params,
    )
