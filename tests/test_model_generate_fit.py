"""Stage 5 of the model: prior, generation on any grid, fitting, save/load, bad input (real spectra)."""

from __future__ import annotations

import glob

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from astropy.io import fits
from conftest import TINY_TRAIN

from stellarfield.io import read_spectra
from stellarfield.model import OutOfRangeError, fit_spectra, generate, load_model, write_fit_table
from stellarfield.model.prior import LatentPrior
from stellarfield.model.train import TrainConfig, train

TINY = {**TINY_TRAIN, "prior_steps": 50, "final_val_refine_steps": 5, "val_refine_steps": 5, "max_steps": 6}



@pytest.fixture(scope="module")
def spectra(shared_data):
    files = sorted(glob.glob(str(shared_data / "apogee/aspcapstar/*.fits")))[:3]
    files += sorted(glob.glob(str(shared_data / "apogee/apvisit/apVisit-2M*.fits")))[:2]
    files += sorted(glob.glob(str(shared_data / "miles/MILES_res2.50_star_m00*V.fits")))[:3]
    return [s for f in files for s in read_spectra(f)]


@pytest.fixture(scope="module")
def run(spectra, tmp_path_factory):
    out = tmp_path_factory.mktemp("model") / "run"
    result = train(spectra, out, TrainConfig(**TINY), progress=False)
    return out, result


def test_prior_fits_a_known_distribution():
    """A flow fitted to correlated Gaussian latents samples their mean and covariance back, and its
    log-density is higher at the centre than far out (anomaly score)."""
    g = torch.Generator().manual_seed(0)
    cov = torch.tensor([[1.0, 0.8], [0.8, 1.0]]) * 4.0
    z = torch.randn(4000, 2, generator=g) @ torch.linalg.cholesky(cov).T + torch.tensor([3.0, -1.0])
    prior = LatentPrior(2, transforms=2, hidden=(32, 32))
    prior.fit(z, steps=300, seed=0)
    s = prior.sample(4000, seed=1)
    assert torch.allclose(s.mean(0), torch.tensor([3.0, -1.0]), atol=0.25)
    assert torch.allclose(torch.cov(s.T), cov, atol=0.8)
    score = prior.anomaly_score(torch.tensor([[3.0, -1.0], [3.0 + 8, -1.0 - 8]]))
    assert score[1] > score[0] + 5
    assert torch.equal(prior.sample(5, seed=3), prior.sample(5, seed=3))


def test_save_and_load_give_identical_outputs(run):
    out, result = run
    loaded = load_model(out)
    z = torch.randn(3, result.model.latent_dim)
    a = generate(result, 3, instrument="apogee_aspcapstar", latents=z)
    b = generate(loaded, 3, instrument="apogee_aspcapstar", latents=z)
    assert np.array_equal(a.flux, b.flux)
    assert torch.equal(result.prior.sample(4, seed=2), loaded.prior.sample(4, seed=2))


def test_generate_on_native_and_custom_grids(run, tmp_path):
    out, _ = run
    g = generate(out, 5, instrument="apogee_aspcapstar", seed=1)
    assert g.flux.shape == (5, 8575) and g.latents.shape == (5, 4)
    assert g.wavelength[0] == pytest.approx(10**4.179, rel=1e-9)  # the apStar grid
    assert np.isfinite(g.flux).all()
    same = generate(out, 5, instrument="apogee_aspcapstar", seed=1)
    assert np.array_equal(g.flux, same.flux)  # same seed, same stars
    custom = generate(out, 2, wave_range=(15200, 15300), resolution=10000, seed=1)
    step = np.diff(np.log(custom.wavelength))
    assert np.allclose(step, 1 / (3 * 10000)) and custom.wavelength[0] == pytest.approx(15200)
    shifted = generate(out, 2, wave_range=(15200, 15300), resolution=10000, seed=1, rv_kms=100.0)
    assert np.allclose(shifted.rv_kms, 100.0) and not np.allclose(shifted.flux, custom.flux)
    with pytest.raises(OutOfRangeError, match="outside what the model was trained on"):
        generate(out, 2, wave_range=(9000, 9100), resolution=2000)  # no APOGEE/MILES pixels there
    with pytest.raises(KeyError, match="not trained on product 'galah_dr3'"):
        generate(out, 2, instrument="galah_dr3")
    fits_path = g.write(tmp_path / "g.fits")
    with fits.open(fits_path) as hdul:
        assert hdul["FLUX"].data.shape == (5, 8575) and hdul["LATENT"].data.shape == (5, 4)
    table = pq.read_table(g.write(tmp_path / "g.parquet"))
    assert table.num_rows == 5 and len(table.column("latent")[0]) == 4


