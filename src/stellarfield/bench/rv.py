"""Radial velocities fitted by the model against the surveys' own, in matching frames.

The model fits ``v`` with ``lambda_obs = (1 + v/c) lambda_rest`` in the frame of the product's
wavelengths, so what it is compared with depends on that frame (facts from the readers, checked
against the files there):

* ``apogee_apvisit``: wavelengths are **topocentric** (not barycentric-corrected); APOGEE defines
  VHELIO = VRAD + BC (barycentric correction). Three comparisons:

  1. ``apstar_vhelio`` (the headline, where the star's apStar file is found): fitted + ``BC<k>`` vs
     ``VHELIO<k>``, the per-visit barycentric velocity in the primary header of the star's **apStar**
     file (its visit ``k`` being the one whose ``SFILE<k>`` names this visit's plate-MJD-fiber), with
     that visit's ``VERR<k>`` as the survey's error (:func:`apstar_visit_velocities`). The apStar
     values come from the star-level RV fit of all visits together and are the reliable ones: DR13
     visit headers hold absurd velocities for some M dwarfs here (VHELIO 596 km/s in
     apVisit-2M00452143+1634446-0 where the apStar says 7.2 km/s for that visit;
     ``shared/data/apogee/NOTES.md``). apStar files are looked for in ``apstar_folders``, else in
     the folder ``apstar`` next to the visit file's folder (the layout of ``shared/data/apogee``) and
     in the visit file's own folder, as ``a[ps]Star-*-<APOGEE_ID>.fits``;
  2. ``vhelio``: fitted + the visit header's ``BC`` (``meta["bc_kms"]``) vs the visit header's
     ``VHELIO`` (``labels["rv_kms"]``): unreliable in DR13, kept to show it; the headline when no
     apStar file matches;
  3. ``vrad``: fitted vs the visit header's ``VRAD`` (``meta["vrad_kms"]``), both topocentric.
* ``galah_dr3_observed``: wavelengths are barycentric (ext 0); compared with
  c (CRVAL1[ext 0] / CRVAL1[ext 4] - 1), the RV implied by the two WCSs (``labels["rv_kms"]``).
* ``galah_pipeline6``: barycentric wavelengths; compared with pipeline 6's ``rv_com``.
* ``lamost_lrs``: wavelengths are heliocentric (header ``HELIO = T``); compared with c * Z
  (``labels["rv_kms"]``) and with the catalogue ``rv`` where present (``meta["catalogue_rv_kms"]``).
  Heliocentric and barycentric velocities differ by < 0.03 km/s (the Sun's motion about the
  barycentre), negligible here.
* rest-frame products (apStar, aspcapStar, GALAH DR3 normalised): the survey already shifted the
  spectrum by its own RV; the model fits only a small residual, compared with 0.
* other observed-frame products: compared with ``labels["rv_kms"]`` as the survey gives it.

Products for which the model fits no RV (Gaia XP at R ~ 50; rest-frame products whose LSF is wider
than the residual range, MILES) are listed as such.

Every comparison reports the median offset and the robust scatter (1.4826 MAD) of fitted - reference,
by S/N bin too, and ``outliers``: among spectra with S/N > :data:`OUTLIER_SNR_MIN` (the survey's S/N
label), how many fits are more than 5 sigma from the survey's value, sigma being the fit's error
(chi2 curvature) and the survey's error in quadrature (the fit's alone where the survey gives none);
also counted after removing the median offset (a zero-point difference between the model's rest
frame and the survey's templates moves every spectrum alike). Where the survey states its errors,
``pull_scatter`` (:func:`pull_scatter`) says whether the differences are what both stated errors
predict: a scatter of fitted - reference can be the survey's own (LAMOST's c * Z has a median error
of 7 km/s on the DR8 files here, the DR1 catalogue's rv 12 km/s). Stars observed more than once give
the precision of each side free of zero points (``repeats``, :func:`repeat_scatter`).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stellarfield.bench.sections import RVComparison
from stellarfield.eval.metrics import median_offset, robust_scatter, rv_comparison
from stellarfield.io.profile import RVReferenceKeys
from stellarfield.io.readers.apogee import visit_key
from stellarfield.io.registry import product_profile
from stellarfield.spectrum import Spectrum

#: Spectra above this S/N are checked for fits far (5 sigma) from the survey's value.
OUTLIER_SNR_MIN = 20.0
OUTLIER_SIGMAS = 5.0


@dataclass(frozen=True)
class RVReference:
    """One comparison: ``fitted + correction(spectrum)`` against ``reference(spectrum)`` (km/s)."""

    name: str
    description: str
    reference: Callable[[Spectrum], float]
    correction: Callable[[Spectrum], float] = lambda s: 0.0
    error: Callable[[Spectrum], float] = lambda s: float("nan")  # the survey's 1-sigma (km/s), NaN if not given
    topocentric: bool = False  # both sides topocentric: a star's values move between visits (no repeats)


def _meta(name: str) -> Callable[[Spectrum], float]:
    """The record's ``meta[name]`` as a float (NaN where missing or not a number)."""

    def value(spectrum: Spectrum) -> float:
        v = spectrum.meta.get(name)
        try:
            return float(v)
        except (TypeError, ValueError):
            return float("nan")

    return value


