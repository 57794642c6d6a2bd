"""`stellarfield explain`: reading the latent space, checked on decoders with a known answer.

A decoder is built here whose latents each move one line of one element (a Gaussian at a line of
the shipped GALAH list, and at an ASPCAP window of the same element in the APOGEE H band), one the
continuum's slope: explain must name the element and the line, call the slope latent continuum,
and score random directions like its random baseline. Label directions must recover a planted
linear direction, and the chain rule must carry it to the right line. The command line runs end
to end on a tiny model trained on real MILES and LAMOST spectra.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from stellarfield.eval import explain as E
from stellarfield.model.checkpoint import TrainedModel
from stellarfield.model.instrument import grid_instrument
from stellarfield.model.stellar_model import StellarModel

GALAH_RANGE = (6480.0, 6730.0)
APOGEE_RANGE = (15175.0, 15785.0)
H_ALPHA = 6564.61
BRACKETT_15 = 1e8 / (109677.583 * (1 / 16 - 1 / 15**2))
#: Elements with a line in GALAH CCD3 and an ASPCAP window on APOGEE's blue chip (Ca: GALAH only).
ELEMENTS = ("Fe", "Ti", "Si", "Ni", "Mn", "Ca")


def _pick_lines() -> dict[str, dict]:
    """For each element, its strongest isolated neutral line in the GALAH window and an APOGEE
    window of the element alone (no other element's weight within 1 A)."""
    ll = E.load_lines()
    chosen_galah: list[float] = [H_ALPHA]
    chosen_apogee: list[float] = [BRACKETT_15]
    lam_ap = E.apstar_wavelength()
    windows = E.load_aspcap_windows()
    out = {}
    for el in ELEMENTS:
        rows = np.flatnonzero((ll.element == el) & np.char.endswith(ll.species.astype(str), " I")
                              & (ll.wavelength > GALAH_RANGE[0] + 5) & (ll.wavelength < GALAH_RANGE[1] - 5))
        rows = sorted(rows, key=lambda i: -(ll.log_gf[i] - ll.e_lower[i]))
        g = next(float(ll.wavelength[i]) for i in rows
                 if min(abs(ll.wavelength[i] - c) for c in chosen_galah) > 10)
        chosen_galah.append(g)
        entry = {"galah": g}
        for r in E.aspcap_window_runs():
            if r["element"] != el or not (APOGEE_RANGE[0] + 5 < r["lo"] and r["hi"] < APOGEE_RANGE[1] - 5):
                continue
            near = (lam_ap > r["lo"] - 1.0) & (lam_ap < r["hi"] + 1.0)
            alone = all(not w[near].any() for other, w in windows.items() if other != el)
            if alone and min(abs(r["center"] - c) for c in chosen_apogee) > 10 and r["hi"] - r["lo"] < 3:
                entry["apogee"] = r["center"]
                chosen_apogee.append(r["center"])
                break
        out[el] = entry
    return out


LINES = _pick_lines()


class LineDecoder(nn.Module):
    """flux = 1 - sum_k depth_k(z) G_k(lambda) + slope z_slope (lambda - mid) / width, with
    depth_k = 0.3 + 0.1 z_k: latent k deepens its element's lines; the last latent tilts the continuum."""

    def __init__(self, centres: list[list[tuple[float, float]]]):
        super().__init__()
        self.centres = centres  # per latent: [(centre A, sigma A), ...]; [] = the slope latent
        self.latent_dim = self.n_basis = len(centres)
        self.scale = nn.Parameter(torch.ones(1))  # a parameter, so the model has a device

    def coefficients(self, z: torch.Tensor) -> torch.Tensor:
        depth = -(0.3 + 0.1 * z) * self.scale
        slope = 0.02 * z
        is_slope = torch.tensor([not c for c in self.centres])
        return torch.where(is_slope, slope, depth).float()

    def basis(self, u: torch.Tensor, sigma_u: torch.Tensor | None = None) -> torch.Tensor:
        lam = torch.exp(u.double())
        cols = []
        for centres in self.centres:
            if not centres:  # a tilt over each window, in units of 100 A
                mid = torch.where(lam < 10000, torch.tensor(6600.0, dtype=lam.dtype), torch.tensor(15480.0, dtype=lam.dtype))
                cols.append((lam - mid) / 100.0)
            else:
                cols.append(sum(torch.exp(-0.5 * ((lam - c) / s) ** 2) for c, s in centres))
        cols.append(torch.ones_like(lam))
        return torch.stack(cols, -1).float()


def line_model() -> TrainedModel:
    """Latents: one per element of ELEMENTS, then H (H-alpha + Brackett 15), then the slope."""
    centres = []
    for el in ELEMENTS:
        c = [(LINES[el]["galah"], 0.08)]
        if "apogee" in LINES[el]:
            c.append((LINES[el]["apogee"], 0.25))
        centres.append(c)
    centres.append([(H_ALPHA, 1.5), (BRACKETT_15, 1.5)])
    centres.append([])
    galah = np.exp(np.arange(np.log(GALAH_RANGE[0]), np.log(GALAH_RANGE[1]), 1 / (3 * 28000)))
    apogee = np.exp(np.arange(np.log(APOGEE_RANGE[0]), np.log(APOGEE_RANGE[1]), 1 / (3 * 22500)))
    instruments = {"galah_dr3": grid_instrument(galah, 28000.0, name="galah_dr3"),
                   "apogee_apstar": grid_instrument(apogee, 22500.0, name="apogee_apstar")}
    model = StellarModel(instruments, dict(latent_dim=len(centres), n_basis=4, trunk_hidden=(4,), branch_hidden=(4,)))
    model.decoder = LineDecoder(centres)
    return TrainedModel(model, None, {}, None)


@pytest.fixture(scope="module")
def report():
    return E.explain_model(line_model(), None, E.ExplainOptions(plots=False, n_random=256))


def test_reference_tables_are_small_cited_and_have_the_lines_used():
    ll = E.load_lines()
    assert 500 < len(ll) < 5000
    assert np.any(np.abs(ll.wavelength - H_ALPHA) < 0.01)  # vacuum H-alpha
    assert (ll.species == "Fe I").sum() > 50
    raw = E.load_aspcap_windows(raw=True)
    assert (raw["Fe"] > 0).sum() == 699 and (raw["Mg"] > 0).sum() == 123  # as APOGEE's files
    windows = E.load_aspcap_windows()
    for el, w in windows.items():  # the tapering tails dropped, the weight kept
        assert w.sum() > 0.98 * raw[el].sum()
    features = {f["name"]: f for f in E.load_features()}
    assert abs(features["H-alpha"]["center_vacuum_A"] - H_ALPHA) < 0.05
    readme = E._table_path("README.md").read_text()
    for needed in ("Buder", "Korg.jl", "jobovy/apogee", "BSD", "Trager"):
        assert needed in readme


def test_a_latent_that_moves_one_fe_line_is_reported_as_fe_and_that_line(report):
    fe = report["latents"][0]
    assert fe["class"] == "single element: Fe", fe
    assert fe["top_elements"][0]["element"] == "Fe"
    galah_top = fe["grids"]["galah_dr3"]["top_lines"][0]
    assert galah_top["species"] == "Fe I" and abs(galah_top["wavelength_A"] - LINES["Fe"]["galah"]) < 0.01
    apogee_top = fe["grids"]["apogee_apstar"]["top_lines"][0]
    assert apogee_top["element"] == "Fe" and abs(apogee_top["wavelength_A"] - LINES["Fe"]["apogee"]) < 1.0
    # each element latent is that element, on both grids where it has lines
    for k, el in enumerate(ELEMENTS):
        for grid in ("galah_dr3", "apogee_apstar"):
            tops = report["latents"][k]["grids"][grid].get("top_elements")
            if grid == "apogee_apstar" and "apogee" not in LINES[el]:
                continue
            assert tops and tops[0]["element"] == el, (el, grid, tops)


def test_hydrogen_and_continuum_latents(report):
    h = report["latents"][len(ELEMENTS)]
    assert h["top_elements"][0]["element"] == "H"
    assert h["grids"]["galah_dr3"]["top_lines"][0]["line"].startswith("H I 6564.61")
    slope = report["latents"][len(ELEMENTS) + 1]
    assert slope["class"] == "continuum", slope
    assert slope["continuum_fraction"] > 0.9


def test_random_directions_score_like_the_random_baseline():
    trained = line_model()
    model = trained.model
    D = model.latent_dim
    grid = E.build_grid(model, "galah_dr3")
    coeffs, jacs = E.coefficients_and_jacobians(model, np.zeros((1, D)))
    flux = grid.flux(coeffs)
    markers = E.build_markers(grid, flux)
    names = sorted(markers.elements)
    W = np.stack([markers.elements[n] for n in names])

    def fractions(dirs):
        return E.energy_fractions(W, E.decompose(grid, flux[0], grid.response(jacs[0] @ dirs)).lines)

    base = E.Baseline.of(fractions(E.random_directions(D, 512, seed=0)))
    fresh = fractions(E.random_directions(D, 300, seed=1))
    z, ratio = base.z(fresh), base.ratio(fresh)
    assert np.all(np.abs(np.nanmean(z, axis=1)) < 0.3), np.nanmean(z, axis=1)
    assert np.all(np.abs(np.nanmean(ratio, axis=1) - 1) < 0.25), np.nanmean(ratio, axis=1)
    assert np.nanmean(np.abs(z) < 2) > 0.85
    # while the Fe latent itself stands far out of it
    fe = fractions(np.eye(D)[:, :1])
    assert base.z(fe)[names.index("Fe"), 0] > 3


def test_label_direction_recovers_a_planted_direction_with_source_offsets():
    rng = np.random.default_rng(0)
    n, D = 600, 6
    z = rng.standard_normal((n, D)) * np.array([1.0, 2.0, 0.5, 1.0, 1.5, 0.7])
    w = np.array([0.5, -0.2, 1.0, 0.0, 0.3, 0.0])
    sources = np.where(np.arange(n) % 3 == 0, "b", "a")
    y = -1.0 + 0.3 * (z @ w) + np.where(sources == "b", 0.2, 0.0) + 0.003 * rng.standard_normal(n)  # in fe_h's range
    d = E.fit_label_direction("fe_h", z, y, sources)
    cos = d.gradient @ w / np.linalg.norm(d.gradient) / np.linalg.norm(w)
    assert cos > 0.999 and d.cv_r2 > 0.99
    assert abs(d.gradient @ d.pattern - 1) < 1e-9
    assert d.sources == {"a": 400, "b": 200}
    # without the per-source offset the same data fit worse
    assert E.fit_label_direction("fe_h", z, y, None).cv_r2 < d.cv_r2


def test_conditional_patterns_separate_labels_that_co_vary():
    """Latents made from two labels that co-vary as in the disc ([alpha/M] falls as [Fe/H] rises):
    the conditional patterns recover each label's own column of the planted map, the marginal
    [alpha/M] pattern does not (it carries minus the [Fe/H] column)."""
    rng = np.random.default_rng(3)
    n, D = 2000, 5
    fe_h = rng.normal(-0.2, 0.3, n)
    alpha_m = 0.1 - 0.3 * fe_h + 0.03 * rng.standard_normal(n)
    A = np.array([[1.0, 0.0], [0.0, 2.0], [0.5, -0.5], [0.0, 0.0], [0.3, 0.8]])  # (D, 2): dz per unit label
    sources = np.where(np.arange(n) % 4 == 0, "b", "a")
    z = np.stack([fe_h, alpha_m], 1) @ A.T + np.where(sources == "b", 0.5, 0.0)[:, None] \
        + 0.01 * rng.standard_normal((n, D))
    patterns, rows = E.conditional_patterns(z, {"fe_h": fe_h, "alpha_m": alpha_m}, sources)
    assert rows == n
    for j, name in enumerate(["fe_h", "alpha_m"]):
        assert np.allclose(patterns[name], A[:, j], atol=0.02), name
    marginal = E.fit_label_direction("alpha_m", z, alpha_m, sources).pattern
    cos = marginal @ A[:, 1] / np.linalg.norm(marginal) / np.linalg.norm(A[:, 1])
    assert cos < 0.9
    # rows without every label are left out; too few complete rows give no patterns
    partial = dict(fe_h=fe_h, alpha_m=np.where(np.arange(n) < 30, alpha_m, np.nan))
    assert E.conditional_patterns(z, partial, sources) == ({}, 30)
    with pytest.raises(ValueError, match="'joint'"):
        E.ExplainOptions(label_patterns="joint")


def test_label_directions_carry_to_the_lines_they_move_through_the_chain_rule():
    """Planted labels: Teff follows the Fe latent, [Fe/H] the Ni latent; their directions must
    move the Fe and the Ni line (the chain rule through the decoder), and the HR anchors exist."""
    trained = line_model()
    D = trained.model.latent_dim
    rng = np.random.default_rng(1)
    n = 400
    z = rng.standard_normal((n, D))
    z, _ = np.linalg.qr(z - z.mean(0))  # latents with an exactly diagonal sample covariance: no leakage
    z *= np.sqrt(n - 1)                 # between the planted directions through it
    labels = {"teff": 5000 + 600 * z[:, 0] + 20 * rng.standard_normal(n),
              "logg": 3.0 + 0.8 * z[:, 1] + 0.02 * rng.standard_normal(n),
              "fe_h": -0.2 + 0.3 * z[:, 3] + 0.01 * rng.standard_normal(n),
              "alpha_m": np.full(n, np.nan)}
    labelled = E.Labelled([f"miles/s{i}" for i in range(n)], ["miles"] * n, ["train"] * n, z, labels,
                          np.ones(n))
    rep = E.explain_model(trained, labelled, E.ExplainOptions(plots=False, n_random=128))
    ld = rep["label_directions"]
    assert set(ld["directions"]) == {"teff", "logg", "fe_h"}
    assert ld["directions"]["teff"]["cv_r2_within_source"] > 0.95
    teff_line = ld["per_grid"]["galah_dr3"]["teff"]["top_lines"][0]
    assert teff_line["element"] == "Fe" and abs(teff_line["wavelength_A"] - LINES["Fe"]["galah"]) < 0.01
    assert teff_line["d_ew_mA"] > 0 and teff_line["response"] < 0  # the line deepens as the label grows
    signs = ld["numbers"]["line_signs"]["galah_dr3"]["teff"]["typical"]
    # the other lines barely move: only the Fe latent carries Teff
    assert abs(signs["median_d_ew_mA_per_sigma"]) < 0.01 * teff_line["d_ew_mA"] and signs["n"] >= len(ELEMENTS) - 1
    assert ld["per_grid"]["galah_dr3"]["fe_h"]["top_lines"][0]["element"] == "Ni"
    assert ld["per_grid"]["apogee_apstar"]["fe_h"]["top_lines"][0]["element"] == "Ni"
    assert {a["name"] for a in rep["anchors"]} >= {"typical", "solar", "giant"}
    dis = rep["disentanglement"]["labels"]
    assert dis["teff"]["most_informative_latent"] == 0 and dis["fe_h"]["most_correlated_latent"] == 3
    assert dis["teff"]["latents_for_95pct"] == 1
    galah = ld["numbers"]["galah_teff_lines"]
    assert galah["h_alpha_rank"] > 1 and galah["n_lines"] >= len(ELEMENTS)
    text = E.markdown(E._finite(E._public(rep)))
    assert "single element: Fe" in text and "Label directions" in text


def test_mutual_information_and_top_k():
    rng = np.random.default_rng(2)
    x = rng.standard_normal(3000)
    mi_dep, _ = E.mutual_information(x, x**2 + 0.05 * rng.standard_normal(3000))
    mi_ind, _ = E.mutual_information(x, rng.standard_normal(3000))
    assert mi_dep > 0.5 and mi_ind < 0.03
    assert abs(np.corrcoef(x, x**2)[0, 1]) < 0.1  # invisible to a correlation
    z = rng.standard_normal((800, 5))
    y = 2 * z[:, 1] + z[:, 4] + 0.05 * rng.standard_normal(800)
    d = E.fit_label_direction("logg", z, y)
    order = np.argsort(-d.importance)
    assert list(order[:2]) == [1, 4]
    curve = E.top_k_curve("logg", z, y, order, d.alpha)
    assert E.latents_needed(curve, 0.95) == 2
    order, forward = E.forward_selection("logg", z, y, d.alpha)
    assert order[:2] == [1, 4] and E.latents_needed(forward, 0.95) == 2


def test_smoothing_keeps_a_constant_and_removes_a_narrow_line():
    x = np.ones((2000, 1))
    assert np.allclose(E.smooth_rows(x, 50.0), 1.0)
    x[1000] = 0.0
    y = E.smooth_rows(x, 50.0)
    assert y[1000, 0] > 0.99 and abs(y.mean() - x.mean()) < 1e-3


# --- the command line, end to end -----------------------------------------------------------------


def test_cli_writes_the_report_and_refuses_to_overwrite_it(eval_dataset, eval_run, tmp_path, capsys):
    dataset, run = eval_dataset, eval_run
    from stellarfield import cli

    out = tmp_path / "explain"
    args = ["explain", "--model", str(run), "--data", str(dataset), "--out", str(out), "--max-per-product", "25",
            "--refine-steps", "3", "--random-directions", "32", "--threads", "1", "--quiet"]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "latents:" in printed and "explain.md" in printed
    report = json.loads((out / "explain.json").read_text())
    assert len(report["latents"]) == 4
    assert set(report["grids"]) == {"miles", "lamost_lrs"}
    assert report["labelled"]["n"] > 10 and set(report["labelled"]["by_split"]) <= {"train", "validation"}
    assert "teff" in report["label_directions"]["directions"]
    assert (out / "explain.md").read_text().startswith("# What the latents do")
    assert (out / "latents.parquet").exists()
    for plot in report["plots"]:
        assert (out / plot).stat().st_size > 1000
    assert any(p.startswith("plots/response_z") for p in report["plots"])
    assert "plots/response_teff.png" in report["plots"]
    # a second run into the same folder is refused without --force
    assert cli.main(args) == 2
    assert "already holds an explain report" in capsys.readouterr().err
    assert cli.main(["explain", "--model", str(run), "--data", str(tmp_path), "--out", str(tmp_path / "x")]) == 2


def test_cli_defaults_match_the_module():
    from stellarfield.cli import explain as cli_explain

    assert cli_explain.DEFAULT_MAX_PER_PRODUCT == E.DEFAULT_MAX_PER_PRODUCT
    assert cli_explain.DEFAULT_REFINE_STEPS == E.DEFAULT_REFINE_STEPS
    assert cli_explain.N_RANDOM == E.N_RANDOM
