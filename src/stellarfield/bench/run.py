"""``stellarfield bench``: measure a trained model on held-out spectra against baselines and the surveys.

>>> from stellarfield.bench.run import run_bench
>>> report = run_bench("runs/default", ["datasets/all", "datasets/demo"], "reports/default")   # doctest: +SKIP
>>> report["reconstruction"]["apogee_apstar"]["model"]["chi2_nu"]                           # doctest: +SKIP
{'median': ..., 'p16': ..., 'p84': ..., 'n': ...}

Rules: every number is scored on the **test** split; the PCA baseline and the label probes are
fitted on the **train** split (:mod:`.data`); nothing is tuned on the test split. Every
number carries the number of spectra (or pairs) behind it.

Sections (each a key of ``report.json`` and a class of :mod:`.sections`, written to ``out_dir``
with ``metrics.json``, the headline numbers in the schema of the issue, ``report.md`` and ``plots/``):

``reconstruction``
    Per product: the model fitted to each test spectrum (:func:`stellarfield.model.fit.fit_spectra`),
    two PCAs with K = the model's latent dimension (``decoder.latent_dim`` of the run's config)
    components fitted on the train split (:class:`stellarfield.eval.baselines.PCABaseline`, coefficients by weighted
    least squares on the native pixels): weighted EM-PCA (``pca``, the comparison) and plain PCA
    (``pca_plain``), both on every train spectrum of the product (not only the
    ``max_train_per_product`` the probes use), or on a random subset of them where ``N x pixels``
    would exceed ``pca_max_cells`` (``n_train`` says how many, :func:`pca_train_pools`). All of them
    are scored with the same observed-frame masks and normalisation
    (:func:`stellarfield.eval.reconstruction.reconstruction_from_model`) on the pixels all of them use:
    chi2_nu with the survey's errors (median, 16/84 percentiles), per segment, median |residual|,
    RMS residual (the score for MILES, which has no errors).
``rv``
    Fitted radial velocities against the surveys' own, frames matched (:mod:`.rv`).
``probes``
    Ridge and 10-nearest-neighbour regressors from the model's latents and, side by side, from the
    weighted-PCA coefficients at the same K (and the plain PCA's) to Teff, logg, [Fe/H] (and
    [alpha/M] for Gaia XP), fitted on train, scored on test (:mod:`stellarfield.eval.probes`); the cross-source probe (fitted on Gaia XP latents with their APOGEE labels,
    scored on MILES and LAMOST) next to each target's own probe, and latent-neighbour agreement.
``realism``
    Generated vs held-out real spectra per instrument, the generated ones given the instrument's
    noise and masks from real spectra: classifier two-sample AUC (and without the noise), line
    depths and equivalent widths (:mod:`stellarfield.eval.realism`).
``pairs``
    One star, two instruments (:mod:`stellarfield.eval.pairs`, :mod:`.pairs`): test-split stars with STELIB and MILES spectra,
    each spectrum fitted alone and rendered on the other's pixels (cross-prediction RMS against each
    instrument's own fit), the latent distance of a star's two spectra against random stars; the
    RVs and latent stability of the multi-epoch LAMOST MRS star where the datasets hold it.
``speed``
    Generation spectra/s vs the Payne emulator on each instrument's native grid, both on the CPU
    whatever ``device`` the bench runs on (side by side on one device), fit ms per spectrum (on
    ``device``), training spectra/s from the run's ``summary.json``, with the core and thread counts.

No physics ablation: what the observation model (RV, LSF) is worth needs a second model trained
without RV and LSF, benchmarked next to this one; that is not part of the bench (refitting this
model's decoder with its physics switched off says nothing about physics, as that decoder was
trained with it).

``device`` (``"cpu"``, ``"cuda"``, ``"auto"``; :func:`stellarfield.model.checkpoint.load_model`) is
where the model runs for the fits and the generated stars; it is recorded in ``report.json``
(``inputs.device``: the one used, ``inputs.options.device``: the one asked for).

Budget: about 15 minutes on 2 CPU cores for the default model and the shared datasets, by capping
the spectra per product (``max_per_product`` test, ``max_train_per_product`` train for the probes)
and the PCA's training matrix (``pca_max_cells`` = spectra x pixels, 16 million: 976 GALAH spectra
of 16,384 pixels, all ~32,000 train spectra of Gaia XP). The weighted EM-PCA starts from the plain PCA's SVD, so both cost
little more than one. Long stages show tqdm bars with totals and rates (``progress=False`` hides them).
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from stellarfield.bench import pairs as bench_pairs
from stellarfield.bench.data import SplitSelection, load_split
from stellarfield.bench.model import fit_records, fitted_parameters, instrument_for
from stellarfield.bench.rv import rv_section
from stellarfield.bench.sections import (
    BenchInputs,
    BenchReport,
    CrossSourceResult,
    FitTime,
    Machine,
    MethodScores,
    NotDone,
    PCAFit,
    ProbeResult,
    ProbesSection,
    RealismResult,
    RealismSection,
    ReconstructionRow,
    RVComparison,
    SpeedResult,
)
from stellarfield.eval.baselines import PCABaseline, fit_plain_and_weighted
from stellarfield.eval.metrics import summarize
from stellarfield.eval.probes import cross_source_probe, evaluate_probes, latent_neighbour_agreement
from stellarfield.eval.realism import RealismDetail, realism_for_product
from stellarfield.eval.reconstruction import (
    Reconstruction,
    on_common_pixels,
    reconstruction_from_model,
    summarize_reconstructions,
)
from stellarfield.eval.report_text import finite_or_none
from stellarfield.eval.speed import generation_speed, on_cpu
from stellarfield.io.profile import DEFAULT_PROBE_LABELS  # the cross-source probe's labels (every source has them)
from stellarfield.io.registry import product_profile
from stellarfield.model.checkpoint import TrainedModel, load_model
from stellarfield.spectrum import Spectrum

#: Products whose latents are probed, the cross-source probe's source and targets.
PROBE_SOURCES = ("gaia_xp", "miles", "lamost_lrs")
CROSS_SOURCE = "gaia_xp"
CROSS_TARGETS = ("miles", "lamost_lrs")
#: Product whose grid gives the headline generation speed (8575 pixels), else the largest grid.
HEADLINE_SPEED_PRODUCT = "apogee_apstar"
#: PCA variants: key in the report -> weighted?
PCA_KINDS = {"pca": True, "pca_plain": False}
PCA_CHOICES = ("both", "weighted", "plain")


def probe_labels(product: str) -> tuple[str, ...]:
    """Labels the latent-space probe of ``product`` predicts: its profile's ``probe_labels``
    (:data:`DEFAULT_PROBE_LABELS` for a product without a profile)."""
    profile = product_profile(product)
    return profile.probe_labels if profile else DEFAULT_PROBE_LABELS


class BenchInputError(ValueError):
    """Data a bench cannot run on (no test-split spectra, ...); the message says what is missing."""


@dataclass
class BenchOptions:
    """Everything that defines a bench run besides the model and the data (saved in the report)."""

    max_per_product: int | None = 500  # test spectra per product
    # train spectra per product the probes are fitted on (the PCAs use every train spectrum, up to
    # pca_max_cells): 20,000, as in issue 12's reference measurement; a 10-NN probe's error falls with
    # the number of candidate neighbours (Gaia XP Teff on validation: 194 K from 2,000, 82 K from
    # 20,000; benchmarks/probe_train_size.py)
    max_train_per_product: int | None = 20_000
    # and at most this many train spectra x pixels per product for the probes, so that high-resolution
    # products stay within memory and fitting time (APOGEE: ~1,900 spectra, GALAH: ~980; Gaia XP: 20,000)
    probe_max_cells: int | None = 16_000_000
    pca: str = "both"  # "both", "weighted" (EM-PCA, report key "pca") or "plain" (SVD, key "pca_plain")
    pca_max_cells: int | None = 16_000_000  # train spectra x pixels per PCA fit (random subset beyond)
    refine_steps: int = 100  # fit_spectra refinement steps (the same for train and test fits)
    fit_batch: int | None = None  # spectra fitted together (None: by their pixels, inference.chunk_size)
    probe_sources: tuple[str, ...] = PROBE_SOURCES
    cross_source: str = CROSS_SOURCE
    cross_targets: tuple[str, ...] = CROSS_TARGETS
    min_realism_spectra: int = 5  # real test spectra needed for a two-sample test
    min_generated: int = 32  # generated spectra per instrument (at least as many as real ones)
    speed_batch: int = 1024
    speed_repeats: int = 5
    threads: int = 1  # torch threads for the whole run (reported with the speeds)
    device: str = "cpu"  # where the model runs: "cpu", "cuda" or "auto" (the speed comparison: CPU always)
    plots: bool = True
    examples_per_product: int = 3
    seed: int = 0

    def __post_init__(self):
        if self.pca not in PCA_CHOICES:
            raise ValueError(f"pca must be one of {PCA_CHOICES}, got {self.pca!r}")

    @property
    def pca_kinds(self) -> tuple[str, ...]:
        """Report keys of the PCA variants this run fits."""
        return {"both": ("pca", "pca_plain"), "weighted": ("pca",), "plain": ("pca_plain",)}[self.pca]


# --- helpers --------------------------------------------------------------------------------
def _labels(spectra: Sequence[Spectrum], names: Sequence[str]) -> dict[str, np.ndarray]:
    return {name: np.array([s.label(name) for s in spectra], dtype=np.float64) for name in names}


def _latents(spectra: Sequence[Spectrum], fits: dict[str, dict], dim: int) -> np.ndarray:
    """(N, dim) latents of ``spectra`` (rows of NaN where the fit gave none)."""
    rows = [fits.get(s.key, {}).get("latent") for s in spectra]
    return np.stack([np.full(dim, np.nan) if z is None else z for z in rows]) if rows else np.zeros((0, dim))


@dataclass
class _Work:
    """What the sections share while the bench runs."""

    trained: TrainedModel
    options: BenchOptions
    test: SplitSelection
    train: SplitSelection
    out: Path
    fits: dict[str, dict] = field(default_factory=dict)  # test fits by key
    fit_seconds: dict[str, float] = field(default_factory=dict)
    baselines: dict[str, dict[str, PCABaseline]] = field(default_factory=dict)  # product -> kind -> baseline
    recs: dict[str, list[dict[str, Reconstruction]]] = field(default_factory=dict)
    train_fits: dict[str, dict] = field(default_factory=dict)
    pca_train: dict[str, list[Spectrum]] = field(default_factory=dict)  # product -> train spectra the PCAs draw from
    generated: dict[str, RealismDetail] = field(default_factory=dict)
    plots: list[str] = field(default_factory=list)
    progress: bool = False

    @property
    def latent_dim(self) -> int:
        """The model's latent dimension (``decoder.latent_dim`` of its config): K of the PCAs."""
        decoder = self.trained.config.get("decoder") if isinstance(self.trained.config, dict) else None
        if isinstance(decoder, dict) and decoder.get("latent_dim"):
            return int(decoder["latent_dim"])
        return int(self.trained.model.latent_dim)

    def bar(self, total: int, unit: str, desc: str):
        """A tqdm bar with a total and a unit (disabled when the run is quiet)."""
        from tqdm.auto import tqdm

        return tqdm(total=total, unit=unit, desc=desc, disable=not self.progress, dynamic_ncols=True)

    def fit(self, spectra: list[Spectrum], what: str) -> tuple[dict[str, dict], float]:
        """:func:`fit_records` with this run's settings, a progress bar over the spectra."""
        if self.progress and spectra:
            from tqdm.auto import tqdm

            tqdm.write(f"bench: fitting {len(spectra)} {what}")  # above the bars, not through them
        return fit_records(self.trained, spectra, self.options.refine_steps, self.options.fit_batch,
                           progress=self.progress)

    def known(self, product: str) -> bool:
        return product in self.trained.model.instruments


