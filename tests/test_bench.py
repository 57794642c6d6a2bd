"""`stellarfield bench`: a tiny model trained here on real MILES and LAMOST spectra, benchmarked end to end.

The numbers of a 10-step model mean nothing; what is checked is that every section is there with
its counts, that only test-split spectra are scored (and only train-split spectra fit baselines and
probes), that numbers are finite where they must be, and the parts with a known answer (frames of
the RV comparison, the data selection, the device the speeds are measured on).
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import pytest
import torch

from stellarfield.bench import run as bench_module
from stellarfield.bench.data import load_split
from stellarfield.bench.rv import rv_section
from stellarfield.data.store import Dataset
from stellarfield.eval.common_grid import CommonGrid
from stellarfield.eval.realism import pseudo_continuum_normalised, rest_frame_copy
from stellarfield.eval.speed import generation_speed, on_cpu
from stellarfield.physics.doppler import doppler_shift
from stellarfield.spectrum import Segment, Spectrum

#: Bench options small enough for a test: every section still runs.
OPTIONS = dict(max_train_per_product=20, refine_steps=5, speed_batch=64, speed_repeats=1, min_realism_spectra=4,
               min_generated=8, examples_per_product=1, cross_source="lamost_lrs", cross_targets=("miles",))


@pytest.fixture(scope="module")
def dataset(eval_dataset):
    """60 MILES stars and 60 LAMOST spectra (with catalogue labels): both have test-split stars."""
    return eval_dataset


@pytest.fixture(scope="module")
def run(eval_run):
    return eval_run


@pytest.fixture(scope="module")
def bench(dataset, run, tmp_path_factory):
    """The bench through the command line, with every fit's keys recorded."""
    from stellarfield import cli

    fitted: list[list[str]] = []
    baseline_keys: list[list[str]] = []
    real_fit = bench_module.fit_records

    real_matrix = bench_module.PCABaseline.training_matrix

    def spy_matrix(self, spectra):  # every PCA fit (plain, weighted, or both at once) prepares its spectra here
        spectra = list(spectra)
        baseline_keys.append([s.key for s in spectra])
        return real_matrix(self, spectra)

    def spy(trained, spectra, *args, **kwargs):
        spectra = list(spectra)
        fitted.append([s.key for s in spectra])
        return real_fit(trained, spectra, *args, **kwargs)

    out = tmp_path_factory.mktemp("bench") / "report"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bench_module, "fit_records", spy)
        mp.setattr(bench_module.PCABaseline, "training_matrix", spy_matrix)
        mp.setattr(bench_module, "BenchOptions", _with_test_options(bench_module.BenchOptions))
        code = cli.main(["bench", "--model", str(run), "--data", str(dataset), "--out", str(out), "--refine-steps", "5",
                         "--max-train-per-product", "20"])
    assert code == 0
    return out, json.loads((out / "report.json").read_text()), fitted, baseline_keys


def _with_test_options(cls):
    """BenchOptions whose defaults are :data:`OPTIONS` (the command line does not expose all of them)."""

    def make(**kwargs):
        return cls(**{**OPTIONS, **kwargs})

    return make


def _split_keys(dataset, split: str) -> dict[str, set[str]]:
    table = Dataset(dataset).table(["key", "product"], split=split)
    out: dict[str, set[str]] = {}
    for key, product in zip(table.column("key").to_pylist(), table.column("product").to_pylist()):
        out.setdefault(product, set()).add(key)
    return out


def test_report_has_every_section_with_counts(bench, dataset):
    out, report, _, _ = bench
    test = _split_keys(dataset, "test")
    assert set(test) == {"miles", "lamost_lrs"} and all(len(k) >= 4 for k in test.values())
    for name in ("report.json", "metrics.json", "report.md"):
        assert (out / name).stat().st_size > 0
    assert list(report) == ["reconstruction", "rv", "probes", "realism", "speed", "pairs", "inputs", "timing", "plots"]
    for product, keys in test.items():
        entry = report["reconstruction"][product]
        assert entry["n_test"] == len(keys) and entry["n_train"] == 20
        for method in ("model", "pca"):
            assert entry[method]["n"] == len(keys)
        assert "no_physics" not in entry and "no_physics_note" not in entry  # no physics ablation in the bench
        assert entry["pca"]["n_components"] == 4  # the model's latent dimension
    # LAMOST has errors: chi2_nu finite for every method; MILES has none: chi2 null, RMS finite
    for method in ("model", "pca"):
        assert np.isfinite(report["reconstruction"]["lamost_lrs"][method]["chi2_nu"]["median"])
        assert report["reconstruction"]["miles"][method]["chi2_nu"]["median"] is None
        assert report["reconstruction"]["miles"][method]["rms_residual"]["median"] > 0
    for plot in report["plots"]:
        assert (out / plot).stat().st_size > 0
    text = (out / "report.md").read_text()
    assert "## 1. Reconstruction" in text and "physics off" not in text
    assert "no_physics" not in json.loads((out / "metrics.json").read_text())["reconstruction"]["lamost_lrs"]


