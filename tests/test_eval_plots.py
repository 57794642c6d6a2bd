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

    fig = plot_gallery(w, [truth + 0.05 * i for i in range(5)], labels=[f"z{i}" for i in range(5)],
                       out=tmp_path / "gallery.png")
    assert (tmp_path / "gallery.png").stat().st_size > 10_000
    # the whole range, then a zoom on each line the grid resolves: H-beta and H-alpha here
    assert len(fig.axes) == 3 and [a.get_title() for a in fig.axes[1:]] == ["4829-4893 A", "6530-6600 A"]  # the lines with their side bands
    coarse = np.linspace(3400, 10000, 343)  # Gaia XP's ~20 A samples: no line has 20 pixels, no zoom
    assert len(plot_gallery(coarse, [np.ones(343)]).axes) == 1
    assert len(plot_gallery(w, [truth], zoom_windows=[]).axes) == 1

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


# --- plots people trust: robust y ranges, clipped points marked, legends outside ------------------
def _clipped_markers(ax, gid):
    return [line for line in ax.get_lines() if line.get_gid() == gid]


def test_robust_ylim_ignores_a_spike_but_keeps_the_tails_of_the_bulk():
    from stellarfield.plotting import robust_ylim

    rng = np.random.default_rng(3)
    flux = 1.0 + 0.01 * rng.normal(size=5000)
    flux[2500] = 1000.0
    flux[100] = 0.96  # 1.4 % below the bulk's 0.5 percentile (0.974): a tail, kept in view
    lo, hi = robust_ylim(flux)
    assert 1.02 < hi < 1.1 and 0.94 < lo < 0.96
    flux[100] = 0.7  # a lone pixel far below is an outlier like the spike: left out (and marked by the plots)
    assert robust_ylim(flux)[0] > 0.9
    assert robust_ylim(np.array([np.nan])) is None
    assert robust_ylim(np.full(10, 2.0)) == pytest.approx((2.0 - 0.08 * 0.2, 2.0 + 0.08 * 0.2))


def test_a_spectrum_with_one_huge_spike_gets_limits_near_the_bulk_and_the_spike_is_marked(tmp_path):
    from stellarfield.plotting import CLIPPED_ABOVE, plot_spectrum
    from stellarfield.spectrum import Segment, Spectrum

    rng = np.random.default_rng(4)
    wave = np.linspace(5000.0, 5100.0, 2000)
    flux = 1.0 + 0.01 * rng.normal(size=wave.size)
    flux[777] = 1e4  # a cosmic ray
    seg = Segment("full", wave, flux.astype(np.float32), np.full(wave.size, 1e4, np.float32), np.ones(wave.size, bool))
    s = Spectrum(object_id="spike", survey="t", instrument="t", product="p", segments=[seg], frame="rest",
                 normalisation="flux")
    fig = plot_spectrum(s, out=tmp_path / "spike.png")
    ax = fig.axes[0]
    lo, hi = ax.get_ylim()
    assert 0.9 < lo < 1.0 and 1.0 < hi < 1.1  # the bulk fills the panel
    (marker,) = _clipped_markers(ax, CLIPPED_ABOVE)
    assert marker.get_xdata().tolist() == pytest.approx([wave[777]]) and marker.get_marker() == "^"
    legend = ax.get_legend()
    assert legend is not None and legend.get_bbox_to_anchor().x0 > ax.get_window_extent().x1 - 1  # right of the data
    assert (tmp_path / "spike.png").stat().st_size > 10_000


def test_reconstruction_and_residual_panels_mark_what_they_clip(tmp_path):
    from stellarfield.plotting import CLIPPED_ABOVE, CLIPPED_BELOW

    rng = np.random.default_rng(5)
    w = np.linspace(6480.0, 6650.0, 1000)
    truth = 1 - 0.5 * np.exp(-0.5 * ((w - 6564.6) / 1.0) ** 2)
    data = truth + 0.01 * rng.normal(size=w.size)
    data[300] = 50.0  # spike
    fig = plot_reconstructions([{"wavelength": w, "data": data, "models": {"model": truth}}], zoom_windows=[],
                               out=tmp_path / "rec.png")
    top, bottom = fig.axes
    assert top.get_ylim()[1] < 1.5 and top.get_ylim()[0] < 0.5  # spike at 50 off scale; the H-alpha core (0.5) in view
    assert _clipped_markers(top, CLIPPED_ABOVE)[0].get_xdata().tolist() == pytest.approx([w[300]])
    assert bottom.get_ylim()[1] < 1.0 and _clipped_markers(bottom, CLIPPED_ABOVE)
    # residual profile: one star with a huge residual bin does not set the scale
    resid = [rng.normal(size=w.size) for _ in range(20)]
    for r in resid:
        r[500:504] = -1e3
    fig = plot_residual_profile({"model": ([w] * 20, resid)}, out=tmp_path / "res.png")
    assert fig.axes[0].get_ylim()[0] > -10 and _clipped_markers(fig.axes[0], CLIPPED_BELOW)


def test_line_depth_histograms_overlay_generated_on_real(tmp_path):
    from stellarfield.eval.plots import plot_line_depths

    rng = np.random.default_rng(6)
    depths = {"H-alpha": {"real": rng.normal(0.4, 0.05, 200), "generated": np.append(rng.normal(0.3, 0.05, 100), 40.0)},
              "Na D": {"real": rng.normal(0.2, 0.05, 200), "generated": rng.normal(0.2, 0.05, 100)},
              "Mg b": {"real": np.full(3, np.nan), "generated": np.full(3, np.nan)}}  # not measured: no panel
    fig = plot_line_depths(depths, out=tmp_path / "depths.png")
    shown = [ax for ax in fig.axes if ax.axison]
    assert [ax.get_title() for ax in shown] == ["H-alpha", "Na D"]
    ax = shown[0]
    assert ax.get_xlim()[1] < 1.0  # the outlier depth 40 does not stretch the axis
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels[0].startswith("real (n=200") and labels[1].startswith("generated (n=101") and "1 off scale" in labels[1]
    assert (tmp_path / "depths.png").stat().st_size > 10_000
