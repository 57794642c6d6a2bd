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
``_ingest_report.json`` beside its manifest. An ingest that reads no spectrum at all (a mistyped
source) raises :class:`NothingToIngestError` and writes nothing.

Ingest at scale
    ``ingest(sources, "PART-3", part=(3, 100))`` reads only part 3 of 100: a contiguous block of
    the sorted file list (:func:`part_of`), so any scheduler (a Slurm array, Dask, Ray) can run the
    parts independently, on any machines. :func:`merge` then joins the part datasets into one:
    it checks them (one format and schema version, one split rule, every part present once),
    drops a record a previous part already holds by the rule ingest itself uses
    (:class:`DuplicateRule`: the same key, or the same pixels under another key; reported, the
    first kept), resolves star ids over all parts and writes the dataset atomically (the parts are
    only read). The merged dataset has the keys, star ids and train/validation/test splits a single
    ingest of the same files gives. Each dataset ingest writes carries ``_ingest_records.jsonl``
    (one line per record: key, file, pixel digest, and what it says about its star before
    resolution), which is what lets parts be merged exactly.

Speed
    Files are identified and read by a pool of worker processes started once (forked after the
    readers are imported), side by side (a unit is read as soon as its first file is identified),
    in chunks with a bounded number in flight (tasks, or bytes of the files being read), so memory
    does not grow with the number of files; workers also hash the pixels for the duplicate rule
    and make the records file's lines. A task's files become one set of rows; a table of more than
    :data:`ROWS_PER_TASK` rows is read in blocks of rows by all workers. Each file is looked at
    once: identification keeps the outcome of the checks made before reading on a compact peek
    (:func:`~stellarfield.io.registry.classify_peek`), which the read is given; plain FITS headers,
    images and tables are parsed without astropy (:mod:`stellarfield.io.fits_cards`). The main
    process only writes, each result as soon as it and every earlier one are in (a background
    thread compresses the shards). ``benchmarks/ingest.py`` measures the throughput against a plain
    astropy read of the same files in the same run.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib
import itertools
import json
import os
import platform
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from stellarfield.data.stars import StarIdentity, identity_of
from stellarfield.data.store import (ROW_GROUP_ROWS, Dataset, DatasetWriter, GridRows, _to_json, check_serialisable,
                                     grid_rows_to_batch, spectra_to_batch)
from stellarfield.errors import StellarfieldError
from stellarfield.io.errors import SpectrumReadError
from stellarfield.io.peek import FilePeek
from stellarfield.io.registry import classify_peek, get_reader, read_rows, read_spectra, unit_key
from stellarfield.paths import real_path
from stellarfield.spectrum import Spectrum

#: The source name that stands for the spectra the ``[demo]`` extra installs.
DEMO_SOURCE = "demo"
#: File names that are never spectra, whatever their content (version control, OS litter).
IGNORED_NAMES = {".DS_Store", "Thumbs.db", ".gitignore", ".gitattributes"}
#: The report ingest and merge write beside the manifest (``_``: not a Parquet file to dataset readers).
REPORT_NAME = "_ingest_report.json"
#: One JSON line per record written (see the module docstring); what merge needs from a part.
RECORDS_NAME = "_ingest_records.jsonl"


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
    part: list[int] | None = None  # [index, count] for one part of a split ingest
    merged_from: list[str] = field(default_factory=list)

    @property
    def n_spectra(self) -> int:
        return sum(self.spectra.values())

    def to_json(self) -> str:
        out = asdict(self)
        out["n_spectra"] = self.n_spectra
        return json.dumps(out, indent=2, sort_keys=False)

    def summary(self) -> str:
        what = f"part {self.part[0]} of {self.part[1]}: " if self.part else ""
        verb = f"merged {len(self.merged_from)} parts:" if self.merged_from else "ingested"
        rate = f" ({self.n_spectra / self.seconds:.0f} spectra/s)" if self.seconds > 0 else ""
        lines = [f"{what}{verb} {self.n_spectra} spectra from {self.n_files} files in {self.seconds:.1f} s{rate} "
                 f"-> {self.dataset}"]
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
    real_path.cache_clear()  # folders resolved afresh: a link may point elsewhere since the last call
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
        r = real_path(f)
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
    return _classify_file(path)[:3]


def _classify_file(path: Path) -> tuple[str, str, str, FilePeek | None]:
    """:func:`classify_file` and, for a spectrum, the (compact) peek it was identified from, for
    :func:`read_unit`: each file is looked at once (:func:`~stellarfield.io.registry.classify_peek`)."""
    try:
        kind, what, peek = classify_peek(path)
    except SpectrumReadError as exc:
        return "skipped", exc.reason, "", None
    except OSError as exc:
        return "skipped", f"cannot read the file ({_os_reason(exc)})", "", None
    except Exception as exc:  # pragma: no cover - a reader bug must not abort the batch
        return "skipped", f"unexpected {type(exc).__name__}: {exc}", "", None
    if kind == "auxiliary":
        return "auxiliary", what, "", None
    return "spectrum", what, unit_key(path, what), peek


