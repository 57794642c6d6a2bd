"""The benchmark's figures. Every function takes arrays (never a model) and writes a PNG/PDF.

* :func:`plot_residual_profile`: where in wavelength the residuals sit, stacked over stars
  (median and 16/84 band per wavelength bin), one curve per method (model, PCA, ...);
* :func:`plot_reconstructions`: real vs reconstructed spectra with residuals, plus zooms on lines;
* :func:`plot_gallery`: generated spectra stacked with offsets;
* :func:`plot_latent_projection`: the first two principal components of the latents, coloured by
  Teff and by instrument;
* :func:`plot_line_depths`: histograms of strong-line depths, generated over real.

Every panel's y range comes from the bulk of what it shows (0.5-99.5 percentiles plus a margin,
:func:`stellarfield.plotting.robust_ylim`), points beyond it are drawn as triangles at the edge
(:func:`stellarfield.plotting.mark_clipped`), legends sit outside the data area, and tick labels
are few and plain (:func:`stellarfield.plotting.readable_ticks`).

Figures are drawn with matplotlib's object API on the Agg canvas (``matplotlib.figure.Figure``),
so nothing here touches pyplot's global state or the interactive backend. Wavelengths are vacuum
Angstrom; the frame is whatever the arrays are in (say it in the title).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from stellarfield.eval.lines import STRONG_LINES, features_covered
from stellarfield.plotting import legend_outside, mark_clipped, readable_ticks, robust_ylim, set_robust_ylim

#: Colours for successive methods / instruments.
COLORS = ("tab:red", "tab:blue", "tab:green", "tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")


def _save(fig: Figure, out: str | Path | None) -> Figure:
    if out is not None:
        out = Path(out)
        if out.suffix.lower() not in (".png", ".pdf"):
            raise ValueError(f"{out}: plot output must end in .png or .pdf")
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=120)
    return fig


def _as_list(arrays) -> list[np.ndarray]:
    """A 2-D array or a sequence of 1-D arrays (ragged allowed) as a list of float arrays."""
    if isinstance(arrays, np.ndarray) and arrays.ndim == 1:
        return [arrays.astype(np.float64)]
    return [np.asarray(a, dtype=np.float64) for a in arrays]


def _clusters(wavelength: np.ndarray, gap_factor: float = 50.0) -> list[tuple[float, float]]:
    """Ranges of ``wavelength`` (sorted) separated by gaps wider than ``gap_factor`` median steps."""
    w = np.unique(wavelength[np.isfinite(wavelength)])
    if w.size < 2:
        return [(float(w[0]), float(w[0]))] if w.size else []
    step = np.diff(w)
    breaks = np.flatnonzero(step > gap_factor * np.median(step))
    starts = np.concatenate([[0], breaks + 1])
    ends = np.concatenate([breaks, [w.size - 1]])
    return [(float(w[a]), float(w[b])) for a, b in zip(starts, ends)]


def _with_gaps(wavelength: np.ndarray, *values: np.ndarray, gap_factor: float = 5.0):
    """Insert NaN where consecutive pixels are more than ``gap_factor`` median steps apart (no line across chips)."""
    w = np.asarray(wavelength, dtype=np.float64)
    if w.size < 3:
        return (w, *values)
    step = np.diff(w)
    cut = np.flatnonzero(step > gap_factor * np.median(step)) + 1
    return tuple(np.insert(np.asarray(v, dtype=np.float64), cut, np.nan) for v in (w, *values))


def binned_percentiles(
    wavelengths, values, bin_edges: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Median and 16/84 percentiles of all finite ``values`` pooled over spectra, per wavelength bin.

    ``wavelengths`` and ``values``: 2-D arrays or lists of 1-D arrays (one per spectrum, any grid).
    Returns ``(centres, p16, p50, p84, n)``; bins without values give NaN and n = 0.
    """
    w = np.concatenate([np.ravel(a) for a in _as_list(wavelengths)])
    v = np.concatenate([np.ravel(a) for a in _as_list(values)])
    ok = np.isfinite(w) & np.isfinite(v)
    w, v = w[ok], v[ok]
    index = np.digitize(w, bin_edges) - 1
    inside = (index >= 0) & (index < len(bin_edges) - 1)
    index, v = index[inside], v[inside]
    order = np.lexsort((v, index))  # by bin, then by value within a bin
    index, v = index[order], v[order]
    n_bins = len(bin_edges) - 1
    counts = np.bincount(index, minlength=n_bins)
    starts = np.cumsum(counts) - counts
    full = counts > 0

    def percentile(q: float) -> np.ndarray:
        """numpy's default ('linear') percentile of each bin, from the sorted values."""
        out = np.full(n_bins, np.nan)
        position = starts[full] + q / 100.0 * (counts[full] - 1)
        below = np.floor(position).astype(np.int64)
        above = np.minimum(below + 1, starts[full] + counts[full] - 1)
        out[full] = v[below] + (position - below) * (v[above] - v[below])
        return out

    centres = 0.5 * (bin_edges[1:] + bin_edges[:-1])
    return centres, percentile(16), percentile(50), percentile(84), counts


