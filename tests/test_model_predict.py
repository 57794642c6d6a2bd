"""Cross-instrument prediction (model/predict.py): a known answer on synthetic spectra, the error band's
coverage, the API's and the CLI's errors.

The synthetic star: a small decoder with random weights (its encoding tables drawn at unit scale, so
its spectra have lines) observed through two made-up instruments, "synth_a" (observed frame, R 6000,
5000-5400 A, RV fitted) and "synth_b" (rest frame, R 2500, 5300-5900 A, partly overlapping). Spectra
are the decoder's own at one latent plus Gaussian noise of known sigma, so the model is exactly right
and the only uncertainty is the noise's.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from astropy.io import fits

from stellarfield.cli import EXIT_USAGE, main
from stellarfield.model.generate import RenderedBasis, TrainedModel
from stellarfield.model.instrument import ProductStats, build_instrument
from stellarfield.model.predict import PredictionError, predict
from stellarfield.model.stellar_model import StellarModel
from stellarfield.spectrum import Segment, Spectrum

LATENT_DIM = 4
SIGMA = 0.01  # noise, as a fraction of the continuum (S/N 100)
GRIDS = {  # product: (frame, R, lambda_lo, lambda_hi, pixels)
    "synth_a": ("observed", 6000.0, 5000.0, 5400.0, 1200),
    "synth_b": ("rest", 2500.0, 5300.0, 5900.0, 700),
}


def _record(product: str, flux: np.ndarray, star: str = "HD 1", sigma: float = SIGMA, obs: str | None = None) -> Spectrum:
    frame, r, lo, hi, n = GRIDS[product]
    wave = np.exp(np.linspace(np.log(lo), np.log(hi), n))
    ivar = np.full(n, 1 / sigma**2, np.float32)
    seg = Segment("full", wave, flux.astype(np.float32), ivar, np.ones(n, bool))
    return Spectrum(object_id=star.replace(" ", ""), survey="SYNTH", instrument=product, product=product, segments=[seg],
                    frame=frame, normalisation="continuum", resolution=r, star_id=star, observation_id=obs)


def _synthetic_model(branch_hidden: tuple[int, ...]) -> TrainedModel:
    torch.manual_seed(0)
    instruments = {}
    for product in GRIDS:
        st = ProductStats(product)
        st.add(_record(product, np.ones(GRIDS[product][4])))
        instruments[product] = build_instrument(st)
    model = StellarModel(instruments, dict(latent_dim=LATENT_DIM, n_basis=8, trunk_hidden=(16,), branch_hidden=branch_hidden,
                                           encoding_kwargs=dict(levels=6, features=2, coarsest_step=0.02,
                                                                finest_step=2e-5)))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for table in model.decoder.trunk.encoding.tables:
            table.copy_(torch.randn(table.shape, generator=g))
        model.decoder.trunk.net[-1].weight.mul_(0.15)  # spectra of 1 +- a few tenths: lines, not noise
    model.eval()
    return TrainedModel(model, None, {}, None)


@pytest.fixture(scope="module")
def synthetic_model() -> TrainedModel:
    """A decoder whose branch is an MLP (the latent acts non-linearly, as in a trained model)."""
    return _synthetic_model((16,))


@pytest.fixture(scope="module")
def linear_model() -> TrainedModel:
    """A decoder whose branch is linear: the spectrum is linear in the latent, so the posterior is
    Gaussian up to the velocity and the profiled continuum, and the Laplace band should be exact."""
    return _synthetic_model(())


def _clean(model: TrainedModel, z: np.ndarray, product: str, rv: float = 0.0) -> np.ndarray:
    """The noiseless spectrum of latent ``z`` on the product's own pixels, through its own LSF."""
    frame, r, lo, hi, n = GRIDS[product]
    wave = np.exp(np.linspace(np.log(lo), np.log(hi), n))
    basis = RenderedBasis.build(model.model, model.model.instruments[product], [wave])
    with torch.no_grad():
        coeffs = model.model.decoder.coefficients(torch.as_tensor(z, dtype=torch.float32)[None])
        return basis.spectra(coeffs, torch.tensor([rv], dtype=torch.float64) if rv else None).numpy()[0]


