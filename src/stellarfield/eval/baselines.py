"""Baselines the generative model is measured against: a PCA per survey product, and The Payne's network.

PCA baseline (one per product)
------------------------------
1. Every spectrum is prepared the same way: observed-frame bands masked (:mod:`.masks`), then
   optionally normalised per spectrum (:mod:`.normalise`; ``"median"`` for flux-like products).
2. Training spectra are resampled onto the product's :class:`~.common_grid.CommonGrid`, with their
   errors carried through (:mod:`.resample`), and a mean + K components are fitted by weighted
   EM-PCA (:class:`~.pca.WeightedPCA`) with weights ``ivar`` (or 1/0 for good/bad pixels where the
   product has no errors: MILES). Grid pixels where fewer than ``min_coverage`` of the training
   spectra are good (chip edges, masked bands) are left out of the baseline.
   Spectra are prepared by the same function as the model's (:func:`.reconstruction.scoring_pixels`),
   so both are scored on the same pixels in the same units.
3. A held-out spectrum's K coefficients are fitted by weighted least squares, by default on its
   **native** pixels (``on="native"``: mean and components interpolated from the common grid to
   the native wavelengths, the data and their errors untouched), so its chi2_nu counts the same
   pixels with the same errors as the model's; ``on="common"`` fits and scores on the common grid
   with the propagated errors instead.

chi2_nu counts ``n_params = K`` fitted coefficients. For products without errors (MILES) chi2 is
undefined (NaN) and the RMS residual is the score.

The Payne (Ting et al. 2019, ApJ 879, 69) is in :mod:`stellarfield.eval.payne` and re-exported here.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from stellarfield.eval.common_grid import CommonGrid
from stellarfield.eval.payne import PayneEmulator  # noqa: F401  (re-exported)
from stellarfield.eval.pca import WeightedPCA, weighted_coefficients
from stellarfield.eval.reconstruction import (  # noqa: F401  (summarize_reconstructions re-exported)
    Reconstruction,
    default_normalisation,
    errors_for_scoring,
    scoring_pixels,
    segment_slices,
    summarize_reconstructions,
)
from stellarfield.spectrum import Spectrum


@dataclass
class PCABaseline:
    """PCA baseline of one survey product (see the module docstring).

    Parameters
    ----------
    n_components:
        K, the latent dimension to compare with (capped at n_train - 1, see ``pca.n_components_``).
    normalisation:
        ``"none"``, ``"median"`` or ``"continuum"`` (:mod:`.normalise`); ``None`` picks
        :func:`default_normalisation` of the product at :meth:`fit`.
    mask_observed_bands:
        Mask the observed-frame bands of :mod:`.masks` (GALAH CCD4 O2 band) in every spectrum.
    min_coverage:
        Grid pixels good in fewer than this fraction of the training spectra are not modelled.
    weighted:
        True: weighted EM-PCA (components that minimise the chi2 of the training spectra).
        False: plain PCA, the principal axes of the gap-filled training spectra with every pixel
        weighted equally (the held-out coefficients are still fitted by weighted least squares).
        The issue's reference numbers (Gaia XP 2.19 / 0.69) match the plain PCA.
    """

    n_components: int = 16
    normalisation: str | None = None
    mask_observed_bands: bool = True
    min_coverage: float = 0.5
    continuum_window_A: float = 200.0
    max_iter: int = 30
    weighted: bool = True
    product: str | None = None
    grid: CommonGrid | None = None
    pca: WeightedPCA | None = None
    noise_known: bool = True
    n_train: int = 0
    fit_seconds: float = 0.0
    covered: np.ndarray | None = field(default=None, repr=False)

    @property
    def em_iterations(self) -> int:
        """EM iterations the fit ran (0 for plain PCA)."""
        return len(self.pca.chi2_history_) if self.pca is not None else 0

    def prepare(self, spectrum: Spectrum) -> Spectrum:
        """Mask observed-frame bands and normalise (:func:`.reconstruction.scoring_pixels`, as for the
        model), for training and for a held-out spectrum alike (a copy; the input is untouched)."""
        pixels = scoring_pixels(spectrum, self.normalisation or "none", mask_observed_bands=self.mask_observed_bands,
                                continuum_window_A=self.continuum_window_A)
        return pixels.as_spectrum(spectrum)

    def _weight(self, ivar: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """PCA weights: ivar on good pixels, or 1 on good pixels when the product has no errors."""
        if self.noise_known:
            return np.where(mask & (ivar > 0), ivar, 0.0)
        return mask.astype(np.float64)

    def fit(self, spectra: Iterable[Spectrum], progress: bool | str = False) -> "PCABaseline":
        """Fit on the training spectra of ONE product (``progress``: a bar over the EM iterations)."""
        start = time.perf_counter()
        data, weight = self.training_matrix(spectra)
        max_iter = self.max_iter if self.weighted else 0  # no EM step: the SVD start is plain PCA
        self.pca = WeightedPCA(self.n_components, max_iter=max_iter).fit(data, weight, progress=progress)
        self.fit_seconds = time.perf_counter() - start
        return self

    def training_matrix(self, spectra: Iterable[Spectrum]) -> tuple[np.ndarray, np.ndarray]:
        """Prepare the training spectra of ONE product: set the product, normalisation, grid and the
        covered pixels, and return their ``(data, weight)`` (N, P) on the common grid."""
        spectra = list(spectra)
        if not spectra:
            raise ValueError("no training spectra")
        products = {s.product for s in spectra}
        if len(products) != 1:
            raise ValueError(f"a PCA baseline is per product; got {sorted(products)}")
        self.product = products.pop()
        if self.normalisation is None:
            self.normalisation = default_normalisation(self.product)
        self.noise_known = all(s.noise_known for s in spectra)
        prepared = [self.prepare(s) for s in spectra]
        self.grid = CommonGrid.from_spectra(prepared)
        rows = [self.grid.resample(s) for s in prepared]
        data = np.stack([r[0] for r in rows])
        weight = np.stack([self._weight(r[1], r[2]) for r in rows])
        self.covered = (weight > 0).mean(axis=0) >= self.min_coverage
        weight[:, ~self.covered] = 0.0
        self.n_train = len(spectra)
        return data, weight

    def _basis(self) -> np.ndarray:
        """Mean (row 0) and components on the common grid; NaN at uncovered pixels."""
        rows = np.vstack([self.pca.mean_[None, :], self.pca.components_])
        return np.where(self.covered, rows, np.nan)

    def reconstruct(self, spectrum: Spectrum, on: str = "native") -> Reconstruction:
        """Fit the K coefficients of one (held-out) spectrum and return its :class:`Reconstruction`."""
        if self.pca is None:
            raise RuntimeError("fit the baseline first")
        if spectrum.product != self.product:
            raise ValueError(f"baseline of {self.product!r} asked to reconstruct a {spectrum.product!r} spectrum")
        prepared = self.prepare(spectrum)
        basis = self._basis()
        if on == "native":
            wavelength = prepared.wavelength
            data = prepared.flux.astype(np.float64)
            ivar = prepared.ivar.astype(np.float64)
            mask = prepared.mask.copy()
            basis = self.grid.to_native(basis, prepared)
            slices = segment_slices(prepared)
        elif on == "common":
            wavelength = self.grid.wavelength
            data, ivar, mask = self.grid.resample(prepared)
            slices = self.grid.segment_slices
        else:
            raise ValueError(f"on must be 'native' or 'common', got {on!r}")
        mask &= np.isfinite(basis).all(axis=0) & np.isfinite(data)
        scored_ivar, mask = errors_for_scoring(ivar, mask, self.noise_known)
        weight = self._weight(ivar, mask)
        mean, components = np.nan_to_num(basis[0]), np.nan_to_num(basis[1:])
        coefficients = weighted_coefficients(components, np.where(mask, data - mean, 0.0)[None, :], weight[None, :])[0]
        model = np.where(np.isfinite(basis[0]), mean + coefficients @ components, np.nan)
        return Reconstruction(
            key=spectrum.key,
            product=spectrum.product,
            grid=on,
            wavelength=wavelength,
            data=data,
            ivar=scored_ivar,
            mask=mask,
            model=model,
            coefficients=coefficients,
            segment_slices=slices,
            noise_known=self.noise_known,
        )

    def coefficients(self, spectra: Iterable[Spectrum], on: str = "common") -> np.ndarray:
        """(N, K) coefficients of spectra: the PCA 'latents' for the label probes.

        ``on="common"`` (default) fits all spectra at once on the common grid (fast: one batched
        solve); ``on="native"`` fits each on its native pixels as :meth:`reconstruct` does.
        """
        spectra = list(spectra)
        if on != "common":
            return np.stack([self.reconstruct(s, on=on).coefficients for s in spectra])
        rows = [self.grid.resample(self.prepare(s)) for s in spectra]
        data = np.stack([r[0] for r in rows])
        weight = np.stack([self._weight(r[1], r[2]) for r in rows])
        weight[:, ~self.covered] = 0.0
        return self.pca.transform(data, weight)

    def score(self, spectra: Iterable[Spectrum], on: str = "native") -> dict:
        """:func:`summarize_reconstructions` of held-out spectra, plus the baseline's settings."""
        recs = [self.reconstruct(s, on=on) for s in spectra]
        summary = summarize_reconstructions(recs)
        summary.update(
            {
                "product": self.product,
                "n_components": self.pca.n_components_,
                "normalisation": self.normalisation,
                "weighted_pca": self.weighted,
                "n_train": self.n_train,
                "noise_known": self.noise_known,
                "grid_pixels_modelled": int(self.covered.sum()),
                "grid_pixels": int(self.covered.size),
            }
        )
        return summary


def fit_plain_and_weighted(
    spectra: Iterable[Spectrum], n_components: int, progress: bool | str = False, **options
) -> dict[str, PCABaseline]:
    """``{"plain": ..., "weighted": ...}`` baselines of ONE product from one preparation of its spectra.

    The spectra are prepared and resampled once; the plain PCA is the SVD start, and the weighted
    EM-PCA iterates from it (so the SVD is computed once). ``fit_seconds`` of the weighted baseline
    includes the shared preparation and SVD. ``options``: other :class:`PCABaseline` fields.
    """
    start = time.perf_counter()
    plain = PCABaseline(n_components=n_components, weighted=False, **options)
    data, weight = plain.training_matrix(spectra)
    plain.pca = WeightedPCA(n_components, max_iter=0).fit(data, weight)
    plain.fit_seconds = time.perf_counter() - start
    weighted = dataclasses.replace(plain, weighted=True, pca=None)
    weighted.pca = WeightedPCA(n_components, max_iter=weighted.max_iter).fit(data, weight, start=plain.pca.start_,
                                                                          progress=progress)
    weighted.fit_seconds = time.perf_counter() - start
    return {"plain": plain, "weighted": weighted}
