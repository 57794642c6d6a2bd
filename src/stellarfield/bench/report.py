"""The bench report's two readable forms: ``metrics.json`` (headline numbers) and ``report.md``.

Both are rendered from the typed report (:class:`~.sections.BenchReport`, the same numbers as
``report.json``, see :mod:`.run`) and add nothing to it.
``metrics.json`` follows the issue's schema::

    reconstruction.PRODUCT.{model,pca,pca_plain}.{chi2_nu_median, chi2_nu_p16, chi2_nu_p84,
                                         median_abs_residual, rms_residual, n}
        (pca: weighted EM-PCA, pca_plain: plain PCA, both with K = the model's latent dimension;
         their entries add n_components and n_train, the train spectra they were fitted on)
    rv.PRODUCT.{offset_kms, scatter_kms, n, compared}
    probe.SOURCE.{latent,pca,pca_plain}.LABEL.{mad, rmse, n, ridge_mad}  (mad: the 10-NN probe)
    cross_source.TARGET.LABEL.{cross_mad, self_mad, n}
    realism.PRODUCT.{c2st_auc, c2st_auc_noiseless, noise, n_real, n_generated}
        (c2st_auc: generated spectra with the instrument's noise and masks)
    pairs.{A_to_B, B_to_A}.{ratio_of_medians, n, data_over_own_fit, cross_over_data}, pairs.latent_ratio
        (one star, two instruments: cross-prediction RMS / own-fit RMS, the other telescope's own
        spectrum's RMS / own-fit RMS and the cross RMS over it (None where not made), same-star /
        random-star latent distance; stellarfield.eval.pairs)
    speed.{model_spectra_per_s, payne_spectra_per_s, pixels, grid, fit_ms_per_spectrum, fit_n,
           train_spectra_per_s, cpu_cores, torch_threads}
"""

from __future__ import annotations

from stellarfield.bench.sections import (
    BenchReport,
    CrossSourceResult,
    MethodScores,
    NotDone,
    ProbeResult,
    RealismResult,
    ReconstructionRow,
    RVComparison,
)
from stellarfield.eval.report_text import format_number as _f
from stellarfield.eval.report_text import format_summary, markdown_table

METHODS = {"model": "model", "pca": "weighted PCA", "pca_plain": "plain PCA"}
#: Probe feature sets, in report order.
PROBE_KINDS = {"latent": "latent", "pca": "weighted PCA", "pca_plain": "plain PCA"}


def _get(d, *path, default=None):
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return default
        d = d[key]
    return d


def _method(row: ReconstructionRow, method: str, *path, default=None):
    """A number of one method's scores on a product (``path`` into its report entry), or ``default``."""
    scores = row.methods.get(method)
    return default if scores is None else _get(scores.to_dict(), *path, default=default)


