"""The bench report as typed data: one dataclass per section of ``report.json``.

:mod:`.run` builds a :class:`BenchReport`, :mod:`.report` renders it (``metrics.json``,
``report.md``), and :meth:`BenchReport.to_json` is the one path to ``report.json``: every class's
``to_dict()`` gives its part of the file, keys in the file's order.

=====================  ===================================================================
``report.json`` key     class
=====================  ===================================================================
``reconstruction``      ``{product: ReconstructionRow}`` (each method a :class:`MethodScores`,
                        the PCAs' fit a :class:`PCAFit`)
``rv``                  ``{product: RVComparison}``
``probes``              :class:`ProbesSection` (``{source: ProbeResult}``,
                        ``{target: CrossSourceResult}``)
``realism``             :class:`RealismSection` (``{product: RealismResult}``)
``speed``               :class:`SpeedResult`
``pairs``               :class:`PairsResult`
``inputs``              :class:`BenchInputs` (with :class:`Machine`)
``timing``, ``plots``   ``{stage_s: seconds}``, ``[path]``
=====================  ===================================================================

An entry that was not measured is a :class:`NotDone` (``{"note": why, ...counts}``). What the
measurements of :mod:`stellarfield.eval` return is kept as they return it (percentile summaries,
probe scores, the realism and pairs numbers, a reference's RV comparison): plain dicts inside the
typed entries.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from stellarfield.eval.report_text import finite_or_none


@dataclass
class NotDone:
    """An entry that was not measured: why (``note``), and the counts behind it (``{"n_real": 3}``)."""

    note: str
    counts: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"note": self.note, **self.counts}


def _to_dict(value):
    """``value.to_dict()`` for a section class, dicts and lists element by element, else ``value``."""
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, dict):
        return {k: _to_dict(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_dict(v) for v in value]
    return value


def _finite_copy(value):
    """A copy of ``value`` (section classes included) with every number JSON-safe
    (:func:`~stellarfield.eval.report_text.finite_or_none`: NaN and infinities as None)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: _finite_copy(getattr(value, f.name))
                                            for f in dataclasses.fields(value) if f.init})
    if isinstance(value, dict):
        return {k: _finite_copy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_copy(v) for v in value]
    return finite_or_none(value)


# --- reconstruction -------------------------------------------------------------------------
@dataclass
class PCAFit:
    """How one PCA baseline of a product was fitted (:class:`~stellarfield.eval.baselines.PCABaseline`)."""

    n_components: int
    weighted_pca: bool
    normalisation: str
    n_train: int  # train spectra it was fitted on
    n_train_loaded: int  # train spectra it drew them from
    em_iterations: int | None
    em_max_iter: int  # 0 for the plain PCA
    fit_seconds: float
    grid_pixels_modelled: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class MethodScores:
    """One method's scores on one product's test spectra (model, weighted or plain PCA).

    ``scores``: :func:`~stellarfield.eval.reconstruction.summarize_reconstructions` (``n``, ``grid``,
    ``n_params``, ``chi2_nu``, ``chi2_nu_by_segment``, ``median_abs_residual``, ``rms_residual``).
    """

    scores: dict
    pixels_scored_fraction: dict  # percentile summary over spectra
    pca_fit: PCAFit | None = None  # the PCAs'
    chi2_nu_fit: dict | None = None  # the model's own chi2_nu (its pixels and parameter count)

    def get(self, key: str, default=None):
        """A number of the report entry by its key in ``report.json`` (``chi2_nu``, ``n_components`` ...)."""
        return self.to_dict().get(key, default)

    def to_dict(self) -> dict:
        out = {**self.scores, "pixels_scored_fraction": self.pixels_scored_fraction}
        if self.pca_fit is not None:
            out.update(self.pca_fit.to_dict())
        if self.chi2_nu_fit is not None:
            out["chi2_nu_fit"] = self.chi2_nu_fit
        return out


@dataclass
class ReconstructionRow:
    """Held-out reconstruction of one product: the model and the PCAs (``methods``: report key ->
    scores, in the order model, pca, pca_plain)."""

    n_test: int
    n_train: int
    n_train_available: int
    model_trained_on_product: bool
    pca_components_requested: int
    methods: dict[str, MethodScores] = field(default_factory=dict)
    fit_ms_per_spectrum: float = float("nan")
    pca_note: str | None = None  # why no PCA was fitted

    def to_dict(self) -> dict:
        out: dict = {"n_test": self.n_test, "n_train": self.n_train, "n_train_available": self.n_train_available,
                     "model_trained_on_product": self.model_trained_on_product,
                     "pca_components_requested": self.pca_components_requested}
        if self.pca_note is not None:
            out["pca_note"] = self.pca_note
        out.update({method: scores.to_dict() for method, scores in self.methods.items()})
        out["fit_ms_per_spectrum"] = self.fit_ms_per_spectrum
        return out