def test_only_test_spectra_are_scored_and_only_train_spectra_fit_baselines(bench, dataset):
    _, report, fitted, baseline_keys = bench
    test, train = _split_keys(dataset, "test"), _split_keys(dataset, "train")
    all_test = set().union(*test.values())
    all_train = set().union(*train.values())
    scored = report["inputs"]["scored_keys"]
    assert {p: set(k) for p, k in scored.items()} == test
    assert not set().union(*map(set, scored.values())) & all_train
    # every fit is of test spectra only or train spectra only (train: the probes' training latents)
    for keys in fitted:
        assert set(keys) <= all_test or set(keys) <= all_train
    fitted_test = set().union(*(set(k) for k in fitted if set(k) <= all_test))
    assert fitted_test == all_test
    assert report["inputs"]["train_counts"] == {"lamost_lrs": 20, "miles": 20}
    # the PCA baselines are fitted on every train spectrum of each product (not only the probes' 20),
    # never on a test spectrum
    assert len(baseline_keys) == 2 and all(set(k) <= all_train for k in baseline_keys)
    assert sorted(len(k) for k in baseline_keys) == sorted(len(k) for k in train.values())


def test_sections_hold_finite_numbers(bench, dataset, run):
    _, report, _, _ = bench
    test = Dataset(dataset)
    lamost = [s for s in test.iter_spectra(split="test", products=["lamost_lrs"])]
    rv = report["rv"]["lamost_lrs"]
    assert rv["fitted"] and rv["n"] == sum(np.isfinite(s.label("rv_kms")) for s in lamost)
    assert np.isfinite(rv["offset_kms"]) and np.isfinite(rv["scatter_kms"])
    assert "heliocentric" in rv["compared"]
    assert report["rv"]["miles"]["fitted"] is False  # the model fits no RV for MILES

    probes = report["probes"]
    for source in ("miles", "lamost_lrs"):
        for kind in ("latent", "pca"):
            teff = probes["sources"][source][kind]["teff"]
            assert teff["n"] >= 1 and teff["mad"] >= 0 and teff["ridge"]["mad"] >= 0
    cross = probes["cross_source"]["miles"]
    assert cross["source"] == "lamost_lrs" and cross["cross"]["knn"]["teff"]["n"] >= 1
    assert -1.0 <= probes["neighbour_agreement"]["miles"]["teff"]["agreement"] <= 1.0

    for product in ("miles", "lamost_lrs"):
        r = report["realism"][product]
        assert 0.0 <= r["c2st_auc"] <= 1.0 and r["n_real"] >= 4 and r["n_generated"] >= 8
    assert report["realism"]["miles"]["lines"]["H-beta"]["depth"]["real"]["n"] >= 4

    speed = report["speed"]
    assert speed["model_spectra_per_s"] > 0 and speed["payne_spectra_per_s"] > 0
    assert speed["cpu_cores"] == os.cpu_count() and speed["torch_threads"] == 1
    assert speed["train_spectra_per_s"] == json.loads((run / "summary.json").read_text())["train_spectra_per_s"]
    assert speed["fit_n"] == sum(len(k) for k in report["inputs"]["scored_keys"].values())
    # --device defaults to cpu; generation (model and Payne) is timed on the CPU whatever the device
    assert report["inputs"]["options"]["device"] == "cpu" and report["inputs"]["device"] == "cpu"
    assert speed["generation_device"] == "cpu" and speed["fit_device"] == "cpu"
    assert all(d["device"] == "cpu" for d in speed["per_product"].values())
    text = (bench[0] / "report.md").read_text()
    assert f"speeds measured on the CPU, {speed['torch_threads']} torch thread(s)" in text
    # the RV table shows the > 5 sigma counts at S/N > 20 of every comparison
    out = rv["outliers"]
    assert out["snr_min"] == 20.0 and out["n"] >= 0
    assert "> 5 sigma at S/N > 20" in text
    assert f"{out['n_beyond']} of {out['n']} | {out['n_beyond_after_offset']} of {out['n']} |" in text

    metrics = json.loads((bench[0] / "metrics.json").read_text())
    assert metrics["reconstruction"]["lamost_lrs"]["pca"]["chi2_nu_median"] > 0
    assert metrics["probe"]["miles"]["latent"]["teff"]["n"] >= 1
    assert metrics["realism"]["miles"]["c2st_auc"] is not None
    assert set(metrics["speed"]) >= {"model_spectra_per_s", "payne_spectra_per_s"}


