"""The dataset store: spectra on disk as Parquet shards, read back as a stream.

A dataset is a folder::

    my_dataset/
        shard-00000.parquet     one row per Spectrum, zstd-compressed, row groups of <= 256 rows
        shard-00001.parquet
        ...
        _manifest.json          written last: its presence with "complete": true marks a finished dataset
        _ingest_report.json     (from ingest) what was read, skipped and why

Each row holds one :class:`~stellarfield.spectrum.Spectrum` exactly: its identifiers, its
labels as typed nullable columns (``label_teff`` ...), and all its segments' pixels concatenated
in ragged list columns (``wavelength``, ``flux``, ``ivar``, ``mask``, ``lsf_fwhm``) with the
segment names and lengths alongside, so every segment keeps its own native grid. Reading a row
back gives an identical record (same arrays, dtypes, labels, meta).

Writing is atomic. :class:`DatasetWriter` writes into a hidden sibling folder and renames it into
place only when every shard and the manifest are on disk, so an interrupted or failed ingest never
leaves something at the target path that looks like a dataset. The writing thread only gathers
rows into row groups: background threads (one per shard, :data:`BACKGROUND_THREADS` in turn)
encode and compress them into the Parquet shards while the writing goes on, with the star ids the
rows give, and at ``close()`` only a shard whose rows' star ids change when they are resolved is
written again.

Plain Parquet. The shards are ordinary Parquet files and the folder is an ordinary Parquet dataset
that any Parquet reader opens without stellarfield: ``pyarrow.dataset.dataset("DS")``, DuckDB
``read_parquet('DS/*.parquet')``, ``dask.dataframe.read_parquet("DS")``, Spark
``spark.read.parquet("DS")``. The manifest and reports start with ``_``, the prefix those readers
skip as metadata (the Hive/Spark convention, e.g. ``_SUCCESS``). Datasets written before this
layout name the manifest ``manifest.json`` (:data:`LEGACY_MANIFEST_NAME`); they are read the same.

Reading streams. :class:`Dataset` never loads the whole dataset: ``iter_batches`` and
``iter_spectra`` read one Parquet row group at a time (``pyarrow.parquet.ParquetFile.iter_batches``)
and filter each batch by split and product, so memory stays flat however large the dataset is.

The train/validation/test split is assigned on write from the star's id
(:func:`stellarfield.data.split.split_id`: ``star_id``, else ``object_id``), so every observation
of a star shares a split. Star ids are resolved over the whole dataset when the writer closes
(:func:`stellarfield.data.stars.resolve_star_ids`: normalised catalogue names and position
matches), so a star that two products name differently (MILES ``HD044691A``, STELIB ``HD044691``) or
that LAMOST designates by slightly different positions gets one ``star_id`` and one split; shards
whose rows changed id are rewritten (``star_id`` and ``split`` columns only) before the manifest
is written. Datasets written before the ``star_id`` column (schema version 1) stay readable: their
rows read back with ``star_id`` None.
"""

from __future__ import annotations

import json
import operator
import os
import shutil
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from stellarfield.atomic import temporary_sibling, write_text_atomic
from stellarfield.data.split import DEFAULT_FRACTIONS, DEFAULT_SALT, SPLITS, split_assigner
from stellarfield.data.stars import StarIdentity, identity_of, resolve_star_ids
from stellarfield.errors import StellarfieldError
from stellarfield.spectrum import FRAMES, LABEL_NAMES, NORMALISATIONS, Segment, Spectrum, clean_pixels

#: The manifest's "format" value.
FORMAT = "stellarfield-dataset"
#: Version of the folder layout and manifest.
FORMAT_VERSION = 1
#: Version of the row schema below (2: ``star_id`` column; version 1 datasets read with star_id None).
SCHEMA_VERSION = 2
#: The manifest's file name; ``_``: Parquet dataset readers skip it as metadata.
MANIFEST_NAME = "_manifest.json"
#: The manifest's name in datasets written before :data:`MANIFEST_NAME` (read, never written).
LEGACY_MANIFEST_NAME = "manifest.json"
#: Rows per Parquet row group: the unit a streaming reader decompresses at once.
ROW_GROUP_ROWS = 256
#: Bytes of row groups handed to the background threads and not yet written, at most: the writing
#: thread waits beyond it, so memory stays bounded when rows come faster than they are compressed.
BACKGROUND_BYTES = 256 << 20
#: Background threads: consecutive shards go to different ones, so that at the end, when reading
#: is over, the last shards are encoded side by side.
BACKGROUND_THREADS = 2

_LABEL_COLUMNS = tuple(f"label_{name}" for name in LABEL_NAMES)

#: One row per Spectrum. Pixel columns hold all segments concatenated, in segment order.
SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),  # Spectrum.key: product/object_id[/observation_id]
        pa.field("object_id", pa.string(), nullable=False),
        pa.field("star_id", pa.string()),  # canonical star identity across products, null if unknown
        pa.field("survey", pa.string(), nullable=False),
        pa.field("instrument", pa.string(), nullable=False),
        pa.field("product", pa.string(), nullable=False),
        pa.field("observation_id", pa.string()),
        pa.field("frame", pa.string(), nullable=False),  # "rest" | "observed"
        pa.field("normalisation", pa.string(), nullable=False),  # "continuum" | "flux"
        pa.field("resolution", pa.float64()),  # R = lambda / FWHM, null if unknown
        pa.field("noise_known", pa.bool_(), nullable=False),
        pa.field("flux_unit", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),  # "train" | "validation" | "test"
        # Labels (K, dex, dex, dex, km/s, per pixel): null when the record has no such label,
        # NaN when the record carries the label as NaN.
        *[pa.field(name, pa.float64()) for name in _LABEL_COLUMNS],
        pa.field("n_pixels", pa.int64(), nullable=False),
        pa.field("segment_names", pa.list_(pa.string()), nullable=False),
        pa.field("segment_lengths", pa.list_(pa.int32()), nullable=False),
        pa.field("wavelength", pa.list_(pa.float64()), nullable=False),  # vacuum Angstrom
        pa.field("flux", pa.list_(pa.float32()), nullable=False),
        pa.field("ivar", pa.list_(pa.float32()), nullable=False),
        pa.field("mask", pa.list_(pa.bool_()), nullable=False),  # True = good pixel
        # Per-pixel LSF FWHM in Angstrom. The whole list is null when no segment has one; the
        # pixels of a segment without one are null elements when another segment has one.
        pa.field("lsf_fwhm", pa.list_(pa.float32())),
        pa.field("provenance_file", pa.string()),
        pa.field("provenance_hdu", pa.string()),
        pa.field("provenance_extra", pa.string(), nullable=False),  # JSON: other provenance keys
        pa.field("meta", pa.string(), nullable=False),  # JSON of Spectrum.meta
    ]
)
COLUMNS = tuple(SCHEMA.names)
#: Columns that older datasets lack; they read back as nulls.
_ADDED_COLUMNS = ("star_id",)
_PIXEL_COLUMNS = ("wavelength", "flux", "ivar", "mask", "lsf_fwhm")
# Only small scalar columns get Parquet min/max statistics; pixel lists would gain nothing.
_STATISTICS_COLUMNS = [name for name in COLUMNS if name not in _PIXEL_COLUMNS + ("segment_names", "segment_lengths")]
# Dictionary encoding pays for the repetitive strings (survey, product, frame ...). On pixel columns
# it made shards larger and writing twice as slow (measured on noisy synthetic spectra); zstd
# already compresses a wavelength grid repeated row after row.
_DICTIONARY_COLUMNS = [f.name for f in SCHEMA if f.type in (pa.string(), pa.list_(pa.string()))]


class DatasetExistsError(StellarfieldError, FileExistsError):
    """The target path of a :class:`DatasetWriter` already exists."""

    def __init__(self, path: Path, reason: str | None = None):
        self.path = Path(path)
        message = reason or (
            f"{self.path} already exists; pass --force (overwrite=True) to replace it"
        )
        super().__init__(message)


class NotADatasetError(StellarfieldError, ValueError):
    """A folder that is not a complete stellarfield dataset was opened as one."""

    def __init__(self, path: Path, reason: str):
        self.path = Path(path)
        super().__init__(f"{self.path} is not a stellarfield dataset: {reason}")


