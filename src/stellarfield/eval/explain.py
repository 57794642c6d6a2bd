"""``stellarfield explain``: read a trained model's latent space in terms of wavelengths, lines, elements and labels.

>>> from stellarfield.eval.explain import run_explain
>>> report = run_explain("reference", ["datasets/DS", "datasets/DEMO"], "reports/explain")   # doctest: +SKIP
>>> report["label_directions"]["numbers"]["apogee_alpha_to_fe_window_ratio"]                # doctest: +SKIP

Everything is measured on the decoder itself (:mod:`stellarfield.model.decoder`): the flux is
``[b(z), 1] @ phi(u)^T``, so the response of the spectrum to a latent direction ``v`` at a star
``z`` is ``d flux / dz . v = Phi_H (J_b(z) v)``, with ``J_b`` the Jacobian of the branch (autograd,
:func:`torch.func.jacrev`) and ``Phi_H`` the trunk basis blurred by an instrument's LSF and
rendered at its pixels (:class:`stellarfield.model.generate.RenderedBasis`, rest frame, ``v = 0``).
So every response is exact (no finite differences) and is rendered at every instrument's
resolution over its own wavelength range. Latent steps are in units of the latent prior's standard
deviation ``sigma_k`` (``LatentPrior.std``, the spread of the training latents): "latent k moves
by 1 sigma" is ``v = sigma_k e_k``.

Sections of ``explain.json`` (and ``explain.md``):

``anchors``
    The stars responses are taken at: the typical star (the prior's mean latent, the mean of the
    training latents), the typical star of each high-resolution family (the median latent of
    :data:`FAMILY_ANCHOR_SPECTRA` fitted train spectra of APOGEE and of GALAH: the prior's mean is
    dominated by Gaia XP, and the response is local) and stars across the HR diagram (cool dwarf,
    solar, giant, hot star): the train/validation star whose survey labels are nearest to each
    target (:data:`HR_TARGETS`), among the labelled stars fitted here.
``grids``
    One entry per instrument of the model: its resolution, range and what was measured on it.
    Pixels the model never saw are left out (APOGEE's chip gaps, :data:`APOGEE_CHIPS_A`; the
    instrument's telluric bands), and so is what the instrument's own continuum polynomial absorbs
    (:meth:`Grid.visible`). Responses ``r`` are split into a relative response ``r / c0`` (``c0``:
    the anchor's model flux smoothed by :data:`SMOOTH_LSF_SIGMAS` LSF sigmas, at least
    :data:`SMOOTH_MIN_KMS`), its continuum part ``C(r) / c0`` (the same smoothing ``C``) and its
    line part, the change of the continuum-normalised spectrum ``d (f / C f)`` (:func:`decompose`).
``latents``
    Per latent, at the typical star: rms response per grid, the fraction of the response energy in
    the continuum, the elements and lines it moves most, the optical features, and a class:
    ``single element: X`` / ``temperature features`` / ``continuum`` / ``mixed lines``
    (:func:`classify`).
``elements``
    On the high-resolution grids (APOGEE: ASPCAP DR12 element windows, weights as APOGEE's
    pipeline uses them; GALAH: line windows of the shipped GALAH DR3 lines, +-
    :data:`LINE_HALF_WIDTH_FWHM` LSF FWHM, hydrogen +- :data:`HYDROGEN_HALF_WIDTH_A`), the fraction
    of the line-response energy ``sum_X w r_l^2 / sum r_l^2`` that falls in each element's
    windows, for each latent and for :data:`N_RANDOM` random unit directions in (sigma-scaled)
    latent space; reported as the excess over the random directions' mean share, the ratio to it
    and a z-score against their spread (the baseline says how much energy an element's windows
    collect by their size and placement alone). Only lines visible in one of the anchors (depth >=
    :data:`MIN_LINE_DEPTH` below their surroundings) enter the windows and the line rankings. Lines
    are ranked by the change of their equivalent width (:func:`line_ew`; the change of the
    normalised flux at the line is reported too, :func:`line_scores`), blends closer than
    :data:`BLEND_FWHM` LSF FWHM counted once (:func:`blend_groups`).
``label_directions``
    Survey labels are never used in training. Here latents are fitted (:func:`stellarfield.model.fit.fit_spectra`)
    to the labelled train/validation stars of the datasets (Gaia XP with APOGEE DR17 labels,
    MILES, LAMOST, STELIB, ...), and a ridge regression (standardised latents, a free offset per
    source, regularisation by 5-fold CV) predicts each label: ``y = w . z + b_source``. The
    direction in latent space along which the label changes, ``a = Sigma w / (w^T Sigma w)``
    (``Sigma``: the within-source covariance of the fitted latents; the regression's "activation
    pattern", Haufe et al. 2014, NeuroImage 87, 96; ``w . a = 1``) is that of one label alone: it
    carries whatever co-varies with the label among the stars (the marginal pattern, ``--label-patterns
    marginal``). By default each label's pattern is taken with the other labels held
    (:func:`conditional_patterns`: ``z ~ A y + c_source`` over the stars with every label, the
    columns of ``A``), so the [alpha/M] direction is not minus the [Fe/H] one. The pattern gives
    ``d flux / d label = d flux / dz . a`` by the chain rule, rendered on every grid, also those whose stars have no labels
    (the [alpha/M] direction learned from Gaia XP latents at APOGEE and GALAH resolution). Numbers:
    on the APOGEE grid the ratio of the mean |r_l| in the alpha-element windows (Mg, Si, Ca, Ti, O)
    to that in the Fe windows, for the [alpha/M] and [Fe/H] directions (and the random directions'
    distribution of it); in GALAH's windows the rank of H-alpha among the lines the Teff direction
    moves, and the response of low- vs high-excitation neutral lines; the sign of the metal lines'
    response to each direction; each at every anchor.
``traversals``
    Spectra generated while one latent (or a label direction) moves from -2 to +2 sigma, the others
    held at the typical star, on chosen windows (:data:`TRAVERSAL_WINDOWS`), each divided by its
    median there; plotted, with the rms change per window in the JSON.
``disentanglement``
    Pearson and Spearman correlation and mutual information (equal-frequency bins, Miller-Madow
    corrected, nats) between every latent and every label, within each source, averaged; the MIG
    (gap between the two most informative latents over the label's entropy); and how many latents
    a ridge needs to reach 90% / 95% of the all-latent cross-validated R^2, latents added by
    forward selection (:func:`forward_selection`) and by the size of their standardised coefficient.

Reference tables (``stellarfield/reference_data``, see its README for sources and licences):
``galah_dr3_lines.csv``, ``aspcap_dr12_windows.csv``, ``spectral_features.csv``.

Budget: under 10 minutes on 2 CPU cores for the reference model with the shared datasets; the
latent fits of the labelled stars dominate (``max_per_product`` caps them; tqdm bars with rates).
"""

from __future__ import annotations

import csv
import math
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib.resources import files
from pathlib import Path

import numpy as np
import torch

from stellarfield.eval.probes import _fold_indices, _ridge_solve
from stellarfield.eval.report_text import format_number as _f
from stellarfield.eval.report_text import markdown_table
from stellarfield.physics.doppler import C_KMS
from stellarfield.physics.lsf import FWHM_PER_SIGMA

# --- choices (documented in the module docstring and the report) ------------------------------
#: Labels explained, their units and the range of values the label directions are fitted on (the
#: hottest MILES stars, 40,000 K, would otherwise dominate a linear fit of FGKM stars).
LABELS = ("teff", "logg", "fe_h", "alpha_m")
LABEL_TITLES = {"teff": "Teff", "logg": "log g", "fe_h": "[Fe/H]", "alpha_m": "[alpha/M]"}
LABEL_UNITS = {"teff": "K", "logg": "dex", "fe_h": "dex", "alpha_m": "dex"}
LABEL_FIT_RANGE = {"teff": (3000.0, 8000.0), "logg": (-0.5, 5.5), "fe_h": (-3.0, 1.0), "alpha_m": (-0.5, 1.0)}
#: Targets for the anchors across the HR diagram (label values; the nearest labelled star is used).
HR_TARGETS = {
    "cool dwarf": {"teff": 4000.0, "logg": 4.7, "fe_h": 0.0},
    "solar": {"teff": 5777.0, "logg": 4.44, "fe_h": 0.0},
    "giant": {"teff": 4700.0, "logg": 2.5, "fe_h": 0.0},
    "hot star": {"teff": 9500.0, "logg": 4.0, "fe_h": 0.0},
}
TYPICAL = "typical"
#: Instrument families: key, title, products in order of preference, one panel per segment?
FAMILIES = (
    ("apogee", "APOGEE H band", ("apogee_apstar", "apogee_aspcapstar", "apogee_apvisit"), False),
    ("galah", "GALAH", ("galah_dr3", "galah_dr4", "galah_pipeline6", "galah_dr3_observed"), True),
    ("miles", "MILES", ("miles",), False),
    ("lamost_lrs", "LAMOST LRS", ("lamost_lrs",), False),
    ("stelib", "STELIB", ("stelib",), False),
    ("lamost_mrs", "LAMOST MRS", ("lamost_mrs",), True),
    ("gaia_xp", "Gaia XP", ("gaia_xp",), False),
)
#: Alpha elements of the APOGEE window ratio.
ALPHA_ELEMENTS = ("Mg", "Si", "Ca", "Ti", "O")
#: Continuum smoothing: a Gaussian of max(SMOOTH_LSF_SIGMAS LSF sigma, SMOOTH_MIN_KMS) (in velocity).
SMOOTH_LSF_SIGMAS = 100.0
SMOOTH_MIN_KMS = 1000.0
#: Grids at or above this resolving power get lines and element windows; the others features only.
HIGH_RESOLUTION = 10_000.0
#: Half-width of a line's window in LSF FWHM (metals) and in A (hydrogen, whose wings are wide).
LINE_HALF_WIDTH_FWHM = 0.75
HYDROGEN_HALF_WIDTH_A = 10.0
#: A hydrogen line's response is measured Lick-like (as eval/lines.py measures H-alpha): the mean
#: relative response over +-HYDROGEN_HALF_WIDTH_A minus the mean over flanks this far (A) on
#: either side; metal lines closer than HYDROGEN_CORE_A to a hydrogen line sit in its core and are
#: not ranked.
HYDROGEN_FLANKS_A = (20.0, 35.0)
HYDROGEN_CORE_A = 1.5
#: A line enters the windows and rankings when its depth below the smoothed continuum reaches this
#: in at least one anchor star (the model's own spectrum says which lines are there).
MIN_LINE_DEPTH = 0.02
#: Random unit directions of the baseline.
N_RANDOM = 512
#: Classification thresholds (see :func:`classify`).
CONTINUUM_FRACTION, CONTINUUM_Z, CONTINUUM_MIN_RESOLUTION = 0.5, 1.0, 500.0
FEATURE_RATIO = 1.5
ELEMENT_RATIO, ELEMENT_Z, ELEMENT_DOMINANCE = 2.0, 3.0, 1.5
#: Excitation split of the Teff-direction line comparison (neutral metal lines), eV.
LOW_EXCITATION_EV, HIGH_EXCITATION_EV = 2.0, 3.5
#: Traversal steps (sigma) and windows: (title, family, (lo, hi) vacuum A or None for the whole grid).
TRAVERSAL_STEPS = (-2.0, -1.0, 0.0, 1.0, 2.0)
TRAVERSAL_WINDOWS = (
    ("APOGEE Mg I 15740-15770", "apogee", (15735.0, 15775.0)),
    ("GALAH H-alpha", "galah", (6545.0, 6585.0)),
    ("GALAH O I triplet", "galah", (7768.0, 7784.0)),
    ("optical", ("miles", "lamost_lrs", "stelib"), None),
    ("Gaia XP", "gaia_xp", None),
)
#: Defaults of a run.
DEFAULT_MAX_PER_PRODUCT = 1500
DEFAULT_REFINE_STEPS = 60


class ExplainInputError(ValueError):
    """Inputs explain cannot work with (no grid, no data, ...); the message says what is missing."""


# --- reference tables --------------------------------------------------------------------------
def _table_path(name: str) -> Path:
    return Path(str(files("stellarfield").joinpath("reference_data", name)))


def _read_csv(name: str) -> list[dict]:
    with open(_table_path(name), newline="") as f:
        return list(csv.DictReader(f))


@dataclass(frozen=True)
class LineList:
    """Atomic lines (vacuum A): the shipped GALAH DR3 subset."""

    wavelength: np.ndarray
    species: np.ndarray
    element: np.ndarray
    log_gf: np.ndarray
    e_lower: np.ndarray

    def __len__(self) -> int:
        return len(self.wavelength)


@lru_cache(maxsize=1)
def load_lines() -> LineList:
    """The shipped GALAH DR3 line subset (``reference_data/galah_dr3_lines.csv``)."""
    rows = _read_csv("galah_dr3_lines.csv")
    return LineList(
        np.array([float(r["wavelength_vacuum_A"]) for r in rows]),
        np.array([r["species"] for r in rows]),
        np.array([r["element"] for r in rows]),
        np.array([float(r["log_gf"]) for r in rows]),
        np.array([float(r["E_lower_eV"]) for r in rows]),
    )


#: The apStar grid: pixel i is at 10**(APSTAR_LOG0 + APSTAR_DLOG i) vacuum A, 8575 pixels.
APSTAR_LOG0, APSTAR_DLOG, APSTAR_N = 4.179, 6e-6, 8575
#: APOGEE's three detectors where ASPCAP has data (the 7214-pixel grid of ASPCAP / The Payne: apStar
#: pixels 322-3241, 3648-6047, 6412-8305), vacuum A; outside them (the chip gaps, the ends) the model
#: was never constrained, and responses there are not read.
APOGEE_CHIPS_A = ((15168.13, 15792.33), (15881.37, 16416.56), (16499.54, 16936.75))


#: ASPCAP weights below this fraction of the element's largest are dropped: the filters taper to
#: 1e-8 over long stretches; what is left carries over 98.8% of every element's total weight.
WINDOW_MIN_WEIGHT = 0.01


@lru_cache(maxsize=2)
def load_aspcap_windows(raw: bool = False) -> dict[str, np.ndarray]:
    """ASPCAP DR12 element windows: ``{element: weights on the 8575-pixel apStar grid}``, weights
    below :data:`WINDOW_MIN_WEIGHT` of the element's largest set to 0 (unless ``raw``)."""
    out: dict[str, np.ndarray] = {}
    for r in _read_csv("aspcap_dr12_windows.csv"):
        w = out.setdefault(r["element"], np.zeros(APSTAR_N))
        w[int(r["apstar_pixel"])] = float(r["weight"])
    if not raw:
        for w in out.values():
            w[w < WINDOW_MIN_WEIGHT * w.max()] = 0.0
    return out


