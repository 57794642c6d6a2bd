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
    report = json.loads((out_ds / "_ingest_report.json").read_text())
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


# ----------------------------------------------------------------------------------------------
# argument validation, help text, --debug
# ----------------------------------------------------------------------------------------------
def _all_parsers():
    import argparse

    from stellarfield.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, sub


def test_every_command_and_option_has_help():
    import argparse

    parser, sub = _all_parsers()
    helps = {a.dest: a.help for a in sub._choices_actions}
    assert set(helps) == set(sub.choices) and all(helps.values()), helps
    missing = []
    for name, command in [("stellarfield", parser), *sub.choices.items()]:
        for action in command._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            if not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert missing == []


def test_choices_are_listed_in_help():
    _, sub = _all_parsers()
    def text(command):
        return " ".join(sub.choices[command].format_help().split())

    assert "train, validation, test" in text("fit") and "autodecoder, gon" in text("train")


@pytest.mark.parametrize("argv, option", [
    (["generate", "--model", "M", "--wave-range", "5000", "5100", "--resolution", "0", "--out", "x.fits"], "--resolution"),
    (["generate", "--model", "M", "--instrument", "miles", "--n", "-1", "--out", "x.fits"], "--n"),
    (["generate", "--model", "M", "--instrument", "miles", "--n", "ten", "--out", "x.fits"], "--n"),
    (["generate", "--model", "M", "--instrument", "miles", "--rv", "nan", "--out", "x.fits"], "--rv"),
    (["train", "--data", "D", "--out", "R", "--minutes", "0"], "--minutes"),
    (["train", "--data", "D", "--out", "R", "--max-steps", "-5"], "--max-steps"),
    (["train", "--data", "D", "--out", "R", "--objective", "vae"], "--objective"),
    (["fit", "--model", "M", "in.fits", "--split", "bogus", "--out", "x.parquet"], "--split"),
    (["fit", "--model", "M", "in.fits", "--refine-steps", "-1", "--out", "x.parquet"], "--refine-steps"),
    (["ingest", "src", "--out", "D", "--workers", "0"], "--workers"),
    (["info", "x.fits", "--max-rows", "0"], "--max-rows"),
    (["export", "run", "--out", "o", "--max-mb", "-1"], "--max-mb"),
    (["demo", "--minutes", "0"], "--minutes"),
    (["plot", "x.fits", "--zoom", "a", "b", "--out", "x.png"], "--zoom"),
])
def test_bad_arguments_are_one_line(argv, option, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == EXIT_USAGE
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert option in err and "--help" in err and "Traceback" not in err


def test_debug_shows_the_traceback(tmp_path, capsys):
    missing = str(tmp_path / "missing.fits")
    from stellarfield.io import SpectrumReadError

    for argv in (["--debug", "plot", missing, "--out", "x.png"], ["plot", missing, "--out", "x.png", "--debug"]):
        with pytest.raises(SpectrumReadError, match="no such file"):
            main(argv)
    assert main(["plot", missing, "--out", "x.png"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "missing.fits" in err


def test_an_unexpected_failure_is_one_line_pointing_at_debug(monkeypatch, tmp_path, capsys):
    import stellarfield.cli as cli
    import stellarfield.cli.data

    def broken(args):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(stellarfield.cli.data, "cmd_info", broken)
    assert main(["info", str(tmp_path)]) == cli.EXIT_INTERNAL
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "ZeroDivisionError" in err and "--debug" in err
    with pytest.raises(ZeroDivisionError):
        main(["info", str(tmp_path), "--debug"])


@pytest.mark.parametrize("content, expected", [
    (None, "no such config file"),
    ("{\"lr\": 0.01,}", "not valid JSON"),
    ("[1, 2]", "not an object"),
    ("{\"learning_rate\": 0.01}", "unknown key(s) ['learning_rate']"),
    ("{\"lr\": \"fast\"}", "lr must be a float"),
])
def test_a_bad_config_is_one_line_naming_the_file(content, expected, tmp_path, capsys):
    config = tmp_path / "config.json"
    if content is not None:
        config.write_text(content)
    code = main(["train", "--data", str(tmp_path / "DS"), "--out", str(tmp_path / "run"), "--config", str(config)])
    err = capsys.readouterr().err
    assert code == EXIT_USAGE
    assert len(err.strip().splitlines()) == 1 and str(config) in err and expected in err, err
    assert not (tmp_path / "run").exists()


def test_a_config_can_be_given_as_the_json_object_itself(tmp_path):
    """``--config '{"minutes": 3}'`` is read as the object (what a file holding it gives); a broken one
    is refused with the text quoted."""
    from stellarfield.cli.model import load_train_config
    from stellarfield.errors import ConfigError

    file = tmp_path / "config.json"
    file.write_text('{"minutes": 3, "latent_dim": 8}')
    assert load_train_config(' {"minutes": 3, "latent_dim": 8}') == load_train_config(str(file))
    assert load_train_config('{"minutes": 3}').minutes == 3
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_train_config('{"minutes": 3,}')
    with pytest.raises(ConfigError, match="unknown key"):
        load_train_config('{"minute": 3}')


def test_info_verifies_a_dataset(shared_data, tmp_path, capsys):
    out_ds = tmp_path / "DS"
    assert main(["ingest", str(shared_data / APSTAR), "--out", str(out_ds), "--quiet", "--workers", "1"]) == 0
    capsys.readouterr()
    assert main(["info", str(out_ds)]) == 0
    assert "verified: every shard read" in capsys.readouterr().out
    assert main(["info", str(out_ds), "--quick"]) == 0
    (out_ds / "shard-00000.parquet").write_bytes(b"PAR1 truncated")
    assert main(["info", str(out_ds)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "shard-00000.parquet" in err and "Traceback" not in err


def test_every_option_of_every_command_says_what_it_does():
    """``--help`` documents every option; options with choices list them."""
    import argparse

    from stellarfield.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert {"ingest", "info", "plot", "train", "generate", "fit", "predict", "export", "demo", "bench",
            "explain"} <= set(sub.choices)
    for listed in sub._choices_actions:  # the one-line summary in 'stellarfield --help'
        assert listed.help and listed.help.strip(), listed.dest
    for name, command in sub.choices.items():
        for action in command._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help and action.help.strip(), f"{name} {action.option_strings or action.dest}: no help"
        if any(a.choices for a in command._actions):
            text = command.format_help()
            for action in command._actions:
                for choice in action.choices or ():
                    assert str(choice) in text, f"{name}: choice {choice} of {action.dest} not listed"


def test_version_is_the_package_version(capsys):
    from stellarfield import __version__

    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.strip() == f"stellarfield {__version__}"


def test_python_dash_m_stellarfield_is_the_command():
    """``python -m stellarfield`` (what ``torchrun -m stellarfield`` runs on every rank) is the CLI."""
    import subprocess
    import sys

    from stellarfield import __version__

    done = subprocess.run([sys.executable, "-m", "stellarfield", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == f"stellarfield {__version__}"


def test_train_options_override_the_config(tmp_path, monkeypatch, capsys):
    """--objective encoder and --streaming / --no-streaming reach the TrainConfig the run gets."""
    import importlib

    train_module = importlib.import_module("stellarfield.model.train")  # the package exports a function 'train'
    (tmp_path / "DS").mkdir()
    (tmp_path / "DS" / "_manifest.json").write_text("{}")  # enough for the CLI's dataset check
    seen = {}

    def fake_train(data, out, config, resume=False, progress=True):
        seen["config"] = config
        raise ValueError("stop here")

    monkeypatch.setattr(train_module, "train", fake_train)
    base = ["train", "--data", str(tmp_path / "DS"), "--out", str(tmp_path / "RUN")]
    assert main(base + ["--objective", "encoder", "--streaming"]) == EXIT_USAGE
    assert seen["config"].objective == "encoder" and seen["config"].streaming is True
    assert main(base + ["--no-streaming"]) == EXIT_USAGE
    assert seen["config"].streaming is False and seen["config"].objective == "autodecoder"
    assert main(base) == EXIT_USAGE and seen["config"].streaming is None
    assert "stop here" in capsys.readouterr().err