def headline_metrics(report: BenchReport) -> dict:
    """The issue's ``metrics.json`` (see the module docstring) from a full report."""
    out: dict = {"reconstruction": {}, "rv": {}, "probe": {}, "cross_source": {}, "realism": {}, "speed": {}}
    for product, row in report.reconstruction.items():
        out["reconstruction"][product] = {
            method: {
                "chi2_nu_median": _method(row, method, "chi2_nu", "median"),
                "chi2_nu_p16": _method(row, method, "chi2_nu", "p16"),
                "chi2_nu_p84": _method(row, method, "chi2_nu", "p84"),
                "median_abs_residual": _method(row, method, "median_abs_residual", "median"),
                "rms_residual": _method(row, method, "rms_residual", "median"),
                "n": _method(row, method, "n", default=0),
                **({"n_components": _method(row, method, "n_components"), "n_train": _method(row, method, "n_train")}
                   if method in ("pca", "pca_plain") else {}),
            }
            for method in METHODS
            if method in row.methods
        }
    for product, rv in report.rv.items():
        if rv.fitted:
            out["rv"][product] = {"offset_kms": rv.offset_kms, "scatter_kms": rv.scatter_kms, "n": rv.n,
                                  "compared": rv.compared}
    for source, probe in report.probes.sources.items():
        if not isinstance(probe, ProbeResult):
            continue
        for kind in PROBE_KINDS:
            if kind in probe.features:
                out["probe"].setdefault(source, {})[kind] = {
                    label: {"mad": s["mad"], "rmse": s["rmse"], "n": s["n"], "ridge_mad": s["ridge"]["mad"]}
                    for label, s in probe.features[kind].items()
                }
    for target, cross in report.probes.cross_source.items():
        if isinstance(cross, CrossSourceResult) and "cross" in cross.probes:
            out["cross_source"][target] = {
                label: {"cross_mad": scores["mad"], "self_mad": cross.own["knn"][label]["mad"], "n": scores["n"]}
                for label, scores in cross.cross["knn"].items()
            }
    for product, realism in report.realism.products.items():
        if isinstance(realism, RealismResult) and "c2st_auc" in realism.values:
            out["realism"][product] = {k: realism.values.get(k)
                                       for k in ("c2st_auc", "c2st_auc_noiseless", "n_real", "n_generated")}
            out["realism"][product]["noise"] = realism.noise.get("source") if realism.noise else None
    pairs = report.pairs.pairs or {}
    if "latent" in pairs:  # one star, two instruments (eval/pairs.py)
        a, b = pairs["products"]
        out["pairs"] = {}
        for src, dst in ((a, b), (b, a)):
            direction = pairs[f"{src}_to_{dst}"]
            floor = direction.get("data", {})  # the model-free floor: the other telescope's own spectrum
            out["pairs"][f"{src}_to_{dst}"] = {"ratio_of_medians": direction["ratio_of_medians"], "n": direction["n"],
                                               **{k: floor.get(k) for k in ("data_over_own_fit", "cross_over_data")}}
        out["pairs"]["latent_ratio"] = pairs["latent"]["ratio"]
    speed = report.speed
    out["speed"] = {
        "model_spectra_per_s": speed.model_spectra_per_s,
        "payne_spectra_per_s": speed.payne_spectra_per_s,
        "pixels": speed.pixels,
        "grid": speed.headline_grid,
        "fit_ms_per_spectrum": speed.fit_ms_per_spectrum,
        "fit_n": speed.fit_n,
        "train_spectra_per_s": speed.train_spectra_per_s,
        "cpu_cores": speed.cpu_cores,
        "torch_threads": speed.torch_threads,
    }
    return out


# --- markdown -------------------------------------------------------------------------------
def _pca_fit_note(e: ReconstructionRow) -> str:
    """How many train spectra a product's PCAs were fitted on ('n', or 'n of N (random)'), or '-'."""
    m: MethodScores | None = e.methods.get("pca") or e.methods.get("pca_plain")
    if not m or m.pca_fit is None:
        return "-"
    fit = m.pca_fit
    available = e.n_train_available or fit.n_train_loaded or fit.n_train
    return f"{fit.n_train}" if fit.n_train >= available else f"{fit.n_train} of {available} (random)"


