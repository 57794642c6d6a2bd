"""Ingest at scale, on real files: the records are exactly the readers' records; an ingest split
into parts and merged equals one ingest; the dataset is plain Parquet (pyarrow.dataset, DuckDB).

Facts from the files (../shared/data): GALAH DR3 sobject 1403100038010491 is four CCD files, one
observation unit giving a rest-frame (``galah_dr3``) and an observed-frame (``galah_dr3_observed``)
record; LAMOST LRS and MRS spectra of KIC 8098300 are one star (``LAMOST J192814.09+435531.0``)
by position (lamost_laspec/NOTES.md), and two of its MRS nights hold no usable starlight.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from spectrum_asserts import assert_same_spectrum

from stellarfield.data.split import assign_split
from stellarfield.data.store import Dataset, DatasetExistsError
from stellarfield.ingest import MergeError, expand_sources, ingest, merge, part_of
from stellarfield.io import read_spectra

GALAH_UNIT = [f"galah/dr3/140310003801049{ccd}.fits" for ccd in (1, 2, 3, 4)]
FEW_FILES = [
    "miles/MILES_res2.50_star_m0501V.fits",
    "lamost/spec-55862-B6212_sp06-003.fits",
    "lamost_laspec/med-58408-TD230151N343645T01_sp01-015.fits",
    "lamost_laspec/med-58625-TD192102N424113K01_sp12-076.fits.gz",
    "apogee/apstar/apStar-r6-2M00452143+1634446.fits",
    *GALAH_UNIT,
]


def _one_star_per_file(shared_data: Path, rel: str) -> list:
    spectra = [s for s in read_spectra(shared_data / rel) if s.mask.any()]
    assert spectra, rel
    return spectra


def test_ingest_gives_exactly_the_records_the_readers_give(shared_data, tmp_path):
    """Every record of an ingest (two worker processes) equals the reader's record of its file:
    keys, pixels (wavelength, flux, ivar, mask, LSF) bit for bit with their dtypes, labels, meta,
    provenance; star id and split are the dataset's (the split drawn from the star id)."""
    files = [shared_data / rel for rel in FEW_FILES]
    report = ingest(files, tmp_path / "DS", workers=2, progress=False)
    assert report.spectra == {"apogee_apstar": 1, "galah_dr3": 1, "galah_dr3_observed": 1, "lamost_lrs": 1,
                              "lamost_mrs": 2, "miles": 1}
    assert not report.skipped and not report.duplicates

    direct = {}
    for rel in FEW_FILES[:-3]:  # the GALAH unit is read once, from its first CCD file
        for s in _one_star_per_file(shared_data, rel):
            direct[s.key] = s
    ds = Dataset(tmp_path / "DS")
    stored = {s.key: s for s in ds.iter_spectra()}
    assert sorted(stored) == sorted(direct) and len(stored) == 7
    for key, s in stored.items():
        assert_same_spectrum(direct[key], s)
    splits = dict(zip(*ds.table(["key", "split"]).to_pydict().values()))
    assert all(splits[k] == assign_split(s.star_id or s.object_id) for k, s in stored.items())
    assert stored["miles/m0501"].star_id == "HD 124897"  # Arcturus
    galah = stored["galah_dr3/140310003801049"]
    assert [seg.name for seg in galah.segments] == ["ccd1", "ccd2", "ccd3", "ccd4"] and galah.star_id is None

    # the records file merge relies on: one line per row, the keys and pixel digests of the rows
    lines = [json.loads(line) for line in (tmp_path / "DS" / "_ingest_records.jsonl").read_text().splitlines()]
    assert sorted(r["key"] for r in lines) == sorted(stored)
    from stellarfield.ingest import pixel_digest

    assert {r["key"]: r["digest"] for r in lines} == {k: pixel_digest(direct[k]) for k in stored}


def _mixed_sources(shared_data: Path) -> list[Path]:
    """Files of several products, ordered so that the middle of the list (the 2-part boundary)
    falls inside the four-file GALAH unit, and KIC 8098300's LRS and MRS spectra land in both parts."""
    laspec = sorted((shared_data / "lamost_laspec").glob("*.fits*"))
    miles = sorted((shared_data / "miles").glob("MILES_res2.50_star_m00[0-1]*V.fits"))[:6]
    apogee = sorted((shared_data / "apogee" / "apvisit").glob("*.fits"))[:3]
    galah = [shared_data / rel for rel in GALAH_UNIT]
    before = laspec[:5] + miles[:4] + apogee[:1]
    after = apogee[1:] + laspec[5:] + [shared_data / "lamost_laspec" / "NOTES.md"] + miles[4:]
    assert len(before) == len(after) == 10  # so 2 of the 4 GALAH files fall before the middle, 2 after
    return before + galah + after