def apstar_wavelength() -> np.ndarray:
    return 10 ** (APSTAR_LOG0 + APSTAR_DLOG * np.arange(APSTAR_N))


@lru_cache(maxsize=1)
def aspcap_window_runs() -> list[dict]:
    """Each element's windows as contiguous runs of apStar pixels: element, lo, hi, centre (weighted), weight sum."""
    lam = apstar_wavelength()
    runs = []
    for element, w in load_aspcap_windows().items():
        on = np.flatnonzero(w > 0)
        if not on.size:
            continue
        breaks = np.flatnonzero(np.diff(on) > 1)
        for a, b in zip(np.r_[0, breaks + 1], np.r_[breaks, on.size - 1]):
            idx = on[a: b + 1]
            runs.append(dict(element=element, lo=float(lam[idx[0]]), hi=float(lam[idx[-1]]),
                             center=float((lam[idx] * w[idx]).sum() / w[idx].sum()), weight=float(w[idx].sum())))
    return sorted(runs, key=lambda r: r["center"])


@lru_cache(maxsize=1)
def load_features() -> list[dict]:
    """Hydrogen lines, molecular bands and strong atomic blends (``reference_data/spectral_features.csv``)."""
    rows = _read_csv("spectral_features.csv")
    for r in rows:
        for k in ("lo_vacuum_A", "hi_vacuum_A", "center_vacuum_A"):
            r[k] = float(r[k])
    return rows


# --- grids: the trunk rendered at an instrument's pixels --------------------------------------
@dataclass
class Grid:
    """One instrument's native pixels (rest frame), with its blurred basis there."""

    instrument: str
    family: str
    title: str
    per_segment_panels: bool
    resolution: float
    wavelength: np.ndarray  # (P,) vacuum A
    segment: np.ndarray  # (P,) int, the instrument's segment
    segment_names: list[str]
    fwhm_A: np.ndarray  # (P,) LSF FWHM
    basis: np.ndarray  # (P, H + 1) float64
    smooth_kms: float
    continuum_degree: int = -1  # the instrument's multiplicative continuum (Legendre degree per segment; -1: none)
    piece: np.ndarray | None = None  # (P,) int: contiguous runs of pixels (segments split at masked bands)

    def __post_init__(self):
        if self.piece is None:
            self.piece = np.asarray(self.segment).copy()

    @property
    def high_resolution(self) -> bool:
        return self.resolution >= HIGH_RESOLUTION

    def flux(self, coefficients: np.ndarray) -> np.ndarray:
        """Model flux (S, P) for branch coefficients (S, H)."""
        return coefficients @ self.basis[:, :-1].T + self.basis[:, -1]

    def response(self, dcoefficients: np.ndarray) -> np.ndarray:
        """d flux (P, Q) for coefficient changes (H, Q)."""
        return self.basis[:, :-1] @ dcoefficients

    def smooth(self, values: np.ndarray) -> np.ndarray:
        """Gaussian smoothing of ``values`` (P, ...) along pixels, per segment, of ``smooth_kms``."""
        out = np.empty_like(values, dtype=np.float64)
        for k in np.unique(self.piece):
            rows = np.flatnonzero(self.piece == k)
            lam = self.wavelength[rows]
            du = float(np.median(np.diff(np.log(lam)))) if rows.size > 1 else 1.0
            out[rows] = smooth_rows(values[rows], self.smooth_kms / C_KMS / max(du, 1e-12))
        return out

    def visible(self, flux0: np.ndarray, response: np.ndarray) -> np.ndarray:
        """``response`` (P, Q) without what the instrument's continuum absorbs: per segment, the least-
        squares fit of ``flux0 * Legendre_j(u)`` (j <= continuum_degree, u scaled to [-1, 1] over the
        segment) is removed, so a change of the spectrum's scale or (for degree >= 1) slope that
        the instrument's continuum polynomial would take up does not count as a response."""
        r = np.array(response, dtype=np.float64)
        if self.continuum_degree < 0:
            return r
        for k in range(len(self.segment_names)):
            rows = np.flatnonzero(self.segment == k)
            if rows.size <= self.continuum_degree + 1:
                continue
            u = np.log(self.wavelength[rows])
            x = 2 * (u - u[0]) / max(u[-1] - u[0], 1e-12) - 1
            design = np.polynomial.legendre.legvander(x, self.continuum_degree) * flux0[rows, None]
            coef, *_ = np.linalg.lstsq(design, r[rows], rcond=None)
            r[rows] -= design @ coef
        return r

    def pixel_width(self) -> np.ndarray:
        """Width of each pixel in A (the gradient of the wavelengths within each piece)."""
        out = np.empty(len(self.wavelength))
        for k in np.unique(self.piece):
            rows = np.flatnonzero(self.piece == k)
            out[rows] = np.gradient(self.wavelength[rows]) if rows.size > 1 else 0.0
        return out

    def covers(self, lo: float, hi: float) -> bool:
        """True when one contiguous piece of the grid holds [lo, hi]."""
        for k in np.unique(self.piece):
            lam = self.wavelength[self.piece == k]
            if lam.size and lam[0] <= lo and lam[-1] >= hi:
                return True
        return False

    def describe(self) -> dict:
        return {"instrument": self.instrument, "family": self.family, "title": self.title,
                "resolution": round(self.resolution, 1), "n_pixels": int(len(self.wavelength)),
                "wavelength_A": [float(self.wavelength.min()), float(self.wavelength.max())],
                "segments": self.segment_names, "smooth_kms": round(self.smooth_kms, 1),
                "continuum_degree_removed": self.continuum_degree, "high_resolution": self.high_resolution}