def _reconstruction_md(report: BenchReport) -> list[str]:
    k = report.inputs.latent_dim
    pca_kind = report.inputs.options.pca
    cells_cap = report.inputs.options.pca_max_cells
    lines = ["## 1. Reconstruction of held-out spectra", "",
             f"chi2_nu with the survey's errors, median (16th-84th percentile) over test spectra; n = spectra. "
             f"The model's chi2_nu counts its latent ({k}), continuum coefficients and RV as fitted parameters; "
             f"each PCA counts its K = {k} components (the model's latent dimension, `decoder.latent_dim`; fewer "
             "only if there are fewer training spectra). The comparison is the **weighted PCA** (EM-PCA with the "
             "survey's inverse variances as weights, Bailey 2012; good/bad weights for MILES); the plain PCA "
             f"(SVD of the gap-filled spectra, every pixel equal) is shown next to it (`--pca {pca_kind}`). Both "
             "are fitted on the train split: on every train spectrum of the product, or on a random subset "
             f"where spectra x pixels would exceed {cells_cap:,} ('PCA n train': used, and of how many when a "
             "subset). "
             "All methods are scored on the same pixels (those every method uses) after the same observed-frame "
             "masks and per-spectrum normalisation. MILES has no errors: its score is the RMS residual "
             "(flux / median).", ""]
    rows, notes = [], []
    for product, e in report.reconstruction.items():
        cells = [product, _f(e.n_test)]
        for method in METHODS:
            m = e.methods.get(method)
            noise = m and (m.get("chi2_nu") or {}).get("n")
            cells.append(format_summary(m.get("chi2_nu")) if noise else (
                f"RMS {format_summary(m.get('rms_residual'))}" if m else "-"))
        cells.append(_f(_method(e, "pca", "n_components", default=_method(e, "pca_plain", "n_components"))))
        cells.append(_pca_fit_note(e))
        iterations, cap = _method(e, "pca", "em_iterations"), _method(e, "pca", "em_max_iter")
        cells.append(_f(iterations) + (" (cap)" if iterations is not None and iterations == cap else ""))
        cells.append(_f(_method(e, "model", "pixels_scored_fraction", "median"), 2))
        cells.append("yes" if e.model_trained_on_product else "**no**")
        rows.append(cells)
        if e.pca_note is not None:
            notes.append(f"- {product}: pca {e.pca_note}")
    lines += markdown_table(["product", "n test", "model", f"weighted PCA (K={k})", f"plain PCA (K={k})",
                     "PCA K", "PCA n train", "weighted PCA EM iterations", "pixels scored", "model trained on it"], rows)
    lines += [""] + notes + ([""] if notes else [])
    seg_rows = []
    for product, e in report.reconstruction.items():
        segments = _method(e, "model", "chi2_nu_by_segment") or {}
        if len(segments) > 1:
            for name, s in segments.items():
                seg_rows.append([product, name, _f(s["n"]), format_summary(s),
                                 format_summary(_method(e, "pca", "chi2_nu_by_segment", name)),
                                 format_summary(_method(e, "pca_plain", "chi2_nu_by_segment", name))])
    if seg_rows:
        lines += ["Per segment (chi2_nu median (16-84)):", ""]
        lines += markdown_table(["product", "segment", "n", "model", "weighted PCA", "plain PCA"], seg_rows) + [""]
    lines += ["No physics ablation here: it needs a second model trained without RV and LSF. "
              "Residuals against wavelength: `plots/residuals_*.png`.", ""]
    return lines


def _outliers(out: dict, key: str) -> str:
    """'k of n' fits beyond the outlier threshold (:func:`.rv.outlier_count`), '-' when not counted."""
    if out.get(key) is None or out.get("n") is None:
        return "-"
    return f"{out[key]} of {out['n']}"