def test_fit_spectra_columns_flags_and_bad_input(run, spectra, shared_data, tmp_path):
    out, _ = run
    miles = read_spectra(shared_data / "miles/MILES_res2.50_star_m0501V.fits")[0]
    miles.segments[0].flux[100:120] = np.nan  # NaNs in a spectrum to fit
    miles = type(miles)(**{**miles.__dict__, "segments": [type(miles.segments[0])(**miles.segments[0].__dict__)]})
    visit = [s for s in spectra if s.product == "apogee_apvisit"][0]
    lamost = read_spectra(sorted(glob.glob(str(shared_data / "lamost/spec-55862-*.fits")))[0])[0]
    table = fit_spectra(out, [miles, visit, lamost], refine_steps=5)
    rows = {r["product"]: r for r in table.to_pylist()}
    assert table.num_rows == 3
    assert "nan_pixels_masked" in rows["miles"]["flags"] and rows["miles"]["n_pixels"] == 4300 - 20
    assert rows["miles"]["rv_kms"] is None  # MILES: rest frame, LSF wider than any residual RV
    assert rows["apogee_apvisit"]["rv_kms"] is not None and rows["apogee_apvisit"]["rv_err_kms"] > 0
    assert len(rows["apogee_apvisit"]["model_flux"]) == visit.n_pixels
    # a survey the model never saw: observed through an instrument built from the records, flagged;
    # LAMOST pixels outside the APOGEE + MILES coverage (beyond 7410 A) are masked and flagged
    assert "new_instrument" in rows["lamost_lrs"]["flags"]
    assert "pixels_outside_training_range" in rows["lamost_lrs"]["flags"]
    assert 0 < rows["lamost_lrs"]["n_pixels"] < lamost.n_pixels
    assert all(np.isfinite(r["chi2_nu"]) and len(r["latent"]) == 4 for r in rows.values())
    assert all(np.isfinite(r["anomaly_score"]) for r in rows.values())
    path = write_fit_table(table, tmp_path / "fit.parquet")
    assert pq.read_table(path).num_rows == 3


