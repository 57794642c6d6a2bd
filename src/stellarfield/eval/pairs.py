"""One star, two telescopes: cross-instrument prediction, latent agreement, multi-epoch stability.

>>> from stellarfield.eval.pairs import pairs_section, format_pairs
>>> section = pairs_section("reference", ["datasets/demo", "datasets/all"])        # doctest: +SKIP
>>> print(format_pairs(section))                                                 # doctest: +SKIP

**Pairs** (:func:`load_pairs`): stars of the chosen split (the test split: never trained on) with a
spectrum in each of two products (STELIB and MILES by default), matched by ``star_id``
(:mod:`stellarfield.data.stars`). Every spectrum is fitted alone (:func:`~stellarfield.model.predict.fit_star_spectra`,
one latent, its own RV and continuum), and each fit is rendered on the pixels of both spectra of
its star through their instruments' LSFs (``to=product, wave_grid=pixels``):

* **same-instrument RMS**: a spectrum against its own fit rendered on its own pixels;
* **cross-prediction RMS**: the spectrum against the fit of the *other* instrument's spectrum of the
  same star, rendered on its pixels ("fit STELIB, predict MILES", and back);
* **joint RMS** (a diagnostic): the spectrum against ONE latent fitted to both spectra of the star
  (:func:`~stellarfield.model.predict.predict`'s joint fit): near the same-instrument RMS where one
  latent can explain what both instruments saw, so that a poor cross-prediction says that one
  spectrum leaves the latent undetermined in directions the other instrument sees.

* **data floor** (no model): the target against the *other* telescope's own spectrum of the star,
  blurred to the target's LSF and interpolated onto its pixels (:func:`observed_as`), with the
  own-fit and cross RMS on the same pixels (the source's range). Where the source is the broader
  of the two (STELIB -> MILES: it cannot be sharpened) all three are made at the source's LSF
  instead: the target, and both fits as the target's instrument renders them, blurred to it
  (:func:`blurred_as`; rendered through the source's instrument they would differ by more than the
  LSF: each product's trunk is band-limited at its own resolution, and learns its calibration).
  Rest-frame products only. Two observations of one star differ by noise, flux calibration beyond
  the continuum and the libraries' own reductions; a cross-prediction no worse than this floor is
  as good as the other telescope's data allow without a model.

The same figures on the target's pixels inside the source spectrum's wavelength range only are
given too (``overlap``): STELIB reaches 3200-9300 A, MILES 3540-7410 A, so "predict STELIB from
MILES" is partly an extrapolation beyond every pixel fitted.

An observed-frame target is rendered at the velocity of its own fit (the velocity of another night
or telescope says nothing about this one); STELIB and MILES are rest frame, rendered at 0.

Both are the RMS of ``data - model x continuum`` over the spectrum's good pixels, divided by its
median |flux|, after a least-squares multiplicative continuum of Legendre degree
:data:`CONTINUUM_DEGREE` in wavelength fitted to each comparison alone (STELIB and MILES are both
flux calibrated, differently: the smooth shape is not what is compared). The issue's target:
median cross RMS <= :data:`CROSS_RMS_TARGET` x median same-instrument RMS.

**Latents**: the Euclidean distance between the latents of one star's two spectra (fitted apart)
against the distance between spectra of two different stars (every such pair among the same
spectra, any instruments; the distance between different stars seen by the two different
instruments is given too). Target: median same-star distance <= :data:`LATENT_RATIO_TARGET` x the
median random distance.

**Multi-epoch** (:func:`multi_epoch_section`): the spectra of one star from several nights (LAMOST
MRS of KIC 8098300 by default): each night fitted alone (RV, its error from the Laplace covariance,
latent), and all nights jointly (one latent, an RV per night); the latents' stability as their
distances from the joint latent and from each other, against the random-star distance of the pairs,
and ``chi2 = sum_nights (z_n - z_joint)^T C_n^-1 (z_n - z_joint) / (N D)`` (about 1 where the nights
agree within their Laplace errors). The model's velocities relative to the night of highest S/N are
set against a model-free cross-correlation of the nights' pseudo-continuum-normalised spectra
(:func:`relative_ccf_velocities`): a night where they differ by much more than the LSF (~17 km/s
sigma for LAMOST MRS) was fitted on another peak.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence

import numpy as np

from stellarfield.eval.metrics import rms_residual, summarize
from stellarfield.eval.report_text import format_number as _f
from stellarfield.physics.doppler import C_KMS

#: Legendre degree in wavelength of the continuum fitted before an RMS (0 = one scale factor).
CONTINUUM_DEGREE = 2
#: The issue's targets.
CROSS_RMS_TARGET = 1.5
LATENT_RATIO_TARGET = 0.25
#: Products compared by default, and the multi-epoch star and product.
DEFAULT_PRODUCTS = ("stelib", "miles")
MULTI_EPOCH_STAR = "LAMOST J192814.09+435531.0"  # KIC 8098300
MULTI_EPOCH_PRODUCT = "lamost_mrs"


# --- the data ---------------------------------------------------------------------------------
def load_pairs(datasets: Sequence[str | os.PathLike], split: str | None = "test",
               products: Sequence[str] = DEFAULT_PRODUCTS) -> list[dict]:
    """Stars of ``split`` (None: all) with a spectrum in each of ``products``: ``[{"star_id", product:
    Spectrum, ...}]``, sorted by star (the first spectrum by key where a star has several in one
    product; a key found in an earlier dataset is not read again)."""
    from stellarfield.data.store import Dataset

    found: dict[str, dict[str, tuple[str, int]]] = {}
    stores = [Dataset(d) for d in datasets]
    for index, store in enumerate(stores):
        table = store.table(["key", "product", "star_id", "object_id"], split=split, products=list(products))
        for row in sorted(table.to_pylist(), key=lambda r: r["key"]):
            star = row["star_id"] or row["object_id"]
            found.setdefault(star, {}).setdefault(row["product"], (row["key"], index))
    pairs = []
    for star in sorted(found):
        if all(p in found[star] for p in products):
            entry = {"star_id": star}
            for p in products:
                key, index = found[star][p]
                entry[p] = stores[index].get(key)
            pairs.append(entry)
    return pairs


def pairs_from_spectra(spectra: dict[str, list], products: Sequence[str] = DEFAULT_PRODUCTS) -> list[dict]:
    """:func:`load_pairs`' result from spectra already loaded (``{product: [Spectrum]}``, e.g. a bench's
    test split), matched by ``star_id`` (else ``object_id``)."""
    found: dict[str, dict] = {}
    for p in products:
        for s in sorted(spectra.get(p, []), key=lambda s: s.key):
            found.setdefault(s.star_id or s.object_id, {}).setdefault(p, s)
    return [{"star_id": star, **found[star]} for star in sorted(found) if all(p in found[star] for p in products)]


def load_star(datasets: Sequence[str | os.PathLike], star_id: str, product: str) -> list:
    """Every spectrum of ``star_id`` in ``product`` (any split), sorted by key, each key once."""
    from stellarfield.data.store import Dataset

    out, seen = [], set()
    for d in datasets:
        store = Dataset(d)
        table = store.table(["key", "star_id"], products=[product])
        for row in table.to_pylist():
            if row["star_id"] == star_id and row["key"] not in seen:
                seen.add(row["key"])
                out.append(store.get(row["key"]))
    return sorted(out, key=lambda s: s.key)


# --- the score ----------------------------------------------------------------------------------
def continuum_rms(spectrum, model_flux: np.ndarray, degree: int = CONTINUUM_DEGREE,
                  wave_range: tuple[float, float] | None = None) -> tuple[float, int]:
    """``(rms, n)``: RMS of ``flux - model x c(lambda)`` over the spectrum's good pixels where the model
    is finite (and inside ``wave_range``, A, where given), divided by the median |flux| there; ``c`` a
    Legendre polynomial of ``degree`` in wavelength fitted by least squares (every pixel weighted
    alike: MILES has no errors)."""
    wave, flux = spectrum.wavelength, spectrum.flux.astype(np.float64)
    good = spectrum.mask & np.isfinite(flux) & np.isfinite(model_flux)
    if wave_range is not None:
        good &= (wave >= wave_range[0]) & (wave <= wave_range[1])
    n = int(good.sum())
    if n <= degree + 1:
        return float("nan"), n
    x = 2 * (wave - wave[good].min()) / max(np.ptp(wave[good]), 1e-12) - 1
    design = np.polynomial.legendre.legvander(x[good], degree) * model_flux[good, None]
    coef, *_ = np.linalg.lstsq(design, flux[good], rcond=None)
    return float(rms_residual(flux[good], design @ coef) / max(np.median(np.abs(flux[good])), 1e-30)), n


def lsf_sigma_u(spectrum) -> np.ndarray | None:
    """The spectrum's Gaussian LSF sigma in ``u = ln(lambda)`` at each pixel (segments concatenated),
    from the segments' ``lsf_fwhm`` (A) or the record's resolving power; None where neither is known."""
    from stellarfield.physics.lsf import fwhm_to_sigma_u, resolution_to_sigma_u

    sigmas = []
    for seg in spectrum.segments:
        if seg.lsf_fwhm is not None:
            sigmas.append(fwhm_to_sigma_u(seg.lsf_fwhm.astype(np.float64), seg.wavelength))
        elif spectrum.resolution:
            sigmas.append(np.full(seg.n_pixels, resolution_to_sigma_u(float(spectrum.resolution))))
        else:
            return None
    return np.concatenate(sigmas)


def blurred_as(spectrum, other) -> np.ndarray | None:
    """``spectrum``'s flux on its own pixels as seen through ``other``'s broader LSF, with no model
    (Gaussians: blurred by a Gaussian of the quadrature difference of their sigmas in ``u``,
    :func:`~stellarfield.physics.lsf.convolve_direct`, over the good pixels only); NaN where less
    than half the blurred weight came from good pixels. None where it cannot be made: a frame other
    than the rest frame in either (the two would differ by velocities), an unknown LSF, or an
    ``other`` sharper than ``spectrum`` anywhere they overlap (a spectrum cannot be sharpened)."""
    from stellarfield.physics.lsf import convolve_direct

    if spectrum.frame != "rest" or other.frame != "rest":
        return None
    sigma_own, sigma_other = lsf_sigma_u(spectrum), lsf_sigma_u(other)
    if sigma_own is None or sigma_other is None:
        return None
    wave, flux = spectrum.wavelength.astype(np.float64), spectrum.flux.astype(np.float64)
    good = spectrum.mask & np.isfinite(flux)
    order = np.argsort(other.wavelength)
    at_pixels = np.interp(wave, other.wavelength[order], sigma_other[order], left=np.nan, right=np.nan)
    inside = np.isfinite(at_pixels)
    if not inside.any() or good.sum() < 2:
        return None
    extra = at_pixels[inside] ** 2 - sigma_own[inside] ** 2
    if (extra < -1e-6 * sigma_own[inside] ** 2).any():
        return None
    sigma = np.sqrt(np.interp(np.log(wave), np.log(wave[inside]), np.clip(extra, 0.0, None)))
    sigma = np.maximum(sigma, 1e-3 * np.median(sigma_own))  # equal LSFs: (about) no blur
    blurred = convolve_direct(wave, np.stack([np.where(good, flux, 0.0), good.astype(np.float64)]), sigma)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(blurred[1] >= 0.5, blurred[0] / blurred[1], np.nan)


def observed_as(source, target) -> np.ndarray | None:
    """The ``source`` spectrum's own flux as ``target``'s instrument would record it, with no model:
    :func:`blurred_as` the target, interpolated linearly onto the target's pixels (NaN outside the
    source's range). What "the other telescope's spectrum of this star" says about this one: the
    floor a cross-prediction is judged against. None where :func:`blurred_as` cannot be made."""
    seen = blurred_as(source, target)
    return None if seen is None else np.interp(target.wavelength, source.wavelength, seen, left=np.nan, right=np.nan)


def with_flux(spectrum, flux: np.ndarray):
    """A copy of a one-segment spectrum with ``flux`` (NaN: masked)."""
    from dataclasses import replace

    seg = spectrum.segments[0]
    good = np.isfinite(flux)
    return replace(spectrum, segments=[replace(seg, flux=np.where(good, flux, 0).astype(np.float32), mask=seg.mask & good)])


def _floor_row(row: dict, source, target, own_flux: np.ndarray, cross_flux: np.ndarray, own_fit, rv,
               seed: int, src: str, dst: str) -> None:
    """The data floor of "fit ``src``, predict ``dst``" for one star (see the module docstring): the
    ``data``, ``cross`` and ``self`` RMS on the same pixels, at ``dst``'s LSF where the source is the
    sharper (or as sharp), else at the source's LSF (the target, and both fits as the target's
    instrument renders them, ``own_flux`` and ``cross_flux`` on its pixels, blurred to it); NaN where
    neither can be made. ``own_fit`` (the target's fit) is rendered once more, through the source's
    instrument, for comparison."""
    row[f"floor_lsf_{src}_to_{dst}"] = None
    seen = observed_as(source, target)
    if seen is not None:  # at the target's own LSF: the figures of the cross-prediction itself
        compared, lsf, own, cross = target, dst, own_flux, cross_flux
    else:
        coarse = blurred_as(target, source)
        if coarse is None or len(target.segments) != 1:
            for name in ("data", "cross", "self"):
                row[f"{name}_rms_where_data_{src}_to_{dst}"] = float("nan")
            return
        compared, lsf = with_flux(target, coarse), src
        flux = np.where(source.mask, source.flux.astype(np.float64), np.nan)  # NaN at (and next to) bad pixels
        seen = np.interp(target.wavelength, source.wavelength, flux, left=np.nan, right=np.nan)
        # the fits as the target's instrument renders them, blurred as the target was: through the
        # source's instrument they would carry what the model learned of the source's calibration
        own, cross = (blurred_as(with_flux(target, f), source) for f in (own_flux, cross_flux))
        through_source = own_fit.render(to=source.product, wave_grid=target.wavelength, rv_kms=rv, n_samples=0,
                                        seed=seed, normalise=False).flux
        row[f"self_through_source_rms_{src}_to_{dst}"] = continuum_rms(
            compared, np.where(np.isfinite(seen), through_source, np.nan))[0]
    row[f"floor_lsf_{src}_to_{dst}"] = lsf
    for name, flux in (("data", seen), ("cross", cross), ("self", own)):  # on the same pixels
        row[f"{name}_rms_where_data_{src}_to_{dst}"] = continuum_rms(compared, np.where(np.isfinite(seen), flux, np.nan))[0]


def _render_on(fit, target, rv_kms: float | None, n_samples: int, seed: int):
    return fit.render(to=target.product, wave_grid=target.wavelength, rv_kms=rv_kms, n_samples=n_samples, seed=seed,
                      normalise=False)  # the comparison fits its own continuum


def pairs_section(model, datasets: Sequence[str | os.PathLike] = (), split: str | None = "test",
                  products: Sequence[str] = DEFAULT_PRODUCTS, refine_steps: int = 200, n_samples: int = 100,
                  seed: int = 0, progress: bool = False, pairs: list[dict] | None = None) -> dict:
    """The pairs benchmark (see the module docstring) on the pairs of ``datasets``' ``split`` (or the
    ``pairs`` given, from :func:`pairs_from_spectra`); a JSON-ready dict."""
    from stellarfield.model.generate import as_trained
    from stellarfield.model.predict import fit_star_spectra

    trained = as_trained(model)
    if pairs is None:
        pairs = load_pairs(datasets, split, products)
    a_name, b_name = products
    out: dict = {"split": split, "products": list(products), "n_pairs": len(pairs), "continuum_degree": CONTINUUM_DEGREE,
                 "refine_steps": refine_steps, "stars": []}
    if not pairs:
        out["note"] = f"not done: no star of split {split!r} has spectra in both {a_name} and {b_name}"
        return out
    fits, latents, joints = {}, [], {}
    for k, pair in enumerate(pairs):
        for p in products:
            fits[(k, p)] = fit_star_spectra(trained, [pair[p]], refine_steps=refine_steps)
            latents.append((k, p, fits[(k, p)].latent))
        joints[k] = fit_star_spectra(trained, [pair[p] for p in products], refine_steps=refine_steps)
        if progress:
            print(f"pairs: {k + 1}/{len(pairs)} {pair['star_id']}", flush=True)
    rows = []
    for k, pair in enumerate(pairs):
        row = {"star_id": pair["star_id"]}
        for src, dst in ((a_name, b_name), (b_name, a_name)):
            target = pair[dst]
            rv = fits[(k, dst)].inputs[0].rv_kms  # an observed-frame target: at its own velocity (None: rest)
            own = _render_on(fits[(k, dst)], target, rv, 0, seed)
            cross = _render_on(fits[(k, src)], target, rv, n_samples, seed)
            row[f"self_rms_{dst}"], row[f"n_{dst}"] = continuum_rms(target, own.flux)
            row[f"cross_rms_{src}_to_{dst}"], _ = continuum_rms(target, cross.flux)
            overlap = (float(pair[src].wavelength.min()), float(pair[src].wavelength.max()))
            row[f"self_rms_overlap_{src}_to_{dst}"], _ = continuum_rms(target, own.flux, wave_range=overlap)
            row[f"cross_rms_overlap_{src}_to_{dst}"], _ = continuum_rms(target, cross.flux, wave_range=overlap)
            # no model: the other telescope's own spectrum as the prediction
            _floor_row(row, pair[src], target, own.flux, cross.flux, fits[(k, dst)], rv, seed, src, dst)
            joint_rv = next(i.rv_kms for i in joints[k].inputs if i.key == target.key)
            row[f"joint_rms_{dst}"], _ = continuum_rms(target, _render_on(joints[k], target, joint_rv, 0, seed).flux)
            with np.errstate(all="ignore"):
                width = np.nanmedian((cross.flux_hi - cross.flux_lo) / np.abs(cross.flux))
            row[f"band_width_{src}_to_{dst}"] = float(width)
        za, zb = fits[(k, a_name)].latent, fits[(k, b_name)].latent
        row["latent_distance"] = float(np.linalg.norm(za - zb))
        row["flags"] = sorted({f for p in products for i in fits[(k, p)].inputs for f in i.flags}
                              | {f for p in products for f in fits[(k, p)].flags})
        rows.append(row)
    out["stars"] = rows

    for src, dst in ((a_name, b_name), (b_name, a_name)):
        cross = np.array([r[f"cross_rms_{src}_to_{dst}"] for r in rows])
        own = np.array([r[f"self_rms_{dst}"] for r in rows])
        ok = np.isfinite(cross) & np.isfinite(own)
        ratio = float(np.median(cross[ok]) / np.median(own[ok])) if ok.any() else float("nan")
        out[f"{src}_to_{dst}"] = {
            "n": int(ok.sum()),
            "cross_rms": summarize(cross[ok]).to_dict(),
            "self_rms": summarize(own[ok]).to_dict(),
            "joint_rms": summarize([r[f"joint_rms_{dst}"] for r in rows]).to_dict(),
            "overlap": _overlap(rows, src, dst),
            "ratio_of_medians": ratio,
            "ratio_per_star": summarize(cross[ok] / own[ok]).to_dict(),
            "band_relative_width": summarize([r[f"band_width_{src}_to_{dst}"] for r in rows]).to_dict(),
            "data": _data_floor(rows, src, dst),
            "target": CROSS_RMS_TARGET,
            "meets_target": bool(ratio <= CROSS_RMS_TARGET),
        }

    same = np.array([r["latent_distance"] for r in rows])
    random_any, random_cross = [], []
    for (k1, p1, z1), (k2, p2, z2) in itertools.combinations(latents, 2):
        if k1 != k2:
            d = float(np.linalg.norm(z1 - z2))
            random_any.append(d)
            if p1 != p2:
                random_cross.append(d)
    median_random = float(np.median(random_any)) if random_any else float("nan")
    out["latent"] = {
        "same_star": summarize(same).to_dict(),
        "random_pairs": summarize(random_any).to_dict(),
        "random_pairs_across_instruments": summarize(random_cross).to_dict(),
        "ratio": float(np.median(same) / median_random) if random_any else float("nan"),
        "ratio_across_instruments": float(np.median(same) / np.median(random_cross)) if random_cross else float("nan"),
        "target": LATENT_RATIO_TARGET,
    }
    out["latent"]["meets_target"] = bool(out["latent"]["ratio"] <= LATENT_RATIO_TARGET)
    return out


def random_distance(pairs: dict) -> float | None:
    """The median latent distance between random stars of a :func:`pairs_section` result (None if not done)."""
    value = pairs.get("latent", {}).get("random_pairs", {}).get("median")
    return value if value is not None and np.isfinite(value) else None


def _data_floor(rows: list[dict], src: str, dst: str) -> dict:
    """The other telescope's own spectrum as the prediction (:func:`observed_as`), on the stars and
    the target's pixels where it can be made (inside the source's range): its RMS, and the target's
    own-fit RMS and the model's cross RMS on the same pixels (a cross RMS below the data's: the model
    predicts the target better than the other telescope's spectrum does)."""
    data, cross, own = (np.array([r[f"{name}_rms_where_data_{src}_to_{dst}"] for r in rows])
                        for name in ("data", "cross", "self"))
    ok = np.isfinite(data) & np.isfinite(cross) & np.isfinite(own)
    if not ok.any():
        return {"n": 0, "note": f"not made: a {src} or {dst} spectrum in the observed frame, of unknown LSF, or of "
                                "several segments"}
    lsfs = sorted({r[f"floor_lsf_{src}_to_{dst}"] for r, good in zip(rows, ok) if good})
    through = np.array([r.get(f"self_through_source_rms_{src}_to_{dst}", np.nan) for r in rows])[ok]
    extra = {} if not np.isfinite(through).any() else {
        # the target's own fit rendered through the SOURCE's instrument (its LSF, band limit and all)
        "self_through_source_rms": summarize(through[np.isfinite(through)]).to_dict()}
    return {"n": int(ok.sum()), "lsf_of": lsfs, **extra, "data_rms": summarize(data[ok]).to_dict(),
            "cross_rms": summarize(cross[ok]).to_dict(), "self_rms": summarize(own[ok]).to_dict(),
            "data_over_own_fit": float(np.median(data[ok]) / np.median(own[ok])),
            "cross_over_own_fit": float(np.median(cross[ok]) / np.median(own[ok])),
            "cross_over_data": float(np.median(cross[ok]) / np.median(data[ok]))}