def _rv_md(rv: dict[str, RVComparison]) -> list[str]:
    lines = ["## 2. Radial velocities", "",
             "Median offset (fitted - reference) and robust scatter (1.4826 MAD) in km/s over test spectra; "
             "n = pairs with both values. What was compared, frame by frame, is in the 'compared' column. "
             "'> 5 sigma': among the spectra with the survey's S/N > 20 (n of them), the fits more than 5 sigma "
             "(the fit's and the survey's errors in quadrature) from the survey's value; 'after offset': the same "
             "once the median difference of those spectra is removed. 'survey error': the survey's median stated "
             "1-sigma of its value; 'pull': robust scatter of (fitted - reference) / (both errors in quadrature), "
             "about 1 when the differences are what the stated errors predict (n_pull spectra have both errors).", ""]
    rows, not_fitted, repeats = [], [], []
    for product, e in rv.items():
        if not e.fitted:
            not_fitted.append(product)
            continue
        for name, r in e.references.items():
            out = r.get("outliers") or {}
            rows.append([product, r["compared"], _f(r["n"]), _f(r["offset_kms"]), _f(r["scatter_kms"]),
                         _f(e.rv_err_median_kms), _f(r.get("survey_error_median_kms")),
                         f"{_f(r.get('pull_scatter'))} (n={_f(r.get('n_pull'))})" if r.get("n_pull") else "-",
                         _outliers(out, "n_beyond"), _outliers(out, "n_beyond_after_offset")])
            if r.get("repeats"):
                rep = r["repeats"]
                repeats.append([product, r["compared"], _f(rep["n_stars"]), _f(rep["n_spectra"]),
                                _f(rep["model_kms"]), _f(rep["survey_kms"])])
    lines += markdown_table(["product", "compared", "n", "offset km/s", "scatter km/s", "median fitted error km/s",
                     "survey error km/s", "pull", "> 5 sigma at S/N > 20", "> 5 sigma after offset"], rows)
    if repeats:
        lines += ["", "Repeat observations of the same stars (test split): each velocity minus its star's mean "
                  "(scaled to one measurement), robust scatter, for the model and for the survey's value on the "
                  "same spectra: the precision of each, free of zero points (a binary widens both).", ""]
        lines += markdown_table(["product", "compared", "stars", "spectra", "model km/s", "survey km/s"], repeats)
    snr_rows = []
    for product, e in rv.items():
        if e.fitted:
            for b in e.headline.get("by_snr", []):
                if b["n"]:
                    bin_ = f">= {_f(b['snr_min'])}" if b["snr_max"] is None else f"{_f(b['snr_min'])}-{_f(b['snr_max'])}"
                    snr_rows.append([product, bin_, _f(b["n"]),
                                     _f(b["offset_kms"]), _f(b["scatter_kms"])])
    if snr_rows:
        lines += ["", "Against S/N (first comparison of each product):", ""]
        lines += markdown_table(["product", "S/N", "n", "offset km/s", "scatter km/s"], snr_rows)
    if not_fitted:
        lines += ["", f"No RV fitted by the model for: {', '.join(not_fitted)}."]
    return lines + ["", "Plot: `plots/rv_vs_snr.png`.", ""]


def _probes_md(report: BenchReport) -> list[str]:
    p = report.probes
    k = report.inputs.latent_dim
    lines = ["## 3. What the latent knows", "",
             "Probes fitted on the train split, scored on the test split; MAD = median |predicted - label| "
             "(10-NN probe, and ridge); n = test stars with the label, n train = train stars with it. Labels never "
             f"enter training. The same probes on the K = {k} coefficients of the weighted PCA (the comparison) "
             "and of the plain PCA, on the same stars.", ""]
    rows, notes = [], []
    for source, e in p.sources.items():
        if isinstance(e, NotDone):
            notes.append(f"- {source}: {e.note}")
            continue
        name = source if e.model_trained_on_product else f"{source} (**model not trained on it**)"
        for label, s in e.features.get("latent", {}).items():
            pca = _get(e.features, "pca", label) or {}
            plain = _get(e.features, "pca_plain", label) or {}
            rows.append([name, label, _f(s["n"]), _f(s.get("n_train", e.n_train)),
                         _f(s["mad"]), _f(pca.get("mad")), _f(plain.get("mad")),
                         _f(s["ridge"]["mad"]), _f(_get(pca, "ridge", "mad")), _f(_get(plain, "ridge", "mad")),
                         _f(s["rmse"]), _f(pca.get("rmse"))])
    lines += markdown_table(["source", "label", "n test", "n train", "latent 10-NN MAD", "wPCA 10-NN MAD", "plain PCA 10-NN MAD",
                     "latent ridge MAD", "wPCA ridge MAD", "plain PCA ridge MAD", "latent 10-NN RMSE",
                     "wPCA 10-NN RMSE"], rows)
    lines += [""] + notes + ([""] if notes else [])
    rows = []
    for target, e in p.cross_source.items():
        if not isinstance(e, CrossSourceResult) or "cross" not in e.probes:
            continue
        for label, s in e.cross["knn"].items():
            mine = e.own["knn"][label]
            agree = _get(p.neighbour_agreement, target, label) or {}
            rows.append([f"{e.source} -> {target}", label, _f(s["n"]), _f(s["mad"]), _f(mine["mad"]),
                         _f(e.cross["ridge"][label]["mad"]), _f(e.own["ridge"][label]["mad"]),
                         _f(agree.get("agreement"), 2)])
    if rows:
        lines += ["Instrument invariance: a probe fitted on the source's train latents and labels (Gaia XP's labels are "
                  "APOGEE's), "
                  "scored on the target's test stars ('cross'), next to a probe fitted on the target's own train "
                  "stars ('self'); neighbour agreement = 1 - (label MAD of a star's 10 nearest source latents) / "
                  "(the same for 10 random source stars): 1 = neighbours share labels, 0 = no information.", ""]
        lines += markdown_table(["probe", "label", "n", "cross 10-NN MAD", "self 10-NN MAD", "cross ridge MAD",
                         "self ridge MAD", "neighbour agreement"], rows)
    elif p.cross_source_note is not None:
        lines += [f"Cross-source probe {p.cross_source_note}."]
    return lines + ["", "Plot: `plots/latents.png`.", ""]