def test_weighted_and_plain_pca_side_by_side_at_the_models_latent_dimension(bench, run, dataset):
    out, report, _, _ = bench
    from stellarfield.model.checkpoint import load_model

    k = load_model(run).config["decoder"]["latent_dim"]  # K of the PCAs is read from the model's config
    assert report["inputs"]["latent_dim"] == k == 4 and report["inputs"]["options"]["pca"] == "both"
    for product in ("miles", "lamost_lrs"):
        entry = report["reconstruction"][product]
        assert entry["pca"]["weighted_pca"] is True and entry["pca_plain"]["weighted_pca"] is False
        for kind in ("pca", "pca_plain"):  # all train spectra of the product (the probes use 20)
            assert entry[kind]["n_components"] == 4 and entry[kind]["n"] == entry["n_test"]
            assert entry[kind]["n_train"] == entry["n_train_available"] == len(_split_keys(dataset, "train")[product]) > 20
        assert entry["pca"]["em_iterations"] >= 1 and entry["pca_plain"]["em_iterations"] == 0
        probes = report["probes"]["sources"][product]
        assert probes["k"] == 4 and probes["pca"]["teff"]["n"] == probes["latent"]["teff"]["n"] >= 1
        assert "pca_plain" in probes
    text = (out / "report.md").read_text()
    assert "weighted PCA (K=4)" in text and "plain PCA (K=4)" in text and "wPCA 10-NN MAD" in text
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["reconstruction"]["lamost_lrs"]["pca"]["n_train"] == report["reconstruction"]["lamost_lrs"]["pca"]["n_train"]
    assert metrics["probe"]["miles"]["pca"]["teff"]["n"] >= 1


def test_realism_adds_the_instruments_noise_and_plots_line_depths(bench):
    out, report, _, _ = bench
    lamost, miles = report["realism"]["lamost_lrs"], report["realism"]["miles"]
    assert lamost["noise"]["source"] == "error arrays" and miles["noise"]["source"] == "DER_SNR"
    for r in (lamost, miles):
        assert r["noise"]["n_templates"] == r["n_real"] and r["noise"]["median_continuum_snr"] > 1
        assert r["feature_pixels"] > 100  # MILES no longer loses every pixel
        assert 0.0 <= r["c2st_auc"] <= 1.0 and 0.0 <= r["c2st_auc_noiseless"] <= 1.0
    assert "plots/line_depths_miles.png" in report["plots"] and (out / "plots" / "line_depths_miles.png").stat().st_size > 0
    assert "AUC no noise" in (out / "report.md").read_text()


def test_pca_training_subset_keeps_all_spectra_within_the_budget_else_a_reproducible_random_subset():
    spectra = [_record("p", "rest", {}, {}, object_id=f"s{i}") for i in range(50)]  # 200 pixels each
    assert bench_module.pca_training_subset(spectra, 50 * 200, seed=0) == spectra
    assert bench_module.pca_training_subset(spectra, None) == spectra
    subset = bench_module.pca_training_subset(spectra, 20 * 200 + 199, seed=1)
    assert len(subset) == 20 and len({s.key for s in subset}) == 20
    assert [s.key for s in subset] == [s.key for s in spectra if s in subset]  # order kept
    assert subset == bench_module.pca_training_subset(spectra, 20 * 200, seed=1)
    assert len(bench_module.pca_training_subset(spectra, 10, seed=1)) == 2  # never fewer than 2