def _label(spectrum: Spectrum) -> float:
    return spectrum.label("rv_kms")


def _value_of(key: str) -> Callable[[Spectrum], float]:
    """The value a :class:`~stellarfield.io.profile.RVReferenceKeys` key names: ``"labels.<name>"``
    or ``"meta.<key>"``."""
    where, name = key.split(".", 1)
    return (lambda s: s.label(name)) if where == "labels" else _meta(name)


def from_keys(keys: RVReferenceKeys) -> RVReference:
    """The comparison a product profile declares."""
    correction = _value_of(keys.correction) if keys.correction else _zero
    error = _value_of(keys.error) if keys.error else _no_error
    return RVReference(keys.name, keys.description, _value_of(keys.reference), correction, error, keys.topocentric)


def _no_error(spectrum: Spectrum) -> float:
    return float("nan")


def _zero(spectrum: Spectrum) -> float:
    return 0.0


def product_references(product: str) -> list[RVReference]:
    """The comparisons ``product``'s profile declares (``rv_references``; the first is the headline),
    empty for a product without any."""
    profile = product_profile(product)
    return [from_keys(k) for k in profile.rv_references] if profile else []

_REST = RVReference("residual", "fitted residual RV of a rest-frame spectrum vs 0 (the survey shifted it by its own RV)", _zero)
_OBSERVED = RVReference("label", "fitted vs the survey's rv_kms label (frame as the survey gives it)", _label)


# --- apStar per-visit velocities --------------------------------------------------------------
_VISIT_FILE = re.compile(r"^a[ps]Visit-[^-]+-(?P<plate>[^-]+)-(?P<mjd>\d+)-(?P<fiber>\d+)(?:\.fits)?$")


def _header_value(header, key: str) -> float:
    try:
        value = float(header[key])
    except (KeyError, TypeError, ValueError):
        return float("nan")
    return value if np.isfinite(value) and value > -9999.0 else float("nan")  # -9999: not measured


@functools.lru_cache(maxsize=256)
def _apstar_visits(path: str, mtime: float) -> dict[str, dict]:
    from astropy.io import fits

    header = fits.getheader(path, 0)
    out = {}
    n_visits = _header_value(header, "NVISITS")
    for k in range(1, int(n_visits) + 1 if np.isfinite(n_visits) else 1):
        match = _VISIT_FILE.match(Path(str(header.get(f"SFILE{k}", "")).strip()).name)
        if match is None:
            continue
        out[visit_key(match["plate"], match["mjd"], match["fiber"])] = {
            "object_id": str(header.get("OBJID", "")).strip(), "visit": k, "file": path,
            "vhelio_kms": _header_value(header, f"VHELIO{k}"), "verr_kms": _header_value(header, f"VERR{k}"),
            "bc_kms": _header_value(header, f"BC{k}"), "vrad_kms": _header_value(header, f"VRAD{k}"),
            "snr": _header_value(header, f"SNRVIS{k}"),
        }
    return out


def apstar_visit_velocities(path: str | Path) -> dict[str, dict]:
    """The per-visit velocities in an apStar file's primary header, by visit (``"plate-mjd-fiber"``,
    the apVisit records' ``observation_id``, from ``SFILE<k>``): ``vhelio_kms`` (``VHELIO<k>``,
    barycentric), ``verr_kms`` (``VERR<k>``), ``bc_kms`` (``BC<k>``), ``vrad_kms`` (``VRAD<k>``,
    topocentric), ``snr`` (``SNRVIS<k>``), ``object_id``, ``visit`` (k), ``file``. DR13 and DR17
    apStar headers both carry these keys, for one visit too. Headers only; cached per file."""
    path = Path(path)
    return _apstar_visits(str(path), path.stat().st_mtime)


