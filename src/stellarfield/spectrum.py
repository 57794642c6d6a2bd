"""The one spectrum record that every survey reader produces.

A :class:`Spectrum` is one observation of one star (a combined spectrum, a visit, an exposure) as
the survey delivered it: every segment (APOGEE chip, GALAH CCD, or the whole range) stays on its
own native pixel grid, never resampled. Wavelengths are always **vacuum Angstrom**; readers of air
products convert on read (:mod:`stellarfield.physics.air_vacuum`). Whether the wavelengths are in
the star's rest frame or the observed (barycentric/heliocentric/topocentric) frame is recorded in
``frame``, exactly as the file gives it; nothing is shifted on read.

Labels (Teff, logg, ...) that a file or its catalogue carries are kept apart from the data in
``labels``: they are for validation only and are never model inputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: Frames a record can be in.
FRAMES = ("rest", "observed")
#: What the flux is: divided by a (pseudo-)continuum, or flux-like (fluxed, counts, relative flux).
NORMALISATIONS = ("continuum", "flux")
#: Label names the store keeps as typed columns (units: K, dex, dex, dex, km/s, per pixel).
LABEL_NAMES = ("teff", "logg", "fe_h", "alpha_m", "rv_kms", "snr")


def clean_pixels(flux: np.ndarray, ivar: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(ivar, mask)`` by the rule every :class:`Segment` applies: a pixel with non-finite flux or
    ivar, or negative ivar, is bad (it can never be good and carries no information), and ivar is 0
    wherever the pixel is bad (one convention for the likelihood). Elementwise: any shape (a table
    of records on one grid, :class:`~stellarfield.data.store.GridRows`, is cleaned at once)."""
    ok = np.isfinite(flux)
    ok &= ivar >= 0  # False for NaN
    ok &= ivar < np.inf
    if not ok.all():
        mask = mask & ok
    return np.where(mask, ivar, np.float32(0)).astype(np.float32, copy=False), mask


@dataclass
class Segment:
    """One contiguous piece of a spectrum on its native grid.

    Attributes
    ----------
    name:
        Segment name as the survey calls it (``"ccd1"``, ``"chip_a"``, ``"full"``).
    wavelength:
        Vacuum wavelength of each pixel centre, Angstrom, strictly increasing, float64.
    flux:
        Flux in the product's own units (see ``Spectrum.flux_unit``), float32.
    ivar:
        Inverse variance of ``flux`` (1 / unit**2); 0 where the noise is unknown or the pixel is bad.
    mask:
        True where the pixel is good according to the survey's own flags and finite data.
    lsf_fwhm:
        Line-spread-function FWHM per pixel in Angstrom, where the product gives it (GALAH
        pipeline 6), else None.
    """

    name: str
    wavelength: np.ndarray
    flux: np.ndarray
    ivar: np.ndarray
    mask: np.ndarray
    lsf_fwhm: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.wavelength = np.asarray(self.wavelength, dtype=np.float64)
        self.flux = np.asarray(self.flux, dtype=np.float32)
        self.ivar = np.asarray(self.ivar, dtype=np.float32)
        self.mask = np.asarray(self.mask, dtype=bool)
        if self.lsf_fwhm is not None:
            self.lsf_fwhm = np.asarray(self.lsf_fwhm, dtype=np.float32)
        n = self.wavelength.shape[0]
        for name in ("flux", "ivar", "mask") + (("lsf_fwhm",) if self.lsf_fwhm is not None else ()):
            arr = getattr(self, name)
            if arr.ndim != 1 or arr.shape[0] != n:
                raise ValueError(
                    f"segment {self.name!r}: {name} has shape {arr.shape}, wavelength has ({n},)"
                )
        if self.wavelength.ndim != 1:
            raise ValueError(f"segment {self.name!r}: wavelength must be 1-D")
        if n > 1 and not np.all(np.diff(self.wavelength) > 0):
            raise ValueError(f"segment {self.name!r}: wavelength must be strictly increasing")
        self.ivar, self.mask = clean_pixels(self.flux, self.ivar, self.mask)

    @property
    def n_pixels(self) -> int:
        return int(self.wavelength.shape[0])