def spectra_from_sources(sources: Sequence[str | Path], on_skip=None) -> Iterator[Spectrum]:
    """Stream the spectra under ``sources`` in this process, one observation unit at a time.

    Like :func:`ingest` without writing a dataset: auxiliary files are passed over, and each file
    that should have been a spectrum but could not be read is given to ``on_skip({"file", "reason"})``.
    """
    files, missing = expand_sources(sources)
    skipped = list(missing)
    seen: set[str] = set()
    for path in files:
        kind, what, key, peek = _classify_file(path)
        if kind == "skipped":
            skipped.append({"file": str(path), "reason": what})
        elif kind == "spectrum" and f"{what}:{key}" not in seen:
            seen.add(f"{what}:{key}")
            spectra, bad = read_unit(path, what, peek=peek)
            skipped.extend(bad)
            yield from spectra
        while on_skip is not None and skipped:
            on_skip(skipped.pop(0))
    while on_skip is not None and skipped:  # sources that do not exist, when no file was found at all
        on_skip(skipped.pop(0))


def read_unit(path: Path, fmt: str, peek: FilePeek | None = None) -> tuple[list[Spectrum], list[dict[str, str]]]:
    """Read one observation unit; never raises. Records with no good pixel are skipped with a reason.
    ``peek``: the file's peek from its identification (not made again)."""
    try:
        spectra = read_spectra(path, format=fmt, peek=peek)
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


