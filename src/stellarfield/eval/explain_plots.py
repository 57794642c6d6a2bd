"""Figures of ``stellarfield explain`` (:mod:`stellarfield.eval.explain`): response maps, heat maps,
traversals and disentanglement. :func:`make_plots` returns the paths it wrote, relative to the
report folder (``plots/NAME.png``).

Figures are drawn with matplotlib's object API (``matplotlib.figure.Figure``, saved through the Agg
canvas), as in :mod:`.plots`: nothing here touches pyplot's global state or the user's backend, so
the figures can be drawn from any thread.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

#: Colours of the anchor stars (typical first).
ANCHOR_COLOURS = {"typical": "black", "cool dwarf": "tab:red", "solar": "tab:orange", "giant": "tab:purple",
                  "hot star": "tab:blue"}
#: Colours of any other anchor (the typical stars of the high-resolution products), in order.
OTHER_COLOURS = ("tab:brown", "tab:cyan", "tab:pink", "tab:olive", "tab:gray")  # green marks the lines


DPI = 100


def anchor_colour(name: str, index: int) -> str:
    return ANCHOR_COLOURS.get(name) or OTHER_COLOURS[index % len(OTHER_COLOURS)]


def _save(fig: Figure, path: Path) -> None:
    """Lay the figure out and write it (PNG, :data:`DPI`); a :class:`Figure` is not kept by pyplot,
    so nothing is left to close."""
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)


def robust_limits(values: np.ndarray, lo: float = 0.5, hi: float = 99.5, pad: float = 0.2) -> tuple[float, float]:
    """y-limits from percentiles of the finite values, padded; a flat curve gets a small range."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if not v.size:
        return -1.0, 1.0
    a, b = np.percentile(v, [lo, hi])
    span = b - a
    if span <= 0:
        span = max(abs(a), 1e-9)
    return float(a - pad * span), float(b + pad * span)


def panels_of(grid) -> list[tuple[str, np.ndarray]]:
    """(title, pixel rows) of the panels of a grid: one per segment or one for the whole grid."""
    if grid.per_segment_panels and len(grid.segment_names) > 1:
        return [(f"{grid.title} {name}", np.flatnonzero(grid.segment == k)) for k, name in enumerate(grid.segment_names)]
    return [(f"{grid.title} ({grid.instrument})", np.arange(len(grid.wavelength)))]


