"""The benchmark figures: written from arrays, ragged grids and chip gaps handled, binned stats right."""

from __future__ import annotations

import numpy as np
import pytest

from stellarfield.eval.plots import (
    binned_percentiles,
    latent_projection,
    plot_gallery,
    plot_latent_projection,
    plot_reconstructions,
    plot_residual_profile,
)


def test_binned_percentiles_of_known_values():
    # Two "stars" on different grids; bin [0, 10) holds 0..9 twice, bin [10, 20) holds 10..19 twice.
    w1, w2 = np.arange(20.0), np.arange(20.0) + 0.5
    centres, p16, p50, p84, n = binned_percentiles([w1, w2], [w1, np.floor(w2)], np.array([0.0, 10.0, 20.0, 30.0]))
    assert centres.tolist() == [5.0, 15.0, 25.0]
    assert n.tolist() == [20, 20, 0]
    assert p50[0] == pytest.approx(4.5) and p50[1] == pytest.approx(14.5) and np.isnan(p50[2])
    assert p16[0] == pytest.approx(np.percentile(np.repeat(np.arange(10.0), 2), 16))


def test_residual_profile_makes_one_panel_per_chip(tmp_path):
    rng = np.random.default_rng(0)
    chips = [np.linspace(15100, 15800, 700), np.linspace(15860, 16430, 600), np.linspace(16480, 16950, 500)]
    waves = [np.concatenate(chips) + rng.uniform(-0.5, 0.5) for _ in range(30)]  # ragged: each star its own grid
    resid = [rng.normal(size=w.size) for w in waves]
    out = tmp_path / "residuals.png"
    fig = plot_residual_profile({"model": (waves, resid), "PCA": (waves, [2 * r for r in resid])}, title="APOGEE", out=out)
    assert len(fig.axes) == 3  # the chip gaps split the wavelength axis
    assert out.stat().st_size > 20_000


def test_reconstructions_gallery_and_latents_are_written(tmp_path):
    rng = np.random.default_rng(1)
    w = np.concatenate([np.linspace(4715, 4900, 800), np.linspace(6480, 6735, 800)])  # GALAH CCD1 + CCD3
    truth = 1 - 0.5 * np.exp(-0.5 * ((w - 6564.6) / 1.0) ** 2) - 0.4 * np.exp(-0.5 * ((w - 4862.7) / 1.0) ** 2)
    examples = [
        {"wavelength": w, "data": truth + 0.01 * rng.normal(size=w.size), "models": {"model": truth, "PCA": truth * 1.01},
         "mask": rng.random(w.size) > 0.01, "title": f"star {i}"}
        for i in range(2)
    ]
    fig = plot_reconstructions(examples, out=tmp_path / "rec.png")
    # 2 stars x (full + H-beta zoom + H-alpha zoom) x (spectrum + residual) panels
    assert len(fig.axes) == 2 * 3 * 2
    assert (tmp_path / "rec.png").stat().st_size > 20_000

    plot_gallery(w, [truth + 0.05 * i for i in range(5)], labels=[f"z{i}" for i in range(5)], out=tmp_path / "gallery.png")
    assert (tmp_path / "gallery.png").stat().st_size > 10_000

    latents = rng.normal(size=(300, 8))
    teff = np.where(rng.random(300) < 0.1, np.nan, 4000 + 2000 * rng.random(300))
    fig = plot_latent_projection(latents, teff, ["gaia_xp"] * 200 + ["miles"] * 100, out=tmp_path / "latents.pdf")
    assert (tmp_path / "latents.pdf").stat().st_size > 5_000
    with pytest.raises(ValueError, match=".png or .pdf"):
        plot_gallery(w, [truth], out=tmp_path / "gallery.jpg")


def test_latent_projection_finds_the_dominant_directions():
    rng = np.random.default_rng(2)
    z = rng.normal(size=(1000, 5)) * np.array([0.1, 5.0, 0.1, 2.0, 0.1])
    xy = latent_projection(z)
    assert np.std(xy[:, 0]) == pytest.approx(5.0, rel=0.1) and np.std(xy[:, 1]) == pytest.approx(2.0, rel=0.1)