def part_of(files: Sequence[Path], index: int, count: int) -> list[Path]:
    """Part ``index`` (0-based) of ``count`` of a file list: a contiguous block of the list, the
    blocks differing in length by at most one file. The same list and ``count`` always give the
    same blocks, which together hold every file exactly once."""
    if not (isinstance(index, int) and isinstance(count, int) and 0 <= index < count):
        raise ValueError(f"part must be INDEX/COUNT with 0 <= INDEX < COUNT, got {index}/{count}")
    n = len(files)
    return list(files[index * n // count : (index + 1) * n // count])


class DuplicateRule:
    """The one rule for a second copy of an observation, used by :func:`ingest` and :func:`merge`.

    A record is a duplicate of one already kept when it has the same key, or the same pixels
    (wavelength, flux, ivar, mask of every segment, by digest) under another key (a copy whose id
    comes from its file name). The first one kept stays; the duplicate is reported with the file
    that was kept.
    """

    def __init__(self):
        self._kept: dict = {}  # key and pixel digest -> (key, file, digest) of the copy kept

    def duplicate(self, key: str, digest: str, file: str) -> dict[str, str] | None:
        """The report entry (``{"file", "key", "kept", "reason"}``) if this record is a duplicate, else None."""
        first = self._kept.get(key) or self._kept.get(digest)
        if first is None:
            return None
        kept_key, kept, kept_digest = first
        if kept_key != key:
            what = f"the same pixels as {kept_key}"
        else:
            what = "an identical copy" if digest == kept_digest else "different pixels under the same key"
        return {"file": file, "key": key, "kept": kept, "reason": f"{key}: already read from {kept} ({what}); kept that one"}

    def keep(self, key: str, digest: str, file: str) -> None:
        self._kept[key] = self._kept[digest] = (key, file, digest)


def pixel_digest(spectrum: Spectrum) -> str:
    """A 128-bit BLAKE2b digest (hex) of every segment's wavelength, flux, ivar and mask bytes."""
    h = hashlib.blake2b(digest_size=16)
    for seg in spectrum.segments:
        for array in (seg.wavelength, seg.flux, seg.ivar, seg.mask):
            h.update(np.ascontiguousarray(array))
    return h.hexdigest()


def grid_pixel_digests(rows: GridRows) -> list[str]:
    """:func:`pixel_digest` of the record each row of ``rows`` stands for (one segment, the shared
    wavelengths hashed once and the hash state copied per row)."""
    shared = hashlib.blake2b(digest_size=16)
    shared.update(np.ascontiguousarray(rows.wavelength))
    digests = []
    for flux, ivar, mask in zip(rows.flux, rows.ivar, rows.mask):
        h = shared.copy()
        for array in (flux, ivar, mask):
            h.update(np.ascontiguousarray(array))
        digests.append(h.hexdigest())
    return digests


def _record_line(key: str, file: str, digest: str, identity: StarIdentity) -> str:
    """One line of :data:`RECORDS_NAME`: the text ``json.dumps`` gives of ``{"key", "file", "digest",
    "candidates", "links", "position"}``, written out here (a third of its time, once per record)."""
    position = f"[{float(identity.ra_deg)!r}, {float(identity.dec_deg)!r}]" if identity.has_position else "null"
    return (f'{{"key": {_json_str(key)}, "file": {_json_str(file)}, "digest": {_json_str(digest)}, '
            f'"candidates": [{", ".join(map(_json_str, identity.candidates))}], '
            f'"links": [{", ".join(map(_json_str, sorted(identity.link_names)))}], "position": {position}}}')


#: A string as JSON text, as ``json.dumps`` writes it (ASCII, escaped).
_json_str = json.encoder.encode_basestring_ascii


def _parse_record_line(line: str) -> tuple[str, str, str, StarIdentity]:
    r = json.loads(line)
    ra, dec = r["position"] if r["position"] else (float("nan"), float("nan"))
    return r["key"], r["file"], r["digest"], StarIdentity(tuple(r["candidates"]), frozenset(r["links"]), ra, dec)


def ingest(
    sources: Sequence[str | Path],
    out: str | Path,
    *,
    force: bool = False,
    workers: int | None = None,
    progress: bool = True,
    shard_size: int = 4096,
    part: tuple[int, int] | None = None,
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
    part:
        ``(index, count)``: read only part ``index`` (0-based) of ``count`` of the file list
        (:func:`part_of`), into a part dataset for :func:`merge`. A part with no spectrum is still
        written (empty), so that merge sees every part.

    Raises :class:`NothingToIngestError` (nothing written) when no spectrum could be read (not for a part).
    """
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    out = Path(out)
    workers = workers or min(8, os.cpu_count() or 1)
    report = IngestReport(sources=[str(s) for s in sources], dataset=str(out), part=list(part) if part else None)
    metadata = {"sources": report.sources, "python": platform.python_version()}
    # Open the writer first: an existing dataset is refused before any work is done.
    with DatasetWriter(out, overwrite=force, shard_size=shard_size, metadata=metadata) as writer:
        files, missing = expand_sources(sources)
        if part is not None:
            n_total = len(files)
            files = part_of(files, *part)
            writer.metadata["part"] = {"index": part[0], "count": part[1], "files": len(files), "files_total": n_total}
            if part[0] != 0:
                missing = []  # reported once, by part 0
        report.skipped.extend(missing)
        report.n_files = len(files)

        with _worker_pool(workers) as pool:
            # files are identified and read by the same workers, side by side: a unit is read as soon
            # as its first file is identified (the first file, a 40,000-star table, need not wait
            # for the 1,000 files after it to be identified)
            classified = _map(pool, _classify_files, files, False, "identifying files", "file", tqdm)
            _import_in_background("scipy.spatial")  # star resolution's KD-tree, needed at close()
            rule = DuplicateRule()
            records: list[str] = []
            read = functools.partial(_read_units, spill_dir=str(writer.scratch))
            results = _map(pool, read, _units(files, classified, report), progress, "reading spectra",
                           "file", tqdm, count=lambda unit: len(unit.keys), chunk=READ_CHUNK, size=_file_bytes,
                           n_items=len(files), files=lambda unit: int(unit.last))
            reported: set[tuple[str, str]] = set()
            for unit in results:
                for skip in unit.skipped:  # (a table's blocks each meet a fault of the whole file: said once)
                    if (skip["file"], skip["reason"]) not in reported:
                        reported.add((skip["file"], skip["reason"]))
                        report.skipped.append(skip)
                _write_unit(writer, unit, rule, report, records)
        report.spectra = dict(sorted(writer.counts.items()))
        if report.n_spectra == 0 and part is None:  # leaves the with block by an exception: nothing is written
            raise NothingToIngestError(report, out)
        report.seconds = round(time.perf_counter() - t0, 2)
        writer.add_file(RECORDS_NAME, "".join(line + "\n" for line in records))
        writer.add_file(REPORT_NAME, report.to_json())  # lands with the dataset, or not at all
    return report


def _import_in_background(module: str) -> None:
    """Import ``module`` in a daemon thread: the writing process spends the first seconds of an
    ingest waiting for the workers' first results, and an import then is off the critical path. A
    failed import is left to the code that needs the module to report."""

    def run() -> None:
        try:
            importlib.import_module(module)
        except ImportError:
            pass

    threading.Thread(target=run, name="stellarfield-import", daemon=True).start()


@dataclass
class _UnitRows:
    """What a worker read from one observation unit, ready to write: the records as rows of the
    dataset's schema (None when there are none), and per row its key, file, pixel digest and what
    it says about its star; the files or records skipped, with reasons."""

    rows: object  # pa.RecordBatch, _GridBatch (made into one by the writing process) or None
    keys: list[str]
    files: list[str]
    digests: list[str]
    identities: list[StarIdentity]
    skipped: list[dict[str, str]]
    lines: list[str] = field(default_factory=list)  # per row, its RECORDS_NAME line (made here, in the worker)

    def __post_init__(self):
        if not self.lines:
            self.lines = [_record_line(*entry) for entry in zip(self.keys, self.files, self.digests, self.identities)]

    def batch(self):
        """The rows as a ``pa.RecordBatch`` (None when there are none)."""
        return self.rows.batch() if isinstance(self.rows, _GridBatch) else self.rows


def _first_copies(entries, rule: DuplicateRule, report: IngestReport, records: list[str],
                  lines: Sequence[str] | None = None) -> list[int]:
    """Indices of the ``(key, file, digest, identity)`` entries to write: a duplicate of a row already
    kept (:class:`DuplicateRule`) is reported and left out, a kept one gets its :data:`RECORDS_NAME`
    line (``lines[i]`` when given, already made)."""
    keep = []
    for i, (key, file, digest, identity) in enumerate(entries):
        duplicate = rule.duplicate(key, digest, file)
        if duplicate is not None:
            report.duplicates.append(duplicate)
            continue
        rule.keep(key, digest, file)
        keep.append(i)
        records.append(lines[i] if lines is not None else _record_line(key, file, digest, identity))
    return keep


def _write_unit(writer: DatasetWriter, unit: _UnitRows, rule: DuplicateRule, report: IngestReport,
                records: list[str]) -> None:
    """Write a unit's rows but the duplicates (:class:`DuplicateRule`: reported, the first kept);
    append a :data:`RECORDS_NAME` line per row written."""
    keep = _first_copies(zip(unit.keys, unit.files, unit.digests, unit.identities), rule, report, records, unit.lines)
    if keep:
        rows = unit.batch()
        rows = rows if len(keep) == len(unit.keys) else rows.take(keep)
        writer.write_batch(rows, [unit.identities[i] for i in keep])


#: A table of more rows than this (40,226 Gaia XP spectra) is read in blocks of this many rows, by
#: the workers side by side, and written block by block as they come (the blocks together are the
#: records of a whole read, in order). Blocks of a few thousand rows also keep each block's
#: arrays in the processor's cache: 40,226 XP rows read in 8 blocks take a third of one read.
ROWS_PER_TASK = 4096


@dataclass(frozen=True)
class _Unit:
    """One read task's item: an observation unit (its first file, its format and peek), or a block
    of rows of a table (``rows``, of the ``peek.n_rows`` the table holds)."""

    path: Path
    fmt: str
    peek: FilePeek | None
    rows: slice | None = None

    @property
    def fraction(self) -> float:
        """The share of its file's bytes this item reads."""
        return 1.0 if self.rows is None else (self.rows.stop - self.rows.start) / self.peek.n_rows

    @property
    def last(self) -> bool:
        """Whether the file counts as read once this item is (a table's last block)."""
        return self.rows is None or self.rows.stop == self.peek.n_rows


def _units(files: list[Path], classified: Iterator, report: IngestReport) -> Iterator[_Unit]:
    """The observation units to read, in file order, as the files are identified (``classified``:
    :func:`_classify_file` of each file, in order): each unit once, with the first of its files,
    a table of more than :data:`ROWS_PER_TASK` rows as blocks of rows; auxiliary and skipped files
    go into ``report``."""
    seen: set[tuple[str, str]] = set()
    for path, (kind, what, key, peek) in zip(files, classified):
        if kind == "auxiliary":
            report.auxiliary.append({"file": str(path), "kind": what})
        elif kind == "skipped":
            report.skipped.append({"file": str(path), "reason": what})
        elif (what, key) not in seen:
            seen.add((what, key))
            n_rows = peek.n_rows if peek is not None else None
            if n_rows is None or n_rows <= ROWS_PER_TASK:
                yield _Unit(path, what, peek)
                continue
            for start in range(0, n_rows, ROWS_PER_TASK):
                yield _Unit(path, what, peek, slice(start, min(start + ROWS_PER_TASK, n_rows)))


def _file_bytes(unit: _Unit) -> int:
    """Bytes of the file a unit reads (0 if it cannot be stat'ed: its read will say why)."""
    try:
        return int(unit.path.stat().st_size * unit.fraction)
    except OSError:
        return 0


# --- worker processes --------------------------------------------------------------------------
def _classify_files(paths: list[Path]) -> list[tuple[str, str, str, FilePeek | None]]:
    return [_classify_file(path) for path in paths]


def _read_units(units: list[_Unit], spill_dir: str | None = None) -> list[_UnitRows]:
    """Read observation units into rows (the per-record work of ingest, done here in parallel:
    pixels to Arrow, digests, star identities); a record the store cannot hold is skipped with the
    reason. A reader with a columnar path (``Reader.read_rows``: a table of records on one grid)
    is read by it, without one :class:`Spectrum` per row; the rows are the same."""
    out: list[_UnitRows] = []
    for columnar, group in itertools.groupby(units, key=lambda unit: get_reader(unit.fmt).read_rows is not None):
        if columnar:
            out.extend(_read_rows_unit(unit.path, unit.fmt, unit.peek, spill_dir, unit.rows) for unit in group)
        else:  # consecutive units of records become one set of rows: a tenth of the work per record
            out.append(_read_spectra_units(list(group)))
    return out


def _read_spectra_units(units: list[_Unit]) -> _UnitRows:
    """Units of :func:`_read_units` read as :class:`Spectrum` records, into one set of rows (in order)."""
    good: list[Spectrum] = []
    skipped: list[dict[str, str]] = []
    for unit in units:
        spectra, bad = read_unit(unit.path, unit.fmt, unit.peek)
        skipped.extend(bad)
        for spectrum in spectra:
            try:
                check_serialisable(spectrum)
            except ValueError as exc:
                skipped.append({"file": str(spectrum.provenance.get("file", unit.path)), "reason": str(exc)})
                continue
            good.append(spectrum)
    identities = [identity_of(s) for s in good]
    rows = spectra_to_batch(good, ["train"] * len(good), [i.star_id for i in identities]) if good else None
    return _UnitRows(rows, [s.key for s in good], [str(s.provenance.get("file", "unknown file")) for s in good],
                     [pixel_digest(s) for s in good], identities, skipped)


#: A table's pixels above this many bytes go from a worker to the writing process through a
#: temporary file rather than the pipe (:class:`_GridBatch`).
SPILL_BYTES = 1 << 20
PIXEL_ARRAYS = ("flux", "ivar", "mask")


@dataclass
class _GridBatch:
    """The rows of a table read by a columnar reader, still as the table
    (:class:`~stellarfield.data.store.GridRows`): a worker sends this to the writing process, which
    makes the rows (:meth:`batch`, ~0.1 s for 40,000 Gaia XP spectra). Half the bytes of the rows
    themselves, which repeat the wavelengths in every row (124 against 243 MB for that table).
    Pixels above :data:`SPILL_BYTES` travel through a temporary file in ``spill_dir`` (the
    dataset's hidden folder: it goes with an aborted ingest), deleted once read: the pipe between
    the processes took 1.3 s for that table, 0.7-0.9 s with the file (and everything else pickled).
    Where the file cannot be written
    (a full disk), the pixels go through the pipe."""

    table: GridRows
    star_ids: list[str | None]
    meta_json: list[str]
    spill_dir: str | None = None

    def batch(self):
        return grid_rows_to_batch(self.table, ["train"] * len(self.table), self.star_ids, self.meta_json)

    def __getstate__(self):
        table = self.table
        if self.spill_dir is None or sum(getattr(table, name).nbytes for name in PIXEL_ARRAYS) <= SPILL_BYTES:
            return dict(self.__dict__)
        try:
            fd, spill = tempfile.mkstemp(prefix="_spill-", suffix=".npy", dir=self.spill_dir)
        except OSError:
            return dict(self.__dict__)
        try:
            with os.fdopen(fd, "wb") as fh:
                for name in PIXEL_ARRAYS:
                    np.save(fh, getattr(table, name), allow_pickle=False)
        except OSError:
            os.unlink(spill)
            return dict(self.__dict__)
        light = copy.copy(table)
        for name in PIXEL_ARRAYS:
            setattr(light, name, None)
        return {**self.__dict__, "table": light, "_spill": spill}

    def __setstate__(self, state):
        spill = state.pop("_spill", None)
        self.__dict__.update(state)
        if spill is not None:
            try:
                with open(spill, "rb") as fh:
                    for name in PIXEL_ARRAYS:
                        setattr(self.table, name, np.load(fh, allow_pickle=False))
            finally:
                os.unlink(spill)


class _Names:
    """What :func:`~stellarfield.data.stars.identity_of` looks at in a record (no pixels)."""

    __slots__ = ("star_id", "object_id", "meta")

    def __init__(self, object_id: str, meta: dict):
        self.star_id, self.object_id, self.meta = None, object_id, meta


def _read_rows_unit(path: Path, fmt: str, peek: FilePeek | None, spill_dir: str | None = None,
                    rows: slice | None = None) -> _UnitRows:
    """:func:`_read_units` for a reader with a columnar path (:func:`~stellarfield.io.registry.read_rows`):
    the same rows, digests, identities and skipped records as reading one :class:`Spectrum` per
    row would give, built column by column (of the table's rows ``rows`` only, when given)."""
    try:
        table = read_rows(path, fmt, peek=peek, rows=rows)
    except SpectrumReadError as exc:
        return _UnitRows(None, [], [], [], [], [{"file": str(path), "reason": exc.reason}])
    except OSError as exc:
        return _UnitRows(None, [], [], [], [], [{"file": str(path), "reason": f"cannot read the file ({_os_reason(exc)})"}])
    except Exception as exc:  # pragma: no cover - a reader bug must not abort the batch
        return _UnitRows(None, [], [], [], [], [{"file": str(path), "reason": f"unexpected {type(exc).__name__}: {exc}"}])
    skipped: list[dict[str, str]] = []
    if not len(table):  # (a block of a table may hold only repeats of earlier rows: nothing to say)
        if rows is None:
            skipped.append({"file": str(path), "reason": f"the {fmt} reader found no spectrum in the file"})
        return _UnitRows(None, [], [], [], [], skipped)
    keys = table.keys
    good = table.mask.any(axis=1)
    for i in np.flatnonzero(~good).tolist():  # as read_unit: records with no good pixel are skipped
        why = table.meta[i].get("quality_reason")
        skipped.append({"file": str(path), "reason": f"{keys[i]}: no good pixel in the spectrum"
                        + (f" ({why})" if why else "")})
    keep, meta_json = [], []
    for i in np.flatnonzero(good).tolist():  # as check_serialisable (provenance: a str file name and HDU)
        try:
            meta_json.append(_to_json(table.meta[i]))
        except (TypeError, ValueError) as exc:
            skipped.append({"file": table.provenance_file,
                            "reason": f"{keys[i]}: meta and provenance must be JSON-serialisable ({exc})"})
            continue
        keep.append(i)
    if not keep:
        return _UnitRows(None, [], [], [], [], skipped)
    if len(keep) != len(table):
        table = table.take(keep)
        keys = [keys[i] for i in keep]
    identities = [identity_of(_Names(o, m)) for o, m in zip(table.object_ids, table.meta)]
    table.meta = []  # sent as meta_json; the table is not validated again
    rows = _GridBatch(table, [i.star_id for i in identities], meta_json, spill_dir)
    return _UnitRows(rows, keys, [table.provenance_file] * len(keys), grid_pixel_digests(table), identities, skipped)


class _InProcess(Executor):
    """Runs each task at once in this process (``workers=1``)."""

    def submit(self, fn, /, *args, **kwargs):
        from concurrent.futures import Future

        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # pragma: no cover - the task functions never raise
            future.set_exception(exc)
        return future


def _worker_pool(workers: int) -> Executor:
    """``workers`` processes, started once for every phase and at once (a process pool forks them
    at its first task): the readers are imported first so that forked workers inherit them
    instead of importing them each, and no thread the ingest starts later (a background import)
    can be halfway through an import when a worker is forked."""
    if workers <= 1:
        return _InProcess()
    from stellarfield.io.registry import _ensure_loaded

    _ensure_loaded()
    pool = ProcessPoolExecutor(max_workers=workers)
    pool.submit(int).result()
    return pool


#: Files per task given to a worker: identifying a file is cheap (big chunks keep the pickling
#: overhead small), reading one can be long (small chunks keep the workers evenly loaded).
CLASSIFY_CHUNK, READ_CHUNK = 32, 16
#: Tasks in flight per worker, and bytes of the files being read in flight. Results are written in
#: file order (the dataset does not depend on timing), so a slow file (one holding 40,000 Gaia XP
#: spectra) holds back writing while the other workers read ahead: up to this many tasks each, or
#: more while the files in flight hold at most :data:`READ_AHEAD_BYTES` (small files: MILES' 984
#: are 37 MB, so all are read while the Gaia XP table is). It bounds the results kept in memory,
#: whatever the number of files.
TASKS_AHEAD = 32
READ_AHEAD_BYTES = 256 << 20
#: A task stops taking items once their files hold this many bytes: a large file (a block of a
#: table) is a task of its own, so that the workers share it out.
TASK_BYTES = 4 << 20


def _map(pool: Executor, fn: Callable[[list], list], items: Iterable, progress: bool, desc: str, unit: str, tqdm,
         count: Callable | None = None, chunk: int = CLASSIFY_CHUNK, size: Callable | None = None,
         n_items: int | None = None, ahead: int | None = None, files: Callable | None = None) -> Iterator:
    """``fn`` over ``items`` (a list, or an iterator of at most ``n_items``) in chunks of at most
    ``chunk`` (and of about :data:`TASK_BYTES` by ``size(item)``, bytes), results in order, with a
    progress bar (items per second, or ``files(item)`` summed when given; and ``count(result)``
    summed as spectra when given). At most ``ahead`` (default :data:`TASKS_AHEAD`) chunks per
    worker are in flight, or more while their items' sizes add up to at most
    :data:`READ_AHEAD_BYTES`, so memory holds a bounded number of results whatever the number of items."""
    n_workers = getattr(pool, "_max_workers", 1)
    ahead = TASKS_AHEAD if ahead is None else ahead
    n_items = len(items) if n_items is None else n_items
    chunk = max(1, min(chunk, n_items // (8 * n_workers) or 1))
    bar = tqdm(total=n_items, desc=desc, unit=unit, disable=not progress, dynamic_ncols=True)
    try:
        pending: deque = deque()
        in_flight = 0
        items = iter(items)
        while block := _next_block(items, chunk, size):
            block, weight = block
            done = sum(map(files, block)) if files is not None else len(block)
            pending.append((done, weight, pool.submit(fn, block)))
            in_flight += weight
            # results ready in order are written at once, while the workers have tasks enough queued
            while len(pending) > 2 * n_workers and pending[0][2].done():
                in_flight -= yield from _drain_one(pending, bar, count)
            if len(pending) < ahead * n_workers or (size is not None and in_flight <= READ_AHEAD_BYTES):
                continue
            in_flight -= yield from _drain_one(pending, bar, count)
        while pending:
            yield from _drain_one(pending, bar, count)
        bar.total = bar.n  # fewer than n_items (files of one unit)
    finally:
        bar.close()


def _next_block(items: Iterator, chunk: int, size: Callable | None) -> tuple[list, int] | None:
    """The next task's items (up to ``chunk``, ending early once their ``size`` reaches
    :data:`TASK_BYTES`) and their size in bytes; None when there are no more items."""
    block, n_bytes = [], 0
    for item in items:
        block.append(item)
        n_bytes += size(item) if size is not None else 0
        if len(block) >= chunk or n_bytes >= TASK_BYTES:
            break
    return (block, n_bytes) if block else None


def _drain_one(pending: deque, bar, count: Callable | None) -> Iterator:
    """Yield the results of the oldest task in flight; returns its size in bytes (see :func:`_map`)."""
    n_items, weight, future = pending.popleft()
    results = future.result()
    for result in results:
        yield result
    if count is not None:
        bar.n_spectra = getattr(bar, "n_spectra", 0) + sum(count(r) for r in results)
        elapsed = bar.format_dict.get("elapsed") or 0
        bar.set_postfix_str(f"{bar.n_spectra} spectra"
                            + (f", {bar.n_spectra / elapsed:.0f} spectra/s" if elapsed else ""), refresh=False)
    bar.update(n_items)
    return weight


# --- merging parts ------------------------------------------------------------------------------
class MergeError(StellarfieldError):
    """Part datasets that cannot be merged (the reason names the part); nothing was written."""


def merge(
    parts: Sequence[str | Path],
    out: str | Path,
    *,
    force: bool = False,
    progress: bool = True,
    shard_size: int = 4096,
) -> IngestReport:
    """Merge datasets written by ``ingest(..., part=(i, n))`` (or whole ingests) into one at ``out``.

    The parts are checked first (:class:`MergeError` naming the part and the reason: not a
    complete dataset, another format or schema version or split rule, no :data:`RECORDS_NAME`, a
    part missing or given twice, parts of different splits of the sources). Rows are copied in
    part order; a record an earlier part already holds is dropped and reported
    (:class:`DuplicateRule`, as ingest does); star ids are resolved over all parts and the splits
    drawn from them, so the result equals a single ingest of the same files. The dataset is
    written atomically: on any failure nothing is left at ``out`` (an existing dataset there is
    replaced only with ``force``, once the new one is complete), and the parts are never modified.
    """
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    out = Path(out)
    datasets = _checked_parts(parts, out)
    reports = [json.loads((ds.path / REPORT_NAME).read_text()) if (ds.path / REPORT_NAME).is_file() else {}
               for ds in datasets]
    sources = reports[0].get("sources", []) if reports else []
    report = IngestReport(sources=sources, dataset=str(out), merged_from=[str(ds.path) for ds in datasets])
    rule_manifest = datasets[0].manifest.get("split_rule", {})
    metadata = {"sources": sources, "python": platform.python_version(), "merged_from": report.merged_from}
    seen_skipped: set = set()
    for part_report in reports:
        report.n_files += int(part_report.get("n_files", 0))
        report.auxiliary.extend(part_report.get("auxiliary", []))
        report.duplicates.extend(part_report.get("duplicates", []))
        for entry in part_report.get("skipped", []):
            if (entry["file"], entry["reason"]) not in seen_skipped:
                seen_skipped.add((entry["file"], entry["reason"]))
                report.skipped.append(entry)

    rule = DuplicateRule()
    records: list[str] = []
    writer_args = dict(overwrite=force, shard_size=shard_size, metadata=metadata)
    if rule_manifest:
        writer_args.update(split_fractions=rule_manifest["fractions"], split_salt=rule_manifest["salt"])
    bar = tqdm(total=sum(len(ds) for ds in datasets), desc="merging", unit="spectra", disable=not progress,
               dynamic_ncols=True)
    try:
        with DatasetWriter(out, **writer_args) as writer:
            for ds in datasets:
                part_records = _read_records(ds)
                for batch in ds.iter_batches(batch_size=ROW_GROUP_ROWS):
                    entries = []
                    for key in batch.column("key").to_pylist():
                        if key not in part_records:
                            raise MergeError(f"{ds.path / RECORDS_NAME}: no record of row {key!r}; the part is "
                                             "damaged: ingest it again")
                        entries.append((key, *part_records[key]))
                    keep = _first_copies(entries, rule, report, records)
                    rows = batch if len(keep) == batch.num_rows else batch.take(keep)
                    if rows.num_rows:
                        writer.write_batch(rows, [entries[i][3] for i in keep])
                    bar.update(batch.num_rows)
            report.spectra = dict(sorted(writer.counts.items()))
            if report.n_spectra == 0:
                raise NothingToIngestError(report, out)
            report.seconds = round(time.perf_counter() - t0, 2)
            writer.add_file(RECORDS_NAME, "".join(line + "\n" for line in records))
            writer.add_file(REPORT_NAME, report.to_json())
    finally:
        bar.close()
    return report


def _checked_parts(parts: Sequence[str | Path], out: Path) -> list[Dataset]:
    """The parts as datasets, in part order, after checking that they can be merged."""
    if not parts:
        raise MergeError("no part datasets to merge")
    datasets = []
    for path in parts:
        path = Path(path)
        if path.resolve() == out.resolve():
            raise MergeError(f"{path}: a part cannot also be the output of the merge")
        try:
            ds = Dataset(path)
        except (OSError, StellarfieldError) as exc:
            raise MergeError(f"cannot merge: {exc}") from exc
        if not (ds.path / RECORDS_NAME).is_file():
            raise MergeError(f"{path}: has no {RECORDS_NAME}; only datasets written by 'stellarfield ingest' "
                             "(this version or later) can be merged: ingest its files again")
        datasets.append(ds)
    first = datasets[0]
    for ds in datasets[1:]:
        for what, key in (("format version", "version"), ("schema version", "schema_version"),
                          ("split rule", "split_rule")):
            if ds.manifest.get(key) != first.manifest.get(key):
                raise MergeError(f"{ds.path}: {what} {ds.manifest.get(key)!r} differs from {first.path}'s "
                                 f"{first.manifest.get(key)!r}; ingest the parts with one stellarfield version and rule")
    split_info = [ds.metadata.get("part") for ds in datasets]
    if not any(split_info):
        return datasets
    if not all(split_info):
        whole = [str(ds.path) for ds, info in zip(datasets, split_info) if not info]
        raise MergeError(f"{whole[0]}: not a part (ingest --part), but the others are; merge parts of one split ingest")
    count = split_info[0]["count"]
    by_index: dict[int, Dataset] = {}
    for ds, info in zip(datasets, split_info):
        if info["count"] != count or ds.metadata.get("sources") != first.metadata.get("sources") \
                or info.get("files_total") != split_info[0].get("files_total"):
            raise MergeError(f"{ds.path}: part {info['index']}/{info['count']} of sources "
                             f"{ds.metadata.get('sources')} ({info.get('files_total')} files) is not from the same split as "
                             f"{first.path} (part {split_info[0]['index']}/{count} of {first.metadata.get('sources')}, "
                             f"{split_info[0].get('files_total')} files)")
        if info["index"] in by_index:
            raise MergeError(f"{ds.path}: part {info['index']}/{count} given twice (also {by_index[info['index']].path})")
        by_index[info["index"]] = ds
    missing = [i for i in range(count) if i not in by_index]
    if missing:
        raise MergeError(f"part(s) {', '.join(f'{i}/{count}' for i in missing)} missing (given: "
                         f"{', '.join(f'{i}/{count}' for i in sorted(by_index))}); run them, then merge all {count}")
    return [by_index[i] for i in range(count)]


def _read_records(ds: Dataset) -> dict[str, tuple[str, str, StarIdentity]]:
    """key -> (file, pixel digest, identity) from a dataset's :data:`RECORDS_NAME`, checked against its rows."""
    records: dict[str, tuple[str, str, StarIdentity]] = {}
    path = ds.path / RECORDS_NAME
    with open(path) as fh:
        for number, line in enumerate(fh, 1):
            try:
                key, file, digest, identity = _parse_record_line(line)
            except (ValueError, KeyError, TypeError) as exc:
                raise MergeError(f"{path}: line {number} is not a record ({type(exc).__name__}: {exc})") from None
            records[key] = (file, digest, identity)
    if len(records) != len(ds):
        raise MergeError(f"{path}: {len(records)} records for {len(ds)} rows; the part is damaged: ingest it again")
    return records
