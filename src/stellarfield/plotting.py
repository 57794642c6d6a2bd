"""Plots of spectra as astronomers look at them: one panel per segment, error band, masked pixels shaded.

Also the helpers every figure of the package uses so that plots can be trusted at a glance:

* :func:`robust_ylim`: y limits from the 0.5-99.5 percentiles of the data (stretched to their
  near tails) plus a margin, so one cosmic ray or a bad pixel does not squash the spectrum into a
  flat line;
* :func:`mark_clipped`: the points outside those limits drawn as small triangles at the top
  (``^``) or bottom (``v``) edge of the panel, so nothing is hidden silently;
* :func:`legend_outside`: the legend to the right of the data area, never over the data;
* :func:`readable_ticks`: few tick labels, no offset notation (``+1.5e4``) on wavelength axes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from stellarfield.spectrum import Spectrum

#: Percentiles of the data that set a panel's y range, and the margin (fraction of that range) added.
Y_PERCENTILES = (0.5, 99.5)
Y_MARGIN = 0.08
#: How far beyond the percentile range (in units of its width) values still count as the bulk's tail.
Y_REACH = 0.5
#: gid of the clipped-point markers (tests and tools find them by it).
CLIPPED_ABOVE, CLIPPED_BELOW = "clipped-above", "clipped-below"


def robust_ylim(*arrays, percentiles=Y_PERCENTILES, margin: float = Y_MARGIN,
                reach: float = Y_REACH) -> tuple[float, float] | None:
    """``(low, high)`` y limits for all finite values of ``arrays``; None when there is none.

    The bulk is the ``percentiles`` range; it is stretched to take in the values lying within
    ``reach`` times its width beyond it (the tails: the deepest line cores stay in view), no
    further (a spike far from the bulk is left outside, to be marked by :func:`mark_clipped`),
    then widened by ``margin`` times the result on each side.
    """
    values = [np.ravel(np.asarray(a, dtype=np.float64)) for a in arrays if a is not None]
    values = np.concatenate(values) if values else np.zeros(0)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return None
    lo, hi = np.percentile(values, percentiles)
    span = hi - lo
    if not span > 0:
        span = abs(hi) * 0.1 if hi != 0 else 1.0
    lo = max(float(values.min()), lo - reach * span)
    hi = min(float(values.max()), hi + reach * span)
    span = hi - lo if hi > lo else span
    return float(lo - margin * span), float(hi + margin * span)


def mark_clipped(ax, x, y, ylim: tuple[float, float], color="k", size: float = 4.0) -> int:
    """Draw the points of ``(x, y)`` outside ``ylim`` as triangles at the panel's edge; return how many.

    Points above get ``^`` at the top edge, below ``v`` at the bottom (in axes coordinates, so they
    stay at the edge whatever the limits); the markers carry the gids :data:`CLIPPED_ABOVE` and
    :data:`CLIPPED_BELOW`.
    """
    from matplotlib.transforms import blended_transform_factory

    x = np.ravel(np.asarray(x, dtype=np.float64))
    y = np.ravel(np.asarray(y, dtype=np.float64))
    ok = np.isfinite(x) & np.isfinite(y)
    transform = blended_transform_factory(ax.transData, ax.transAxes)
    n = 0
    for side, marker, edge, gid in ((y > ylim[1], "^", 0.985, CLIPPED_ABOVE), (y < ylim[0], "v", 0.015, CLIPPED_BELOW)):
        side &= ok
        if side.any():
            ax.plot(x[side], np.full(int(side.sum()), edge), ls="none", marker=marker, ms=size, color=color,
                    mec="none", alpha=0.9, transform=transform, clip_on=False, gid=gid)
            n += int(side.sum())
    return n


def set_robust_ylim(ax, series, percentiles=Y_PERCENTILES, margin: float = Y_MARGIN, mark: bool = True) -> int:
    """Set ``ax``'s y limits from the values of ``series`` (``[(x, y, color), ...]``, robust to
    outliers, :func:`robust_ylim`) and mark the clipped points of each; return how many were clipped."""
    series = [(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64), c) for x, y, c in series]
    limits = robust_ylim(*[y for _, y, _ in series], percentiles=percentiles, margin=margin)
    if limits is None:
        return 0
    ax.set_ylim(*limits)
    return sum(mark_clipped(ax, x, y, limits, color=c) for x, y, c in series) if mark else 0


def legend_outside(ax, fontsize: float = 7, **kwargs):
    """The legend of ``ax`` to the right of its data area (``tight_layout`` makes room for it)."""
    handles, labels = ax.get_legend_handles_labels()
    if not handles:
        return None
    return ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0,
                     fontsize=fontsize, frameon=False, **kwargs)


def readable_ticks(ax, x_bins: int = 6, y_bins: int = 5, labelsize: float = 8) -> None:
    """At most ``x_bins`` / ``y_bins`` labelled ticks, plain numbers (no offset or scientific notation
    on linear axes), labels of ``labelsize`` points."""
    from matplotlib.ticker import MaxNLocator, ScalarFormatter

    for axis, bins, scale in ((ax.xaxis, x_bins, ax.get_xscale()), (ax.yaxis, y_bins, ax.get_yscale())):
        if scale != "linear":
            continue
        axis.set_major_locator(MaxNLocator(nbins=bins))
        formatter = axis.get_major_formatter()
        if isinstance(formatter, ScalarFormatter):
            formatter.set_useOffset(False)
    ax.tick_params(labelsize=labelsize)


LABEL_FORMATS = {
    "teff": ("Teff", "{:.0f} K"),
    "logg": ("logg", "{:.2f}"),
    "fe_h": ("[Fe/H]", "{:+.2f}"),
    "alpha_m": ("[a/M]", "{:+.2f}"),
    "rv_kms": ("RV", "{:+.1f} km/s"),
    "snr": ("S/N", "{:.0f}"),
}


def title_for(spectrum: Spectrum) -> str:
    """``product  object_id  (frame, normalisation)`` and the labels the source gives."""
    head = f"{spectrum.product}  {spectrum.object_id}"
    if spectrum.observation_id:
        head += f"  [{spectrum.observation_id}]"
    head += f"  ({spectrum.frame} frame, {spectrum.normalisation})"
    labels = [
        f"{name} = {fmt.format(spectrum.labels[key])}"
        for key, (name, fmt) in LABEL_FORMATS.items()
        if key in spectrum.labels and np.isfinite(spectrum.labels[key])
    ]
    return head + ("\n" + ",  ".join(labels) if labels else "")


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """(start, stop) index pairs of the True runs in a boolean array."""
    padded = np.concatenate([[False], mask, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return list(zip(edges[::2], edges[1::2]))


def plot_spectrum(
    spectrum: Spectrum,
    *,
    zoom: tuple[float, float] | None = None,
    model: Sequence[np.ndarray] | None = None,
    out: str | Path | None = None,
    panel_height: float = 2.2,
    width: float = 11.0,
):
    """Plot ``spectrum``; return the matplotlib Figure (and save it to ``out`` as PNG/PDF if given).

    Flux is drawn against vacuum wavelength (Angstrom) in the record's own frame, with the 1-sigma
    band where the noise is known, masked (bad) pixels shaded grey, one panel per segment.
    ``zoom=(lambda1, lambda2)`` keeps the segments overlapping that vacuum range and limits the x axis.
    ``model`` optionally overlays one array per segment (e.g. a fitted model).
    """
    import matplotlib

    if out is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    segments = list(enumerate(spectrum.segments))
    if zoom is not None:
        lo, hi = sorted(zoom)
        segments = [(i, s) for i, s in segments if s.wavelength[-1] >= lo and s.wavelength[0] <= hi]
        if not segments:
            ranges = ", ".join(f"{s.wavelength[0]:.1f}-{s.wavelength[-1]:.1f}" for s in spectrum.segments)
            raise ValueError(f"--zoom {lo:g} {hi:g} A lies outside every segment of {spectrum.key} ({ranges} A)")
    fig, axes = plt.subplots(len(segments), 1, figsize=(width, 0.8 + panel_height * len(segments)), squeeze=False)
    for ax, (i, seg) in zip(axes[:, 0], segments):
        w, f = seg.wavelength, seg.flux.astype(float)
        keep = np.ones_like(w, dtype=bool)
        if zoom is not None:
            keep = (w >= lo) & (w <= hi)
        w, f, ivar, good = w[keep], f[keep], seg.ivar[keep], seg.mask[keep]
        shown = np.where(good, f, np.nan)
        ax.plot(w, shown, lw=0.6, color="k", label="flux")
        series = [(w, shown, "k")]
        if spectrum.noise_known and (ivar > 0).any():
            sigma = np.where(ivar > 0, 1.0 / np.sqrt(np.maximum(ivar, 1e-30)), np.nan)
            ax.fill_between(w, shown - sigma, shown + sigma, color="tab:blue", alpha=0.3, lw=0, label="1-sigma")
        for a, b in _runs(~good):
            left = w[a] if a == 0 else 0.5 * (w[a - 1] + w[a])
            right = w[b - 1] if b == len(w) else 0.5 * (w[b - 1] + w[b])
            ax.axvspan(left, right, color="0.6", alpha=0.35, lw=0)
        if model is not None:
            model_values = np.asarray(model[i], dtype=np.float64)[keep]
            ax.plot(w, model_values, lw=0.7, color="tab:red", label="model")
            series.append((w, model_values, "tab:red"))
        # y range from the bulk of the good pixels (0.5-99.5 %): a spike is marked, not scaled to
        clipped = set_robust_ylim(ax, series)
        if clipped:
            ax.text(1.01, 0.0, f"{clipped} px off\nthe y scale\n(triangles)", transform=ax.transAxes, fontsize=7,
                    va="bottom", ha="left")
        ax.set_xlim(w[0], w[-1]) if w.size > 1 else None
        ax.set_ylabel(f"{seg.name}\nflux" + (f" [{spectrum.flux_unit}]" if spectrum.flux_unit else ""), fontsize=8)
        readable_ticks(ax)
    axes[-1, 0].set_xlabel(f"vacuum wavelength [Angstrom], {spectrum.frame} frame")
    legend_outside(axes[0, 0])
    fig.suptitle(title_for(spectrum) + "\n(grey: masked pixels; triangles: pixels off the y scale)", fontsize=9)
    fig.tight_layout()
    if out is not None:
        out = Path(out)
        if out.suffix.lower() not in (".png", ".pdf"):
            raise ValueError(f"{out}: plot output must end in .png or .pdf")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.stem}.tmp{out.suffix}")
        fig.savefig(tmp, dpi=130)
        tmp.replace(out)
        plt.close(fig)
    return fig
