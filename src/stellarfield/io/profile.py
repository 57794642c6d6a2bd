"""One :class:`ProductProfile` per survey product: the product's facts that code outside its reader needs.

Each reader module declares the profile of every product it emits next to its reader and passes it
to :func:`~stellarfield.io.registry.register_reader`; the registry collects them
(:func:`~stellarfield.io.registry.product_profile`, :func:`~stellarfield.io.registry.profiles`).
The observation model (continuum degree, telluric mask), the bench (normalisation, RV references,
probe labels), the demo (line zooms) and the readers' own checks on what they read (known wavelength
range, header units) look a product up here instead of keeping tables of their own, so adding a
product is one reader file and one profile.

This module imports nothing of the package above it (no astropy, no torch): any layer may use it.
"""

from __future__ import annotations

from dataclasses import dataclass

from stellarfield.spectrum import FRAMES, NORMALISATIONS

#: The O2 A band (telluric absorption, fixed in the observed frame), vacuum Angstrom. The GALAH DR3
#: pipeline excludes 7590-7700 A (air) from its fits (Buder et al. 2021, MNRAS 506, 150, section 3),
#: which is 7592-7702 A in vacuum. The one source of these numbers: the GALAH profiles list it,
#: and both the instruments' training mask and the bench's score mask take it from the profiles.
O2_A_BAND_VACUUM_A = (7592.0, 7702.0)

#: Labels a latent-space probe predicts unless the product's profile says otherwise.
DEFAULT_PROBE_LABELS = ("teff", "logg", "fe_h")

#: Fraction by which a record's wavelengths may fall outside its product's known range before a read is
#: refused: covers radial velocities of observed-frame products (|v| < 1,000 km/s is 0.3%) and the
#: grid edges of individual files; a wavelength in the wrong unit (nm, micron, m) is off by 10x or more.
WAVELENGTH_RANGE_TOLERANCE = 0.02

#: Per-spectrum normalisations of the bench (:mod:`stellarfield.eval.normalise`).
BENCH_NORMALISATIONS = ("none", "median", "continuum")


@dataclass(frozen=True)
class RVReferenceKeys:
    """One comparison of the bench's RV section: ``fitted + correction`` against ``reference`` (km/s).

    ``reference`` and ``correction`` name where a record holds the value: ``"labels.<name>"`` (a
    :data:`~stellarfield.spectrum.LABEL_NAMES` label) or ``"meta.<key>"`` (a header fact the
    reader keeps in ``meta``); ``correction`` None adds nothing. ``error``: where the survey's own
    1-sigma uncertainty of ``reference`` is (km/s), None when the survey gives none.
    ``topocentric``: both sides are topocentric, so one star's values change between visits with
    the Earth's motion (no precision from repeat visits).
    """

    name: str
    description: str
    reference: str
    correction: str | None = None
    error: str | None = None
    topocentric: bool = False

    def __post_init__(self) -> None:
        for key in (self.reference, self.correction, self.error):
            if key is not None and not key.startswith(("labels.", "meta.")):
                raise ValueError(f"RV reference key {key!r} must start with 'labels.' or 'meta.'")


@dataclass(frozen=True)
class HeaderUnit:
    """A FITS header keyword the product's files carry whose value must start with ``prefix``
    (case-insensitive), e.g. apStar HDU 1 ``BUNIT = 'Flux (10^-17 erg/s/cm^2/Ang)'``: an HDU that
    holds something else (the error array where the flux should be) is refused. A file without the
    keyword is not refused by this check."""

    hdu: int
    keyword: str
    prefix: str