def plot_residual_profile(
    series: Mapping[str, tuple[object, object]],
    *,
    pixels_per_bin: int = 4,
    ylabel: str = "(data - model) / sigma",
    title: str = "",
    out: str | Path | None = None,
    panel_width: float = 11.0,
) -> Figure:
    """Residual versus wavelength stacked over stars, one curve (median, 16-84 band) per method.

    ``series`` maps a method name to ``(wavelengths, residuals)`` (2-D arrays or lists of 1-D
    arrays; NaN = not used). Bins are ``pixels_per_bin`` median pixel steps wide. Wavelength ranges
    separated by large gaps (APOGEE chips, GALAH CCDs) get their own panels.
    """
    star_waves = [np.ravel(a) for w, _ in series.values() for a in _as_list(w)]
    all_w = np.concatenate(star_waves)
    ranges = _clusters(all_w)
    fig = Figure(figsize=(panel_width, 0.9 + 2.3 * len(ranges)))
    axes = fig.subplots(len(ranges), 1, squeeze=False)[:, 0]
    for ax, (lo, hi) in zip(axes, ranges):
        # The typical pixel step of one star here (pooling stars on shifted grids would shrink it).
        steps = [np.median(np.diff(w[(w >= lo) & (w <= hi)])) for w in star_waves if ((w >= lo) & (w <= hi)).sum() > 1]
        step = float(np.median(steps)) if steps else max(hi - lo, 1.0)
        edges = np.arange(lo - 0.5 * step, hi + pixels_per_bin * step, pixels_per_bin * step)
        bands, medians = [], []
        for color, (name, (waves, resids)) in zip(COLORS, series.items()):
            centres, p16, p50, p84, _ = binned_percentiles(waves, resids, edges)
            ax.fill_between(centres, p16, p84, color=color, alpha=0.25, lw=0)
            ax.plot(centres, p50, color=color, lw=0.7, label=name)
            bands += [p16, p84]
            medians.append((centres, p50, color))
        ax.axhline(0.0, color="k", lw=0.5)
        limits = robust_ylim(*bands)
        if limits is not None:
            ax.set_ylim(*limits)
            for centres, p50, color in medians:
                mark_clipped(ax, centres, p50, limits, color=color)
        ax.set_xlim(lo, hi)
        ax.set_ylabel(ylabel, fontsize=8)
        readable_ticks(ax)
    legend_outside(axes[0])
    axes[-1].set_xlabel("vacuum wavelength [Angstrom]")
    fig.suptitle((title + "\n" if title else "") + "median and 16-84 percentile band over stars; "
                 "triangles: bins off the y scale", fontsize=9)
    fig.tight_layout()
    return _save(fig, out)


def _zoom_windows(wavelength: np.ndarray, max_windows: int) -> list[tuple[float, float]]:
    return [f.span for f in features_covered(wavelength[np.isfinite(wavelength)], STRONG_LINES)][:max_windows]