def _realism_md(report: BenchReport) -> list[str]:
    r = report.realism
    lines = ["## 4. Realism of generated stars", ""]
    if r.note is not None:
        return lines + [r.note, ""]
    lines += ["Classifier two-sample test: logistic regression on 10 principal components of pseudo-continuum-"
              "normalised rest-frame spectra, 5-fold held-out AUC (0.5 = indistinguishable). Before the test each "
              "generated spectrum gets the instrument's noise: the error array and mask of a random real spectrum "
              "of the product, relative to its pseudo-continuum and scaled to the generated spectrum's, Gaussian "
              "noise of that sigma added and its bad pixels dropped, so the classifier cannot win on the absence "
              "of noise ('AUC'; 'AUC no noise' without it). MILES has no error arrays: its sigma is the DER_SNR "
              "estimate of each real spectrum (scatter about the locally smooth flux; an upper bound where lines "
              "are barely resolved), with the real good-pixel masks. Pixels good in at least half of the spectra "
              "are used. The stars are drawn from the product's own population ('population': the prior "
              "conditional on the product, fitted to that product's training latents); where it is 'all', from "
              "every product's, and an AUC above 0.5 mixes realism with the difference between populations.", ""]
    rows, line_rows, notes = [], [], []
    for product, result in r.products.items():
        if isinstance(result, NotDone) or "c2st_auc" not in result.values:
            notes.append(f"- {product}: {result.note if isinstance(result, NotDone) else result.values.get('note', '')}")
            continue
        e = result.values
        noise = result.noise
        rows.append([product, e.get("population", "all"), _f(e["n_real"]), _f(e["n_generated"]), _f(e["c2st_auc"], 2),
                     _f(e.get("c2st_auc_std"), 2),
                     _f(e.get("c2st_auc_noiseless"), 2), noise.get("source", "-"), _f(noise.get("median_continuum_snr")),
                     _f(e.get("feature_pixels")), e["normalisation"]])
        if e.get("note"):
            notes.append(f"- {product}: {e['note']}")
        if noise.get("note"):
            notes.append(f"- {product}: {noise['note']}")
        for line, d in result.lines.items():
            depth = d["depth"]
            line_rows.append([product, line, f"{format_summary(depth['real'])} (n={depth['real']['n']})",
                              f"{format_summary(depth['generated'])} (n={depth['generated']['n']})", _f(depth["ks_statistic"], 2),
                              format_summary(d["ew_A"]["real"]), format_summary(d["ew_A"]["generated"])])
    lines += markdown_table(["product", "population", "n real", "n generated", "AUC", "AUC sd (folds)", "AUC no noise",
                             "noise from",
                     "median S/N of the noise", "pixels", "normalisation"], rows)
    lines += [""] + notes + ([""] if notes else [])
    if line_rows:
        lines += ["Strong lines, depth and equivalent width (A), median (16-84), real vs generated (with noise):", ""]
        lines += markdown_table(["product", "line", "real depth", "generated depth", "KS", "real EW", "generated EW"], line_rows)
    return lines + ["", "Plots: `plots/generated_*.png` (generated stars), `plots/line_depths_*.png` (line-depth "
                    "histograms, real vs generated).", ""]