def _star(model, seed: int, rv: float = 37.0):
    rng = np.random.default_rng(seed)
    z = rng.standard_normal(LATENT_DIM)
    a = _clean(model, z, "synth_a", rv) + rng.normal(0, SIGMA, GRIDS["synth_a"][4])
    b_clean = _clean(model, z, "synth_b")
    b = b_clean + rng.normal(0, SIGMA, GRIDS["synth_b"][4])
    return z, _record("synth_a", a, obs=f"a{seed}"), _record("synth_b", b, obs=f"b{seed}"), b_clean


def test_joint_fit_recovers_the_star_on_the_other_instrument(synthetic_model):
    """Both spectra fitted together: one latent, each spectrum its own RV; the second instrument's
    spectrum rendered from it matches the noiseless truth to well within the noise."""
    z, a, b, b_clean = _star(synthetic_model, seed=3)
    wave_b = b.wavelength
    p = predict(synthetic_model, [a, b], to="synth_b", wave_grid=wave_b, refine_steps=100, n_samples=100,
                normalise=False)  # the model's flux, as b_clean is
    assert p.grid == "instrument:synth_b+pixels" and p.flux.shape == wave_b.shape
    assert [i.product for i in p.inputs] == ["synth_a", "synth_b"]
    rms = np.sqrt(np.mean((p.flux - b_clean) ** 2))
    assert rms < 0.3 * SIGMA, rms
    # each input keeps its own velocity: A was observed at +37 km/s; B is rest frame with an LSF wider
    # than any residual velocity, so none is fitted (as for MILES)
    assert abs(p.inputs[0].rv_kms - 37.0) < 5 * p.inputs[0].rv_err_kms
    assert p.inputs[1].rv_kms is None and np.isnan(p.rv_kms[1])
    assert 0 < p.inputs[0].rv_err_kms < 5
    assert all(0.7 < i.chi2_nu < 1.3 for i in p.inputs), p.chi2_nu  # the noise is what the errors say
    assert np.all(p.flux_lo <= p.flux_hi) and np.mean((p.flux >= p.flux_lo) & (p.flux <= p.flux_hi)) > 0.9


def test_band_from_one_instrument_covers_the_other_about_68_percent(linear_model):
    """Predicting B from A alone (they share 100 A), over 24 stars drawn from the prior: the 16-84%
    band holds the noiseless B spectrum at about 68% of the pixels (one star's pixels share a few
    latent directions, so a star's own fraction is near 0 or 1 as often as not: the mean over stars
    is what is calibrated), and the latents' Mahalanobis distances to the truth under the Laplace
    covariance follow a chi2 with D = 4 degrees of freedom (median 3.36).

    Measured (seeds 100-139, 40 stars): mean coverage 0.65, median distance 3.2; with the
    non-linear branch 0.61 and 3.4 (one star of 40 in another mode of the posterior)."""
    inside, d2 = [], []
    for seed in range(24):
        z, a, _, b_clean = _star(linear_model, seed=100 + seed)
        p = predict(linear_model, [a], to="synth_b", wave_grid=_record("synth_b", b_clean).wavelength,
                    refine_steps=100, n_samples=200, seed=seed, normalise=False)
        inside.append(np.mean((b_clean >= p.flux_lo) & (b_clean <= p.flux_hi)))
        diff = p.latent - z
        d2.append(float(diff @ np.linalg.solve(p.latent_cov, diff)))
    coverage = float(np.mean(inside))
    assert 0.55 < coverage < 0.82, (coverage, np.round(inside, 2))
    assert 2.0 < np.median(d2) < 5.0, np.round(d2, 1)


def test_the_band_narrows_with_more_data(synthetic_model):
    z, a, b, _ = _star(synthetic_model, seed=7)
    one = predict(synthetic_model, [a], to="synth_b", refine_steps=60, n_samples=100)
    both = predict(synthetic_model, [a, b], to="synth_b", refine_steps=60, n_samples=100)
    assert np.trace(both.latent_cov) < np.trace(one.latent_cov)
    assert np.median(both.flux_hi - both.flux_lo) < np.median(one.flux_hi - one.flux_lo)
    assert one.grid == "instrument:synth_b" and one.frame == "rest"
    # synth_b is continuum normalised: by default its view is divided by a pseudo-continuum, as generate does
    assert "pseudo_continuum_normalised" in one.flags and np.nanpercentile(one.flux, 90) == pytest.approx(1, abs=0.05)
    raw = predict(synthetic_model, [a], to="synth_b", refine_steps=60, n_samples=0, normalise=False)
    assert "pseudo_continuum_normalised" not in raw.flags and not np.allclose(raw.flux, one.flux)
    gon = predict(synthetic_model, [a, b], to="synth_b", method="gon+refine", refine_steps=60, n_samples=0)
    assert np.allclose(gon.flux, both.flux, atol=3 * SIGMA)  # the GON start (mean of the spectra's) ends alike


