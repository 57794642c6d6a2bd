"""Interchange with ``specutils`` (astropy's spectroscopy package).

:func:`to_specutils` turns a :class:`~stellarfield.spectrum.Spectrum` into
``specutils.Spectrum`` objects, one per segment (a ``SpectrumList`` when there are several:
segments keep their native grids and are never resampled onto one), and :func:`from_specutils`
turns them back. specutils 2.x calls its class ``Spectrum``; ``Spectrum1D`` is a deprecated alias
and is not used here.

Conventions on the specutils side:

* ``spectral_axis``: vacuum wavelength in Angstrom, as in the record (``meta["medium"] = "vacuum"``);
* ``flux``: the record's flux with ``flux_unit`` as an astropy unit (dimensionless for ``""``).
  A unit string astropy cannot parse (``"Flux (10^-17 erg/s/cm^2/Ang)"``) gives dimensionless
  flux with a warning; the string itself is kept in ``meta["flux_unit"]``;
* ``uncertainty``: :class:`astropy.nddata.InverseVariance` of the record's ``ivar``, in
  1 / flux unit**2; None when the product has no noise estimate (``noise_known=False``);
* ``mask``: specutils' convention, **True = bad** pixel (the record's is True = good);
* ``meta``: the record's identifiers (``object_id``, ``survey``, ``instrument``, ``product``,
  ``observation_id``, ``key``), ``segment`` (its name), ``frame`` ("rest" or "observed"),
  ``medium``, ``normalisation``, ``resolution``, ``noise_known``, ``flux_unit``, ``labels``,
  ``provenance``, the record's own meta under ``stellarfield_meta``, and ``lsf_fwhm`` (an
  Angstrom Quantity per pixel) where the segment has one.

``from_specutils(to_specutils(s))`` gives back a record equal to ``s``.
"""

from __future__ import annotations

import warnings
from typing import Any

import astropy.units as u
import numpy as np
from astropy.nddata import InverseVariance

from stellarfield.physics.air_vacuum import air_to_vacuum
from stellarfield.spectrum import Segment, Spectrum

MEDIA = ("vacuum", "air")


def _specutils():
    import specutils

    return specutils


def _flux_unit(flux_unit: str) -> tuple[u.UnitBase, bool]:
    """(astropy unit, parsed?) of a record's flux unit string; dimensionless if it cannot be parsed."""
    if not flux_unit:
        return u.dimensionless_unscaled, True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", u.UnitsWarning)  # e.g. "multiple slashes" in FITS strings
            return u.Unit(flux_unit), True
    except ValueError:
        return u.dimensionless_unscaled, False


def _segment_meta(spectrum: Spectrum, segment: Segment) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "object_id": spectrum.object_id,
        "survey": spectrum.survey,
        "instrument": spectrum.instrument,
        "product": spectrum.product,
        "observation_id": spectrum.observation_id,
        "key": spectrum.key,
        "segment": segment.name,
        "frame": spectrum.frame,
        "medium": "vacuum",
        "normalisation": spectrum.normalisation,
        "resolution": spectrum.resolution,
        "noise_known": spectrum.noise_known,
        "flux_unit": spectrum.flux_unit,
        "labels": dict(spectrum.labels),
        "provenance": dict(spectrum.provenance),
        "stellarfield_meta": dict(spectrum.meta),
    }
    if segment.lsf_fwhm is not None:
        meta["lsf_fwhm"] = segment.lsf_fwhm.copy() * u.AA
    return meta


def to_specutils(spectrum: Spectrum):
    """``specutils.Spectrum`` of a one-segment record, else a ``specutils.SpectrumList`` (one per segment).

    See the module docstring for the conventions (vacuum Angstrom, InverseVariance, mask True = bad).
    """
    specutils = _specutils()
    unit, parsed = _flux_unit(spectrum.flux_unit)
    if not parsed:
        warnings.warn(
            f"{spectrum.key}: astropy cannot parse the flux unit {spectrum.flux_unit!r}; the specutils "
            "flux is dimensionless and the unit string is kept in meta['flux_unit']",
            stacklevel=2,
        )
    out = []
    for segment in spectrum.segments:
        uncertainty = None
        if spectrum.noise_known:
            uncertainty = InverseVariance(segment.ivar.copy(), unit=unit**-2)
        out.append(
            specutils.Spectrum(
                flux=segment.flux.copy() * unit,
                spectral_axis=segment.wavelength.copy() * u.AA,
                uncertainty=uncertainty,
                mask=~segment.mask,
                meta=_segment_meta(spectrum, segment),
            )
        )
    return out[0] if len(out) == 1 else specutils.SpectrumList(out)