# --- rv -------------------------------------------------------------------------------------
@dataclass
class RVComparison:
    """Fitted RVs of one product's test spectra against the survey's, frame by frame (:mod:`.rv`).

    ``references``: comparison name -> :func:`~stellarfield.eval.metrics.rv_comparison` with
    ``compared``, ``outliers``, the pull, ``repeats``, ``difference_kms`` and ``snr``; the first is
    the headline (``offset_kms``, ``scatter_kms``, ``n``, ``compared``, ``outliers``).
    """

    fitted: bool
    n_spectra: int
    frame: str | None = None
    rv_err_median_kms: float | None = None
    references: dict[str, dict] = field(default_factory=dict)
    n_apstar_matched: int | None = None  # apVisit: visits matched in their stars' apStar files
    note: str | None = None  # why not fitted

    @property
    def headline(self) -> dict:
        return next(iter(self.references.values())) if self.references else {}

    @property
    def offset_kms(self):
        return self.headline.get("offset_kms")

    @property
    def scatter_kms(self):
        return self.headline.get("scatter_kms")

    @property
    def n(self) -> int:
        return self.headline.get("n", 0) if self.fitted else 0

    @property
    def compared(self):
        return self.headline.get("compared")

    @property
    def outliers(self):
        return self.headline.get("outliers")

    def to_dict(self) -> dict:
        if not self.fitted:
            return {"fitted": False, "n": 0, "n_spectra": self.n_spectra, "note": self.note}
        head = self.headline
        out = {"fitted": True, "n_spectra": self.n_spectra, "frame": self.frame,
               "rv_err_median_kms": self.rv_err_median_kms, "references": self.references,
               **{k: head[k] for k in ("offset_kms", "scatter_kms", "n", "compared", "outliers")}}
        if self.n_apstar_matched is not None:
            out["n_apstar_matched"] = self.n_apstar_matched
        return out


# --- probes ---------------------------------------------------------------------------------
@dataclass
class ProbeResult:
    """Label probes of one source product: ``features`` maps a feature set (``latent``, ``pca``,
    ``pca_plain``) to label -> 10-NN scores with the ridge's under ``ridge``
    (:func:`~stellarfield.eval.probes.evaluate_probes`)."""

    n_train: int
    n_test: int
    model_trained_on_product: bool
    k: int
    features: dict[str, dict[str, dict]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"n_train": self.n_train, "n_test": self.n_test,
                "model_trained_on_product": self.model_trained_on_product, "k": self.k, **self.features}


@dataclass
class CrossSourceResult:
    """The cross-source probe on one target: ``probes`` is
    :func:`~stellarfield.eval.probes.cross_source_probe` (``cross`` and ``self``, each ``knn`` and ``ridge``)."""

    source: str
    n_source_train: int
    n_target_train: int
    n_target_test: int
    probes: dict = field(default_factory=dict)

    @property
    def cross(self) -> dict:
        return self.probes["cross"]

    @property
    def own(self) -> dict:
        """The target's own probe (``self`` in the report)."""
        return self.probes["self"]

    def to_dict(self) -> dict:
        return {"source": self.source, "n_source_train": self.n_source_train, "n_target_train": self.n_target_train,
                "n_target_test": self.n_target_test, **self.probes}


@dataclass
class ProbesSection:
    """What the latent knows: probes per source, the cross-source probe per target, and the
    latent-neighbour agreement per target (label -> :func:`~stellarfield.eval.probes.latent_neighbour_agreement`)."""

    sources: dict[str, ProbeResult | NotDone] = field(default_factory=dict)
    cross_source: dict[str, CrossSourceResult | NotDone] = field(default_factory=dict)
    neighbour_agreement: dict[str, dict] = field(default_factory=dict)
    cross_source_note: str | None = None  # why no cross-source probe at all

    def to_dict(self) -> dict:
        cross = _to_dict(self.cross_source)
        if self.cross_source_note is not None:
            cross["note"] = self.cross_source_note
        return {"sources": _to_dict(self.sources), "cross_source": cross,
                "neighbour_agreement": self.neighbour_agreement}