@dataclass
class Spectrum:
    """One observation of one star, on the survey's native grid(s).

    Attributes
    ----------
    object_id:
        The star's identifier in its survey (2MASS id for APOGEE, sobject_id for GALAH, ...), kept
        as the survey gives it.
    survey, instrument:
        e.g. ``"APOGEE"``, ``"APOGEE-N"``; ``"GALAH"``, ``"HERMES"``.
    product:
        The survey product and source key, e.g. ``"apogee_apstar"``, ``"galah_dr3"``, ``"gaia_xp"``.
    observation_id:
        Visit / exposure identifier where there is one (else None).
    segments:
        The spectrum's pieces, each on its own grid, in increasing wavelength.
    frame:
        ``"rest"`` or ``"observed"``, as the product gives it.
    normalisation:
        ``"continuum"`` (continuum-normalised) or ``"flux"`` (flux-like, any units).
    resolution:
        Resolving power R = lambda / FWHM where known (None if per-pixel ``lsf_fwhm`` is given
        or it is unknown).
    noise_known:
        False where the product has no error array (MILES): ivar is then 0 everywhere and the
        likelihood must learn the noise; it is never invented.
    flux_unit:
        Unit string of the flux as the file states it ("" for dimensionless).
    labels:
        Survey labels kept apart from the data: keys from ``LABEL_NAMES`` (float, NaN if missing).
    provenance:
        ``{"file": path, "hdu": "..."}`` and any other facts of where the data came from.
    meta:
        Further header facts (JSON-serialisable scalars only).
    star_id:
        The star's canonical identity across surveys and products (:mod:`stellarfield.data.stars`):
        a normalised catalogue name (``"HD 124897"``, ``"BD+00 2058 A"``, ``"2M00452143+1634446"``) or a
        survey designation where a position is all there is (``"LAMOST J192814.09+435531.0"``), so
        that every spectrum of one star, whatever its product, carries the same value. None where no
        identity is known yet: readers set it where the file itself names the star, and a dataset
        resolves it over all its records on write (names and positions). The train/validation/test
        split is made on ``star_id``, falling back to ``object_id`` (:func:`~stellarfield.data.split.split_id`).
    """

    object_id: str
    survey: str
    instrument: str
    product: str
    segments: list[Segment]
    frame: str
    normalisation: str
    observation_id: str | None = None
    resolution: float | None = None
    noise_known: bool = True
    flux_unit: str = ""
    labels: dict[str, float] = field(default_factory=dict)
    provenance: dict[str, str] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    star_id: str | None = None

    def __post_init__(self) -> None:
        if self.frame not in FRAMES:
            raise ValueError(f"frame must be one of {FRAMES}, got {self.frame!r}")
        if self.normalisation not in NORMALISATIONS:
            raise ValueError(f"normalisation must be one of {NORMALISATIONS}, got {self.normalisation!r}")
        if not self.segments:
            raise ValueError(f"spectrum {self.object_id!r} has no segments")
        unknown = set(self.labels) - set(LABEL_NAMES)
        if unknown:
            raise ValueError(f"unknown label names {sorted(unknown)}; allowed: {LABEL_NAMES}")
        self.labels = {k: float(v) for k, v in self.labels.items()}
        if self.star_id is not None:
            self.star_id = str(self.star_id).strip() or None

    # --- concatenated views over all segments (numpy-friendly) ---------------------------
    @property
    def wavelength(self) -> np.ndarray:
        """Vacuum wavelength in Angstrom of all pixels, segments concatenated."""
        return np.concatenate([s.wavelength for s in self.segments])

    @property
    def flux(self) -> np.ndarray:
        return np.concatenate([s.flux for s in self.segments])

    @property
    def ivar(self) -> np.ndarray:
        return np.concatenate([s.ivar for s in self.segments])

    @property
    def mask(self) -> np.ndarray:
        return np.concatenate([s.mask for s in self.segments])

    @property
    def n_pixels(self) -> int:
        return sum(s.n_pixels for s in self.segments)

    @property
    def key(self) -> str:
        """A unique, readable key: product/object_id[/observation_id]."""
        parts = [self.product, self.object_id]
        if self.observation_id:
            parts.append(self.observation_id)
        return "/".join(parts)

    def label(self, name: str) -> float:
        """A label's value, NaN when the source does not give it."""
        return float(self.labels.get(name, np.nan))

    def __repr__(self) -> str:
        segs = ", ".join(
            f"{s.name}:{s.n_pixels}px {s.wavelength[0]:.1f}-{s.wavelength[-1]:.1f}A" for s in self.segments
        )
        return f"Spectrum({self.key!r}, {self.frame}, {self.normalisation}, [{segs}])"

    # --- ecosystem interchange ---------------------------------------------------------
    def to_specutils(self):
        """Convert to ``specutils`` objects.

        Returns a ``Spectrum1D``/``Spectrum`` for a one-segment record, else a
        ``SpectrumList`` with one per segment (segments are never resampled onto one grid).
        Uncertainty is an ``InverseVariance``; ``mask`` follows specutils' convention (True = bad).
        """
        from stellarfield.data.interop import to_specutils

        return to_specutils(self)

    @classmethod
    def from_specutils(cls, spec, **kwargs) -> "Spectrum":
        """Build a record from a specutils spectrum (or list); see :func:`stellarfield.data.interop.from_specutils`."""
        from stellarfield.data.interop import from_specutils

        return from_specutils(spec, **kwargs)
