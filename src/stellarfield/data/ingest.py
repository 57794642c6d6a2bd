"""Ingest survey files into a dataset: find files, detect formats, read in parallel, write atomically.

``ingest(["../shared/data"], "DS")`` walks the sources, sorts every file into

* **spectra**: files a registered reader recognises (grouped into observation units: GALAH's four
  CCD files are one unit), read in parallel worker processes;
* **auxiliary**: files that travel with spectra but are not spectra (READMEs, SOURCES.tsv, NOTES.md,
  the label tables the readers use);
* **skipped**: files that should have been spectra and could not be read, each with the reason.

One bad file never aborts the batch: an unreadable file (or folder) is reported with the reason,
and a second copy of an observation already read (``X.fits`` and ``X (1).fits``) is reported as a
duplicate and not written twice. The dataset is written by
:class:`~stellarfield.data.store.DatasetWriter` (atomic: an interrupted ingest leaves nothing that
looks complete, and an existing dataset is replaced only by a complete, checked one) with
``ingest_report.json`` beside its manifest. An ingest that reads no spectrum at all (a mistyped
source) raises :class:`NothingToIngestError` and writes nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from stellarfield.data.spectrum import Spectrum
from stellarfield.data.store import DatasetWriter
from stellarfield.errors import StellarfieldError
from stellarfield.io.errors import SpectrumReadError
from stellarfield.io.registry import classify, read_spectra, unit_key

#: The source name that stands for the spectra the ``[demo]`` extra installs.
DEMO_SOURCE = "demo"
#: File names that are never spectra, whatever their content (version control, OS litter).
IGNORED_NAMES = {".DS_Store", "Thumbs.db", ".gitignore", ".gitattributes"}


@dataclass
class IngestReport:
    """What an ingest did: spectra per product, skipped files with reasons, duplicate observations
    (``{"file", "key", "kept", "reason"}``: the copy not written and the file whose copy was),
    auxiliary files."""

    spectra: dict[str, int] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)
    duplicates: list[dict[str, str]] = field(default_factory=list)
    auxiliary: list[dict[str, str]] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    n_files: int = 0
    seconds: float = 0.0
    dataset: str = ""

    @property
    def n_spectra(self) -> int:
        return sum(self.spectra.values())

    def to_json(self) -> str:
        out = asdict(self)
        out["n_spectra"] = self.n_spectra
        return json.dumps(out, indent=2, sort_keys=False)

    def summary(self) -> str:
        lines = [f"ingested {self.n_spectra} spectra from {self.n_files} files in {self.seconds:.1f} s -> {self.dataset}"]
        for product, n in sorted(self.spectra.items()):
            lines.append(f"  {product:<22s} {n:>7d}")
        lines.append(f"  auxiliary files: {len(self.auxiliary)}")
        lines.append(f"  skipped files:   {len(self.skipped)}")
        for s in self.skipped:
            lines.append(f"    {s['file']}: {s['reason']}")
        if self.duplicates:
            lines.append(f"  duplicates (not written twice): {len(self.duplicates)}")
            for d in self.duplicates:
                lines.append(f"    {d['file']}: {d['reason']}")
        return "\n".join(lines)


class NothingToIngestError(StellarfieldError):
    """No spectrum could be read from the sources; nothing was written. ``report`` says why."""

    def __init__(self, report: IngestReport, out: str | Path):
        self.report = report
        skipped = len(report.skipped)
        super().__init__(
            f"no spectrum could be read from {', '.join(report.sources) or 'the sources given'} "
            f"({report.n_files} file(s) found, {skipped} skipped with the reasons listed); nothing was written"
            + (" and the existing dataset at " if Path(out).exists() else " to ") + f"{out}"
            + (" was left as it was" if Path(out).exists() else "")
            + "; check the source paths"
        )


def expand_sources(sources: Sequence[str | Path]) -> tuple[list[Path], list[dict[str, str]]]:
    """Files under each source (a file, a folder walked recursively, or ``"demo"``).

    Returns ``(files, missing)`` where ``missing`` lists sources that do not exist, with the reason.
    """
    files: list[Path] = []
    missing: list[dict[str, str]] = []
    for source in sources:
        if str(source) == DEMO_SOURCE:
            from stellarfield.io.demo_sources import demo_files

            for paths in demo_files().values():
                files.extend(Path(p) for p in paths)
            continue
        path = Path(source)
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files.extend(_walk(path, missing))
        else:
            missing.append({"file": str(path), "reason": "no such file or folder"})
    # The same file named twice (a folder and a file inside it) is read once.
    seen: set[Path] = set()
    unique = []
    for f in files:
        r = f.resolve()
        if r not in seen:
            seen.add(r)
            unique.append(f)
    return unique, missing


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _walk(root: Path, unreadable: list[dict[str, str]]) -> list[Path]:
    """Files under ``root`` (sorted; hidden and ignored names left out). A folder that cannot be
    listed is added to ``unreadable`` with the reason, never passed over silently."""

    def on_error(exc: OSError) -> None:
        where = exc.filename or root
        unreadable.append({"file": str(where), "reason": f"cannot list the folder ({_os_reason(exc)})"})

    files = []
    for folder, subfolders, names in os.walk(root, onerror=on_error):
        subfolders.sort()
        for name in names:
            p = Path(folder) / name
            if name not in IGNORED_NAMES and not _hidden(p, root) and p.is_file():
                files.append(p)
    return sorted(files)


def _os_reason(exc: OSError) -> str:
    """``"permission denied"`` and the like from an OSError, without repeating the path."""
    return (exc.strerror or type(exc).__name__).lower() if exc.strerror else f"{type(exc).__name__}: {exc}"


def classify_file(path: Path) -> tuple[str, str, str]:
    """``("spectrum", format, unit_key)``, ``("auxiliary", kind, "")`` or ``("skipped", reason, "")``.

    Never raises: a file that cannot be opened (permissions, a read error) is skipped with the reason.
    """
    try:
        kind, what = classify(path)
    except SpectrumReadError as exc:
        return "skipped", exc.reason, ""
    except OSError as exc:
        return "skipped", f"cannot read the file ({_os_reason(exc)})", ""
    except Exception as exc:  # pragma: no cover - a reader bug must not abort the batch
        return "skipped", f"unexpected {type(exc).__name__}: {exc}", ""
    if kind == "auxiliary":
        return "auxiliary", what, ""
    return "spectrum", what, unit_key(path, what)


def spectra_from_sources(sources: Sequence[str | Path], on_skip=None) -> Iterator[Spectrum]:
    """Stream the spectra under ``sources`` in this process, one observation unit at a time.

    Like :func:`ingest` without writing a dataset: auxiliary files are passed over, and each file
    that should have been a spectrum but could not be read is given to ``on_skip({"file", "reason"})``.
    """
    files, missing = expand_sources(sources)
    skipped = list(missing)
    seen: set[str] = set()
    for path in files:
        kind, what, key = classify_file(path)
        if kind == "skipped":
            skipped.append({"file": str(path), "reason": what})
        elif kind == "spectrum" and f"{what}:{key}" not in seen:
            seen.add(f"{what}:{key}")
            spectra, bad = read_unit(path, what)
            skipped.extend(bad)
            yield from spectra
        while on_skip is not None and skipped:
            on_skip(skipped.pop(0))
    while on_skip is not None and skipped:  # sources that do not exist, when no file was found at all
        on_skip(skipped.pop(0))


def read_unit(path: Path, fmt: str) -> tuple[list[Spectrum], list[dict[str, str]]]:
    """Read one observation unit; never raises. Records with no good pixel are skipped with a reason."""
    try:
        spectra = read_spectra(path, format=fmt)
    except SpectrumReadError as exc:
        return [], [{"file": str(path), "reason": exc.reason}]
    except OSError as exc:
        return [], [{"file": str(path), "reason": f"cannot read the file ({_os_reason(exc)})"}]
    except Exception as exc:  # pragma: no cover - a reader bug must not abort the batch
        return [], [{"file": str(path), "reason": f"unexpected {type(exc).__name__}: {exc}"}]
    kept, skipped = [], []
    for s in spectra:
        if not s.mask.any():
            why = s.meta.get("quality_reason")  # a reader that masked bad data says why
            skipped.append({"file": str(path), "reason": f"{s.key}: no good pixel in the spectrum"
                            + (f" ({why})" if why else "")})
        else:
            kept.append(s)
    if not spectra:
        skipped.append({"file": str(path), "reason": f"the {fmt} reader found no spectrum in the file"})
    return kept, skipped


def ingest(
    sources: Sequence[str | Path],
    out: str | Path,
    *,
    force: bool = False,
    workers: int | None = None,
    progress: bool = True,
    shard_size: int = 4096,
) -> IngestReport:
    """Read every spectrum under ``sources`` into a new dataset at ``out``.

    Parameters
    ----------
    sources:
        Files, folders (walked recursively) or ``"demo"`` (the ``stellarfield[demo]`` spectra).
    out:
        Dataset folder to create. An existing one is refused unless ``force=True``; it is replaced
        only once the new one is complete and checked, and never when nothing could be read.
    workers:
        Reader processes (default: the machine's core count, at most 8). 1 reads in this process.

    Raises :class:`NothingToIngestError` (nothing written) when no spectrum could be read.
    """
    from stellarfield.data.store import DatasetExistsError  # noqa: F401  (re-raised to the caller)
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    out = Path(out)
    workers = workers or min(8, os.cpu_count() or 1)
    report = IngestReport(sources=[str(s) for s in sources], dataset=str(out))
    metadata = {"sources": report.sources, "python": platform.python_version()}
    # Open the writer first: an existing dataset is refused before any work is done.
    with DatasetWriter(out, overwrite=force, shard_size=shard_size, metadata=metadata) as writer:
        files, missing = expand_sources(sources)
        report.skipped.extend(missing)
        report.n_files = len(files)

        units: dict[str, tuple[Path, str]] = {}
        for path, (kind, what, key) in zip(
            files, _map(classify_file, files, workers, progress, "identifying files", tqdm)
        ):
            if kind == "auxiliary":
                report.auxiliary.append({"file": str(path), "kind": what})
            elif kind == "skipped":
                report.skipped.append({"file": str(path), "reason": what})
            else:
                units.setdefault(f"{what}:{key}", (path, what))

        unit_list = list(units.values())
        results = _map(_read_unit_args, unit_list, workers, progress, "reading spectra", tqdm)
        written: dict = {}  # key and pixel digest -> (key, file, digest) of the copy written
        for spectra, skipped in results:
            report.skipped.extend(skipped)
            for spectrum in spectra:
                _write_one(writer, spectrum, written, report)
        report.spectra = dict(sorted(writer.counts.items()))
        if report.n_spectra == 0:  # leaves the with block by an exception: nothing is written
            raise NothingToIngestError(report, out)
        report.seconds = round(time.perf_counter() - t0, 2)
        writer.add_file("ingest_report.json", report.to_json())  # lands with the dataset, or not at all
    return report


def _pixel_digest(spectrum: Spectrum) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for seg in spectrum.segments:
        for array in (seg.wavelength, seg.flux, seg.ivar, seg.mask):
            h.update(array.tobytes())
    return h.digest()


def _write_one(writer: DatasetWriter, spectrum: Spectrum, written: dict, report: IngestReport) -> None:
    """Write one record, or report it. A second copy of an observation already written (the same
    key, or the same pixels under another key: a copy whose id comes from its file name) is a
    duplicate; a record the store refuses is skipped with the reason. Never raises for one record."""
    file = str(spectrum.provenance.get("file", "unknown file"))
    digest = _pixel_digest(spectrum)
    first = written.get(spectrum.key) or written.get(digest)
    if first is not None:
        kept_key, kept, kept_digest = first
        if kept_key != spectrum.key:
            what = f"the same pixels as {kept_key}"
        else:
            what = "an identical copy" if digest == kept_digest else "different pixels under the same key"
        report.duplicates.append({"file": file, "key": spectrum.key, "kept": kept,
                                  "reason": f"{spectrum.key}: already read from {kept} ({what}); kept that one"})
        return
    try:
        writer.write(spectrum)
    except (ValueError, TypeError) as exc:
        report.skipped.append({"file": file, "reason": f"{spectrum.key}: {exc}"})
        return
    written[spectrum.key] = written[digest] = (spectrum.key, file, digest)


def _read_unit_args(args: tuple[Path, str]):
    return read_unit(*args)


def _map(fn, items: list, workers: int, progress: bool, desc: str, tqdm) -> Iterable:
    """Map in order, in worker processes when there is more than one, with a progress bar."""
    bar = tqdm(total=len(items), desc=desc, unit="file", disable=not progress)
    try:
        if workers <= 1 or len(items) <= 1:
            for item in items:
                yield fn(item)
                bar.update()
            return
        with ProcessPoolExecutor(max_workers=workers) as pool:
            # chunks keep worker start-up and pickling overheads small for many small files
            chunksize = max(1, min(16, len(items) // (4 * workers)))
            for result in pool.map(fn, items, chunksize=chunksize):
                yield result
                bar.update()
    finally:
        bar.close()

