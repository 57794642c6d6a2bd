"""Radial velocities fitted by the model against the surveys' own, in matching frames.

The model fits ``v`` with ``lambda_obs = (1 + v/c) lambda_rest`` in the frame of the product's
wavelengths, so what it is compared with depends on that frame (facts from the readers, checked
against the files there):

* ``apogee_apvisit``: wavelengths are **topocentric** (not barycentric-corrected). The fitted
  velocity plus the header's barycentric correction ``BC`` (``meta["bc_kms"]``) is compared with
  ``VHELIO`` (``labels["rv_kms"]``, barycentric); APOGEE defines VHELIO = VRAD + BC. The fitted
  velocity is also compared with ``VRAD`` itself (``meta["vrad_kms"]``).
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
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from stellarfield.data.spectrum import Spectrum
from stellarfield.eval.metrics import median_offset, rv_comparison


@dataclass(frozen=True)
class RVReference:
    """One comparison: ``fitted + correction(spectrum)`` against ``reference(spectrum)`` (km/s)."""

    name: str
    description: str
    reference: Callable[[Spectrum], float]
    correction: Callable[[Spectrum], float] = lambda s: 0.0


def _meta(name: str) -> Callable[[Spectrum], float]:
    def value(spectrum: Spectrum) -> float:
        v = spectrum.meta.get(name)
        try:
            return float(v)
        except (TypeError, ValueError):
            return float("nan")

    return value


def _label(spectrum: Spectrum) -> float:
    return spectrum.label("rv_kms")


def _zero(spectrum: Spectrum) -> float:
    return 0.0


#: The comparisons of each product (the first is the headline one).
RV_REFERENCES: dict[str, list[RVReference]] = {
    "apogee_apvisit": [
        RVReference("vhelio", "fitted (topocentric) + BC (header) vs VHELIO (header; barycentric)", _label, _meta("bc_kms")),
        RVReference("vrad", "fitted (topocentric) vs VRAD (header; topocentric)", _meta("vrad_kms")),
    ],
    "galah_dr3_observed": [
        RVReference("wcs", "fitted (barycentric) vs c (CRVAL1[ext0]/CRVAL1[ext4] - 1) (barycentric)", _label),
    ],
    "galah_pipeline6": [
        RVReference("rv_com", "fitted (barycentric) vs pipeline 6 rv_com (barycentric)", _label),
    ],
    "lamost_lrs": [
        RVReference("c_z", "fitted (heliocentric) vs c * Z (header; heliocentric)", _label),
        RVReference("catalogue", "fitted (heliocentric) vs LAMOST catalogue rv", _meta("catalogue_rv_kms")),
    ],
}

_REST = RVReference("residual", "fitted residual RV of a rest-frame spectrum vs 0 (the survey shifted it by its own RV)", _zero)
_OBSERVED = RVReference("label", "fitted vs the survey's rv_kms label (frame as the survey gives it)", _label)


def references_for(product: str, frame: str) -> list[RVReference]:
    """The comparisons made for ``product`` (see the module docstring)."""
    if product in RV_REFERENCES:
        return RV_REFERENCES[product]
    return [_REST] if frame == "rest" else [_OBSERVED]


def rv_section(spectra: list[Spectrum], fits: dict[str, dict]) -> dict:
    """RV comparison of one product's test spectra: headline ``offset_kms``, ``scatter_kms``, ``n``
    (the first reference), every reference with its ``by_snr`` bins, and the median fitted
    uncertainty. ``{"fitted": False, ...}`` when the model fits no RV for this product.

    ``fits``: :func:`~stellarfield.eval.bench_model.fit_records` rows by key.
    """
    rows = [fits.get(s.key) for s in spectra]
    fitted = np.array([np.nan if r is None or r.get("rv_kms") is None else r["rv_kms"] for r in rows], dtype=np.float64)
    if not np.isfinite(fitted).any():
        return {"fitted": False, "n": 0, "n_spectra": len(spectra),
                "note": "the model fits no radial velocity for this product"}
    errors = np.array([np.nan if r is None or r.get("rv_err_kms") is None else r["rv_err_kms"] for r in rows])
    snr = np.array([s.label("snr") for s in spectra], dtype=np.float64)
    refs = references_for(spectra[0].product, spectra[0].frame)
    out: dict = {"fitted": True, "n_spectra": len(spectra), "frame": spectra[0].frame,
                 "rv_err_median_kms": median_offset(errors[np.isfinite(errors)]), "references": {}}
    for ref in refs:
        reference = np.array([ref.reference(s) for s in spectra], dtype=np.float64)
        corrected = fitted + np.array([ref.correction(s) for s in spectra], dtype=np.float64)
        result = rv_comparison(corrected, reference, snr=snr if np.isfinite(snr).any() else None)
        result["compared"] = ref.description
        result["difference_kms"] = [None if not np.isfinite(d) else float(d) for d in corrected - reference]
        result["snr"] = [None if not np.isfinite(x) else float(x) for x in snr]
        out["references"][ref.name] = result
    head = out["references"][refs[0].name]
    out.update({"offset_kms": head["offset_kms"], "scatter_kms": head["scatter_kms"], "n": head["n"],
                "compared": head["compared"]})
    return out