def _apstar_files(object_id: str, folders: Iterable[Path]) -> list[Path]:
    return sorted({f for folder in folders if folder.is_dir() for f in folder.glob(f"a[ps]Star-*-{object_id}.fits")})


def apstar_visit_table(spectra: list[Spectrum], apstar_folders: Iterable[str | Path] | None = None) -> dict[str, dict]:
    """For each apVisit record of ``spectra`` whose star has an apStar file listing that visit: its
    :func:`apstar_visit_velocities` entry, by record key. Folders: ``apstar_folders``, else the folder
    ``apstar`` next to each visit file's folder and the visit file's own folder (from its provenance)."""
    table: dict[str, dict] = {}
    given = None if apstar_folders is None else [Path(f) for f in apstar_folders]
    found: dict[tuple, list[Path]] = {}  # (star, folders) -> its apStar files: one glob per star, not per visit
    for s in spectra:
        if s.product != "apogee_apvisit" or not s.observation_id:
            continue
        folders = given
        if folders is None:
            source = (s.provenance or {}).get("file")
            if not source:
                continue
            folders = [Path(source).parent.parent / "apstar", Path(source).parent]
        where = (s.object_id, tuple(folders))
        if where not in found:
            found[where] = _apstar_files(s.object_id, folders)
        for path in found[where]:
            try:
                visits = apstar_visit_velocities(path)
            except (OSError, ValueError):  # an unreadable file is no reference
                continue
            entry = visits.get(s.observation_id)
            if entry is not None and np.isfinite(entry["vhelio_kms"]):
                table[s.key] = entry
                break
    return table


def _apogee_visit_references(visits: dict[str, dict]) -> list[RVReference]:
    """apVisit comparisons (module docstring): the apStar per-visit VHELIO first where any matched."""
    def star(name: str) -> Callable[[Spectrum], float]:
        return lambda s: float(visits.get(s.key, {}).get(name, float("nan")))

    header = product_references("apogee_apvisit")
    apstar = RVReference("apstar_vhelio", "fitted (topocentric) + BC vs the apStar file's per-visit VHELIO "
                         "(barycentric; the star's RV fit, reliable)", star("vhelio_kms"), star("bc_kms"),
                         star("verr_kms"))
    return [apstar, *header] if visits else [*header, apstar]


def references_for(product: str, frame: str, apstar_visits: dict[str, dict] | None = None) -> list[RVReference]:
    """The comparisons made for ``product`` (see the module docstring); ``apstar_visits``: the
    :func:`apstar_visit_table` of the records (apVisit only)."""
    if product == "apogee_apvisit":
        return _apogee_visit_references(apstar_visits or {})
    declared = product_references(product)
    if declared:
        return declared
    return [_REST] if frame == "rest" else [_OBSERVED]


def outlier_count(difference: np.ndarray, fitted_error: np.ndarray, survey_error: np.ndarray, snr: np.ndarray,
                  snr_min: float = OUTLIER_SNR_MIN, sigmas: float = OUTLIER_SIGMAS) -> dict:
    """Among spectra with S/N > ``snr_min`` and a finite difference and fitted error: how many have
    ``|difference| > sigmas * sigma``, sigma = fitted and survey errors in quadrature (the fitted one
    alone where the survey's is NaN); also after subtracting the median difference of those spectra."""
    survey_error = np.where(np.isfinite(survey_error), survey_error, 0.0)
    sigma = np.sqrt(fitted_error**2 + survey_error**2)
    with np.errstate(invalid="ignore"):
        use = np.isfinite(difference) & np.isfinite(sigma) & (sigma > 0) & (snr > snr_min)
    d, sg = difference[use], sigma[use]
    centred = d - (np.median(d) if d.size else 0.0)
    return {"snr_min": float(snr_min), "sigmas": float(sigmas), "n": int(use.sum()),
            "n_beyond": int((np.abs(d) > sigmas * sg).sum()),
            "n_beyond_after_offset": int((np.abs(centred) > sigmas * sg).sum()),
            "sigma_median_kms": median_offset(sg)}