def _with_gaps(grid, rows: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x and y with NaN between segments (no line drawn across a chip gap)."""
    seg = grid.piece[rows]
    breaks = np.flatnonzero(np.diff(seg) != 0) + 1
    x = np.insert(grid.wavelength[rows], breaks, np.nan)
    y = np.insert(values, breaks, np.nan)
    return x, y


def _layout(n: int) -> tuple[int, int]:
    cols = min(4, n)
    return int(np.ceil(n / cols)), cols


def response_figure(path: Path, title: str, showcase, per_grid: dict, q: int, anchor_names: list[str],
                    ylabel: str, n_labels: int = 3) -> None:
    """One panel per window; a curve per anchor (relative response of direction ``q``); the lines
    with the largest |response| at the typical star labelled."""
    panels = [(grid, t, rows) for grid in showcase for t, rows in panels_of(grid)]
    nrow, ncol = _layout(len(panels))
    fig = Figure(figsize=(4.2 * ncol, 2.7 * nrow))
    axes = fig.subplots(nrow, ncol, squeeze=False)
    for ax, (grid, ptitle, rows) in zip(axes.flat, panels):
        data = per_grid[grid.instrument]
        values = []
        for s, name in enumerate(anchor_names):
            y = data["per_anchor"][s].relative[rows, q]
            values.append(y)
            x, yy = _with_gaps(grid, rows, y)
            ax.plot(x, yy, lw=1.0 if s == 0 else 0.6, color=anchor_colour(name, s), alpha=1.0 if s == 0 else 0.75,
                    label=name, zorder=3 if s == 0 else 2)
        lo, hi = robust_limits(np.concatenate(values))
        ax.set_ylim(lo, hi)
        ax.axhline(0, color="0.6", lw=0.5, zorder=1)
        # label the strongest lines at the typical star
        markers = data["markers"]
        typical = data["per_anchor"][0].relative[:, q]
        lam = grid.wavelength[rows]
        cand = []
        for line, lrows in zip(markers.lines, markers.line_rows):
            if lam[0] <= line["center"] <= lam[-1]:
                cand.append((float(np.abs(typical[lrows]).max()), line))
        cand.sort(key=lambda t: -t[0])
        for score, line in cand[:n_labels]:
            ax.axvline(line["center"], color="tab:green", lw=0.5, alpha=0.6, zorder=0)
            ax.annotate(line["label"], (line["center"], hi), xytext=(2, -2), textcoords="offset points", fontsize=6,
                        rotation=90, va="top", ha="left", color="tab:green")
        ax.set_title(ptitle, fontsize=8)
        ax.tick_params(labelsize=6)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    axes[0][0].set_ylabel(ylabel, fontsize=7)
    axes[0][0].legend(fontsize=6, loc="lower left")
    fig.suptitle(title, fontsize=10)
    _save(fig, path)


def heatmap_figure(path: Path, matrix: np.ndarray, rows: list[str], cols: list[str], title: str, cbar: str,
                   vmax: float = 3.0, center: bool = True) -> None:
    m = np.asarray(matrix, dtype=np.float64)
    fig = Figure(figsize=(max(4.0, 0.35 * len(cols) + 2.5), max(3.0, 0.22 * len(rows) + 1.5)))
    ax = fig.subplots()
    if center:
        im = ax.imshow(np.clip(m, -vmax, vmax), cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto")
    else:
        im = ax.imshow(m, cmap="viridis", vmin=0, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels(cols, rotation=90, fontsize=6)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(rows, fontsize=6)
    fig.colorbar(im, ax=ax, label=cbar)
    ax.set_title(title, fontsize=9)
    _save(fig, path)


def traversal_figure(path: Path, title: str, traversals: dict, qs: list[int]) -> None:
    """Rows: directions ``qs``; columns: windows; curves: the steps (-2 .. +2 sigma)."""
    windows = traversals["windows"]
    steps = traversals["steps"]
    names = traversals["names"]
    cmap = colormaps["coolwarm"]
    fig = Figure(figsize=(3.4 * len(windows), 1.6 * len(qs) + 0.8))
    axes = fig.subplots(len(qs), len(windows), squeeze=False)
    for i, q in enumerate(qs):
        for j, w in enumerate(windows):
            ax = axes[i][j]
            flux = w["flux"][q]
            seg = w["segment"]
            breaks = np.flatnonzero(np.diff(seg) != 0) + 1
            for t, step in enumerate(steps):
                x = np.insert(w["wavelength"], breaks, np.nan)
                y = np.insert(flux[t], breaks, np.nan)
                ax.plot(x, y, lw=0.7, color=cmap((step - steps[0]) / (steps[-1] - steps[0] or 1)),
                        label=f"{step:+g} sigma" if (i == 0 and j == 0) else None)
            ax.set_ylim(*robust_limits(flux, 0.1, 99.9, 0.05))
            ax.tick_params(labelsize=5)
            if i == 0:
                ax.set_title(w["title"], fontsize=7)
            if j == 0:
                ax.set_ylabel(names[q], fontsize=7)
    axes[0][0].legend(fontsize=5, loc="lower left")
    fig.suptitle(title, fontsize=9)
    _save(fig, path)


def disentanglement_figure(path: Path, dis: dict) -> None:
    labels = list(dis["labels"])
    if not labels:
        return
    pear = np.array([dis["pearson"][n] for n in labels], dtype=np.float64).T  # (D, L)
    mi = np.array([dis["mutual_information_nats"][n] for n in labels], dtype=np.float64).T
    D = pear.shape[0]
    fig = Figure(figsize=(12, max(3.5, 0.18 * D + 1.5)))
    axes = fig.subplots(1, 3)
    im = axes[0].imshow(pear, cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
    fig.colorbar(im, ax=axes[0], label="Pearson r")
    im = axes[1].imshow(mi, cmap="viridis", vmin=0, aspect="auto")
    fig.colorbar(im, ax=axes[1], label="mutual information (nats)")
    for ax, t in zip(axes[:2], ("correlation", "mutual information")):
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_yticks(range(D))
        ax.set_yticklabels([f"z{k}" for k in range(D)], fontsize=5)
        ax.set_title(t, fontsize=9)
    for n in labels:
        curve = dis["labels"][n].get("top_k_cv_r2")
        if curve:
            axes[2].plot(np.arange(1, len(curve) + 1), [np.nan if c is None else c for c in curve], marker=".", label=n)
    axes[2].set_xlabel("top-k latents (by |standardised ridge coefficient|)")
    axes[2].set_ylabel("CV R^2")
    axes[2].set_ylim(-0.05, 1.0)
    axes[2].legend(fontsize=7)
    axes[2].set_title("how many latents a label needs", fontsize=9)
    _save(fig, path)


def element_bars_figure(path: Path, entry: dict) -> None:
    """Per-element mean |line response| of each label direction on the APOGEE grid, relative to Fe."""
    per = entry.get("per_element_mean_abs_response") or {}
    if not per:
        return
    elements = sorted(next(iter(per.values())))
    fig = Figure(figsize=(7, 3))
    ax = fig.subplots()
    width = 0.8 / len(per)
    for i, (label, values) in enumerate(per.items()):
        fe = values.get("Fe") or 1.0
        ax.bar(np.arange(len(elements)) + i * width, [(values[e] or 0) / fe for e in elements], width, label=label)
    ax.axhline(1, color="0.5", lw=0.5)
    ax.set_xticks(np.arange(len(elements)) + 0.4 - width / 2)
    ax.set_xticklabels(elements, fontsize=7)
    ax.set_ylabel("mean |line response| / Fe's")
    ax.set_title(f"label directions on {entry['grid']}: response in each element's ASPCAP windows", fontsize=9)
    ax.legend(fontsize=7)
    _save(fig, path)


def make_plots(folder: Path, report: dict, per_grid: dict, showcase, anchor_names: list[str], label_names: list[str],
               traversals: dict, directions: dict, bars) -> list[str]:
    """Every figure; returns their paths relative to the report folder."""
    from stellarfield.eval.explain import LABEL_TITLES, LABEL_UNITS

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    D = report["model"]["latent_dim"]
    jobs = []
    for k in range(D):
        cls = report["latents"][k]["class"]
        jobs.append(("response", f"response_z{k:02d}.png", dict(
            title=f"latent z{k} ({cls}): d flux / dz{k} per 1 sigma, relative to the continuum", q=k,
            ylabel="d flux / continuum per sigma")))
    for i, n in enumerate(label_names):
        d = directions[n]
        jobs.append(("response", f"response_{n}.png", dict(
            title=f"{LABEL_TITLES.get(n, n)} direction (ridge on latents, n={d.n}): d flux / d label per "
                  f"{d.label_std:.3g} {LABEL_UNITS[n]} (1 sigma)", q=D + i, ylabel="d flux / continuum per label sigma")))
    for inst, el in report.get("elements", {}).items():
        if inst in report["showcase"].values():
            jobs.append(("heatmap", f"elements_{inst}.png", dict(
                matrix=np.log2(np.clip(np.array(el["ratio"], dtype=np.float64).T, 1e-3, None)), rows=el["directions"],
                cols=el["elements"], title=f"{inst}: element windows' share of line-response energy vs random directions",
                cbar="log2(share / random mean)")))
    for inst, f in report.get("features", {}).items():
        if inst in report["showcase"].values() and not report["grids"][inst]["high_resolution"]:
            dirs = [f"z{k}" for k in range(D)] + label_names
            jobs.append(("heatmap", f"features_{inst}.png", dict(
                matrix=np.log2(np.clip(np.array(f["ratio"], dtype=np.float64).T, 1e-3, None)), rows=dirs,
                cols=f["features"], title=f"{inst}: features' share of relative-response energy vs random directions",
                cbar="log2(share / random mean)")))
    if traversals["windows"]:
        for a in range(0, D, 8):
            qs = list(range(a, min(a + 8, D)))
            jobs.append(("traversal", f"traversal_z{qs[0]:02d}-z{qs[-1]:02d}.png", dict(
                title=f"latents z{qs[0]}-z{qs[-1]} from -2 to +2 sigma, the others at the typical star "
                      "(each spectrum / its median)", qs=qs)))
        if label_names:
            jobs.append(("traversal", "traversal_labels.png", dict(
                title="label directions from -2 to +2 label sigma at the typical star", qs=list(range(D, D + len(label_names))))))
    if report.get("disentanglement", {}).get("labels"):
        jobs.append(("disentanglement", "disentanglement.png", {}))
    apogee = report["label_directions"]["numbers"].get("apogee_alpha_to_fe_window_ratio")
    if apogee:
        jobs.append(("bars", "label_directions_apogee_elements.png", dict(entry=apogee)))

    written = []
    bar = bars.bar(len(jobs), "plot", "explain: plots")
    for kind, name, kw in jobs:
        path = folder / name
        if kind == "response":
            response_figure(path, kw["title"], showcase, per_grid, kw["q"], anchor_names, kw["ylabel"])
        elif kind == "heatmap":
            heatmap_figure(path, kw["matrix"], kw["rows"], kw["cols"], kw["title"], kw["cbar"])
        elif kind == "traversal":
            traversal_figure(path, kw["title"], traversals, kw["qs"])
        elif kind == "disentanglement":
            disentanglement_figure(path, report["disentanglement"])
        elif kind == "bars":
            element_bars_figure(path, kw["entry"])
        if path.exists():
            written.append(f"plots/{name}")
        bar.update(1)
    bar.close()
    return written