def _declared_medium(meta: dict) -> str | None:
    """'air' or 'vacuum' if ``meta`` (or a FITS header in ``meta["header"]``) says which, else None."""
    sources = [meta]
    header = meta.get("header")
    if header is not None and hasattr(header, "get"):
        sources.append(header)
    for source in sources:
        for key in ("medium", "MEDIUM", "airorvac", "AIRORVAC"):
            value = source.get(key)
            if isinstance(value, str):
                value = value.strip().lower()
                if value.startswith("vac"):
                    return "vacuum"
                if value == "air":
                    return "air"
        value = source.get("VACUUM")  # some FITS writers give a boolean VACUUM keyword
        if isinstance(value, (bool, np.bool_)):
            return "vacuum" if value else "air"
    return None


def _record_flux_unit(unit: u.UnitBase, meta_unit: Any) -> str:
    """The record's flux unit string: the original string from meta where it still describes ``unit``."""
    if isinstance(meta_unit, str):
        parsed_unit, parsed = _flux_unit(meta_unit)
        if not parsed and unit == u.dimensionless_unscaled:
            return meta_unit  # the unparseable string that to_specutils could not attach
        if parsed and parsed_unit == unit:
            return meta_unit
    return "" if unit == u.dimensionless_unscaled else unit.to_string()


def _segment_from_specutils(spec, name: str, medium: str, flux_unit: u.UnitBase) -> Segment:
    if spec.flux.ndim != 1:
        raise ValueError(f"segment {name!r}: flux has shape {spec.flux.shape}; only 1-D spectra can be converted")
    wavelength = spec.spectral_axis.to_value(u.AA, equivalencies=u.spectral())
    wavelength = np.asarray(wavelength, dtype=np.float64)
    air_wavelength = None
    if medium == "air":
        air_wavelength = wavelength
        wavelength = air_to_vacuum(wavelength)
    flux = np.asarray(spec.flux.to_value(flux_unit))

    if spec.uncertainty is None:
        ivar = np.zeros(flux.shape, dtype=np.float32)
    else:
        inverse_variance = spec.uncertainty
        if not isinstance(inverse_variance, InverseVariance):  # (represent_as would round ivar -> var -> ivar)
            with np.errstate(divide="ignore", invalid="ignore"):  # zero errors -> infinite ivar -> bad pixel
                inverse_variance = inverse_variance.represent_as(InverseVariance)
        ivar_unit = flux_unit**-2
        if inverse_variance.unit is None or inverse_variance.unit == ivar_unit:
            ivar = np.asarray(inverse_variance.array)  # no conversion, no rounding of a 1.0 scale
        else:
            ivar = inverse_variance.quantity.to_value(ivar_unit)

    good = np.ones(flux.shape, dtype=bool) if spec.mask is None else ~np.asarray(spec.mask).astype(bool)

    lsf = spec.meta.get("lsf_fwhm")
    if lsf is not None:
        lsf = lsf.to_value(u.AA) if isinstance(lsf, u.Quantity) else np.asarray(lsf, dtype=np.float64)
        if air_wavelength is not None:
            # A width in air Angstrom is n(lambda) times shorter than in vacuum Angstrom.
            lsf = lsf * (wavelength / air_wavelength)

    if wavelength.shape[0] > 1 and wavelength[0] > wavelength[-1]:  # frequency or descending axes
        wavelength, flux, ivar, good = wavelength[::-1], flux[::-1], ivar[::-1], good[::-1]
        lsf = None if lsf is None else lsf[::-1]
    return Segment(name, wavelength, flux, ivar, good, lsf)


