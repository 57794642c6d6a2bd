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
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from stellarfield.model.checkpoint import TrainedModel, load_model
from stellarfield.model.decoder import combine
from stellarfield.model.instrument import Instrument, grid_instrument
from stellarfield.model.stellar_model import StellarModel
from stellarfield.physics.doppler import log_shift

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
            at_pixels, _ = inst.render(grid.T.contiguous(), view, u.expand(grid.shape[1], -1),
                                       segment.expand(grid.shape[1], -1), torch.zeros(grid.shape[1]))
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
    of the model between grid points ``I_p - D - 1 .. I_p - D + 1``: the point ``I_p - D`` and its
    neighbour on the side of ``F_p - E`` (its sign), weight ``|F_p - E|``. So, :attr:`CHUNK` stars
    at a time:

    1. the chunk's model on every grid point its pixels can need, ``D_max .. D_min`` points below
       theirs, is ONE product ``[b, 1] @ basis^T[:, slice]`` (a slice: nothing gathered; the span
       of the pixels, ~19,000 points for APOGEE, dwarfs the spread of the shifts, ~200);
    2. for each star the points ``I_p - D - 1, I_p - D, I_p - D + 1`` are the same columns shifted
       by ``D_max - D``: three gathers, then one ``lerp`` writes the flux.

    The product does ~2.2x the work of the rest-frame one (the APOGEE and GALAH model grids have
    2.2 points per pixel, and linear interpolation needs two of them per pixel and star): that, not
    the interpolation, bounds the speed. Grid points beyond the segment's grid are NaN (padding),
    which makes the flux NaN exactly where :meth:`Instrument.render` says the pixel is outside.
    Segments uniform in lambda (no constant shift in grid points) take the reference route, and one
    velocity for all takes one product with the basis rendered at that velocity, see :meth:`spectra`.
    """

    CHUNK = 64

    def __init__(self, basis: RenderedBasis):
        self.basis = basis
        inst = basis.inst
        self.log = all(s.scale == "log" for s in inst.segments)
        self.pieces = []
        offset = 0
        for k, seg in enumerate(inst.segments):
            cols = (basis.segment == k).nonzero()[:, 0]
            if len(cols):
                assert int(cols[-1]) - int(cols[0]) + 1 == len(cols), "segments' pixels are concatenated"
                t = (basis.u_pixels[cols] - seg.start) / seg.step if seg.scale == "log" else None
                self.pieces.append(dict(seg=seg, lo=int(cols[0]), hi=int(cols[-1]) + 1, offset=offset, t=t))
            offset += seg.size
        for piece in self.pieces:
            if piece["t"] is None:
                continue
            whole = torch.floor(piece["t"])
            piece["frac"] = (piece["t"] - whole).float()
            base = int(whole.min()) - 1
            piece["base"], piece["span"] = base, int(whole.max()) - base + 2
            piece["left"] = whole.long() - base - 1  # column of grid point I_p - 1 in a span from base
            piece["pad"] = -1
        self._velocity, self._at_velocity = None, None

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
                h = b.grid.shape[1]
                at_v, inside = b.inst.render(b.grid.T.contiguous(), b.inst.full_view(), b.u_pixels.expand(h, -1),
                                             b.segment.expand(h, -1), rv_kms[:1].expand(h))
                self._at_velocity = torch.where(inside, at_v, float("nan")).contiguous()
                self._velocity = float(rv_kms[0])
            return torch.mm(augmented, self._at_velocity, out=out)
        if not self.log:  # a grid uniform in lambda: the reference route
            flux = self.basis.rendered_spectra(augmented[:, :-1], rv_kms)
            return out.copy_(flux)
        for piece in self.pieces:
            self._shift_piece(piece, augmented, rv_kms, out)
        return out

    def _shift_piece(self, piece, augmented, rv_kms, out):
        seg, base, span = piece["seg"], piece["base"], piece["span"]
        delta = log_shift(rv_kms) / seg.step
        whole = torch.floor(delta)
        fractions = (delta - whole).float()
        # a shift beyond the segment's grid gives NaN everywhere: clamp it to just beyond (v <= -c: NaN shift)
        limit = seg.size + span + 2
        shift = whole.nan_to_num(nan=limit).clamp(-limit, limit).long()
        left_column, pixel_frac = piece["left"], piece["frac"]
        rows, width = min(self.CHUNK, len(shift)), len(pixel_frac)
        index = torch.empty(rows, width, dtype=torch.long)
        left, here, right = (torch.empty(rows, width, dtype=augmented.dtype) for _ in range(3))
        weight = torch.empty(rows, width, dtype=pixel_frac.dtype)
        side = torch.empty(rows, width, dtype=torch.bool)
        lows = [int(shift[a: a + rows].min()) for a in range(0, len(shift), rows)]
        highs = [int(shift[a: a + rows].max()) for a in range(0, len(shift), rows)]
        pad = max(max(map(abs, lows)), max(map(abs, highs))) + 2 + max(0, -base, base + span - seg.size)
        basis_t = self._padded(piece, pad)
        grid_values = torch.empty(rows * (span + max(h - l for l, h in zip(lows, highs))), dtype=augmented.dtype)
        for chunk, a in enumerate(range(0, len(shift), rows)):
            b = min(a + rows, len(shift))
            m, low, high = b - a, lows[chunk], highs[chunk]
            # the model of these stars on grid points base - high .. base - low + span - 1: one product;
            # star i's point base - d_i + j is in column j + high - d_i
            columns = span + high - low
            g = grid_values[: m * columns].view(m, columns)
            start = base - high + pad
            torch.mm(augmented[a:b], basis_t[:, start: start + columns], out=g)
            torch.add(left_column[None, :], (high - shift[a:b])[:, None], out=index[:m])
            torch.gather(g, 1, index[:m], out=left[:m])  # grid point I_p - d - 1
            torch.gather(g[:, 1:], 1, index[:m], out=here[:m])  # I_p - d
            torch.gather(g[:, 2:], 1, index[:m], out=right[:m])  # I_p - d + 1
            torch.sub(pixel_frac[None, :], fractions[a:b, None], out=weight[:m])  # F_p - E
            torch.ge(weight[:m], 0, out=side[:m])
            torch.where(side[:m], right[:m], left[:m], out=right[:m])  # the neighbour on the side of the shift
            weight[:m].abs_()
            torch.lerp(here[:m], right[:m], weight[:m], out=out[a:b, piece["lo"]: piece["hi"]])


@dataclass
class GeneratedSpectra:
    """Generated spectra on one grid: ``flux[i]`` at ``wavelength`` (vacuum A, concatenated
    segments named in ``segment_names`` with ``segment_lengths``), their latents and velocities."""

    wavelength: np.ndarray  # (P,)
    flux: np.ndarray  # (N, P) float32
    latents: np.ndarray  # (N, D)
    rv_kms: np.ndarray  # (N,)
    segment_names: list[str]
    segment_lengths: list[int]
    grid: str  # "instrument:<name>" or "custom"
    resolution: float | None
    frame: str

    def write(self, path: str | os.PathLike) -> Path:
        """Write to ``.fits`` (HDUs WAVELENGTH, FLUX, LATENT, RV) or ``.parquet`` (one row per
        spectrum: flux list, latent list, rv_kms), atomically (temporary file + rename)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        suffix = path.suffix.lower()
        if suffix in (".fits", ".fit"):
            from astropy.io import fits

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
            hdus[1].header["BUNIT"] = "Angstrom (vacuum)"
            fits.HDUList(hdus).writeto(tmp, overwrite=True)
        elif suffix == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.table({
                "index": np.arange(len(self.flux)),
                "rv_kms": self.rv_kms,
                "latent": pa.array(list(self.latents.astype(np.float32))),
                "flux": pa.array(list(self.flux.astype(np.float32))),
            })
            meta = {"wavelength_A": self.wavelength.tolist(), "grid": self.grid, "frame": self.frame,
                    "segment_names": self.segment_names, "segment_lengths": self.segment_lengths,
                    "resolution": self.resolution}
            import json

            table = table.replace_schema_metadata({"stellarfield": json.dumps(meta)})
            pq.write_table(table, tmp)
        else:
            raise ValueError(f"unknown output format {path.suffix!r}: use .fits or .parquet")
        os.replace(tmp, path)
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


