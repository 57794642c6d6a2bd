"""Plots of spectra as astronomers look at them: one panel per segment, error band, masked pixels shaded."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from stellarfield.data.spectrum import Spectrum

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
        if spectrum.noise_known and (ivar > 0).any():
            sigma = np.where(ivar > 0, 1.0 / np.sqrt(np.maximum(ivar, 1e-30)), np.nan)
            ax.fill_between(w, shown - sigma, shown + sigma, color="tab:blue", alpha=0.3, lw=0, label="1-sigma")
        for a, b in _runs(~good):
            left = w[a] if a == 0 else 0.5 * (w[a - 1] + w[a])
            right = w[b - 1] if b == len(w) else 0.5 * (w[b - 1] + w[b])
            ax.axvspan(left, right, color="0.6", alpha=0.35, lw=0)
        if model is not None:
            ax.plot(w, np.asarray(model[i])[keep], lw=0.7, color="tab:red", label="model")
        finite = shown[np.isfinite(shown)]
        if finite.size:
            lo_y, hi_y = np.percentile(finite, [0.5, 99.5])
            pad = 0.08 * (hi_y - lo_y or 1.0)
            ax.set_ylim(lo_y - pad, hi_y + pad)
        ax.set_xlim(w[0], w[-1]) if w.size > 1 else None
        ax.set_ylabel(f"{seg.name}\nflux" + (f" [{spectrum.flux_unit}]" if spectrum.flux_unit else ""), fontsize=8)
        ax.tick_params(labelsize=8)
    axes[-1, 0].set_xlabel(f"vacuum wavelength [Angstrom], {spectrum.frame} frame")
    axes[0, 0].legend(loc="lower right", fontsize=7, frameon=False)
    fig.suptitle(title_for(spectrum) + "\n(grey: masked pixels)", fontsize=9)
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