def from_specutils(
    spec,
    *,
    object_id: str | None = None,
    survey: str | None = None,
    instrument: str | None = None,
    product: str | None = None,
    frame: str | None = None,
    normalisation: str | None = None,
    observation_id: str | None = None,
    resolution: float | None = None,
    noise_known: bool | None = None,
    labels: dict[str, float] | None = None,
    provenance: dict[str, str] | None = None,
    meta: dict[str, Any] | None = None,
    medium: str | None = None,
    segment_names: list[str] | None = None,
) -> Spectrum:
    """A record from a ``specutils.Spectrum`` (one segment) or ``SpectrumList`` (one segment each).

    Every keyword given wins; a keyword left out is taken from the specutils ``meta`` as
    :func:`to_specutils` writes it, and ``object_id``, ``survey``, ``instrument``, ``product``,
    ``frame`` and ``normalisation`` must come from one or the other.

    The spectral axis is converted to Angstrom (any length, frequency or wavenumber unit) and put
    in increasing order. Its medium is never guessed, and wavelengths are converted only when the
    caller says so: ``medium="air"`` converts air to vacuum (Morton 2000,
    :func:`stellarfield.physics.air_vacuum.air_to_vacuum`), ``medium="vacuum"`` takes them as they
    are. Without the argument the meta must say vacuum (``meta["medium"]`` as :func:`to_specutils`
    writes it, or an ``AIRORVAC`` / ``VACUUM`` keyword of a FITS header in ``meta["header"]``);
    meta that says air, or says nothing, raises ``ValueError`` asking for ``medium``.

    Without an ``uncertainty`` the record has ivar 0 everywhere and ``noise_known=False``.
    """
    specutils = _specutils()
    if isinstance(spec, specutils.SpectrumList):
        pieces = list(spec)
    elif isinstance(spec, specutils.Spectrum):
        pieces = [spec]
    else:
        raise TypeError(f"expected a specutils Spectrum or SpectrumList, got {type(spec).__name__}")
    if not pieces:
        raise ValueError("the SpectrumList is empty")
    first_meta = dict(pieces[0].meta or {})

    def pick(name: str, given: Any, required: bool = False, default: Any = None) -> Any:
        if given is not None:
            return given
        if name in first_meta and first_meta[name] is not None:
            return first_meta[name]
        if required:
            raise ValueError(f"{name} is not in the spectrum's meta; pass {name}=...")
        return default

    if medium is None:
        declared = {_declared_medium(dict(p.meta or {})) for p in pieces}
        if declared == {"air"}:
            raise ValueError(
                "the spectrum's meta says its wavelengths are in air; pass medium='air' to convert them "
                "to vacuum (Morton 2000), or medium='vacuum' if the meta is wrong"
            )
        if declared != {"vacuum"}:
            raise ValueError(
                "the wavelength medium (air or vacuum) is not recorded in the spectrum's meta; "
                "pass medium='vacuum', or medium='air' to convert air wavelengths to vacuum (Morton 2000)"
            )
        medium = "vacuum"
    if medium not in MEDIA:
        raise ValueError(f"medium must be one of {MEDIA}, got {medium!r}")

    flux_unit = pieces[0].flux.unit
    if segment_names is None:
        default_names = ["full"] if len(pieces) == 1 else [f"segment{i}" for i in range(len(pieces))]
        segment_names = [str((p.meta or {}).get("segment", d)) for p, d in zip(pieces, default_names)]
    if len(segment_names) != len(pieces):
        raise ValueError(f"{len(segment_names)} segment_names for {len(pieces)} spectra")
    segments = [
        _segment_from_specutils(p, name, medium, flux_unit) for p, name in zip(pieces, segment_names)
    ]

    has_uncertainty = all(p.uncertainty is not None for p in pieces)
    return Spectrum(
        object_id=str(pick("object_id", object_id, required=True)),
        survey=pick("survey", survey, required=True),
        instrument=pick("instrument", instrument, required=True),
        product=pick("product", product, required=True),
        segments=segments,
        frame=pick("frame", frame, required=True),
        normalisation=pick("normalisation", normalisation, required=True),
        observation_id=pick("observation_id", observation_id),
        resolution=pick("resolution", resolution),
        noise_known=bool(pick("noise_known", noise_known, default=has_uncertainty)),
        flux_unit=_record_flux_unit(flux_unit, first_meta.get("flux_unit")),
        labels=dict(pick("labels", labels, default={})),
        provenance=dict(pick("provenance", provenance, default={})),
        meta=dict(pick("stellarfield_meta", meta, default={})),
    )