# --- sections -------------------------------------------------------------------------------
def pca_training_subset(train: list[Spectrum], max_cells: int | None, seed: int = 0) -> list[Spectrum]:
    """The train spectra a PCA is fitted on: all of them, or a random subset (drawn with
    ``default_rng(seed)``, kept in their order) of ``max_cells // pixels`` spectra (at least 2) when
    ``N x pixels`` (pixels: the median native pixel count) exceeds ``max_cells``."""
    if max_cells is None or len(train) <= 2:
        return list(train)
    pixels = max(int(np.median([s.n_pixels for s in train])), 1)
    cap = max(2, int(max_cells) // pixels)
    if len(train) <= cap:
        return list(train)
    rows = np.sort(np.random.default_rng(seed).choice(len(train), size=cap, replace=False))
    return [train[i] for i in rows]


def probe_train_caps(test: SplitSelection, opts: "BenchOptions") -> dict[str, int | None]:
    """Per product, how many train spectra the probes are fitted on: ``max_train_per_product``, fewer
    where that many spectra of the product's size (its test spectra's median pixel count) would exceed
    ``probe_max_cells``."""
    caps: dict[str, int | None] = {}
    for product, spectra in test.spectra.items():
        cap = opts.max_train_per_product
        if opts.probe_max_cells is not None and spectra:
            by_size = max(2, int(opts.probe_max_cells) // max(int(np.median([s.n_pixels for s in spectra])), 1))
            cap = by_size if cap is None else min(cap, by_size)
        caps[product] = cap
    return caps


def pca_train_pools(datasets: Sequence[str], train: SplitSelection, max_cells: int | None,
                    seed: int = 0) -> dict[str, list[Spectrum]]:
    """Per product, the train spectra its PCAs draw from: every train spectrum of the product when
    they fit in ``max_cells`` (spectra x pixels; None: no limit), else as many as fit, a random subset.

    Products whose train split was capped more tightly for the probes (``max_train_per_product``)
    are read again with their own cap (Gaia XP: all ~32,000 spectra of 343 pixels); the others use
    the spectra already loaded (``pca_training_subset`` then caps them)."""
    pools: dict[str, list[Spectrum]] = {}
    for product, loaded in train.spectra.items():
        available = train.available.get(product, len(loaded))
        pixels = max(int(np.median([s.n_pixels for s in loaded])), 1) if loaded else 1
        cap = available if max_cells is None else max(2, int(max_cells) // pixels)
        if available > len(loaded) and cap > len(loaded):
            pools[product] = load_split(datasets, "train", cap, seed, products=[product]).spectra.get(product, loaded)
        else:
            pools[product] = loaded
    return pools


def _fit_baselines(w: _Work, product: str, train: list[Spectrum]) -> dict[str, PCABaseline]:
    """The PCA baselines of one product (``{report key: baseline}``), K = the model's latent dimension."""
    o = w.options
    subset = pca_training_subset(train, o.pca_max_cells, o.seed)
    kinds = o.pca_kinds
    if len(kinds) == 2:
        pair = fit_plain_and_weighted(subset, w.latent_dim, progress=w.progress and f"weighted PCA {product}")
        return {"pca": pair["weighted"], "pca_plain": pair["plain"]}
    kind = kinds[0]
    baseline = PCABaseline(n_components=w.latent_dim, weighted=PCA_KINDS[kind])
    return {kind: baseline.fit(subset, progress=w.progress and f"PCA {product}")}


def _reconstruction(w: _Work) -> dict[str, ReconstructionRow]:
    section = {}
    bar = w.bar(len(w.test.spectra), "product", "reconstruction")
    for product, spectra in w.test.spectra.items():
        bar.set_postfix_str(product)
        fits, seconds = w.fit(spectra, f"{product} test spectra")
        w.fits.update(fits)
        w.fit_seconds[product] = seconds
        inst = instrument_for(w.trained, product, spectra)
        entry = ReconstructionRow(n_test=len(spectra), n_train=len(w.train.spectra.get(product, [])),
                                  n_train_available=w.train.available.get(product, 0),
                                  model_trained_on_product=w.known(product), pca_components_requested=w.latent_dim)

        train = w.train.spectra.get(product, [])
        pool = w.pca_train.get(product, train)
        if len(pool) >= 2:
            w.baselines[product] = _fit_baselines(w, product, pool)
        else:
            entry.pca_note = f"not done: {len(train)} training spectra (needs 2)"

        per_spectrum = []
        fit_chi2 = []
        for s in spectra:
            row = fits.get(s.key)
            if row is None or row["model_flux"] is None:
                continue
            fit_chi2.append(np.nan if row["chi2_nu"] is None else row["chi2_nu"])
            recs = {"model": reconstruction_from_model(
                s, row["model_flux"], fitted_parameters(inst, s, w.latent_dim, row["rv_kms"] is not None), row["latent"])}
            for kind, baseline in w.baselines.get(product, {}).items():
                recs[kind] = baseline.reconstruct(s, on="native")
            per_spectrum.append(on_common_pixels(recs))
        w.recs[product] = per_spectrum
        for method in ("model", *PCA_KINDS):
            recs = [r[method] for r in per_spectrum if method in r]
            if recs:
                scores = MethodScores(summarize_reconstructions(recs), summarize(
                    [r.mask.sum() / max(r.mask.size, 1) for r in recs]).to_dict())
                if method in PCA_KINDS:
                    b = w.baselines[product][method]
                    scores.pca_fit = PCAFit(n_components=b.pca.n_components_, weighted_pca=b.weighted,
                                            normalisation=b.normalisation, n_train=b.n_train, n_train_loaded=len(pool),
                                            em_iterations=b.em_iterations, em_max_iter=b.max_iter if b.weighted else 0,
                                            fit_seconds=b.fit_seconds, grid_pixels_modelled=int(b.covered.sum()))
                entry.methods[method] = scores
        if "model" in entry.methods:  # the model's own chi2_nu (its pixels and parameter count), for reference
            entry.methods["model"].chi2_nu_fit = summarize(fit_chi2).to_dict()
        entry.fit_ms_per_spectrum = 1000.0 * seconds / max(len(spectra), 1)
        section[product] = entry
        bar.update(1)
    bar.close()
    return section


def _rv(w: _Work) -> dict[str, RVComparison]:
    return {product: rv_section(spectra, w.fits) for product, spectra in w.test.spectra.items()}


def _probe_features(w: _Work, product: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"latent": (train, test), "pca": (train, test), "pca_plain": ...}`` features of a probe
    source: the model's latents and the PCAs' K coefficients (``pca``: weighted EM-PCA)."""
    train, test = w.train.spectra.get(product, []), w.test.spectra[product]
    if product not in w.train_fits:
        w.train_fits[product], _ = w.fit(train, f"{product} train spectra (probe features)")
    features = {"latent": (_latents(train, w.train_fits[product], w.latent_dim), _latents(test, w.fits, w.latent_dim))}
    for kind, b in w.baselines.get(product, {}).items():
        features[kind] = (b.coefficients(train), b.coefficients(test))
    return features


def _probes(w: _Work) -> ProbesSection:
    o = w.options
    section = ProbesSection()
    features: dict = {}
    for product in o.probe_sources:
        train, test = w.train.spectra.get(product, []), w.test.spectra.get(product, [])
        if len(train) < 2 or not test:
            section.sources[product] = NotDone(f"not done: {len(train)} train / {len(test)} test spectra")
            continue
        names = probe_labels(product)
        features[product] = _probe_features(w, product)
        entry = ProbeResult(n_train=len(train), n_test=len(test), model_trained_on_product=w.known(product),
                            k=w.latent_dim)
        for kind, (f_train, f_test) in features[product].items():
            scores = evaluate_probes(f_train, _labels(train, names), f_test, _labels(test, names), names)
            entry.features[kind] = {name: {**scores["knn"][name], "ridge": scores["ridge"][name]} for name in names}
        section.sources[product] = entry

    src = o.cross_source
    if src in features:
        names = DEFAULT_PROBE_LABELS
        src_train = w.train.spectra[src]
        z_src, y_src = features[src]["latent"][0], _labels(src_train, names)
        for target in o.cross_targets:
            if target not in features:
                section.cross_source[target] = NotDone(f"not done: no probe features for {target}")
                continue
            t_train, t_test = w.train.spectra[target], w.test.spectra[target]
            z_t_train, z_t_test = features[target]["latent"]
            result = cross_source_probe(z_src, y_src, z_t_train, _labels(t_train, names), z_t_test,
                                        _labels(t_test, names), names)
            section.cross_source[target] = CrossSourceResult(
                source=src, n_source_train=len(src_train), n_target_train=len(t_train), n_target_test=len(t_test),
                probes=result)
            section.neighbour_agreement[target] = latent_neighbour_agreement(z_src, y_src, z_t_test,
                                                                             _labels(t_test, names), names)
    else:
        section.cross_source_note = f"not done: no probe features for the source {src}"
    return section


def _realism_of(w: _Work, product: str, spectra: list[Spectrum]) -> RealismResult | NotDone:
    o = w.options
    if not w.known(product):
        return NotDone("not done: the model was not trained on this product")
    if len(spectra) < o.min_realism_spectra:
        return NotDone(f"not done: {len(spectra)} test spectra (needs {o.min_realism_spectra})", {"n_real": len(spectra)})
    rv = {s.key: w.fits.get(s.key, {}).get("rv_kms") for s in spectra}
    n_gen = max(len(spectra), o.min_generated)
    result, detail = realism_for_product(w.trained, product, spectra, rv, n_gen, seed=o.seed)
    w.generated[product] = detail
    return RealismResult(result)


def _realism(w: _Work) -> RealismSection:
    if w.trained.prior is None:
        return RealismSection(note="not done: the model has no latent prior (training stopped before fitting it)")
    section = RealismSection()
    bar = w.bar(len(w.test.spectra), "product", "realism")
    for product, spectra in w.test.spectra.items():
        bar.set_postfix_str(product)
        section.products[product] = _realism_of(w, product, spectra)
        bar.update(1)
    bar.close()
    return section


def _speed(w: _Work) -> SpeedResult:
    o = w.options
    per_product = {}
    products = sorted(w.trained.model.instruments)
    cpu = on_cpu(w.trained)  # generation timed on the CPU, side by side with the Payne emulator
    bar = w.bar(len(products), "grid", "speed")
    for product in products:
        bar.set_postfix_str(product)
        if all(s.native for s in w.trained.model.instruments[product].segments):
            per_product[product] = generation_speed(cpu, product, o.speed_batch, o.speed_repeats, o.seed)
        bar.update(1)
    bar.close()
    headline = HEADLINE_SPEED_PRODUCT if HEADLINE_SPEED_PRODUCT in per_product else (
        max(per_product, key=lambda p: per_product[p]["pixels"]) if per_product else None)
    fit_n = sum(len(w.test.spectra[p]) for p in w.fit_seconds)
    summary_path = Path(w.trained.path or "") / "summary.json"
    run_summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    return SpeedResult(
        headline_grid=headline,
        model_spectra_per_s=per_product[headline]["model_spectra_per_s"] if headline else None,
        payne_spectra_per_s=per_product[headline]["payne_spectra_per_s"] if headline else None,
        pixels=per_product[headline]["pixels"] if headline else None,
        batch=o.speed_batch,
        per_product=per_product,
        fit_ms_per_spectrum=1000.0 * sum(w.fit_seconds.values()) / max(fit_n, 1),
        fit_n=fit_n,
        fit_refine_steps=o.refine_steps,
        fit_ms_per_spectrum_by_product={
            p: FitTime(ms=1000.0 * s / max(len(w.test.spectra[p]), 1), n=len(w.test.spectra[p]))
            for p, s in w.fit_seconds.items()},
        train_spectra_per_s=run_summary.get("train_spectra_per_s"),
        train_steps=run_summary.get("steps"),
        train_seconds=run_summary.get("seconds"),
        train_world_size=run_summary.get("world_size"),
        cpu_cores=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        generation_device="cpu",  # model and Payne side by side, whatever the bench's device
        fit_device=str(w.trained.model.device),
        train_note=None if run_summary else f"{summary_path} not found: training speed unknown",
    )


# --- plots ----------------------------------------------------------------------------------
def _plots(w: _Work, rv: dict[str, RVComparison]) -> None:
    from stellarfield.eval.plots import (
        plot_gallery,
        plot_latent_projection,
        plot_line_depths,
        plot_reconstructions,
        plot_residual_profile,
        plot_rv_differences,
    )

    folder = w.out / "plots"
    names = {"model": "model", "pca": f"weighted PCA K={w.latent_dim}", "pca_plain": f"plain PCA K={w.latent_dim}"}
    for product, per_spectrum in w.recs.items():
        if not per_spectrum:
            continue
        noise = per_spectrum[0]["model"].noise_known
        series = {}
        for method, label in names.items():
            recs = [r[method] for r in per_spectrum if method in r]
            if recs:
                series[f"{label} ({len(recs)})"] = ([r.wavelength for r in recs], [r.pulls() for r in recs])
        path = folder / f"residuals_{product}.png"
        plot_residual_profile(series, out=path, ylabel="(data - model) / sigma" if noise else "data - model",
                              title=f"{product}: held-out residuals ({per_spectrum[0]['model'].wavelength.size} px, "
                                    f"{'observed' if w.test.spectra[product][0].frame == 'observed' else 'rest'} frame)")
        w.plots.append(str(path.relative_to(w.out)))
        examples = []
        for r in per_spectrum[: w.options.examples_per_product]:
            m = r["model"]
            examples.append({"wavelength": m.wavelength, "data": m.data, "mask": m.mask, "title": m.key,
                             "models": {names[k]: v.model for k, v in r.items()}})
        path = folder / f"reconstructions_{product}.png"
        plot_reconstructions(examples, out=path, title=f"{product}: held-out spectra, model vs PCA (K={w.latent_dim})")
        w.plots.append(str(path.relative_to(w.out)))

    for product, detail in w.generated.items():
        generated = detail.generated
        path = folder / f"generated_{product}.png"
        k = min(8, len(generated.flux))
        plot_gallery(generated.wavelength, generated.flux[:k], out=path,
                     title=f"{product}: {k} stars drawn from the prior (rest frame, model flux, no noise)")
        w.plots.append(str(path.relative_to(w.out)))
        if detail.line_depths:
            path = folder / f"line_depths_{product}.png"
            plot_line_depths(detail.line_depths, out=path,
                             title=f"{product}: strong lines of held-out real vs generated stars (with the "
                                   f"instrument's noise)")
            w.plots.append(str(path.relative_to(w.out)))

    latents, teff, products = [], [], []
    for product, spectra in w.test.spectra.items():
        z = _latents(spectra, w.fits, w.latent_dim)
        ok = np.isfinite(z).all(axis=1)
        latents.append(z[ok])
        teff.append(np.array([s.label("teff") for s in spectra])[ok])
        products += [product] * int(ok.sum())
    if products and len(products) > 2:
        path = folder / "latents.png"
        plot_latent_projection(np.concatenate(latents), np.concatenate(teff), products, out=path,
                               title="test-split latents: first two principal components")
        w.plots.append(str(path.relative_to(w.out)))

    series = {}
    for product, entry in rv.items():
        if entry.fitted:
            head = entry.headline
            series[product] = (np.array(head["snr"], dtype=float), np.array(head["difference_kms"], dtype=float))
    if series:
        path = folder / "rv_vs_snr.png"
        plot_rv_differences(series, out=path, title="fitted - survey RV (test split)")
        w.plots.append(str(path.relative_to(w.out)))


# --- the run --------------------------------------------------------------------------------
def run_bench(
    model_dir: str | os.PathLike,
    datasets: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    max_per_product: int | None = 500,
    seed: int = 0,
    progress: bool = True,
    **options,
) -> dict:
    """Run every section (see the module docstring) and write ``report.json``, ``metrics.json``,
    ``report.md`` and ``plots/`` into ``out_dir``. Returns the report as in ``report.json``
    (:meth:`.sections.BenchReport.to_json`; the sections are built as the classes of :mod:`.sections`).

    ``options``: the other fields of :class:`BenchOptions` (``max_train_per_product``, ``pca``,
    ``refine_steps``, ``threads``, ``device``, ``plots`` ...).
    """
    from stellarfield.bench.report import headline_metrics, markdown

    opts = BenchOptions(max_per_product=max_per_product, seed=seed, **options)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(opts.threads)
    say = print if progress else (lambda *a, **k: None)
    t_start = time.perf_counter()
    timing: dict[str, float] = {}
    try:
        trained = load_model(model_dir, device=opts.device)
        datasets = [str(d) for d in datasets]
        test = load_split(datasets, "test", opts.max_per_product, seed)
        if not test.spectra:
            raise BenchInputError(f"no test-split spectra in {', '.join(datasets)}: nothing to score")
        train = load_split(datasets, "train", probe_train_caps(test, opts), seed, products=list(test.spectra))
        pca_train = pca_train_pools(datasets, train, opts.pca_max_cells, seed)
        if any(len(pca_train[p]) > len(train.spectra[p]) for p in pca_train):
            say("bench: PCA train spectra " + ", ".join(f"{p} {len(v)}" for p, v in pca_train.items()))
        train_keys = {k for keys in train.keys().values() for k in keys} | {s.key for v in pca_train.values() for s in v}
        leaked = train_keys & {k for keys in test.keys().values() for k in keys}
        if leaked:  # impossible with splits assigned by star; checked because every number rests on it
            raise RuntimeError(f"{len(leaked)} spectra are in both the train and the test split, e.g. {sorted(leaked)[:3]}")
        w = _Work(trained, opts, test, train, out, progress=progress, pca_train=pca_train)
        timing["load_s"] = time.perf_counter() - t_start
        say(f"bench: test {test.counts()}, train {train.counts()}")

        sections: dict = {}
        pairs = lambda w: bench_pairs.bench_section(w.trained, datasets, w.test.spectra, opts.refine_steps, seed)
        for name, section in (("reconstruction", _reconstruction), ("rv", _rv), ("probes", _probes),
                              ("realism", _realism), ("speed", _speed), ("pairs", pairs)):
            t = time.perf_counter()
            sections[name] = section(w)
            timing[f"{name}_s"] = time.perf_counter() - t
            say(f"bench: {name} done in {timing[f'{name}_s']:.1f} s")
        if opts.plots:
            t = time.perf_counter()
            _plots(w, sections["rv"])
            timing["plots_s"] = time.perf_counter() - t
        timing["total_s"] = time.perf_counter() - t_start
        inputs = BenchInputs(
            model=str(model_dir),
            device=str(trained.model.device),
            model_products=sorted(trained.model.instruments),
            latent_dim=w.latent_dim,
            train_config=(trained.config.get("train_config") or {}),
            datasets=datasets,
            options=opts,
            test_counts=test.counts(),
            test_available=test.available,
            train_counts=train.counts(),
            train_available=train.available,
            scored_keys=test.keys(),
            machine=Machine(cpu_cores=os.cpu_count(), torch_threads=opts.threads, python=platform.python_version(),
                            torch=torch.__version__),
        )
        report = BenchReport(**sections, inputs=inputs, timing=timing, plots=w.plots).finite()
        (out / "report.json").write_text(json.dumps(report.to_json(), indent=1))
        (out / "metrics.json").write_text(json.dumps(finite_or_none(headline_metrics(report)), indent=1))
        (out / "report.md").write_text(markdown(report))
        say(f"bench: wrote {out / 'report.md'}, report.json, metrics.json and {len(w.plots)} plots "
            f"in {timing['total_s']:.0f} s")
        return report.to_json()
    finally:
        torch.set_num_threads(threads_before)
