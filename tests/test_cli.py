"""The command line: ingest, info and plot over real files, with clear errors and exit codes."""

from __future__ import annotations

import json

import pytest

from stellarfield.cli import EXIT_USAGE, main

APSTAR = "apogee/apstar/apStar-dr17-2M19485057+5005279.fits"
GALAH_P6 = "galah/pipeline6/2101150022012391.fits"


def test_info_on_a_survey_file(shared_data, capsys):
    assert main(["info", str(shared_data / APSTAR)]) == 0
    out = capsys.readouterr().out
    assert "format apogee_apstar, 1 spectra" in out
    # the three chips of the 8575-px grid, first pixel 10**4.179 A = 15100.80 A (vacuum, rest frame)
    assert "blue" in out and "green" in out and "red" in out
    assert "15100.80" in out
    assert "rv_kms=13.96" in out and "teff=5226" in out  # header VHELIO and RV_TEFF of this star


def test_info_on_a_dataset(shared_data, tmp_path, capsys):
    out_ds = tmp_path / "DS"
    assert main(["ingest", str(shared_data / "galah" / "pipeline6"), "--out", str(out_ds), "--quiet", "--workers", "1"]) == 0
    report = json.loads((out_ds / "ingest_report.json").read_text())
    assert report["spectra"] == {"galah_pipeline6": 6} and report["skipped"] == []
    # dr6.0.fits and the official text docs are auxiliary, not skipped
    kinds = {a["file"].split("/")[-1]: a["kind"] for a in report["auxiliary"]}
    assert kinds["dr6.0.fits"] == "galah_dr6_table"
    capsys.readouterr()
    assert main(["info", str(out_ds)]) == 0
    assert "galah_pipeline6" in capsys.readouterr().out
    # a second ingest to the same folder is refused and says how to proceed
    code = main(["ingest", str(shared_data / "galah" / "pipeline6"), "--out", str(out_ds), "--quiet"])
    assert code == EXIT_USAGE
    assert "--force" in capsys.readouterr().err


def test_plot_png_and_pdf_with_zoom(shared_data, tmp_path):
    png, pdf = tmp_path / "a.png", tmp_path / "sun.pdf"
    assert main(["plot", str(shared_data / APSTAR), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    # H-alpha of the Sun (via Vesta) in pipeline 6's CCD3: only that panel is drawn
    assert main(["plot", str(shared_data / GALAH_P6), "--zoom", "6550", "6580", "--out", str(pdf)]) == 0
    assert pdf.read_bytes()[:5] == b"%PDF-"


def test_plot_panels_and_masked_shading(shared_data):
    from stellarfield.io import read_spectra
    from stellarfield.plotting import plot_spectrum

    (spec,) = read_spectra(shared_data / APSTAR)
    fig = plot_spectrum(spec)
    assert len(fig.axes) == 3  # one panel per APOGEE chip
    fig = plot_spectrum(spec, zoom=(15150, 15200))
    assert len(fig.axes) == 1
    lo, hi = fig.axes[0].get_xlim()
    assert 15150 <= lo < hi <= 15200


def test_plot_errors_are_one_line(shared_data, tmp_path, capsys):
    assert main(["plot", str(shared_data / APSTAR), "--zoom", "5000", "5100", "--out", str(tmp_path / "x.png")]) == EXIT_USAGE
    assert "outside every segment" in capsys.readouterr().err
    assert main(["plot", str(tmp_path / "missing.fits"), "--out", str(tmp_path / "x.png")]) == EXIT_USAGE
    assert "no such file" in capsys.readouterr().err
    assert main(["plot", str(shared_data / APSTAR), "--out", str(tmp_path / "x.jpg")]) == EXIT_USAGE
    assert ".png or .pdf" in capsys.readouterr().err
