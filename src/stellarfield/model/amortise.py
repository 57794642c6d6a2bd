"""Amortise a trained model: train an encoder for its frozen decoder, choose its fit settings, save.

>>> from stellarfield.model.amortise import AmortiseConfig, amortise
>>> report = amortise("reference", ["datasets/all"], "runs/reference+encoder", AmortiseConfig(steps=600))  # doctest: +SKIP
>>> report.fit_settings["gaia_xp"]                                                                         # doctest: +SKIP

The decoder, instruments, likelihood and prior are the trained model's, unchanged; only the encoder
(:mod:`stellarfield.model.encoder`) is new. Steps:

1. every training spectrum (the datasets' "train" split, products the model knows) is observed once:
   its velocity from the cross-correlation with the mean model (as at inference), and the encoder's
   pooled residuals (its input; the decoder is frozen, so they are computed once);
2. ``steps`` Adam steps on the encoder's head: each step takes up to ``batch_per_product`` spectra of
   every product, ``z = encoder(spectrum)``, and minimises the mean over products of the mean
   :func:`~stellarfield.model.likelihood.spectrum_loss` at ``z`` on all the spectrum's pixels, the
   objective of training and of refinement; the head with the lowest validation loss is kept;
3. on the "validation" split, each product's fit setting: for each velocity search
   (``rv_searches_tried``: "ccf", "full") and refinement (``adam_steps_tried`` Adam steps of step
   size ``lr_refine``, ``gauss_newton_steps_tried`` Gauss-Newton steps), the product's median
   chi2_nu of ``encoder+refine`` against ``refine_baseline_steps`` Adam steps from ``z = 0`` with the
   full search (today's fit); the fastest setting (wall time per validation spectrum) within
   ``tolerance`` of the baseline wins, else the one closest to it. "Within" is judged by the ratio
   and its bootstrap upper bound (:func:`ratio_upper_bound`), not the ratio alone: with ~20 validation
   spectra a setting chosen by its median ratio came out 7-12% over on the test split. They are
   saved with the encoder
   (``SpectrumEncoder.fit_settings``) and are what a fit does after it by default;
4. the model is written as a run folder (safetensors; :func:`stellarfield.model.checkpoint.save_checkpoint`),
   loadable by :func:`~stellarfield.model.checkpoint.load_model`, ``stellarfield fit --model OUT``.

The test split is never read.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from stellarfield.model.batching import ProductData, TrainingData
from stellarfield.model.checkpoint import load_checkpoint, model_config, save_checkpoint, write_json_atomic
from stellarfield.model.encoder import HEAD_HIDDEN, EncoderInputs, pooled_residuals
from stellarfield.model.generate import as_trained
from stellarfield.model.inference import blurred_basis, infer
from stellarfield.model.likelihood import evaluate, mean_model, observe, spectrum_loss, variance


@dataclass
class AmortiseConfig:
    """Everything that defines an amortisation run (saved in the output's config.json)."""

    steps: int = 600
    batch_per_product: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    hidden: tuple[int, ...] = HEAD_HIDDEN
    inputs: str = "gradient+least-squares"  # what the head reads: SpectrumEncoder's inputs
    seed: int = 0
    validate_every: int = 50  # steps between validation losses (the best head is kept)
    max_train_per_product: int | None = 4000
    val_max_per_product: int = 32
    adam_steps_tried: tuple[int, ...] = (0, 3, 10, 30, 100)
    gauss_newton_steps_tried: tuple[int, ...] = (3, 10)
    rv_searches_tried: tuple[str, ...] = ("ccf", "full")
    lr_refine: float = 0.05  # Adam's step size on z (that of refinement from z = 0)
    refine_baseline_steps: int = 100
    tolerance: float = 0.05
    threads: int | None = 1


@dataclass
class AmortiseReport:
    """What :func:`amortise` did: the folder, the training curve, and the validation choice."""

    path: Path
    steps: int
    seconds: float
    best_step: int
    val_loss: list[tuple[int, float]]
    baseline: dict  # product -> median chi2_nu of the baseline on validation spectra
    tried: dict  # "rv_search/k" -> product -> median chi2_nu
    fit_settings: dict  # product -> infer() keyword arguments (refine_steps, refiner, lr, rv_search)
    counts: dict = field(default_factory=dict)


@dataclass
class _Pooled:
    """One product's spectra with the encoder's (fixed) input and the velocities it was taken at."""

    data: ProductData
    basis: torch.Tensor  # (G, n_basis + 1) blurred, full grid
    inputs: EncoderInputs  # N spectra
    v: torch.Tensor  # (N,) km/s


def _pool(model, data: TrainingData, chunk: int = 64, bar=None) -> dict[str, _Pooled]:
    out = {}
    for name, pd in data.products.items():
        basis = blurred_basis(model, name)
        with torch.no_grad():
            mean_grid = mean_model(model, basis)
        parts = []
        for start in range(0, len(pd), chunk):
            batch = pd.batch(torch.arange(start, min(start + chunk, len(pd)))).to(model.device)
            obs = observe(model, batch, full_grid=True, mean_grid=mean_grid)
            parts.append((pooled_residuals(model, [obs], [basis], blurred_basis=True), obs.v.detach()))
            if bar is not None:
                bar.update(batch.size)
        inputs, v = zip(*parts)
        out[name] = _Pooled(pd, basis, EncoderInputs.cat(list(inputs)), torch.cat(v))
    return out


def _loss(model, pooled: dict[str, _Pooled], rows: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean over products of the mean spectrum_loss at the encoder's latents of spectra ``rows``."""
    losses = []
    for name, r in rows.items():
        p = pooled[name]
        batch = p.data.batch(r).to(model.device)
        obs = observe(model, batch, full_grid=True, v_init=p.v[r])
        index = torch.full((len(r),), model.encoder.instrument_index(name), dtype=torch.long, device=model.device)
        z = model.encoder(p.inputs[r], index)
        fit = evaluate(obs, model.decoder.coefficients(z), p.basis, obs.v, variance(model, obs), blurred_basis=True)
        losses.append(spectrum_loss(model, fit, z).mean())
    return torch.stack(losses).mean()


def _all_rows(pooled: dict[str, _Pooled], limit: int) -> dict[str, torch.Tensor]:
    return {name: torch.arange(min(len(p.data), limit)) for name, p in pooled.items()}


def _read(paths, split: str, instruments, max_per_product):
    """One split of the datasets, read only until every product has ``max_per_product`` spectra."""
    from stellarfield.data.store import iter_spectra_of
    from stellarfield.model.train import _until_full

    spectra = iter_spectra_of(paths, split)
    if max_per_product is not None:
        spectra = _until_full(spectra, instruments, max_per_product)
    return TrainingData(spectra, instruments=instruments, max_per_product=max_per_product)


def _train_encoder(m, train_data: TrainingData, val_data: TrainingData, config: AmortiseConfig,
                   progress: bool) -> tuple[list[tuple[int, float]], int]:
    """Steps 1-2 of the module docstring on ``m.encoder`` (the head with the lowest validation loss is
    loaded at the end). Returns the validation-loss curve and the step kept."""
    if not len(train_data):
        raise ValueError("no training spectra of the model's products in the datasets")
    bar = tqdm(total=len(train_data) + len(val_data), disable=not progress, unit="spectrum", desc="pooling")
    with torch.no_grad():
        pooled, pooled_val = _pool(m, train_data, bar=bar), _pool(m, val_data, bar=bar)
    bar.close()

    opt = torch.optim.AdamW(m.encoder.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    g = torch.Generator().manual_seed(config.seed)
    val_rows = _all_rows(pooled_val, config.val_max_per_product)
    curve, best = [], (float("inf"), config.steps, copy.deepcopy(m.encoder.state_dict()))
    bar = tqdm(total=config.steps, disable=not progress, unit="step", desc="encoder")
    for step in range(1, config.steps + 1):
        rows = {name: torch.randperm(len(p.data), generator=g)[: config.batch_per_product] for name, p in pooled.items()}
        loss = _loss(m, pooled, rows)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if pooled_val and (step % config.validate_every == 0 or step == config.steps):
            with torch.no_grad():
                val = _loss(m, pooled_val, val_rows).item()
            curve.append((step, val))
            if val < best[0]:
                best = (val, step, copy.deepcopy(m.encoder.state_dict()))
    bar.close()
    if pooled_val:
        m.encoder.load_state_dict(best[2])
        return curve, best[1]
    return curve, config.steps


def amortise(model, datasets, out_dir: str | os.PathLike, config: AmortiseConfig | None = None,
             progress: bool = True) -> AmortiseReport:
    """Train an encoder for ``model`` (a run folder, ``"reference"`` or a TrainedModel) on the "train"
    split of ``datasets`` (folders), choose its fit settings on their "validation" split, and write
    the model with its encoder to ``out_dir`` (which must not exist). See the module docstring.
    ``config.steps = 0`` keeps the model's own encoder and only chooses its fit settings again."""
    config = config or AmortiseConfig()
    out = Path(out_dir)
    if out.exists():
        raise FileExistsError(f"{out} already exists; choose another folder")
    if config.threads:
        torch.set_num_threads(config.threads)
    trained = as_trained(model)
    m = copy.deepcopy(trained.model)
    m.requires_grad_(False)
    t0 = time.time()
    train_data = _read(datasets, "train", m.instruments, config.max_train_per_product)
    val_data = _read(datasets, "validation", m.instruments, config.val_max_per_product)
    if config.steps:
        torch.manual_seed(config.seed)
        m.add_encoder(hidden=tuple(config.hidden), inputs=config.inputs)
        curve, best_step = _train_encoder(m, train_data, val_data, config, progress)
    elif m.encoder is None:
        raise ValueError("steps=0 re-chooses the fit settings of the model's encoder, and this model has none")
    else:
        curve, best_step = [], 0

    baseline, tried, m.encoder.fit_settings = choose_fit_settings(m, val_data, config, progress)
    seconds = time.time() - t0

    model_cfg = model_config(m, None, trained.prior)
    model_cfg["train_config"] = trained.config.get("train_config")
    model_cfg["amortise"] = {"from": str(trained.path or ""), "config": asdict(config), "best_step": best_step,
                             "val_loss": curve, "validation_baseline": baseline, "validation_tried": tried,
                             "seconds": round(seconds, 1),
                             "encoder_trained_by": trained.config.get("amortise") if not config.steps else None}
    state = {k: v for k, v in m.state_dict().items() if not k.startswith("latents.")} if m.latents is not None \
        else m.state_dict()
    if m.latents is not None:
        model_cfg["n_latents"] = 0
    save_checkpoint(out, best_step, model_cfg, {k: v.detach().cpu() for k, v in state.items()},
                    None if trained.prior is None else trained.prior.state_dict())
    write_json_atomic(out / "amortise.json", model_cfg["amortise"])
    load_checkpoint(out)  # the folder reads back (manifest, config) before we report it
    return AmortiseReport(out, config.steps, seconds, best_step, curve, baseline, tried, m.encoder.fit_settings,
                          train_data.counts())


def choose_fit_settings(model, val_data: TrainingData, config: AmortiseConfig, progress: bool = False):
    """Each product's fit setting after ``model.encoder``, from ``val_data`` (validation spectra; step 3
    of the module docstring): ``(baseline, tried, settings)``, the baseline's median chi2_nu per
    product, ``tried[product][label] = {"chi2_nu_median", "ratio", "ratio_upper", "s_per_spectrum"}``,
    and per product
    the chosen :func:`~stellarfield.model.inference.infer` keyword arguments."""
    candidates = [{"refine_steps": k, "refiner": "adam", "lr": config.lr_refine, "rv_search": rv}
                  for rv in config.rv_searches_tried for k in config.adam_steps_tried]
    candidates += [{"refine_steps": k, "refiner": "gauss-newton", "lr": config.lr_refine, "rv_search": rv}
                   for rv in config.rv_searches_tried for k in config.gauss_newton_steps_tried]
    baseline, tried, settings = {}, {}, {}
    for name, pd in val_data.products.items():
        one = copy.copy(val_data)
        one.products = {name: pd}
        chi2_nu = lambda **kw: next(iter(infer(model, one, **kw).values())).chi2_nu
        base = chi2_nu(method="refine", refine_steps=config.refine_baseline_steps)
        baseline[name] = float(np.median(base))
        ranked, tried[name] = [], {}
        for setting in candidates:
            t = time.perf_counter()
            values = chi2_nu(method="encoder+refine", **setting)
            per_spectrum = (time.perf_counter() - t) / len(pd)
            value = float(np.median(values))
            ratio = _ratio(value, baseline[name])
            upper = ratio_upper_bound(values, base, config.seed)
            label = f"{setting['refiner']} {setting['refine_steps']} {setting['rv_search']}"
            tried[name][label] = {"chi2_nu_median": value, "ratio": ratio, "ratio_upper": upper,
                                  "s_per_spectrum": per_spectrum}
            ok = max(ratio, upper) <= 1 + config.tolerance  # the bound can fall below a skewed median
            ranked.append((not ok, per_spectrum if ok else ratio, label, setting))  # fastest good, else closest
        settings[name] = min(ranked, key=lambda r: (r[0], r[1]))[3]
        if progress:
            best = min(ranked, key=lambda r: (r[0], r[1]))
            print(f"validation {name}: {best[2]} (chi2_nu ratio {tried[name][best[2]]['ratio']:.3f}, "
                  f"upper bound {tried[name][best[2]]['ratio_upper']:.3f}, to "
                  f"{config.refine_baseline_steps}-step refinement, {1000 * tried[name][best[2]]['s_per_spectrum']:.1f} "
                  "ms/spectrum)", flush=True)
    return baseline, tried, settings


#: Bootstrap resamples of the validation spectra behind a setting's ratio's upper bound.
BOOTSTRAP_RESAMPLES = 1000
#: The bound's percentile: one sigma above the median ratio for a normal spread.
UPPER_PERCENTILE = 84.1


def ratio_upper_bound(values: np.ndarray, baseline: np.ndarray, seed: int = 0) -> float:
    """The 84th percentile of the ratio of median chi2_nu (a setting's ``values`` over the baseline's,
    per validation spectrum, paired) over :data:`BOOTSTRAP_RESAMPLES` resamples of the spectra: a
    setting is "within the tolerance" when this is, so that a product with few validation spectra
    (LAMOST: 18) needs a margin before a faster setting is taken for a good one."""
    values, baseline = np.asarray(values, float), np.asarray(baseline, float)
    if len(values) < 2:
        return _ratio(float(np.median(values)), float(np.median(baseline)))
    rows = np.random.default_rng(seed).integers(0, len(values), (BOOTSTRAP_RESAMPLES, len(values)))
    ratios = [_ratio(float(np.median(values[r])), float(np.median(baseline[r]))) for r in rows]
    return float(np.percentile(ratios, UPPER_PERCENTILE))


def _ratio(value: float, baseline: float) -> float:
    """value / baseline for medians of chi2_nu (1 where both vanish, inf where only the baseline does)."""
    if not np.isfinite(value):
        return float("inf")
    return value / baseline if baseline > 0 else (1.0 if value <= 0 else float("inf"))
