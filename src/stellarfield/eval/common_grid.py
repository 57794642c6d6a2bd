"""One wavelength grid per survey product, for the baselines that need all spectra on one grid.

The grid is made of the product's segments (APOGEE chips, GALAH CCDs, or one ``"full"`` segment),
each taken from a real training spectrum: for every segment name, the training spectrum whose
segment start and end are closest to the medians over all training spectra (so for products whose
spectra share one grid, as APOGEE apStar, Gaia XP, MILES and LAMOST, the common grid IS the native
grid and resampling copies pixels exactly). Segments are never joined: no pixel is interpolated
across a gap between chips.

Nothing is shifted: the grid is in the product's own frame (rest for rest-frame products; the
observed frame for apVisit, LAMOST, GALAH observed, where a PCA baseline must then absorb the RV
spread itself, as it has no physics).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from stellarfield.eval.resample import interpolate, linear_weights, resample_linear
from stellarfield.spectrum import Spectrum


@dataclass
class CommonGrid:
    """Segments of a product's common grid: names and vacuum wavelengths (Angstrom), in order."""

    segment_names: list[str]
    segment_wavelengths: list[np.ndarray]

    @classmethod
    def from_spectra(cls, spectra: Iterable[Spectrum]) -> "CommonGrid":
        """The grid of a product from (training) spectra; see the module docstring for the rule."""
        grids: dict[str, list[np.ndarray]] = {}
        for spectrum in spectra:
            for segment in spectrum.segments:
                grids.setdefault(segment.name, []).append(segment.wavelength)
        if not grids:
            raise ValueError("no spectra to build a common grid from")
        names, waves = [], []
        for name, candidates in grids.items():
            starts = np.array([w[0] for w in candidates])
            ends = np.array([w[-1] for w in candidates])
            step = np.median([np.median(np.diff(w)) for w in candidates])
            distance = np.hypot(starts - np.median(starts), ends - np.median(ends)) / step
            names.append(name)
            waves.append(np.array(candidates[int(np.argmin(distance))], dtype=np.float64))
        order = np.argsort([w[0] for w in waves])
        return cls([names[i] for i in order], [waves[i] for i in order])

    @property
    def wavelength(self) -> np.ndarray:
        """All grid wavelengths, segments concatenated (vacuum Angstrom)."""
        return np.concatenate(self.segment_wavelengths)

    @property
    def n_pixels(self) -> int:
        return int(sum(w.size for w in self.segment_wavelengths))

    @property
    def segment_slices(self) -> dict[str, slice]:
        """Slice of each segment in the concatenated grid."""
        out, start = {}, 0
        for name, wave in zip(self.segment_names, self.segment_wavelengths):
            out[name] = slice(start, start + wave.size)
            start += wave.size
        return out

    def resample(self, spectrum: Spectrum) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(flux, ivar, mask)`` of ``spectrum`` on this grid (errors propagated; see :mod:`.resample`).

        A grid segment that the spectrum does not have is all bad (mask False, ivar 0, flux 0).
        """
        by_name = {s.name: s for s in spectrum.segments}
        flux, ivar, mask = [], [], []
        for name, wave in zip(self.segment_names, self.segment_wavelengths):
            segment = by_name.get(name)
            if segment is None or segment.n_pixels < 2:
                flux.append(np.zeros(wave.size))
                ivar.append(np.zeros(wave.size))
                mask.append(np.zeros(wave.size, dtype=bool))
                continue
            if segment.n_pixels == wave.size and np.allclose(segment.wavelength, wave, rtol=0, atol=1e-9 * wave[-1]):
                f = np.where(segment.mask, segment.flux, 0.0).astype(np.float64)
                iv = segment.ivar.astype(np.float64)
                m = segment.mask.copy()
            else:
                f, iv, m = resample_linear(
                    segment.wavelength, segment.flux, segment.ivar, segment.mask, wave, noise_known=spectrum.noise_known
                )
            flux.append(f)
            ivar.append(iv)
            mask.append(m)
        return np.concatenate(flux), np.concatenate(ivar), np.concatenate(mask)

    def to_native(self, values: np.ndarray, spectrum: Spectrum) -> np.ndarray:
        """Values given on this grid, ``(..., n_pixels)``, interpolated to ``spectrum``'s native pixels.

        Returns ``(..., spectrum.n_pixels)`` (segments concatenated), NaN at native pixels outside
        the grid segment of the same name (or of a segment the grid does not have).
        """
        values = np.asarray(values, dtype=np.float64)
        slices = self.segment_slices
        grid_waves = dict(zip(self.segment_names, self.segment_wavelengths))
        out = []
        for segment in spectrum.segments:
            if segment.name not in slices:
                out.append(np.full(values.shape[:-1] + (segment.n_pixels,), np.nan))
                continue
            weights = linear_weights(grid_waves[segment.name], segment.wavelength)
            out.append(interpolate(weights, values[..., slices[segment.name]]))
        return np.concatenate(out, axis=-1)