def test_pca_train_pools_read_every_train_spectrum_within_the_budget(dataset):
    train_keys = _split_keys(dataset, "train")
    probes = load_split([dataset], "train", max_per_product=5, seed=0)  # the probes' tighter cap
    pools = bench_module.pca_train_pools([dataset], probes, max_cells=None)
    assert {p: {s.key for s in v} for p, v in pools.items()} == train_keys  # all of them
    pixels = {p: int(np.median([s.n_pixels for s in v])) for p, v in probes.spectra.items()}
    pools = bench_module.pca_train_pools([dataset], probes, max_cells=12 * max(pixels.values()))
    assert all(12 <= len(v) < len(train_keys[p]) and {s.key for s in v} <= train_keys[p] for p, v in pools.items())
    pools = bench_module.pca_train_pools([dataset], probes, max_cells=3 * min(pixels.values()))
    assert all(pools[p] is probes.spectra[p] for p in pools)  # no more than already loaded fit: nothing re-read


def test_cli_refuses_to_overwrite_a_report(bench, dataset, run, capsys):
    from stellarfield import cli

    out, _, _, _ = bench
    code = cli.main(["bench", "--model", str(run), "--data", str(dataset), "--out", str(out)])
    assert code == cli.EXIT_USAGE and "--force" in capsys.readouterr().err
    code = cli.main(["bench", "--model", str(out), "--data", str(dataset), "--out", str(out / "x")])
    assert code == cli.EXIT_USAGE and "latest.json" in capsys.readouterr().err  # not a run folder


# --- parts with a known answer (fast) ------------------------------------------------------------
def _record(product: str, frame: str, labels: dict, meta: dict, object_id: str = "star") -> Spectrum:
    wave = np.linspace(5000.0, 5100.0, 200)
    seg = Segment("full", wave, np.ones(200, np.float32), np.ones(200, np.float32), np.ones(200, bool))
    return Spectrum(object_id=object_id, survey="test", instrument="test", product=product, segments=[seg],
                    frame=frame, normalisation="flux", labels=labels, meta=meta)


def test_rv_frames_apvisit_topocentric_plus_bc_is_vhelio():
    """apVisit: fitted (topocentric) + BC vs VHELIO; a fit equal to VHELIO - BC gives offset 0, scatter 0."""
    vhelio, bc = np.array([-40.0, 12.5, 80.0]), np.array([-6.5, 10.0, 3.25])
    spectra = [_record("apogee_apvisit", "observed", {"rv_kms": v, "snr": 30.0}, {"bc_kms": b, "vrad_kms": v - b},
                       object_id=f"s{i}") for i, (v, b) in enumerate(zip(vhelio, bc))]
    fits = {s.key: {"rv_kms": v - b + 0.5, "rv_err_kms": 0.1} for s, v, b in zip(spectra, vhelio, bc)}
    r = rv_section(spectra, fits)
    assert r.n == 3 and r.offset_kms == pytest.approx(0.5) and r.scatter_kms == pytest.approx(0.0)
    assert "BC" in r.compared and r.references["vrad"]["offset_kms"] == pytest.approx(0.5)
    assert r.to_dict()["offset_kms"] == r.offset_kms and list(r.to_dict())[:3] == ["fitted", "n_spectra", "frame"]
    # a rest-frame product is compared with 0: its fitted RV is a residual
    rest = [_record("galah_dr3", "rest", {"rv_kms": 30.0}, {}, object_id=f"r{i}") for i in range(2)]
    r = rv_section(rest, {s.key: {"rv_kms": 1.0, "rv_err_kms": None} for s in rest})
    assert r.offset_kms == pytest.approx(1.0) and "residual" in r.compared
    not_fitted = rv_section(rest, {s.key: {"rv_kms": None} for s in rest})
    assert not_fitted.fitted is False and not_fitted.to_dict() == {
        "fitted": False, "n": 0, "n_spectra": 2, "note": "the model fits no radial velocity for this product"}