# --- realism --------------------------------------------------------------------------------
@dataclass
class RealismResult:
    """Generated vs held-out real spectra of one product: ``values`` as
    :func:`~stellarfield.eval.realism.realism_for_product` returns them (``n_real``, ``n_generated``,
    ``c2st_auc`` ..., ``noise``, ``lines``)."""

    values: dict

    @property
    def c2st_auc(self):
        return self.values.get("c2st_auc")

    @property
    def noise(self) -> dict:
        return self.values.get("noise") or {}

    @property
    def lines(self) -> dict:
        return self.values.get("lines", {})

    def to_dict(self) -> dict:
        return dict(self.values)


@dataclass
class RealismSection:
    """Per product, a :class:`RealismResult` or why not; or, for the whole section, why not (``note``:
    the model has no prior)."""

    products: dict[str, RealismResult | NotDone] = field(default_factory=dict)
    note: str | None = None

    def to_dict(self) -> dict:
        return {"note": self.note} if self.note is not None else _to_dict(self.products)


# --- speed ----------------------------------------------------------------------------------
@dataclass
class FitTime:
    """Fit time per spectrum of one product."""

    ms: float
    n: int

    def to_dict(self) -> dict:
        return {"ms": self.ms, "n": self.n}


@dataclass
class SpeedResult:
    """Generation (model vs Payne, on the CPU; ``per_product``: grid ->
    :func:`~stellarfield.eval.speed.generation_speed`), fits, and training (the run's summary.json)."""

    headline_grid: str | None
    model_spectra_per_s: float | None
    payne_spectra_per_s: float | None
    pixels: int | None
    batch: int
    per_product: dict[str, dict]
    fit_ms_per_spectrum: float
    fit_n: int
    fit_refine_steps: int
    fit_ms_per_spectrum_by_product: dict[str, FitTime]
    train_spectra_per_s: float | None
    train_steps: int | None
    train_seconds: float | None
    train_world_size: int | None
    cpu_cores: int | None
    torch_threads: int
    generation_device: str
    fit_device: str
    train_note: str | None = None  # summary.json not found

    def to_dict(self) -> dict:
        out = {f.name: _to_dict(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "train_note"}
        if self.train_note is not None:
            out["train_note"] = self.train_note
        return out


# --- pairs ----------------------------------------------------------------------------------
@dataclass
class PairsResult:
    """One star, two instruments: ``pairs`` is :func:`~stellarfield.eval.pairs.pairs_section`;
    ``multi_epoch`` :func:`~stellarfield.eval.pairs.multi_epoch_section` of ``star_id``, or
    ``multi_epoch_note`` where the datasets do not hold that star."""

    pairs: dict
    star_id: str | None = None
    multi_epoch: dict | None = None
    multi_epoch_note: str | None = None

    @property
    def epochs(self) -> dict:
        """The ``multi_epoch`` entry of the report."""
        if self.multi_epoch is None:
            return {"note": self.multi_epoch_note}
        return {"star_id": self.star_id, **self.multi_epoch}

    def to_dict(self) -> dict:
        return {"pairs": self.pairs, "multi_epoch": self.epochs}


# --- inputs and the report ------------------------------------------------------------------
@dataclass
class Machine:
    cpu_cores: int | None
    torch_threads: int
    python: str
    torch: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class BenchInputs:
    """What was measured, on what, with which options (``options``: :class:`~.run.BenchOptions`)."""

    model: str
    device: str  # where the model ran
    model_products: list[str]
    latent_dim: int
    train_config: dict
    datasets: list[str]
    options: Any
    test_counts: dict[str, int]
    test_available: dict[str, int]
    train_counts: dict[str, int]
    train_available: dict[str, int]
    scored_keys: dict[str, list[str]]
    machine: Machine

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["options"] = dataclasses.asdict(self.options) if dataclasses.is_dataclass(self.options) else self.options
        out["machine"] = self.machine.to_dict()
        return out


@dataclass
class BenchReport:
    """The whole report (``report.json``, in this order)."""

    reconstruction: dict[str, ReconstructionRow]
    rv: dict[str, RVComparison]
    probes: ProbesSection
    realism: RealismSection
    speed: SpeedResult
    pairs: PairsResult
    inputs: BenchInputs
    timing: dict[str, float] = field(default_factory=dict)  # stage_s -> seconds
    plots: list[str] = field(default_factory=list)  # paths in the report folder

    def finite(self) -> BenchReport:
        """A copy whose numbers are JSON-safe (NaN and infinities as None), as ``report.json`` holds them."""
        return _finite_copy(self)

    def to_dict(self) -> dict:
        return {f.name: _to_dict(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def to_json(self) -> dict:
        """``report.json``: :meth:`to_dict` with NaN and infinities as null."""
        return finite_or_none(self.to_dict())