class DatasetCorruptError(StellarfieldError, ValueError):
    """A shard of a dataset cannot be read (truncated, corrupt, or not what the manifest says).

    The message names the shard, the reason, and what to do: check the dataset with
    ``stellarfield info DATASET`` and ingest it again.
    """

    def __init__(self, shard: str | os.PathLike, reason: str):
        self.shard = Path(shard)
        self.reason = reason
        super().__init__(
            f"{self.shard}: {reason}; the dataset is damaged: check it with 'stellarfield info "
            f"{self.shard.parent}' and ingest it again (--force)"
        )


def _shard_error(path: Path, exc: BaseException) -> DatasetCorruptError:
    """A :class:`DatasetCorruptError` naming ``path`` for an Arrow / OS error raised reading it."""
    return DatasetCorruptError(path, f"unreadable Parquet shard ({type(exc).__name__}: {exc})")


#: Errors pyarrow raises reading a damaged Parquet file (ArrowInvalid is a ValueError; a failed
#: page checksum or decompression is an OSError).
_SHARD_READ_ERRORS = (pa.ArrowException, OSError, ValueError)


# ----------------------------------------------------------------------------------------------
# Spectrum <-> row
# ----------------------------------------------------------------------------------------------
def _json_default(value: Any) -> Any:
    """Let numpy scalars (np.int64, np.bool_) through ``json.dumps`` as Python scalars."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable: {value!r}")


#: One encoder for every record's JSON (``json.dumps`` with ``default=`` builds a new one per call).
_JSON_ENCODER = json.JSONEncoder(default=_json_default, allow_nan=True)


def _to_json(value: dict) -> str:
    return _JSON_ENCODER.encode(value)


def check_serialisable(spectrum: Spectrum) -> None:
    """Raise ``ValueError`` naming the record if its meta or provenance cannot be stored (JSON)."""
    try:
        _to_json(spectrum.meta)
        _to_json(spectrum.provenance)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{spectrum.key}: meta and provenance must be JSON-serialisable ({exc})") from exc


def _list_array(arrays: Sequence[np.ndarray], value_type: pa.DataType, value_mask=None, row_mask=None) -> pa.ListArray:
    """A ListArray with one list per row from per-row numpy arrays (one copy, no Python loop per pixel)."""
    lengths = np.fromiter((a.shape[0] for a in arrays), dtype=np.int64, count=len(arrays))
    offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if offsets[-1] > np.iinfo(np.int32).max:
        raise ValueError("too many pixels in one row group for 32-bit list offsets")
    if arrays:
        values = np.concatenate(arrays)
    else:
        values = np.empty(0, dtype=value_type.to_pandas_dtype())
    return pa.ListArray.from_arrays(
        pa.array(offsets.astype(np.int32)),
        pa.array(values, type=value_type, mask=value_mask),
        type=pa.list_(value_type),
        mask=None if row_mask is None else pa.array(row_mask, type=pa.bool_()),
    )


def _lsf_column(spectra: Sequence[Spectrum]) -> pa.ListArray:
    """The lsf_fwhm column: null rows without any LSF, null elements for segments without one."""
    rows, element_null, row_null = [], [], []
    for spectrum in spectra:
        if all(s.lsf_fwhm is None for s in spectrum.segments):
            rows.append(np.empty(0, dtype=np.float32))
            row_null.append(True)
            continue
        row_null.append(False)
        for s in spectrum.segments:
            present = s.lsf_fwhm is not None
            element_null.append(np.full(s.n_pixels, not present))
        rows.append(
            np.concatenate(
                [s.lsf_fwhm if s.lsf_fwhm is not None else np.zeros(s.n_pixels, np.float32) for s in spectrum.segments]
            )
        )
    value_mask = np.concatenate(element_null) if element_null else np.zeros(0, dtype=bool)
    return _list_array(rows, pa.float32(), value_mask=value_mask if value_mask.any() else None, row_mask=row_null)


def spectra_to_batch(
    spectra: Sequence[Spectrum], splits: Sequence[str], star_ids: Sequence[str | None] | None = None
) -> pa.RecordBatch:
    """Rows (with schema :data:`SCHEMA`) for ``spectra``, each with its split name (and star id:
    ``star_ids`` if given, else each record's own ``star_id``)."""
    provenance_extra = []
    for s in spectra:
        extra = {k: v for k, v in s.provenance.items() if k not in ("file", "hdu")}
        provenance_extra.append(_to_json(extra))

    def optional_str(value):
        return None if value is None else str(value)

    columns: dict[str, pa.Array] = {
        "key": pa.array([s.key for s in spectra], pa.string()),
        "object_id": pa.array([s.object_id for s in spectra], pa.string()),
        "star_id": pa.array(list(star_ids) if star_ids is not None else [s.star_id for s in spectra], pa.string()),
        "survey": pa.array([s.survey for s in spectra], pa.string()),
        "instrument": pa.array([s.instrument for s in spectra], pa.string()),
        "product": pa.array([s.product for s in spectra], pa.string()),
        "observation_id": pa.array([s.observation_id for s in spectra], pa.string()),
        "frame": pa.array([s.frame for s in spectra], pa.string()),
        "normalisation": pa.array([s.normalisation for s in spectra], pa.string()),
        "resolution": pa.array([None if s.resolution is None else float(s.resolution) for s in spectra], pa.float64()),
        "noise_known": pa.array([bool(s.noise_known) for s in spectra], pa.bool_()),
        "flux_unit": pa.array([s.flux_unit for s in spectra], pa.string()),
        "split": pa.array(list(splits), pa.string()),
        **{
            column: pa.array([s.labels.get(name) for s in spectra], pa.float64())  # NaN stays NaN, absent -> null
            for name, column in zip(LABEL_NAMES, _LABEL_COLUMNS)
        },
        "n_pixels": pa.array([s.n_pixels for s in spectra], pa.int64()),
        "segment_names": pa.array([[seg.name for seg in s.segments] for s in spectra], pa.list_(pa.string())),
        "segment_lengths": pa.array([[seg.n_pixels for seg in s.segments] for s in spectra], pa.list_(pa.int32())),
        "wavelength": _list_array([s.wavelength for s in spectra], pa.float64()),
        "flux": _list_array([s.flux for s in spectra], pa.float32()),
        "ivar": _list_array([s.ivar for s in spectra], pa.float32()),
        "mask": _list_array([s.mask for s in spectra], pa.bool_()),
        "lsf_fwhm": _lsf_column(spectra),
        "provenance_file": pa.array([optional_str(s.provenance.get("file")) for s in spectra], pa.string()),
        "provenance_hdu": pa.array([optional_str(s.provenance.get("hdu")) for s in spectra], pa.string()),
        "provenance_extra": pa.array(provenance_extra, pa.string()),
        "meta": pa.array([_to_json(s.meta) for s in spectra], pa.string()),
    }
    return pa.RecordBatch.from_arrays([columns[name] for name in COLUMNS], schema=SCHEMA)


@dataclass
class GridRows:
    """Records that share one single-segment wavelength grid, as columns: what a table reader (one
    star a row, e.g. Gaia XP) gives ingest instead of one :class:`Spectrum` per row
    (:func:`stellarfield.io.registry.read_rows`). Row ``i`` stands for the record

    ``Spectrum(object_ids[i], survey, instrument, product, [Segment(segment_name, wavelength,
    flux[i], ivar[i], mask[i])], frame, normalisation, observation_ids[i], resolution,
    noise_known, flux_unit, labels={name: labels[name][i] where finite},
    provenance={"file": provenance_file, "hdu": provenance_hdu[i]}, meta=meta[i])``

    and :func:`grid_rows_to_batch` writes exactly the row :func:`spectra_to_batch` writes for it
    (pixels cleaned by the :class:`~stellarfield.spectrum.Segment` rule, :func:`clean_pixels`).
    """

    object_ids: list[str]
    observation_ids: list[str | None]
    survey: str
    instrument: str
    product: str
    frame: str
    normalisation: str
    resolution: float | None
    noise_known: bool
    flux_unit: str
    segment_name: str
    wavelength: np.ndarray  # (n_pixels,) float64, shared by every row
    flux: np.ndarray  # (n_rows, n_pixels)
    ivar: np.ndarray
    mask: np.ndarray
    labels: dict[str, np.ndarray]  # label name -> (n_rows,) float64; a non-finite value: no such label
    provenance_file: str
    provenance_hdu: list[str]
    meta: list[dict]

    def __post_init__(self) -> None:
        # the checks Segment and Spectrum make per record, made once for the grid
        self.wavelength = np.asarray(self.wavelength, dtype=np.float64)
        self.flux = np.asarray(self.flux, dtype=np.float32)
        self.ivar = np.asarray(self.ivar, dtype=np.float32)
        self.mask = np.asarray(self.mask, dtype=bool)
        n_rows, n = len(self.object_ids), self.wavelength.shape[0]
        if self.wavelength.ndim != 1:
            raise ValueError(f"segment {self.segment_name!r}: wavelength must be 1-D")
        for name in ("flux", "ivar", "mask"):
            if getattr(self, name).shape != (n_rows, n):
                raise ValueError(f"{name} has shape {getattr(self, name).shape}, expected ({n_rows}, {n})")
        if n > 1 and not np.all(np.diff(self.wavelength) > 0):
            raise ValueError(f"segment {self.segment_name!r}: wavelength must be strictly increasing")
        if not (len(self.observation_ids) == len(self.provenance_hdu) == len(self.meta) == n_rows):
            raise ValueError("observation_ids, provenance_hdu and meta must have one entry per row")
        if self.frame not in FRAMES:
            raise ValueError(f"frame must be one of {FRAMES}, got {self.frame!r}")
        if self.normalisation not in NORMALISATIONS:
            raise ValueError(f"normalisation must be one of {NORMALISATIONS}, got {self.normalisation!r}")
        unknown = set(self.labels) - set(LABEL_NAMES)
        if unknown:
            raise ValueError(f"unknown label names {sorted(unknown)}; allowed: {LABEL_NAMES}")
        self.labels = {k: np.asarray(v, dtype=np.float64) for k, v in self.labels.items()}
        self.ivar, self.mask = clean_pixels(self.flux, self.ivar, self.mask)

    def __len__(self) -> int:
        return len(self.object_ids)

    @property
    def keys(self) -> list[str]:
        """``Spectrum.key`` of each row: product/object_id[/observation_id]."""
        return [f"{self.product}/{o}/{obs}" if obs else f"{self.product}/{o}"
                for o, obs in zip(self.object_ids, self.observation_ids)]

    def take(self, rows: Sequence[int]) -> "GridRows":
        """The rows ``rows`` only (pixels already cleaned are not cleaned again: the rule is idempotent)."""
        rows = np.asarray(rows, dtype=np.int64)
        return GridRows(
            [self.object_ids[i] for i in rows], [self.observation_ids[i] for i in rows], self.survey,
            self.instrument, self.product, self.frame, self.normalisation, self.resolution, self.noise_known,
            self.flux_unit, self.segment_name, self.wavelength, self.flux[rows], self.ivar[rows], self.mask[rows],
            {k: v[rows] for k, v in self.labels.items()}, self.provenance_file,
            [self.provenance_hdu[i] for i in rows], [self.meta[i] for i in rows],
        )


def _repeat(value, n: int, type_: pa.DataType) -> pa.Array:
    return pa.array([value] * n, type_)


def grid_rows_to_batch(rows: GridRows, splits: Sequence[str], star_ids: Sequence[str | None],
                       meta_json: Sequence[str] | None = None) -> pa.RecordBatch:
    """The rows :func:`spectra_to_batch` makes for the records ``rows`` stands for, built column by
    column (no per-row record). ``meta_json``: each row's meta as JSON when already serialised."""
    n, n_pix = len(rows), rows.wavelength.shape[0]
    if n * n_pix > np.iinfo(np.int32).max:
        raise ValueError("too many pixels in one row group for 32-bit list offsets")
    offsets = pa.array(np.arange(n + 1, dtype=np.int32) * np.int32(n_pix))
    one = pa.array(np.arange(n + 1, dtype=np.int32))

    def pixels(values: np.ndarray, type_: pa.DataType) -> pa.ListArray:
        return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1), type=type_), type=pa.list_(type_))

    labels = {}
    for name, column in zip(LABEL_NAMES, _LABEL_COLUMNS):
        values = rows.labels.get(name)
        labels[column] = (pa.nulls(n, pa.float64()) if values is None
                          else pa.array(values, pa.float64(), mask=~np.isfinite(values)))
    columns: dict[str, pa.Array] = {
        "key": pa.array(rows.keys, pa.string()),
        "object_id": pa.array(rows.object_ids, pa.string()),
        "star_id": pa.array(list(star_ids), pa.string()),
        "survey": _repeat(rows.survey, n, pa.string()),
        "instrument": _repeat(rows.instrument, n, pa.string()),
        "product": _repeat(rows.product, n, pa.string()),
        "observation_id": pa.array(rows.observation_ids, pa.string()),
        "frame": _repeat(rows.frame, n, pa.string()),
        "normalisation": _repeat(rows.normalisation, n, pa.string()),
        "resolution": _repeat(None if rows.resolution is None else float(rows.resolution), n, pa.float64()),
        "noise_known": _repeat(bool(rows.noise_known), n, pa.bool_()),
        "flux_unit": _repeat(rows.flux_unit, n, pa.string()),
        "split": pa.array(list(splits), pa.string()),
        **labels,
        "n_pixels": _repeat(n_pix, n, pa.int64()),
        "segment_names": pa.ListArray.from_arrays(one, _repeat(rows.segment_name, n, pa.string()),
                                                  type=pa.list_(pa.string())),
        "segment_lengths": pa.ListArray.from_arrays(one, _repeat(n_pix, n, pa.int32()), type=pa.list_(pa.int32())),
        "wavelength": pixels(np.tile(rows.wavelength, n), pa.float64()),
        "flux": pixels(rows.flux, pa.float32()),
        "ivar": pixels(rows.ivar, pa.float32()),
        "mask": pixels(rows.mask, pa.bool_()),
        "lsf_fwhm": _list_array([np.empty(0, dtype=np.float32)] * n, pa.float32(), row_mask=[True] * n),
        "provenance_file": _repeat(rows.provenance_file, n, pa.string()),
        "provenance_hdu": pa.array(rows.provenance_hdu, pa.string()),
        "provenance_extra": _repeat("{}", n, pa.string()),
        "meta": pa.array(list(meta_json) if meta_json is not None else [_to_json(m) for m in rows.meta], pa.string()),
    }
    return pa.RecordBatch.from_arrays([columns[name] for name in COLUMNS], schema=SCHEMA)


