"""Stage 1 of the model: decoder, model grids, LSF blur and rendering at native pixels (real grids)."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from stellarfield.io import read_spectra
from stellarfield.model.decoder import SpectrumDecoder, combine
from stellarfield.model.encoding import U_MAX, U_MIN, GridEncoding
from stellarfield.model.instrument import Instrument, build_instruments
from stellarfield.physics.doppler import C_KMS
from stellarfield.physics.lsf import convolve_direct



@pytest.fixture(scope="module")
def apstar(shared_data):
    return read_spectra(shared_data / "apogee/apstar/apStar-r6-2M00452143+1634446.fits")[0]


@pytest.fixture(scope="module")
def miles(shared_data):
    return read_spectra(shared_data / "miles/MILES_res2.50_star_m0501V.fits")[0]


def pixels(spectrum, inst: Instrument):
    u = torch.from_numpy(np.log(spectrum.wavelength))[None]
    seg = torch.from_numpy(np.concatenate([np.full(s.n_pixels, inst.segment_names.index(s.name)) for s in spectrum.segments]))[None]
    return u, seg


def test_apogee_grid_from_real_spectrum(apstar):
    inst = build_instruments([apstar])["apogee_apstar"]
    assert inst.segment_names == ["blue", "green", "red"] and inst.frame == "rest"
    assert inst.continuum_degree == 2 and inst.rv_scan_kms == 30.0
    seg = inst.segments[0]
    # R = 22,500 -> sigma_u = 1/(22500 * 2.3548) = 1.887e-5; grid step sigma/3
    assert seg.scale == "log" and seg.sigma == pytest.approx(1.887e-5, rel=1e-3)
    assert seg.step == pytest.approx(seg.sigma / 3)
    # the grid covers the first pixel (10**4.179 A) shifted by 80 km/s plus 5 sigma
    assert seg.start <= 4.179 * math.log(10) - math.log1p(80 / C_KMS) - 5 * seg.sigma + 1e-9
    assert seg.pixel_u_min == pytest.approx(4.179 * math.log(10))


def test_render_known_function_at_native_pixels(apstar):
    """Interpolating an analytic function from the model grid reproduces it at APOGEE's pixels to
    the linear-interpolation bound h^2/8 max|f''|."""
    inst = build_instruments([apstar])["apogee_apstar"]
    view = inst.full_view()
    period = 40 * inst.segments[0].sigma  # a feature ~ the width of a line
    f = lambda u: torch.sin(2 * math.pi * u / period)
    grid = f(inst.view_u(view))[None]
    u, seg = pixels(apstar, inst)
    flux, inside = inst.render(grid, view, u, seg, torch.zeros(1))
    assert inside.all()
    bound = inst.segments[0].step ** 2 / 8 * (2 * math.pi / period) ** 2
    err = (flux - f(u)).abs().max().item()
    assert err < bound * 1.01 and bound < 4e-3


def test_rv_shift_moves_a_line_by_v_over_c(apstar):
    """A Gaussian line at 16000 A rendered at v = +123.4 km/s is centred at 16000 (1 + v/c) in the
    observed frame (centroid on the native pixels, to 1% of a pixel)."""
    inst = build_instruments([apstar])["apogee_apstar"]
    inst.rv_scan_kms = 200.0  # let the (rest-frame) grid reach this far
    inst = Instrument.from_dict(inst.to_dict())
    view = inst.full_view()
    u0, width = math.log(16000.0), 3e-5
    grid = torch.exp(-0.5 * ((inst.view_u(view) - u0) / width) ** 2)[None]
    u, seg = pixels(apstar, inst)
    for v in (0.0, 123.4, -250.0):
        flux, inside = inst.render(grid, view, u, seg, torch.tensor([v]))
        w = flux[0].numpy() * inside[0].numpy()
        centroid = np.sum(w * apstar.wavelength) / np.sum(w)
        expected = 16000.0 * (1 + v / C_KMS)
        pixel = 16000.0 * 6e-6 * math.log(10)
        assert abs(centroid - expected) < 0.01 * pixel, (v, centroid, expected)


def test_blur_matches_direct_convolution_and_preserves_flux(apstar):
    """The LSF blur on the model grid equals the direct (O(N^2)) convolution of physics.lsf and keeps
    the integral; a narrow line's width grows to sqrt(w^2 + sigma_LSF^2)."""
    inst = build_instruments([apstar])["apogee_apstar"]
    seg = inst.segments[1]
    view = [(1, 0, seg.size)]
    u = inst.view_u(view)
    u0, width = float(u[len(u) // 2]), 1e-5
    line = 1 - 0.5 * torch.exp(-0.5 * ((u - u0) / width) ** 2)
    blurred = inst.blur(line[None].double(), view)[0]
    direct = convolve_direct(np.exp(u.numpy()), line.numpy(), seg.sigma)
    assert np.abs(blurred.numpy() - direct).max() < 1e-4
    depth = 1 - blurred
    assert depth.sum().item() == pytest.approx((1 - line).sum().item(), rel=1e-6)
    var = float((depth * (u - u0) ** 2).sum() / depth.sum())
    assert math.sqrt(var) == pytest.approx(math.hypot(width, seg.sigma), rel=1e-3)


def test_miles_gets_a_linear_grid_with_its_2p5_A_lsf(miles):
    inst = build_instruments([miles])["miles"]
    seg = inst.segments[0]
    assert seg.scale == "linear" and not inst.noise_known and inst.continuum_degree == 0
    assert seg.sigma == pytest.approx(2.5006 / 2.35482, rel=1e-3)  # vacuum A
    # render a constant and a linear function of lambda exactly (linear interpolation)
    view = inst.full_view()
    lam = torch.exp(inst.view_u(view))
    u, segi = pixels(miles, inst)
    flux, inside = inst.render((3 + 1e-3 * lam)[None], view, u, segi, torch.zeros(1))
    assert inside.all()
    assert torch.allclose(flux[0], 3 + 1e-3 * torch.from_numpy(miles.wavelength), rtol=1e-9)


def test_window_view_renders_like_the_full_grid(apstar):
    inst = build_instruments([apstar])["apogee_apstar"]
    u, seg = pixels(apstar, inst)
    lo, hi = float(u[0, 4000]), float(u[0, 4500])
    window = inst.window_view(1, lo, hi, -30.0, 30.0)
    f = lambda uu: torch.cos(uu * 3e4)
    keep = (u >= lo) & (u <= hi)
    for v in (-30.0, 29.0):
        a, ina = inst.render(f(inst.view_u(window))[None], window, u, seg, torch.tensor([v]))
        b, inb = inst.render(f(inst.view_u(inst.full_view()))[None], inst.full_view(), u, seg, torch.tensor([v]))
        assert ina[keep].all() and not ina[0, :3000].any()
        assert torch.allclose(a[keep], b[keep], atol=1e-12)


def test_scan_shape_and_galah_telluric_mask(shared_data):
    galah = read_spectra(shared_data / "galah/dr3/1403100038010491.fits")
    inst = build_instruments(galah)
    obs = inst["galah_dr3_observed"]
    assert obs.rv_scan_kms == 500.0 and obs.continuum_degree == 3 and len(obs.segments) == 4
    wave = np.array([7591.0, 7600.0, 7701.0, 7703.0])
    assert obs.pixel_mask(wave).tolist() == [True, False, False, True]
    rest = inst["galah_dr3"]  # rest frame: band widened by (30 + 100) km/s = 3.3 A at 7700 A
    assert rest.pixel_mask(np.array([7590.0, 7703.0, 7706.0])).tolist() == [False, False, True]
    spec = galah[0] if galah[0].product == "galah_dr3_observed" else galah[1]
    u, seg = pixels(spec, obs)
    grid = torch.ones(2, obs.n_grid)
    flux, inside = obs.render(grid, obs.full_view(), u.expand(2, -1), seg.expand(2, -1), torch.tensor([[0.0, 400.0, -499.0]] * 2))
    assert flux.shape == (2, 3, spec.n_pixels) and inside.all()


def test_several_models_per_spectrum_render_as_each_alone(shared_data):
    """(B, M, G) grid values (a Jacobian's directions) render like M separate (B, G) renders at the
    same velocities, pixel positions computed once; with a scan they are refused."""
    galah = read_spectra(shared_data / "galah/dr3/1403100038010491.fits")
    obs = build_instruments(galah)["galah_dr3_observed"]
    spec = next(s for s in galah if s.product == "galah_dr3_observed")
    u, seg = pixels(spec, obs)
    g = torch.Generator().manual_seed(0)
    models = torch.randn(2, 3, obs.n_grid, generator=g, dtype=torch.float64)
    v = torch.tensor([-123.4, 56.7], dtype=torch.float64)
    flux, inside = obs.render(models, obs.full_view(), u.expand(2, -1), seg.expand(2, -1), v)
    assert flux.shape == inside.shape == (2, 3, spec.n_pixels)
    for m in range(3):
        alone, inside_alone = obs.render(models[:, m], obs.full_view(), u.expand(2, -1), seg.expand(2, -1), v)
        assert torch.equal(flux[:, m], alone) and torch.equal(inside[:, m], inside_alone)
    with pytest.raises(ValueError, match="scan"):
        obs.render(models, obs.full_view(), u.expand(2, -1), seg.expand(2, -1), v[:, None].expand(2, 2))


def test_decoder_is_linear_in_its_basis():
    torch.manual_seed(0)
    dec = SpectrumDecoder(latent_dim=8, n_basis=16, trunk_hidden=(32,), branch_hidden=(32,))
    u = torch.linspace(math.log(15100.0), math.log(15200.0), 500, dtype=torch.float64)
    basis = dec.basis(u)
    z = torch.randn(3, 8)
    b = dec.coefficients(z)
    explicit = (b[:, None, :] * basis[None, :, :16]).sum(-1) + basis[None, :, 16]
    assert torch.allclose(dec(z, basis), explicit, atol=1e-6)
    assert torch.allclose(combine(b, basis), explicit, atol=1e-6)
    # a fresh trunk is a flat spectrum of 1 to within the small initial features
    assert torch.allclose(basis[:, 16], torch.ones(500), atol=0.1)


def test_grid_encoding_interpolates_linearly_between_knots():
    enc = GridEncoding(levels=2, features=1, coarsest_step=0.1, finest_step=0.01)
    with torch.no_grad():
        for h, table in zip(enc.steps, enc.tables):
            table.copy_(torch.arange(table.shape[0], dtype=torch.float32)[:, None] * h)
    u = torch.tensor([U_MIN + 0.0, U_MIN + 0.123456, U_MAX - 0.5], dtype=torch.float64)
    out = enc(u)  # feature = u - U_MIN at every level
    assert torch.allclose(out, (u - U_MIN).float()[:, None].expand(-1, 2), atol=1e-6)


def test_band_limited_trunk_does_not_alias_on_coarse_grids(miles):
    """A trunk observed through MILES' 2.5 A LSF keeps no scale finer than 0.4 sigma, so the same
    model on the sigma/3 MILES grid and on a 4x finer grid renders the same spectrum (to 0.5% of the
    median flux) at the native pixels; without the band limit the fine levels' point values alias
    and the two grids disagree more than 5 times as much."""
    from stellarfield.model.generate import RenderedBasis

    torch.manual_seed(0)
    inst = build_instruments([miles])["miles"]
    fine = Instrument.from_dict(inst.to_dict())
    fine.segments[0].step /= 4
    fine.segments[0].size = (fine.segments[0].size - 1) * 4 + 1
    dec = SpectrumDecoder(latent_dim=4, n_basis=8, trunk_hidden=(32,), branch_hidden=(16,))
    with torch.no_grad():
        for table in dec.trunk.encoding.tables:
            table.normal_(0, 0.3)  # a trunk with strong structure at every scale
    wave = [miles.wavelength]
    coeffs = dec.coefficients(torch.randn(4, 4))

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.decoder = dec

    errors = []
    for band_limited in (True, False):
        if not band_limited:
            inst.view_sigma_u = fine.view_sigma_u = lambda view: None  # switch the band limit off
        a = RenderedBasis.build(Holder(), inst, wave).spectra(coeffs)
        b = RenderedBasis.build(Holder(), fine, wave).spectra(coeffs)
        errors.append(float(((a - b).abs() / b.abs().median()).max()))
    assert errors[0] < 0.005 and errors[1] > 5 * errors[0], errors


def test_fitted_parameters_count_latent_continuum_per_used_segment_and_rv(apstar):
    """What a chi2_nu subtracts, in one place for inference and the bench: K + (degree + 1) per segment
    with good pixels + 1 for a fitted RV; per spectrum when given one count per spectrum."""
    inst = build_instruments([apstar])[apstar.product]
    per_segment = inst.continuum_degree + 1
    assert inst.fitted_parameters(16, 3, True) == 16 + 3 * per_segment + 1
    assert inst.fitted_parameters(16, 0, False) == 16
    counts = torch.tensor([1, 3])
    assert inst.fitted_parameters(8, counts, False).tolist() == [8 + per_segment, 8 + 3 * per_segment]


def test_gaia_xp_is_blurred_at_its_profiles_sharpest_resolution():
    """Gaia XP records carry a nominal R = 50; the model blurs them at the profile's model_resolution
    (R = 100, the sharp end of XP's 30-100), and a per-pixel LSF on the records still takes precedence."""
    from stellarfield.io.readers.gaia_xp import MODEL_RESOLUTION, NOMINAL_RESOLUTION, XP_WAVELENGTH_A
    from stellarfield.physics.lsf import resolution_to_sigma_u
    from stellarfield.spectrum import Segment, Spectrum

    def xp_record(i):
        flux = np.ones(XP_WAVELENGTH_A.size, dtype=np.float32)
        seg = Segment("xp", XP_WAVELENGTH_A.copy(), flux, np.full_like(flux, 1e4), np.ones(flux.size, bool))
        return Spectrum(object_id=f"star{i}", survey="gaia", instrument="xp", product="gaia_xp", segments=[seg], frame="observed",
                        normalisation="flux", resolution=NOMINAL_RESOLUTION)

    records = [xp_record(i) for i in range(3)]
    inst = build_instruments(records)["gaia_xp"]
    assert MODEL_RESOLUTION != NOMINAL_RESOLUTION
    assert inst.segments[0].sigma == pytest.approx(float(resolution_to_sigma_u(MODEL_RESOLUTION)), rel=1e-9)
    assert inst.rv_scan_kms == 0.0  # no velocity at XP resolution
    for r in records:
        r.segments[0].lsf_fwhm = r.segments[0].wavelength / 400.0
    sharper = build_instruments(records)["gaia_xp"]
    assert sharper.segments[0].sigma == pytest.approx(float(resolution_to_sigma_u(400.0)), rel=1e-6)


def _sampled_records(n: int, rank: int, seed: int = 0):
    """``n`` Gaia XP-like records on XP's 343 samples whose fluxes are combinations of ``rank`` fixed
    smooth functions (a basis expansion), positive."""
    from stellarfield.io.readers.gaia_xp import XP_WAVELENGTH_A
    from stellarfield.spectrum import Segment, Spectrum

    g = np.random.default_rng(seed)
    x = np.linspace(-1, 1, XP_WAVELENGTH_A.size)
    functions = np.array([np.polynomial.legendre.Legendre.basis(k)(x) for k in range(rank)])
    records = []
    for i in range(n):
        flux = (3.0 + g.normal(size=rank) @ functions * 0.3).astype(np.float32)
        seg = Segment("full", XP_WAVELENGTH_A.copy(), flux, np.full_like(flux, 1e4), np.ones(flux.size, bool))
        records.append(Spectrum(object_id=f"star{i}", survey="gaia", instrument="xp", product="gaia_xp", segments=[seg],
                                frame="observed", normalisation="flux", resolution=50.0))
    return records, functions


def test_a_product_sampled_from_a_basis_gets_the_span_of_its_spectra_and_renders_into_it():
    """Gaia XP's profile says its spectra are samples of a basis expansion: spectra made of 6 fixed
    functions give a 6-row orthonormal basis spanning them; on the native samples the rendered model
    is projected onto it (a model far outside it loses exactly its orthogonal part, most of it),
    elsewhere (a custom grid) it is rendered as before; the basis survives to_dict."""
    records, functions = _sampled_records(40, rank=6)
    inst = build_instruments(records)["gaia_xp"]
    basis = np.array(inst.sample_basis)
    assert basis.shape == (6, 343)
    assert np.allclose(basis @ basis.T, np.eye(6), atol=1e-10)
    in_span = functions / np.linalg.norm(functions, axis=1, keepdims=True)
    assert np.allclose(in_span @ basis.T @ basis, in_span, atol=1e-6)  # the span is the functions'

    view = inst.full_view()
    grid_u = inst.view_u(view)
    wiggle = torch.sin(grid_u / 0.004)[None]  # model grid values far outside the span
    u = torch.from_numpy(np.log(records[0].wavelength))[None]
    seg = torch.zeros_like(u, dtype=torch.long)
    v = torch.zeros(1, dtype=torch.float64)
    plain_inst = dataclasses.replace(inst, sample_basis=None, sample_u=None)
    flux, _ = inst.render(wiggle.double(), view, u, seg, v)
    unprojected, _ = plain_inst.render(wiggle.double(), view, u, seg, v)
    expected = (unprojected.numpy() @ basis.T) @ basis
    assert np.allclose(flux.numpy(), expected, atol=1e-9)
    assert np.linalg.norm(unprojected.numpy() - expected) > 0.5 * np.linalg.norm(unprojected.numpy())
    # a custom grid (every other sample) is rendered unprojected
    half = u[:, ::2].contiguous()
    custom, _ = inst.render(wiggle.double(), view, half, seg[:, ::2], v)
    plain, _ = plain_inst.render(wiggle.double(), view, half, seg[:, ::2], v)
    assert torch.equal(custom, plain)
    # through config.json as a checkpoint writes it: the same basis, orthonormal, the same render
    loaded = Instrument.from_dict(json.loads(json.dumps(inst.to_dict(), default=float)))
    assert np.array_equal(np.array(loaded.sample_basis), basis)
    assert torch.equal(loaded.render(wiggle.double(), view, u, seg, v)[0], flux)


def test_the_sample_projection_is_decided_per_spectrum_follows_a_new_basis_and_covers_scans():
    """In one batch a spectrum on the native samples is projected and one on another grid of as many
    pixels is not; float32 renders project as float64 ones do; assigning another basis is used at the
    next render (no stale cached tensors); an RV scan's (B, V, P) renders are projected too."""
    records, _ = _sampled_records(40, rank=6)
    inst = build_instruments(records)["gaia_xp"]
    plain_inst = dataclasses.replace(inst, sample_basis=None, sample_u=None)
    view = inst.full_view()
    wiggle = torch.sin(inst.view_u(view) / 0.004)[None].expand(2, -1).double()
    u_native = torch.from_numpy(np.log(records[0].wavelength))
    u = torch.stack([u_native, u_native + 1e-4])  # the second: shifted by 30 km/s, not the samples
    seg = torch.zeros_like(u, dtype=torch.long)
    v = torch.zeros(2, dtype=torch.float64)
    basis = torch.tensor(inst.sample_basis, dtype=torch.float64)
    unprojected, _ = plain_inst.render(wiggle, view, u, seg, v)
    flux, _ = inst.render(wiggle, view, u, seg, v)
    assert torch.allclose(flux[0], unprojected[0] @ basis.T @ basis, atol=1e-9)
    assert torch.equal(flux[1], unprojected[1])
    flux32, _ = inst.render(wiggle.float(), view, u, seg, v)
    assert flux32.dtype == torch.float32 and torch.allclose(flux32.double(), flux, atol=1e-5)

    inst.sample_basis = inst.sample_basis[:2]  # a new basis object: rendered with it from now on
    flux2, _ = inst.render(wiggle, view, u, seg, v)
    assert torch.allclose(flux2[0], unprojected[0] @ basis[:2].T @ basis[:2], atol=1e-9)
    assert not torch.allclose(flux2[0], flux[0], atol=1e-3)

    scan_v = torch.tensor([[0.0, 5.0], [0.0, 5.0]], dtype=torch.float64)
    scanned, _ = inst.render(wiggle, view, u, seg, scan_v)
    scanned_plain, _ = plain_inst.render(wiggle, view, u, seg, scan_v)
    assert scanned.shape == (2, 2, u.shape[1])
    assert torch.allclose(scanned[0], scanned_plain[0] @ basis[:2].T @ basis[:2], atol=1e-9)
    assert torch.equal(scanned[1], scanned_plain[1])
    assert torch.allclose(scanned[:, 0], flux2, atol=1e-12)  # the scan's v = 0 is the plain render
    # training never cuts such a product into windows (the projection needs every sample)
    from stellarfield.model.batching import random_window

    g = torch.Generator().manual_seed(0)
    assert random_window(inst, 343, lambda k: 343, 100, g) is None
    assert random_window(plain_inst, 343, lambda k: 343, 100, g) is not None


def test_generation_with_a_velocity_per_star_stays_in_the_span_of_a_sampled_product():
    """``RenderedBasis.spectra`` with one velocity per star gives what the reference computation
    gives (the model rendered at each star's shifted samples, projected) for a product sampled from a
    basis, and what the fast exact shift of the unprojected model gives once projected, so generated
    Gaia XP spectra lie in the span its data can have."""
    from stellarfield.model.generate import RenderedBasis
    from stellarfield.model.stellar_model import StellarModel

    records, _ = _sampled_records(40, rank=6)
    instruments = build_instruments(records)
    inst = instruments["gaia_xp"]
    torch.manual_seed(0)
    model = StellarModel(instruments, dict(latent_dim=4, n_basis=8, trunk_hidden=(32,), branch_hidden=(16,)))
    with torch.no_grad():
        for table in model.decoder.trunk.encoding.tables:
            table.normal_(0, 0.3)
    rendered = RenderedBasis.build(model, inst, [records[0].wavelength])
    g = torch.Generator().manual_seed(1)
    coeffs = model.decoder.coefficients(torch.randn(20, 4, generator=g)).detach()
    rv = torch.randn(20, generator=g, dtype=torch.float64) * 50
    fast, reference = rendered.spectra(coeffs, rv), rendered.rendered_spectra(coeffs, rv)
    assert torch.allclose(fast, reference, rtol=1e-6, atol=1e-6)
    basis = torch.tensor(inst.sample_basis, dtype=fast.dtype)
    outside = fast - (fast @ basis.T) @ basis
    assert float(outside.norm() / fast.norm()) < 1e-5
    # independently: the same instrument without a basis shifts by the fast exact route; projecting
    # its spectra afterwards gives the same (the projection is linear and acts on the samples)
    plain = RenderedBasis.build(model, dataclasses.replace(inst, sample_basis=None, sample_u=None), [records[0].wavelength])
    shifted = plain.spectra(coeffs, rv)
    assert torch.allclose(fast, (shifted @ basis.T) @ basis, rtol=1e-5, atol=1e-5)
    assert float((shifted - fast).norm() / fast.norm()) > 0.01  # the projection does something here (~2.5%)


def test_products_not_sampled_from_a_basis_or_on_several_grids_get_no_span(apstar):
    """APOGEE's profile does not say so (no span even where the spectra would have one); Gaia XP
    records on two different grids give none either."""
    assert build_instruments([apstar])["apogee_apstar"].sample_basis is None
    records, _ = _sampled_records(10, rank=3)
    seg = records[0].segments[0]
    seg.wavelength = seg.wavelength * 1.001
    assert build_instruments(records)["gaia_xp"].sample_basis is None


def test_a_scan_renders_each_trial_velocity_as_a_single_render_does():
    """An RV scan (B, V) renders trial k as the one-velocity render at v_k does, to float32 rounding
    and with the same ``inside``, on grids uniform in ln lambda, in lambda, and mixed (one of each)."""
    import dataclasses

    from stellarfield.spectrum import Segment, Spectrum

    w1, w2 = np.exp(np.arange(np.log(5000), np.log(5200), 2e-5)), np.arange(6000.0, 6200.0, 0.1)
    segs = [Segment(f"c{k}", w, np.ones(len(w), np.float32), np.ones(len(w), np.float32), np.ones(len(w), bool))
            for k, w in enumerate([w1, w2])]
    record = Spectrum(object_id="x", survey="t", instrument="t", product="p", segments=segs, frame="observed",
                      normalisation="flux", resolution=20000.0)
    log_inst = build_instruments([record])["p"]
    as_linear = lambda s: dataclasses.replace(s, scale="linear", start=math.exp(s.start), step=math.exp(s.start) * s.step)
    mixed = dataclasses.replace(log_inst, segments=[log_inst.segments[0], as_linear(log_inst.segments[1])])
    linear = dataclasses.replace(log_inst, segments=[as_linear(s) for s in log_inst.segments])
    u = torch.from_numpy(np.log(np.concatenate([w1, w2])))[None].expand(2, -1)
    seg = torch.cat([torch.zeros(len(w1)), torch.ones(len(w2))]).long()[None].expand(2, -1)
    trials = torch.tensor([[0.0, 57.3, -900.0], [120.5, -40.0, 950.0]], dtype=torch.float64)  # +-500 km/s on the grid
    grid = torch.randn(2, log_inst.n_grid, generator=torch.Generator().manual_seed(0))
    assert [s.scale for s in log_inst.segments] == ["log", "log"] and [s.scale for s in mixed.segments] == ["log", "linear"]
    for inst in (log_inst, linear, mixed):
        flux, inside = inst.render(grid, inst.full_view(), u, seg, trials)
        assert 0 < int(inside.sum()) < inside.numel()  # some pixels leave the grid beyond +-500 km/s
        for k in range(trials.shape[1]):
            one, one_inside = inst.render(grid, inst.full_view(), u, seg, trials[:, k])
            assert torch.equal(inside[:, k], one_inside)
            torch.testing.assert_close(flux[:, k][one_inside], one[one_inside], rtol=1e-6, atol=1e-6)