def test_rv_apvisit_headline_is_the_apstar_per_visit_vhelio(shared_data):
    """Real DR13 visits whose headers hold absurd VHELIOs (596, 598 and -224 km/s): the headline
    compares fitted + BC with the apStar file's per-visit VHELIO<k> (7.2, 6.6, 6.4 km/s), matched by
    plate-MJD-fiber; a fit equal to VHELIO<k> - BC<k> + 1 gives offset 1, scatter 0, while the
    visit headers' own VHELIO is off by hundreds of km/s."""
    from stellarfield.io import read_spectra

    visits = [s for k in range(3) for s in read_spectra(shared_data / f"apogee/apvisit/apVisit-2M00452143+1634446-{k}.fits")]
    apstar = {"6561-56587-131": (7.16206, -6.46675), "6561-56607-125": (6.61412, -15.8437), "6561-56616-131": (6.43501, -19.6149)}
    fits = {s.key: {"rv_kms": apstar[s.observation_id][0] - apstar[s.observation_id][1] + 1.0, "rv_err_kms": 0.1}
            for s in visits}
    r = rv_section(visits, fits)
    assert r.n_apstar_matched == 3 and r.n == 3 and "apStar" in r.compared
    assert r.offset_kms == pytest.approx(1.0, abs=1e-4) and r.scatter_kms == pytest.approx(0.0, abs=1e-4)
    # S/N ~40: all three checked; 1 km/s is > 5 sigma (sqrt(0.1^2 + VERR 0.12^2) = 0.16 km/s), not after the offset
    assert r.outliers == {**r.outliers, "n": 3, "n_beyond": 3, "n_beyond_after_offset": 0}
    assert abs(r.references["vhelio"]["offset_kms"]) > 100  # the visit headers' values
    assert list(r.references) == ["apstar_vhelio", "vhelio", "vrad"]


def test_rv_outliers_count_fits_beyond_5_sigma_at_high_snr(tmp_path):
    """apStar headers found through ``apstar_folders``; sigma = fit and survey errors in quadrature;
    only S/N > 20 counts."""
    from astropy.io import fits as pyfits

    header = pyfits.Header()
    header["OBJID"], header["NVISITS"] = "2M00000000+0000000", 4
    for k, (vhelio, verr, bc) in enumerate([(10.0, 0.3, 1.0), (11.0, 0.3, 2.0), (12.0, 0.3, 3.0), (13.0, -9999.0, 4.0)], 1):
        header[f"SFILE{k}"] = f"apVisit-r6-1234-5670{k}-00{k}.fits"
        header[f"VHELIO{k}"], header[f"VERR{k}"], header[f"BC{k}"] = vhelio, verr, bc
    (tmp_path / "stars").mkdir()
    pyfits.PrimaryHDU(header=header).writeto(tmp_path / "stars" / "apStar-r6-2M00000000+0000000.fits")
    wave = np.linspace(15200.0, 15300.0, 50)
    seg = Segment("blue", wave, np.ones(50, np.float32), np.ones(50, np.float32), np.ones(50, bool))
    visits = [Spectrum(object_id="2M00000000+0000000", survey="APOGEE", instrument="APOGEE-N", product="apogee_apvisit",
                       observation_id=f"1234-5670{k}-00{k}", segments=[seg], frame="observed", normalisation="flux",
                       labels={"rv_kms": 999.0, "snr": snr}, meta={"bc_kms": 0.0}) for k, snr in zip(range(1, 6), (50, 50, 10, 50, 50))]
    # differences: 0.1 (fine), 3.0 (> 5 x 0.5), 3.0 at S/N 10 (not counted), 0.1 with no survey error, no apStar entry
    fitted = {1: 10.0 - 1.0 + 0.1, 2: 11.0 - 2.0 + 3.0, 3: 12.0 - 3.0 + 3.0, 4: 13.0 - 4.0 + 0.1, 5: 0.0}
    fits = {s.key: {"rv_kms": fitted[k], "rv_err_kms": 0.4 if k < 4 else 0.01} for k, s in enumerate(visits, 1)}
    r = rv_section(visits, fits, apstar_folders=[tmp_path / "stars"])
    assert r.n_apstar_matched == 4 and r.n == 4
    out = r.outliers
    assert out["snr_min"] == 20.0 and out["n"] == 3 and out["n_beyond"] == 2  # visit 4: 0.1 > 5 x 0.01
    assert rv_section(visits, fits).compared.startswith("fitted (topocentric) + BC (visit header)")  # no apStar found