def _overlap(rows: list[dict], src: str, dst: str) -> dict:
    """Cross and own-fit RMS on the target's pixels inside the source spectrum's wavelength range only."""
    cross = np.array([r[f"cross_rms_overlap_{src}_to_{dst}"] for r in rows])
    own = np.array([r[f"self_rms_overlap_{src}_to_{dst}"] for r in rows])
    ok = np.isfinite(cross) & np.isfinite(own)
    return {"cross_rms": summarize(cross[ok]).to_dict(), "self_rms": summarize(own[ok]).to_dict(),
            "ratio_of_medians": float(np.median(cross[ok]) / np.median(own[ok])) if ok.any() else float("nan")}


def relative_ccf_velocities(spectra: list, reference: int, half_width_kms: float = 300.0,
                            step_kms: float = 1.0) -> np.ndarray:
    """Model-free velocities (km/s) of ``spectra`` relative to ``spectra[reference]``: per segment, the
    peak (parabola through its neighbours) of the cross-correlation of the spectra divided by a running
    median of 301 pixels (a pseudo-continuum), on the reference's pixels; the median over segments
    (NaN where none can be measured). A check on the model's velocities that needs no model."""
    from scipy.ndimage import median_filter

    c = C_KMS

    def normalised(seg):
        ok = seg.mask & np.isfinite(seg.flux)
        if ok.sum() < 400:
            return None
        f = np.interp(np.arange(seg.n_pixels), np.flatnonzero(ok), seg.flux[ok].astype(np.float64))
        cont = median_filter(f, 301, mode="nearest")
        with np.errstate(all="ignore"):
            return np.log(seg.wavelength), np.where(cont > 0, f / cont, np.nan) - 1

    velocities = np.arange(-half_width_kms, half_width_kms + step_kms / 2, step_kms)
    out = np.full(len(spectra), np.nan)
    per_segment: list[list[float]] = [[] for _ in spectra]
    for k, ref_seg in enumerate(spectra[reference].segments):
        ref = normalised(ref_seg)
        if ref is None:
            continue
        u_ref, f_ref = ref
        inner = slice(200, -200)  # away from the ends, where the running median is one-sided
        for i, s in enumerate(spectra):
            seg = next((g for g in s.segments if g.name == ref_seg.name), None)
            other = normalised(seg) if seg is not None else None
            if other is None:
                continue
            u, f = other
            ccf = np.array([np.nanmean(f_ref[inner] * np.interp(u_ref[inner] + np.log1p(v / c), u, f,
                                                               left=np.nan, right=np.nan)) for v in velocities])
            if not np.isfinite(ccf).any():
                continue
            j = int(np.nanargmax(ccf))
            shift = 0.0
            if 0 < j < len(ccf) - 1 and np.all(np.isfinite(ccf[j - 1: j + 2])):
                a, b, d = ccf[j - 1: j + 2]
                denom = a - 2 * b + d
                shift = 0.5 * (a - d) / denom if denom < 0 else 0.0
            per_segment[i].append(velocities[j] + shift * step_kms)
    for i, values in enumerate(per_segment):
        if values:
            out[i] = float(np.median(values))
    return out