def smooth_rows(x: np.ndarray, sigma_pix: float) -> np.ndarray:
    """Approximately Gaussian smoothing along axis 0 (three box filters of matched variance,
    edges padded with the end values): O(n) whatever the width."""
    x = np.asarray(x, dtype=np.float64)
    if sigma_pix < 0.5 or len(x) < 3:
        return x.copy()
    width = int(round(math.sqrt(12.0 * sigma_pix**2 / 3.0 + 1.0)))
    width = max(1, min(width | 1, 2 * (len(x) // 2) - 1))  # odd, shorter than the segment
    half = width // 2
    y = x
    for _ in range(3):
        padded = np.concatenate([np.repeat(y[:1], half + 1, axis=0), y, np.repeat(y[-1:], half, axis=0)], axis=0)
        c = np.cumsum(padded, axis=0)
        y = (c[width:] - c[:-width]) / width
    return y


def family_of(instrument: str) -> tuple[str, str, bool]:
    """(family key, title, one panel per segment) of an instrument name."""
    for key, title, names, per_segment in FAMILIES:
        if instrument in names:
            return key, title, per_segment
    return instrument, instrument, False


def build_grid(model, instrument: str) -> Grid:
    """The rendered basis of ``instrument`` at its native pixels (treated as rest frame)."""
    from stellarfield.model.generate import RenderedBasis, resolve_grid

    inst, wavelengths, names, _ = resolve_grid(model, instrument=instrument)
    rendered = RenderedBasis.build(model, inst, wavelengths)
    lam = np.concatenate(wavelengths)
    seg = rendered.segment.numpy().astype(int)
    fwhm = np.empty(len(lam))
    for k, s in enumerate(inst.segments):
        rows = seg == k
        fwhm[rows] = FWHM_PER_SIGMA * (s.sigma * lam[rows] if s.scale == "log" else s.sigma)
    keep = inst.pixel_mask(lam)  # telluric bands the instrument masks in training
    in_h_band = (lam > APOGEE_CHIPS_A[0][0] - 100) & (lam < APOGEE_CHIPS_A[-1][1] + 100)
    on_chip = np.zeros(len(lam), dtype=bool)
    for lo, hi in APOGEE_CHIPS_A:
        on_chip |= (lam >= lo) & (lam <= hi)
    keep &= ~in_h_band | on_chip
    if not keep.any():
        raise ValueError(f"no pixel of {instrument} is usable")
    index = np.flatnonzero(keep)
    piece = np.cumsum(np.r_[0, (np.diff(index) > 1) | (np.diff(seg[index]) != 0)])
    resolution = C_KMS / (FWHM_PER_SIGMA * inst.sigma_kms)
    family, title, per_segment = family_of(instrument)
    smooth_kms = max(SMOOTH_LSF_SIGMAS * inst.sigma_kms, SMOOTH_MIN_KMS)
    return Grid(instrument, family, title, per_segment, float(resolution), lam[index], seg[index], list(names),
                fwhm[index], rendered.at_pixels.numpy().astype(np.float64)[index], float(smooth_kms),
                int(inst.continuum_degree), piece)


def showcase_grids(grids: dict[str, Grid]) -> list[Grid]:
    """One grid per family (the first product of the family's preference list the model has),
    then any other instrument: the grids plotted and reported as APOGEE, GALAH, ..."""
    chosen, seen = [], set()
    for key, _, names, _ in FAMILIES:
        for name in names:
            if name in grids:
                chosen.append(grids[name])
                seen.add(key)
                break
    for name, grid in grids.items():
        if grid.family not in seen and all(name not in names for _, _, names, _ in FAMILIES):
            chosen.append(grid)
            seen.add(grid.family)
    return chosen


# --- decoder derivatives -------------------------------------------------------------------------
def _decoder_device(model) -> torch.device:
    try:
        return next(model.decoder.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def coefficients_and_jacobians(model, latents: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Branch coefficients (S, H) and Jacobians d b / d z (S, H, D) at latents (S, D), by autograd."""
    dev = _decoder_device(model)
    z = torch.as_tensor(np.asarray(latents), dtype=torch.float32, device=dev)

    def branch(v):
        return model.decoder.coefficients(v[None])[0]

    coeffs, jacs = [], []
    for row in z:
        with torch.enable_grad():
            jac = torch.func.jacrev(branch)(row)
        with torch.no_grad():
            coeffs.append(branch(row).double().cpu().numpy())
        jacs.append(jac.detach().double().cpu().numpy())
    return np.stack(coeffs), np.stack(jacs)


@dataclass
class Decomposed:
    """Responses on one grid at one anchor (P, Q): relative ``r / c0``, its continuum part
    ``C(r) / c0`` and its line part, the change of the continuum-normalised spectrum
    ``d (f / C f) = r / c0 - (f0 / c0) C(r) / c0`` (``C``: the smoothing, linear)."""

    relative: np.ndarray
    continuum: np.ndarray
    lines: np.ndarray

    def continuum_fraction(self) -> np.ndarray:
        """``sum cont^2 / (sum cont^2 + sum lines^2)`` per direction (Q,)."""
        c, l = (self.continuum**2).sum(0), (self.lines**2).sum(0)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(c + l > 0, c / (c + l), np.nan)


def decompose(grid: Grid, flux0: np.ndarray, response: np.ndarray) -> Decomposed:
    """Split d flux (P, Q) at an anchor of model flux ``flux0`` (P,) (see the module docstring),
    after removing what the instrument's continuum absorbs (:meth:`Grid.visible`)."""
    r = grid.visible(flux0, response)
    c0 = grid.smooth(flux0)
    c0 = np.where(np.abs(c0) > 1e-12 * max(np.abs(c0).max(), 1e-30), c0, np.nan)
    n0 = np.nan_to_num(flux0 / c0)
    cont = np.nan_to_num(grid.smooth(r) / c0[:, None])
    relative = np.nan_to_num(r / c0[:, None])
    return Decomposed(relative, cont, relative - n0[:, None] * cont)


def line_depths(grid: Grid, flux: np.ndarray, wavelengths: np.ndarray) -> np.ndarray:
    """Depth ``1 - f / smooth(f)`` of model flux (P,) at each wavelength (NaN outside the grid's segments)."""
    rel = flux / grid.smooth(flux)
    out = np.full(len(wavelengths), np.nan)
    for k in np.unique(grid.piece):
        rows = np.flatnonzero(grid.piece == k)
        lam = grid.wavelength[rows]
        inside = (wavelengths >= lam[0]) & (wavelengths <= lam[-1])
        out[inside] = 1.0 - np.interp(wavelengths[inside], lam, rel[rows])
    return out


# --- markers: lines, windows, features on a grid --------------------------------------------------
@dataclass
class Markers:
    """What can be attributed on one grid: lines (with windows) and element / feature weights."""

    lines: list[dict]  # label, species, element, center, lo, hi, e_lower, kind, depth
    line_rows: list[np.ndarray]  # pixel rows of each line's window
    score_rows: list[np.ndarray]  # pixels and weights of each line's response (line_scores)
    score_weights: list[np.ndarray]
    score_on: list[str]  # "lines" (the line part of the response) or "relative" (hydrogen: continuum and all)
    ew_rows: list[np.ndarray]  # pixels and weights (A) of each line's equivalent-width change (line_ew)
    ew_weights: list[np.ndarray]
    elements: dict[str, np.ndarray]  # element -> weights (P,)
    features: dict[str, np.ndarray]  # feature name -> mask weights (P,)
    feature_kind: dict[str, str]
    group: np.ndarray | None = None  # (L,) blend group of each line (see blend_groups)


def _rows_between(grid: Grid, lo: float, hi: float) -> np.ndarray:
    """Pixel rows with lo <= lambda <= hi (at least the nearest pixel when the window is narrower)."""
    lam = grid.wavelength
    rows = np.flatnonzero((lam >= lo) & (lam <= hi))
    if rows.size == 0:
        centre = 0.5 * (lo + hi)
        i = int(np.argmin(np.abs(lam - centre)))
        if abs(lam[i] - centre) <= max(hi - lo, 2 * np.median(np.abs(np.diff(lam[max(i - 1, 0): i + 2])))):
            rows = np.array([i])
    return rows


def _centre_weights(grid: Grid, centre: float) -> tuple[np.ndarray, np.ndarray]:
    """Rows and weights of the linear interpolation at ``centre`` (within one segment)."""
    lam = grid.wavelength
    j = int(np.clip(np.searchsorted(lam, centre), 1, len(lam) - 1))
    if grid.piece[j] != grid.piece[j - 1] or not (lam[j - 1] <= centre <= lam[j]):
        i = int(np.argmin(np.abs(lam - centre)))
        return np.array([i]), np.array([1.0])
    t = (centre - lam[j - 1]) / (lam[j] - lam[j - 1])
    return np.array([j - 1, j]), np.array([1.0 - t, t])


#: The local pseudo-continuum of a metal line: pixels between its window and this many LSF FWHM.
LOCAL_BASELINE_FWHM = 3.0


def _local_line_weights(grid: Grid, centre: float, half: float) -> tuple[np.ndarray, np.ndarray]:
    """Rows and weights of ``value at the centre - mean over the local baseline`` (pixels between
    ``half`` and :data:`LOCAL_BASELINE_FWHM` FWHM from the centre, on the same piece of grid): a
    linear functional, so a line's response is the change of its depth below its surroundings
    (a metal line sitting on the wing of H-alpha does not inherit the wing's change)."""
    rows_c, w_c = _centre_weights(grid, centre)
    j = int(rows_c[0])
    reach = LOCAL_BASELINE_FWHM * grid.fwhm_A[j]
    lam = grid.wavelength
    ring = np.flatnonzero((np.abs(lam - centre) > half) & (np.abs(lam - centre) <= reach) & (grid.piece == grid.piece[j]))
    if not ring.size:
        return rows_c, w_c
    return np.concatenate([rows_c, ring]), np.concatenate([w_c, np.full(len(ring), -1.0 / len(ring))])


def build_markers(grid: Grid, anchor_flux: np.ndarray) -> Markers:
    """Lines (GALAH subset, ASPCAP windows, hydrogen/molecular features on high-resolution grids;
    features elsewhere) visible in at least one anchor (``anchor_flux`` (S, P)), and weights."""
    lines: list[dict] = []
    line_rows: list[np.ndarray] = []
    score_rows: list[np.ndarray] = []
    score_weights: list[np.ndarray] = []
    score_on: list[str] = []
    ew_rows: list[np.ndarray] = []
    ew_weights: list[np.ndarray] = []
    elements: dict[str, np.ndarray] = {}
    P = len(grid.wavelength)
    dlam = grid.pixel_width()

    def integral(rows, baseline=()):
        """EW weights: the pixel widths over ``rows`` minus their total spread over the baseline pixels."""
        w = dlam[rows]
        parts_r, parts_w = [rows], [w]
        for ring, share in baseline:
            if len(ring):
                parts_r.append(ring)
                parts_w.append(np.full(len(ring), -share * w.sum() / len(ring)))
        ew_rows.append(np.concatenate(parts_r))
        ew_weights.append(np.concatenate(parts_w))

    def uniform(rows):
        score_rows.append(rows)
        score_weights.append(np.full(len(rows), 1.0 / len(rows)))
        score_on.append("lines")
        integral(rows)

    metal_mask = np.zeros(P, dtype=bool)  # pixels in the windows of the visible metal lines (and APOGEE windows)

    def hydrogen(centre, rows):
        """Band minus flanks on the relative response, on the pixels free of visible metal lines
        (the hydrogen profile alone, interpolated under them); the band's mean of the line part
        when a flank is missing (a grid edge)."""
        lam = grid.wavelength
        d = np.abs(lam - centre)
        clean = lambda r: r[~metal_mask[r]] if (~metal_mask[r]).sum() >= 3 else r
        flanks = np.flatnonzero((d >= HYDROGEN_FLANKS_A[0]) & (d <= HYDROGEN_FLANKS_A[1]))
        blue, red = clean(flanks[lam[flanks] < centre]), clean(flanks[lam[flanks] > centre])
        band = clean(rows)
        if blue.size and red.size:
            width = float(dlam[rows].sum())
            score_rows.append(np.concatenate([band, blue, red]))
            score_weights.append(np.concatenate([np.full(len(band), 1.0 / len(band)), np.full(len(blue), -0.5 / len(blue)),
                                                 np.full(len(red), -0.5 / len(red))]))
            score_on.append("relative")
            ew_rows.append(score_rows[-1])
            ew_weights.append(width * score_weights[-1])
        else:
            uniform(rows)

    depth_of = lambda lam: np.nanmax(np.stack([line_depths(grid, f, lam) for f in anchor_flux]), axis=0)

    if grid.high_resolution:
        ll = load_lines()
        inside = np.array([grid.covers(w, w) for w in ll.wavelength]) if len(ll) else np.zeros(0, bool)
        idx = np.flatnonzero(inside)
        norm = anchor_flux / np.stack([grid.smooth(f) for f in anchor_flux])  # (S, P) f / C f
        idx = np.array(sorted(idx, key=lambda i: ll.element[i] == "H"), dtype=int)  # metals first: H avoids them
        hydrogen_depth = depth_of(ll.wavelength[idx]) if idx.size else np.zeros(0)
        h_centres = np.array([w for w in ll.wavelength[ll.element == "H"]]
                             + [f["center_vacuum_A"] for f in load_features() if f["kind"] == "hydrogen"])
        for i, d_h in zip(idx, hydrogen_depth):
            c = float(ll.wavelength[i])
            j = int(np.argmin(np.abs(grid.wavelength - c)))
            is_h = ll.element[i] == "H"
            if not is_h and h_centres.size and np.abs(h_centres - c).min() < HYDROGEN_CORE_A:
                continue  # in a hydrogen line's core
            half = HYDROGEN_HALF_WIDTH_A if is_h else LINE_HALF_WIDTH_FWHM * grid.fwhm_A[j]
            rows = _rows_between(grid, c - half, c + half)
            if not rows.size:
                continue
            if is_h:  # wings and core, depth below the continuum
                d = d_h
            else:  # the centre against the local pseudo-continuum around the line
                rr, ww = _local_line_weights(grid, c, half)
                d = float(np.max(-(norm[:, rr] @ ww)))
            if not (d >= MIN_LINE_DEPTH):
                continue
            lines.append(dict(label=f"{ll.species[i]} {c:.2f}", species=str(ll.species[i]), element=str(ll.element[i]),
                              center=c, lo=c - half, hi=c + half, e_lower=float(ll.e_lower[i]),
                              log_gf=float(ll.log_gf[i]), kind="hydrogen" if is_h else "atomic",
                              depth=float(d), source="GALAH DR3"))
            line_rows.append(rows)
            if is_h:
                hydrogen(c, rows)
            else:
                score_rows.append(rr)
                score_weights.append(ww)
                score_on.append("lines")
                integral(rows, [(rr[ww < 0], 1.0)])
                metal_mask[rows] = True
            w = elements.setdefault(str(ll.element[i]), np.zeros(P))
            w[rows] = 1.0
        # ASPCAP element windows: weights interpolated from the apStar grid, runs as "lines"
        lam_ap = apstar_wavelength()
        if grid.wavelength.max() > lam_ap[0] and grid.wavelength.min() < lam_ap[-1]:
            for element, weights in load_aspcap_windows().items():
                w = np.interp(grid.wavelength, lam_ap, weights / weights.max(), left=0.0, right=0.0)
                if w.any():
                    elements[element] = np.maximum(elements.get(element, np.zeros(P)), w)
            runs = [r for r in aspcap_window_runs() if grid.covers(r["lo"], r["hi"])]
            depth = depth_of(np.array([r["center"] for r in runs])) if runs else []
            for r, d in zip(runs, depth):
                if not (d >= MIN_LINE_DEPTH):
                    continue
                rows = _rows_between(grid, r["lo"], r["hi"])
                if rows.size:
                    lines.append(dict(label=f"{r['element']} {r['center']:.1f} (ASPCAP)", species=r["element"],
                                      element=r["element"], center=r["center"], lo=r["lo"], hi=r["hi"],
                                      e_lower=float("nan"), log_gf=float("nan"), kind="window", depth=float(d),
                                      source="ASPCAP DR12"))
                    line_rows.append(rows)
                    w = np.interp(grid.wavelength[rows], lam_ap, load_aspcap_windows()[r["element"]])
                    if w.sum() > 0:
                        score_rows.append(rows)
                        score_weights.append(w / w.sum())
                        score_on.append("lines")
                        integral(rows)
                    else:
                        uniform(rows)
                    metal_mask[rows] = True
    features: dict[str, np.ndarray] = {}
    kinds: dict[str, str] = {}
    have_hydrogen = {round(l["center"]) for l in lines if l["element"] == "H"}
    resolved = grid.resolution >= CONTINUUM_MIN_RESOLUTION  # Gaia XP (R ~ 50) resolves no line or band
    for f in load_features() if resolved else ():
        if not grid.covers(f["lo_vacuum_A"], f["hi_vacuum_A"]):
            continue
        rows = _rows_between(grid, f["lo_vacuum_A"], f["hi_vacuum_A"])
        if rows.size < 2 and not grid.high_resolution:
            continue
        m = np.zeros(P)
        m[rows] = 1.0
        features[f["name"]] = m
        kinds[f["name"]] = f["kind"]
        if grid.high_resolution and (f["kind"] == "atomic" or round(f["center_vacuum_A"]) in have_hydrogen):
            continue  # atomic lines and H lines of the line list are there already
        if grid.high_resolution and f["kind"] == "hydrogen":
            w = elements.setdefault("H", np.zeros(P))
            w[rows] = 1.0
        lines.append(dict(label=f["name"], species=f["species"], element=f["element"], center=f["center_vacuum_A"],
                          lo=f["lo_vacuum_A"], hi=f["hi_vacuum_A"], e_lower=float("nan"), log_gf=float("nan"),
                          kind=f["kind"], depth=float("nan"), source=f["source"]))
        line_rows.append(rows)
        if grid.high_resolution and f["kind"] == "hydrogen":
            hydrogen(f["center_vacuum_A"], rows)
        else:
            uniform(rows)
    markers = Markers(lines, line_rows, score_rows, score_weights, score_on, ew_rows, ew_weights, elements, features,
                      kinds)
    markers.group = blend_groups(grid, lines)
    return markers


#: Lines whose centres lie within this many LSF FWHM of a group's first line are one blend.
BLEND_FWHM = 0.5


def blend_groups(grid: Grid, lines: list[dict]) -> np.ndarray:
    """A group number per line: lines (not features) closer than :data:`BLEND_FWHM` LSF FWHM
    are unresolved at the grid's resolution and are ranked as one blend."""
    group = np.full(len(lines), -1)
    order = sorted((i for i, l in enumerate(lines) if l["kind"] in ("atomic", "hydrogen", "window")),
                   key=lambda i: lines[i]["center"])
    next_group, first = 0, None
    for i in order:
        c = lines[i]["center"]
        j = int(np.argmin(np.abs(grid.wavelength - c)))
        if first is None or c - first > BLEND_FWHM * grid.fwhm_A[j]:
            first, current = c, next_group
            next_group += 1
        group[i] = current
    for i in range(len(lines)):
        if group[i] < 0:
            group[i] = next_group
            next_group += 1
    return group


# --- attribution -------------------------------------------------------------------------------------
def energy_fractions(weights: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``sum_p w_ep v_pq^2 / sum_p v_pq^2``: (E, P) weights, (P, Q) responses -> (E, Q)."""
    sq = values**2
    total = sq.sum(axis=0)
    return (weights @ sq) / np.where(total > 0, total, np.nan)


def random_directions(dim: int, n: int, seed: int = 0) -> np.ndarray:
    """``n`` random unit vectors (dim, n), isotropic."""
    u = np.random.default_rng(seed).standard_normal((dim, n))
    return u / np.linalg.norm(u, axis=0, keepdims=True)


@dataclass
class Baseline:
    """Mean and standard deviation of a statistic over random directions."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def of(cls, values: np.ndarray) -> "Baseline":
        return cls(np.nanmean(values, axis=-1), np.nanstd(values, axis=-1))

    def ratio(self, value: np.ndarray) -> np.ndarray:
        m = self.mean if np.ndim(value) < 2 else self.mean[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            return value / m

    def z(self, value: np.ndarray) -> np.ndarray:
        m, s = (self.mean, self.std) if np.ndim(value) < 2 else (self.mean[:, None], self.std[:, None])
        with np.errstate(divide="ignore", invalid="ignore"):
            return (value - m) / np.where(s > 0, s, np.nan)


def line_scores(markers: Markers, dec: Decomposed) -> np.ndarray:
    """Per line (L, Q): the change of the continuum-normalised flux at the line, per unit of the
    direction: for atomic lines at the centre against the local pseudo-continuum
    (:func:`_local_line_weights`); for hydrogen lines on a high-resolution grid the mean relative
    response over +- :data:`HYDROGEN_HALF_WIDTH_A` (core and wings) minus that of flanks
    :data:`HYDROGEN_FLANKS_A` away, as a Lick index (the wings are broader than the continuum
    smoothing takes out); for features the mean of the line part over the band; for an APOGEE
    window its ASPCAP-weighted mean."""
    return _weighted_response(markers, markers.score_rows, markers.score_weights, dec)


def line_ew(markers: Markers, dec: Decomposed) -> np.ndarray:
    """Per line (L, Q): the change of its equivalent width, A per unit of the direction (positive:
    the line strengthens): minus the integral of the response over the line's window (atomic lines
    +- :data:`LINE_HALF_WIDTH_FWHM` FWHM, hydrogen +- :data:`HYDROGEN_HALF_WIDTH_A`, an APOGEE window's
    pixels, a feature's band) less the same width of its local baseline (the ring of
    :func:`_local_line_weights`, a hydrogen line's flanks), on the response :func:`line_scores` uses."""
    return -_weighted_response(markers, markers.ew_rows, markers.ew_weights, dec)


def _weighted_response(markers: Markers, rows_per_line: list[np.ndarray], weights_per_line: list[np.ndarray],
                       dec: Decomposed) -> np.ndarray:
    """Per line (L, Q): ``weights @ response[rows]``, on the relative response (``score_on`` "relative")
    or its line part."""
    out = np.zeros((len(markers.lines), dec.lines.shape[1]))
    for i, (rows, w, kind) in enumerate(zip(rows_per_line, weights_per_line, markers.score_on)):
        out[i] = w @ (dec.relative[rows] if kind == "relative" else dec.lines[rows])
    return out


def _best_of_groups(markers: Markers, scores: np.ndarray) -> dict[int, int]:
    """Per blend group, the member line with the largest |score|."""
    group = markers.group if markers.group is not None else np.arange(len(markers.lines))
    best: dict[int, int] = {}
    for i, g in enumerate(group):
        g = int(g)
        if g not in best or abs(scores[i]) > abs(scores[best[g]]):
            best[g] = i
    return best


def group_ranks(markers: Markers, scores: np.ndarray) -> tuple[np.ndarray, int]:
    """Rank (1 = largest |score|) of each line's blend group, and the number of groups."""
    group = markers.group if markers.group is not None else np.arange(len(markers.lines))
    best = _best_of_groups(markers, scores)
    order = sorted(best, key=lambda g: -abs(scores[best[g]]))
    rank_of = {g: r + 1 for r, g in enumerate(order)}
    return np.array([rank_of[int(g)] for g in group]), len(order)


def rank_lines(markers: Markers, scores: np.ndarray, top: int = 8, kinds: Sequence[str] | None = None,
               ew: np.ndarray | None = None) -> list[dict]:
    """The ``top`` lines (blend groups: the member with the largest |key|, the others named in
    ``blend``) by |key| (1-D over lines): the equivalent-width change ``ew`` where given, else
    ``scores`` (the change of the normalised flux at the line, reported as ``response``)."""
    group = markers.group if markers.group is not None else np.arange(len(markers.lines))
    key = scores if ew is None else ew
    best = _best_of_groups(markers, key)
    out = []
    for g in sorted(best, key=lambda g: -abs(key[best[g]])):
        i = best[g]
        line = markers.lines[i]
        if kinds is not None and line["kind"] not in kinds:
            continue
        others = [markers.lines[j]["label"] for j in np.flatnonzero(group == g) if j != i]
        label = line["label"] + (f" (+{', '.join(others[:2])}{', ...' if len(others) > 2 else ''})" if others else "")
        out.append({"line": label, "species": line["species"], "element": line["element"],
                    "wavelength_A": round(line["center"], 3), "response": float(scores[i]),
                    "d_ew_mA": None if ew is None else float(1000 * ew[i]),
                    "e_lower_eV": line["e_lower"], "kind": line["kind"], "blend": others})
        if len(out) >= top:
            break
    return out


def classify(continuum_fraction: float, continuum_z: float, feature_ratio: float, top_elements: list[dict]) -> str:
    """``single element: X`` when X, the element whose lines/windows take the largest excess share
    of the line-response energy over a random direction's (``top_elements`` is sorted by it), takes
    at least :data:`ELEMENT_RATIO` times a random direction's share at z >= :data:`ELEMENT_Z`, and
    an excess at least :data:`ELEMENT_DOMINANCE` times the next element's; else ``temperature features`` when
    hydrogen lines and molecular bands collect at least :data:`FEATURE_RATIO` times a random
    direction's share; else ``continuum`` when at least :data:`CONTINUUM_FRACTION` of the response
    energy is smooth (on the grids that see the continuum, :func:`continuum_grids`) and that
    fraction is at least :data:`CONTINUUM_Z` random-direction standard deviations above their mean;
    else ``mixed lines``."""
    top = top_elements[0] if top_elements else None
    if top and np.isfinite(top["ratio"]) and top["ratio"] >= ELEMENT_RATIO and top["z"] >= ELEMENT_Z:
        second = top_elements[1]["excess"] if len(top_elements) > 1 else 0.0
        if not (np.isfinite(second) and second * ELEMENT_DOMINANCE > top["excess"]):
            return f"single element: {top['element']}"
    if np.isfinite(feature_ratio) and feature_ratio >= FEATURE_RATIO:
        return "temperature features"
    if np.isfinite(continuum_fraction) and continuum_fraction >= CONTINUUM_FRACTION and \
            np.isfinite(continuum_z) and continuum_z >= CONTINUUM_Z:
        return "continuum"
    return "mixed lines"


def continuum_grids(showcase: list["Grid"]) -> list["Grid"]:
    """Grids on which a change of the continuum is seen: flux-calibrated (the instrument fits a
    scale only, continuum degree 0) and resolving lines (R >= :data:`CONTINUUM_MIN_RESOLUTION`),
    e.g. MILES; else every showcase grid but Gaia XP's."""
    chosen = [g for g in showcase if g.continuum_degree == 0 and g.resolution >= CONTINUUM_MIN_RESOLUTION]
    return chosen or [g for g in showcase if g.family != "gaia_xp"] or list(showcase)


# --- labels --------------------------------------------------------------------------------------
RIDGE_ALPHAS = tuple(10.0 ** np.arange(-6, 2.01, 0.5))
#: Sources (products) with fewer labelled stars than this are left out of a label's fit.
MIN_STARS_PER_SOURCE = 5


def _group_means(v: np.ndarray, groups: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Per row of ``v``, the mean of its group over ``rows`` (bool), the mean over ``rows`` for a group absent there."""
    out = np.empty_like(v, dtype=np.float64)
    overall = v[rows].mean(0)
    for g in np.unique(groups):
        mine = groups == g
        use = mine & rows
        out[mine] = v[use].mean(0) if use.any() else overall
    return out


def cv_r2(x: np.ndarray, y: np.ndarray, alpha: float, folds: np.ndarray,
          groups: np.ndarray | None = None) -> tuple[float, np.ndarray]:
    """Cross-validated within-source R^2 of a ridge at ``alpha`` (x standardised) with a free
    offset per group (source), the group means taken from the training folds; and the out-of-fold
    predictions. R^2 = 1 - sum (y - pred)^2 / sum (y - group mean)^2."""
    groups = np.zeros(len(y), dtype=int) if groups is None else np.asarray(groups)
    pred = np.empty(len(y))
    for f in np.unique(folds):
        tr, te = folds != f, folds == f
        xm, ym = _group_means(x, groups, tr), _group_means(y, groups, tr)
        w, _ = _ridge_solve(x[tr] - xm[tr], y[tr] - ym[tr], alpha)
        pred[te] = (x[te] - xm[te]) @ w + ym[te]
    everything = np.ones(len(y), dtype=bool)
    ss = ((y - _group_means(y, groups, everything)) ** 2).sum()
    return (1.0 - ((y - pred) ** 2).sum() / ss) if ss > 0 else float("nan"), pred


def choose_alpha(x: np.ndarray, y: np.ndarray, folds: np.ndarray, groups: np.ndarray | None = None,
                 alphas=RIDGE_ALPHAS) -> float:
    scores = [cv_r2(x, y, a, folds, groups)[0] for a in alphas]
    return float(alphas[int(np.nanargmax(scores))]) if np.isfinite(scores).any() else float(alphas[0])


@dataclass
class LabelDirection:
    """A label's ridge direction in latent space (latent units) and its pattern (dz per unit label)."""

    name: str
    gradient: np.ndarray  # (D,) d label / d z
    pattern: np.ndarray  # (D,) dz per unit label, gradient . pattern = 1
    label_std: float  # within-source standard deviation of the label
    label_mean: float
    alpha: float
    cv_r2: float
    cv_scatter: float
    n: int
    sources: dict[str, int]
    importance: np.ndarray  # (D,) |standardised coefficient|
    pattern_kind: str = "marginal"  # or "conditional" (other labels held: conditional_patterns)

    def to_dict(self) -> dict:
        return {"n": self.n, "sources": self.sources, "cv_r2_within_source": self.cv_r2, "pattern_kind": self.pattern_kind,
                "cv_robust_scatter": self.cv_scatter, "alpha": self.alpha, "label_mean": self.label_mean,
                "label_std_within_source": self.label_std, "unit": LABEL_UNITS.get(self.name, ""),
                "gradient_per_latent": self.gradient.tolist(), "pattern_per_unit_label": self.pattern.tolist(),
                "importance": self.importance.tolist()}


def _label_rows(name: str, latents: np.ndarray, y: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Rows used for a label: finite, in :data:`LABEL_FIT_RANGE`, of a source with enough such rows."""
    lo, hi = LABEL_FIT_RANGE.get(name, (-np.inf, np.inf))
    ok = np.isfinite(y) & (y >= lo) & (y <= hi) & np.isfinite(latents).all(axis=1)
    for g in np.unique(groups[ok]):
        mine = ok & (groups == g)
        if mine.sum() < MIN_STARS_PER_SOURCE:
            ok &= ~mine
    return ok


def _standardised(z: np.ndarray) -> np.ndarray:
    std = z.std(0)
    return (z - z.mean(0)) / np.where(std > 0, std, 1.0)


def fit_label_direction(name: str, latents: np.ndarray, y: np.ndarray, sources: Sequence[str] | None = None,
                        seed: int = 0, n_folds: int = 5) -> LabelDirection | None:
    """Ridge of label ``y`` (N,) on latents (N, D) with a free offset per source (sources with at
    least :data:`MIN_STARS_PER_SOURCE` stars; rows with finite y in :data:`LABEL_FIT_RANGE`), so
    the direction is what changes the label among the stars of one survey, not what separates
    surveys; alpha by 5-fold CV. The pattern ``Sigma w / (w^T Sigma w)`` uses the within-source
    covariance of the latents."""
    groups = np.asarray(sources if sources is not None else np.zeros(len(y), dtype=int)).astype(str)
    ok = _label_rows(name, latents, y, groups)
    if ok.sum() < max(10, n_folds * 2):
        return None
    z, y, groups = latents[ok].astype(np.float64), y[ok].astype(np.float64), groups[ok]
    std = z.std(0)
    std = np.where(std > 0, std, 1.0)
    x = (z - z.mean(0)) / std
    folds = _fold_indices(len(y), n_folds, seed)
    alpha = choose_alpha(x, y, folds, groups)
    r2, pred = cv_r2(x, y, alpha, folds, groups)
    resid = pred - y
    scatter = float(1.4826 * np.median(np.abs(resid - np.median(resid))))
    everything = np.ones(len(y), dtype=bool)
    xw = x - _group_means(x, groups, everything)
    yw = y - _group_means(y, groups, everything)
    w_std, _ = _ridge_solve(xw, yw, alpha)
    gradient = w_std / std
    zw = z - _group_means(z, groups, everything)
    cov = zw.T @ zw / max(len(zw) - 1, 1)
    s_w = cov @ gradient
    denom = float(gradient @ s_w)
    pattern = s_w / denom if denom > 0 else gradient / max(float(gradient @ gradient), 1e-30)
    counts: dict[str, int] = {}
    for g in groups:
        counts[str(g)] = counts.get(str(g), 0) + 1
    return LabelDirection(name, gradient, pattern, float(yw.std()), float(y.mean()), alpha, float(r2), scatter,
                          int(ok.sum()), counts, np.abs(w_std))


def conditional_patterns(latents: np.ndarray, labels: dict[str, np.ndarray], sources: Sequence[str] | None = None,
                         min_rows: int = 50) -> tuple[dict[str, np.ndarray], int]:
    """dz per unit of each label **with the other labels held**: the columns of ``A = C_zy C_yy^-1``,
    the least-squares fit ``z ~ A y + c_source`` on the rows where every label is usable
    (:func:`_label_rows`), within-source centred. With one label this is the marginal pattern of
    :func:`fit_label_direction` scaled to unit label; with several it separates labels that co-vary
    among the stars (in the Galaxy's disc [alpha/M] falls as [Fe/H] rises, so the marginal [alpha/M]
    pattern carries minus the [Fe/H] one). The multi-label form of Haufe et al. (2014)'s activation
    pattern. Returns ({label: (D,) pattern}, rows used); empty with fewer than ``min_rows`` rows."""
    names = list(labels)
    groups = np.asarray(sources if sources is not None else np.zeros(len(latents), dtype=int)).astype(str)
    ok = np.ones(len(latents), dtype=bool)
    for n in names:
        ok &= _label_rows(n, latents, np.asarray(labels[n], dtype=np.float64), groups)
    for g in np.unique(groups[ok]):  # sources left with too few complete rows add only noise
        if (ok & (groups == g)).sum() < MIN_STARS_PER_SOURCE:
            ok &= groups != g
    if ok.sum() < max(min_rows, len(names) + 2):
        return {}, int(ok.sum())
    z = latents[ok].astype(np.float64)
    y = np.stack([np.asarray(labels[n], dtype=np.float64)[ok] for n in names], axis=1)
    rows = np.ones(int(ok.sum()), dtype=bool)
    zw = z - _group_means(z, groups[ok], rows)
    yw = y - _group_means(y, groups[ok], rows)
    A = np.linalg.solve(yw.T @ yw, yw.T @ zw).T  # (D, L)
    return {n: A[:, j] for j, n in enumerate(names)}, int(ok.sum())


def top_k_curve(name: str, latents: np.ndarray, y: np.ndarray, order: np.ndarray, alpha: float,
                sources: Sequence[str] | None = None, seed: int = 0, n_folds: int = 5) -> list[float]:
    """CV within-source R^2 of ridges on the top-k latents (k = 1..D, in ``order``) at a fixed ``alpha``."""
    groups = np.asarray(sources if sources is not None else np.zeros(len(y), dtype=int)).astype(str)
    ok = _label_rows(name, latents, y, groups)
    x, y, groups = _standardised(latents[ok].astype(np.float64)), y[ok].astype(np.float64), groups[ok]
    folds = _fold_indices(len(y), n_folds, seed)
    return [float(cv_r2(x[:, order[:k]], y, alpha, folds, groups)[0]) for k in range(1, len(order) + 1)]


def forward_selection(name: str, latents: np.ndarray, y: np.ndarray, alpha: float,
                      sources: Sequence[str] | None = None, seed: int = 0, n_folds: int = 5) -> tuple[list[int], list[float]]:
    """Latents added one at a time, each time the one that most raises the CV within-source R^2 of
    the ridge (at ``alpha``): the order and the R^2 after each addition."""
    groups = np.asarray(sources if sources is not None else np.zeros(len(y), dtype=int)).astype(str)
    ok = _label_rows(name, latents, y, groups)
    x, y, groups = _standardised(latents[ok].astype(np.float64)), y[ok].astype(np.float64), groups[ok]
    folds = _fold_indices(len(y), n_folds, seed)
    chosen: list[int] = []
    curve: list[float] = []
    remaining = list(range(x.shape[1]))
    while remaining:
        scores = [cv_r2(x[:, chosen + [k]], y, alpha, folds, groups)[0] for k in remaining]
        best = int(np.nanargmax(scores)) if np.isfinite(scores).any() else 0
        chosen.append(remaining.pop(best))
        curve.append(float(scores[best]))
    return chosen, curve


def latents_needed(curve: Sequence[float], fraction: float) -> int | None:
    """Smallest k whose R^2 reaches ``fraction`` of the all-latent R^2 (None when that is not positive)."""
    full = curve[-1]
    if not np.isfinite(full) or full <= 0:
        return None
    for k, r2 in enumerate(curve, start=1):
        if np.isfinite(r2) and r2 >= fraction * full:
            return k
    return len(curve)


def _equal_frequency_bins(x: np.ndarray, bins: int) -> np.ndarray:
    ranks = np.argsort(np.argsort(x, kind="stable"), kind="stable")
    return (ranks * bins // len(x)).astype(int)


def mutual_information(x: np.ndarray, y: np.ndarray, bins: int | None = None) -> tuple[float, float]:
    """Mutual information (nats) of x and y from equal-frequency bins, Miller-Madow corrected (and
    floored at 0), and the binned entropy of y."""
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    n = len(x)
    if n < 20:
        return float("nan"), float("nan")
    bins = bins or int(np.clip(n // 50, 4, 16))
    bx, by = _equal_frequency_bins(x, bins), _equal_frequency_bins(y, bins)
    joint = np.zeros((bins, bins))
    np.add.at(joint, (bx, by), 1.0)
    p = joint / n
    px, py = p.sum(1), p.sum(0)
    nz = p > 0
    mi = float((p[nz] * np.log(p[nz] / (px[:, None] * py[None, :])[nz])).sum())
    mi -= (nz.sum() - (px > 0).sum() - (py > 0).sum() + 1) / (2.0 * n)
    hy = float(-(py[py > 0] * np.log(py[py > 0])).sum() + ((py > 0).sum() - 1) / (2.0 * n))
    return max(mi, 0.0), hy


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3 or np.ptp(a[ok]) == 0 or np.ptp(b[ok]) == 0:
        return float("nan")
    return float(spearmanr(a[ok], b[ok]).statistic)


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3 or np.ptp(a[ok]) == 0 or np.ptp(b[ok]) == 0:
        return float("nan")
    return float(np.corrcoef(a[ok], b[ok])[0, 1])


#: Sources with fewer stars with a label are left out of its correlations and mutual information.
MIN_STARS_FOR_DEPENDENCE = 50


def _dependence(z: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Pearson, Spearman and mutual information (D,) of each column of z with y; entropy of y."""
    D = z.shape[1]
    pear = np.array([_pearson(z[:, k], y) for k in range(D)])
    spear = np.array([_spearman(z[:, k], y) for k in range(D)])
    mis, hy = zip(*[mutual_information(z[:, k], y) for k in range(D)])
    hy = np.array(hy, dtype=float)
    return pear, spear, np.array(mis, dtype=float), float(np.nanmax(hy)) if np.isfinite(hy).any() else float("nan")


def disentanglement(latents: np.ndarray, labels: dict[str, np.ndarray], directions: dict[str, LabelDirection],
                    sources: Sequence[str] | None = None, seed: int = 0) -> dict:
    """Correlations, mutual information, MIG and top-k ridge curves (see the module docstring).

    Dependence is measured within each source (product) with at least
    :data:`MIN_STARS_FOR_DEPENDENCE` stars with the label and averaged over sources weighted by
    their stars (pooled over sources, a latent that only tells the surveys apart would seem to
    know every label in which the surveys' stars differ); all stars pooled when no source has enough."""
    groups = np.asarray(sources if sources is not None else np.zeros(len(latents), dtype=int)).astype(str)
    out: dict = {"labels": {}, "pearson": {}, "spearman": {}, "mutual_information_nats": {},
                 "gaussian_mi_nats": {}, "by_source": {}}
    for name, y in labels.items():
        ok = np.isfinite(y) & np.isfinite(latents).all(axis=1)
        if ok.sum() < 20:
            continue
        parts, per_source = [], {}
        for g in np.unique(groups[ok]):
            rows = ok & (groups == g)
            if rows.sum() >= MIN_STARS_FOR_DEPENDENCE:
                pear, spear, mis, hy = _dependence(latents[rows], y[rows])
                parts.append((int(rows.sum()), pear, spear, mis, hy))
                per_source[g] = {"n": int(rows.sum()), "pearson": pear.tolist(), "mutual_information_nats": mis.tolist()}
        if not parts:
            pear, spear, mis, hy = _dependence(latents[ok], y[ok])
            parts = [(int(ok.sum()), pear, spear, mis, hy)]
        weights = np.array([p[0] for p in parts], dtype=float)
        avg = lambda k: np.average(np.stack([np.nan_to_num(p[k]) for p in parts]), axis=0, weights=weights)
        pear, spear, mis = avg(1), avg(2), avg(3)
        hy = float(np.average([p[4] for p in parts], weights=weights))
        D = latents.shape[1]
        out["pearson"][name] = pear.tolist()
        out["spearman"][name] = spear.tolist()
        out["mutual_information_nats"][name] = mis.tolist()
        out["gaussian_mi_nats"][name] = [float(-0.5 * np.log(max(1 - r * r, 1e-12))) for r in pear]
        out["by_source"][name] = per_source
        order_mi = np.argsort(-mis)
        mig = float((mis[order_mi[0]] - mis[order_mi[1]]) / hy) if D > 1 and hy > 0 else float("nan")
        entry = {"n": int(sum(p[0] for p in parts)), "sources": sorted(per_source) or ["all (pooled)"],
                 "label_entropy_nats": hy, "mig": mig, "most_correlated_latent": int(np.argmax(np.abs(pear))),
                 "most_informative_latent": int(order_mi[0])}
        direction = directions.get(name)
        if direction is not None:
            order = np.argsort(-direction.importance, kind="stable")
            curve = top_k_curve(name, latents, y, order, direction.alpha, sources, seed)
            forward, forward_curve = forward_selection(name, latents, y, direction.alpha, sources, seed)
            entry.update({"importance_order": order.tolist(), "top_k_cv_r2": curve,
                          "latents_for_90pct_by_importance": latents_needed(curve, 0.90),
                          "latents_for_95pct_by_importance": latents_needed(curve, 0.95),
                          "forward_order": forward, "forward_cv_r2": forward_curve,
                          "latents_for_90pct": latents_needed(forward_curve, 0.90),
                          "latents_for_95pct": latents_needed(forward_curve, 0.95)})
        out["labels"][name] = entry
    return out


# --- labelled stars ----------------------------------------------------------------------------------
@dataclass
class Labelled:
    """Fitted latents of labelled train/validation stars."""

    keys: list[str]
    products: list[str]
    splits: list[str]
    latents: np.ndarray  # (N, D)
    labels: dict[str, np.ndarray]  # name -> (N,)
    chi2_nu: np.ndarray
    available: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.keys)


def select_labelled(datasets: Sequence[str | os.PathLike], max_per_product: int | None, seed: int = 0,
                    splits: Sequence[str] = ("train", "validation")) -> tuple[list, dict[str, int], dict[str, str]]:
    """Labelled spectra (any of :data:`LABELS` finite) of ``splits``, each key once (first dataset
    wins), at most ``max_per_product`` per product (a random subset drawn from the sorted keys).
    Returns the spectra, the number available per product and each chosen key's split."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from stellarfield.data.store import Dataset, batch_to_spectra

    stores = [Dataset(p) for p in datasets]
    owner: dict[str, int] = {}
    by_product: dict[str, list[str]] = {}
    for i, store in enumerate(stores):
        cols = ["key", "product"] + [f"label_{n}" for n in LABELS]
        t = store.table(cols, split=list(splits))
        has = np.zeros(t.num_rows, dtype=bool)
        for n in LABELS:
            v = t.column(f"label_{n}").to_numpy(zero_copy_only=False)
            has |= np.isfinite(np.asarray(v, dtype=np.float64))
        for key, product, ok in zip(t.column("key").to_pylist(), t.column("product").to_pylist(), has):
            if ok and key not in owner:
                owner[key] = i
                by_product.setdefault(product, []).append(key)
    rng = np.random.default_rng(seed)
    wanted: set[str] = set()
    available = {}
    for product in sorted(by_product):
        keys = sorted(by_product[product])
        available[product] = len(keys)
        if max_per_product is not None and len(keys) > max_per_product:
            keys = [keys[j] for j in sorted(rng.choice(len(keys), size=max_per_product, replace=False))]
        wanted.update(keys)
    spectra, split_of = [], {}
    for i, store in enumerate(stores):
        mine = pa.array(sorted(k for k in wanted if owner[k] == i), pa.string())
        if not len(mine):
            continue
        products = sorted({p for p, keys in by_product.items() if any(owner[k] == i for k in keys)})
        for batch in store.iter_batches(split=list(splits), products=products):
            batch = batch.filter(pc.is_in(batch.column("key"), value_set=mine))
            if batch.num_rows:
                split_of.update(zip(batch.column("key").to_pylist(), batch.column("split").to_pylist()))
                spectra.extend(batch_to_spectra(batch))
    return spectra, available, split_of


#: Families whose own typical star is an extra anchor: high-resolution spectra live where the
#: model saw such spectra, and the prior's mean (dominated by Gaia XP) may lie elsewhere.
FAMILY_ANCHORS = ("apogee", "galah")
#: Train spectra fitted to find a family's typical star (their median latent).
FAMILY_ANCHOR_SPECTRA = 32


def select_family_spectra(datasets: Sequence[str | os.PathLike], model, n: int = FAMILY_ANCHOR_SPECTRA, seed: int = 0,
                          families: Sequence[str] = FAMILY_ANCHORS) -> dict[str, list]:
    """Up to ``n`` train spectra (labelled or not) of the first product of each family the model
    knows and the datasets hold: ``{family: spectra}``, a random subset drawn from the sorted keys."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from stellarfield.data.store import Dataset, batch_to_spectra

    stores = [Dataset(p) for p in datasets]
    keys: dict[str, list[tuple[int, str]]] = {}
    for i, store in enumerate(stores):
        t = store.table(["key", "product"], split="train")
        for key, product in zip(t.column("key").to_pylist(), t.column("product").to_pylist()):
            keys.setdefault(product, []).append((i, key))
    rng = np.random.default_rng(seed)
    out: dict[str, list] = {}
    for key_f, _, names, _ in FAMILIES:
        if key_f not in families:
            continue
        product = next((p for p in names if p in model.instruments and keys.get(p)), None)
        if product is None:
            continue
        pool = sorted(set(keys[product]))
        chosen = [pool[j] for j in sorted(rng.choice(len(pool), size=min(n, len(pool)), replace=False))]
        spectra, seen = [], set()
        for i, store in enumerate(stores):
            mine = pa.array([k for d, k in chosen if d == i and k not in seen], pa.string())
            if not len(mine):
                continue
            for batch in store.iter_batches(split="train", products=[product]):
                batch = batch.filter(pc.is_in(batch.column("key"), value_set=mine))
                for s in batch_to_spectra(batch) if batch.num_rows else ():
                    if s.key not in seen:
                        seen.add(s.key)
                        spectra.append(s)
        if spectra:
            out[key_f] = spectra
    return out


def family_anchors(trained, family_spectra: dict[str, list], refine_steps: int, progress: bool,
                   batch: int | None = None) -> dict[str, tuple[np.ndarray, dict]]:
    """``{"typical <product>": (median latent, info)}`` of the fitted spectra of each family."""
    from stellarfield.model.fit import fit_spectra

    out = {}
    for family, spectra in family_spectra.items():
        table = fit_spectra(trained, spectra, refine_steps=refine_steps, batch=batch, keep_model_flux=False,
                            progress=progress)
        z = np.array([np.asarray(v, dtype=np.float64) for v in table.column("latent").to_pylist() if v is not None])
        if len(z):
            product = spectra[0].product
            out[f"typical {product}"] = (np.median(z, axis=0), {
                "source": f"median latent of {len(z)} fitted train spectra of {product}", "product": product,
                "n": int(len(z))})
    return out


def fit_labelled(trained, spectra: list, refine_steps: int, progress: bool, batch: int | None = None,
                 split_of: dict[str, str] | None = None) -> Labelled:
    """Latents of ``spectra`` by :func:`stellarfield.model.fit.fit_spectra`; spectra without a usable fit dropped."""
    from stellarfield.model.fit import fit_spectra

    if not spectra:
        return Labelled([], [], [], np.zeros((0, trained.model.latent_dim)), {n: np.zeros(0) for n in LABELS}, np.zeros(0))
    table = fit_spectra(trained, spectra, refine_steps=refine_steps, batch=batch, keep_model_flux=False,
                        progress=progress)
    rows = {r["key"]: r for r in table.select(["key", "latent", "chi2_nu"]).to_pylist()}
    keys, products, splits, lat, chi2 = [], [], [], [], []
    labels: dict[str, list[float]] = {n: [] for n in LABELS}
    for s in spectra:
        r = rows.get(s.key)
        if r is None or r["latent"] is None:
            continue
        keys.append(s.key)
        products.append(s.product)
        splits.append((split_of or {}).get(s.key, ""))
        lat.append(np.asarray(r["latent"], dtype=np.float64))
        chi2.append(np.nan if r["chi2_nu"] is None else r["chi2_nu"])
        for n in LABELS:
            labels[n].append(s.label(n))
    D = trained.model.latent_dim
    return Labelled(keys, products, splits, np.array(lat).reshape(-1, D), {n: np.array(v) for n, v in labels.items()},
                    np.array(chi2))


def choose_hr_stars(labelled: Labelled, targets: dict = HR_TARGETS) -> dict[str, int]:
    """Index of the labelled star nearest to each target (in log Teff / 0.02, log g / 0.25,
    [Fe/H] / 0.25; a missing [Fe/H] counts as 1), among stars whose fit is not among the worst 10%
    of their product; each star used once."""
    if not len(labelled):
        return {}
    teff, logg, feh = (labelled.labels[n] for n in ("teff", "logg", "fe_h"))
    good = np.isfinite(teff) & (teff > 0) & np.isfinite(logg) & np.isfinite(labelled.latents).all(axis=1)
    products = np.array(labelled.products)
    for p in np.unique(products):
        rows = products == p
        c = labelled.chi2_nu[rows]
        if np.isfinite(c).sum() >= 10:
            good[rows] &= ~(c > np.nanpercentile(c, 90))
    chosen: dict[str, int] = {}
    used: set[int] = set()
    for name, t in targets.items():
        d2 = (np.log10(np.where(teff > 0, teff, np.nan) / t["teff"]) / 0.02) ** 2 + ((logg - t["logg"]) / 0.25) ** 2
        d2 = d2 + np.where(np.isfinite(feh), ((feh - t.get("fe_h", 0.0)) / 0.25) ** 2, 1.0)
        d2 = np.where(good, d2, np.inf)
        if used:
            d2[list(used)] = np.inf
        if np.isfinite(d2).any():
            i = int(np.argmin(d2))
            chosen[name] = i
            used.add(i)
    return chosen


# --- the run -------------------------------------------------------------------------------------------
@dataclass
class ExplainOptions:
    max_per_product: int | None = DEFAULT_MAX_PER_PRODUCT
    refine_steps: int = DEFAULT_REFINE_STEPS
    n_random: int = N_RANDOM
    seed: int = 0
    plots: bool = True
    top_lines: int = 10
    top_elements: int = 5
    fit_batch: int | None = None  # spectra fitted together (None: by their pixels, inference.chunk_size)
    family_anchors: bool = True  # the typical APOGEE and GALAH stars as extra anchors (fits 32 spectra each)
    # label patterns: "conditional" (other labels held, conditional_patterns) or "marginal" (one label alone)
    label_patterns: str = "conditional"

    def __post_init__(self):
        if self.label_patterns not in ("conditional", "marginal"):
            raise ValueError(f"label_patterns must be 'conditional' or 'marginal', not {self.label_patterns!r}")


def _finite(x):
    """JSON-safe: NaN/inf -> None, numpy -> Python."""
    if isinstance(x, dict):
        return {str(k): _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    if isinstance(x, np.ndarray):
        return _finite(x.tolist())
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return x if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


class _Bars:
    def __init__(self, progress: bool):
        self.progress = progress

    def bar(self, total: int, unit: str, desc: str):
        from tqdm.auto import tqdm

        return tqdm(total=total, unit=unit, desc=desc, disable=not self.progress, dynamic_ncols=True)

    def say(self, text: str) -> None:
        if self.progress:
            from tqdm.auto import tqdm

            tqdm.write(text)


def explain_model(trained, labelled: Labelled | None = None, options: ExplainOptions | None = None,
                  progress: bool = False, out_dir: str | os.PathLike | None = None,
                  extra_anchors: dict[str, tuple[np.ndarray, dict]] | None = None) -> dict:
    """Every section of the report for a loaded model (``trained``: a TrainedModel, RunResult or
    StellarModel) and the fitted latents of labelled stars (None: no label sections, the typical
    star only). Plots go to ``out_dir/plots`` when ``out_dir`` is given and ``options.plots``."""
    from stellarfield.model.generate import as_trained

    options = options or ExplainOptions()
    trained = as_trained(trained)
    model = trained.model
    bars = _Bars(progress)
    timings: dict[str, float] = {}
    D = model.latent_dim
    labelled = labelled if labelled is not None and len(labelled) else None

    # --- anchors and scales ---
    t0 = time.perf_counter()
    prior = trained.prior
    if prior is not None:
        typical = prior.mean.detach().double().cpu().numpy()
        sigma = prior.std.detach().double().cpu().numpy()
        typical_source = "prior mean (mean of the training latents)"
    elif labelled is not None:
        typical = np.median(labelled.latents, axis=0)
        sigma = labelled.latents.std(axis=0)
        typical_source = "median latent of the fitted labelled stars (the model has no prior)"
    else:
        typical, sigma = np.zeros(D), np.ones(D)
        typical_source = "zero latent (no prior, no fitted stars)"
    sigma = np.where(sigma > 0, sigma, 1.0)
    anchor_names, anchor_z, anchor_info = [TYPICAL], [typical], [{"name": TYPICAL, "source": typical_source}]
    for name, (z, info) in (extra_anchors or {}).items():  # e.g. the typical star of a high-resolution product
        anchor_names.append(name)
        anchor_z.append(np.asarray(z, dtype=np.float64))
        anchor_info.append({"name": name, **info})
    if labelled is not None:
        for name, i in choose_hr_stars(labelled).items():
            anchor_names.append(name)
            anchor_z.append(labelled.latents[i])
            anchor_info.append({"name": name, "key": labelled.keys[i], "product": labelled.products[i],
                                "labels": {n: labelled.labels[n][i] for n in LABELS}, "chi2_nu": labelled.chi2_nu[i],
                                "target": HR_TARGETS[name]})
    anchor_z = np.array(anchor_z)
    coeffs, jacs = coefficients_and_jacobians(model, anchor_z)

    # --- label directions ---
    directions: dict[str, LabelDirection] = {}
    if labelled is not None:
        for n in LABELS:
            d = fit_label_direction(n, labelled.latents, labelled.labels[n], labelled.products, options.seed)
            if d is not None:
                directions[n] = d
        if options.label_patterns == "conditional" and len(directions) > 1:
            patterns, _ = conditional_patterns(labelled.latents, {n: labelled.labels[n] for n in directions},
                                               labelled.products)
            for n, pattern in patterns.items():
                directions[n].pattern, directions[n].pattern_kind = pattern, "conditional"
    timings["anchors_and_directions_s"] = time.perf_counter() - t0

    # direction matrix in latent units (D, Q): latents (1 sigma), labels (1 label sigma), random
    latent_dirs = np.diag(sigma)
    label_names = list(directions)
    label_dirs = np.stack([directions[n].pattern * directions[n].label_std for n in label_names], axis=1) \
        if label_names else np.zeros((D, 0))
    rand = random_directions(D, options.n_random, options.seed) * sigma[:, None]
    Q_lat, Q_lab = D, len(label_names)

    # --- grids ---
    t0 = time.perf_counter()
    grids: dict[str, Grid] = {}
    bar = bars.bar(len(model.instruments), "grid", "explain: rendering grids")
    for name in model.instruments:
        try:
            grids[name] = build_grid(model, name)
        except ValueError as exc:  # no native grid recorded: nothing to render on
            bars.say(f"explain: {name}: skipped ({exc})")
        bar.update(1)
    bar.close()
    if not grids:
        raise ExplainInputError("the model has no instrument with a native grid to render responses on")
    timings["grids_s"] = time.perf_counter() - t0

    # --- responses and attribution per grid ---
    t0 = time.perf_counter()
    grid_reports: dict[str, dict] = {}
    per_grid: dict[str, dict] = {}
    bar = bars.bar(len(grids), "grid", "explain: responses and attribution")
    for name, grid in grids.items():
        flux = grid.flux(coeffs)  # (S, P)
        markers = build_markers(grid, flux)
        # typical star: latents, labels and random directions
        dirs = np.concatenate([latent_dirs, label_dirs, rand], axis=1)
        resp = grid.response(jacs[0] @ dirs)
        dec = decompose(grid, flux[0], resp)
        per_anchor = []
        for s in range(len(anchor_names)):
            r = grid.response(jacs[s] @ np.concatenate([latent_dirs, label_dirs], axis=1))
            per_anchor.append(decompose(grid, flux[s], r))
        g = _grid_attribution(grid, markers, dec, Q_lat, Q_lab, label_names, options)
        g["describe"] = grid.describe()
        grid_reports[name] = g
        per_grid[name] = {"grid": grid, "markers": markers, "flux": flux, "dec": dec, "per_anchor": per_anchor}
        bar.update(1)
    bar.close()
    timings["responses_s"] = time.perf_counter() - t0

    showcase = showcase_grids(grids)
    families = {g.family: g.instrument for g in showcase}

    # --- per-latent summary ---
    latents_report = []
    for k in range(D):
        latents_report.append(_latent_summary(k, showcase, grid_reports, options))

    # --- label-direction numbers ---
    numbers = _label_numbers(families, per_grid, grid_reports, label_names, Q_lat, anchor_names, options)

    # --- traversals ---
    t0 = time.perf_counter()
    traversals = _traversals(model, typical, latent_dirs, label_dirs, label_names, grids, families)
    timings["traversals_s"] = time.perf_counter() - t0

    # --- disentanglement ---
    t0 = time.perf_counter()
    dis = (disentanglement(labelled.latents, labelled.labels, directions, labelled.products, options.seed)
           if labelled is not None else {})
    consistency = _direction_consistency(labelled, directions, sigma, options.seed) if labelled is not None else {}
    timings["disentanglement_s"] = time.perf_counter() - t0

    report = {
        "model": {"latent_dim": D, "n_basis": int(coeffs.shape[1]), "instruments": sorted(model.instruments),
                  "sigma": sigma.tolist(), "typical": typical.tolist()},
        "anchors": anchor_info,
        "grids": {n: {**g["describe"], "n_lines": g["n_lines"]} for n, g in grid_reports.items()},
        "showcase": families,
        "latents": latents_report,
        "elements": {n: g["elements"] for n, g in grid_reports.items() if g.get("elements")},
        "features": {n: g["features"] for n, g in grid_reports.items() if g.get("features")},
        "label_directions": {"directions": {n: d.to_dict() for n, d in directions.items()},
                             "numbers": numbers, "consistency_between_sources": consistency,
                             "per_grid": {n: g["labels"] for n, g in grid_reports.items()}},
        "traversals": traversals["summary"],
        "disentanglement": dis,
        "labelled": ({"n": len(labelled), "by_product": _count(labelled.products),
                      "by_split": _count(labelled.splits), "available": labelled.available}
                     if labelled is not None else {"n": 0}),
        "options": {**options.__dict__},
        "timings": timings,
    }
    if out_dir is not None and options.plots:
        t0 = time.perf_counter()
        from stellarfield.eval import explain_plots

        report["plots"] = explain_plots.make_plots(Path(out_dir) / "plots", report, per_grid, showcase, anchor_names,
                                                   label_names, traversals, directions, bars)
        timings["plots_s"] = time.perf_counter() - t0
    return report


def _count(values) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


def _grid_attribution(grid: Grid, markers: Markers, dec: Decomposed, Q_lat: int, Q_lab: int,
                      label_names: list[str], options: ExplainOptions) -> dict:
    """Continuum fractions, element / feature energies against random directions, line rankings."""
    n_dir = Q_lat + Q_lab
    rel, lines = dec.relative, dec.lines
    cont_frac = dec.continuum_fraction()
    rms = np.sqrt((rel**2).mean(0))
    cf_base = Baseline.of(cont_frac[n_dir:])
    out: dict = {
        "rms_relative_response": rms[:n_dir].tolist(),
        "continuum_fraction": cont_frac[:n_dir].tolist(),
        "continuum_fraction_random": {"mean": float(cf_base.mean), "std": float(cf_base.std)},
        "rms_random": {"mean": float(np.mean(rms[n_dir:])), "std": float(np.std(rms[n_dir:]))},
        "n_lines": len(markers.lines),
    }
    scores = line_scores(markers, dec) if markers.lines else np.zeros((0, lines.shape[1]))
    out["_line_scores"] = scores
    if markers.elements:
        names = sorted(markers.elements)
        W = np.stack([markers.elements[n] for n in names])
        frac = energy_fractions(W, lines)
        base = Baseline.of(frac[:, n_dir:])
        ratio, z = base.ratio(frac[:, :n_dir]), base.z(frac[:, :n_dir])
        out["elements"] = {"elements": names, "n_pixels": [int((W[i] > 0).sum()) for i in range(len(names))],
                           "fraction": frac[:, :n_dir].tolist(), "ratio": ratio.tolist(), "z": z.tolist(),
                           "random_mean": base.mean.tolist(), "random_std": base.std.tolist(),
                           "directions": [f"z{k}" for k in range(Q_lat)] + label_names}
        # mean |r_l| in each element's windows (weighted), for every direction and random ones
        absmean = (W @ np.abs(lines)) / W.sum(1, keepdims=True)
        out["_element_absmean"] = (names, absmean)
    if markers.features and grid.resolution >= CONTINUUM_MIN_RESOLUTION:  # Gaia XP resolves no feature
        names = list(markers.features)
        F = np.stack([markers.features[n] for n in names])
        frac = energy_fractions(F, lines)  # the line part: the continuum's change taken out
        base = Baseline.of(frac[:, n_dir:])
        tmask = np.array([markers.feature_kind[n] in ("hydrogen", "molecular") for n in names])
        tfrac = energy_fractions(np.clip(F[tmask].sum(0, keepdims=True), 0, 1), lines) if tmask.any() else None
        out["features"] = {"features": names, "kinds": [markers.feature_kind[n] for n in names],
                           "fraction": frac[:, :n_dir].tolist(), "ratio": base.ratio(frac[:, :n_dir]).tolist(),
                           "z": base.z(frac[:, :n_dir]).tolist()}
        if tfrac is not None:
            tb = Baseline.of(tfrac[:, n_dir:])
            out["features"]["temperature_features"] = {
                "fraction": tfrac[0, :n_dir].tolist(), "ratio": tb.ratio(tfrac[:, :n_dir])[0].tolist(),
                "z": tb.z(tfrac[:, :n_dir])[0].tolist(), "random_mean": float(tb.mean[0]), "random_std": float(tb.std[0])}
    ews = line_ew(markers, dec) if markers.lines else np.zeros((0, lines.shape[1]))
    out["_line_ew"] = ews
    # lines each direction moves most: by the change of their equivalent width
    out["top_lines"] = [rank_lines(markers, scores[:, q], options.top_lines, ew=ews[:, q]) if len(scores) else []
                        for q in range(n_dir)]
    out["labels"] = {n: {"rms_relative_response": float(rms[Q_lat + i]), "continuum_fraction": float(cont_frac[Q_lat + i]),
                         "top_lines": out["top_lines"][Q_lat + i]} for i, n in enumerate(label_names)}
    return out


def _latent_summary(k: int, showcase: list[Grid], grid_reports: dict[str, dict], options: ExplainOptions) -> dict:
    entry: dict = {"latent": k, "grids": {}}
    cont_fracs, cont_z, feature_ratios, element_tables = [], [], [], []
    seeing_continuum = {g.instrument for g in continuum_grids(showcase)}
    for grid in showcase:
        g = grid_reports[grid.instrument]
        cf, base = g["continuum_fraction"][k], g["continuum_fraction_random"]
        e: dict = {"rms_relative_response": g["rms_relative_response"][k], "continuum_fraction": cf,
                   "continuum_fraction_z": (cf - base["mean"]) / base["std"] if base["std"] > 0 else float("nan")}
        if grid.instrument in seeing_continuum:
            cont_fracs.append(cf)
            cont_z.append(e["continuum_fraction_z"])
        if "elements" in g:
            el = g["elements"]
            table = []
            for i, name in enumerate(el["elements"]):
                table.append({"element": name, "fraction": el["fraction"][i][k], "ratio": el["ratio"][i][k],
                              "z": el["z"][i][k], "excess": el["fraction"][i][k] - el["random_mean"][i],
                              "grid": grid.instrument})
            table = [t for t in table if np.isfinite(t["ratio"]) and np.isfinite(t["excess"])]
            table.sort(key=lambda t: -t["excess"])
            e["top_elements"] = table[: options.top_elements]
            element_tables.append(table)
        if "features" in g:
            f = g["features"]
            ft = sorted(({"feature": n, "ratio": f["ratio"][i][k], "z": f["z"][i][k], "fraction": f["fraction"][i][k]}
                         for i, n in enumerate(f["features"])), key=lambda t: -np.nan_to_num(t["ratio"], nan=-1))
            e["top_features"] = ft[:3]
            if "temperature_features" in f and not grid.high_resolution:
                feature_ratios.append(f["temperature_features"]["ratio"][k])
                e["temperature_feature_ratio"] = f["temperature_features"]["ratio"][k]
        e["top_lines"] = g["top_lines"][k][: options.top_lines]
        entry["grids"][grid.instrument] = e
    cf = float(np.nanmean(cont_fracs)) if np.isfinite(cont_fracs).any() else float("nan")
    cz = float(np.nanmean(cont_z)) if np.isfinite(cont_z).any() else float("nan")
    fr = float(np.exp(np.nanmean(np.log(np.clip(feature_ratios, 1e-12, None))))) if len(feature_ratios) and \
        np.isfinite(feature_ratios).any() else float("nan")
    # the element table of the grid where the top element takes the largest excess share
    best = max(element_tables, key=lambda t: t[0]["excess"] if t else -1, default=[])
    entry["continuum_fraction"] = cf
    entry["continuum_fraction_z"] = cz
    entry["continuum_grids"] = sorted(seeing_continuum)
    entry["temperature_feature_ratio"] = fr
    entry["top_elements"] = best[: options.top_elements]
    entry["class"] = classify(cf, cz, fr, best)
    return entry


def _label_numbers(families: dict[str, str], per_grid: dict, grid_reports: dict, label_names: list[str], Q_lat: int,
                   anchor_names: list[str], options: ExplainOptions) -> dict:
    """The numbers the issue asks for (see the module docstring)."""
    numbers: dict = {}
    # APOGEE: alpha windows vs Fe windows
    apogee = families.get("apogee")
    if apogee is not None and "_element_absmean" in grid_reports[apogee]:
        names, absmean = grid_reports[apogee]["_element_absmean"]
        idx = {n: i for i, n in enumerate(names)}
        alpha = [idx[e] for e in ALPHA_ELEMENTS if e in idx]
        if alpha and "Fe" in idx:
            # weighted mean over all alpha windows = sum of weighted sums / sum of weights
            W = per_grid[apogee]["markers"].elements
            wa = sum(W[e].sum() for e in ALPHA_ELEMENTS if e in W)
            lines = np.abs(per_grid[apogee]["dec"].lines)
            num = sum(W[e] @ lines for e in ALPHA_ELEMENTS if e in W) / wa
            den = (W["Fe"] @ lines) / W["Fe"].sum()
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = num / den
            n_dir = Q_lat + len(label_names)
            rnd = ratio[n_dir:]
            entry = {"grid": apogee, "anchor": TYPICAL, "alpha_elements": [e for e in ALPHA_ELEMENTS if e in W],
                     "random": {"median": float(np.median(rnd)), "p16": float(np.percentile(rnd, 16)),
                                "p84": float(np.percentile(rnd, 84))},
                     "per_element_mean_abs_response": {}}
            for i, n in enumerate(label_names):
                entry[n] = float(ratio[Q_lat + i])
                entry[f"{n}_percentile_among_random"] = float((rnd < ratio[Q_lat + i]).mean() * 100)
                entry["per_element_mean_abs_response"][n] = {e: float(absmean[j, Q_lat + i]) for e, j in idx.items()}
            # the same at every anchor (no random baseline there)
            entry["by_anchor"] = {}
            for s, a in enumerate(anchor_names):
                dl = np.abs(per_grid[apogee]["per_anchor"][s].lines)
                num_s = sum(W[e] @ dl for e in ALPHA_ELEMENTS if e in W) / wa
                den_s = (W["Fe"] @ dl) / W["Fe"].sum()
                with np.errstate(divide="ignore", invalid="ignore"):
                    entry["by_anchor"][a] = {n: float(num_s[Q_lat + i] / den_s[Q_lat + i]) for i, n in enumerate(label_names)}
            numbers["apogee_alpha_to_fe_window_ratio"] = entry
    # GALAH: H-alpha rank and excitation for the Teff direction, at every anchor
    galah = families.get("galah")
    if galah is not None and "teff" in label_names and len(per_grid[galah]["markers"].lines):
        q = Q_lat + label_names.index("teff")
        markers = per_grid[galah]["markers"]
        by_anchor = {}
        for s_, a in enumerate(anchor_names):
            dec = per_grid[galah]["per_anchor"][s_]
            by_anchor[a] = _teff_lines(markers, line_ew(markers, dec)[:, q], line_scores(markers, dec)[:, q], options)
        entry = {"grid": galah, "anchor": TYPICAL, **by_anchor[TYPICAL],
                 "n_lines_note": "lines (blends within 0.5 LSF FWHM counted once) visible in an anchor star",
                 "rank_by": "|equivalent-width change| (h_alpha_rank_by_depth: |change of the normalised flux at "
                            "the line|, H-alpha's averaged over +-10 A against flanks)",
                 "by_anchor": {a: {k: v for k, v in e.items() if k != "top_lines"} for a, e in by_anchor.items()}}
        numbers["galah_teff_lines"] = entry
    # the sign of the metal lines' response to each label direction (physics, FGK stars: weaker with
    # Teff, stronger with [Fe/H]; alpha-element lines stronger with [alpha/M])
    signs: dict = {}
    for fam in ("apogee", "galah"):
        inst = families.get(fam)
        if inst is None or not per_grid[inst]["markers"].lines:
            continue
        markers = per_grid[inst]["markers"]
        metal = np.array([l["kind"] in ("atomic", "window") and l["element"] != "H" for l in markers.lines])
        alpha = metal & np.array([l["element"] in ALPHA_ELEMENTS for l in markers.lines])
        if not metal.any():
            continue
        signs[inst] = {}
        for i, n in enumerate(label_names):
            signs[inst][n] = {}
            for s_, a in enumerate(anchor_names):
                ew = line_ew(markers, per_grid[inst]["per_anchor"][s_])[:, Q_lat + i]
                rows = alpha if (n == "alpha_m" and alpha.any()) else metal
                signs[inst][n][a] = {"lines": "alpha-element" if rows is alpha else "metal",
                                     "n": int(rows.sum()),
                                     "median_d_ew_mA_per_sigma": float(1000 * np.median(ew[rows])),
                                     "fraction_strengthening": float(np.mean(ew[rows] > 0))}
    if signs:
        numbers["line_signs"] = signs
    return numbers


def _teff_lines(markers: Markers, ew: np.ndarray, depth_score: np.ndarray, options: ExplainOptions) -> dict:
    """H-alpha's rank among the lines (by |equivalent-width change| and by |change at the line|) and
    the low- vs high-excitation comparison of neutral metal lines, for one direction at one anchor."""
    lines = markers.lines
    rank, n_groups = group_ranks(markers, ew)
    rank_depth, _ = group_ranks(markers, depth_score)
    entry: dict = {"n_lines": n_groups}
    ha = [i for i, l in enumerate(lines) if l["element"] == "H" and abs(l["center"] - 6564.61) < 2.0]
    if ha:
        entry.update({"h_alpha_rank": int(rank[ha[0]]), "h_alpha_rank_by_depth": int(rank_depth[ha[0]]),
                      "h_alpha_d_ew_mA_per_sigma": float(1000 * ew[ha[0]]),
                      "h_alpha_response_per_sigma": float(depth_score[ha[0]])})
    metal = [i for i, l in enumerate(lines) if l["kind"] == "atomic"]
    if metal:
        entry["median_metal_line_abs_d_ew_mA_per_sigma"] = float(1000 * np.median(np.abs(ew[metal])))
    entry["top_lines"] = rank_lines(markers, depth_score, options.top_lines, ew=ew)
    neutral = [i for i, l in enumerate(lines) if l["kind"] == "atomic" and l["species"].endswith(" I")
               and np.isfinite(l["e_lower"])]
    if neutral:
        chi = np.array([lines[i]["e_lower"] for i in neutral])
        resp = np.abs(depth_score[neutral])
        depth = np.array([lines[i]["depth"] for i in neutral])
        per_depth = resp / np.clip(depth, MIN_LINE_DEPTH, None)
        low, high = chi <= LOW_EXCITATION_EV, chi >= HIGH_EXCITATION_EV
        med = lambda v, m: float(np.median(v[m])) if m.any() else None
        ex = {"n_low": int(low.sum()), "n_high": int(high.sum()), "low_ev_max": LOW_EXCITATION_EV,
              "high_ev_min": HIGH_EXCITATION_EV,
              "median_response_low": med(resp, low), "median_response_high": med(resp, high),
              "median_response_per_depth_low": med(per_depth, low), "median_response_per_depth_high": med(per_depth, high),
              "median_abs_d_ew_mA_low": med(1000 * np.abs(ew[neutral]), low),
              "median_abs_d_ew_mA_high": med(1000 * np.abs(ew[neutral]), high),
              "spearman_e_lower_vs_response": _spearman(chi, resp),
              "spearman_e_lower_vs_response_per_depth": _spearman(chi, per_depth)}
        lo_m, hi_m = ex["median_response_per_depth_low"], ex["median_response_per_depth_high"]
        ex["low_excitation_respond_more"] = bool(lo_m > hi_m) if lo_m is not None and hi_m is not None else None
        entry["excitation"] = ex
    return entry


def _direction_consistency(labelled: Labelled, directions: dict[str, LabelDirection], sigma: np.ndarray,
                           seed: int) -> dict:
    """Cosine similarity (in sigma-scaled latent space) between the direction fitted on all sources
    and on each source alone (sources with >= 50 stars with the label)."""
    out: dict = {}
    products = np.array(labelled.products)
    for name, d in directions.items():
        ref = d.gradient * sigma
        entry = {}
        for p in np.unique(products):
            rows = products == p
            y = labelled.labels[name][rows]
            if np.isfinite(y).sum() < 50:
                continue
            dp = fit_label_direction(name, labelled.latents[rows], y, None, seed)
            if dp is None:
                continue
            g = dp.gradient * sigma
            entry[p] = {"cosine": float(ref @ g / (np.linalg.norm(ref) * np.linalg.norm(g) + 1e-30)), "n": dp.n,
                        "cv_r2": dp.cv_r2}
        out[name] = entry
    return out


def _traversals(model, typical: np.ndarray, latent_dirs: np.ndarray, label_dirs: np.ndarray, label_names: list[str],
                grids: dict[str, Grid], families: dict[str, str]) -> dict:
    """Spectra at typical + t v for t in :data:`TRAVERSAL_STEPS`, each latent and label direction, on the windows."""
    names = [f"z{k}" for k in range(latent_dirs.shape[1])] + list(label_names)
    dirs = np.concatenate([latent_dirs, label_dirs], axis=1)
    steps = np.array(TRAVERSAL_STEPS)
    z = typical[None, None, :] + steps[None, :, None] * dirs.T[:, None, :]  # (Q, T, D)
    dev = _decoder_device(model)
    with torch.no_grad():
        coeffs = model.decoder.coefficients(torch.as_tensor(z.reshape(-1, z.shape[-1]), dtype=torch.float32, device=dev))
    coeffs = coeffs.double().cpu().numpy()
    windows, summary = [], {}
    for title, fam, rng in TRAVERSAL_WINDOWS:
        fams = (fam,) if isinstance(fam, str) else fam
        inst = next((families[f] for f in fams if f in families), None)
        if inst is None:
            continue
        grid = grids[inst]
        rows = np.arange(len(grid.wavelength)) if rng is None else np.flatnonzero(
            (grid.wavelength >= rng[0]) & (grid.wavelength <= rng[1]))
        if rows.size < 5:
            continue
        sub = grid.basis[rows]
        flux = (coeffs @ sub[:, :-1].T + sub[:, -1]).reshape(len(names), len(steps), len(rows))
        i0 = list(steps).index(0.0)
        norm = np.median(flux, axis=2)  # each spectrum by its own median: the decoder's scale is the instruments' continuum's
        flux = flux / np.where(np.abs(norm) > 0, norm, 1.0)[:, :, None]
        change = np.sqrt(((flux - flux[:, i0:i0 + 1, :]) ** 2).mean(axis=2))  # (Q, T)
        label = f"{title} ({inst})"
        windows.append({"title": label, "instrument": inst, "wavelength": grid.wavelength[rows], "flux": flux,
                        "segment": grid.piece[rows]})
        summary[label] = {"instrument": inst, "range_A": [float(grid.wavelength[rows][0]), float(grid.wavelength[rows][-1])],
                          "rms_change_at_plus_2_sigma": dict(zip(names, change[:, -1].tolist())),
                          "rms_change_at_minus_2_sigma": dict(zip(names, change[:, 0].tolist()))}
    return {"names": names, "steps": steps, "windows": windows, "summary": {"steps_sigma": list(TRAVERSAL_STEPS),
                                                                             "windows": summary}}


# --- report ------------------------------------------------------------------------------------------
def run_explain(model, datasets: Sequence[str | os.PathLike], out_dir: str | os.PathLike,
                options: ExplainOptions | None = None, progress: bool = True, device: str = "cpu",
                threads: int | None = None) -> dict:
    """Load the model, fit the labelled stars of ``datasets``, explain, write ``explain.json``,
    ``explain.md`` and ``plots/`` (and ``latents.parquet``: the fitted latents with their labels)."""
    from stellarfield.atomic import write_json_atomic, write_text_atomic
    from stellarfield.model.checkpoint import TrainedModel, load_model

    options = options or ExplainOptions()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if threads:
        torch.set_num_threads(threads)
    bars = _Bars(progress)
    start = time.perf_counter()
    trained = model if isinstance(model, TrainedModel) else load_model(model, device=device)
    bars.say("explain: choosing labelled train/validation stars")
    t0 = time.perf_counter()
    spectra, available, split_of = (select_labelled(datasets, options.max_per_product, options.seed)
                                    if datasets else ([], {}, {}))
    load_s = time.perf_counter() - t0
    if spectra:
        bars.say(f"explain: fitting the latents of {len(spectra)} labelled stars "
                 f"({', '.join(f'{p} {n}' for p, n in sorted(_count([s.product for s in spectra]).items()))})")
    t0 = time.perf_counter()
    labelled = fit_labelled(trained, spectra, options.refine_steps, progress, options.fit_batch, split_of)
    labelled.available = available
    extra: dict = {}
    if datasets and options.family_anchors:
        family = select_family_spectra(datasets, trained.model, FAMILY_ANCHOR_SPECTRA, options.seed)
        if family:
            bars.say("explain: fitting the typical stars of " + ", ".join(f"{v[0].product} ({len(v)})" for v in family.values()))
            extra = family_anchors(trained, family, options.refine_steps, progress, options.fit_batch)
    fit_s = time.perf_counter() - t0
    report = explain_model(trained, labelled, options, progress=progress, out_dir=out, extra_anchors=extra)
    report["timings"] = {"load_spectra_s": load_s, "fit_latents_s": fit_s, **report["timings"],
                         "total_s": time.perf_counter() - start}
    report["inputs"] = {"model": str(getattr(trained, "path", model)), "datasets": [str(d) for d in datasets],
                        "device": str(_decoder_device(trained.model)), "threads": torch.get_num_threads(),
                        "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__}
    if len(labelled):
        _write_latents(out / "latents.parquet", labelled)
    clean = _finite(_public(report))
    write_json_atomic(out / "explain.json", clean)
    write_text_atomic(out / "explain.md", markdown(clean))
    return clean


def _public(x):
    """The report without private entries (keys starting with '_')."""
    if isinstance(x, dict):
        return {k: _public(v) for k, v in x.items() if not str(k).startswith("_")}
    if isinstance(x, list):
        return [_public(v) for v in x]
    return x


def _write_latents(path: Path, labelled: Labelled) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from stellarfield.atomic import atomic_path

    cols = {"key": labelled.keys, "product": labelled.products, "split": labelled.splits,
            "latent": pa.array(list(labelled.latents.astype(np.float32))), "chi2_nu": labelled.chi2_nu}
    for n in LABELS:
        cols[f"label_{n}"] = labelled.labels[n]
    with atomic_path(path) as tmp:
        pq.write_table(pa.table(cols), tmp)


def markdown(report: dict) -> str:
    """``explain.md`` from the (JSON-safe) report."""
    L: list[str] = ["# What the latents do", ""]
    m = report["model"]
    inputs = report.get("inputs", {})
    L += [f"Model `{inputs.get('model', '?')}`: {m['latent_dim']} latents, {m['n_basis']} basis functions, "
          f"instruments {', '.join(m['instruments'])}. Data: {', '.join(inputs.get('datasets', [])) or '-'}.",
          "Responses are d flux / dz by autograd through the decoder, rendered at each instrument's pixels and LSF "
          "(rest frame), per 1 sigma of each latent (sigma = the spread of the training latents), without the part "
          "the instrument's own continuum polynomial absorbs. Relative response = response / smoothed model flux; "
          "its smooth part (the smoothing of the table below) is the continuum's change, the rest is the change of the "
          "continuum-normalised spectrum: the lines.", ""]
    t = report.get("timings", {})
    if t:
        L += ["Time: " + ", ".join(f"{k[:-2].replace('_', ' ')} {v:.0f} s" for k, v in t.items() if v is not None), ""]

    L += ["## Anchor stars", ""]
    rows = []
    for a in report["anchors"]:
        lab = a.get("labels", {})
        rows.append([a["name"], a.get("key", a.get("source", "")), _f(lab.get("teff"), 4), _f(lab.get("logg")),
                     _f(lab.get("fe_h")), _f(a.get("chi2_nu"))])
    L += markdown_table(["anchor", "star", "Teff", "log g", "[Fe/H]", "chi2_nu"], rows) + [""]

    L += ["## Grids", ""]
    L += markdown_table(["instrument", "R", "range (A)", "pixels", "lines/windows/features used", "continuum smoothing (km/s)",
                 "continuum degree removed"],
                [[n, _f(g["resolution"], 5), f"{g['wavelength_A'][0]:.0f}-{g['wavelength_A'][1]:.0f}", g["n_pixels"],
                  _f(g.get("n_lines")), _f(g["smooth_kms"], 4), _f(g.get("continuum_degree_removed"))]
                 for n, g in report["grids"].items()])
    L += ["", "Showcase (plotted, per family): " + ", ".join(f"{k}: {v}" for k, v in report["showcase"].items()), ""]

    L += ["## Latents", "",
          "Class, in this order: `single element: X` (X's lines/windows take the largest excess share of the "
          "line-response energy over a random direction's, >= 2x that share at z >= 3, and 1.5x the next element's "
          "excess); `temperature features` (hydrogen lines and molecular bands on the optical grids collect >= 1.5x "
          "the line-response energy a random direction puts there); `continuum` (>= 50% of the response energy is "
          "smooth on the grids that see the continuum, " + ", ".join(report["latents"][0].get("continuum_grids", []))
          + ", and that fraction is >= 1 sd above the random directions' mean); else `mixed lines`. "
          "Excess = energy share - mean share of the random unit directions; ratio = share / mean share; "
          "z = (share - mean) / std over them. Elements from the grid (APOGEE or GALAH) where the top "
          "element's excess is largest.", ""]
    rows = []
    for e in report["latents"]:
        top_el = ", ".join(f"{t['element']} +{_f(t['excess'], 2)} ({_f(t['ratio'], 2)}x, z {_f(t['z'], 2)})"
                           for t in e["top_elements"][:3])
        lines = []
        for inst, g in e["grids"].items():
            if not report["grids"][inst]["high_resolution"]:
                continue
            metal = [l for l in g.get("top_lines", []) if l["kind"] in ("atomic", "window")]
            lines += [f"{l['line']} ({_f(l.get('d_ew_mA'), 2)})" for l in metal[:2]]
        rows.append([f"z{e['latent']}", e["class"], _f(e["continuum_fraction"], 2), _f(e["temperature_feature_ratio"], 2),
                     top_el or "-", "; ".join(lines[:4]) or "-"])
    L += markdown_table(["latent", "class", "continuum fraction", "T-feature ratio",
                 "top elements: excess share (ratio, z) vs random", "top metal lines (dEW mA per sigma)"], rows) + [""]
    counts = _count([e["class"].split(":")[0] for e in report["latents"]])
    L += ["Classes: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())), ""]

    for inst, el in report.get("elements", {}).items():
        if inst not in report["showcase"].values():
            continue
        L += [f"### Elements on {inst}: energy share / random-direction share", ""]
        names = el["elements"]
        dirs = el["directions"]
        rows = []
        for q, d in enumerate(dirs):
            rows.append([d] + [_f(el["ratio"][i][q], 2) for i in range(len(names))])
        L += markdown_table(["direction"] + names, rows) + [""]

    L += ["## Label directions", ""]
    ld = report["label_directions"]
    if ld["directions"]:
        rows = []
        for n, d in ld["directions"].items():
            rows.append([LABEL_TITLES.get(n, n), d["n"], ", ".join(f"{p} {c}" for p, c in d["sources"].items()),
                         _f(d["cv_r2_within_source"]), _f(d["cv_robust_scatter"]),
                         f"{_f(d['label_std_within_source'])} {d['unit']}"])
        L += ["Ridge from the fitted latents of labelled train/validation stars (labels never used in training), "
              "with a free offset per source (the direction that changes the label among one survey's stars); "
              "within-source R^2 and robust scatter by 5-fold cross-validation. "
              + ("Direction = dz per unit label with the other labels held (columns of A in z ~ A y + offset per "
                 "source, over the stars with every label)"
                 if all(d.get("pattern_kind") == "conditional" for d in ld["directions"].values()) else
                 "Direction = Sigma w / (w^T Sigma w) (Sigma: within-source latent covariance; one label alone, "
                 "so it carries the labels it co-varies with)")
              + ", d flux / d label by the chain rule, rendered on every grid; "
              "responses per 1 label sigma (within-source).", ""]
        L += markdown_table(["label", "stars", "sources", "CV R^2 (within source)", "CV scatter", "label sigma"], rows) + [""]
        cons = ld.get("consistency_between_sources", {})
        if any(cons.values()):
            L += ["Agreement of each source's own direction with the pooled one (cosine in sigma-scaled latent space):", ""]
            for n, c in cons.items():
                if c:
                    L.append(f"- {LABEL_TITLES.get(n, n)}: " + ", ".join(f"{p} {_f(v['cosine'], 2)} (n {v['n']})"
                                                                      for p, v in c.items()))
            L.append("")
        num = ld["numbers"]
        a = num.get("apogee_alpha_to_fe_window_ratio")
        if a:
            L += [f"**APOGEE ({a['grid']}) alpha-element windows ({', '.join(a['alpha_elements'])}) vs Fe windows**: "
                  f"mean |line response| ratio = {_f(a.get('alpha_m'))} for the [alpha/M] direction, "
                  f"{_f(a.get('fe_h'))} for the [Fe/H] direction (random directions: median {_f(a['random']['median'])}, "
                  f"16-84% {_f(a['random']['p16'])}-{_f(a['random']['p84'])}; the [alpha/M] direction's ratio exceeds "
                  f"{_f(a.get('alpha_m_percentile_among_random'), 3)}% of the random directions', the [Fe/H] direction's "
                  f"{_f(a.get('fe_h_percentile_among_random'), 3)}%).", ""]
            if a.get("by_anchor"):
                L += markdown_table(["anchor"] + [LABEL_TITLES.get(n, n) for n in next(iter(a["by_anchor"].values()))],
                            [[k] + [_f(v) for v in d.values()] for k, d in a["by_anchor"].items()]) + [""]
        g = num.get("galah_teff_lines")
        if g:
            ex = g.get("excitation", {})
            L += [f"**GALAH ({g['grid']}) Teff direction**: H-alpha ranks {_f(g.get('h_alpha_rank'))} of {g['n_lines']} "
                  f"lines by |equivalent-width change| ({_f(g.get('h_alpha_d_ew_mA_per_sigma'))} mA per sigma; median metal "
                  f"line {_f(g.get('median_metal_line_abs_d_ew_mA_per_sigma'))} mA), {_f(g.get('h_alpha_rank_by_depth'))} by "
                  f"|change of the normalised flux at the line|. Neutral lines, low excitation (<= {LOW_EXCITATION_EV} eV, "
                  f"n {ex.get('n_low')}) vs high (>= {HIGH_EXCITATION_EV} eV, n {ex.get('n_high')}): median |response| "
                  f"{_f(ex.get('median_response_low'))} vs {_f(ex.get('median_response_high'))}; per unit line depth "
                  f"{_f(ex.get('median_response_per_depth_low'))} vs {_f(ex.get('median_response_per_depth_high'))}; "
                  f"Spearman(E_lower, response per depth) {_f(ex.get('spearman_e_lower_vs_response_per_depth'), 2)}. "
                  f"Low-excitation lines respond more: {ex.get('low_excitation_respond_more')}.", ""]
            L += ["Top lines of the Teff direction (equivalent-width change, mA per sigma): "
                  + "; ".join(f"{l['line']} ({_f(l.get('d_ew_mA'), 2)})" for l in g.get("top_lines", [])[:8]), ""]
            rows = []
            for anchor, e in (g.get("by_anchor") or {}).items():
                ex = e.get("excitation", {})
                rows.append([anchor, f"{_f(e.get('h_alpha_rank'))} / {_f(e.get('n_lines'))}", _f(e.get("h_alpha_d_ew_mA_per_sigma")),
                             _f(e.get("h_alpha_rank_by_depth")), _f(e.get("median_metal_line_abs_d_ew_mA_per_sigma")),
                             f"{_f(ex.get('median_response_per_depth_low'))} vs {_f(ex.get('median_response_per_depth_high'))}",
                             str(ex.get("low_excitation_respond_more"))])
            if rows:
                L += ["The same at every anchor star (the response is local: d flux / dz changes with z):", ""]
                L += markdown_table(["anchor", "H-alpha rank (EW)", "H-alpha dEW (mA/sigma)", "H-alpha rank (depth)",
                             "median metal |dEW| (mA)", "low vs high excitation, per depth", "low respond more"],
                            rows) + [""]
        signs = num.get("line_signs")
        if signs:
            L += ["**Sign of the line response** (median equivalent-width change of the metal lines, or of the "
                  "alpha-element lines for [alpha/M], mA per label sigma, and the fraction of those lines that "
                  "strengthen; in FGK stars metal lines weaken with Teff and strengthen with [Fe/H], alpha-element "
                  "lines strengthen with [alpha/M]):", ""]
            anchors = list(next(iter(next(iter(signs.values())).values())).keys())
            rows = []
            for inst, per in signs.items():
                for n, by in per.items():
                    rows.append([inst, LABEL_TITLES.get(n, n)] + [
                        f"{_f(by[a]['median_d_ew_mA_per_sigma'], 2)} ({_f(by[a]['fraction_strengthening'], 2)})" for a in anchors])
            L += markdown_table(["grid", "direction"] + anchors, rows) + [""]
        rows = []
        for inst, per in ld.get("per_grid", {}).items():
            if inst not in report["showcase"].values():
                continue
            for n, v in per.items():
                rows.append([inst, LABEL_TITLES.get(n, n), _f(v["rms_relative_response"]), _f(v["continuum_fraction"], 2),
                             "; ".join(l["line"] for l in v["top_lines"][:3]) or "-"])
        L += ["On each family's grid (every instrument's in explain.json; response per 1 sigma of the label):", ""]
        L += markdown_table(["grid", "label", "rms relative response", "continuum fraction", "top lines"], rows) + [""]
    else:
        L += ["No labelled stars were fitted: no label directions.", ""]

    dis = report.get("disentanglement") or {}
    if dis.get("labels"):
        L += ["## Disentanglement", "",
              "Correlation and mutual information (nats, equal-frequency bins, Miller-Madow) of each latent with each "
              "label, within each source with >= 50 such stars, averaged over sources (weighted by stars); "
              "MIG = (MI of the best latent - MI of the second) / H(label). Latents needed: the ridge's CV R^2 (within "
              "source) with latents added greedily (each time the one that raises it most) reaching 90% / 95% of the "
              "all-latent R^2; and with the top-k latents by |standardised ridge coefficient| (90%).", ""]
        rows = []
        for n, e in dis["labels"].items():
            pear = dis["pearson"][n]
            k_best = e.get("most_correlated_latent")
            curve = e.get("forward_cv_r2") or [None]
            first = e.get("forward_order") or [None]
            rows.append([LABEL_TITLES.get(n, n), f"{e['n']} ({', '.join(e.get('sources', []))})",
                         f"z{k_best} ({_f(pear[k_best], 2)})" if k_best is not None else "-",
                         f"z{e['most_informative_latent']} ({_f(dis['mutual_information_nats'][n][e['most_informative_latent']], 2)})",
                         _f(e["mig"], 2), f"z{first[0]} ({_f(curve[0], 2)})" if first[0] is not None else "-",
                         _f(curve[-1], 2), _f(e.get("latents_for_90pct")), _f(e.get("latents_for_95pct")),
                         _f(e.get("latents_for_90pct_by_importance"))])
        L += markdown_table(["label", "stars", "most correlated (r)", "most informative (MI)", "MIG", "best single (R^2)",
                     "R^2 all", "latents for 90%", "latents for 95%", "90% by coefficient"], rows) + [""]

    tr = report.get("traversals", {}).get("windows", {})
    if tr:
        L += ["## Traversals", "", "RMS change of the spectrum (each divided by its median in the window) at +2 sigma, each direction, per "
              "window; the largest five per window:", ""]
        for w, e in tr.items():
            ch = sorted(e["rms_change_at_plus_2_sigma"].items(), key=lambda kv: -(kv[1] or 0))[:5]
            L.append(f"- {w}: " + ", ".join(f"{k} {_f(v, 2)}" for k, v in ch))
        L.append("")
    plots = report.get("plots") or []
    if plots:
        L += ["## Plots", ""] + [f"- [{p}]({p})" for p in plots] + [""]
    L += ["Reference tables: GALAH DR3 line list subset (Buder et al. 2021, via Korg.jl, BSD-3-Clause), APOGEE ASPCAP "
          "DR12 element windows (jobovy/apogee, BSD-3-Clause), spectral features (Lick bands, Trager et al. 1998; "
          "Worthey & Ottaviani 1997; NIST); see `stellarfield/reference_data/README.md`.", ""]
    return "\n".join(L)