def _values_and_offsets(column: pa.ListArray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(values, offsets, null elements or None) of a list column, offsets starting at 0."""
    offsets = column.offsets.to_numpy()
    values = column.values.slice(offsets[0], offsets[-1] - offsets[0])
    nulls = values.is_null().to_numpy(zero_copy_only=False) if values.null_count else None
    return values.to_numpy(zero_copy_only=False), offsets - offsets[0], nulls


def batch_to_spectra(batch: pa.RecordBatch) -> Iterator[Spectrum]:
    """The records of a batch of full rows (inverse of :func:`spectra_to_batch`).

    Arrays are copied out of Arrow's buffers, so a record owns its memory (writable, and it does
    not keep the whole batch alive).
    """
    present = set(batch.schema.names)
    scalars = {
        name: batch.column(name).to_pylist() if name in present else [None] * batch.num_rows
        for name in COLUMNS
        if name not in _PIXEL_COLUMNS
    }
    pixels = {name: _values_and_offsets(batch.column(name)) for name in _PIXEL_COLUMNS}
    lsf_row_valid = batch.column("lsf_fwhm").is_valid().to_numpy(zero_copy_only=False)

    for i in range(batch.num_rows):
        segments = []
        start = 0
        for name, length in zip(scalars["segment_names"][i], scalars["segment_lengths"][i]):
            arrays = {}
            for column in ("wavelength", "flux", "ivar", "mask"):
                values, offsets, _ = pixels[column]
                first = offsets[i] + start
                arrays[column] = values[first : first + length].copy()
            lsf = None
            if lsf_row_valid[i]:
                values, offsets, nulls = pixels["lsf_fwhm"]
                first = offsets[i] + start
                if length and (nulls is None or not nulls[first : first + length].all()):
                    lsf = values[first : first + length].astype(np.float32)  # a copy
            segments.append(Segment(name, arrays["wavelength"], arrays["flux"], arrays["ivar"], arrays["mask"], lsf))
            start += length

        labels = {}
        for name, column in zip(LABEL_NAMES, _LABEL_COLUMNS):
            value = scalars[column][i]
            if value is not None:
                labels[name] = value
        provenance = {}
        for key in ("file", "hdu"):
            value = scalars[f"provenance_{key}"][i]
            if value is not None:
                provenance[key] = value
        provenance.update(json.loads(scalars["provenance_extra"][i]))

        yield Spectrum(
            object_id=scalars["object_id"][i],
            survey=scalars["survey"][i],
            instrument=scalars["instrument"][i],
            product=scalars["product"][i],
            segments=segments,
            frame=scalars["frame"][i],
            normalisation=scalars["normalisation"][i],
            observation_id=scalars["observation_id"][i],
            resolution=scalars["resolution"][i],
            noise_known=scalars["noise_known"][i],
            flux_unit=scalars["flux_unit"][i],
            labels=labels,
            provenance=provenance,
            meta=json.loads(scalars["meta"][i]),
            star_id=scalars["star_id"][i],
        )


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------
def manifest_path(folder: str | os.PathLike) -> Path | None:
    """The manifest file of the dataset at ``folder`` (:data:`MANIFEST_NAME`, or the legacy name),
    or None where there is none (not a dataset, or a write that did not finish)."""
    folder = Path(folder)
    for name in (MANIFEST_NAME, LEGACY_MANIFEST_NAME):
        if (folder / name).is_file():
            return folder / name
    return None


def is_dataset(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a dataset folder (it has a manifest; :class:`Dataset` checks the rest)."""
    return Path(path).is_dir() and manifest_path(path) is not None