def multi_epoch_section(model, spectra: list, reference_distance: float | None = None,
                        refine_steps: int = 200) -> dict:
    """One star's spectra from several nights (see the module docstring); ``reference_distance``: the
    median latent distance between random stars (the pairs section's), to scale the stability by."""
    from stellarfield.model.generate import as_trained
    from stellarfield.model.predict import fit_star_spectra

    trained = as_trained(model)
    out: dict = {"n_spectra": len(spectra), "nights": []}
    singles = []
    for s in spectra:
        fit = fit_star_spectra(trained, [s], refine_steps=refine_steps)
        i = fit.inputs[0]
        usable = "no_usable_pixels" not in i.flags
        night = {"key": s.key, "mjd": s.meta.get("lmjd", s.meta.get("mjd")), "snr": s.meta.get("snr") or _finite(s.label("snr")),
                 "usable": usable, "n_pixels": i.n_pixels}
        if usable:
            night.update(rv_kms=i.rv_kms, rv_err_kms=i.rv_err_kms, chi2_nu=i.chi2_nu)
            singles.append((s, fit))
        out["nights"].append(night)
    out["n_usable"] = len(singles)
    if not singles:
        out["note"] = "not done: no spectrum with usable pixels"
        return out
    joint = fit_star_spectra(trained, [s for s, _ in singles], refine_steps=refine_steps)
    by_key = {i.key: i for i in joint.inputs}
    for night in out["nights"]:
        i = by_key.get(night["key"])
        if i is not None:
            night.update(joint_rv_kms=i.rv_kms, joint_rv_err_kms=i.rv_err_kms, joint_chi2_nu=i.chi2_nu)
    d = len(joint.latent)
    to_joint = [float(np.linalg.norm(f.latent - joint.latent)) for _, f in singles]
    between = [float(np.linalg.norm(a.latent - b.latent)) for (_, a), (_, b) in itertools.combinations(singles, 2)]
    chi2 = sum(float((f.latent - joint.latent) @ np.linalg.solve(f.latent_cov, f.latent - joint.latent))
               for _, f in singles) / (len(singles) * d)
    for night, dist in zip([n for n in out["nights"] if n["usable"]], to_joint):
        night["latent_distance_to_joint"] = dist
    usable = [n for n in out["nights"] if n["usable"]]
    ref = int(np.nanargmax([n["snr"] if n["snr"] is not None else -np.inf for n in usable])) if any(
        n["snr"] is not None for n in usable) else 0
    ccf = relative_ccf_velocities([s for s, _ in singles], ref)
    for n, v in zip(usable, ccf):
        n["ccf_relative_kms"] = float(v)  # model-free, relative to the night of highest S/N
        n["rv_relative_kms"] = n["rv_kms"] - usable[ref]["rv_kms"] if n["rv_kms"] is not None else None
        n["rv_relative_minus_ccf_kms"] = (n["rv_relative_kms"] - float(v)
                                          if n["rv_relative_kms"] is not None and np.isfinite(v) else None)
    out["ccf_reference"] = usable[ref]["key"]
    rv = np.array([n["rv_kms"] for n in out["nights"] if n["usable"]], dtype=float)
    err = np.array([n["rv_err_kms"] for n in out["nights"] if n["usable"]], dtype=float)
    ok = np.isfinite(rv) & np.isfinite(err) & (err > 0)
    rv_stats = {}
    if ok.sum() >= 1:
        w = 1 / err[ok] ** 2
        mean = float(np.sum(w * rv[ok]) / np.sum(w))
        rv_stats = {"weighted_mean_kms": mean, "scatter_kms": float(np.std(rv[ok])),
                    "median_error_kms": float(np.median(err[ok])),
                    "chi2_nu_constant": float(np.sum(w * (rv[ok] - mean) ** 2) / max(ok.sum() - 1, 1))}
    out["rv"] = rv_stats
    out["latent"] = {
        "joint_latent_err_median": float(np.median(joint.latent_err)),
        "distance_to_joint": summarize(to_joint).to_dict(),
        "distance_between_nights": summarize(between).to_dict(),
        "chi2_per_dof": chi2,
        "reference_random_distance": reference_distance,
        "ratio_to_random": (float(np.median(between)) / reference_distance
                            if between and reference_distance else None),
    }
    return out


