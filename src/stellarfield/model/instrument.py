"""The observation model of one survey product: its grids, LSF, normalisation, masks and rendering.

An :class:`Instrument` turns the decoder's rest-frame spectrum into what one survey product records:

1. the trunk is evaluated on a **model grid** per segment (APOGEE chip, GALAH CCD, or the whole
   range), uniform in ``u = ln(lambda)`` for a constant resolving power (or uniform in lambda for a
   constant FWHM in Angstrom, as MILES), covering the rest-frame range the product can see for any
   radial velocity in its scan range;
2. the model is **blurred** on that grid by the product's Gaussian LSF
   (:func:`stellarfield.physics.lsf.gaussian_blur_uniform`); the blur is linear, so it can act on the
   trunk basis once per grid (generation) or on a batch of spectra (training), whichever is smaller;
3. it is **rendered** at each native pixel by linear interpolation at the pixel's rest-frame
   coordinate ``u_pix - ln(1 + v/c)`` (:func:`stellarfield.physics.doppler.log_shift`): the data are
   never resampled, the model is evaluated where the data are;
4. for a product whose spectra are samples of a basis-function expansion (Gaia XP), what is
   rendered on its native samples is **projected** onto the span of its training spectra
   (:attr:`Instrument.sample_basis`): the data cannot hold anything outside it.

The smooth multiplicative continuum and the likelihood are in :mod:`stellarfield.model.objectives`;
the instrument says how many continuum coefficients each segment gets, whether the noise is known,
the RV scan range, and which observed-frame bands are masked (telluric absorption does not move
with the star: GALAH CCD4's O2 A band is masked; APOGEE spectra are telluric-corrected by the survey
pipeline and their flagged pixels are already bad in the mask).

A *view* of the model grid is a list of ``(segment_index, i0, i1)`` pieces: the whole grid
(:meth:`Instrument.full_view`) or a window of one segment (training on pixel subsets).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from stellarfield.physics.doppler import C_KMS, log_shift
from stellarfield.physics.lsf import FWHM_PER_SIGMA, gaussian_blur_uniform, resolution_to_sigma_u

#: Finest allowed model-grid step in u (bounds the grid size; ~1/4 of the sharpest LSF sigma here).
MIN_GRID_STEP_U = 4e-6

#: Continuum polynomial degree per segment (closed-form fit inside the loss) of a product without a
#: :class:`~stellarfield.io.profile.ProductProfile` (a custom grid, synthetic products), by
#: normalisation; registered products take theirs (and their telluric bands) from their profile.
FALLBACK_CONTINUUM_DEGREE = {"continuum": 1, "flux": 2}

#: Half-width of the radial-velocity scan by frame, km/s (rest-frame products: residual errors of
#: the survey's own RV correction).
DEFAULT_RV_SCAN_KMS = {"observed": 500.0, "rest": 30.0}


@dataclass
class GridSegment:
    """The model grid of one segment, in the rest frame.

    ``scale`` is ``"log"`` (coordinate ``u = ln(lambda/A)``) or ``"linear"`` (coordinate lambda in
    vacuum Angstrom); grid point ``i`` is at ``start + i * step``; ``sigma`` is the Gaussian LSF
    sigma in the same coordinate. ``pixel_u_min``/``pixel_u_max`` give the range of the product's
    native pixels (observed frame of the product, ``ln`` of vacuum Angstrom).
    """

    name: str
    scale: str
    start: float
    step: float
    size: int
    sigma: float
    pixel_u_min: float
    pixel_u_max: float
    native: dict = field(default_factory=dict)  # a typical native pixel grid, see native_wavelength()

    @property
    def sigma_pixels(self) -> float:
        return self.sigma / self.step

    def coordinate(self, u):
        """Grid coordinate of ``u = ln(lambda)`` (numpy or torch): u itself or lambda in A."""
        if self.scale == "log":
            return u
        return torch.exp(u) if isinstance(u, torch.Tensor) else np.exp(u)

    def u(self, i0: int = 0, i1: int | None = None) -> np.ndarray:
        """``u = ln(lambda/A)`` (float64) of grid points ``i0 .. i1 - 1``."""
        coord = self.start + self.step * np.arange(i0, self.size if i1 is None else i1, dtype=np.float64)
        return coord if self.scale == "log" else np.log(coord)

    def native_wavelength(self) -> np.ndarray:
        """Vacuum wavelengths (A) of a typical native pixel grid of this segment (the first record
        seen): ``{"kind": "log", "start", "step", "n"}`` (uniform in ln lambda), ``"linear"``
        (uniform in lambda) or ``"table"`` (the wavelengths themselves)."""
        g = self.native
        if not g:
            raise ValueError(f"segment {self.name!r} has no native grid recorded")
        if g["kind"] == "table":
            return np.asarray(g["wavelength"], dtype=np.float64)
        coord = g["start"] + g["step"] * np.arange(g["n"], dtype=np.float64)
        return np.exp(coord) if g["kind"] == "log" else coord

    def index_of_u(self, u: float) -> float:
        """Fractional grid index of rest-frame ``u``."""
        return (float(self.coordinate(np.float64(u))) - self.start) / self.step


@dataclass
class Instrument:
    """One survey product's observation model (see the module docstring).

    name: the product (``Spectrum.product``), e.g. ``"apogee_apstar"``.
    frame, normalisation, noise_known: as the product's records say.
    segments: one :class:`GridSegment` per segment name, increasing in wavelength.
    continuum_degree: Legendre degree of the multiplicative continuum of each segment.
    rv_scan_kms: radial velocities in [-rv_scan_kms, +rv_scan_kms] are searched per spectrum
        (0: the velocity is fixed at 0, e.g. Gaia XP where R ~ 50 makes any RV invisible).
    telluric_bands_A: observed-frame bands (vacuum A) whose pixels are masked.
    scatter_init: initial intrinsic scatter, as a fraction of the spectrum's median flux.
    sample_basis, sample_u: for a product sampled from a basis-function expansion
        (``ProductProfile.sampled_from_basis``, Gaia XP), the orthonormal rows (k, P; unit norm
        over the samples, no flux unit) spanning its training spectra, and ``ln(lambda / A)`` (P,)
        of its native samples (vacuum, the product's frame, as :meth:`render`'s ``u_obs``): what
        :meth:`render` gives on exactly those samples is projected onto the span (the data cannot
        have anything else, so a model part outside it is misfit no latent can remove). None: no
        projection.
    """

    name: str
    frame: str
    normalisation: str
    noise_known: bool
    segments: list[GridSegment]
    continuum_degree: int
    rv_scan_kms: float
    telluric_bands_A: list[tuple[float, float]] = field(default_factory=list)
    scatter_init: float = 0.01
    sample_basis: list[list[float]] | None = None
    sample_u: list[float] | None = None

    # --- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Instrument":
        d = dict(d)
        d["segments"] = [GridSegment(**s) for s in d["segments"]]
        d["telluric_bands_A"] = [tuple(b) for b in d.get("telluric_bands_A", [])]
        return cls(**d)

    # --- geometry ------------------------------------------------------------------------
    @property
    def segment_names(self) -> list[str]:
        return [s.name for s in self.segments]

    @property
    def u_range(self) -> tuple[float, float]:
        """Range of the native pixels, ``ln`` of vacuum Angstrom (observed frame of the product)."""
        return min(s.pixel_u_min for s in self.segments), max(s.pixel_u_max for s in self.segments)

    @property
    def sigma_kms(self) -> float:
        """LSF sigma in km/s (median over segments; mid-segment for grids uniform in lambda)."""
        return C_KMS * float(np.median([
            s.sigma if s.scale == "log" else s.sigma / math.exp((s.pixel_u_min + s.pixel_u_max) / 2)
            for s in self.segments]))

    @property
    def n_grid(self) -> int:
        return sum(s.size for s in self.segments)

    def fitted_parameters(self, latent_dim: int, segments_used, rv_fitted: bool):
        """Parameters fitted to one spectrum, what a chi2_nu's degrees of freedom subtract: the latent,
        ``continuum_degree + 1`` continuum coefficients per segment with good pixels (``segments_used``:
        an int, or an integer array/tensor of one count per spectrum), and the RV where it is fitted."""
        return latent_dim + (self.continuum_degree + 1) * segments_used + (1 if rv_fitted else 0)

    def full_view(self) -> list[tuple[int, int, int]]:
        return [(k, 0, s.size) for k, s in enumerate(self.segments)]

    def view_u(self, view) -> torch.Tensor:
        """Rest-frame ``u`` (float64) of the grid points of ``view``, pieces concatenated."""
        return torch.from_numpy(np.concatenate([self.segments[k].u(i0, i1) for k, i0, i1 in view]))

    def view_sigma_u(self, view) -> torch.Tensor:
        """LSF sigma in u (float64) at the grid points of ``view`` (the trunk's band limit there)."""
        parts = []
        for k, i0, i1 in view:
            s = self.segments[k]
            parts.append(np.full(i1 - i0, s.sigma) if s.scale == "log" else s.sigma / np.exp(s.u(i0, i1)))
        return torch.from_numpy(np.concatenate(parts))

    def window_view(self, segment: int, u_lo: float, u_hi: float, v_min_kms: float, v_max_kms: float):
        """The piece of ``segment``'s grid needed to render pixels with observed ``u`` in
        [u_lo, u_hi] at velocities in [v_min, v_max], plus 5 LSF sigma (the blur's reach)."""
        seg = self.segments[segment]
        margin = 5 * seg.sigma_pixels + 2
        i0 = seg.index_of_u(u_lo - float(log_shift(v_max_kms))) - margin
        i1 = seg.index_of_u(u_hi - float(log_shift(v_min_kms))) + margin
        i0, i1 = max(0, int(math.floor(i0))), min(seg.size, int(math.ceil(i1)) + 1)
        return [(segment, i0, i1)]

    def pixel_mask(self, wavelength_A: np.ndarray) -> np.ndarray:
        """True where a native pixel (vacuum A, the product's frame) is outside every telluric band.

        For rest-frame products the bands are widened by the RV scan range plus 100 km/s, since the
        star's velocity, which moved the band in the rest frame, is not known here."""
        ok = np.ones(wavelength_A.shape, dtype=bool)
        widen = 1.0 if self.frame == "observed" else 1.0 + (self.rv_scan_kms + 100.0) / C_KMS
        for lo, hi in self.telluric_bands_A:
            ok &= ~((wavelength_A > lo / widen) & (wavelength_A < hi * widen))
        return ok

    # --- the observation model -----------------------------------------------------------
    def blur(self, values: torch.Tensor, view, dim: int = -1) -> torch.Tensor:
        """Blur ``values`` (..., G, ...) on the grid of ``view`` by the LSF, piece by piece along ``dim``."""
        parts, start = [], 0
        for k, i0, i1 in view:
            n = i1 - i0
            piece = values.narrow(dim, start, n)
            parts.append(gaussian_blur_uniform(piece, self.segments[k].sigma_pixels, dim=dim))
            start += n
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)

    def render(self, grid_values: torch.Tensor, view, u_obs: torch.Tensor, segment: torch.Tensor,
               v_kms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Model flux at native pixels by linear interpolation of the (blurred) grid values.

        Args:
            grid_values: (B, G) model on the grid of ``view`` (rest frame, already blurred); or
                (B, M, G), M models of each spectrum rendered at its one velocity (the directions of a
                Jacobian: the pixels' grid positions are computed once for all M).
            u_obs: (B, P) float64 ``ln`` of the pixels' vacuum wavelength in A (product's frame).
            segment: (B, P) long, index of each pixel's segment in :attr:`segments`.
            v_kms: (B,) one velocity per spectrum, or (B, V) several (an RV scan); km/s,
                lambda_obs = (1 + v/c) lambda_rest. Differentiable.

        Returns:
            ``(flux, inside)``: (B, P), (B, V, P) or (B, M, P) model flux, and a bool tensor of that shape,
            False where the pixel's rest coordinate falls outside the view (its flux is then
            clamped to the view's edge and must get zero weight).
        """
        n_seg, dev = len(self.segments), u_obs.device
        offset = torch.full((n_seg,), -1, dtype=torch.long)  # where each segment's piece starts in G
        first = torch.zeros(n_seg, dtype=torch.float64)        # coordinate of the piece's first point
        step = torch.ones(n_seg, dtype=torch.float64)
        length = torch.zeros(n_seg, dtype=torch.long)
        start = 0
        for k, i0, i1 in view:
            s = self.segments[k]
            offset[k], first[k], step[k], length[k] = start, s.start + i0 * s.step, s.step, i1 - i0
            start += i1 - i0
        offset, first, step, length = offset.to(dev), first.to(dev), step.to(dev), length.to(dev)

        scan = v_kms.dim() == 2
        several = grid_values.dim() == 3
        if scan and several:
            raise ValueError("render: several models per spectrum (B, M, G) take one velocity each, not a scan")
        finite = torch.isfinite(u_obs)  # padding is +inf: keep it out of exp() and the gradients
        u_obs = torch.where(finite, u_obs, self.segments[0].pixel_u_min)
        seg = segment  # (B, P)
        shift = log_shift(v_kms.to(torch.float64))  # (B,) or (B, V)
        # each pixel's grid coordinate t = (coordinate of its rest wavelength - first) / step, as
        # ONE multiply-add on the (B[, V], P) arrays: t = t_rest + slope * g(v), the pixel terms
        # (B, P) computed once for every trial velocity. u = ln(lambda) grids: u_rest = u - shift, so
        # t_rest = (u - first) / step, slope = -1 / step, g = shift; lambda grids: lambda_rest =
        # lambda e^-shift, so t_rest = -first / step, slope = lambda / step, g = e^-shift.
        scales = {s.scale for s in self.segments}
        inverse_step = 1.0 / step[seg]  # (B, P)
        if scales == {"log"}:
            t_rest, slope, g = (u_obs - first[seg]) * inverse_step, -inverse_step, shift[..., None]
        elif scales == {"linear"}:
            t_rest, slope, g = -first[seg] * inverse_step, torch.exp(u_obs) * inverse_step, torch.exp(-shift)[..., None]
        else:  # both kinds of segment: the rest coordinate per pixel (and trial velocity)
            linear = torch.tensor([s.scale == "linear" for s in self.segments], device=dev)[seg]
            u_rest = (u_obs[:, None, :] if scan else u_obs) - shift[..., None]
            g = torch.where(linear[:, None, :] if scan else linear, torch.exp(u_rest), u_rest)
            t_rest, slope = -first[seg] * inverse_step, inverse_step
        if scan:  # the pixel terms are the same for every trial velocity
            t_rest, slope = t_rest[:, None, :], slope[:, None, :]
        t = torch.addcmul(t_rest, slope, g)
        last = (length[seg] - 1).to(t.dtype)  # (B, P): the last grid point of each pixel's segment
        seen = (offset[seg] >= 0) & finite
        if scan:
            last, seen = last[:, None, :], seen[:, None, :]
        inside = seen & (t >= 0) & (t <= last)
        t = torch.minimum(t.clamp(min=0), last.clamp(min=1) - 1e-9)
        left = t.floor()
        frac = (t - left).to(grid_values.dtype)
        # the grid point left of each pixel, as a float (exact below 2**53) converted once: integer
        # arithmetic on these arrays is several times slower than float arithmetic
        start_of = offset[seg].clamp(min=0).to(t.dtype)
        index = left + (start_of[:, None, :] if scan else start_of)  # NaN where there is no velocity: point 0
        index = torch.nan_to_num(index, nan=0.0).clamp_(0, grid_values.shape[-1] - 2).long()
        values = grid_values[:, None, :].expand(-1, index.shape[1], -1) if scan else grid_values
        if several:  # the same positions for each of the M models
            shape = (-1, grid_values.shape[1], -1)
            index, frac, inside = index[:, None].expand(shape), frac[:, None], inside[:, None].expand(shape)
        # the point on the right: the same index into the values shifted by one (no index + 1 array)
        flux = torch.lerp(values.gather(-1, index), values[..., 1:].gather(-1, index), frac)
        if self.sample_basis is not None:
            projection = self._sample_projection(u_obs, flux.dtype)
            if projection is not None:
                basis, native = projection
                projected = (flux @ basis.T) @ basis  # (B, P) or (B, V or M, P)
                flux = torch.where(native[:, None, None] if flux.dim() == 3 else native[:, None], projected, flux)
        return flux, inside

    def render_basis(self, basis: torch.Tensor, view, u_obs: torch.Tensor, segment: torch.Tensor,
                     v_kms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A basis on the grid of ``view`` (G, H + 1; blurred) rendered at one set of pixels ``u_obs``
        (P,) with ``segment`` (P,), at one velocity ``v_kms`` (one element): ``(values, inside)``,
        (H + 1, P) and (P,). Rendering is linear in the grid values, so the model ``[coeffs, 1] @
        basis^T`` rendered there is ``[coeffs, 1] @ values``: one product per spectrum, for any latent."""
        values, inside = self.render(basis.T[None], view, u_obs[None], segment[None], v_kms.reshape(1))
        return values[0], inside[0, 0]

    def _sample_projection(self, u_obs: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(basis, native)``: :attr:`sample_basis` (k, P) as a tensor of ``dtype`` on ``u_obs``'
        device, and a (B,) bool tensor, True for the rows of ``u_obs`` (B, P) that are the product's
        native samples (:attr:`sample_u`, to 1e-9 in ln wavelength); None when ``u_obs`` has another
        number of pixels. Kept per (device, dtype) while ``sample_basis`` and ``sample_u`` are the
        same objects (assigning new ones rebuilds the tensors); no host synchronisation."""
        cache = self.__dict__.setdefault("_sample_cache", {})
        entry = cache.get((u_obs.device, dtype))
        if entry is None or entry[0] is not self.sample_basis or entry[1] is not self.sample_u:
            entry = (self.sample_basis, self.sample_u,
                     torch.tensor(self.sample_u, dtype=torch.float64, device=u_obs.device),
                     torch.tensor(self.sample_basis, dtype=dtype, device=u_obs.device))
            cache[(u_obs.device, dtype)] = entry
        u_ref, basis = entry[2], entry[3]
        if u_obs.shape[-1] != u_ref.shape[0]:
            return None
        native = ((u_obs - u_ref).abs() <= 1e-9).all(-1)
        return basis, native


# --- building instruments from data ------------------------------------------------------
@dataclass
class _SegmentStats:
    u_min: float = math.inf
    u_max: float = -math.inf
    steps: list = field(default_factory=list)      # median pixel step in u, per spectrum
    native: dict = field(default_factory=dict)     # the first record's grid (GridSegment.native)
    sigma_u: list = field(default_factory=list)    # LSF sigma in u, per spectrum (median over pixels)
    fwhm_A: list = field(default_factory=list)     # LSF FWHM in A, per spectrum (where given)
    constant_in_A: list = field(default_factory=list)  # per spectrum: the FWHM varies less in A than in lambda/FWHM


@dataclass
class ProductStats:
    """What :func:`build_instrument` needs to know about a product, accumulated over its records."""

    product: str
    frame: str = ""
    normalisation: str = ""
    noise_known: bool = True
    resolution: list = field(default_factory=list)
    segments: dict = field(default_factory=dict)
    n_spectra: int = 0
    #: whether the product is sampled from a basis expansion (None: its ProductProfile says)
    sampled_from_basis: bool | None = None
    samples: "SampleSpan | None" = None

    def add(self, spectrum) -> None:
        if self.sampled_from_basis is None:
            from stellarfield.io.registry import product_profile

            profile = product_profile(self.product)
            self.sampled_from_basis = bool(profile is not None and profile.sampled_from_basis)
        if self.sampled_from_basis:
            self.samples = self.samples or SampleSpan()
            self.samples.add(spectrum)
        self.frame, self.normalisation = spectrum.frame, spectrum.normalisation
        self.noise_known = self.noise_known and spectrum.noise_known
        if spectrum.resolution:
            self.resolution.append(float(spectrum.resolution))
        self.n_spectra += 1
        for seg in spectrum.segments:
            if seg.n_pixels < 2:
                continue
            st = self.segments.setdefault(seg.name, _SegmentStats())
            u = np.log(seg.wavelength)
            if not st.native:
                st.native = describe_grid(seg.wavelength)
            st.u_min, st.u_max = min(st.u_min, float(u[0])), max(st.u_max, float(u[-1]))
            if len(st.steps) < 200:  # a sample of spectra is plenty for medians
                st.steps.append(float(np.median(np.diff(u))))
                if seg.lsf_fwhm is not None and np.isfinite(seg.lsf_fwhm).any():
                    st.sigma_u.append(float(np.nanmedian(seg.lsf_fwhm / seg.wavelength)) / FWHM_PER_SIGMA)
                    st.fwhm_A.append(float(np.nanmedian(seg.lsf_fwhm)))
                    in_A, in_R = _relative_spread(seg.lsf_fwhm), _relative_spread(seg.lsf_fwhm / seg.wavelength)
                    st.constant_in_A.append(in_A < in_R)


#: Singular values of a product's sample matrix below this share of the largest are taken as
#: rounding of the stored float32 samples, not a direction the data span: float32's epsilon is
#: 1.2e-7, and the floor that rounding and the Gram matrix's eigendecomposition leave on a float32
#: matrix of known rank lies well below it, so the cut is conservative.
SAMPLE_SPAN_TOLERANCE = 1e-7


@dataclass
class SampleSpan:
    """The span of a product's spectra on one grid of samples: the Gram matrix of their flux
    (each divided by its median |flux|), accumulated in blocks. Spectra with a bad sample are left
    out; a second grid makes the span unusable (``mixed``)."""

    wavelength: np.ndarray | None = None
    gram: np.ndarray | None = None
    pending: list = field(default_factory=list)
    n: int = 0
    mixed: bool = False

    def add(self, spectrum) -> None:
        wavelength = spectrum.wavelength
        if self.wavelength is None:
            self.wavelength = wavelength
        elif not np.array_equal(wavelength, self.wavelength):
            self.mixed = True
            return
        flux = np.asarray(spectrum.flux, dtype=np.float64)
        scale = np.median(np.abs(flux))
        if not (spectrum.mask.all() and np.isfinite(flux).all() and scale > 0):
            return
        self.pending.append(flux / scale)
        if len(self.pending) >= 1024:
            self._flush()

    def _flush(self) -> None:
        if self.pending:
            block = np.array(self.pending)
            self.gram = block.T @ block + (0.0 if self.gram is None else self.gram)
            self.n += len(self.pending)
            self.pending = []

    def decomposition(self) -> tuple[np.ndarray, np.ndarray] | None:
        """``(singular, rows)``: the singular values (P,) of the spectra's matrix, largest first, and
        the orthonormal rows (P, P) they belong to (from the Gram matrix's eigendecomposition); None
        for fewer than 2 spectra or more than one grid."""
        self._flush()
        if self.mixed or self.gram is None or self.n < 2:
            return None
        eigenvalues, vectors = np.linalg.eigh(self.gram)
        return np.sqrt(np.clip(eigenvalues[::-1], 0.0, None)), vectors[:, ::-1].T.copy()

    def basis(self) -> np.ndarray | None:
        """Orthonormal rows (k, P) spanning the spectra (singular values above
        :data:`SAMPLE_SPAN_TOLERANCE` of the largest); None where they span every sample's
        direction anyway, or the grid was not one."""
        decomposition = self.decomposition()
        if decomposition is None:
            return None
        singular, rows = decomposition
        rank = int((singular > SAMPLE_SPAN_TOLERANCE * singular[0]).sum())
        if rank >= min(self.n, len(self.wavelength)):
            return None
        return rows[:rank].copy()

    def instrument_fields(self) -> tuple[list[list[float]] | None, list[float] | None]:
        """:attr:`Instrument.sample_basis` and :attr:`Instrument.sample_u` for this span ((None,
        None) where :meth:`basis` gives none)."""
        basis = self.basis()
        if basis is None:
            return None, None
        return basis.tolist(), np.log(self.wavelength).tolist()


def _relative_spread(values: np.ndarray) -> float:
    """(98th - 2nd percentile) / median of the finite values: how much an LSF width varies along a segment."""
    lo, mid, hi = np.nanpercentile(np.asarray(values, dtype=np.float64), [2, 50, 98])
    return float((hi - lo) / mid)


def describe_grid(wavelength: np.ndarray) -> dict:
    """Compact description of a pixel grid (see :meth:`GridSegment.native_wavelength`): uniform in
    ln(lambda) or lambda to 1e-4 of a pixel over the whole grid, else the table itself."""
    wavelength = np.asarray(wavelength, dtype=np.float64)
    n = len(wavelength)
    for kind, coord in (("log", np.log(wavelength)), ("linear", wavelength)):
        step = (coord[-1] - coord[0]) / (n - 1)
        if np.abs(coord - (coord[0] + step * np.arange(n))).max() < 1e-4 * abs(step):
            return {"kind": kind, "start": float(coord[0]), "step": float(step), "n": int(n)}
    return {"kind": "table", "wavelength": wavelength.tolist()}


def grid_instrument(wavelength_A: np.ndarray, resolution: float | None = None, name: str = "custom",
                    oversample: float = 3.0, max_rv_kms: float = 300.0) -> Instrument:
    """An instrument for an arbitrary grid (vacuum A, increasing): Gaussian LSF of resolving power
    ``resolution``, or, if None, the one the grid samples at 2.5 pixels per FWHM. Used to generate
    spectra on any grid (radial velocities up to ``max_rv_kms``); no continuum, no telluric mask."""
    wavelength_A = np.asarray(wavelength_A, dtype=np.float64)
    if wavelength_A.ndim != 1 or len(wavelength_A) < 2 or not np.all(np.diff(wavelength_A) > 0):
        raise ValueError("the wavelength grid must be a 1-D, strictly increasing array of at least 2 values")
    u = np.log(wavelength_A)
    if resolution is None:
        resolution = 1.0 / (2.5 * float(np.median(np.diff(u))))
    stats = ProductStats(name, frame="rest", normalisation="flux", noise_known=True, resolution=[float(resolution)])
    st = stats.segments.setdefault("full", _SegmentStats())
    st.u_min, st.u_max, st.steps, st.native = float(u[0]), float(u[-1]), [float(np.median(np.diff(u)))], describe_grid(wavelength_A)
    inst = build_instrument(stats, oversample, rv_scan_kms=max_rv_kms)
    inst.telluric_bands_A, inst.continuum_degree = [], 0
    return inst


def build_instrument(stats: ProductStats, oversample: float = 3.0, rv_scan_kms: float | None = None) -> Instrument:
    """An :class:`Instrument` for a product from its :class:`ProductStats`.

    The LSF of a segment is its per-pixel ``lsf_fwhm`` where given (median over the segment), else the
    product profile's ``model_resolution`` where set, else the records' resolving power R. A segment
    whose ``lsf_fwhm`` is constant in Angstrom (varies less in A than in lambda/FWHM, e.g. MILES'
    2.5 A) gets a grid uniform in lambda, so its Gaussian width is exact everywhere; otherwise the grid is uniform in u. Grid step: ``sigma / oversample`` or the
    native pixel step if finer, never finer than :data:`MIN_GRID_STEP_U`. The grid covers the
    pixels' range shifted by any velocity in the scan range (+50 km/s) plus 5 sigma of LSF. A
    product whose profile says its spectra are samples of a basis expansion
    (``ProductProfile.sampled_from_basis``, Gaia XP) gets :attr:`Instrument.sample_basis`, the span
    of its records that have every sample good, each divided by its median |flux|
    (:class:`SampleSpan`), where they are on one grid and do not span every direction.
    """
    if not stats.segments:
        raise ValueError(f"product {stats.product!r} has no segment with pixels")
    from stellarfield.io.registry import product_profile

    profile = product_profile(stats.product)
    resolution = float(np.median(stats.resolution)) if stats.resolution else None
    if profile is not None and profile.model_resolution is not None:
        resolution = profile.model_resolution  # the product's sharpest R (its records give a nominal one)
    # Gaia XP (R ~ 30-100): a velocity is invisible (< 1 A against 100-300 A elements), so none is fitted
    low_resolution = resolution is not None and resolution < 500
    rv_scan = 0.0 if low_resolution else DEFAULT_RV_SCAN_KMS[stats.frame]
    if rv_scan_kms is not None:
        rv_scan = rv_scan_kms
    pad_u = float(log_shift(rv_scan + 50.0))
    segments = []
    for name, st in sorted(stats.segments.items(), key=lambda kv: kv[1].u_min):
        native_step = float(np.median(st.steps))
        if st.sigma_u:
            sigma_u = float(np.median(st.sigma_u))
            # constant FWHM in A (MILES) or constant R: which varies less across the segment?
            lam = np.exp([st.u_min, st.u_max])
            linear = bool(np.mean(st.constant_in_A) > 0.5) and lam[1] / lam[0] > 1.05
        elif resolution is not None:
            sigma_u, linear = float(resolution_to_sigma_u(resolution)), False
        else:  # no LSF information: assume the pixels sample the FWHM twice (Nyquist)
            sigma_u, linear = 2 * native_step / FWHM_PER_SIGMA, False
        u_lo, u_hi = st.u_min - pad_u - 5 * sigma_u, st.u_max + pad_u + 5 * sigma_u
        if linear:
            fwhm_A = float(np.median(st.fwhm_A))
            sigma = fwhm_A / FWHM_PER_SIGMA
            lam_lo = math.exp(u_lo)
            step = max(min(sigma / oversample, native_step * lam_lo), MIN_GRID_STEP_U * lam_lo)
            size = int(math.ceil((math.exp(u_hi) - lam_lo) / step)) + 1
            segments.append(GridSegment(name, "linear", lam_lo, step, size, sigma, st.u_min, st.u_max, st.native))
        else:
            step = max(min(sigma_u / oversample, native_step), MIN_GRID_STEP_U)
            size = int(math.ceil((u_hi - u_lo) / step)) + 1
            segments.append(GridSegment(name, "log", u_lo, step, size, sigma_u, st.u_min, st.u_max, st.native))
    degree = profile.continuum_degree if profile else FALLBACK_CONTINUUM_DEGREE[stats.normalisation]
    inst = Instrument(
        name=stats.product,
        frame=stats.frame,
        normalisation=stats.normalisation,
        noise_known=stats.noise_known,
        segments=segments,
        continuum_degree=degree,
        rv_scan_kms=rv_scan,
        telluric_bands_A=[tuple(b) for b in profile.telluric_bands_A] if profile else [],
        scatter_init=0.01 if stats.noise_known else 0.03,
    )
    if stats.samples is not None:  # a product sampled from a basis expansion (Gaia XP): see Instrument
        inst.sample_basis, inst.sample_u = stats.samples.instrument_fields()
    # a rest-frame product whose LSF is wider than its residual-RV range gains nothing from a scan
    if stats.frame == "rest" and inst.sigma_kms > rv_scan and rv_scan_kms is None:
        inst.rv_scan_kms = 0.0
    return inst


def build_instruments(spectra) -> dict[str, Instrument]:
    """One :class:`Instrument` per product found in ``spectra`` (an iterable of Spectrum)."""
    stats: dict[str, ProductStats] = {}
    for s in spectra:
        stats.setdefault(s.product, ProductStats(s.product)).add(s)
    return {name: build_instrument(st) for name, st in sorted(stats.items())}


def instruments_for(model, spectra) -> dict[str, Instrument]:
    """The model's instruments, and one built from the records for each product it never saw."""
    instruments = dict(model.instruments)
    new: dict[str, ProductStats] = {}
    for s in spectra:
        if s.product not in instruments:
            new.setdefault(s.product, ProductStats(s.product)).add(s)
    for name, st in new.items():
        instruments[name] = build_instrument(st)
    return instruments