def test_custom_grids_write_and_read_back(synthetic_model, tmp_path):
    _, a, _, _ = _star(synthetic_model, seed=5)
    p = predict(synthetic_model, [a], wave_range=(5100, 5300), resolution=3000, refine_steps=30, n_samples=20,
                rv_kms=10.0)
    assert p.grid == "custom" and p.render_rv_kms == 10.0 and p.frame == "observed"
    assert np.allclose(np.diff(np.log(p.wavelength)), 1 / (3 * 3000))
    path = p.write(tmp_path / "p.fits")
    with fits.open(path) as hdul:
        assert hdul["FLUX"].data.shape == p.flux.shape and hdul["LATENT_COV"].data.shape == (LATENT_DIM, LATENT_DIM)
        assert hdul["INPUTS"].data["PRODUCT"][0] == "synth_a"
        assert hdul[0].header["NINPUT"] == 1
    import json

    import pyarrow.parquet as pq

    table = pq.read_table(p.write(tmp_path / "p.parquet"))
    meta = json.loads(table.schema.metadata[b"stellarfield"])
    assert table.num_rows == len(p.wavelength) and len(meta["latent"]) == LATENT_DIM
    with pytest.raises(PredictionError, match=".fits or .parquet"):
        p.write(tmp_path / "p.txt")


def test_api_errors(synthetic_model):
    _, a, b, _ = _star(synthetic_model, seed=1)
    other = _record("synth_b", b.flux, star="HD 2")
    with pytest.raises(PredictionError, match="2 different stars"):
        predict(synthetic_model, [a, other], to="synth_b")
    predict(synthetic_model, [a, other], to="synth_b", same_star=False, refine_steps=5, n_samples=0)
    with pytest.raises(PredictionError, match="at least one spectrum"):
        predict(synthetic_model, [], to="synth_b")
    with pytest.raises(PredictionError, match="not trained on product 'galah_dr3'"):
        predict(synthetic_model, [a], to="galah_dr3")
    with pytest.raises(PredictionError, match="exactly one"):
        predict(synthetic_model, [a])
    with pytest.raises(PredictionError, match="not both"):
        predict(synthetic_model, [a], to="synth_b", wave_range=(5000, 5100), resolution=2000)
    with pytest.raises(PredictionError, match="given twice"):
        predict(synthetic_model, [a, a], to="synth_b")
    masked = _record("synth_a", a.flux)
    masked.segments[0].mask[:] = False
    with pytest.raises(PredictionError, match="no usable pixel"):
        predict(synthetic_model, [masked], to="synth_b")


# --- the command ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_and_files(synthetic_model, tmp_path_factory):
    """The synthetic model saved as a run folder, and two spectra of one star as FITS files
    (written by the package's own format: a dataset would do as well, files are what users have)."""
    from stellarfield.model.checkpoint import save_checkpoint

    root = tmp_path_factory.mktemp("predict")
    m = synthetic_model.model
    config = {"format": "stellarfield-model", "decoder": m.decoder_config,
              "instruments": {k: v.to_dict() for k, v in m.instruments.items()}, "likelihood": m.likelihood}
    save_checkpoint(root / "run", 0, config, m.state_dict())
    return root


def _ingested(root, records):
    """A dataset folder holding ``records`` (the CLI reads survey files or datasets)."""
    from stellarfield.data.store import DatasetWriter

    path = root / f"ds{len(list(root.glob('ds*')))}"
    with DatasetWriter(path) as writer:
        writer.write_many(records)
    return path