def _finite(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


# --- text -----------------------------------------------------------------------------------
def _kms(x) -> str:
    return "-" if x is None or not np.isfinite(x) else f"{x:.2f}"


def format_pairs(pairs: dict, epochs: dict | None = None) -> str:
    """The figures as text (what ``benchmarks/cross_instrument.py`` prints)."""
    lines = [f"one star, two instruments: {pairs['n_pairs']} stars of split {pairs['split']!r} with "
             f"{' and '.join(pairs['products'])} spectra"]
    if "note" in pairs:
        lines.append(f"  {pairs['note']}")
    else:
        lines.append(f"  RMS of data - model x continuum (Legendre degree {pairs['continuum_degree']}) / median flux, "
                     "median (16-84%) over stars")
        a, b = pairs["products"]
        for src, dst in ((a, b), (b, a)):
            e = pairs[f"{src}_to_{dst}"]
            c, s = e["cross_rms"], e["self_rms"]
            lines.append(f"  fit {src:<8s} -> predict {dst:<8s}: cross RMS {_f(c['median'])} ({_f(c['p16'])}-"
                         f"{_f(c['p84'])}), {dst} own fit {_f(s['median'])} ({_f(s['p16'])}-{_f(s['p84'])}); "
                         f"ratio {_f(e['ratio_of_medians'])} (target <= {e['target']}: "
                         f"{'met' if e['meets_target'] else 'NOT met'}); one latent fitted to both: "
                         f"{_f(e['joint_rms']['median'])}; band width {_f(e['band_relative_width']['median'])} of "
                         f"the flux; n = {e['n']}")
            d = e["data"]
            if d["n"]:
                how = (f"the {src} spectrum itself blurred to {dst}'s LSF" if d["lsf_of"] == [dst] else
                       f"the {src} spectrum itself against the {dst} spectrum blurred to {src}'s LSF, the fits "
                       f"as {dst} renders them blurred alike" if d["lsf_of"] == [src] else f"at the LSF of {d['lsf_of']}")
                lines.append(f"      no model, {how} (on the {dst} pixels {src} reaches): RMS "
                             f"{_f(d['data_rms']['median'])} = {_f(d['data_over_own_fit'])}x the own fit "
                             f"{_f(d['self_rms']['median'])}; the model's cross {_f(d['cross_rms']['median'])} = "
                             f"{_f(d['cross_over_own_fit'])}x, {_f(d['cross_over_data'])}x the data's (n = {d['n']})"
                             + (f"; the own fit rendered through {src}'s instrument instead: "
                                f"{_f(d['self_through_source_rms']['median'])}" if "self_through_source_rms" in d else ""))
            else:
                lines.append(f"      no model: {d['note']}")
            o = e["overlap"]
            lines.append(f"      only where the {src} spectrum has pixels: cross {_f(o['cross_rms']['median'])}, own fit "
                         f"{_f(o['self_rms']['median'])}, ratio {_f(o['ratio_of_medians'])}")
        lt = pairs["latent"]
        lines.append(f"  latent distance: same star {_f(lt['same_star']['median'])} (n = {lt['same_star']['n']}), "
                     f"random stars {_f(lt['random_pairs']['median'])} (n = {lt['random_pairs']['n']}; across the two "
                     f"instruments {_f(lt['random_pairs_across_instruments']['median'])}); ratio {_f(lt['ratio'])} "
                     f"(target <= {lt['target']}: {'met' if lt['meets_target'] else 'NOT met'}; across instruments "
                     f"{_f(lt['ratio_across_instruments'])})")
        lines.append(f"  per star (cross RMS {a}->{b}/{b}->{a}, own fit {b}/{a}, latent distance dz): " + "; ".join(
            f"{r['star_id']} cross {_f(r[f'cross_rms_{a}_to_{b}'], 2)}/{_f(r[f'cross_rms_{b}_to_{a}'], 2)} "
            f"self {_f(r[f'self_rms_{b}'], 2)}/{_f(r[f'self_rms_{a}'], 2)} dz {_f(r['latent_distance'], 2)}"
            for r in pairs["stars"]))
    if epochs is not None and "nights" not in epochs:
        lines.append(f"multi-epoch: {epochs.get('note', 'not done')}")
    elif epochs is not None:
        lines.append(f"multi-epoch: {epochs.get('star_id', '')} {epochs['n_usable']} usable of {epochs['n_spectra']} "
                     "spectra")
        for n in epochs["nights"]:
            if not n["usable"]:
                lines.append(f"  {n['key']} (MJD {n['mjd']}): no usable pixels")
                continue
            lines.append(f"  {n['key']} (MJD {_f(n['mjd'], 6)}, S/N {_f(n['snr'])}): RV {_kms(n['rv_kms'])} +- "
                         f"{_kms(n['rv_err_kms'])} km/s alone, {_kms(n.get('joint_rv_kms'))} +- "
                         f"{_kms(n.get('joint_rv_err_kms'))} joint; relative to the highest-S/N night "
                         f"{_kms(n.get('rv_relative_kms'))}, model-free CCF {_kms(n.get('ccf_relative_kms'))}; chi2_nu "
                         f"{_f(n['chi2_nu'])}; latent distance to the joint {_f(n.get('latent_distance_to_joint'))}")
        if "rv" in epochs and epochs["rv"]:
            r = epochs["rv"]
            lines.append(f"  RV: weighted mean {_kms(r['weighted_mean_kms'])} km/s, scatter {_kms(r['scatter_kms'])}, "
                         f"median error {_kms(r['median_error_kms'])}, chi2_nu about a constant "
                         f"{_f(r['chi2_nu_constant'])}")
        if "latent" in epochs:
            lt = epochs["latent"]
            lines.append(f"  latent: between nights median {_f(lt['distance_between_nights']['median'])}, to the joint "
                         f"{_f(lt['distance_to_joint']['median'])} (joint latent error median "
                         f"{_f(lt['joint_latent_err_median'])}); chi2/dof of the nights' latents about the joint "
                         f"{_f(lt['chi2_per_dof'])}; between-night / random-star distance {_f(lt['ratio_to_random'])}")
    return "\n".join(lines)