def test_rv_table_shows_the_outlier_counts_of_every_comparison():
    from stellarfield.bench.report import _rv_md
    from stellarfield.bench.sections import RVComparison

    ref = {"compared": "fitted vs survey", "n": 12, "offset_kms": 0.5, "scatter_kms": 1.0, "by_snr": [],
           "outliers": {"snr_min": 20.0, "sigmas": 5.0, "n": 10, "n_beyond": 3, "n_beyond_after_offset": 1}}
    old = {k: v for k, v in ref.items() if k != "outliers"}  # a report written before the counts
    rv = {"apogee_apvisit": RVComparison(fitted=True, n_spectra=12, rv_err_median_kms=0.1,
                                         references={"apstar_vhelio": ref, "vhelio": old})}
    text = "\n".join(_rv_md(rv))
    assert "> 5 sigma at S/N > 20" in text and "> 5 sigma after offset" in text
    assert "| 3 of 10 | 1 of 10 |" in text and "| - | - |" in text


def test_rv_pull_is_one_when_differences_are_the_stated_errors_and_repeats_remove_zero_points():
    """Synthetic LAMOST-like case: the survey's errors (8 km/s) dwarf the model's (1 km/s). The raw
    scatter is the survey's; the pull is ~1; repeats give each side's own precision, and a constant
    offset of the model (a zero point) changes neither."""
    from stellarfield.bench.rv import pull_scatter, repeat_scatter

    rng = np.random.default_rng(0)
    n_stars, visits = 400, 3
    truth = np.repeat(rng.normal(0, 40, n_stars), visits)
    stars = [f"star{i}" for i in range(n_stars) for _ in range(visits)]
    model = truth + 5.0 + rng.normal(0, 1.0, truth.size)  # a 5 km/s zero-point offset, 1 km/s precision
    survey = truth + rng.normal(0, 8.0, truth.size)
    pull = pull_scatter(model - survey, np.full(truth.size, 1.0), np.full(truth.size, 8.0))
    assert pull["n_pull"] == truth.size and abs(pull["pull_scatter"] - 1) < 0.1
    assert pull["survey_error_median_kms"] == pytest.approx(8.0)
    rep = repeat_scatter(stars, model, survey)
    assert rep["n_stars"] == n_stars and rep["n_spectra"] == truth.size
    assert abs(rep["model_kms"] - 1.0) < 0.15 and abs(rep["survey_kms"] - 8.0) < 1.0
    # no errors stated: no pull; one visit per star: no repeats
    assert pull_scatter(model - survey, np.ones(truth.size), np.full(truth.size, np.nan))["n_pull"] == 0
    assert repeat_scatter([f"s{i}" for i in range(truth.size)], model, survey) is None


def test_no_repeat_precision_from_topocentric_velocities():
    """apVisit VRAD and the fit are both topocentric: a star's values move between visits with the
    barycentric correction, so that comparison gets no repeat scatter; the barycentric ones do."""
    from stellarfield.bench.rv import references_for

    refs = {r.name: r for r in references_for("apogee_apvisit", "observed", {})}
    assert refs["vrad"].topocentric and not refs["vhelio"].topocentric and not refs["apstar_vhelio"].topocentric
    wave = np.linspace(15200.0, 15300.0, 50)
    seg = Segment("blue", wave, np.ones(50, np.float32), np.ones(50, np.float32), np.ones(50, bool))
    visits = [Spectrum(object_id="2M00000000+0000000", survey="APOGEE", instrument="APOGEE-N", product="apogee_apvisit",
                       observation_id=f"1234-5670{k}-00{k}", segments=[seg], frame="observed", normalisation="flux",
                       labels={"rv_kms": 10.0 + k, "snr": 50.0}, meta={"bc_kms": 5.0 * k, "vrad_kms": 10.0 - 4 * k})
              for k in range(3)]
    fits = {s.key: {"rv_kms": 10.0 - 4 * k + 0.1 * k, "rv_err_kms": 0.1} for k, s in enumerate(visits)}
    compared = rv_section(visits, fits).references
    assert compared["vrad"]["repeats"] is None
    assert compared["vhelio"]["repeats"]["n_stars"] == 1 and compared["vhelio"]["repeats"]["n_spectra"] == 3