def iter_spectra_of(paths, split: str | None = None, products: str | Iterable[str] | None = None):
    """Spectra (of ``split``, of ``products``) from one dataset folder or several, streamed; a key
    seen before is skipped (the same file ingested into two datasets, e.g. MILES from ../shared/data
    and from the demo extra)."""
    seen = set()
    for path in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
        for s in Dataset(path).iter_spectra(split=split, products=products):
            if s.key not in seen:
                seen.add(s.key)
                yield s


def _is_replaceable(path: Path) -> bool:
    """Whether ``overwrite=True`` may delete ``path``: a stellarfield dataset or an empty folder."""
    if not path.is_dir() or path.is_symlink():
        return False
    if not any(path.iterdir()):
        return True
    try:
        manifest = json.loads(manifest_path(path).read_text())
    except (AttributeError, OSError, ValueError):  # no manifest (None), unreadable, not JSON
        return False
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT


class DatasetWriter:
    """Write spectra into a new dataset folder, atomically.

    >>> with DatasetWriter("data/apogee", metadata={"source": "apogee/apstar"}) as writer:  # doctest: +SKIP
    ...     for path in files:
    ...         writer.write_many(read_spectra(path))

    Parameters
    ----------
    path:
        The dataset folder to create. It must not exist unless ``overwrite`` (then it must be a
        stellarfield dataset or an empty folder: nothing else is ever deleted).
    overwrite:
        Replace an existing dataset at ``path`` once the new one is complete.
    shard_size:
        Spectra per Parquet file.
    metadata:
        JSON-serialisable facts about the dataset (sources, command line), kept in the manifest.
    split_fractions, split_salt:
        The train/validation/test rule (:func:`stellarfield.data.split.assign_split`), recorded
        in the manifest.

    Everything is written into a hidden sibling folder ``.{name}.tmp-<pid>-<random>``. ``close()``
    (or leaving the ``with`` block normally) writes ``manifest.json`` last and renames the folder
    to ``path``; an exception inside the ``with`` block deletes the temporary folder and leaves any
    existing dataset at ``path`` untouched. A process killed outright can leave the hidden
    temporary folder behind (never a half dataset at ``path``); it is safe to delete.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        overwrite: bool = False,
        shard_size: int = 4096,
        metadata: dict | None = None,
        split_fractions: Sequence[float] = DEFAULT_FRACTIONS,
        split_salt: str = DEFAULT_SALT,
    ):
        self.path = Path(path)
        self.overwrite = bool(overwrite)
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.shard_size = int(shard_size)
        self.metadata = dict(metadata or {})
        _to_json(self.metadata)  # fail now, not after hours of ingest, if it cannot be stored
        self.split_fractions = tuple(float(f) for f in split_fractions)
        self.split_salt = split_salt
        self._assign_split = split_assigner(fractions=self.split_fractions, salt=split_salt)  # checks the fractions

        if self.path.exists() or self.path.is_symlink():
            if not self.overwrite:
                raise DatasetExistsError(self.path)
            if not _is_replaceable(self.path):
                raise DatasetExistsError(
                    self.path,
                    f"{self.path} exists and is not a stellarfield dataset (no stellarfield manifest.json) "
                    "or an empty folder; refusing to replace it even with --force / overwrite=True",
                )

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = temporary_sibling(self.path, "tmp")
        self._tmp.mkdir()
        self._state = "open"  # -> "closed" | "aborted"

        self._pending: list[Spectrum] = []  # rows not yet in a row group
        self._pending_splits: list[str] = []
        self._parquet: pq.ParquetWriter | None = None  # the open shard's writer (used by the background thread)
        self._background: list[ThreadPoolExecutor] = []  # threads writing row groups and closing shards, a shard each
        self._queued: deque[tuple[Future, int]] = deque()  # its work not known to be done, and the bytes it holds
        self._queued_bytes = 0
        self._shard_rows = 0
        self._shard_counts: Counter[str] = Counter()
        self._shard_splits: Counter[str] = Counter()
        self._shards: list[dict] = []
        self._counts: Counter[str] = Counter()
        self._splits: Counter[str] = Counter()
        self._pixels: dict[str, dict[str, int]] = {}
        self._keys: set[str] = set()
        self._extra_files: dict[str, str] = {}
        # per record: what it says about its star, and (shard index, object_id, star_id written)
        self._identities: dict[str, StarIdentity] = {}
        self._rows: dict[str, tuple[int, str, str | None]] = {}
        self._pending_star_ids: list[str | None] = []
        self._pending_tables: list[pa.Table] = []  # rows given by write_batch (before the pending records)
        self._pending_table_rows = 0
        self._own_star_rows = 0  # rows of write_resolved_rows: each its own star, not resolved
        self._stars: dict[str, int] = {}

    # --- context manager ----------------------------------------------------------------------
    def __enter__(self) -> "DatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # --- public API --------------------------------------------------------------------------
    @property
    def counts(self) -> dict[str, int]:
        """Spectra written so far, per product."""
        return dict(self._counts)

    def write(self, spectrum: Spectrum) -> None:
        """Add one record; its split is assigned from its star id (``star_id``, else ``object_id``).

        The star id written is the record's own best one (:func:`~stellarfield.data.stars.identity_of`);
        ``close()`` resolves them over all records and corrects the rows of stars that other
        records name or place differently. The caller's record is not modified.

        Raises ``ValueError`` if a record with the same ``key`` was already written (the same
        file read twice, or a reader that gives several observations one key).
        """
        if self._state != "open":
            raise RuntimeError(f"DatasetWriter for {self.path} is {self._state}; cannot write")
        if not isinstance(spectrum, Spectrum):
            raise TypeError(f"expected a Spectrum, got {type(spectrum).__name__}")
        key = spectrum.key
        check_serialisable(spectrum)  # fail here, naming the record, rather than at the next row-group flush
        if key in self._keys:
            raise ValueError(
                f"duplicate spectrum key {key!r} (from {spectrum.provenance.get('file', 'unknown file')}): "
                "each observation must have a unique product/object_id/observation_id"
            )
        (star_id,), (split,) = self._register([key], [spectrum.object_id], [spectrum.product], [spectrum.n_pixels],
                                              [identity_of(spectrum)])
        self._pending.append(spectrum)
        self._pending_splits.append(split)
        self._pending_star_ids.append(star_id)

        if self._n_pending() >= self._row_group_limit():
            self._flush_row_group()

    def write_batch(self, batch: pa.RecordBatch | pa.Table, identities: Sequence[StarIdentity]) -> None:
        """Add rows already in the dataset's schema (made by :func:`spectra_to_batch` in another
        process, or rows of a part being merged), without turning them into :class:`Spectrum` records.

        ``identities[i]`` is what row ``i`` says about its star (:func:`~stellarfield.data.stars.identity_of`
        of the record as read, before any resolution); the rows' ``star_id`` and ``split`` columns are
        replaced, exactly as :meth:`write` assigns them. Raises ``ValueError`` for a key already
        written (the batch is then not written at all).
        """
        self._check_rows(batch)
        if len(identities) != batch.num_rows:
            raise ValueError(f"{batch.num_rows} rows but {len(identities)} identities")
        keys = batch.column("key").to_pylist()
        repeated = [k for k in keys if k in self._keys]
        if repeated or len(set(keys)) != len(keys):
            raise ValueError(f"duplicate spectrum key(s) {repeated or keys}: each observation must have a unique key")
        if self._pending:  # rows keep the order they were given in
            self._pending_tables.append(pa.Table.from_batches([self._spectra_batch()]))
        table = pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch
        object_ids = table.column("object_id").to_pylist()
        products = table.column("product").to_pylist()
        n_pixels = table.column("n_pixels").to_pylist()
        start = 0
        while start < table.num_rows:  # a slice per row group, registered in the shard it lands in
            take = min(table.num_rows - start, self._row_group_limit() - self._n_pending())
            rows = slice(start, start + take)
            star_ids, splits = self._register(keys[rows], object_ids[rows], products[rows], n_pixels[rows],
                                              identities[rows])
            self._pending_tables.append(_with_star_ids(table.slice(start, take), star_ids, splits))
            self._pending_table_rows += take
            start += take
            if self._n_pending() >= self._row_group_limit():
                self._flush_row_group()

    def write_resolved_rows(self, batch: pa.RecordBatch | pa.Table) -> None:
        """Add rows already in the dataset's schema whose ``star_id`` is final, each a star of its
        own that no other row shows (generated stars): ``close()`` leaves them out of star
        resolution and the manifest counts each as one star. Nothing is kept per row, so memory does
        not grow with them; their keys are not checked against other rows'.

        Each row's split is drawn from its star id (the ``split`` column is replaced), as :meth:`write`
        draws it. The rows go into row groups of :data:`ROW_GROUP_ROWS` at once (the last one short
        unless the batch fills it; none across a shard boundary). Raises ``ValueError`` for a row
        without a star id (the batch is then not written at all).
        """
        self._check_rows(batch)
        star_ids = batch.column("star_id").to_pylist()
        if None in star_ids:
            raise ValueError(f"row {star_ids.index(None)} has no star_id; rows with final star ids only")
        splits = [self._assign_split(star_id) for star_id in star_ids]
        products, n_pixels = batch.column("product").to_pylist(), batch.column("n_pixels").to_pylist()
        if self._n_pending():  # rows keep the order they were given in
            self._flush_row_group()
        table = pa.Table.from_batches([batch]) if isinstance(batch, pa.RecordBatch) else batch
        table = _with_star_ids(table, star_ids, splits)
        done = 0
        while done < table.num_rows:
            take = min(table.num_rows - done, self._row_group_limit())
            self._count(products[done:done + take], splits[done:done + take], n_pixels[done:done + take])
            self._write_row_group(table.slice(done, take))  # closes the shard when it is full
            done += take
        self._own_star_rows += table.num_rows

    def _check_rows(self, batch: pa.RecordBatch | pa.Table) -> None:
        """Raise unless the writer is open and ``batch`` has the dataset's columns."""
        if self._state != "open":
            raise RuntimeError(f"DatasetWriter for {self.path} is {self._state}; cannot write")
        if batch.schema.names != list(COLUMNS):
            raise ValueError(f"rows must have the dataset's columns {list(COLUMNS)}, got {batch.schema.names}")

    def _n_pending(self) -> int:
        return len(self._pending) + self._pending_table_rows

    def _row_group_limit(self) -> int:
        """Rows the next row group takes: a full one, or what the open shard has room for."""
        return min(ROW_GROUP_ROWS, self.shard_size - self._shard_rows)

    def _register(self, keys: Sequence[str], object_ids: Sequence[str], products: Sequence[str],
                  n_pixels: Sequence[int], identities: Sequence[StarIdentity]) -> tuple[list[str | None], list[str]]:
        """Count new rows of the open shard (keys, products, splits, pixels); returns their own star
        ids and splits."""
        shard = len(self._shards)
        star_ids = [identity.star_id for identity in identities]
        splits = [self._assign_split(star_id or object_id) for star_id, object_id in zip(star_ids, object_ids)]
        self._keys.update(keys)
        self._identities.update(zip(keys, identities))
        self._rows.update((key, (shard, object_id, star_id)) for key, object_id, star_id in zip(keys, object_ids, star_ids))
        self._count(products, splits, n_pixels)
        return star_ids, splits

    def _count(self, products: Sequence[str], splits: Sequence[str], n_pixels: Sequence[int]) -> None:
        """Count new rows of the open shard: per product and split, and their pixels per product."""
        self._counts.update(products)
        self._splits.update(splits)
        self._shard_counts.update(products)
        self._shard_splits.update(splits)
        kinds = dict.fromkeys(products)
        for product in kinds:
            pixels = n_pixels if len(kinds) == 1 else [n for p, n in zip(products, n_pixels) if p == product]
            stats = self._pixels.setdefault(product, {"total": 0, "min": min(pixels), "max": 0})
            stats["total"] += sum(pixels)
            stats["min"] = min(stats["min"], min(pixels))
            stats["max"] = max(stats["max"], max(pixels))

    @property
    def scratch(self) -> Path:
        """The hidden folder the dataset is written into before it is put in place (removed with
        everything in it when the writer is aborted): where a caller may keep temporary files
        that must go when the dataset does. They must be named ``_spill-*`` and be gone before
        ``close()``."""
        return self._tmp

    @property
    def identities(self) -> dict[str, StarIdentity]:
        """What each record written says about its star, by key (before resolution)."""
        return self._identities

    def write_many(self, spectra: Iterable[Spectrum]) -> None:
        """Add every record of ``spectra`` (any iterable, consumed lazily)."""
        for spectrum in spectra:
            self.write(spectrum)

    def add_file(self, name: str, text: str) -> None:
        """A small text file (a report) to write into the dataset folder at ``close()``, so it lands
        with the dataset, atomically, or not at all. ``name`` is a plain file name."""
        if Path(name).name != name or name in (MANIFEST_NAME,) or name.startswith("shard-"):
            raise ValueError(f"{name!r} cannot be added to a dataset folder")
        self._extra_files[name] = text

    def close(self) -> Path:
        """Finish: flush the last shard, write ``manifest.json``, rename into place. Returns the path."""
        if self._state == "closed":
            return self.path
        if self._state != "open":
            raise RuntimeError(f"DatasetWriter for {self.path} was aborted")
        try:
            if self._n_pending():
                self._flush_row_group()
            if self._parquet is not None:
                self._close_shard()
            self._resolve_stars()
            for name, text in self._extra_files.items():
                write_text_atomic(self._tmp / name, text)
            self._write_manifest()
            # the new dataset replaces anything at ``path`` only once it reads back as complete
            problems = Dataset(self._tmp).verify(full=False)
            if problems:
                raise DatasetCorruptError(self._tmp, "the dataset just written does not read back: " + "; ".join(problems))
            self._move_into_place()
        except BaseException:
            self.abort()
            raise
        self._state = "closed"
        return self.path

    def abort(self) -> None:
        """Discard everything written; leave any existing dataset at ``path`` untouched."""
        if self._state == "closed":
            return
        self._state = "aborted"
        self._stop_background()  # before its files are removed
        if self._parquet is not None:
            try:
                self._parquet.close()
            except Exception:
                pass
        self._parquet = None
        shutil.rmtree(self._tmp, ignore_errors=True)

    # --- internals ---------------------------------------------------------------------------
    def _in_background(self, n_bytes: int, fn: Callable, *args, **kwargs) -> None:
        """Run ``fn`` (holding ``n_bytes`` of rows) on the open shard's background thread, after
        everything handed to it before; wait for the oldest work while more than
        :data:`BACKGROUND_BYTES` are queued. The work's error, if any, is raised here or by
        :meth:`_wait_background`."""
        if not self._background:
            self._background = [ThreadPoolExecutor(max_workers=1, thread_name_prefix="stellarfield-shards")
                                for _ in range(BACKGROUND_THREADS)]
        thread = self._background[len(self._shards) % len(self._background)]  # a shard's work in order, on one thread
        self._queued.append((thread.submit(fn, *args, **kwargs), n_bytes))
        self._queued_bytes += n_bytes
        while self._queued and (self._queued_bytes > BACKGROUND_BYTES or self._queued[0][0].done()):
            self._done_oldest()

    def _done_oldest(self) -> None:
        future, n_bytes = self._queued.popleft()
        self._queued_bytes -= n_bytes
        future.result()

    def _wait_background(self) -> None:
        """Wait until the background threads have written everything handed to them (raising their error)."""
        while self._queued:
            self._done_oldest()

    def _stop_background(self) -> None:
        """Stop the background threads (work queued and not started is dropped)."""
        for thread in self._background:
            thread.shutdown(wait=True, cancel_futures=True)
        self._background = []
        self._queued.clear()
        self._queued_bytes = 0

    def _shard_path(self, index: int) -> Path:
        return self._tmp / f"shard-{index:05d}.parquet"

    def _spectra_batch(self) -> pa.RecordBatch:
        """The pending records as rows (and no record pending)."""
        batch = spectra_to_batch(self._pending, self._pending_splits, self._pending_star_ids)
        self._pending, self._pending_splits, self._pending_star_ids = [], [], []
        return batch

    def _flush_row_group(self) -> None:
        tables = self._pending_tables
        if self._pending:
            tables = tables + [pa.Table.from_batches([self._spectra_batch()])]
        self._pending_tables, self._pending_table_rows = [], 0
        self._write_row_group(tables[0] if len(tables) == 1 else pa.concat_tables(tables))

    def _write_row_group(self, rows: pa.RecordBatch | pa.Table) -> None:
        """Write ``rows`` (no more than the open shard has room for) as one row group of the open
        shard's Parquet file, on the background thread."""
        if isinstance(rows, pa.Table):
            rows = rows.combine_chunks().to_batches()[0]
        if self._parquet is None:
            self._parquet = _shard_writer(self._shard_path(len(self._shards)).with_suffix(".parquet.partial"))
        self._in_background(rows.nbytes, self._parquet.write_batch, rows, row_group_size=rows.num_rows)
        self._shard_rows += rows.num_rows
        if self._shard_rows >= self.shard_size:
            self._close_shard()

    def _close_shard(self) -> None:
        """Finish the open shard (on its background thread, after its row groups): its Parquet
        footer, then its final name. Its size in bytes is filled in at ``close()``."""
        assert self._parquet is not None
        final = self._shard_path(len(self._shards))
        self._in_background(0, _finish_shard, self._parquet, final)
        self._parquet = None
        self._shards.append(
            {
                "file": final.name,
                "n_spectra": self._shard_rows,
                "bytes": None,
                "counts": dict(self._shard_counts),
                "splits": dict(self._shard_splits),
            }
        )
        self._shard_rows = 0
        self._shard_counts, self._shard_splits = Counter(), Counter()

    def _resolve_stars(self) -> None:
        """Resolve star ids over all records (while the background threads finish the shards),
        then rewrite the ``star_id``/``split`` of the rows whose ids change, shard by shard."""
        resolved = resolve_star_ids(self._identities)
        changed: dict[int, dict[str, str | None]] = {}
        for key, (shard, _, written) in self._rows.items():
            if resolved[key] != written:
                changed.setdefault(shard, {})[key] = resolved[key]
        self._wait_background()
        self._stop_background()
        for index, shard in enumerate(self._shards):
            shard["bytes"] = self._shard_path(index).stat().st_size
        for index in sorted(changed):
            self._rewrite_star_ids(index, changed[index])
        per_star: dict[str, set[str]] = {}
        for key, (_, object_id, _) in self._rows.items():
            per_star.setdefault(resolved[key] or object_id, set()).add(key.split("/", 1)[0])
        self._stars = {
            "with_star_id": sum(1 for v in resolved.values() if v) + self._own_star_rows,
            "n_stars": len(per_star) + self._own_star_rows,
            "in_several_products": sum(1 for products in per_star.values() if len(products) > 1),
            "rows_resolved": sum(len(v) for v in changed.values()),
        }

    def _rewrite_star_ids(self, index: int, new_ids: dict[str, str | None]) -> None:
        """Rewrite shard ``index`` with new star ids (and the splits they draw) for the rows of ``new_ids``."""
        path = self._shard_path(index)
        partial = path.with_suffix(".parquet.partial")
        splits: Counter[str] = Counter()
        with pq.ParquetFile(path) as parquet, _shard_writer(partial) as writer:
            for group in range(parquet.metadata.num_row_groups):
                table = self._with_new_star_ids(parquet.read_row_group(group), new_ids)
                splits.update(table.column("split").to_pylist())
                writer.write_table(table, row_group_size=table.num_rows)
        self._replace_shard(index, partial, splits)
        for key in new_ids:
            _, object_id, _ = self._rows[key]
            self._rows[key] = (index, object_id, new_ids[key])

    def _with_new_star_ids(self, table: pa.Table, new_ids: dict[str, str | None]) -> pa.Table:
        """``table`` with the star ids of the rows whose key is in ``new_ids`` replaced by those,
        and their splits drawn again; other rows unchanged."""
        star_ids = table.column("star_id").to_pylist()
        split_names = table.column("split").to_pylist()
        object_ids = table.column("object_id").to_pylist()
        for i, key in enumerate(table.column("key").to_pylist()):
            # a row whose star id stays keeps its split: it was drawn from that id (or the object_id)
            if key in new_ids and new_ids[key] != star_ids[i]:
                star_ids[i] = new_ids[key]
                split_names[i] = self._assign_split(star_ids[i] or object_ids[i])
        return _with_star_ids(table, star_ids, split_names)

    def _replace_shard(self, index: int, partial: Path, splits: Counter[str]) -> None:
        """Put the rewritten shard ``index`` (``partial``) in place, with the splits its rows now draw."""
        path = self._shard_path(index)
        os.replace(partial, path)
        shard = self._shards[index]
        self._splits.subtract(shard["splits"])
        self._splits.update(splits)
        shard["splits"] = dict(splits)
        shard["bytes"] = path.stat().st_size

    def _write_manifest(self) -> None:
        from stellarfield import __version__  # here, not at import: stellarfield imports this package

        manifest = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "complete": True,
            "n_spectra": sum(self._counts.values()),
            "counts": dict(sorted(self._counts.items())),
            "splits": {name: self._splits.get(name, 0) for name in SPLITS},
            "split_rule": {
                "function": "stellarfield.data.split.assign_split",
                "hash": "blake2b-64 of salt + '/' + (star_id or object_id)",
                "fractions": list(self.split_fractions),
                "salt": self.split_salt,
            },
            "pixels": dict(sorted(self._pixels.items())),
            "stars": self._stars,
            "shards": self._shards,
            "schema_version": SCHEMA_VERSION,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "stellarfield_version": __version__,
            "metadata": self.metadata,
        }
        write_text_atomic(self._tmp / MANIFEST_NAME, json.dumps(manifest, indent=2, default=_json_default) + "\n")

    def _move_into_place(self) -> None:
        if not (self.path.exists() or self.path.is_symlink()):
            os.rename(self._tmp, self.path)
            return
        if not self.overwrite:  # appeared while we were writing
            raise DatasetExistsError(self.path)
        old = temporary_sibling(self.path, "old")
        os.rename(self.path, old)
        try:
            os.rename(self._tmp, self.path)
        except BaseException:
            os.rename(old, self.path)  # put the previous dataset back
            raise
        shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------