def plot_reconstructions(
    examples: Sequence[Mapping],
    *,
    zoom_windows: Sequence[tuple[float, float]] | None = None,
    max_zooms: int = 3,
    title: str = "",
    out: str | Path | None = None,
) -> Figure:
    """Real spectra, their reconstructions and residuals; zoom panels on lines at the right.

    Each example is a mapping with ``wavelength``, ``data`` and ``models`` (``{name: array}``, e.g.
    ``{"model": ..., "PCA": ...}``), optionally ``mask`` (True = good) and ``title``. Zoom windows
    default to the :data:`~stellarfield.eval.lines.STRONG_LINES` covered (at most ``max_zooms``).
    """
    n = len(examples)
    zooms_per = [
        list(zoom_windows) if zoom_windows is not None else _zoom_windows(np.asarray(e["wavelength"]), max_zooms)
        for e in examples
    ]
    n_cols = 1 + max([len(z) for z in zooms_per] + [0])
    fig = Figure(figsize=(4.0 + 3.0 * n_cols, 3.2 * n))
    grid = fig.add_gridspec(2 * n, n_cols, height_ratios=[3, 1] * n, width_ratios=[3] + [1] * (n_cols - 1))
    for row, (example, zooms) in enumerate(zip(examples, zooms_per)):
        w = np.asarray(example["wavelength"], dtype=np.float64)
        data = np.asarray(example["data"], dtype=np.float64)
        good = np.ones_like(w, dtype=bool) if example.get("mask") is None else np.asarray(example["mask"], dtype=bool)
        shown = np.where(good, data, np.nan)
        for col, window in enumerate([None] + list(zooms)):
            top = fig.add_subplot(grid[2 * row, col])
            bottom = fig.add_subplot(grid[2 * row + 1, col], sharex=top)
            keep = np.ones_like(w, dtype=bool) if window is None else (w >= window[0]) & (w <= window[1])
            top.plot(*_with_gaps(w[keep], shown[keep]), color="k", lw=0.6, label="data")
            top_series, bottom_series = [(w[keep], shown[keep], "k")], []
            for color, (name, model) in zip(COLORS, example["models"].items()):
                model = np.asarray(model, dtype=np.float64)
                top.plot(*_with_gaps(w[keep], model[keep]), color=color, lw=0.6, label=name)
                bottom.plot(*_with_gaps(w[keep], (shown - model)[keep]), color=color, lw=0.5)
                top_series.append((w[keep], model[keep], color))
                bottom_series.append((w[keep], (shown - model)[keep], color))
            bottom.axhline(0.0, color="k", lw=0.4)
            set_robust_ylim(top, top_series)
            set_robust_ylim(bottom, bottom_series)
            narrow = window is not None
            readable_ticks(top, x_bins=3 if narrow else 6, y_bins=4, labelsize=7)
            readable_ticks(bottom, x_bins=3 if narrow else 6, y_bins=3, labelsize=7)
            top.tick_params(labelbottom=False)
            if window is None:
                top.set_title(example.get("title", ""), fontsize=8, loc="left")
                top.set_ylabel("flux", fontsize=8)
                bottom.set_ylabel("data - model", fontsize=7)
            else:
                top.set_xlim(*window)
                top.set_title(f"{window[0]:.0f}-{window[1]:.0f} A", fontsize=7)
            if row == 0 and col == len(zooms):  # the legend right of the last panel of the first row
                legend_outside(top)
        if row == n - 1:
            bottom.set_xlabel("vacuum wavelength [Angstrom]", fontsize=8)
    fig.suptitle((title + "\n" if title else "") + "triangles: values off the y scale", fontsize=9)
    fig.tight_layout()
    return _save(fig, out)


#: Pixels a line's window must hold on a grid for :func:`plot_gallery` to zoom on it (Gaia XP's
#: ~20 A samples give 3: nothing to see).
MIN_ZOOM_PIXELS = 20


def _stack(ax, waves, spectra, offset: float, labels=None) -> None:
    """Spectra on ``ax`` shifted up by ``offset`` each, y limits from each spectrum's bulk (one
    spike cannot squash the stack; clipped points marked). The caller hides the y ticks (the offsets
    make them meaningless) after setting its tick locators."""
    shifted, lows, highs = [], [], []
    for i, (w, s) in enumerate(zip(waves, spectra)):
        color = COLORS[i % len(COLORS)]
        ax.plot(*_with_gaps(w, s + i * offset), lw=0.5, color=color)
        shifted.append((w, s + i * offset, color))
        limits = robust_ylim(s + i * offset)
        if limits is not None:
            lows.append(limits[0])
            highs.append(limits[1])
        if labels is not None:
            ax.text(w[-1], np.nanmedian(s) + i * offset, f" {labels[i]}", fontsize=6, va="center")
    if lows:
        ax.set_ylim(min(lows), max(highs))
        for w, y, color in shifted:
            mark_clipped(ax, w, y, (min(lows), max(highs)), color=color)