def test_lamost_rv_comparisons_carry_the_surveys_errors(shared_data):
    """c * Z_ERR and the catalogue's rv_err reach the bench's comparisons (facts of the files)."""
    from astropy.io import fits as pyfits

    from stellarfield.bench.rv import references_for
    from stellarfield.io import read_spectra

    path = shared_data / "lamost" / "spec-55859-F5902_sp03-232.fits.gz"
    spectrum = read_spectra(path)[0]
    z_err = pyfits.getheader(path)["Z_ERR"]
    c_z, catalogue = references_for("lamost_lrs", "observed")
    assert c_z.error(spectrum) == pytest.approx(299792.458 * z_err)
    assert np.isnan(catalogue.error(spectrum))  # a DR8 file: not in the DR1 catalogue
    dr1 = read_spectra(shared_data / "lamost" / "spec-55862-B6212_sp06-003.fits")[0]
    assert catalogue.error(dr1) == pytest.approx(13.98)  # the catalogue row of obsid 906003


def test_speed_runs_model_and_payne_on_the_cpu(run):
    """The speed comparison builds its tensors on the CPU: a model elsewhere is timed through a CPU copy."""
    from stellarfield.model.checkpoint import load_model

    trained = load_model(run)
    assert on_cpu(trained) is trained  # already on the CPU: no copy
    result = generation_speed(trained, "lamost_lrs", batch=8, repeats=1)
    assert result["device"] == "cpu" and result["model_spectra_per_s"] > 0 and result["payne_spectra_per_s"] > 0
    if torch.cuda.is_available():
        gpu = load_model(run, device="cuda")
        copy = on_cpu(gpu)
        assert next(copy.model.parameters()).device.type == "cpu"
        assert next(gpu.model.parameters()).device.type == "cuda"  # the original stays on the GPU
        assert generation_speed(gpu, "lamost_lrs", batch=8, repeats=1)["device"] == "cpu"


def test_cli_bench_device_choices_and_model_help(capsys):
    from stellarfield.cli import bench as cli_bench

    parser = argparse.ArgumentParser(prog="stellarfield")
    cli_bench.add_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "--model", "m", "--data", "d", "--out", "o"])
    assert args.device == "cpu"
    assert parser.parse_args(["bench", "--model", "m", "--data", "d", "--out", "o", "--device", "auto"]).device == "auto"
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--model", "m", "--data", "d", "--out", "o", "--device", "tpu"])
    assert "invalid choice: 'tpu'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "{auto,cpu,cuda}" in text and "auto, cpu, cuda" in text
    assert "run folder, or 'reference' for the model shipped with stellarfield" in text


def test_split_selection_is_capped_deduplicated_and_reproducible(dataset):
    train = _split_keys(dataset, "train")
    twice = load_split([dataset, dataset], "train", max_per_product=7, seed=3)  # the same dataset twice: once
    assert twice.counts() == {"lamost_lrs": 7, "miles": 7} and twice.available == {p: len(k) for p, k in train.items()}
    assert all(set(keys) <= train[p] for p, keys in twice.keys().items())
    assert load_split([dataset], "train", max_per_product=7, seed=3).keys() == twice.keys()
    assert load_split([dataset], "train", max_per_product=7, seed=4).keys() != twice.keys()
    assert {p: set(k) for p, k in load_split([dataset], "train").keys().items()} == train
    per_product = load_split([dataset], "train", max_per_product={"miles": 4}, seed=3)  # one cap per product
    assert per_product.counts() == {"lamost_lrs": len(train["lamost_lrs"]), "miles": 4}