def test_cli_errors_are_one_line(run_and_files, tmp_path, capsys):
    run = str(run_and_files / "run")
    missing = str(tmp_path / "nowhere.fits")
    cases = [
        (["predict", "--model", run, "--from", missing, "--to", "synth_b", "--out", str(tmp_path / "x.fits")],
         "no such file"),
        (["predict", "--model", run, "--from", missing, "--to", "synth_b", "--out", str(tmp_path / "x.txt")],
         ".fits or .parquet"),
        (["predict", "--model", run, "--from", missing, "--wave-range", "5000", "5100", "--out",
          str(tmp_path / "x.fits")], "--resolution"),
        (["predict", "--model", run, "--from", missing, "--wave-range", "5100", "5000", "--resolution", "2000",
          "--out", str(tmp_path / "x.fits")], "A must be below B"),
        (["predict", "--model", run, "--from", missing, "--to", "synth_b", "--resolution", "2000",
          "--out", str(tmp_path / "x.fits")], "--resolution"),
        (["predict", "--model", str(tmp_path / "norun"), "--from", str(tmp_path), "--to", "synth_b",
          "--out", str(tmp_path / "x.fits")], "does not exist"),
    ]
    for argv, expected in cases:
        assert main(argv) == EXIT_USAGE, argv
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and expected in err and "Traceback" not in err, err
    assert main(["predict", "--model", run, "--from", missing, "--out", str(tmp_path / "x.fits")]) == EXIT_USAGE
    assert "no target" in capsys.readouterr().err