def plot_gallery(
    wavelength,
    spectra,
    *,
    labels: Sequence[str] | None = None,
    offset: float | None = None,
    zoom_windows: Sequence[tuple[float, float]] | None = None,
    max_zooms: int = 3,
    title: str = "",
    out: str | Path | None = None,
) -> Figure:
    """Spectra stacked with a vertical offset (e.g. generated stars of one instrument), the whole
    range on top and, below it, zooms on lines, where line shapes can be seen at all.

    ``wavelength``: one 1-D grid shared by all, or one per spectrum. ``offset`` defaults to the
    median over spectra of their 1-99 percentile range. ``zoom_windows`` (vacuum A) default to the
    :data:`~stellarfield.eval.lines.STRONG_LINES` the first grid covers with at least
    :data:`MIN_ZOOM_PIXELS` pixels (at most ``max_zooms``; none on Gaia XP's grid); ``[]``: none.
    """
    spectra = _as_list(spectra)
    waves = _as_list(wavelength)
    if len(waves) == 1:
        waves = waves * len(spectra)
    if offset is None:
        spans = [np.subtract(*np.nanpercentile(s, [99, 1])) for s in spectra if np.isfinite(s).any()]
        offset = float(np.median(spans)) if spans else 1.0
    if zoom_windows is None:
        first = waves[0] if waves else np.zeros(0)
        zoom_windows = [(lo, hi) for lo, hi in _zoom_windows(np.asarray(first, dtype=np.float64), len(STRONG_LINES))
                        if ((first >= lo) & (first <= hi)).sum() >= MIN_ZOOM_PIXELS][:max_zooms]
    zooms = list(zoom_windows)
    height = 1.2 + 0.6 * len(spectra)
    fig = Figure(figsize=(11.0, height * (1.6 if zooms else 1.0)))
    grid = fig.add_gridspec(2 if zooms else 1, max(len(zooms), 1), height_ratios=[1.6, 1] if zooms else [1])
    ax = fig.add_subplot(grid[0, :])
    _stack(ax, waves, spectra, offset, labels)
    readable_ticks(ax)
    ax.set_yticks([])
    ax.set_xlabel("vacuum wavelength [Angstrom]")
    ax.set_ylabel("flux + offset")
    for col, (lo, hi) in enumerate(zooms):
        zoom = fig.add_subplot(grid[1, col])
        inside = [(w >= lo) & (w <= hi) for w in waves]
        _stack(zoom, [w[k] for w, k in zip(waves, inside)], [s[k] for s, k in zip(spectra, inside)], offset)
        zoom.set_xlim(lo, hi)
        readable_ticks(zoom, x_bins=4, labelsize=7)
        zoom.set_yticks([])
        zoom.set_title(f"{lo:.0f}-{hi:.0f} A", fontsize=7)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, out)


def latent_projection(latents: np.ndarray) -> np.ndarray:
    """The first two principal components (N, 2) of latents (N, D): centred, SVD, projected."""
    z = np.asarray(latents, dtype=np.float64)
    z = z - z.mean(axis=0)
    _, _, vt = np.linalg.svd(z, full_matrices=False)
    return z @ vt[:2].T


def plot_latent_projection(
    latents: np.ndarray,
    teff: np.ndarray,
    instrument: Sequence[str],
    *,
    title: str = "",
    out: str | Path | None = None,
) -> Figure:
    """2-D PCA projection of latents, coloured by Teff (left; grey where unknown) and by instrument (right)."""
    xy = latent_projection(latents)
    teff = np.asarray(teff, dtype=np.float64)
    instrument = np.asarray(instrument)
    fig = Figure(figsize=(11.0, 4.8))
    left, right = fig.subplots(1, 2)
    known = np.isfinite(teff)
    left.scatter(xy[~known, 0], xy[~known, 1], s=3, color="0.75", lw=0, label="Teff unknown")
    points = left.scatter(xy[known, 0], xy[known, 1], c=teff[known], s=3, cmap="coolwarm_r", lw=0)
    fig.colorbar(points, ax=left, label="Teff [K]")
    for color, name in zip(COLORS * 3, sorted(set(instrument.tolist()))):
        sel = instrument == name
        right.scatter(xy[sel, 0], xy[sel, 1], s=3, color=color, lw=0, label=f"{name} ({sel.sum()})")
    legend_outside(right, markerscale=3)
    for ax in (left, right):
        ax.set_xlabel("latent PC 1")
        ax.set_ylabel("latent PC 2")
        readable_ticks(ax)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, out)