def generate(model, n: int, instrument: str | None = None, wave_range=None, resolution: float | None = None,
             wave_grid=None, rv_kms: float | str | None = None, seed: int = 0, latents=None,
             batch: int = 1024) -> GeneratedSpectra:
    """Draw ``n`` stars from the model's prior and render them on a grid.

    Args:
        model: a run folder, a loaded :class:`TrainedModel`, or a :class:`RunResult`.
        n: number of spectra.
        instrument | wave_range (+ resolution) | wave_grid: the grid (see the module docstring).
        rv_kms: None (rest frame of the grid / product frame unshifted), a number (every star), or
            "random" (normal, sd :data:`RANDOM_RV_SIGMA_KMS`).
        seed: makes latents and velocities reproducible.
        latents: (n, D) latents to render instead of prior draws.
        batch: spectra per matrix product.
    """
    trained = as_trained(model)
    m = trained.model
    inst, wavelengths, names, grid_name = resolve_grid(m, instrument, wave_range, resolution, wave_grid)
    if latents is None:
        if trained.prior is None:
            raise ValueError("this model has no latent prior (training stopped before fitting it); pass latents=")
        z = trained.prior.sample(n, seed=seed)
    else:
        z = torch.as_tensor(np.asarray(latents), dtype=torch.float32)
        if z.shape != (n, m.latent_dim):
            raise ValueError(f"latents must have shape ({n}, {m.latent_dim}), got {tuple(z.shape)}")
    g = torch.Generator().manual_seed(seed + 1)
    if rv_kms is None:
        rv = None
    elif isinstance(rv_kms, str):
        if rv_kms != "random":
            raise ValueError(f"rv_kms must be a number, None or 'random', got {rv_kms!r}")
        rv = torch.randn(n, generator=g, dtype=torch.float64) * RANDOM_RV_SIGMA_KMS
    else:
        rv = torch.full((n,), float(rv_kms), dtype=torch.float64)
    basis = RenderedBasis.build(m, inst, wavelengths)
    flux = torch.empty(n, len(basis.u_pixels))
    with torch.no_grad():
        for start in range(0, n, batch):
            stop = min(start + batch, n)
            coeffs = m.decoder.coefficients(z[start:stop].to(m.device)).cpu()
            basis.spectra(coeffs, None if rv is None else rv[start:stop], out=flux[start:stop])
    flux = flux.numpy()
    if inst.normalisation == "continuum" and grid_name.startswith("instrument:"):
        flux = normalise_like_the_survey(flux, wavelengths, inst.continuum_degree)
    return GeneratedSpectra(
        wavelength=np.concatenate(wavelengths), flux=flux, latents=z.numpy(),
        rv_kms=np.zeros(n) if rv is None else rv.numpy(), segment_names=list(names),
        segment_lengths=[len(w) for w in wavelengths], grid=grid_name,
        resolution=resolution, frame=inst.frame,
    )
