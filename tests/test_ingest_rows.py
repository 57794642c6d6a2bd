"""Ingest's columnar path for table readers (``Reader.read_rows``, Gaia XP) writes exactly the rows,
digests, star identities and skipped records that reading one Spectrum per row gives."""

from __future__ import annotations

import json

import numpy as np
import pytest
from astropy.io import fits

from stellarfield.ingest import _read_rows_unit, _read_spectra_units, _Unit, ingest
from stellarfield.io.readers.gaia_xp import N_SAMPLES, read_gaia_xp, read_gaia_xp_rows
from stellarfield.io.registry import classify_peek, get_reader


def _xp_table(path, n=12, *, apogee_ids=True):
    rng = np.random.default_rng(7)
    flux = rng.normal(1.0, 0.2, (n, N_SAMPLES)).astype(np.float32)
    err = rng.uniform(0.01, 0.1, (n, N_SAMPLES)).astype(np.float32)
    if n:  # the cases, in a table of 12 rows
        flux[1, :5] = np.nan  # non-finite flux: bad pixels
        err[2, 10:20] = 0.0  # no noise: bad
        err[2, 20:25] = np.inf
        err[2, 25:30] = np.nan
        err[3, 0] = 1e-30  # 1/err**2 overflows float32: inf ivar, a bad pixel
        err[4, :] = 0.0  # no good pixel at all: skipped with a reason
        flux[6], err[6] = flux[5], err[5]  # an exact repeat of row 5's star: read once
        flux[7] = flux[5] + 1.0  # row 5's star again with another spectrum: kept as row7
        ids = [f"2M{i:08d}+{i:07d}" for i in range(n)]
        ids[6] = ids[7] = ids[5]
        ids[8] = "AP17360115-2917271"  # an id no catalogue pattern knows
        ids[9] = "  2M00000009+0000009 "  # padded
        teff = rng.uniform(4000, 6000, n)
        teff[3] = np.nan
        medflux = rng.uniform(1e-17, 1e-16, n)
        medflux[2] = np.nan
        snr = rng.uniform(50, 200, n).astype(np.float32)
        snr[0] = np.inf
    else:
        ids, teff, medflux, snr = [], np.zeros(0), np.zeros(0), np.zeros(0, np.float32)
    cols = [
        fits.Column(name="flux", format=f"{N_SAMPLES}E", array=flux),
        fits.Column(name="flux_error", format=f"{N_SAMPLES}E", array=err),
        fits.Column(name="gaiaedr3_source_id", format="K", array=np.arange(n) + 10**18),
        fits.Column(name="teff", format="D", array=teff),
        fits.Column(name="logg", format="E", array=rng.uniform(1, 5, n).astype(np.float32)),
        fits.Column(name="medflux", format="D", array=medflux),
        fits.Column(name="snr", format="E", array=snr),
    ]
    if apogee_ids:
        cols.append(fits.Column(name="apogee_id", format="30A", array=np.array(ids)))
    fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU.from_columns(cols)]).writeto(path)
    return path


def _both_paths(path):
    kind, fmt, peek = classify_peek(path)
    assert (kind, fmt) == ("spectrum", "gaia_xp")
    assert get_reader(fmt).read_rows is not None
    kind, fmt, peek2 = classify_peek(path)
    return _read_spectra_units([_Unit(path, fmt, peek)]), _read_rows_unit(path, fmt, peek2)


def _same_column(a, b):
    return json.dumps(a.to_pylist()) == json.dumps(b.to_pylist()) and a.null_count == b.null_count


@pytest.mark.parametrize("apogee_ids", [True, False])
def test_columnar_unit_equals_the_spectrum_unit(tmp_path, apogee_ids):
    path = _xp_table(tmp_path / "xp.fits", apogee_ids=apogee_ids)
    spectra_unit, rows_unit = _both_paths(path)
    # 12 rows: one all bad; by apogee_id also one exact repeat (source ids are all different)
    assert rows_unit.keys == spectra_unit.keys and len(rows_unit.keys) == (10 if apogee_ids else 11)
    assert rows_unit.files == spectra_unit.files
    assert rows_unit.digests == spectra_unit.digests
    assert rows_unit.lines == spectra_unit.lines  # the records file's lines, made in the worker
    assert [repr(i) for i in rows_unit.identities] == [repr(i) for i in spectra_unit.identities]  # NaN positions
    assert rows_unit.skipped == spectra_unit.skipped and len(rows_unit.skipped) == 1
    assert rows_unit.batch().schema == spectra_unit.batch().schema
    for name in rows_unit.batch().schema.names:
        assert _same_column(rows_unit.batch().column(name), spectra_unit.batch().column(name)), name


def test_read_gaia_xp_records_are_the_rows(tmp_path):
    path = _xp_table(tmp_path / "xp.fits")
    records, rows = read_gaia_xp(path, keep_duplicates=True), read_gaia_xp_rows(path, keep_duplicates=True)
    assert [s.key for s in records] == rows.keys and len(records) == 12
    for i, s in enumerate(records):
        np.testing.assert_array_equal(s.ivar, rows.ivar[i])
        np.testing.assert_array_equal(s.mask, rows.mask[i])
    assert not rows.mask[3, 0] and rows.ivar[3, 0] == 0  # the overflowing ivar is a bad pixel
    assert not rows.mask[4].any()


def test_a_table_of_unreadable_or_no_records_is_skipped_with_the_reason(tmp_path):
    path = _xp_table(tmp_path / "xp.fits", n=0)
    spectra_unit, rows_unit = _both_paths(path)
    assert rows_unit.batch() is None and rows_unit.skipped == spectra_unit.skipped
    assert "found no spectrum" in rows_unit.skipped[0]["reason"]