def _name_set(value: str | Iterable[str] | None, what: str, allowed: Iterable[str] | None = None) -> list[str] | None:
    if value is None:
        return None
    names = [value] if isinstance(value, str) else list(value)
    if allowed is not None:
        unknown = sorted(set(names) - set(allowed))
        if unknown:
            raise ValueError(f"unknown {what} {unknown}; expected some of {list(allowed)}")
    return names


def _human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError  # unreachable


def _inside_folder(name: str) -> bool:
    """Whether a shard path from a manifest stays inside the dataset folder (relative, no '..')."""
    path = Path(name)
    return bool(name) and not path.is_absolute() and ".." not in path.parts and not path.drive


def _with_columns(batch: pa.RecordBatch, columns: Sequence[str]) -> pa.RecordBatch:
    """``batch``'s ``columns`` in order; columns it lacks (older datasets) become nulls."""
    if all(name in batch.schema.names for name in columns):
        return batch.select(columns)
    arrays = [
        batch.column(name) if name in batch.schema.names else pa.nulls(batch.num_rows, SCHEMA.field(name).type)
        for name in columns
    ]
    fields = [batch.schema.field(name) if name in batch.schema.names else SCHEMA.field(name) for name in columns]
    return pa.RecordBatch.from_arrays(arrays, schema=pa.schema(fields))


