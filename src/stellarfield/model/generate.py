"""Generate new stars: latents from the prior, spectra on any grid, in one matrix product.

>>> from stellarfield.model import generate
>>> out = generate("runs/demo", 100, instrument="apogee_apstar", seed=1)        # doctest: +SKIP
>>> out.flux.shape, out.latents.shape                                          # doctest: +SKIP
((100, 8575), (100, 16))
>>> out.write("new_stars.fits")                                                 # doctest: +SKIP

Speed: the trunk is evaluated once per grid, blurred once by the grid's LSF, and interpolated once
to the output pixels (:class:`RenderedBasis`, cached); a batch of N spectra is then the
``(N, n_basis + 1) @ (n_basis + 1, P)`` product of their branch coefficients with that basis.
With radial velocities the result is the model on the grid interpolated linearly at each spectrum's
shifted pixels, as :meth:`Instrument.render` does; it is computed without forming the model on the
whole grid (:class:`_DopplerPlan`): one velocity for all is one product with the basis rendered at
that velocity; a velocity per star is a product per integer grid shift with a slice of the basis,
then the fractional shift, one linear interpolation per pixel.

Grids: an instrument's typical native grid (``instrument=``, observed or rest frame as the product
is: generated spectra are in that product's frame and, for continuum-normalised products, divided by
a pseudo-continuum as the survey normalises them, :func:`normalise_like_the_survey`), ``wave_range`` + ``resolution`` (uniform in ln lambda, 3
pixels per FWHM), or an explicit vacuum-Angstrom ``wave_grid`` (``resolution`` optional). A grid
outside the wavelengths the model was trained on is an error: the decoder says nothing reliable there.

Scale: :func:`generate` holds all ``n`` spectra in memory (n x pixels x 4 bytes). For many,
:func:`iter_generated` yields chunks and :func:`write_generated` (``stellarfield generate --out
FOLDER``) writes them as they are made, a chunk in memory at a time, into a stellarfield dataset of
Parquet shards (:class:`GeneratedDatasetWriter`; optional white noise with ``snr=``, so it trains
like a survey) or one Parquet table file; either appears only once complete. A run's values do not
depend on how it is chunked: latents, velocities and noise are drawn per fixed block of stars
(:data:`DRAW_BLOCK`, :data:`NOISE_BLOCK`). ``benchmarks/generate_scale.py`` measures the rate and
peak memory of both paths side by side.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from stellarfield.arrays import nanmedian_rows
from stellarfield.atomic import atomic_path, temporary_sibling
from stellarfield.data.store import SCHEMA, DatasetWriter
from stellarfield.model.batching import release_freed_memory, stable_seed
from stellarfield.model.checkpoint import TrainedModel, load_model
from stellarfield.model.decoder import combine
from stellarfield.model.instrument import Instrument, grid_instrument
from stellarfield.model.stellar_model import StellarModel
from stellarfield.physics.doppler import C_KMS, log_shift
from stellarfield.physics.lsf import FWHM_PER_SIGMA

#: Standard deviation (km/s) of the radial velocities drawn by ``rv_kms="random"`` (a normal
#: centred on 0): a round number of the order of the spread of field-star RVs, a choice, not a fit.
RANDOM_RV_SIGMA_KMS = 50.0


class OutOfRangeError(ValueError):
    """A requested wavelength grid reaches outside what the model was trained on."""


def as_trained(model) -> TrainedModel:
    """A :class:`TrainedModel` from a run folder path, a TrainedModel, or a RunResult."""
    if isinstance(model, (str, os.PathLike)):
        return load_model(model)
    if isinstance(model, TrainedModel):
        return model
    if hasattr(model, "model") and hasattr(model, "prior"):  # RunResult
        return TrainedModel(model.model, model.prior, getattr(model, "config", {}), getattr(model, "run_dir", None))
    if isinstance(model, StellarModel):
        return TrainedModel(model, None, {}, None)
    raise TypeError(f"expected a run folder, a TrainedModel or a RunResult, got {type(model).__name__}")


def trained_coverage(model: StellarModel) -> list[tuple[float, float]]:
    """Vacuum-Angstrom ranges covered by the training pixels (union over instruments, merged)."""
    spans = sorted((float(np.exp(s.pixel_u_min)), float(np.exp(s.pixel_u_max)))
                   for inst in model.instruments.values() for s in inst.segments)
    merged: list[list[float]] = []
    for lo, hi in spans:
        if merged and lo <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return [(lo, hi) for lo, hi in merged]


def mask_outside_coverage(record, cover: list[tuple[float, float]]):
    """``record`` with its pixels outside ``cover`` (:func:`trained_coverage`, 0.2% slack) masked, on
    copies of the segments; the very same object when nothing is masked."""
    segments = []
    for seg in record.segments:
        ok = np.zeros(seg.n_pixels, dtype=bool)
        for lo, hi in cover:
            ok |= (seg.wavelength >= lo * (1 - 2e-3)) & (seg.wavelength <= hi * (1 + 2e-3))
        segments.append(seg if ok.all() else replace(seg, mask=seg.mask & ok))
    if any(a is not b for a, b in zip(segments, record.segments)):
        return replace(record, segments=segments)
    return record


def check_coverage(model: StellarModel, wavelength_A: np.ndarray, slack_kms: float = 600.0) -> None:
    """Raise :class:`OutOfRangeError` unless every wavelength lies in the trained coverage (widened
    by ``slack_kms`` of Doppler shift at each end)."""
    cover = trained_coverage(model)
    f = 1 + slack_kms / 299792.458
    ok = np.zeros(len(wavelength_A), dtype=bool)
    for lo, hi in cover:
        ok |= (wavelength_A >= lo / f) & (wavelength_A <= hi * f)
    if not ok.all():
        bad = wavelength_A[~ok]
        ranges = ", ".join(f"{lo:.0f}-{hi:.0f}" for lo, hi in cover)
        raise OutOfRangeError(
            f"{(~ok).sum()} of {len(ok)} wavelengths ({bad.min():.1f}-{bad.max():.1f} A) are outside what the model "
            f"was trained on (vacuum A: {ranges})"
        )


@dataclass
class RenderedBasis:
    """The trunk on an instrument's grid, blurred, and (for a fixed velocity) at the output pixels."""

    inst: Instrument
    u_pixels: torch.Tensor  # (P,) float64 ln(lambda/A) of the output pixels
    segment: torch.Tensor  # (P,) long
    grid: torch.Tensor  # (G, H + 1) blurred basis on the model grid
    at_pixels: torch.Tensor  # (P, H + 1) blurred basis interpolated at the pixels, v = 0

    def __post_init__(self):
        # the product's right operand, contiguous (H + 1, P); the mean spectrum is its last row, so
        # [b, 1] @ it is ONE matrix product (an addmm with a broadcast bias costs an extra pass)
        self._weights = self.at_pixels.T.contiguous()
        self._doppler: _DopplerPlan | None = None

    @classmethod
    def build(cls, model: StellarModel, inst: Instrument, wavelengths: list[np.ndarray]) -> "RenderedBasis":
        u = torch.from_numpy(np.log(np.concatenate(wavelengths)))
        segment = torch.cat([torch.full((len(w),), k) for k, w in enumerate(wavelengths)])
        view = inst.full_view()
        dev = next(model.decoder.parameters()).device  # the trunk runs where the model is; the rendered basis lives on the host
        sigma_u = inst.view_sigma_u(view)
        with torch.no_grad():
            grid = inst.blur(model.decoder.basis(inst.view_u(view).to(dev), None if sigma_u is None else sigma_u.to(dev)),
                             view, dim=0).cpu()
            at_pixels, _ = inst.render_basis(grid, view, u, segment, torch.zeros(1))
        return cls(inst, u, segment, grid, at_pixels.T.contiguous())

    def spectra(self, coefficients: torch.Tensor, rv_kms: torch.Tensor | None = None,
                out: torch.Tensor | None = None) -> torch.Tensor:
        """Flux (N, P) for branch coefficients (N, H); rest frame of the grid unless ``rv_kms`` (N,).
        ``out``: an (N, P) float32 tensor to write into (saves allocating, and page-faulting, a
        fresh output array per batch: at 35 MB per 1024 APOGEE spectra that is a third of the time)."""
        with torch.no_grad():
            ones = torch.ones(coefficients.shape[0], 1, dtype=coefficients.dtype)
            if rv_kms is None:
                return torch.mm(torch.cat([coefficients, ones], 1), self._weights, out=out)
            rv_kms = torch.as_tensor(rv_kms, dtype=torch.float64).reshape(-1).expand(coefficients.shape[0])
            if self._doppler is None:
                self._doppler = _DopplerPlan(self)
            return self._doppler.spectra(torch.cat([coefficients, ones], 1), rv_kms, out)

    def rendered_spectra(self, coefficients: torch.Tensor, rv_kms: torch.Tensor) -> torch.Tensor:
        """The reference computation of :meth:`spectra` with velocities: the model formed on the
        whole grid, then :meth:`Instrument.render` at each spectrum's shifted pixels (NaN where they
        fall beyond the grid). Slow (O(N G) and a gather of float64 positions); kept for checks."""
        with torch.no_grad():
            grid_flux = combine(coefficients, self.grid)
            n = coefficients.shape[0]
            flux, inside = self.inst.render(grid_flux, self.inst.full_view(), self.u_pixels.expand(n, -1),
                                            self.segment.expand(n, -1), rv_kms)
            return torch.where(inside, flux, float("nan"))  # shifted beyond the model grid: unknown