def plot_rv_differences(
    series: Mapping[str, tuple[np.ndarray, np.ndarray]],
    *,
    title: str = "",
    out: str | Path | None = None,
) -> Figure:
    """Fitted minus reference radial velocity (km/s) against the reference's S/N, one colour per product.

    ``series`` maps a name to ``(snr, difference_kms)``; pairs with a NaN are not drawn. The y axis
    is symmetric-log (linear within +-10 km/s) so catastrophic failures and km/s offsets both show.
    """
    fig = Figure(figsize=(7.5, 4.5))
    ax = fig.subplots()
    for color, (name, (snr, diff)) in zip(COLORS * 3, series.items()):
        snr, diff = np.asarray(snr, dtype=np.float64), np.asarray(diff, dtype=np.float64)
        ok = np.isfinite(snr) & np.isfinite(diff)
        ax.scatter(snr[ok], diff[ok], s=12, color=color, label=f"{name} ({ok.sum()})")
    ax.axhline(0.0, color="k", lw=0.5)
    ax.set_xscale("log")
    ax.set_yscale("symlog", linthresh=10.0)
    ax.set_xlabel("S/N (survey)")
    ax.set_ylabel("fitted - reference RV [km/s]")
    ax.tick_params(labelsize=8)
    legend_outside(ax)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, out)


def plot_line_depths(
    depths: Mapping[str, Mapping[str, Sequence[float]]],
    *,
    bins: int = 20,
    title: str = "",
    out: str | Path | None = None,
) -> Figure:
    """Histograms of line depths, generated overlaid on real, one panel per line.

    ``depths`` maps a line name to ``{"real": values, "generated": values}`` (NaN = not measured).
    Each panel's bins span the robust range of both sets together (:func:`~stellarfield.plotting.robust_ylim`:
    0.5-99.5 percentiles and their near tails; values beyond go to the
    edge bins, counted in the legend as 'off scale'); the histograms are densities, so sets of
    different sizes compare; the legend (outside the panel) gives n and the medians.
    """
    names = [name for name, d in depths.items()
             if any(np.isfinite(np.asarray(d.get(k, []), dtype=np.float64)).any() for k in ("real", "generated"))]
    n_panels = max(len(names), 1)
    n_cols = min(n_panels, 3)
    n_rows = int(np.ceil(n_panels / n_cols))
    fig = Figure(figsize=(4.6 * n_cols + 1.6, 2.8 * n_rows + 0.6))
    axes = fig.subplots(n_rows, n_cols, squeeze=False).ravel()
    for ax in axes[len(names):]:
        ax.set_axis_off()
    if not names:
        axes[0].text(0.5, 0.5, "no line measured", ha="center", va="center", transform=axes[0].transAxes)
    for ax, name in zip(axes, names):
        sets = {k: np.asarray(depths[name].get(k, []), dtype=np.float64) for k in ("real", "generated")}
        sets = {k: v[np.isfinite(v)] for k, v in sets.items()}
        limits = robust_ylim(*sets.values(), margin=0.02)  # the same robust range, used for the x axis
        lo, hi = limits if limits is not None else (0.0, 1.0)
        edges = np.linspace(lo, hi, bins + 1)
        for (kind, values), color, style in zip(sets.items(), ("k", "tab:red"), ("stepfilled", "step")):
            if not values.size:
                continue
            off = int(((values < lo) | (values > hi)).sum())
            label = f"{kind} (n={values.size}, median {np.median(values):.3g}" + (f", {off} off scale)" if off else ")")
            ax.hist(np.clip(values, lo, hi), bins=edges, density=True, histtype=style, color=color,
                    alpha=0.35 if style == "stepfilled" else 1.0, lw=1.2, label=label)
        ax.set_xlim(lo, hi)
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("depth 1 - min(f / continuum)", fontsize=8)
        ax.set_ylabel("density", fontsize=8)
        readable_ticks(ax, x_bins=5, y_bins=4)
        ax.legend(fontsize=6.5, frameon=False, loc="upper left", bbox_to_anchor=(0.0, -0.28), borderaxespad=0.0)
    fig.suptitle((title + "\n" if title else "") + "line depths: real (grey, filled) vs generated (red, line)",
                 fontsize=9)
    fig.tight_layout()
    return _save(fig, out)