def _with_star_ids(table: pa.Table, star_ids: Sequence[str | None], splits: Sequence[str]) -> pa.Table:
    """``table`` with its ``star_id`` and ``split`` columns replaced."""
    for name, values in (("star_id", star_ids), ("split", splits)):
        position = table.schema.get_field_index(name)
        table = table.set_column(position, SCHEMA.field(name), pa.array(list(values), pa.string()))
    return table


def _finish_shard(writer: pq.ParquetWriter, final: Path) -> None:
    """Close a shard's Parquet file (written as ``final`` + ``.partial``) and give it its final name."""
    writer.close()
    os.replace(final.with_suffix(".parquet.partial"), final)


def _shard_writer(path: Path) -> pq.ParquetWriter:
    """A Parquet writer for one shard, with the dataset's compression, encodings and checksums."""
    return pq.ParquetWriter(
        path,
        SCHEMA,
        compression="zstd",
        use_dictionary=_DICTIONARY_COLUMNS,
        write_statistics=_STATISTICS_COLUMNS,
        write_page_checksum=True,  # lets verify() catch a damaged page, not only a truncated file
    )


def _open_shard(path: Path) -> pq.ParquetFile:
    """A shard opened for reading (page checksums verified), or a :class:`DatasetCorruptError`."""
    try:
        return pq.ParquetFile(path, page_checksum_verification=True)
    except _SHARD_READ_ERRORS as exc:
        raise _shard_error(path, exc) from exc