class _DopplerPlan:
    """Fast exact Doppler shifts for :meth:`RenderedBasis.spectra`.

    On a segment whose grid is uniform in u with step ``h``, pixel ``p`` sits at grid coordinate
    ``t_p = I_p + F_p`` (integer and fractional parts) and a velocity shifts every pixel by
    ``delta = ln(1 + v/c) / h = D + E`` grid points. The rendered flux is the linear interpolation
    of the model between the two grid points around ``t_p - delta = (I_p - D - 1) + (1 + F_p - E)``:
    with ``x = 1 + F_p - E`` (in [0, 2)) and ``s = floor(x)`` (0 or 1), the points ``I_p - D - 1 + s``
    and the next, weight ``x - s`` on the second. So, :attr:`CHUNK` stars at a time:

    1. the chunk's model on every grid point its pixels can need, ``D_max .. D_min`` points below
       theirs, is ONE product ``[b, 1] @ basis^T[:, slice]`` (a slice: nothing gathered; the span
       of the pixels, ~19,000 points for APOGEE, dwarfs the spread of the shifts, ~200);
    2. each star's point ``I_p - D - 1 + s`` is column ``C_p + (D_max - D) + s`` of that product
       (``C_p``: the column of ``I_p - 1``); then two gathers (that column and the next) and one
       ``lerp`` write the flux.

    Cost. The product does ~2x the work of the rest-frame one (2.2 and 2.0 model grid points per
    pixel on the APOGEE and GALAH grids, and an exact linear interpolation needs two per pixel and
    star, so an exact shift cannot do much less), but its output, a chunk's, stays in cache, so it
    runs at about twice the rest-frame product's flop rate (that one writes the whole batch to
    memory): on one core, ~60% of the time. The interpolation is kept to the fewest, cheapest passes
    over the (chunk x pixels) arrays, ~1.7 ns per star and pixel: ``x``, ``s`` and the column are
    computed in float32 (the column is an integer below 2**24, so exact; float ops are vectorised,
    integer, mixed-type, compare and ``where`` ones are not, ~0.3-3 ns each), converted once to the
    int64 index the two gathers take (~0.35 ns each), and ``lerp`` writes the flux. ``1 + F_p`` is
    rounded once to float32, so the weight is the reference's to float32 rounding (``t_p - delta``
    within ~1e-7 grid points of its float64 value).

    Grid points beyond the segment's grid are NaN (padding), which makes the flux NaN exactly where
    :meth:`Instrument.render` says the pixel is outside. Segments uniform in lambda (no constant
    shift in grid points) and products projected onto their samples' span take the reference
    route, and one velocity for all takes one product with the basis rendered at that velocity,
    see :meth:`spectra`.
    """

    CHUNK = 64

    def __init__(self, basis: RenderedBasis):
        self.basis = basis
        inst = basis.inst
        # the exact route below shifts a grid uniform in u; a grid uniform in lambda, or a product
        # whose model is projected onto its samples' span (Gaia XP: the projection mixes every
        # pixel), takes the reference route, Instrument.render
        self.fast = all(s.scale == "log" for s in inst.segments) and inst.sample_basis is None
        self._velocity, self._at_velocity = None, None
        self.pieces = []
        if not self.fast:
            return
        offset = 0
        for k, seg in enumerate(inst.segments):
            cols = (basis.segment == k).nonzero()[:, 0]
            if len(cols):
                assert int(cols[-1]) - int(cols[0]) + 1 == len(cols), "segments' pixels are concatenated"
                t = (basis.u_pixels[cols] - seg.start) / seg.step  # grid coordinate of each pixel
                self.pieces.append(dict(seg=seg, lo=int(cols[0]), hi=int(cols[-1]) + 1, offset=offset, t=t))
            offset += seg.size
        for piece in self.pieces:
            whole = torch.floor(piece["t"])
            base = int(whole.min()) - 1
            piece["base"], piece["span"] = base, int(whole.max()) - base + 2
            # columns are float32 integers, exact below 2**24; the widest chunk product (shifts clamped to
            # +-(size + span + 2), see _shift_piece) spans 3 span + 2 size + 4 columns
            assert 3 * piece["span"] + 2 * piece["seg"].size + 8 < 2 ** 24, "a segment too long for float32 columns"
            piece["left"] = (whole - base - 1).float()  # column C_p of grid point I_p - 1 in a span from base
            # 1 + F_p in float32, below 2 (so floor(1 + F_p - E) is 0 or 1 for E in [0, 1])
            piece["above"] = (piece["t"] - whole + 1).clamp(max=2 - 2.0 ** -23).float()
            piece["pad"] = -1

    def _padded(self, piece, pad: int) -> torch.Tensor:
        """The segment's basis, transposed (H + 1, n + 2 pad), with ``pad`` NaN grid points each side."""
        if piece["pad"] < pad:
            seg, grid = piece["seg"], self.basis.grid
            block = grid[piece["offset"]: piece["offset"] + seg.size].T
            nan = torch.full((block.shape[0], pad), float("nan"), dtype=block.dtype)
            piece["padded"], piece["pad"] = torch.cat([nan, block, nan], 1).contiguous(), pad
        return piece["padded"]

    def spectra(self, augmented: torch.Tensor, rv_kms: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        n = augmented.shape[0]
        if out is None:
            out = torch.empty(n, len(self.basis.u_pixels), dtype=augmented.dtype)
        if n == 0:
            return out
        if bool((rv_kms == rv_kms[0]).all()):  # one velocity: the basis rendered at it, one product
            if self._velocity != float(rv_kms[0]):
                b = self.basis
                at_v, inside = b.inst.render_basis(b.grid, b.inst.full_view(), b.u_pixels, b.segment, rv_kms[:1])
                self._at_velocity = torch.where(inside, at_v, float("nan")).contiguous()
                self._velocity = float(rv_kms[0])
            return torch.mm(augmented, self._at_velocity, out=out)
        if not self.fast:  # the reference route
            flux = self.basis.rendered_spectra(augmented[:, :-1], rv_kms)
            return out.copy_(flux)
        for piece in self.pieces:
            self._shift_piece(piece, augmented, rv_kms, out)
        return out

    def _shift_piece(self, piece, augmented, rv_kms, out):
        seg, base, span = piece["seg"], piece["base"], piece["span"]
        dtype = augmented.dtype
        # a shift beyond the segment's grid gives NaN everywhere: clamp it to just beyond (v <= -c: NaN shift)
        limit = seg.size + span + 2
        delta = (log_shift(rv_kms) / seg.step).nan_to_num(nan=limit).clamp(-limit, limit)
        whole = torch.floor(delta)
        shift, fraction = whole.long(), (delta - whole).to(dtype)  # D and E (E in [0, 1] once rounded)
        n, rows = len(shift), min(self.CHUNK, len(shift))
        starts = range(0, n, rows)
        lows = [int(shift[a: a + rows].min()) for a in starts]
        highs = [int(shift[a: a + rows].max()) for a in starts]
        # star i of a chunk with largest shift `high` finds grid point base - shift_i + j in column
        # j + (high - shift_i) of the chunk's product
        offset = (torch.tensor(highs).repeat_interleave(rows)[:n] - shift).to(dtype)
        pad = max(max(map(abs, lows)), max(map(abs, highs))) + 2 + max(0, -base, base + span - seg.size)
        basis_t = self._padded(piece, pad)
        left, above = piece["left"].to(dtype), piece["above"].to(dtype)
        width = len(left)
        weight, point, lower, upper = (torch.empty(rows, width, dtype=dtype) for _ in range(4))
        index = torch.empty(rows, width, dtype=torch.long)
        grid_values = torch.empty(rows * (span + max(h - l for l, h in zip(lows, highs))), dtype=dtype)
        for chunk, a in enumerate(starts):
            b = min(a + rows, n)
            m, low, high = b - a, lows[chunk], highs[chunk]
            # the model of these stars on grid points base - high .. base - low + span - 1: one product
            columns = span + high - low
            g = grid_values[: m * columns].view(m, columns)
            start = base - high + pad
            torch.mm(augmented[a:b], basis_t[:, start: start + columns], out=g)
            x, s, i = weight[:m], point[:m], index[:m]
            torch.sub(above, fraction[a:b, None], out=x)  # x = 1 + F_p - E in [0, 2)
            torch.floor(x, out=s)  # s: 1 if the shifted pixel lies right of grid point I_p - D, else 0
            x.sub_(s)  # its distance from the grid point on its left, I_p - D - 1 + s ...
            s.add_(left).add_(offset[a:b, None])  # ... which is column C_p + (high - D) + s
            i.copy_(s)
            torch.gather(g, 1, i, out=lower[:m])
            torch.gather(g[:, 1:], 1, i, out=upper[:m])
            torch.lerp(lower[:m], upper[:m], x, out=out[a:b, piece["lo"]: piece["hi"]])


@dataclass
class GeneratedSpectra:
    """Generated spectra on one grid: ``flux[i]`` at ``wavelength`` (vacuum A, concatenated
    segments named in ``segment_names`` with ``segment_lengths``), their latents and velocities.
    ``ivar``: inverse variance (1 / flux unit^2) of the noise added (``snr=``), else None;
    ``start``: the index of ``flux[0]`` among all the stars of the run (chunks of a large run)."""

    wavelength: np.ndarray  # (P,)
    flux: np.ndarray  # (N, P) float32
    latents: np.ndarray  # (N, D)
    rv_kms: np.ndarray  # (N,)
    segment_names: list[str]
    segment_lengths: list[int]
    grid: str  # "instrument:<name>" or "custom"
    resolution: float | None
    frame: str
    ivar: np.ndarray | None = None  # (N, P) float32, with noise only
    start: int = 0

    def write(self, path: str | os.PathLike) -> Path:
        """Write to ``.fits`` (HDUs WAVELENGTH, FLUX, LATENT, RV_KMS, and IVAR with noise) or
        ``.parquet`` (one row per spectrum: index, rv_kms, latent list, flux list, ivar list with
        noise), atomically (temporary file + rename). For many spectra, :func:`write_generated`
        streams a Parquet file or dataset instead."""
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix == ".parquet":
            with ParquetTableSink(path, self) as sink:
                sink.write(self)
            return path
        if suffix not in (".fits", ".fit"):
            raise ValueError(f"unknown output format {path.suffix!r}: use .fits or .parquet")
        from astropy.io import fits

        with atomic_path(path) as tmp:
            primary = fits.PrimaryHDU()
            primary.header["ORIGIN"] = "stellarfield generate"
            primary.header["GRID"] = self.grid
            primary.header["FRAME"] = (self.frame, "rest or observed frame of WAVELENGTH")
            primary.header["RESOLV"] = (self.resolution or -1.0, "Gaussian LSF resolving power (-1: instrument's)")
            primary.header["NSPEC"] = len(self.flux)
            primary.header["SEGMENTS"] = ",".join(f"{n}:{k}" for n, k in zip(self.segment_names, self.segment_lengths))
            hdus = [primary,
                    fits.ImageHDU(self.wavelength, name="WAVELENGTH"),
                    fits.ImageHDU(self.flux.astype(np.float32), name="FLUX"),
                    fits.ImageHDU(self.latents.astype(np.float32), name="LATENT"),
                    fits.ImageHDU(self.rv_kms.astype(np.float64), name="RV_KMS")]
            if self.ivar is not None:
                hdus.append(fits.ImageHDU(self.ivar.astype(np.float32), name="IVAR"))
            hdus[1].header["BUNIT"] = "Angstrom (vacuum)"
            fits.HDUList(hdus).writeto(tmp, overwrite=True, output_verify="exception")
        return path

    def plot(self, path: str | os.PathLike, n: int = 5) -> Path:
        """Plot the first ``n`` spectra, one panel per segment, to PNG/PDF."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        k = len(self.segment_names)
        fig, axes = plt.subplots(1, k, figsize=(4 * k + 2, 3.5), squeeze=False)
        starts = np.concatenate([[0], np.cumsum(self.segment_lengths)])
        for j, ax in enumerate(axes[0]):
            sl = slice(starts[j], starts[j + 1])
            for i in range(min(n, len(self.flux))):
                ax.plot(self.wavelength[sl], self.flux[i, sl] + 0.0, lw=0.6, label=f"#{i} v={self.rv_kms[i]:.0f} km/s")
            ax.set_xlabel(f"vacuum wavelength ({self.frame} frame) [A]")
            ax.set_title(self.segment_names[j])
        axes[0][0].set_ylabel("model flux")
        axes[0][0].legend(fontsize=6)
        fig.suptitle(f"stellarfield: {len(self.flux)} generated stars on {self.grid}")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return Path(path)


def resolve_grid(model: StellarModel, instrument: str | None = None, wave_range=None, resolution: float | None = None,
                 wave_grid=None) -> tuple[Instrument, list[np.ndarray], list[str], str]:
    """The instrument and pixel wavelengths for one of the three ways to name a grid."""
    given = sum(x is not None for x in (instrument, wave_range, wave_grid))
    if given != 1:
        raise ValueError("give exactly one of instrument, wave_range (+ resolution) or wave_grid")
    if instrument is not None:
        inst = model.instrument(instrument)
        return inst, [s.native_wavelength() for s in inst.segments], inst.segment_names, f"instrument:{instrument}"
    if wave_range is not None:
        lo, hi = float(wave_range[0]), float(wave_range[1])
        if not (0 < lo < hi):
            raise ValueError(f"wave_range must be two increasing positive wavelengths in A, got {wave_range}")
        if resolution is None or resolution <= 0:
            raise ValueError("wave_range needs a resolution R > 0")
        step = 1.0 / (3.0 * resolution)  # 3 pixels per FWHM in ln(lambda)
        wavelength = np.exp(np.arange(np.log(lo), np.log(hi) + step / 2, step))
    else:
        wavelength = np.asarray(wave_grid, dtype=np.float64).ravel()
    check_coverage(model, wavelength)
    inst = grid_instrument(wavelength, resolution)
    return inst, [wavelength], ["full"], "custom"


def normalise_like_the_survey(flux: np.ndarray, wavelengths: list[np.ndarray], degree: int,
                              iterations: int = 5) -> np.ndarray:
    """Divide each segment of ``flux`` (N, P) by a pseudo-continuum, as a survey's continuum-
    normalised product is: a Legendre polynomial of the product's ``degree`` (at least 2) fitted to
    the upper envelope (pixels more than 1 sigma below the fit are dropped, ``iterations`` times).

    The model's rest-frame flux carries whatever smooth shape its other products taught it (their
    continua are fitted, not modelled), so a generated star "as GALAH DR3 normalises it" needs this."""
    out = np.array(flux, dtype=np.float64)
    start = 0
    for w in wavelengths:
        sl = slice(start, start + len(w))
        start += len(w)
        x = 2 * (w - w[0]) / max(w[-1] - w[0], 1e-12) - 1
        design = np.polynomial.legendre.legvander(x, max(degree, 2))
        for i, row in enumerate(out[:, sl]):
            keep = np.isfinite(row)
            for _ in range(iterations):
                if keep.sum() <= design.shape[1]:
                    break
                coeffs, *_ = np.linalg.lstsq(design[keep], row[keep], rcond=None)
                fit = design @ coeffs
                resid = row - fit
                keep = np.isfinite(row) & (resid > -np.nanstd(resid[keep]))
            continuum = design @ coeffs if keep.sum() > design.shape[1] else np.nanmedian(row)
            out[i, sl] = row / np.where(np.abs(continuum) > 0, continuum, np.nan)
    return out.astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Drawing and rendering any number of stars, a chunk at a time
# ----------------------------------------------------------------------------------------------
#: Stars per draw block: the latents and velocities of stars ``k B .. (k + 1) B - 1`` (of a run of
#: ``n``: the last block is shorter) are drawn together from generators seeded by ``(seed, k)``
#: (block 0 by ``seed`` itself), so star ``i`` gets the same latent, velocity and flux whatever the
#: chunk size it is rendered in. (Drawing from the flow prior is the slow part of generation, ~2 k
#: latents/s on one core; the rendering runs at the generation benchmark's speed.)
DRAW_BLOCK = 1024
#: Stars per noise block: the noise of stars ``k b .. (k + 1) b - 1`` comes from one generator
#: seeded by ``(seed, "noise", k)`` (smaller than :data:`DRAW_BLOCK`: a block of noise is b x P floats).
NOISE_BLOCK = 256
#: Pixels (stars x pixels per star) rendered at once by default: ~16 M float32 flux values, so a
#: chunk of APOGEE spectra (8,575 px) is ~1,900 stars and of Gaia XP (343 px) 8,192 (the cap).
CHUNK_PIXELS = 1 << 24
MAX_CHUNK_STARS = 8192
#: FITS output is written from memory: above this many bytes of flux it is refused (use Parquet).
FITS_MAX_BYTES = 2_000_000_000


def default_chunk(n_pixels: int) -> int:
    """Stars rendered per chunk for spectra of ``n_pixels``: :data:`CHUNK_PIXELS` pixels, a multiple
    of :data:`NOISE_BLOCK`, at most :data:`MAX_CHUNK_STARS`."""
    rows = CHUNK_PIXELS // max(n_pixels, 1) // NOISE_BLOCK * NOISE_BLOCK
    return int(min(MAX_CHUNK_STARS, max(NOISE_BLOCK, rows)))


def resolve_population(prior, population: str | None, grid_name: str) -> str | None:
    """Whose stars are drawn (:mod:`stellarfield.model.prior`): ``"auto"``, the grid's own product
    where the grid is a product's (``instrument:NAME``) and the prior has that product's population
    (:meth:`~stellarfield.model.prior.LatentPrior.has_population`), else every product's (None);
    ``"all"`` or None: every product's; a product name: that product's (KeyError listing the known
    ones)."""
    known = list(getattr(prior, "products", []) or [])
    if population == "auto":
        own = grid_name.split(":", 1)[1] if grid_name.startswith("instrument:") else None
        return own if own in known and prior.has_population(own) else None
    if population in (None, "all"):
        return None
    if population not in known:
        raise KeyError(f"population {population!r}: the prior has populations for {known or 'no product (unconditional)'}")
    return population


class GenerationPlan:
    """Everything needed to render stars ``start .. stop - 1`` of a run of ``n``: the grid, its
    :class:`RenderedBasis`, the prior, the velocity and noise choices (arguments as :func:`generate`).

    :meth:`spectra` renders any range, the same values whatever the ranges asked for (see
    :data:`DRAW_BLOCK`, :data:`NOISE_BLOCK`); :meth:`chunks` iterates over all ``n`` in ranges of
    ``chunk`` stars, so memory is that of one chunk however large ``n`` is.
    """

    def __init__(self, model, n: int, instrument: str | None = None, wave_range=None, resolution: float | None = None,
                 wave_grid=None, rv_kms: float | str | None = None, seed: int = 0, latents=None,
                 snr: float | None = None, batch: int = 1024, population: str | None = "auto"):
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        self.trained = as_trained(model)
        m = self.trained.model
        self.n, self.seed, self.batch = int(n), int(seed), int(batch)
        self.resolution = resolution
        self.inst, self.wavelengths, self.names, self.grid_name = resolve_grid(m, instrument, wave_range, resolution,
                                                                               wave_grid)
        if latents is None:
            if self.trained.prior is None:
                raise ValueError("this model has no latent prior (training stopped before fitting it); pass latents=")
            self.latents = None
            self.population = resolve_population(self.trained.prior, population, self.grid_name)
        else:
            self.population = None
            self.latents = torch.as_tensor(np.asarray(latents), dtype=torch.float32)
            if self.latents.shape != (n, m.latent_dim):
                raise ValueError(f"latents must have shape ({n}, {m.latent_dim}), got {tuple(self.latents.shape)}")
        if isinstance(rv_kms, str) and rv_kms != "random":
            raise ValueError(f"rv_kms must be a number, None or 'random', got {rv_kms!r}")
        self.rv_kms = rv_kms if rv_kms is None or isinstance(rv_kms, str) else float(rv_kms)
        if snr is not None and not (np.isfinite(snr) and snr > 0):
            raise ValueError(f"snr must be a positive number, got {snr}")
        self.snr = None if snr is None else float(snr)
        self.normalise = self.inst.normalisation == "continuum" and self.grid_name.startswith("instrument:")
        self.basis = RenderedBasis.build(m, self.inst, self.wavelengths)
        # pixels in the instrument's telluric bands: masked in training, so the model never learned
        # them (GALAH's O2 A band); they are NaN, as a survey's bad pixels are, not made-up flux
        untrained = ~self.inst.pixel_mask(np.concatenate(self.wavelengths))
        self.untrained = torch.from_numpy(untrained) if untrained.any() else None
        self._block: tuple[int, torch.Tensor, torch.Tensor | None] | None = None

    @property
    def n_pixels(self) -> int:
        return int(self.basis.u_pixels.shape[0])

    @property
    def frame(self) -> str:
        return self.inst.frame

    def _draw_block(self, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Latents (B, D) and velocities (B,) of draw block ``k`` (the last one drawn is kept)."""
        if self._block is None or self._block[0] != k:
            block_seed = self.seed if k == 0 else _block_seed(self.seed, k)
            size = min(DRAW_BLOCK, self.n - k * DRAW_BLOCK)  # fixed by n alone: the same whatever the chunks
            z = None if self.latents is not None else self.trained.prior.sample(size, seed=block_seed,
                                                                                 product=self.population)
            release_freed_memory()  # the flow's temporaries would otherwise fragment the heap, draw after draw
            rv = None
            if self.rv_kms == "random":
                g = torch.Generator().manual_seed(block_seed + 1)
                rv = torch.randn(size, generator=g, dtype=torch.float64) * RANDOM_RV_SIGMA_KMS
            self._block = (k, z, rv)
        return self._block[1], self._block[2]

    def draws(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Latents (m, D) and velocities (m,) in km/s (None: rest frame of the grid) of stars ``start .. stop - 1``."""
        zs, rvs = [], []
        for k in range(start // DRAW_BLOCK, (stop - 1) // DRAW_BLOCK + 1) if stop > start else ():
            z, rv = self._draw_block(k)
            a, b = max(start - k * DRAW_BLOCK, 0), min(stop - k * DRAW_BLOCK, DRAW_BLOCK)
            zs.append(z[a:b] if z is not None else None)
            rvs.append(rv[a:b] if rv is not None else None)
        m = stop - start
        z = self.latents[start:stop] if self.latents is not None else (
            torch.cat(zs) if zs else torch.empty(0, self.trained.model.latent_dim))
        if self.rv_kms is None:
            rv = None
        elif self.rv_kms == "random":
            rv = torch.cat(rvs) if rvs else torch.empty(0, dtype=torch.float64)
        else:
            rv = torch.full((m,), self.rv_kms, dtype=torch.float64)
        return z, rv

    def _noise(self, start: int, stop: int) -> np.ndarray:
        """Standard normal deviates (m, P) float32 for stars ``start .. stop - 1`` (see :data:`NOISE_BLOCK`)."""
        out = np.empty((stop - start, self.n_pixels), np.float32)
        for k in range(start // NOISE_BLOCK, (stop - 1) // NOISE_BLOCK + 1) if stop > start else ():
            g = torch.Generator().manual_seed(_block_seed(self.seed, "noise", k))
            block = torch.randn(NOISE_BLOCK, self.n_pixels, generator=g).numpy()
            a, b = max(start, k * NOISE_BLOCK), min(stop, (k + 1) * NOISE_BLOCK)
            out[a - start: b - start] = block[a - k * NOISE_BLOCK: b - k * NOISE_BLOCK]
        return out

    def spectra(self, start: int, stop: int) -> GeneratedSpectra:
        """Stars ``start .. stop - 1`` rendered on the grid (normalised as the survey does for a
        continuum-normalised product's grid; with noise when ``snr`` is set; NaN in the instrument's
        telluric bands, which training masks)."""
        m = self.trained.model
        z, rv = self.draws(start, stop)
        flux = torch.empty(stop - start, self.n_pixels)
        with torch.no_grad():
            for a in range(0, stop - start, self.batch):
                b = min(a + self.batch, stop - start)
                coeffs = m.decoder.coefficients(z[a:b].to(m.device)).cpu()
                self.basis.spectra(coeffs, None if rv is None else rv[a:b], out=flux[a:b])
        if self.untrained is not None:
            flux[:, self.untrained] = float("nan")
        flux = flux.numpy()
        if self.normalise:
            flux = normalise_like_the_survey(flux, self.wavelengths, self.inst.continuum_degree)
        ivar = None
        if self.snr is not None:
            flux, ivar = add_white_noise(flux, self.snr, self._noise(start, stop))
        return GeneratedSpectra(
            wavelength=np.concatenate(self.wavelengths), flux=flux, latents=z.numpy(),
            rv_kms=np.zeros(stop - start) if rv is None else rv.numpy(), segment_names=list(self.names),
            segment_lengths=[len(w) for w in self.wavelengths], grid=self.grid_name,
            resolution=self.resolution, frame=self.inst.frame, ivar=ivar, start=start,
        )

    def chunks(self, chunk: int | None = None) -> Iterator[GeneratedSpectra]:
        """All ``n`` stars, ``chunk`` at a time (default :func:`default_chunk`)."""
        chunk = chunk or default_chunk(self.n_pixels)
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        for start in range(0, self.n, chunk):
            yield self.spectra(start, min(start + chunk, self.n))


def _block_seed(*parts) -> int:
    return stable_seed("generate", *parts)


def add_white_noise(flux: np.ndarray, snr: float, deviates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``flux`` (N, P) plus Gaussian noise of sigma = median|flux| / ``snr`` per spectrum (constant
    over its pixels), and the inverse variance of that noise (0 where the flux is not finite).
    ``deviates``: standard normal deviates (N, P)."""
    with np.errstate(all="ignore"):
        sigma = nanmedian_rows(np.abs(flux)) / snr
    sigma = np.where(np.isfinite(sigma) & (sigma > 0), sigma, np.nan).astype(np.float32)[:, None]
    noisy = flux + sigma * deviates
    ivar = np.where(np.isfinite(noisy), np.float32(1.0) / (sigma * sigma), np.float32(0)).astype(np.float32)
    return noisy.astype(np.float32), ivar


def generate(model, n: int, instrument: str | None = None, wave_range=None, resolution: float | None = None,
             wave_grid=None, rv_kms: float | str | None = None, seed: int = 0, latents=None,
             batch: int = 1024, snr: float | None = None, population: str | None = "auto") -> GeneratedSpectra:
    """Draw ``n`` stars from the model's prior and render them on a grid, in memory.

    Args:
        model: a run folder, a loaded :class:`TrainedModel`, or a :class:`RunResult`.
        n: number of spectra (all held in memory: n x pixels x 4 bytes; for many, see
            :func:`iter_generated` and :func:`write_generated`, which give the same values).
        instrument | wave_range (+ resolution) | wave_grid: the grid (see the module docstring).
        rv_kms: None (rest frame of the grid / product frame unshifted), a number (every star), or
            "random" (normal, sd :data:`RANDOM_RV_SIGMA_KMS`).
        seed: makes latents, velocities and noise reproducible.
        latents: (n, D) latents to render instead of prior draws.
        batch: spectra per matrix product.
        snr: add white Gaussian noise of sigma = median|flux| / snr to each spectrum
            (:func:`add_white_noise`) and return its ``ivar``; None: noiseless.
        population: whose stars the prior draws (:func:`resolve_population`): "auto" (default: the
            instrument's own population, e.g. GALAH's stars for ``instrument="galah_dr3"``), "all"
            (the whole training set), or a product name.
    """
    plan = GenerationPlan(model, n, instrument, wave_range, resolution, wave_grid, rv_kms, seed, latents, snr, batch,
                          population)
    return plan.spectra(0, n)


def iter_generated(model, n: int, chunk: int | None = None, **kwargs) -> Iterator[GeneratedSpectra]:
    """:func:`generate`'s ``n`` stars as chunks of ``chunk`` stars (default :func:`default_chunk`),
    each a :class:`GeneratedSpectra` whose ``start`` is the index of its first star; concatenated,
    they equal ``generate(model, n, **kwargs)`` (same seed, same values). Memory: one chunk."""
    return GenerationPlan(model, n, **kwargs).chunks(chunk)


# ----------------------------------------------------------------------------------------------
# Writing as it goes
# ----------------------------------------------------------------------------------------------
_TABLE_META_KEY = "stellarfield"


def _table_metadata(g: GeneratedSpectra, extra: dict | None = None) -> dict:
    return {"wavelength_A": g.wavelength.tolist(), "grid": g.grid, "frame": g.frame,
            "segment_names": g.segment_names, "segment_lengths": g.segment_lengths,
            "resolution": g.resolution, **(extra or {})}


def _list_column(values: np.ndarray, value_type):
    """A list<value_type> column, one list per row of the 2-D ``values`` (no copy per row)."""
    rows, width = values.shape
    offsets = pa.array(np.arange(rows + 1, dtype=np.int32) * np.int32(width), pa.int32())
    return pa.ListArray.from_arrays(offsets, pa.array(np.ascontiguousarray(values).reshape(-1), value_type))


class ParquetTableSink:
    """One Parquet file (a table: index, rv_kms, latent, flux[, ivar]; the grid in the schema
    metadata under ``"stellarfield"``), appended chunk by chunk, renamed into place on close.

    A failure or an interrupt leaves nothing at ``path`` (the temporary file is deleted; a killed
    process can leave a hidden ``.{name}.tmp-*`` file next to it, never ``path`` itself)."""

    def __init__(self, path: str | os.PathLike, first: GeneratedSpectra, metadata: dict | None = None):
        import pyarrow.parquet as pq

        self.path = Path(path)
        self._tmp = temporary_sibling(self.path)
        fields = [pa.field("index", pa.int64()), pa.field("rv_kms", pa.float64()),
                  pa.field("latent", pa.list_(pa.float32())), pa.field("flux", pa.list_(pa.float32()))]
        if first.ivar is not None:
            fields.append(pa.field("ivar", pa.list_(pa.float32())))
        meta = {_TABLE_META_KEY: json.dumps(_table_metadata(first, metadata))}
        self.schema = pa.schema(fields, metadata=meta)
        self._writer = pq.ParquetWriter(self._tmp, self.schema, compression="zstd")
        self.rows = 0

    def write(self, g: GeneratedSpectra) -> None:
        columns = [pa.array(g.start + np.arange(len(g.flux)), pa.int64()), pa.array(g.rv_kms, pa.float64()),
                   _list_column(g.latents.astype(np.float32), pa.float32()),
                   _list_column(g.flux.astype(np.float32), pa.float32())]
        if "ivar" in self.schema.names:
            columns.append(_list_column(g.ivar, pa.float32()))
        self._writer.write_batch(pa.RecordBatch.from_arrays(columns, schema=self.schema))
        self.rows += len(g.flux)

    def close(self) -> Path:
        self._writer.close()
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        try:
            self._writer.close()
        finally:
            self._tmp.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()


class GeneratedDatasetWriter(DatasetWriter):
    """A stellarfield dataset (:class:`~stellarfield.data.store.DatasetWriter`'s folder of Parquet
    shards, manifest written last, renamed into place when complete) of generated stars,
    written chunk by chunk from columns (no :class:`Spectrum` per row, nothing kept per row: the
    memory is one chunk's).

    Each star is a record of the grid's product (``instrument:NAME``: that product, so the
    dataset trains like the survey's own; a custom grid: product ``"generated"``), object and
    star id ``generated-<seed>-<index>`` (final, each its own star: rows go in by
    :meth:`~stellarfield.data.store.DatasetWriter.write_resolved_rows`), split drawn from that id
    as ingest does, ``ivar`` the noise's (``snr``) or 0 with ``noise_known`` False, ``mask`` where
    the flux is finite, and ``meta`` ``{"latent": [...], "rv_kms": v}`` (the star's latent and
    velocity, km/s).
    """

    def __init__(self, path, plan: GenerationPlan, *, metadata: dict | None = None, **kwargs):
        self.plan = plan
        product = plan.grid_name.split(":", 1)[1] if plan.grid_name.startswith("instrument:") else "generated"
        info = {"generator": "stellarfield generate", "model": str(plan.trained.path or ""), "grid": plan.grid_name,
                "population": "given latents" if plan.latents is not None else plan.population or "all",
                "seed": plan.seed, "snr": plan.snr, "rv_kms": plan.rv_kms, "n": plan.n}
        super().__init__(path, metadata={**info, **(metadata or {})}, **kwargs)
        self.product = product
        sigma_kms = plan.inst.sigma_kms
        self.resolving_power = plan.resolution or (C_KMS / (FWHM_PER_SIGMA * sigma_kms) if sigma_kms > 0 else None)
        self.provenance_extra = json.dumps({"generator": "stellarfield generate", "grid": plan.grid_name})

    def write_generated(self, g: GeneratedSpectra) -> None:
        """Append the stars of one chunk (rows split across shards of ``shard_size``; the store
        draws their splits and counts them)."""
        n, p = g.flux.shape
        index = g.start + np.arange(n)
        object_ids = [f"generated-{self.plan.seed}-{i:09d}" for i in index]
        latents = np.round(g.latents.astype(np.float64), 6).tolist()
        meta = [json.dumps({"latent": z, "rv_kms": float(v)}) for z, v in zip(latents, g.rv_kms)]
        finite = np.isfinite(g.flux)
        noise_known = g.ivar is not None
        ivar = g.ivar if noise_known else np.zeros_like(g.flux)
        strings = lambda value: pa.array([value] * n, pa.string())
        columns = {
            "key": pa.array([f"{self.product}/{o}" for o in object_ids], pa.string()),
            "object_id": pa.array(object_ids, pa.string()),
            "star_id": pa.array(object_ids, pa.string()),
            "survey": strings("stellarfield"),
            "instrument": strings(self.product),
            "product": strings(self.product),
            "observation_id": pa.nulls(n, pa.string()),
            "frame": strings(g.frame),
            "normalisation": strings(self.plan.inst.normalisation if self.plan.normalise else "flux"),
            "resolution": pa.array([self.resolving_power] * n, pa.float64()),
            "noise_known": pa.array([noise_known] * n, pa.bool_()),
            "flux_unit": strings("model"),
            "n_pixels": pa.array([p] * n, pa.int64()),
            "segment_names": pa.array([g.segment_names] * n, pa.list_(pa.string())),
            "segment_lengths": pa.array([g.segment_lengths] * n, pa.list_(pa.int32())),
            "wavelength": _list_column(np.broadcast_to(g.wavelength, (n, p)), pa.float64()),
            "flux": _list_column(np.nan_to_num(g.flux, nan=0.0).astype(np.float32), pa.float32()),
            "ivar": _list_column(np.where(finite, ivar, 0).astype(np.float32), pa.float32()),
            "mask": _list_column(finite, pa.bool_()),
            "lsf_fwhm": pa.nulls(n, pa.list_(pa.float32())),
            "provenance_file": pa.nulls(n, pa.string()),
            "provenance_hdu": pa.nulls(n, pa.string()),
            "provenance_extra": strings(self.provenance_extra),
            "meta": pa.array(meta, pa.string()),
        }
        # absent columns (labels; split, which the store draws) are nulls here
        arrays = [columns[f.name] if f.name in columns else pa.nulls(n, f.type) for f in SCHEMA]
        self.write_resolved_rows(pa.RecordBatch.from_arrays(arrays, schema=SCHEMA))


def output_kind(path: str | os.PathLike) -> str:
    """What ``path`` will be: ``"fits"`` (``.fits``/``.fit``: in memory), ``"parquet"`` (one
    ``.parquet`` table file, streamed) or ``"dataset"`` (anything else: a stellarfield dataset
    folder of Parquet shards, streamed)."""
    suffix = Path(path).suffix.lower()
    return {".fits": "fits", ".fit": "fits", ".parquet": "parquet"}.get(suffix, "dataset")


class FitsTooLargeError(ValueError):
    """FITS output is written from memory; this many spectra would not fit comfortably."""


def write_generated(model, out: str | os.PathLike, n: int, *, chunk: int | None = None, shard_size: int = 4096,
                    overwrite: bool = False, progress: bool = True, on_chunk=None, **kwargs) -> Path:
    """Generate ``n`` stars (keyword arguments as :func:`generate`) and write them to ``out``.

    ``out`` (:func:`output_kind`): a dataset folder (Parquet shards of ``shard_size`` stars,
    :class:`GeneratedDatasetWriter`: ``stellarfield info``, training and
    :class:`~stellarfield.data.store.Dataset` read it), a ``.parquet`` table file (as
    :meth:`GeneratedSpectra.write`), both written a ``chunk`` of stars at a time as they are made
    (memory: one chunk), atomically: nothing appears at ``out`` until every star is written, so a
    failed or killed run never leaves a complete-looking output. Or ``.fits``, made in memory and
    refused (:class:`FitsTooLargeError`) above :data:`FITS_MAX_BYTES` of flux. An existing ``out``
    (file or dataset) is refused (``FileExistsError``) before anything is generated, unless
    ``overwrite``: then it is replaced once the new one is complete.

    ``progress``: a progress bar (stars and stars/s). ``on_chunk(g)``: called with each chunk
    (e.g. to keep the first for a plot). The values equal :func:`generate`'s with the same seed.
    """
    from tqdm.auto import tqdm

    out = Path(out)
    kind = output_kind(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --force (overwrite=True) to replace it")
    plan = GenerationPlan(model, n, **kwargs)
    if kind == "fits":
        size = n * plan.n_pixels * 4
        if size > FITS_MAX_BYTES:
            raise FitsTooLargeError(
                f"{out}: {n:,} spectra of {plan.n_pixels:,} pixels are {size / 1e9:.1f} GB of flux, written to FITS "
                f"from memory (limit {FITS_MAX_BYTES / 1e9:.1f} GB); write a Parquet dataset instead, as it goes: "
                f"--out {out.with_suffix('')} (a folder of shards)")
        g = plan.spectra(0, n)
        if on_chunk is not None:
            on_chunk(g)
        return g.write(out)
    chunks = plan.chunks(chunk)
    bar = tqdm(total=n, disable=not progress, unit="spectra", unit_scale=True, dynamic_ncols=True,
               desc=f"generate -> {out.name}")
    try:
        if kind == "dataset":
            sink = GeneratedDatasetWriter(out, plan, overwrite=overwrite, shard_size=shard_size)
        else:
            first = next(chunks, None) or plan.spectra(0, 0)
            chunks = itertools.chain([first], chunks)
            sink = ParquetTableSink(out, first)
        with sink:
            for g in chunks:
                if kind == "dataset":
                    sink.write_generated(g)
                else:
                    sink.write(g)
                if on_chunk is not None:
                    on_chunk(g)
                bar.update(len(g.flux))
                del g
                release_freed_memory()  # flat resident memory over millions of stars
    finally:
        bar.close()
    return out