def test_cli_predicts_and_refuses_two_stars(run_and_files, synthetic_model, tmp_path, capsys):
    run = str(run_and_files / "run")
    _, a, b, _ = _star(synthetic_model, seed=11)
    ds = _ingested(tmp_path, [a, b])
    out = tmp_path / "pred.fits"
    assert main(["predict", "--model", run, "--from", str(ds), "--to", "synth_b", "--out", str(out),
                 "--refine-steps", "20", "--samples", "20"]) == 0
    text = capsys.readouterr().out
    assert "synth_a" in text and "synth_b" in text and str(out) in text
    with fits.open(out) as hdul:
        assert hdul["FLUX"].data.shape == (GRIDS["synth_b"][4],) and len(hdul["INPUTS"].data) == 2
    other = _record("synth_b", b.flux, star="HD 2", obs="x")
    ds2 = _ingested(tmp_path, [a, other])
    out = tmp_path / "pred2.fits"  # a new output (an existing one is refused without --force)
    assert main(["predict", "--model", run, "--from", str(ds2), "--to", "synth_b", "--out", str(out)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "different stars" in err and "--star" in err and len(err.strip().splitlines()) == 1
    assert main(["predict", "--model", run, "--from", str(ds2), "--star", "HD 2", "--to", "synth_b",
                 "--out", str(out), "--refine-steps", "5", "--samples", "0"]) == 0
    assert main(["predict", "--model", run, "--from", str(ds2), "--star", "HD 9", "--to", "synth_b",
                 "--out", str(out), "--force"]) == EXIT_USAGE
    assert "no spectrum of star 'HD 9'" in capsys.readouterr().err
    assert main(["predict", "--model", run, "--from", str(ds), "--to", "galah_dr3", "--out", str(out), "--force"]) == EXIT_USAGE
    assert "synth_a" in capsys.readouterr().err  # the products the model knows


# --- the bench: one star, two instruments (eval/pairs.py) ---------------------------------
def test_continuum_rms_removes_a_smooth_calibration_difference():
    from stellarfield.eval.pairs import continuum_rms

    rng = np.random.default_rng(0)
    model = 1 + 0.3 * np.sin(np.linspace(0, 40, 700))
    record = _record("synth_b", np.ones(700))
    x = np.linspace(-1, 1, 700)
    calibrated = model * (2.0 + 0.4 * x - 0.3 * x**2)  # another flux calibration: a smooth factor
    record.segments[0].flux[:] = calibrated + rng.normal(0, 0.01, 700)
    rms, n = continuum_rms(record, model)
    assert n == 700 and rms == pytest.approx(0.01 / np.median(calibrated), rel=0.1)
    record.segments[0].mask[:100] = False
    model_nan = model.copy()
    model_nan[600:] = np.nan  # outside the model's coverage: not scored
    assert continuum_rms(record, model_nan)[1] == 500


def test_pairs_bench_on_synthetic_stars(linear_model):
    """Four stars seen by both instruments: the cross-prediction is as good as each instrument's own
    fit (the model is exact), a star's two latents are close next to random stars'; three nights of
    one star at different velocities give those velocities back and latents that agree within their
    Laplace errors."""
    from stellarfield.eval.pairs import format_pairs, multi_epoch_section, pairs_from_spectra, pairs_section

    spectra = {"synth_a": [], "synth_b": []}
    for k in range(4):
        _, a, b, _ = _star(linear_model, seed=200 + k)
        for s in (a, b):
            s.star_id = f"HD {k + 1}"
            spectra[s.product].append(s)
    spectra["synth_a"].append(_record("synth_a", spectra["synth_a"][0].flux, star="HD 99", obs="alone"))
    pairs = pairs_from_spectra(spectra, ("synth_a", "synth_b"))
    assert [p["star_id"] for p in pairs] == ["HD 1", "HD 2", "HD 3", "HD 4"]
    section = pairs_section(linear_model, pairs=pairs, products=("synth_a", "synth_b"), refine_steps=60, n_samples=20)
    assert section["n_pairs"] == 4
    for src, dst in (("synth_a", "synth_b"), ("synth_b", "synth_a")):
        e = section[f"{src}_to_{dst}"]
        noise = np.median([SIGMA / np.median(np.abs(p[dst].flux)) for p in pairs])  # RMS is relative to the median
        assert e["n"] == 4 and e["self_rms"]["median"] == pytest.approx(noise, rel=0.3)
        assert e["ratio_of_medians"] < 1.5 and e["meets_target"]
    assert section["latent"]["ratio"] < 0.25 and section["latent"]["random_pairs"]["n"] == 24
    assert section["synth_a_to_synth_b"]["data"]["n"] == 0  # observed frame: no model-free floor across velocities
    rng = np.random.default_rng(1)
    z = rng.standard_normal(LATENT_DIM)
    nights = [_record("synth_a", _clean(linear_model, z, "synth_a", rv) + rng.normal(0, SIGMA, GRIDS["synth_a"][4]),
                      obs=f"night{rv}") for rv in (-40.0, 5.0, 60.0)]
    epochs = multi_epoch_section(linear_model, nights, reference_distance=3.0, refine_steps=60)
    fitted = [n["rv_kms"] for n in epochs["nights"]]
    assert np.allclose(fitted, [-40, 5, 60], atol=2) and epochs["n_usable"] == 3
    assert all(abs(n["joint_rv_kms"] - n["rv_kms"]) < 3 * n["rv_err_kms"] for n in epochs["nights"])
    assert epochs["latent"]["chi2_per_dof"] < 3 and epochs["latent"]["ratio_to_random"] < 0.25
    # the model-free cross-correlation, a coarse check (these spectra's features are broad, which
    # biases it by ~5 km/s, a quarter of the LSF sigma), agrees with the model's relative velocities
    assert [n["ccf_relative_kms"] for n in epochs["nights"]] == pytest.approx([0, 45, 100], abs=8)
    assert all(abs(n["rv_relative_minus_ccf_kms"]) < 8 for n in epochs["nights"])
    text = format_pairs(section, epochs)
    assert "fit synth_a" in text and "multi-epoch" in text and "RV: weighted mean" in text


def test_one_spectrum_fits_as_fit_spectra_does(synthetic_model):
    """For a single spectrum the joint objective is n x the per-spectrum loss of inference: the same
    velocity and chi2_nu as fit_spectra (the Newton steps only polish the minimum)."""
    from stellarfield.model.fit import fit_spectra

    _, a, _, _ = _star(synthetic_model, seed=21)
    row = fit_spectra(synthetic_model, [a], refine_steps=100).to_pylist()[0]
    p = predict(synthetic_model, [a], to="synth_a", refine_steps=100, n_samples=0)
    assert p.inputs[0].rv_kms == pytest.approx(row["rv_kms"], abs=max(0.3 * p.inputs[0].rv_err_kms, 0.05))
    assert p.inputs[0].chi2_nu == pytest.approx(row["chi2_nu"], rel=0.03)


def _lines(wave, fwhm):
    """Three intrinsically narrow lines (equivalent width 1 A each) seen through a Gaussian LSF of ``fwhm`` A."""
    sigma = fwhm / 2.3548
    depth = 1.0 / (sigma * np.sqrt(2 * np.pi))
    return 1 - sum(depth * np.exp(-0.5 * ((wave - c) / sigma) ** 2) for c in (5050.0, 5200.0, 5333.3))


def _lined(product, lo, step, n, fwhm, frame="rest"):
    wave = lo + step * np.arange(n)
    seg = Segment("full", wave, _lines(wave, fwhm).astype(np.float32), np.zeros(n, np.float32), np.ones(n, bool),
                  lsf_fwhm=np.full(n, fwhm, np.float32))
    return Spectrum(object_id="HD1", survey="S", instrument="I", product=product, segments=[seg], frame=frame,
                    normalisation="continuum")


LINED_FWHM = {"sharp": 2.5, "broad": 3.4}


def test_observed_as_blurs_the_sharper_spectrum_to_the_broader_lsf():
    """Gaussian lines convolve to Gaussians: a spectrum with lines of sigma s1 (its LSF), seen through
    an instrument of LSF s2 > s1, is the same lines at sqrt(s1^2 + s2^2 - s1^2) = s2; the other way
    round it cannot be made (a spectrum cannot be sharpened), nor for an observed frame."""
    from stellarfield.eval.pairs import observed_as

    sharp, broad = _lined("sharp", 4990.0, 0.3, 1350, 2.5), _lined("broad", 5000.0, 1.0, 380, 3.4)
    sharp.segments[0].mask[300:304] = False  # a few bad pixels are left out of the blur, not zeros
    sharp.segments[0].flux[300:304] = 0.0
    seen = observed_as(sharp, broad)
    inside = np.isfinite(seen)
    assert inside.sum() > 370  # the sharp spectrum covers all but the broad one's last pixels
    assert np.max(np.abs(seen[inside] - broad.flux[inside])) < 3e-3  # the broad spectrum, to interpolation error
    assert np.max(np.abs(sharp.flux - 1)) > 1.5 * np.max(np.abs(broad.flux - 1))  # ... though the lines were deeper
    assert observed_as(broad, sharp) is None  # would need sharpening
    assert observed_as(sharp, _lined("broad", 5000.0, 1.0, 380, 3.4, frame="observed")) is None


def test_the_data_floor_compares_at_the_broader_lsf_on_the_same_pixels():
    """Fits that render the true star give a floor of ~0 both ways, at the broad instrument's LSF
    both ways (the target's when the source is sharper; else the source's, with the target blurred
    to it); a source fit off by a ripple shows as cross RMS, not in the data or own-fit figures."""
    from types import SimpleNamespace

    from stellarfield.eval.pairs import _floor_row

    class Fit:  # renders the true star (plus a ripple) through the instrument asked for
        def __init__(self, ripple=0.0):
            self.ripple = ripple

        def render(self, to, wave_grid, **_):
            return SimpleNamespace(flux=_lines(wave_grid, LINED_FWHM[to]) + self.ripple * np.sin(wave_grid / 3.0))

    pair = {"sharp": _lined("sharp", 4990.0, 0.3, 1350, 2.5), "broad": _lined("broad", 5000.0, 1.0, 380, 3.4)}
    for src, dst in (("sharp", "broad"), ("broad", "sharp")):
        row = {}
        target = pair[dst]
        own, cross = (fit.render(to=dst, wave_grid=target.wavelength).flux for fit in (Fit(), Fit(ripple=0.01)))
        _floor_row(row, pair[src], target, own, cross, Fit(), None, 0, src, dst)
        assert row[f"floor_lsf_{src}_to_{dst}"] == "broad"
        assert row[f"data_rms_where_data_{src}_to_{dst}"] < 2e-3 and row[f"self_rms_where_data_{src}_to_{dst}"] < 2e-3
        assert row[f"cross_rms_where_data_{src}_to_{dst}"] == pytest.approx(0.01 / np.sqrt(2), rel=0.2)
    assert row["self_through_source_rms_broad_to_sharp"] < 2e-3  # the true star through the broad instrument: the same