def test_ingest_of_a_table_writes_the_rows_of_the_spectra(tmp_path):
    path = _xp_table(tmp_path / "xp.fits")
    report = ingest([path], tmp_path / "DS", workers=1, progress=False)
    from stellarfield.data.store import Dataset

    stored = {s.key: s for s in Dataset(tmp_path / "DS").iter_spectra()}
    assert report.n_spectra == 10 == len(stored)
    for s in read_gaia_xp(path):
        if s.mask.any():
            np.testing.assert_array_equal(stored[s.key].ivar, s.ivar)
            assert stored[s.key].meta == s.meta and stored[s.key].labels == s.labels


@pytest.mark.parametrize("spill", [True, False])
def test_a_big_table_crosses_to_the_writer_through_a_file_it_then_deletes(tmp_path, monkeypatch, spill):
    """Between processes (pickled), a table's pixels above ``SPILL_BYTES`` go through a file in the
    dataset's hidden folder, deleted once read; where it cannot be written, through the pipe.
    Either way the writer gets the same rows."""
    import pickle

    from stellarfield import ingest as module

    path = _xp_table(tmp_path / "xp.fits")
    kind, fmt, peek = classify_peek(path)
    spill_dir = tmp_path / ("scratch" if spill else "no-such-folder")
    if spill:
        spill_dir.mkdir()
    unit = _read_rows_unit(path, fmt, peek, str(spill_dir))
    expected = unit.batch()
    monkeypatch.setattr(module, "SPILL_BYTES", 0)
    data = pickle.dumps(unit)
    if spill:
        assert [p.name[:7] for p in spill_dir.iterdir()] == ["_spill-"]
        assert len(data) < expected.nbytes / 2
    received = pickle.loads(data)
    assert not spill_dir.exists() or not any(spill_dir.iterdir())
    got = received.batch()
    assert got.schema == expected.schema
    for name in expected.schema.names:  # (NaN flux: compared as JSON)
        assert _same_column(got.column(name), expected.column(name)), name


def test_a_table_read_in_blocks_by_two_workers_is_the_table_read_whole(tmp_path, monkeypatch):
    """Ingest reads a table of more than ``ROWS_PER_TASK`` rows in blocks, side by side: repeats are
    found over the whole file (row 6 repeats row 5 across a block boundary), and the dataset, the
    report and the records file are those of a whole read."""
    from stellarfield import ingest as module
    from stellarfield.data.store import Dataset

    path = _xp_table(tmp_path / "xp.fits")
    results = {}
    for name, rows_per_task, workers in (("whole", 10**6, 1), ("blocks", 3, 2)):
        monkeypatch.setattr(module, "ROWS_PER_TASK", rows_per_task)
        report = ingest([path], tmp_path / name, workers=workers, progress=False)
        ds = Dataset(tmp_path / name)
        results[name] = (ds.table(["key", "star_id", "split", "flux", "ivar", "mask", "meta", "provenance_hdu"]).to_pylist(),
                         report.spectra, report.skipped, report.duplicates,
                         (tmp_path / name / module.RECORDS_NAME).read_text())
    assert json.dumps(results["blocks"]) == json.dumps(results["whole"])  # (NaN fluxes compare as text)
    keys = [row["key"] for row in results["whole"][0]]
    assert len(keys) == 10 and sum(k.endswith("/row7") for k in keys) == 1  # row 6 left out, row 7 kept


def test_a_fault_of_the_whole_table_is_reported_once_however_many_blocks(tmp_path, monkeypatch):
    from stellarfield import ingest as module

    path = tmp_path / "xp.fits"
    rng = np.random.default_rng(1)
    cols = [fits.Column(name="flux", format=f"{N_SAMPLES}E", array=rng.normal(1, 0.1, (20, N_SAMPLES))),
            fits.Column(name="flux_error", format=f"{N_SAMPLES}E", array=np.full((20, N_SAMPLES), 0.05))]
    fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU.from_columns(cols)]).writeto(path)  # no star id column
    monkeypatch.setattr(module, "ROWS_PER_TASK", 4)
    with pytest.raises(module.NothingToIngestError) as error:
        ingest([path], tmp_path / "DS", workers=1, progress=False)
    assert [s["reason"] for s in error.value.report.skipped] == ["XP table has no star id column (apogee_id or source_id)"]


def test_repeats_are_the_same_spectrum_as_records_hold_it(tmp_path):
    """A float64 flux column: two rows of one star whose fluxes differ below float32's precision are
    one spectrum (the records are identical), found across blocks as in a whole read."""
    path = tmp_path / "xp.fits"
    flux = np.random.default_rng(2).normal(1.0, 0.1, (6, N_SAMPLES))
    flux[4] = flux[1] * (1 + 1e-12)
    ids = [f"2M{i:08d}+{i:07d}" for i in range(6)]
    ids[4] = ids[1]
    cols = [fits.Column(name="flux", format=f"{N_SAMPLES}D", array=flux),
            fits.Column(name="flux_error", format=f"{N_SAMPLES}E", array=np.full((6, N_SAMPLES), 0.05)),
            fits.Column(name="apogee_id", format="30A", array=np.array(ids))]
    fits.HDUList([fits.PrimaryHDU(), fits.BinTableHDU.from_columns(cols)]).writeto(path)
    whole = read_gaia_xp_rows(path)
    blocks = [read_gaia_xp_rows(path, slice(s, s + 2)) for s in (0, 2, 4)]
    assert len(whole) == 5 and sum((b.object_ids for b in blocks), []) == whole.object_ids