class Dataset:
    """A dataset folder written by :class:`DatasetWriter`, read lazily.

    >>> ds = Dataset("data/apogee")                                    # doctest: +SKIP
    >>> len(ds), ds.counts()                                           # doctest: +SKIP
    (26, {'apogee_apstar': 26})
    >>> for spectrum in ds.iter_spectra(split="train"):               # doctest: +SKIP
    ...     ...
    >>> labels = ds.table(["key", "label_teff", "label_logg"])        # doctest: +SKIP

    Rows are in the order they were written (shard by shard); ``ds[i]`` and iteration use it.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"no dataset at {self.path}: the path does not exist")
        if not self.path.is_dir():
            raise NotADatasetError(self.path, "it is a file, a dataset is a folder")
        found = manifest_path(self.path)
        if found is None:
            raise NotADatasetError(
                self.path,
                f"it has no {MANIFEST_NAME}, which is written last, so the write that made it did not "
                "finish (or the folder is something else); write it again (--force / overwrite=True to replace it)",
            )
        try:
            manifest = json.loads(found.read_text())
        except ValueError as exc:
            raise NotADatasetError(self.path, f"{MANIFEST_NAME} is not valid JSON ({exc})") from exc
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise NotADatasetError(self.path, f"{MANIFEST_NAME} does not say format {FORMAT!r}")
        if manifest.get("complete") is not True:
            raise NotADatasetError(self.path, f'{MANIFEST_NAME} does not say "complete": true (an unfinished write)')
        if manifest.get("version", 0) > FORMAT_VERSION or manifest.get("schema_version", 0) > SCHEMA_VERSION:
            raise NotADatasetError(
                self.path,
                f"written with format version {manifest.get('version')} / schema {manifest.get('schema_version')}, "
                f"newer than this stellarfield reads ({FORMAT_VERSION} / {SCHEMA_VERSION}); upgrade stellarfield",
            )
        try:
            shard_files = [str(s["file"]) for s in manifest["shards"]]
            [int(s["n_spectra"]) for s in manifest["shards"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise NotADatasetError(self.path, f"{MANIFEST_NAME} has a malformed shard list ({exc!r})") from None
        outside = [f for f in shard_files if not _inside_folder(f)]
        if outside:
            raise NotADatasetError(self.path, f"{MANIFEST_NAME} lists shard paths outside the dataset folder: {outside}")
        missing = [f for f in shard_files if not (self.path / f).is_file()]
        if missing:
            raise NotADatasetError(self.path, f"shard files listed in {MANIFEST_NAME} are missing: {missing}")
        self.manifest: dict = manifest
        self.metadata: dict = manifest.get("metadata", {})
        self._shard_paths = [self.path / s["file"] for s in manifest["shards"]]
        self._shard_starts = np.concatenate([[0], np.cumsum([s["n_spectra"] for s in manifest["shards"]])]).astype(int)
        self._keys: list[pa.Array] | None = None  # per-shard key columns, loaded by get()

    def __repr__(self) -> str:
        return f"Dataset({str(self.path)!r}, n_spectra={len(self)})"

    def __len__(self) -> int:
        return int(self.manifest["n_spectra"])

    def counts(self) -> dict[str, int]:
        """Number of spectra per product."""
        return dict(self.manifest["counts"])

    def __iter__(self) -> Iterator[Spectrum]:
        return self.iter_spectra()

    # --- streaming ---------------------------------------------------------------------------
    def iter_batches(
        self,
        *,
        columns: Sequence[str] | None = None,
        split: str | Iterable[str] | None = None,
        products: str | Iterable[str] | None = None,
        batch_size: int = 1024,
    ) -> Iterator[pa.RecordBatch]:
        """Stream rows as Arrow record batches of at most ``batch_size`` rows.

        ``columns`` selects columns (default: all, see :data:`SCHEMA`); ``split`` (a split name or
        several) and ``products`` (a product name or several) keep only matching rows. One row group
        is decompressed at a time, so memory does not grow with the dataset.
        """
        if columns is None:
            columns = list(COLUMNS)
        else:
            columns = [columns] if isinstance(columns, str) else list(columns)
        unknown = [c for c in columns if c not in COLUMNS]
        if unknown:
            raise ValueError(f"unknown columns {unknown}; dataset columns are {list(COLUMNS)}")
        splits = _name_set(split, "split", SPLITS)
        product_names = _name_set(products, "products")
        read_columns = list(columns)
        for name, wanted in (("split", splits), ("product", product_names)):
            if wanted is not None and name not in read_columns:
                read_columns.append(name)

        for shard, path in zip(self.manifest["shards"], self._shard_paths):
            # The manifest counts each shard's rows per split and product: skip shards with none.
            if splits is not None and "splits" in shard and not any(shard["splits"].get(s) for s in splits):
                continue
            if product_names is not None and "counts" in shard and not any(shard["counts"].get(p) for p in product_names):
                continue
            with _open_shard(path) as parquet:
                # a dataset written before a column existed reads that column as nulls
                absent = [c for c in read_columns if c in _ADDED_COLUMNS and c not in parquet.schema_arrow.names]
                batches = parquet.iter_batches(
                    batch_size=batch_size, columns=[c for c in read_columns if c not in absent]
                )
                while True:
                    try:
                        batch = next(batches)
                    except StopIteration:
                        break
                    except _SHARD_READ_ERRORS as exc:
                        raise _shard_error(path, exc) from exc
                    keep = None
                    if splits is not None:
                        keep = pc.is_in(batch.column("split"), value_set=pa.array(splits, pa.string()))
                    if product_names is not None:
                        in_products = pc.is_in(batch.column("product"), value_set=pa.array(product_names, pa.string()))
                        keep = in_products if keep is None else pc.and_(keep, in_products)
                    if keep is not None:
                        batch = batch.filter(keep)
                    if batch.num_rows:
                        yield _with_columns(batch, columns)

    def iter_spectra(
        self,
        *,
        split: str | Iterable[str] | None = None,
        products: str | Iterable[str] | None = None,
        batch_size: int = 256,
    ) -> Iterator[Spectrum]:
        """Stream :class:`Spectrum` records, optionally of one split and some products only."""
        for batch in self.iter_batches(split=split, products=products, batch_size=batch_size):
            yield from batch_to_spectra(batch)

    def row_groups(self) -> list[tuple[int, int, int]]:
        """``(shard index, row group index, rows)`` of every row group, in dataset order: the units
        a shuffling reader (:meth:`iter_row_groups`) reads one at a time. Reads the shards' footers only."""
        units = []
        for shard_index, path in enumerate(self._shard_paths):
            with _open_shard(path) as parquet:
                units += [(shard_index, g, parquet.metadata.row_group(g).num_rows)
                          for g in range(parquet.metadata.num_row_groups)]
        return units

    def iter_row_groups(
        self, units: Iterable[tuple[int, int]] | None = None, *, columns: Sequence[str] | None = None
    ) -> Iterator[tuple[tuple[int, int], pa.RecordBatch]]:
        """``((shard, group), rows)`` for each row group of ``units`` (``(shard index, row group
        index)`` pairs, in the order given, e.g. shuffled; default: all, in order), every row of the
        group (no filtering: row ``i`` of the batch is row ``i`` of the group), ``columns`` only
        (default all). One row group is decompressed at a time; a shard stays open while
        consecutive units are in it."""
        columns = list(COLUMNS) if columns is None else list(columns)
        unknown = [c for c in columns if c not in COLUMNS]
        if unknown:
            raise ValueError(f"unknown columns {unknown}; dataset columns are {list(COLUMNS)}")
        if units is None:
            units = [(shard, group) for shard, group, _ in self.row_groups()]
        parquet, open_index = None, None
        try:
            for shard_index, group in units:
                path = self._shard_paths[shard_index]
                if open_index != shard_index:
                    if parquet is not None:
                        parquet.close()
                    parquet, open_index = _open_shard(path), shard_index
                absent = [c for c in columns if c in _ADDED_COLUMNS and c not in parquet.schema_arrow.names]
                try:
                    table = parquet.read_row_group(group, columns=[c for c in columns if c not in absent])
                except _SHARD_READ_ERRORS as exc:
                    raise _shard_error(path, exc) from exc
                batch = table.combine_chunks().to_batches()
                batch = batch[0] if batch else pa.RecordBatch.from_pylist([], schema=table.schema)
                yield (shard_index, group), _with_columns(batch, columns)
        finally:
            if parquet is not None:
                parquet.close()

    def table(
        self,
        columns: Sequence[str],
        *,
        split: str | Iterable[str] | None = None,
        products: str | Iterable[str] | None = None,
    ) -> pa.Table:
        """Some columns of every (matching) row as one in-memory Arrow table.

        Meant for scalar columns (keys, ids, labels): ``ds.table(["key", "label_teff"])``. Asking
        for pixel columns loads those pixels of the whole dataset.
        """
        columns = list(columns)
        batches = list(self.iter_batches(columns=columns, split=split, products=products))
        return pa.Table.from_batches(batches, schema=pa.schema([SCHEMA.field(c) for c in columns]))

    # --- random access -----------------------------------------------------------------------
    def _read_row(self, shard_index: int, row: int) -> Spectrum:
        path = self._shard_paths[shard_index]
        with _open_shard(path) as parquet:
            for group in range(parquet.metadata.num_row_groups):
                n = parquet.metadata.row_group(group).num_rows
                if row < n:
                    try:
                        table = parquet.read_row_group(group).slice(row, 1)
                    except _SHARD_READ_ERRORS as exc:
                        raise _shard_error(path, exc) from exc
                    batch = table.combine_chunks().to_batches()[0]
                    return next(batch_to_spectra(batch))
                row -= n
        raise DatasetCorruptError(path, f"fewer rows than {MANIFEST_NAME} says")

    def __getitem__(self, index: int) -> Spectrum:
        """The record at row ``index`` (negative counts from the end), reading one row group."""
        if isinstance(index, slice):
            raise TypeError("Dataset does not support slicing; use iter_spectra() or table()")
        try:
            i = operator.index(index)
        except TypeError:
            raise TypeError(f"Dataset indices must be integers, not {type(index).__name__}") from None
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} spectra")
        shard_index = int(np.searchsorted(self._shard_starts, i, side="right") - 1)
        return self._read_row(shard_index, i - int(self._shard_starts[shard_index]))

    def get(self, key: str) -> Spectrum:
        """The record with ``Spectrum.key == key`` (``"product/object_id[/observation_id]"``).

        The first call loads the ``key`` column of every shard (small next to the pixels) and keeps
        it; each call then reads one row group.
        """
        if self._keys is None:
            self._keys = []
            for path in self._shard_paths:
                with _open_shard(path) as parquet:
                    try:
                        self._keys.append(parquet.read(columns=["key"]).column("key").combine_chunks())
                    except _SHARD_READ_ERRORS as exc:
                        raise _shard_error(path, exc) from exc
        for shard_index, keys in enumerate(self._keys):
            row = pc.index(keys, key).as_py()
            if row >= 0:
                return self._read_row(shard_index, row)
        raise KeyError(f"no spectrum with key {key!r} in dataset {self.path}")

    # --- verification ------------------------------------------------------------------------
    def verify(self, *, full: bool = True) -> list[str]:
        """Check the dataset against its manifest; returns the problems found (empty: healthy).

        Every shard must lie inside the dataset folder, open as Parquet with the dataset's columns
        and hold the number of rows the manifest gives it. With ``full`` (the default, what
        ``stellarfield info`` runs) every page of every shard is also read (page checksums checked
        where the shard has them) and its spectra counted per product and split against the
        manifest. Each problem names the file and the reason.
        """
        problems: list[str] = []
        manifest = self.manifest
        root = self.path.resolve()
        counts: Counter[str] = Counter()
        splits: Counter[str] = Counter()
        total = 0
        for shard, path in zip(manifest["shards"], self._shard_paths):
            try:
                path.resolve().relative_to(root)
            except ValueError:
                problems.append(f"{path}: resolves to {path.resolve()}, outside the dataset folder")
                continue
            expected = int(shard["n_spectra"])
            try:
                with _open_shard(path) as parquet:
                    missing = [c for c in ("key", "product", "split") if c not in parquet.schema_arrow.names]
                    if missing:
                        problems.append(f"{path}: not a stellarfield shard (no column(s) {missing})")
                        continue
                    rows = parquet.metadata.num_rows
                    if rows != expected:
                        problems.append(f"{path}: {rows} rows, but {MANIFEST_NAME} says {expected}")
                        continue
                    total += rows
                    if not full:
                        continue
                    shard_counts: Counter[str] = Counter()
                    shard_splits: Counter[str] = Counter()
                    for group in range(parquet.metadata.num_row_groups):
                        table = parquet.read_row_group(group)  # every column: every page is decompressed
                        shard_counts.update(table.column("product").to_pylist())
                        shard_splits.update(table.column("split").to_pylist())
            except DatasetCorruptError as exc:
                problems.append(f"{path}: {exc.reason}")
                continue
            except _SHARD_READ_ERRORS as exc:
                problems.append(f"{path}: unreadable Parquet shard ({type(exc).__name__}: {exc})")
                continue
            for name, found, listed in (("product", shard_counts, shard.get("counts")),
                                        ("split", shard_splits, shard.get("splits"))):
                if listed is not None and dict(found) != {k: v for k, v in listed.items() if v}:
                    problems.append(f"{path}: spectra per {name} {dict(found)} differ from {MANIFEST_NAME}'s {listed}")
            counts.update(shard_counts)
            splits.update(shard_splits)
        if not problems:
            if total != len(self):
                problems.append(f"{self.path / MANIFEST_NAME}: n_spectra is {len(self)}, but the shards hold {total}")
            elif full and dict(counts) != {k: v for k, v in self.counts().items() if v}:
                problems.append(f"{self.path / MANIFEST_NAME}: counts {self.counts()} differ from the shards' {dict(counts)}")
            elif full and dict(splits) != {k: v for k, v in manifest.get("splits", {}).items() if v}:
                problems.append(f"{self.path / MANIFEST_NAME}: splits {manifest.get('splits')} differ from the shards' {dict(splits)}")
        return problems

    # --- description -------------------------------------------------------------------------
    def size_on_disk(self) -> int:
        """Bytes of the shard files and the manifest."""
        return sum(p.stat().st_size for p in self._shard_paths) + (self.path / MANIFEST_NAME).stat().st_size

    def summary(self) -> str:
        """A human-readable description: spectra and pixels per product, splits, size on disk."""
        m = self.manifest
        n = len(self)
        lines = [
            f"stellarfield dataset {self.path}",
            f"  {n:,} spectra in {len(m['shards'])} shard(s), {_human_bytes(self.size_on_disk())} on disk; "
            f"created {m.get('created', '?')} by stellarfield {m.get('stellarfield_version', '?')}",
        ]
        pixels = m.get("pixels", {})
        width = max([len("product")] + [len(p) for p in m["counts"]])
        lines.append(f"  {'product':<{width}}  {'spectra':>9}  {'pixels/spectrum':>15}  {'pixels':>13}")
        for product, count in m["counts"].items():
            stats = pixels.get(product)
            if stats:
                span = f"{stats['min']:,}" if stats["min"] == stats["max"] else f"{stats['min']:,}-{stats['max']:,}"
                total = f"{stats['total']:,}"
            else:
                span = total = "?"
            lines.append(f"  {product:<{width}}  {count:>9,}  {span:>15}  {total:>13}")
        split_text = ", ".join(
            f"{name} {count:,} ({100 * count / n:.1f}%)" if n else f"{name} 0" for name, count in m["splits"].items()
        )
        lines.append(f"  splits (by star): {split_text}")
        rule = m.get("split_rule")
        if rule:
            lines.append(f"  split rule: fractions {rule['fractions']}, salt {rule['salt']!r}")
        stars = m.get("stars")
        if stars:
            lines.append(f"  stars: {stars['n_stars']:,} ({stars['with_star_id']:,} spectra with a star id; "
                         f"{stars['in_several_products']:,} stars seen by two or more products: info --stars)")
        if self.metadata:
            lines.append(f"  metadata: {json.dumps(self.metadata, default=_json_default)}")
        return "\n".join(lines)