def pull_scatter(difference: np.ndarray, fitted_error: np.ndarray, survey_error: np.ndarray) -> dict:
    """Robust scatter of ``difference / sigma``, sigma = the fit's and the survey's errors in
    quadrature, over spectra where both errors are given: about 1 when the differences are what the
    two stated errors predict, above 1 when something (either side) scatters more. When the survey's
    error dominates sigma, a scatter of fitted - reference near the survey's error says nothing
    about the model's precision; the pull and the repeat scatter (:func:`repeat_scatter`) do."""
    sigma = np.sqrt(fitted_error**2 + survey_error**2)
    with np.errstate(invalid="ignore"):
        use = np.isfinite(difference) & np.isfinite(fitted_error) & np.isfinite(survey_error) & (sigma > 0)
    return {"pull_scatter": robust_scatter(difference[use] / sigma[use]), "n_pull": int(use.sum()),
            "survey_error_median_kms": median_offset(survey_error[use])}


def repeat_scatter(stars: list[str], fitted: np.ndarray, reference: np.ndarray) -> dict | None:
    """Precision from repeat observations, free of the two sides' zero points: for every star with
    two or more spectra (both values finite), each velocity minus the star's mean, scaled by
    sqrt(n / (n - 1)) (so that it scatters like one measurement); the robust scatter of those
    deviations for the model (``model_kms``) and for the survey (``survey_kms``) over the same spectra.
    A star whose velocity changes between visits (a binary) widens both alike. None without repeats."""
    by_star: dict[str, list[int]] = {}
    for i, star in enumerate(stars):
        if np.isfinite(fitted[i]) and np.isfinite(reference[i]):
            by_star.setdefault(star, []).append(i)
    groups = [np.array(g) for g in by_star.values() if len(g) > 1]
    if not groups:
        return None

    def deviations(v: np.ndarray) -> np.ndarray:
        return np.concatenate([(v[g] - v[g].mean()) * np.sqrt(len(g) / (len(g) - 1)) for g in groups])

    return {"n_stars": len(groups), "n_spectra": int(sum(len(g) for g in groups)),
            "model_kms": robust_scatter(deviations(fitted)), "survey_kms": robust_scatter(deviations(reference))}


def rv_section(spectra: list[Spectrum], fits: dict[str, dict],
               apstar_folders: Iterable[str | Path] | None = None) -> RVComparison:
    """RV comparison of one product's test spectra: every reference with its ``by_snr`` bins and
    ``outliers`` (:func:`outlier_count`), the first one the headline (``offset_kms``, ``scatter_kms``,
    ``n``, ``outliers``), and the median fitted uncertainty. ``fitted`` False when the model fits
    no RV for this product.

    ``fits``: :func:`~stellarfield.bench.model.fit_records` rows by key. ``apstar_folders``:
    where to look for apVisit records' apStar files (see the module docstring).
    """
    rows = [fits.get(s.key) for s in spectra]
    fitted = np.array([np.nan if r is None or r.get("rv_kms") is None else r["rv_kms"] for r in rows], dtype=np.float64)
    if not np.isfinite(fitted).any():
        return RVComparison(fitted=False, n_spectra=len(spectra), note="the model fits no radial velocity for this product")
    errors = np.array([np.nan if r is None or r.get("rv_err_kms") is None else r["rv_err_kms"] for r in rows])
    snr = np.array([s.label("snr") for s in spectra], dtype=np.float64)
    visits = apstar_visit_table(spectra, apstar_folders) if spectra[0].product == "apogee_apvisit" else None
    refs = references_for(spectra[0].product, spectra[0].frame, visits)
    out = RVComparison(fitted=True, n_spectra=len(spectra), frame=spectra[0].frame,
                       rv_err_median_kms=median_offset(errors[np.isfinite(errors)]),
                       n_apstar_matched=None if visits is None else len(visits))
    for ref in refs:
        reference = np.array([ref.reference(s) for s in spectra], dtype=np.float64)
        corrected = fitted + np.array([ref.correction(s) for s in spectra], dtype=np.float64)
        result = rv_comparison(corrected, reference, snr=snr if np.isfinite(snr).any() else None)
        result["compared"] = ref.description
        survey_error = np.array([ref.error(s) for s in spectra], dtype=np.float64)
        result["outliers"] = outlier_count(corrected - reference, errors.astype(np.float64), survey_error, snr)
        result.update(pull_scatter(corrected - reference, errors.astype(np.float64), survey_error))
        result["repeats"] = None if ref.topocentric else repeat_scatter(
            [s.star_id or s.object_id for s in spectra], corrected, reference)
        result["difference_kms"] = [None if not np.isfinite(d) else float(d) for d in corrected - reference]
        result["snr"] = [None if not np.isfinite(x) else float(x) for x in snr]
        out.references[ref.name] = result
    return out