def _speed_md(report: BenchReport) -> list[str]:
    s = report.speed
    gen_device = s.generation_device
    where = (f"speeds measured on the CPU, {s.torch_threads} torch thread(s) ({s.cpu_cores} CPU cores)"
             if gen_device == "cpu" else f"speeds measured on {gen_device}")
    lines = ["## 5. Speed", "",
             f"Generation: {where}, whatever the bench's device, so that the model and the Payne emulator "
             f"(labels -> 300 -> 300 -> pixels) run side by side on one device: batches of {s.batch} spectra on "
             "each instrument's native grid, best of the timed calls, the two alternated in the same process.", ""]
    rows = [[p, _f(d["pixels"]), _f(d["model_spectra_per_s"], 4), _f(d["payne_spectra_per_s"], 4), _f(d["ratio"], 3)]
            for p, d in s.per_product.items()]
    lines += markdown_table(["grid", "pixels", "model spectra/s", "Payne spectra/s", "model / Payne"], rows)
    lines += ["", f"Fit: {_f(s.fit_ms_per_spectrum)} ms per spectrum over {s.fit_n} test spectra "
                  f"({s.fit_refine_steps} refinement steps, on {s.fit_device}); per product: "
              + ", ".join(f"{p} {_f(d.ms)} ms (n={d.n})" for p, d in s.fit_ms_per_spectrum_by_product.items()) + ".",
              f"Training: {_f(s.train_spectra_per_s)} spectra/s over the run ({_f(s.train_steps)} steps, "
              f"{_f(s.train_seconds)} s, world size {_f(s.train_world_size)}; from the run's summary.json).", ""]
    return lines


def markdown(report: BenchReport) -> str:
    """``report.md``: every section as tables, with counts, caveats and the plots."""
    from stellarfield.eval.pairs import format_pairs

    i = report.inputs
    t = report.timing
    used = ", ".join(f"{p} {n}/{i.test_available[p]}" for p, n in i.test_counts.items())
    lines = ["# stellarfield bench report", "",
             f"- model: `{i.model}` (latent dimension {i.latent_dim}; trained on {', '.join(i.model_products)})",
             f"- datasets: {', '.join(f'`{d}`' for d in i.datasets)}",
             f"- scored: test split only, {sum(i.test_counts.values())} spectra ({used}; used/available, "
             f"at most {i.options.max_per_product} per product)",
             f"- fitted on (PCA, probes): train split, {sum(i.train_counts.values())} spectra "
             f"(probes: at most {i.options.max_train_per_product} per product"
             + (f" and {i.options.probe_max_cells:,} spectra x pixels)" if i.options.probe_max_cells else ")"),
             f"- machine: {i.machine.cpu_cores} CPU cores, {i.machine.torch_threads} torch thread(s); "
             f"model on {i.device}; "
             f"wall time {t['total_s']:.0f} s", ""]
    lines += _reconstruction_md(report) + _rv_md(report.rv) + _probes_md(report) + _realism_md(report) + _speed_md(report)
    lines += ["## 6. One star, two instruments", "", "```",
              format_pairs(report.pairs.pairs, report.pairs.epochs), "```", ""]
    lines += ["## Plots", ""] + [f"- `{p}`" for p in report.plots] + [""]
    lines += ["## Timing", "", ", ".join(f"{k[:-2]} {v:.0f} s" for k, v in t.items()), ""]
    return "\n".join(lines)
