"""Ingest survey files into a dataset: find files, detect formats, read in parallel, write atomically.

``ingest(["../shared/data"], "DS")`` walks the sources, sorts every file into

* **spectra**: files a registered reader recognises (grouped into observation units: GALAH's four
  CCD files are one unit), read in parallel worker processes;
* **auxiliary**: files that travel with spectra but are not spectra (READMEs, SOURCES.tsv, NOTES.md,
  the label tables the readers use);
* **skipped**: files that should have been spectra and could not be read, each with the reason.

One bad file never aborts the batch. The dataset is written by
:class:`~stellarfield.data.store.DatasetWriter` (atomic: an interrupted ingest leaves nothing that
looks complete) and ``ingest_report.json`` is written beside its manifest.
"""

from __future__ import annotations

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
from stellarfield.io.errors import SpectrumReadError
from stellarfield.io.registry import classify, read_spectra, unit_key

#: The source name that stands for the spectra the ``[demo]`` extra installs.
DEMO_SOURCE = "demo"
#: File names that are never spectra, whatever their content (version control, OS litter).
IGNORED_NAMES = {".DS_Store", "Thumbs.db", ".gitignore", ".gitattributes"}


@dataclass
class IngestReport:
    """What an ingest did: spectra per product, skipped files with reasons, auxiliary files."""

    spectra: dict[str, int] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)
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
        return "\n".join(lines)


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
            files.extend(
                sorted(p for p in path.rglob("*") if p.is_file() and p.name not in IGNORED_NAMES and not _hidden(p, path))
            )
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


def classify_file(path: Path) -> tuple[str, str, str]:
    """``("spectrum", format, unit_key)``, ``("auxiliary", kind, "")`` or ``("skipped", reason, "")``."""
    try:
        kind, what = classify(path)
    except SpectrumReadError as exc:
        return "skipped", exc.reason, ""
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


def read_unit(path: Path, fmt: str) -> tuple[list[Spectrum], list[dict[str, str]]]:
    """Read one observation unit; never raises. Records with no good pixel are skipped with a reason."""
    try:
        spectra = read_spectra(path, format=fmt)
    except SpectrumReadError as exc:
        return [], [{"file": str(path), "reason": exc.reason}]
    except Exception as exc:  # pragma: no cover - a reader bug must not abort the batch
        return [], [{"file": str(path), "reason": f"unexpected {type(exc).__name__}: {exc}"}]
    kept, skipped = [], []
    for s in spectra:
        if not s.mask.any():
            skipped.append({"file": str(path), "reason": f"{s.key}: no good pixel in the spectrum"})
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
        Dataset folder to create. An existing one is refused unless ``force=True``.
    workers:
        Reader processes (default: the machine's core count, at most 8). 1 reads in this process.
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
        for spectra, skipped in results:
            report.skipped.extend(skipped)
            writer.write_many(spectra)
        report.spectra = dict(sorted(writer.counts.items()))
    report.seconds = round(time.perf_counter() - t0, 2)
    _write_json_atomic(out / "ingest_report.json", report.to_json())
    return report


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


def _write_json_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