def test_fitted_together_or_one_by_one_the_fits_are_the_same(run, spectra):
    """Each spectrum's fit is its own: the chunk size (by default from the pixels, chunk_size) changes
    the speed, not the latents, velocities or chi2."""
    from stellarfield.model.inference import MAX_CHUNK, PIXELS_PER_CHUNK, chunk_size

    out, _ = run
    together = fit_spectra(out, spectra, refine_steps=5, keep_model_flux=False).to_pydict()
    alone = fit_spectra(out, spectra, refine_steps=5, batch=1, keep_model_flux=False).to_pydict()
    assert together["key"] == alone["key"] and len(together["key"]) == len(spectra)
    np.testing.assert_allclose(np.array(together["latent"]), np.array(alone["latent"]), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.array(together["chi2_nu"]), np.array(alone["chi2_nu"]), rtol=1e-4)
    number = lambda values: np.array([np.nan if v is None else v for v in values], dtype=float)
    rv_together, rv_alone, rv_err = number(together["rv_kms"]), number(alone["rv_kms"]), number(together["rv_err_kms"])
    assert np.array_equal(np.isnan(rv_together), np.isnan(rv_alone))
    # this tiny model's velocities are loose (errors of 100-500 km/s): rounding moves them by ~0.03 km/s
    fitted = np.isfinite(rv_together)
    assert np.all(np.abs(rv_together - rv_alone)[fitted] <= 1e-3 * np.nan_to_num(rv_err[fitted], nan=10.0) + 1e-6)
    # the default: the pixel budget's worth of spectra, at least 1, at most MAX_CHUNK
    assert chunk_size(343) == min(MAX_CHUNK, PIXELS_PER_CHUNK // 343)
    assert chunk_size(16_385) == PIXELS_PER_CHUNK // 16_385 and chunk_size(10 * PIXELS_PER_CHUNK) == 1
    assert chunk_size(16_385, chunk=3) == 3
    with pytest.raises(ValueError, match="at least 1"):
        chunk_size(343, chunk=0)


def test_refinement_starts_from_the_latent_it_is_given(run, spectra):
    """infer(start=z): every spectrum starts from z (0 steps return it); an explicit zero start is the default."""
    from stellarfield.model.batching import TrainingData
    from stellarfield.model.inference import infer

    _, result = run
    model = result.model
    data = TrainingData(spectra, instruments=model.instruments)
    start = torch.linspace(-1.0, 1.0, model.latent_dim)
    for r in infer(model, data, method="refine", refine_steps=0, start=start).values():
        np.testing.assert_array_equal(r.latent, np.broadcast_to(start.numpy(), r.latent.shape))
    default = infer(model, data, method="refine", refine_steps=3)
    zero = infer(model, data, method="refine", refine_steps=3, start=torch.zeros(model.latent_dim))
    for name in default:
        np.testing.assert_array_equal(default[name].latent, zero[name].latent)


def test_the_basis_rendered_once_at_shared_pixels_gives_the_model_at_them(run, spectra):
    """A batch whose spectra share pixels and velocity (MILES) gets the basis rendered at its pixels
    once; the model at the pixels is then one product, equal to the full chain (evaluate) for any
    latent. A batch of different pixels (APOGEE visits) gets none."""
    from stellarfield.model.batching import TrainingData
    from stellarfield.model.inference import blurred_basis
    from stellarfield.model.likelihood import basis_at_pixels, evaluate, evaluate_at_pixels, observe, variance

    _, result = run
    model = result.model
    data = TrainingData(spectra, instruments=model.instruments)
    for product, shared in (("miles", True), ("apogee_apvisit", False)):
        pd = data.products[product]
        basis = blurred_basis(model, product)
        obs = observe(model, pd.batch(torch.arange(len(pd))), full_grid=True)
        at_pixels = basis_at_pixels(obs, basis, obs.v)
        assert (at_pixels is not None) == shared, product
        if not shared:
            continue
        var = variance(model, obs).detach()
        coeffs = model.decoder.coefficients(torch.randn(len(pd), model.latent_dim, generator=torch.Generator().manual_seed(1))).detach()
        full, once = evaluate(obs, coeffs, basis, obs.v, var, blurred_basis=True), evaluate_at_pixels(obs, coeffs, at_pixels, var)
        assert torch.equal(full.good, once.good)
        torch.testing.assert_close(once.prediction, full.prediction, rtol=1e-5, atol=1e-5 * float(full.prediction.abs().max()))
        torch.testing.assert_close(once.chi2, full.chi2, rtol=1e-4, atol=0.0)


def test_fit_leaves_the_callers_records_unchanged(shared_data, tmp_path):
    """Pixels outside the trained range are masked on copies, never on the caller's records."""
    import numpy as np

    from stellarfield.io import read_spectra
    from stellarfield.model import fit_spectra
    from stellarfield.model.train import TrainConfig, train

    (visit,) = read_spectra(shared_data / "apogee/apvisit/apVisit-2M00452143+1634446-1.fits")
    miles = read_spectra(shared_data / "miles/MILES_res2.50_star_m0501V.fits")
    run = train(miles * 4, tmp_path / "run", TrainConfig(**{**TINY, "max_steps": 2}), progress=False)
    before = visit.mask.copy()
    table = fit_spectra(run, [visit], refine_steps=1)
    assert "pixels_outside_training_range" in table.column("flags").to_pylist()[0]
    np.testing.assert_array_equal(visit.mask, before)


def test_doppler_generation_matches_the_rendered_reference():
    """Spectra with a velocity per star (the fast route of RenderedBasis.spectra) equal the model
    formed on the whole grid and rendered at each star's shifted pixels (Instrument.render), to
    float32 precision, with NaN exactly where the shifted pixels leave the model grid: on a 3-chip
    observed-frame grid, on a rest-frame grid whose model grid covers only +-80 km/s, on a grid
    uniform in lambda (MILES-like: the reference route) and with one velocity for all stars; velocities
    of NaN, inf, and a whole number of grid points give what the reference gives."""
    from stellarfield.model.generate import RenderedBasis
    from stellarfield.model.instrument import build_instruments, grid_instrument
    from stellarfield.model.stellar_model import StellarModel
    from stellarfield.physics.doppler import C_KMS
    from stellarfield.spectrum import Segment, Spectrum

    def record(product, frame, chips, fwhm=None):
        segs = [Segment(f"c{k}", w, np.ones(len(w), np.float32), np.ones(len(w), np.float32), np.ones(len(w), bool),
                        None if fwhm is None else np.full(len(w), fwhm, np.float32)) for k, w in enumerate(chips)]
        return Spectrum(object_id="x", survey="t", instrument="t", product=product, segments=segs, frame=frame,
                        normalisation="flux", resolution=22500.0)

    visit = [np.exp(np.arange(np.log(a), np.log(b), 1.4e-5)) for a, b in ((15150, 15800), (15860, 16430), (16480, 16950))]
    apstar = [10 ** (4.179 + 6e-6 * np.arange(8575))]
    miles = [np.arange(3540.0, 7410.0, 0.9)]
    instruments = build_instruments([record("visit", "observed", visit), record("apstar", "rest", apstar),
                                     record("miles", "rest", miles, fwhm=2.5)])
    instruments["custom"] = grid_instrument(np.exp(np.arange(np.log(15200), np.log(15400), 1 / 30000)), 10000.0)
    assert instruments["miles"].segments[0].scale == "linear" and len(instruments["visit"].segments) == 3
    torch.manual_seed(0)
    model = StellarModel(instruments, dict(latent_dim=4, n_basis=8, trunk_hidden=(32,), branch_hidden=(16,)))
    with torch.no_grad():
        for table in model.decoder.trunk.encoding.tables:
            table.normal_(0, 0.3)  # structure at every scale, lines included
    g = torch.Generator().manual_seed(3)
    for name, inst in instruments.items():
        basis = RenderedBasis.build(model, inst, [s.native_wavelength() for s in inst.segments])
        coeffs = model.decoder.coefficients(torch.randn(150, 4, generator=g)).detach()
        rv = torch.randn(150, generator=g, dtype=torch.float64) * 60
        rv[:4] = torch.tensor([0.0, 700.0, -3e5, 93.123456789])  # at rest, beyond the grid, absurd, any
        # no velocity at all (NaN, inf: NaN flux), and shifts a hair either side of a whole number of grid
        # points (the fractional shift rounds to 0 or to 1 in float32)
        whole = C_KMS * np.expm1(np.array([3.0, -5.0]) * inst.segments[0].step)
        rv[4:10] = torch.tensor([np.nan, np.inf, *whole, *(whole * (1 + 1e-12))], dtype=torch.float64)
        for v in (rv, torch.full((150,), -41.7, dtype=torch.float64)):
            fast, reference = basis.spectra(coeffs, v), basis.rendered_spectra(coeffs, v)
            assert torch.equal(torch.isnan(fast), torch.isnan(reference)), name
            assert torch.isfinite(reference).any(), name
            ok = torch.isfinite(reference)
            assert torch.allclose(fast[ok], reference[ok], rtol=1e-6, atol=1e-6), (name, (fast - reference)[ok].abs().max())
            out = torch.full_like(fast, 7.0)
            assert basis.spectra(coeffs, v, out=out) is out and torch.equal(torch.isnan(out), torch.isnan(fast))
        assert torch.allclose(basis.spectra(coeffs, torch.zeros(150, dtype=torch.float64)), basis.spectra(coeffs),
                              rtol=1e-6, atol=1e-6)
