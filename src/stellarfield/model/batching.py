"""Training data in memory: per product, padded pixel tensors, and instrument-balanced batches.

Spectra of one product (one :class:`~stellarfield.model.instrument.Instrument`) are stacked into
padded ``(N, P)`` tensors: ``u`` (float64, ``ln`` of vacuum Angstrom in the product's frame, +inf
at padding, increasing along each row), ``flux``, ``ivar``, ``good`` (mask, finite, ivar > 0 where
the noise is known, outside telluric bands) and the segment index of each pixel. 40,000 Gaia XP
spectra take ~250 MB this way.

Batches are balanced over instruments: each step takes ``batch_per_product`` spectra (more for large
products, see :meth:`BalancedSampler.batch_size`) from every *cheap* product (model grid of at most
:data:`CHEAP_GRID_POINTS` points: Gaia XP) and from ``products_per_step`` of the others, drawn at
random, so 40,000 XP spectra do not drown 57 GALAH stars, and XP latents, each visited once per
pass over XP, get many passes while the expensive high-resolution products take turns. Within a
product the spectra are visited in a fresh random order each cycle. For speed a batch may use a
**window** of each spectrum: the pixels in one random contiguous stretch of one segment (about
``window_pixels`` pixels), which needs the trunk on a short piece of the model grid only.
Everything random is drawn from generators seeded by ``(seed, step)`` or ``(seed, product, cycle)``,
so a run is reproducible and resumable from the step counters alone.

Streaming (:class:`StreamingTrainingData`, for datasets larger than memory): the same sampler and
batches, but each product is read from the dataset's Parquet row groups a buffer at a time
(:class:`StreamingProductData`: row groups shuffled per pass, spectra shuffled per buffer, at most
two buffers of ~:data:`STREAM_BUFFER_PIXELS` pixels held), the padded tensors built straight from the
Arrow columns (:meth:`ProductData.from_rows`); the sampler's counters still say everything, so a
resumed run reads the same buffers. ``benchmarks/train_memory.py`` measures its peak memory on
datasets of 100,000 and 1,000,000 spectra.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from stellarfield.arrays import nanmedian_rows
from stellarfield.model.instrument import Instrument, ProductStats, build_instrument

#: Products whose model grid has at most this many points are in every step (their cost is small).
CHEAP_GRID_POINTS = 2048


@dataclass
class Batch:
    """Pixels of ``B`` spectra of one product, ready for the observation model.

    u (B, K) float64 ln(lambda/A) (product frame); flux, ivar (B, K) float32; good (B, K) bool;
    segment (B, K) long; scale (B,) median |flux| of good pixels; index (B,) row in the latent table
    (the spectrum's position in the whole training set); rows (B,) positions within the product;
    window: ``(segment, u_lo, u_hi)`` when the batch is a window, else None.
    """

    product: str
    rows: torch.Tensor
    index: torch.Tensor
    u: torch.Tensor
    flux: torch.Tensor
    ivar: torch.Tensor
    good: torch.Tensor
    segment: torch.Tensor
    scale: torch.Tensor
    window: tuple[int, float, float] | None = None

    @property
    def size(self) -> int:
        return int(self.rows.shape[0])

    def to(self, device: torch.device) -> "Batch":
        """The same batch with its tensors on ``device`` (rows and index stay on the host)."""
        if self.u.device == torch.device(device):
            return self
        move = lambda t: t.to(device, non_blocking=True)
        return Batch(self.product, self.rows, move(self.index), move(self.u), move(self.flux), move(self.ivar),
                     move(self.good), move(self.segment), move(self.scale), self.window)


class ProductData:
    """All spectra of one product as padded tensors (see the module docstring)."""

    def __init__(self, instrument: Instrument, spectra: list, index: torch.Tensor | None = None):
        self.instrument = instrument
        self.keys = [s.key for s in spectra]
        self.object_ids = [s.object_id for s in spectra]
        n, p = len(spectra), max(s.n_pixels for s in spectra)
        u = np.full((n, p), np.inf)
        flux, ivar = np.zeros((n, p), np.float32), np.zeros((n, p), np.float32)
        good, segment = np.zeros((n, p), bool), np.zeros((n, p), np.int8)
        self.n_dropped_segments = 0
        for i, s in enumerate(spectra):
            start = 0
            for seg in s.segments:
                k = seg.n_pixels
                if seg.name not in instrument.segment_names:  # a segment the model never saw
                    self.n_dropped_segments += 1
                    u[i, start : start + k] = np.log(seg.wavelength)
                    start += k
                    continue
                sl = slice(start, start + k)
                u[i, sl] = np.log(seg.wavelength)
                flux[i, sl] = np.nan_to_num(seg.flux)
                ivar[i, sl] = seg.ivar
                ok = seg.mask & np.isfinite(seg.flux) & instrument.pixel_mask(seg.wavelength)
                if s.noise_known:
                    ok &= seg.ivar > 0
                good[i, sl] = ok
                segment[i, sl] = instrument.segment_names.index(seg.name)
                start += k
        self._set(u, flux, ivar, good, segment, index)

    def _set(self, u, flux, ivar, good, segment, index) -> None:
        """The padded arrays as tensors, each spectrum's scale (median |flux| of its good pixels)."""
        n, p = u.shape
        self.u = torch.from_numpy(u)
        self.flux, self.ivar = torch.from_numpy(flux), torch.from_numpy(ivar)
        self.good, self.segment = torch.from_numpy(good), torch.from_numpy(segment)
        absflux = np.where(good, np.abs(flux), np.nan)
        with np.errstate(all="ignore"):
            scale = nanmedian_rows(absflux) if good.any() else np.ones(n)
        self.scale = torch.from_numpy(np.where(np.isfinite(scale) & (scale > 0), scale, 1.0).astype(np.float32))
        self.index = torch.arange(n) if index is None else index
        self.n_pixels = int(p)

    @classmethod
    def from_rows(cls, instrument: Instrument, rows, index: torch.Tensor | None = None) -> "ProductData":
        """The same as ``ProductData(instrument, list(batch_to_spectra(rows)), index)`` for rows of a
        dataset (an Arrow record batch of its columns), computed on the columns at once (no record
        per spectrum: what a streaming buffer is built from)."""
        self = cls.__new__(cls)
        self.instrument = instrument
        self.keys = rows.column("key").to_pylist()
        self.object_ids = rows.column("object_id").to_pylist()
        n = rows.num_rows
        lengths = rows.column("n_pixels").to_numpy().astype(np.int64)
        p = int(lengths.max()) if n else 1

        def values(name: str) -> np.ndarray:  # a list column's elements, row after row
            return rows.column(name).flatten().to_numpy(zero_copy_only=False)

        wavelength, flux, ivar, mask = (values(c) for c in ("wavelength", "flux", "ivar", "mask"))
        # the record's own clean-up (Segment.__post_init__): a non-finite or negative-ivar pixel is bad, bad ivar is 0
        mask = mask & np.isfinite(flux) & np.isfinite(ivar) & (ivar >= 0)
        ivar = np.where(mask, ivar, np.float32(0)).astype(np.float32)
        segment_of_name = {name: k for k, name in enumerate(instrument.segment_names)}
        known = np.array([segment_of_name.get(name, -1) for name in rows.column("segment_names").flatten().to_pylist()],
                         dtype=np.int64)
        seg_lengths = values("segment_lengths").astype(np.int64)
        segment = np.repeat(known, seg_lengths)
        modelled = segment >= 0
        self.n_dropped_segments = int((known < 0).sum())
        ok = modelled & mask & instrument.pixel_mask(wavelength)
        noise_known = np.repeat(rows.column("noise_known").to_numpy(zero_copy_only=False), lengths)
        ok &= ~noise_known | (ivar > 0)

        pixels = (np.log(wavelength), np.where(modelled, np.nan_to_num(flux), np.float32(0)),
                  np.where(modelled, ivar, np.float32(0)), ok, np.where(modelled, segment, 0).astype(np.int8))
        if n and (lengths == p).all():  # every spectrum as long as the longest: no padding, a reshape
            self._set(*(a.reshape(n, p) for a in pixels), index)
            return self
        padded = (np.full((n, p), np.inf), np.zeros((n, p), np.float32), np.zeros((n, p), np.float32),
                  np.zeros((n, p), bool), np.zeros((n, p), np.int8))
        row = np.repeat(np.arange(n), lengths)
        column = np.arange(len(row)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        for out, a in zip(padded, pixels):
            out[row, column] = a
        self._set(*padded, index)
        return self

    def __len__(self) -> int:
        return len(self.keys)

    def batch(self, rows: torch.Tensor, window: tuple[int, float, float] | None = None) -> Batch:
        """The pixels of spectra ``rows``: all of them, or those of ``window = (segment, u_lo, u_hi)``."""
        u = self.u[rows]
        if window is None:
            k = int(torch.isfinite(u).sum(1).max())
            cols = torch.arange(k).expand(len(rows), -1)
            valid = torch.ones_like(cols, dtype=torch.bool)
        else:
            _, lo, hi = window
            first = torch.searchsorted(u, torch.full((len(rows), 1), lo, dtype=torch.float64))
            last = torch.searchsorted(u, torch.full((len(rows), 1), hi, dtype=torch.float64), right=True)
            k = max(int((last - first).max()), 1)
            cols = (first + torch.arange(k)).clamp(max=self.n_pixels - 1)
            valid = torch.arange(k) < (last - first)
        take = lambda t: t[rows].gather(1, cols)
        good = take(self.good) & valid
        if window is not None:
            good &= take(self.segment) == window[0]
        return Batch(
            product=self.instrument.name, rows=rows, index=self.index[rows], u=take(self.u),
            flux=take(self.flux), ivar=take(self.ivar), good=good, segment=take(self.segment).long(),
            scale=self.scale[rows], window=window,
        )

    def random_window(self, pixels: int, generator: torch.Generator) -> tuple[int, float, float] | None:
        """A random stretch of ~``pixels`` native pixels inside one segment (see :func:`random_window`)."""
        return random_window(self.instrument, self.n_pixels, lambda k: int((self.segment[0] == k).sum()), pixels,
                             generator)


def random_window(instrument: Instrument, n_pixels: int, segment_pixels, pixels: int,
                  generator: torch.Generator) -> tuple[int, float, float] | None:
    """A random stretch of ~``pixels`` native pixels inside one segment (chosen with probability
    proportional to its length in u), or None (whole spectra) when the spectra (``n_pixels`` at
    most) are not much longer than that. ``segment_pixels(k)``: pixels of segment ``k`` in a typical
    spectrum. A product whose continuum is a scale only (a flux-calibrated SED such as MILES: the
    shape over a long range is the information) gets windows of half its length. A product whose
    model is projected onto its samples' span (:attr:`Instrument.sample_basis`, Gaia XP) is always
    whole: the projection needs every sample."""
    if instrument.sample_basis is not None:
        return None
    if instrument.continuum_degree == 0:
        pixels = max(pixels, n_pixels // 2)
    if n_pixels <= 1.5 * pixels:
        return None
    segs = instrument.segments
    widths = torch.tensor([s.pixel_u_max - s.pixel_u_min for s in segs])
    k = int(torch.multinomial(widths / widths.sum(), 1, generator=generator))
    seg = segs[k]
    n_seg = max(segment_pixels(k), 1)
    width = (seg.pixel_u_max - seg.pixel_u_min) * min(1.0, pixels / n_seg)
    lo = seg.pixel_u_min + float(torch.rand(1, generator=generator, dtype=torch.float64)) * (
        seg.pixel_u_max - seg.pixel_u_min - width
    )
    return k, lo, lo + width


class TrainingData:
    """Spectra of several products in memory (one :class:`ProductData` each).

    Args:
        spectra: any iterable of Spectrum (a list, or ``Dataset.iter_spectra(...)``: streamed once).
        instruments: use these (e.g. a trained model's); spectra of products not among them are
            skipped and counted in :attr:`skipped`. Otherwise instruments are built from ALL the
            spectra streamed, so every rank of a distributed run builds the same ones.
        rank, world: keep every ``world``-th spectrum of each product, starting at ``rank`` (the
            disjoint part of one process in distributed training).
        max_per_product: keep at most this many spectra of each product (over all ranks).
        latent_per_star: spectra of one star (same ``star_id``, else same ``object_id``: MILES and
            STELIB of one star, an apStar and its visits, GALAH's normalised and observed-frame
            records of one observation) share one row of the latent table: the model is told that
            the instrument is not part of the star (each observation keeps its own RV and continuum).

    Each spectrum's ``index`` (its row in an auto-decoder's latent table) is its position in the
    whole stream (or its star's first position), products in alphabetical order, the same on every
    rank; :attr:`n_total` is the table's size.
    """

    def __init__(self, spectra: Iterable, instruments: dict[str, Instrument] | None = None, rank: int = 0,
                 world: int = 1, max_per_product: int | None = None, latent_per_star: bool = False):
        from stellarfield.data.split import split_id

        stats: dict[str, ProductStats] = {}
        kept: dict[str, list] = {}
        positions: dict[str, list[int]] = {}
        seen: dict[str, int] = {}
        stars: dict[str, list[str]] = {}  # per product, the star of every spectrum of the stream
        for s in spectra:
            i = seen[s.product] = seen.get(s.product, -1) + 1
            if max_per_product is not None and i >= max_per_product:
                continue
            if latent_per_star:
                stars.setdefault(s.product, []).append(split_id(s))
            if instruments is None:
                stats.setdefault(s.product, ProductStats(s.product)).add(s)
            if i % world == rank:
                kept.setdefault(s.product, []).append(s)
                positions.setdefault(s.product, []).append(i)
        if instruments is None:
            instruments = {name: build_instrument(st) for name, st in sorted(stats.items())}
        self.instruments = instruments
        self.skipped = {p: n + 1 for p, n in seen.items() if p not in instruments}
        self.products: dict[str, ProductData] = {}
        offset, star_rows = 0, {}
        for name in sorted(seen):
            if name not in instruments:
                continue
            total = seen[name] + 1 if max_per_product is None else min(seen[name] + 1, max_per_product)
            if latent_per_star:
                rows = [star_rows.setdefault(star, len(star_rows)) for star in stars[name]]
                index = torch.tensor([rows[i] for i in positions.get(name, [])], dtype=torch.long)
            else:
                index = offset + torch.tensor(positions.get(name, []), dtype=torch.long)
            if name in kept:
                self.products[name] = ProductData(instruments[name], kept[name], index)
            offset += total
        # the latent table's size: stars, or spectra, over all ranks
        self.n_total = len(star_rows) if latent_per_star else offset
        self.n_spectra = sum(len(p) for p in self.products.values())

    def __len__(self) -> int:
        return self.n_spectra

    def counts(self) -> dict[str, int]:
        return {name: len(p) for name, p in self.products.items()}

    def latent_rows(self) -> dict[str, torch.Tensor]:
        """The latent-table row of each of this rank's spectra, by product (what the prior is fitted to)."""
        return {name: p.index for name, p in self.products.items()}

    @classmethod
    def from_dataset(cls, path, split: str | None = "train", products=None, **kwargs) -> "TrainingData":
        """Load one split of a dataset folder (streamed; keyword arguments as for the constructor)."""
        from stellarfield.data.store import Dataset

        return cls(Dataset(path).iter_spectra(split=split, products=products), **kwargs)


def stable_seed(*parts) -> int:
    """A 63-bit seed from any parts (stable across processes, unlike ``hash``)."""
    return zlib.crc32(repr(parts).encode()) * 1_000_003 % (2**63 - 1)


_seed = stable_seed


def latent_layout(data) -> str | None:
    """A fingerprint (hex CRC-32) of which latent-table row each training spectrum has: the
    (product, spectrum key, row) triples of in-memory :class:`TrainingData`, sorted by key, so the
    same spectra with the same rows give the same fingerprint whatever order they were read in, and
    other spectra, or the same ones given other rows (datasets in another order), another. A run
    records it, so a resume or a prior refitted to the table can tell when the data given would pair
    latents with the wrong spectra. None for streamed data (its keys are not held in memory)."""
    if not all(hasattr(p, "keys") for p in data.products.values()):
        return None
    crc = 0
    for name in sorted(data.products):
        product = data.products[name]
        for key, row in sorted(zip(product.keys, product.index.tolist())):
            crc = zlib.crc32(f"{name}\t{key}\t{row}\n".encode(), crc)
    return f"{crc:08x}"


def release_freed_memory() -> None:
    """Return the C heap's free pages to the operating system (glibc ``malloc_trim``; a no-op
    elsewhere). Streaming loops call it once per chunk or buffer: torch's many small temporaries
    (the flow prior's sampling, the padded tensors of a buffer) otherwise fragment the heap and
    the resident memory creeps up with the number of chunks, not with what is held (measured:
    +290 MB over 80 prior draws of 1,024 latents without it, flat with it)."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes

            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


class BalancedSampler:
    """Instrument-balanced batches (see the module docstring). State: the step and per-product counts."""

    def __init__(self, data: TrainingData, batch_per_product: int, products_per_step: int | None, window_pixels: int,
                 seed: int):
        self.data, self.batch_per_product, self.seed = data, batch_per_product, seed
        self.products_per_step = products_per_step or len(data.products)  # among the expensive products
        self.window_pixels = window_pixels
        self.step = 0
        self.drawn = {name: 0 for name in data.products}
        self._perms: dict[str, tuple[int, torch.Tensor]] = {}

    def state_dict(self) -> dict:
        return {"step": self.step, "drawn": dict(self.drawn)}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.drawn.update({k: int(v) for k, v in state["drawn"].items() if k in self.drawn})

    def _permutation(self, name: str, cycle: int) -> torch.Tensor:
        """The random order of product ``name``'s spectra in its ``cycle``-th pass (cached)."""
        cached = self._perms.get(name)
        if cached is None or cached[0] != cycle:
            g = torch.Generator().manual_seed(_seed(self.seed, name, cycle))
            cached = self._perms[name] = (cycle, torch.randperm(len(self.data.products[name]), generator=g))
        return cached[1]

    def _positions(self, name: str, count: int) -> range:
        """The next ``count`` draw positions of product ``name`` (position ``p``: spectrum ``p % N``
        of pass ``p // N`` in that pass's order); advances the counter."""
        n = len(self.data.products[name])
        positions = range(self.drawn[name], self.drawn[name] + min(count, n))
        self.drawn[name] += len(positions)
        return positions

    def _rows(self, name: str, count: int) -> torch.Tensor:
        n = len(self.data.products[name])
        return torch.stack([self._permutation(name, pos // n)[pos % n] for pos in self._positions(name, count)])

    def next(self) -> list[Batch]:
        """The batches of the next step, one per chosen product."""
        g = torch.Generator().manual_seed(_seed(self.seed, "step", self.step))
        names = sorted(self.data.products)
        cheap, others = self._cheap_and_others(names)
        if self.products_per_step < len(others):
            pick = sorted(torch.randperm(len(others), generator=g)[: self.products_per_step].tolist())
            names = sorted(cheap + [others[i] for i in pick])
        batches = []
        for name in names:
            pd = self.data.products[name]
            if isinstance(pd, StreamingProductData):  # the order of a pass is the stream's (see its docstring)
                positions = self._positions(name, self.batch_size(name))
                window = pd.random_window(self.window_pixels, g) if self.window_pixels else None
                batches.append(pd.batch_at(positions, window))
                continue
            rows = self._rows(name, self.batch_size(name))
            window = pd.random_window(self.window_pixels, g) if self.window_pixels else None
            batches.append(pd.batch(rows, window))
        self.step += 1
        return batches

    def _cheap_and_others(self, names: list[str]) -> tuple[list[str], list[str]]:
        """``names`` split into cheap products (in every step) and the others, order kept."""
        cheap = [n for n in names if self.data.products[n].instrument.n_grid <= CHEAP_GRID_POINTS]
        return cheap, [n for n in names if n not in cheap]

    def batch_size(self, name: str) -> int:
        """Spectra of product ``name`` per step: ``batch_per_product``, times N / 500 for a product
        of N > 500 spectra (at most x64). The loss averages each product's spectra first, so every
        product weighs the same however large its batch; the larger batch only gives a big product's
        spectra (40,000 Gaia XP, 343 pixels each: cheap) more visits."""
        n = len(self.data.products[name])
        return min(n, int(round(self.batch_per_product * min(64.0, max(1.0, n / 500)))))

    def steps_per_epoch(self) -> int:
        """One epoch = as many spectra as the training set holds, drawn in balanced batches."""
        cheap, others = self._cheap_and_others(list(self.data.products))
        share = min(1.0, self.products_per_step / len(others)) if others else 1.0
        per_step = sum(self.batch_size(n) for n in cheap) + share * sum(self.batch_size(n) for n in others)
        return max(1, math.ceil(self.data.n_spectra / per_step))


# ----------------------------------------------------------------------------------------------
# Streaming: training data read from the dataset's row groups as it goes
# ----------------------------------------------------------------------------------------------
#: Pixels of one product held in one streaming buffer (~18 bytes each as padded tensors: u float64,
#: flux, ivar float32, good, segment; building it from the Arrow columns takes ~3x that for a moment):
#: ~38 MB, 6,100 Gaia XP spectra (six steps of 1,024) or 245 of APOGEE's 8,575 pixels.
STREAM_BUFFER_PIXELS = 1 << 21
#: Training spectra per product (the first ones, in dataset order) that a streaming run builds the
#: product's instrument from (its grid covers their pixels; pixels of other spectra beyond it, if
#: any, are outside the model grid and get no weight, as :meth:`Instrument.render` says).
INSTRUMENT_SAMPLE = 2000
_INDEX_COLUMNS = ["product", "split", "star_id", "object_id", "n_pixels"]


@dataclass
class _Unit:
    """The training rows of one product in one row group: their positions in the group and their
    rows of the latent table."""

    dataset: int
    shard: int
    group: int
    positions: np.ndarray  # int32
    latents: np.ndarray  # int32 (8 bytes per training spectrum in all)


def _star_hashes(keys: list[str]) -> np.ndarray:
    """A 64-bit hash (BLAKE2b) of each key (a star's, or a spectrum's): a million take 8 MB, not their
    strings and a dictionary (the chance that two of a million share a hash is ~3e-8)."""
    import hashlib

    return np.array([int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8).digest(), "little") for k in keys],
                    dtype=np.uint64)


class StreamingProductData:
    """One product's training spectra, read from the dataset a buffer at a time.

    A pass over the product (its spectra on this rank) visits its row groups (:class:`_Unit`) in a
    random order drawn from ``(seed, product, pass)``, grouped into consecutive **buffers** of at
    least ``buffer_rows`` spectra; a buffer is read (those row groups only), stacked as a
    :class:`ProductData` and visited in a random order drawn from ``(seed, product, pass, buffer)``.
    Position ``p`` of the sampler's counter is spectrum ``p % N`` of pass ``p // N``, so the batches
    follow from the counter alone: a resumed run reads the same buffers and draws the same batches.
    At most two buffers are held (a batch may straddle two).
    """

    def __init__(self, name: str, instrument: Instrument, units: list[_Unit], n_pixels: int,
                 segment_pixels: dict[int, int], buffer_rows: int, seed: int, datasets: list):
        self.name, self.instrument, self.units = name, instrument, units
        self.n_pixels, self.segment_pixels = int(n_pixels), dict(segment_pixels)
        self.buffer_rows, self.seed, self.datasets = max(1, int(buffer_rows)), seed, datasets
        self.n = int(sum(len(u.positions) for u in units))
        self._layouts: dict[int, tuple[list[list[int]], np.ndarray]] = {}
        self._buffers: dict[tuple[int, int], tuple[ProductData, torch.Tensor]] = {}
        self.buffers_read = 0  # how many buffers were read from disk (a pass reads each once)
        self.max_rows_held = 0  # the most spectra held at once

    def __len__(self) -> int:
        return self.n

    def layout(self, cycle: int) -> tuple[list[list[int]], np.ndarray]:
        """Pass ``cycle``'s buffers (lists of unit indices) and the position at which each starts."""
        if cycle not in self._layouts:
            g = torch.Generator().manual_seed(stable_seed(self.seed, self.name, "units", cycle))
            order = torch.randperm(len(self.units), generator=g).tolist()
            buffers, rows = [[]], 0
            for i in order:
                if rows >= self.buffer_rows:
                    buffers.append([])
                    rows = 0
                buffers[-1].append(i)
                rows += len(self.units[i].positions)
            sizes = [sum(len(self.units[i].positions) for i in b) for b in buffers]
            self._layouts = {c: v for c, v in self._layouts.items() if c >= cycle - 1}
            self._layouts[cycle] = (buffers, np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64))
        return self._layouts[cycle]

    def _buffer(self, cycle: int, b: int) -> tuple[ProductData, torch.Tensor]:
        """Buffer ``b`` of pass ``cycle``: its spectra stacked, and the order they are visited in."""
        key = (cycle, b)
        if key not in self._buffers:
            if len(self._buffers) >= 2:  # keep the newest one: a batch straddles at most two
                del self._buffers[min(self._buffers)]
                release_freed_memory()
            import pyarrow as pa

            units = [self.units[i] for i in self.layout(cycle)[0][b]]
            parts, latents = [], []
            for d, dataset in enumerate(self.datasets):
                mine = [u for u in units if u.dataset == d]
                wanted = {(u.shard, u.group): u for u in mine}
                for where, rows in dataset.iter_row_groups([(u.shard, u.group) for u in mine]):
                    unit = wanted[where]
                    parts.append(rows.take(pa.array(unit.positions)))
                    latents.append(unit.latents)
            rows = pa.Table.from_batches(parts).combine_chunks().to_batches()[0]
            del parts
            index = torch.from_numpy(np.concatenate(latents).astype(np.int64))
            data = ProductData.from_rows(self.instrument, rows, index)
            del rows
            g = torch.Generator().manual_seed(stable_seed(self.seed, self.name, "rows", cycle, b))
            self._buffers[key] = (data, torch.randperm(len(data), generator=g))
            self.buffers_read += 1
            self.max_rows_held = max(self.max_rows_held, sum(len(v[0]) for v in self._buffers.values()))
        return self._buffers[key]

    def batch_at(self, positions: range, window: tuple[int, float, float] | None = None) -> Batch:
        """The spectra at draw ``positions`` (see the class docstring), one batch."""
        parts, run, run_key = [], [], None
        for pos in positions:
            cycle, p = divmod(pos, self.n)
            starts = self.layout(cycle)[1]
            b = int(np.searchsorted(starts, p, side="right") - 1)
            if run_key is not None and (cycle, b) != run_key:
                parts.append((run_key, run))
                run = []
            run_key = (cycle, b)
            run.append(p - int(starts[b]))
        parts.append((run_key, run))
        batches = []
        for (cycle, b), offsets in parts:
            data, order = self._buffer(cycle, b)
            batches.append(data.batch(order[torch.tensor(offsets)], window))
        batch = batches[0] if len(batches) == 1 else concatenate_batches(batches)
        batch.rows = torch.tensor([pos % self.n for pos in positions])
        return batch

    def random_window(self, pixels: int, generator: torch.Generator) -> tuple[int, float, float] | None:
        return random_window(self.instrument, self.n_pixels, lambda k: self.segment_pixels.get(k, 0), pixels, generator)


def concatenate_batches(batches: list[Batch]) -> Batch:
    """One :class:`Batch` of the spectra of several of one product (padded to the longest: u +inf,
    flux and ivar 0, good False)."""
    k = max(b.u.shape[1] for b in batches)

    def pad(t: torch.Tensor, value) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, k - t.shape[1]), value=value) if t.shape[1] < k else t

    cat = lambda name, value: torch.cat([pad(getattr(b, name), value) for b in batches])
    return Batch(product=batches[0].product, rows=torch.cat([b.rows for b in batches]),
                 index=torch.cat([b.index for b in batches]), u=cat("u", float("inf")), flux=cat("flux", 0.0),
                 ivar=cat("ivar", 0.0), good=cat("good", False), segment=cat("segment", 0),
                 scale=torch.cat([b.scale for b in batches]), window=batches[0].window)


class StreamingTrainingData:
    """The training split of one or several dataset folders, streamed (see the module docstring
    of :mod:`stellarfield.model.train`): the interface of :class:`TrainingData` (``products``,
    ``instruments``, ``n_total``, ``n_spectra``, ``counts()``, ``skipped``) with
    :class:`StreamingProductData` products, so memory does not grow with the dataset.

    Building it reads the small columns (product, split, star and object id, pixel count) of every
    row group once, keeping per training spectrum its position in its row group and its row of the
    latent table (8 bytes: 8 MB for a million spectra; with ``latent_per_star`` the rows are found
    from 64-bit hashes of the star ids, :func:`_star_hashes`), and reads the first
    :data:`INSTRUMENT_SAMPLE` spectra of each product to build its instrument (unless
    ``instruments`` are given).

    Args:
        paths: dataset folder(s). A spectrum in two of them (the same key) is used once, from the
            first (as the in-memory path does), found by 64-bit hashes of the keys (8 bytes a spectrum).
        split: the split to train on.
        instruments, latent_per_star: as :class:`TrainingData`.
        rank, world: this process's part under torchrun: whole **shards** (``shard % world == rank``,
            shards numbered over all the datasets), or row groups when there are fewer shards than ranks;
            disjoint, and together all of the data.
        buffer_pixels: pixels per product buffer (see :data:`STREAM_BUFFER_PIXELS`).
        seed: the shuffles' seed (the order of row groups and of spectra in a buffer).
    """

    def __init__(self, paths, split: str = "train", instruments: dict[str, Instrument] | None = None, rank: int = 0,
                 world: int = 1, latent_per_star: bool = False, buffer_pixels: int = STREAM_BUFFER_PIXELS,
                 seed: int = 0, instrument_sample: int = INSTRUMENT_SAMPLE):
        import os

        import pyarrow as pa
        import pyarrow.compute as pc

        from stellarfield.data.store import Dataset

        paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        self.datasets = [Dataset(p) for p in paths]
        n_shards = sum(len(ds.manifest["shards"]) for ds in self.datasets)
        by_shard = n_shards >= world
        units: dict[str, list[_Unit]] = {}  # this rank's
        sample_units: dict[str, list[_Unit]] = {}  # every rank's first units of each product
        n_pixels: dict[str, int] = {}
        seen: dict[str, int] = {}
        star_keys, ordinal, unit_number, shard_offset = [], 0, 0, 0
        several = len(self.datasets) > 1  # then a key already in an earlier dataset is skipped
        earlier_keys = np.empty(0, dtype=np.uint64)  # sorted hashes of the keys of the datasets before
        self.repeated = 0  # training spectra skipped as repeats of an earlier dataset's
        for d, ds in enumerate(self.datasets):
            this_keys = []
            columns = _INDEX_COLUMNS + ["key"] if several else _INDEX_COLUMNS
            for (shard, group), rows in ds.iter_row_groups(columns=columns):
                mine = ((shard_offset + shard) if by_shard else unit_number) % world == rank
                unit_number += 1
                train = pc.equal(rows.column("split"), split)
                train = train.to_numpy(zero_copy_only=False)
                if not train.any():
                    continue
                positions = np.flatnonzero(train).astype(np.int32)
                if several:
                    keys = _star_hashes(rows.column("key").take(pa.array(positions)).to_pylist())
                    new = ~np.isin(keys, earlier_keys)
                    self.repeated += int((~new).sum())
                    positions, keys = positions[new], keys[new]
                    this_keys.append(keys)
                    if not len(positions):
                        continue
                if latent_per_star:
                    star = pc.if_else(pc.is_null(rows.column("star_id")), rows.column("object_id"), rows.column("star_id"))
                    star_keys.append(_star_hashes(star.take(pa.array(positions)).to_pylist()))
                products = rows.column("product").take(pa.array(positions)).to_numpy(zero_copy_only=False)
                pixels = rows.column("n_pixels").take(pa.array(positions)).to_numpy()
                ordinals = ordinal + np.arange(len(positions), dtype=np.int32)
                ordinal += len(positions)
                for name in np.unique(products):
                    pick = products == name
                    unit = _Unit(d, shard, group, positions[pick], ordinals[pick])
                    seen[name] = seen.get(name, 0) + int(pick.sum())
                    taken = sample_units.setdefault(name, [])
                    if sum(len(u.positions) for u in taken) < instrument_sample:
                        taken.append(unit)
                    if mine:
                        units.setdefault(name, []).append(unit)
                        n_pixels[name] = max(n_pixels.get(name, 0), int(pixels[pick].max()))
            shard_offset += len(ds.manifest["shards"])
            if several and this_keys:
                earlier_keys = np.union1d(earlier_keys, np.concatenate(this_keys))
        if latent_per_star and star_keys:  # one latent row per star, numbered in the order of their hashes
            hashes, rows_of = np.unique(np.concatenate(star_keys), return_inverse=True)
            self.n_total = len(hashes)
            rows_of = rows_of.astype(np.int32)
            del star_keys, hashes
        else:
            rows_of, self.n_total = None, ordinal
        for name in units:
            for unit in units[name]:
                unit.latents = rows_of[unit.latents] if rows_of is not None else unit.latents
        del rows_of
        release_freed_memory()

        samples = {name: self._read_sample(taken, instrument_sample) for name, taken in sorted(sample_units.items())}
        if instruments is None:
            instruments = {}
            for name, spectra in samples.items():
                stats = ProductStats(name)
                for s in spectra:
                    stats.add(s)
                instruments[name] = build_instrument(stats)
        self.instruments = instruments
        self.skipped = {p: n for p, n in seen.items() if p not in instruments}
        self.products: dict[str, StreamingProductData] = {}
        for name in sorted(units):
            if name not in instruments:
                continue
            inst = instruments[name]
            first = samples[name][0]
            segment_pixels = {inst.segment_names.index(seg.name): seg.n_pixels for seg in first.segments
                              if seg.name in inst.segment_names}
            buffer_rows = max(1, buffer_pixels // max(n_pixels[name], 1))
            self.products[name] = StreamingProductData(name, inst, units[name], n_pixels[name], segment_pixels,
                                                       buffer_rows, seed, self.datasets)
        self.n_spectra = sum(len(p) for p in self.products.values())
        del samples
        release_freed_memory()

    def _read_sample(self, units: list[_Unit], limit: int) -> list:
        """The first ``limit`` spectra of ``units`` (in order)."""
        import pyarrow as pa

        from stellarfield.data.store import batch_to_spectra

        spectra = []
        for unit in units:
            (_, rows), = self.datasets[unit.dataset].iter_row_groups([(unit.shard, unit.group)])
            spectra.extend(batch_to_spectra(rows.take(pa.array(unit.positions))))
            if len(spectra) >= limit:
                break
        return spectra[:limit]

    def __len__(self) -> int:
        return self.n_spectra

    def counts(self) -> dict[str, int]:
        return {name: len(p) for name, p in self.products.items()}

    def latent_rows(self) -> dict[str, torch.Tensor]:
        """The latent-table row of each of this rank's spectra, by product (what the prior is fitted to)."""
        return {name: torch.from_numpy(np.concatenate([np.asarray(u.latents) for u in p.units]) if p.units
                                       else np.zeros(0, np.int64)).long() for name, p in self.products.items()}

    def head(self, max_per_product: int) -> TrainingData:
        """The first ``max_per_product`` spectra of each product (this rank's, in dataset order) in
        memory, with their latent rows: a sample for what needs a :class:`TrainingData` (the prior
        of an objective without a latent table)."""
        spectra, latent_of = [], {}
        for product in self.products.values():
            taken = 0
            for unit in product.units:
                if taken >= max_per_product:
                    break
                chunk = self._read_sample([unit], max_per_product - taken)
                spectra += chunk
                latent_of.update((s.key, int(row)) for s, row in zip(chunk, unit.latents))
                taken += len(chunk)
        data = TrainingData(spectra, instruments=self.instruments)
        for product in data.products.values():
            product.index = torch.tensor([latent_of[key] for key in product.keys], dtype=torch.long)
        data.n_total = self.n_total
        return data