def test_two_parts_merged_equal_one_ingest(shared_data, tmp_path):
    files = _mixed_sources(shared_data)
    first, second = part_of(files, 0, 2), part_of(files, 1, 2)
    assert first + second == files and first[-1].name.endswith("92.fits") and second[0].name.endswith("93.fits")

    whole = ingest(files, tmp_path / "ONE", workers=2, progress=False)
    parts = [ingest(files, tmp_path / f"PART{i}", workers=2, progress=False, part=(i, 2)) for i in (0, 1)]
    assert [p.part for p in parts] == [[0, 2], [1, 2]]
    assert parts[0].n_files + parts[1].n_files == whole.n_files == len(files)
    merged = merge([tmp_path / "PART1", tmp_path / "PART0"], tmp_path / "MERGED", progress=False)  # any order

    one, both = Dataset(tmp_path / "ONE"), Dataset(tmp_path / "MERGED")
    assert both.counts() == one.counts() == whole.spectra == merged.spectra
    assert both.manifest["splits"] == one.manifest["splits"]
    assert both.manifest["stars"]["n_stars"] == one.manifest["stars"]["n_stars"]
    rows_one = one.table(["key", "star_id", "split", "provenance_file"]).to_pylist()
    rows_both = both.table(["key", "star_id", "split", "provenance_file"]).to_pylist()
    assert rows_both == rows_one  # same keys, star ids, splits, files, in the same order
    # KIC 8098300: LRS in part 1, MRS in both; one star id, one split, resolved across parts
    kic = [r for r in rows_both if r["star_id"] == "LAMOST J192814.09+435531.0"]
    assert {r["key"].split("/")[0] for r in kic} == {"lamost_lrs", "lamost_mrs"} and len({r["split"] for r in kic}) == 1
    # the GALAH unit split between the parts was read by both and is kept once, the copy reported
    assert [d["key"] for d in merged.duplicates] == ["galah_dr3/140310003801049", "galah_dr3_observed/140310003801049"] \
        or sorted(d["key"].split("/")[0] for d in merged.duplicates) == ["galah_dr3", "galah_dr3_observed"]
    assert all("identical copy" in d["reason"] for d in merged.duplicates)
    # skipped files (the two nights without starlight) and auxiliary files are reported as by one ingest
    assert sorted(s["file"] for s in merged.skipped) == sorted(s["file"] for s in whole.skipped)
    assert len(whole.skipped) == 2 and [a["file"] for a in merged.auxiliary] == [a["file"] for a in whole.auxiliary]
    # pixels: every merged record is the single ingest's record
    for key in ("galah_dr3/140310003801049", rows_one[0]["key"], rows_one[-1]["key"]):
        if any(r["key"] == key for r in rows_one):
            assert_same_spectrum(one.get(key), both.get(key))
    assert both.verify() == []
    # merged into small shards: rows cross shard boundaries inside a part's row groups; every shard's
    # counts per product and split still match the manifest (full verify), and the rows are the same
    small = merge([tmp_path / "PART0", tmp_path / "PART1"], tmp_path / "SMALL", progress=False, shard_size=7)
    assert len(Dataset(tmp_path / "SMALL").manifest["shards"]) == -(-len(one) // 7) and small.spectra == whole.spectra
    assert Dataset(tmp_path / "SMALL").verify() == []
    assert Dataset(tmp_path / "SMALL").table(["key", "star_id", "split", "provenance_file"]).to_pylist() == rows_one
    # a merged dataset can itself be merged (with other datasets) again: it carries its records
    assert len((tmp_path / "MERGED" / "_ingest_records.jsonl").read_text().splitlines()) == len(both)


def test_merge_checks_the_parts_and_never_loses_data(shared_data, tmp_path):
    files = sorted((shared_data / "lamost_laspec").glob("*.fits*"))
    for i in range(3):
        ingest(files, tmp_path / f"P{i}", workers=1, progress=False, part=(i, 3))
    parts = [tmp_path / f"P{i}" for i in range(3)]
    out = tmp_path / "OUT"
    with pytest.raises(MergeError, match="part\\(s\\) 1/3 missing"):
        merge([parts[0], parts[2]], out, progress=False)
    with pytest.raises(MergeError, match="part 2/3 given twice"):
        merge([parts[0], parts[1], parts[2], parts[2]], out, progress=False)
    ingest(files[:3], tmp_path / "OTHER", workers=1, progress=False, part=(0, 2))
    with pytest.raises(MergeError, match="not from the same split"):
        merge([parts[0], parts[1], parts[2], tmp_path / "OTHER"], out, progress=False)
    with pytest.raises(MergeError, match="nothing-here: the path does not exist"):
        merge([parts[0], tmp_path / "nothing-here"], out, progress=False)
    (tmp_path / "a-folder").mkdir()
    with pytest.raises(MergeError, match="a-folder is not a stellarfield dataset"):
        merge([parts[0], tmp_path / "a-folder"], out, progress=False)
    # another schema version is refused, naming the part
    shutil.copytree(parts[2], tmp_path / "P2new")
    manifest = json.loads((tmp_path / "P2new" / "_manifest.json").read_text())
    manifest["schema_version"] = 1
    (tmp_path / "P2new" / "_manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(MergeError, match="P2new: schema version 1 differs"):
        merge([parts[0], parts[1], tmp_path / "P2new"], out, progress=False)
    assert not out.exists()

    report = merge(parts, out, progress=False)
    assert report.spectra == {"lamost_lrs": 2, "lamost_mrs": 6} and len(Dataset(out)) == 8
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(DatasetExistsError):
        merge(parts, out, progress=False)
    # a part damaged after it was written: the merge fails, naming the shard; the existing dataset and
    # the parts are untouched and nothing half-written is left
    shard = parts[1] / "shard-00000.parquet"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(Exception, match="shard-00000.parquet"):
        merge(parts, out, force=True, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    assert len(Dataset(parts[0])) + len(Dataset(parts[2])) > 0  # the other parts still read


def test_dataset_is_plain_parquet_for_pyarrow_and_duckdb(shared_data, tmp_path):
    """Read without stellarfield's store: pyarrow.dataset and DuckDB see the rows, columns and values
    the manifest and the readers give."""
    import pyarrow.dataset as pads

    duckdb = pytest.importorskip("duckdb")
    files = [shared_data / rel for rel in FEW_FILES]
    ingest(files, tmp_path / "DS", workers=1, progress=False, shard_size=3)  # several shards
    folder = tmp_path / "DS"
    manifest = json.loads((folder / "_manifest.json").read_text())
    assert len(manifest["shards"]) == 3

    table = pads.dataset(folder, format="parquet").to_table()  # the bare folder: the manifest and reports start with _
    assert table.num_rows == manifest["n_spectra"] == 7
    assert {"key", "star_id", "split", "wavelength", "flux", "ivar", "mask", "label_teff"} <= set(table.column_names)
    counts = {}
    for product in table.column("product").to_pylist():
        counts[product] = counts.get(product, 0) + 1
    assert counts == manifest["counts"]
    splits = {name: table.column("split").to_pylist().count(name) for name in manifest["splits"]}
    assert splits == manifest["splits"]

    glob = str(folder / "*.parquet")
    con = duckdb.connect()
    n, = con.execute(f"select count(*) from read_parquet('{glob}')").fetchone()
    assert n == 7
    by_product = dict(con.execute(f"select product, count(*) from read_parquet('{glob}') group by product").fetchall())
    assert by_product == manifest["counts"]
    # values: Arcturus (MILES m0501) as the reader gives it
    arcturus = next(s for s in read_spectra(shared_data / FEW_FILES[0]))
    key, teff, n_pixels, flux, wavelength, mask = con.execute(
        f"select key, label_teff, n_pixels, flux, wavelength, mask from read_parquet('{glob}') where object_id = 'm0501'"
    ).fetchone()
    assert key == arcturus.key and teff == pytest.approx(4361) == arcturus.labels["teff"]
    assert n_pixels == arcturus.n_pixels == len(flux)
    assert np.array_equal(np.asarray(flux, dtype=np.float32), arcturus.flux)
    assert np.array_equal(np.asarray(wavelength), arcturus.wavelength)
    assert np.array_equal(np.asarray(mask), arcturus.mask)
    row = table.filter(pa.compute.equal(table.column("key"), arcturus.key))
    assert np.array_equal(row.column("ivar")[0].values.to_numpy(), arcturus.ivar)


def test_part_of_is_a_deterministic_cover(tmp_path):
    files = [Path(f"f{i:03d}") for i in range(10)]
    blocks = [part_of(files, i, 3) for i in range(3)]
    assert [len(b) for b in blocks] == [3, 3, 4] and sum(blocks, []) == files
    assert part_of(files, 1, 3) == blocks[1]
    assert [part_of(files[:2], i, 4) for i in range(4)] == [[], [files[0]], [], [files[1]]]  # empty parts are fine
    with pytest.raises(ValueError, match="0 <= INDEX < COUNT"):
        part_of(files, 3, 3)
    missing = expand_sources([tmp_path / "nope"])[1]
    assert missing and "no such file" in missing[0]["reason"]


def test_shards_written_in_the_background_and_rewritten_where_ids_change_hold_the_resolved_rows(shared_data, tmp_path):
    """Shards written by the background thread with the ids the rows give, and rewritten at close
    where resolution changes one, hold the same rows whether the records span three shards or sit
    in one. KIC 8098300's three LAMOST designations resolve to one star id across shards."""
    from stellarfield.data.store import DatasetWriter
    from stellarfield.ingest import spectra_from_sources

    spectra = list(spectra_from_sources([shared_data / "lamost_laspec"]))
    assert len(spectra) == 8
    tables = {}
    for shard_size, n_shards in ((3, 3), (100, 1)):
        with DatasetWriter(tmp_path / str(shard_size), shard_size=shard_size) as writer:
            writer.write_many(spectra)
        assert sorted(p.name for p in (tmp_path / str(shard_size)).iterdir()) == ["_manifest.json"] + [
            f"shard-0000{i}.parquet" for i in range(n_shards)]
        ds = Dataset(tmp_path / str(shard_size))
        assert ds.verify() == []
        assert [s["bytes"] for s in ds.manifest["shards"]] == [
            (tmp_path / str(shard_size) / s["file"]).stat().st_size for s in ds.manifest["shards"]]
        tables[shard_size] = (ds.table(list(ds.table(["key"]).schema.names) + ["star_id", "split", "flux", "meta"]),
                              ds.manifest["splits"], ds.manifest["stars"])
    assert tables[3] == tables[100]
    rows = tables[3][0].to_pylist()
    kic = [r for r in rows if r["star_id"] == "LAMOST J192814.09+435531.0"]
    assert len(kic) == 6 and len({r["split"] for r in kic}) == 1
    assert tables[3][2]["rows_resolved"] > 0  # rows were rewritten


@pytest.mark.parametrize("relative", ["apogee/apstar/apStar-r6-2M00452143+1634446.fits",
                                      "lamost_laspec/med-58625-TD192102N424113K01_sp12-076.fits.gz",
                                      "galah/dr3/1403100038010491.fits"])
def test_peek_headers_come_from_the_structure_walk_and_equal_astropys(shared_data, relative):
    """The header bytes kept by peek's structure walk parse into the headers astropy gives for every
    HDU (every keyword's value; a plain header as a :class:`~stellarfield.io.fits_cards.CardHeader`),
    so identification no longer opens each file a second time."""
    import warnings

    from astropy.io import fits

    from stellarfield.io.peek import peek_file

    peek = peek_file(shared_data / relative)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with fits.open(shared_data / relative) as hdul:
                assert len(peek._raw_headers) == len(hdul) >= 1
                for i, hdu in enumerate(hdul):
                    ours = peek.header(i)
                    keywords = [k for k in dict.fromkeys(hdu.header.keys()) if k not in ("", "COMMENT", "HISTORY")]
                    assert sorted(k for k in ours if k not in ("", "COMMENT", "HISTORY")) == sorted(keywords)
                    for keyword in keywords:
                        try:
                            theirs = hdu.header[keyword]
                        except fits.VerifyError:
                            continue
                        assert ours[keyword] == theirs and type(ours[keyword]) is type(theirs), (i, keyword)
                assert peek.header(len(hdul)) is None
        assert peek._hdul is None  # never opened through astropy
    finally:
        peek.close()


def test_cli_parts_and_merge(shared_data, tmp_path, capsys):
    """``ingest --part I/N`` and ``merge`` from the command line; an empty part (only a NOTES.md) is
    still written so that merge sees every part; bad part specs and incomplete merges are one-line errors."""
    from stellarfield.cli import EXIT_USAGE, main

    sources = [str(shared_data / "lamost_laspec" / "NOTES.md"), str(shared_data / "miles" / "MILES_res2.50_star_m0501V.fits"),
               str(shared_data / "lamost" / "spec-55862-B6212_sp06-003.fits")]
    for i in range(3):
        assert main(["ingest", *sources, "--out", str(tmp_path / f"p{i}"), "--part", f"{i}/3", "--quiet",
                     "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "part 0 of 3: ingested 0 spectra from 1 files" in out and "part 2 of 3: ingested 1 spectra" in out
    assert main(["merge", str(tmp_path / "p2"), str(tmp_path / "p0"), "--out", str(tmp_path / "M"), "--quiet"]) == EXIT_USAGE
    assert "part(s) 1/3 missing" in capsys.readouterr().err and not (tmp_path / "M").exists()
    assert main(["merge", *(str(tmp_path / f"p{i}") for i in (2, 0, 1)), "--out", str(tmp_path / "M"), "--quiet"]) == 0
    assert "merged 3 parts: 2 spectra from 3 files" in capsys.readouterr().out
    assert Dataset(tmp_path / "M").counts() == {"lamost_lrs": 1, "miles": 1}
    for bad in ("3/3", "1", "a/2", "-1/2"):
        with pytest.raises(SystemExit) as stop:
            main(["ingest", *sources, "--out", str(tmp_path / "x"), "--part", bad])
        assert stop.value.code == EXIT_USAGE
    assert "--part" in capsys.readouterr().err


def test_ingest_looks_at_each_file_once(shared_data, tmp_path, monkeypatch):
    """Identification and reading share one peek per file (no second structure walk), and the
    dataset is the one the readers give."""
    from stellarfield.io import registry

    folder = tmp_path / "in"
    for rel in FEW_FILES:
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(shared_data / rel, folder / rel)
    looks: list[str] = []
    real_peek_file = registry.peek_file
    monkeypatch.setattr(registry, "peek_file", lambda path: looks.append(str(path)) or real_peek_file(path))
    report = ingest([folder], tmp_path / "DS", workers=1, progress=False)
    assert sorted(looks) == sorted(str(folder / rel) for rel in FEW_FILES)
    assert report.n_spectra == len(Dataset(tmp_path / "DS")) > 0 and not report.skipped


class _LazyFuture:
    def __init__(self, pool, fn, args):
        self.pool, self.fn, self.args = pool, fn, args

    def done(self):
        return False  # it runs only when its result is asked for

    def result(self):
        self.pool.outstanding -= 1
        return self.fn(*self.args)


class _CountingPool:
    """An executor whose tasks run when their result is asked for; it records the most tasks in flight."""

    _max_workers = 2

    def __init__(self):
        self.outstanding = self.most = 0

    def submit(self, fn, *args):
        self.outstanding += 1
        self.most = max(self.most, self.outstanding)
        return _LazyFuture(self, fn, args)


@pytest.mark.parametrize("file_mb", [0.0, 1.0, 100.0])
def test_read_ahead_is_bounded_by_tasks_or_by_the_bytes_of_the_files_in_flight(file_mb):
    """Results come back in order whatever the read-ahead; tasks in flight are at most
    TASKS_AHEAD per worker, or more while their files hold at most READ_AHEAD_BYTES."""
    from stellarfield import ingest as module

    pool, items = _CountingPool(), list(range(4000))
    size = (lambda item: int(file_mb * 2**20)) if file_mb else None
    results = list(module._map(pool, lambda block: [2 * i for i in block], items, False, "", "", _NoBar,
                               chunk=1, size=size))
    assert results == [2 * i for i in items]
    by_tasks = module.TASKS_AHEAD * pool._max_workers
    if not file_mb or file_mb * 2**20 * by_tasks > module.READ_AHEAD_BYTES:
        assert pool.most == by_tasks
    else:  # small files: read further ahead, as far as the byte bound allows
        assert pool.most == module.READ_AHEAD_BYTES // int(file_mb * 2**20) + 1


class _NoBar:
    def __init__(self, **kwargs):
        self.n, self.format_dict = 0, {}

    def update(self, n):
        self.n += n

    def set_postfix_str(self, *args, **kwargs):
        pass

    def close(self):
        pass


def test_real_path_is_resolve_and_follows_a_link_pointed_elsewhere(tmp_path):
    from stellarfield.paths import real_path

    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "f.fits").write_text(folder)
    link = tmp_path / "current"
    link.symlink_to(tmp_path / "a")
    (tmp_path / "a" / "g.fits").symlink_to(tmp_path / "b" / "f.fits")
    for path in (link / "f.fits", tmp_path / "a" / "g.fits", tmp_path / "a" / ".." / "b" / "f.fits", tmp_path):
        assert real_path(path) == path.resolve()
    link.unlink()
    link.symlink_to(tmp_path / "b")
    real_path.cache_clear()  # as ingest does when it lists its sources
    assert real_path(link / "f.fits") == tmp_path / "b" / "f.fits"