@dataclass(frozen=True)
class ProductProfile:
    """The facts of one survey product (``Spectrum.product``).

    product, title:
        The product name records carry, and a human title (``"APOGEE apStar"``).
    wavelength_range_A:
        ``(min, max)`` vacuum Angstrom that the product's pixels cover, in the frame its records are
        in (``frame``), as its documentation gives it; a record outside it by more than
        :data:`WAVELENGTH_RANGE_TOLERANCE` is refused on read (a wavelength in the wrong unit).
    frame, normalisation:
        What every record of the product says (``"rest"``/``"observed"``, ``"continuum"``/``"flux"``).
    flux_unit:
        The ``Spectrum.flux_unit`` its records carry (``""``: dimensionless or uncalibrated counts).
    continuum_degree:
        Legendre degree of the multiplicative continuum per segment in the observation model
        (0: one scale factor, for flux-calibrated SEDs whose shape is information).
    telluric_bands_A:
        Observed-frame bands (vacuum A) masked in training and excluded from the bench's scores.
    bench_normalisation:
        Per-spectrum normalisation of the bench's reconstruction scores (``"none"``, ``"median"``).
    rv_references:
        The bench's comparisons of fitted RVs for this product (the first is the headline); empty:
        compared with 0 (rest frame) or the ``rv_kms`` label (observed frame).
    probe_labels:
        Labels a latent-space probe of this product's spectra predicts.
    demo_line_zooms:
        Line zoom panels in the demo's fit plots (0 where lines are not resolved, Gaia XP).
    header_units:
        :class:`HeaderUnit` checks made on the file's headers before reading.
    model_resolution:
        Resolving power of the model's Gaussian LSF for this product, where it should not be the
        records' nominal ``resolution`` (None: the records' value, or their per-pixel ``lsf_fwhm``).
        For a product whose R varies along the spectrum (Gaia XP, R ~ 30-100) the sharpest value,
        so that the model's blur never removes structure the data have.
    sampled_from_basis:
        The product's spectra are samples of a basis-function expansion (Gaia XP: 55 functions per
        photometer, Carrasco et al. 2021, A&A 652, A86), so all of them lie in one subspace of the
        samples. The model's instrument then projects what it renders on the native samples onto
        that subspace, measured on the training spectra (:class:`~stellarfield.model.instrument.Instrument`).
    """

    product: str
    title: str
    wavelength_range_A: tuple[float, float]
    frame: str
    normalisation: str
    continuum_degree: int
    flux_unit: str = ""
    telluric_bands_A: tuple[tuple[float, float], ...] = ()
    bench_normalisation: str = "none"
    rv_references: tuple[RVReferenceKeys, ...] = ()
    probe_labels: tuple[str, ...] = DEFAULT_PROBE_LABELS
    demo_line_zooms: int = 3
    header_units: tuple[HeaderUnit, ...] = ()
    model_resolution: float | None = None
    sampled_from_basis: bool = False

    def __post_init__(self) -> None:
        lo, hi = self.wavelength_range_A
        if not 0 < lo < hi:
            raise ValueError(f"{self.product}: wavelength_range_A must be 0 < min < max, got {self.wavelength_range_A}")
        if self.frame not in FRAMES:
            raise ValueError(f"{self.product}: frame must be one of {FRAMES}, got {self.frame!r}")
        if self.normalisation not in NORMALISATIONS:
            raise ValueError(f"{self.product}: normalisation must be one of {NORMALISATIONS}")
        if self.bench_normalisation not in BENCH_NORMALISATIONS:
            raise ValueError(f"{self.product}: bench_normalisation must be one of {BENCH_NORMALISATIONS}")
        if self.model_resolution is not None and not self.model_resolution > 0:
            raise ValueError(f"{self.product}: model_resolution must be > 0, got {self.model_resolution}")
        if self.continuum_degree < 0 or self.demo_line_zooms < 0:
            raise ValueError(f"{self.product}: continuum_degree and demo_line_zooms must be >= 0")
        for band in self.telluric_bands_A:
            if not band[0] < band[1]:
                raise ValueError(f"{self.product}: telluric band {band} must be (min, max)")

    def wavelength_problem(self, wavelength_A) -> str | None:
        """Why ``wavelength_A`` (vacuum A, one record's pixels) cannot be this product's, or None.

        Refused: a wavelength that is not finite, or a range outside :attr:`wavelength_range_A`
        widened by :data:`WAVELENGTH_RANGE_TOLERANCE` (the usual cause: a header in nm, micron or m)."""
        import numpy as np

        w = np.asarray(wavelength_A, dtype=np.float64)
        if w.size == 0:
            return "no pixel"
        bad = int((~np.isfinite(w)).sum())
        if bad:
            return f"{bad} of {w.size} wavelengths are not finite"
        lo, hi = float(w.min()), float(w.max())
        known_lo, known_hi = self.wavelength_range_A
        if lo < known_lo * (1 - WAVELENGTH_RANGE_TOLERANCE) or hi > known_hi * (1 + WAVELENGTH_RANGE_TOLERANCE):
            return (f"wavelengths {lo:.6g}-{hi:.6g} A are outside the {self.title} range "
                    f"{known_lo:g}-{known_hi:g} A (a wavelength unit or WCS that is wrong in the file?)")
        return None