def test_probe_train_caps_keep_high_resolution_products_within_the_cell_budget(dataset):
    """The probes' train cap: max_train_per_product, fewer spectra where that many of the product's
    pixel count would exceed probe_max_cells (LAMOST LRS spectra hold ~3,900 pixels, MILES ~4,300)."""
    test = load_split([dataset], "test", seed=0)
    pixels = {p: int(np.median([s.n_pixels for s in v])) for p, v in test.spectra.items()}
    caps = bench_module.probe_train_caps(test, bench_module.BenchOptions(max_train_per_product=30, probe_max_cells=None))
    assert caps == {p: 30 for p in test.spectra}
    caps = bench_module.probe_train_caps(test, bench_module.BenchOptions(max_train_per_product=30,
                                                                        probe_max_cells=10 * pixels["miles"]))
    assert caps["miles"] == 10 and caps["lamost_lrs"] == min(30, 10 * pixels["miles"] // pixels["lamost_lrs"])


def test_rest_frame_copy_puts_a_shifted_line_back_and_normalisation_keeps_its_depth():
    wave = np.linspace(6500.0, 6620.0, 1201)
    line = 1.0 - 0.6 * np.exp(-0.5 * ((wave - 6562.8) / 1.0) ** 2)
    v = 150.0
    observed_wave = doppler_shift(wave, v)
    seg = Segment("full", observed_wave, (3.0 * line).astype(np.float32), np.ones(1201, np.float32), np.ones(1201, bool))
    s = Spectrum(object_id="x", survey="t", instrument="t", product="p", segments=[seg], frame="observed",
                 normalisation="flux")
    rest = rest_frame_copy(s, v)
    assert np.allclose(rest.wavelength, wave, rtol=1e-12) and s.wavelength[0] == observed_wave[0]
    grid = CommonGrid(["full"], [wave[100:1100]])
    flux, _, good = grid.resample(rest)
    norm = pseudo_continuum_normalised(grid, flux[None, :], good[None, :], "continuum")[0]
    assert grid.wavelength[np.nanargmin(norm)] == pytest.approx(6562.8, abs=0.1)
    assert np.nanmin(norm) == pytest.approx(0.4, abs=0.02)  # depth 0.6 kept, the scale 3 divided out


def test_report_sections_serialise_in_the_report_json_layout():
    """The typed sections give report.json's keys in its order, notes where a section was not done."""
    from stellarfield.bench.sections import (
        FitTime,
        MethodScores,
        NotDone,
        PCAFit,
        ProbesSection,
        RealismSection,
        ReconstructionRow,
        SpeedResult,
    )

    fit = PCAFit(4, True, "median", 10, 12, 7, 50, 0.5, 100)
    row = ReconstructionRow(5, 10, 12, True, 4, pca_note="not done: 1 training spectra (needs 2)",
                            methods={"model": MethodScores({"n": 5}, {"n": 5}, chi2_nu_fit={"n": 5}),
                                     "pca": MethodScores({"n": 5}, {"n": 5}, pca_fit=fit)},
                            fit_ms_per_spectrum=2.0)
    d = row.to_dict()
    assert list(d) == ["n_test", "n_train", "n_train_available", "model_trained_on_product", "pca_components_requested",
                       "pca_note", "model", "pca", "fit_ms_per_spectrum"]
    assert list(d["model"]) == ["n", "pixels_scored_fraction", "chi2_nu_fit"]
    assert list(d["pca"])[2:] == ["n_components", "weighted_pca", "normalisation", "n_train", "n_train_loaded",
                                  "em_iterations", "em_max_iter", "fit_seconds", "grid_pixels_modelled"]
    assert RealismSection(note="not done: no prior").to_dict() == {"note": "not done: no prior"}
    assert RealismSection({"miles": NotDone("not done: 3 test spectra", {"n_real": 3})}).to_dict() == {
        "miles": {"note": "not done: 3 test spectra", "n_real": 3}}
    probes = ProbesSection(sources={"gaia_xp": NotDone("not done: 0 train / 0 test spectra")},
                           cross_source_note="not done: no probe features for the source gaia_xp")
    assert probes.to_dict() == {"sources": {"gaia_xp": {"note": "not done: 0 train / 0 test spectra"}},
                                "cross_source": {"note": "not done: no probe features for the source gaia_xp"},
                                "neighbour_agreement": {}}
    speed = SpeedResult(None, None, None, None, 64, {}, float("nan"), 0, 5, {"miles": FitTime(1.0, 2)}, None, None,
                        None, None, 2, 1, "cpu", "cpu", train_note="summary.json not found: training speed unknown")
    d = speed.to_dict()
    assert list(d)[-3:] == ["generation_device", "fit_device", "train_note"]
    assert d["fit_ms_per_spectrum_by_product"] == {"miles": {"ms": 1.0, "n": 2}}
