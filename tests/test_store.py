"""The dataset store: exact round trip, atomic writes, streaming in flat memory, splits."""

from __future__ import annotations

import json
import math
import re
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from spectrum_asserts import assert_same_spectrum

from stellarfield.data import Dataset, DatasetExistsError, DatasetWriter, NotADatasetError, assign_split
from stellarfield.data.store import SCHEMA, spectra_to_batch
from stellarfield.spectrum import LABEL_NAMES, Segment, Spectrum


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def segment(name: str, start: float, n: int, rng, lsf: bool = False, bad: int = 0) -> Segment:
    wave = start * 10 ** (6e-6 * np.arange(n))  # log-linear, like APOGEE
    flux = rng.normal(1.0, 0.05, n).astype(np.float32)
    flux[:bad] = np.nan
    return Segment(
        name, wave, flux, rng.uniform(100, 1e4, n).astype(np.float32), rng.random(n) > 0.1,
        rng.uniform(0.2, 0.4, n).astype(np.float32) if lsf else None,
    )


def varied_spectra() -> list[Spectrum]:
    """Records that exercise every field: several segments, LSF present / absent / mixed, NaN labels."""
    rng = np.random.default_rng(42)
    return [
        Spectrum(  # three chips of different lengths, every label, a visit id
            "2M00452143+1634446", "APOGEE", "APOGEE-N", "apogee_apvisit",
            [segment("chip_c", 15140.0, 90, rng, bad=3), segment("chip_b", 15860.0, 101, rng),
             segment("chip_a", 16470.0, 77, rng)],
            "observed", "flux", observation_id="56257-7116-123", resolution=22500.0, flux_unit="1e-17 erg / (Angstrom s cm2)",
            labels={"teff": 4651.2, "logg": 2.51, "fe_h": -0.31, "alpha_m": 0.08, "rv_kms": -41.3, "snr": 87.0},
            provenance={"file": "/data/apVisit-0.fits", "hdu": "1,2,3,4"},
            meta={"TELESCOP": "apo25m", "NVISITS": 3, "BC": 12.5, "good": True, "missing": None},
        ),
        Spectrum(  # LSF on every CCD, NaN labels next to real ones, no observation id
            "131216001101026", "GALAH", "HERMES", "galah_pipeline6",
            [segment("ccd1", 4715.0, 60, rng, lsf=True), segment("ccd2", 5650.0, 61, rng, lsf=True)],
            "observed", "flux", labels={"teff": 5772.0, "logg": float("nan"), "rv_kms": float("nan")},
            provenance={"file": "/data/1312160011010261.fits", "hdu": "0,1,2,7", "group": "4 CCD files"},
        ),
        Spectrum(  # LSF on one segment only
            "131216001101027", "GALAH", "HERMES", "galah_pipeline6",
            [segment("ccd1", 4715.0, 40, rng), segment("ccd2", 5650.0, 41, rng, lsf=True)],
            "observed", "flux",
        ),
        Spectrum(  # no noise model (MILES): ivar 0 everywhere, no labels at all, no provenance
            "m0002", "MILES", "INT-IDS", "miles", [Segment("full", np.linspace(3540.5, 7409.6, 120),
                                                        np.linspace(0.5, 1.5, 120), np.zeros(120), np.ones(120, bool))],
            "rest", "flux", noise_known=False, flux_unit="",
        ),
        Spectrum(  # continuum-normalised, empty-string observation id, one pixel
            "2M03122509+0021585", "APOGEE", "APOGEE-N", "apogee_aspcap",
            [Segment("full", [16000.0], [0.97], [2500.0], [True])], "rest", "continuum", observation_id="",
            meta={"note": "ünïcode ✓", "nested": [1, 2.5, "x"]},
        ),
    ]


def sibling_leftovers(path: Path) -> list[str]:
    """Hidden temporary / old folders a writer might have left next to ``path``."""
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}."))


def write(path: Path, spectra, **kwargs) -> Path:
    with DatasetWriter(path, **kwargs) as writer:
        writer.write_many(spectra)
    return path


# ----------------------------------------------------------------------------------------------
# round trip and format
# ----------------------------------------------------------------------------------------------
def test_round_trip_is_exact(tmp_path):
    spectra = varied_spectra()
    path = write(tmp_path / "ds", spectra, shard_size=2, metadata={"source": "unit test"})
    ds = Dataset(path)
    assert len(ds) == 5
    back = list(ds.iter_spectra())
    assert [s.key for s in back] == [s.key for s in spectra]
    for a, b in zip(spectra, back):
        assert_same_spectrum(a, b)
    # random access gives the same records
    assert_same_spectrum(ds[3], spectra[3])
    assert_same_spectrum(ds[-1], spectra[4])
    assert_same_spectrum(ds.get("galah_pipeline6/131216001101027"), spectra[2])
    assert_same_spectrum(ds.get("apogee_apvisit/2M00452143+1634446/56257-7116-123"), spectra[0])
    with pytest.raises(KeyError, match="apogee_apvisit/nope"):
        ds.get("apogee_apvisit/nope")
    with pytest.raises(IndexError):
        ds[5]
    # facts of the records, not only equality
    assert back[1].labels["teff"] == 5772.0 and math.isnan(back[1].labels["logg"])
    assert "fe_h" not in back[1].labels
    assert back[2].segments[0].lsf_fwhm is None and back[2].segments[1].lsf_fwhm.shape == (41,)
    assert back[0].segments[0].mask[:3].tolist() == [False] * 3 and back[0].segments[0].ivar[:3].tolist() == [0, 0, 0]
    assert back[0].segments[1].wavelength[0] == 15860.0
    assert back[4].observation_id == "" and back[3].observation_id is None
    assert back[0].meta["missing"] is None and back[4].meta["note"] == "ünïcode ✓"
    # the records own writable memory
    back[0].segments[0].flux[0] = 1.0


def test_numpy_scalars_in_meta_come_back_as_python_scalars(tmp_path):
    rng = np.random.default_rng(0)
    s = Spectrum("a", "S", "I", "p", [segment("full", 5000.0, 5, rng)], "rest", "flux",
                 meta={"n": np.int64(3), "x": np.float32(0.5), "b": np.bool_(True)})
    back = next(Dataset(write(tmp_path / "ds", [s])).iter_spectra())
    assert back.meta == {"n": 3, "x": 0.5, "b": True}
    assert type(back.meta["n"]) is int


def test_schema_columns_and_types(tmp_path):
    path = write(tmp_path / "ds", varied_spectra(), shard_size=2)
    schema = pq.read_schema(path / "shard-00000.parquet")
    expected = {
        "key": pa.string(), "object_id": pa.string(), "observation_id": pa.string(), "resolution": pa.float64(),
        "noise_known": pa.bool_(), "split": pa.string(), "n_pixels": pa.int64(),
        "segment_names": pa.list_(pa.string()), "segment_lengths": pa.list_(pa.int32()),
        "wavelength": pa.list_(pa.float64()), "flux": pa.list_(pa.float32()), "ivar": pa.list_(pa.float32()),
        "mask": pa.list_(pa.bool_()), "lsf_fwhm": pa.list_(pa.float32()), "meta": pa.string(),
        "provenance_file": pa.string(), "provenance_hdu": pa.string(),
        **{f"label_{name}": pa.float64() for name in LABEL_NAMES},
    }
    for name, type_ in expected.items():
        assert schema.field(name).type == type_, name
    assert schema.names == SCHEMA.names
    meta = pq.ParquetFile(path / "shard-00000.parquet").metadata
    assert meta.row_group(0).column(0).compression == "ZSTD"

    table = Dataset(path).table(["key", "n_pixels", "segment_lengths", "label_teff", "label_logg", "lsf_fwhm"])
    assert table.column("n_pixels").to_pylist() == [268, 121, 81, 120, 1]
    assert table.column("segment_lengths").to_pylist()[0] == [90, 101, 77]
    # NaN label stays NaN, a missing label is null
    assert table.column("label_teff").to_pylist()[1] == 5772.0
    assert math.isnan(table.column("label_logg").to_pylist()[1])
    assert table.column("label_logg").to_pylist()[3] is None
    # lsf: null row without any LSF; null elements for the segment without one
    lsf = table.column("lsf_fwhm")
    assert lsf[0].as_py() is None
    row = lsf[2].as_py()
    assert len(row) == 81 and row[:40] == [None] * 40 and None not in row[40:]


def test_manifest(tmp_path):
    spectra = varied_spectra()
    path = write(tmp_path / "ds", spectra, shard_size=2, metadata={"source": "unit test", "n": 5})
    manifest = json.loads((path / "_manifest.json").read_text())
    assert manifest["format"] == "stellarfield-dataset" and manifest["version"] == 1 and manifest["complete"] is True
    assert manifest["n_spectra"] == 5
    assert manifest["counts"] == {"apogee_apvisit": 1, "galah_pipeline6": 2, "miles": 1, "apogee_aspcap": 1} | {}
    assert [s["file"] for s in manifest["shards"]] == ["shard-00000.parquet", "shard-00001.parquet", "shard-00002.parquet"]
    assert [s["n_spectra"] for s in manifest["shards"]] == [2, 2, 1]
    for shard in manifest["shards"]:
        assert shard["bytes"] == (path / shard["file"]).stat().st_size
    expected_splits = {"train": 0, "validation": 0, "test": 0}
    for s in spectra:
        expected_splits[assign_split(s.object_id)] += 1
    assert manifest["splits"] == expected_splits
    assert manifest["metadata"] == {"source": "unit test", "n": 5}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", manifest["created"])
    assert manifest["stellarfield_version"] and manifest["schema_version"] == 2
    assert manifest["pixels"]["galah_pipeline6"] == {"total": 202, "min": 81, "max": 121}
    ds = Dataset(path)
    assert ds.metadata == {"source": "unit test", "n": 5}
    assert ds.counts() == manifest["counts"]
    assert sorted(p.name for p in path.iterdir()) == ["_manifest.json"] + [s["file"] for s in manifest["shards"]]
    text = ds.summary()
    assert "galah_pipeline6" in text and "81-121" in text and "5 spectra in 3 shard(s)" in text
    assert "unit test" in text


def test_writer_counts_and_refusals(tmp_path):
    spectra = varied_spectra()
    with DatasetWriter(tmp_path / "ds") as writer:
        writer.write(spectra[1])
        writer.write(spectra[2])
        assert writer.counts == {"galah_pipeline6": 2}
        with pytest.raises(ValueError, match="duplicate spectrum key 'galah_pipeline6/131216001101026'"):
            writer.write(spectra[1])
        with pytest.raises(TypeError):
            writer.write("not a spectrum")
    with pytest.raises(RuntimeError):
        writer.write(spectra[0])
    assert len(Dataset(tmp_path / "ds")) == 2


def test_resolved_rows_are_counted_split_and_kept(tmp_path):
    """write_resolved_rows: rows with final star ids (generated stars) after an ordinary record; a
    shard boundary inside the batch; the manifest counts them, each its own star; splits by star id."""
    rng = np.random.default_rng(3)
    spectra = [Spectrum(f"syn{i:04d}", "SYN", "SYN", "synthetic", [segment("full", 5000.0, 10 + i % 3, rng)],
                        "rest", "continuum", star_id=f"syn-star-{i}") for i in range(600)]
    batch = spectra_to_batch(spectra, ["test"] * 600)  # the split column is the store's to draw
    with DatasetWriter(tmp_path / "ds", shard_size=400) as writer:
        writer.write(varied_spectra()[3])
        with pytest.raises(ValueError, match="no star_id"):
            writer.write_resolved_rows(spectra_to_batch(spectra[:2], ["test"] * 2, [None, "x"]))
        writer.write_resolved_rows(batch)
        assert writer.counts == {"miles": 1, "synthetic": 600}
    ds = Dataset(tmp_path / "ds")
    assert ds.verify() == [] and len(ds) == 601 and ds.counts() == {"miles": 1, "synthetic": 600}
    table = ds.table(["key", "star_id", "split"])
    assert table.column("key").to_pylist() == ["miles/m0002"] + [s.key for s in spectra]
    assert table.column("star_id").to_pylist()[1:] == [s.star_id for s in spectra]
    splits = table.column("split").to_pylist()
    assert splits[1:] == [assign_split(s.star_id) for s in spectra]
    m = ds.manifest
    assert m["splits"] == {name: splits.count(name) for name in ("train", "validation", "test")}
    assert m["pixels"]["synthetic"] == {"total": sum(s.n_pixels for s in spectra), "min": 10, "max": 12}
    assert m["stars"]["n_stars"] == 601 and m["stars"]["rows_resolved"] == 0
    # the boundary falls inside the batch: row groups of <= 256 rows, none across it
    assert [s["n_spectra"] for s in m["shards"]] == [400, 201]
    assert [s["counts"] for s in m["shards"]] == [{"miles": 1, "synthetic": 399}, {"synthetic": 201}]
    groups = []
    for shard in m["shards"]:
        meta = pq.ParquetFile(tmp_path / "ds" / shard["file"]).metadata
        groups.append([meta.row_group(g).num_rows for g in range(meta.num_row_groups)])
    assert groups == [[1, 256, 143], [201]]
    assert_same_spectrum(ds[600], spectra[599])


def test_empty_dataset(tmp_path):
    ds = Dataset(write(tmp_path / "ds", []))
    assert len(ds) == 0 and list(ds.iter_spectra()) == [] and ds.table(["key"]).num_rows == 0


# ----------------------------------------------------------------------------------------------
# atomicity
# ----------------------------------------------------------------------------------------------
class Boom(Exception):
    pass


def test_exception_inside_with_leaves_nothing(tmp_path):
    path = tmp_path / "ds"
    with pytest.raises(Boom):
        with DatasetWriter(path, shard_size=1) as writer:
            writer.write_many(varied_spectra())  # several shards already on disk
            assert sibling_leftovers(path)  # the hidden temporary folder exists while writing
            assert not path.exists()
            raise Boom
    assert not path.exists()
    assert sibling_leftovers(path) == []


def test_existing_dataset_is_refused_and_untouched(tmp_path):
    path = write(tmp_path / "ds", varied_spectra()[:2])
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    with pytest.raises(DatasetExistsError) as info:
        DatasetWriter(path)
    assert str(path) in str(info.value) and "overwrite=True" in str(info.value) and "--force" in str(info.value)
    assert isinstance(info.value, FileExistsError)
    # a failed overwrite leaves the old dataset as it was
    with pytest.raises(Boom):
        with DatasetWriter(path, overwrite=True) as writer:
            writer.write_many(varied_spectra())
            raise Boom
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert sibling_leftovers(path) == []
    assert len(Dataset(path)) == 2


def test_overwrite_replaces(tmp_path):
    path = write(tmp_path / "ds", varied_spectra()[:2])
    write(path, varied_spectra()[3:], overwrite=True)
    ds = Dataset(path)
    assert ds.counts() == {"miles": 1, "apogee_aspcap": 1}
    assert sibling_leftovers(path) == []


def test_overwrite_never_deletes_a_folder_that_is_not_a_dataset(tmp_path):
    folder = tmp_path / "my_thesis"
    folder.mkdir()
    (folder / "chapter1.tex").write_text("precious")
    with pytest.raises(DatasetExistsError, match="not a stellarfield dataset"):
        DatasetWriter(folder, overwrite=True)
    assert (folder / "chapter1.tex").read_text() == "precious"
    assert sibling_leftovers(folder) == []


def test_incomplete_folders_are_not_datasets(tmp_path):
    path = write(tmp_path / "ds", varied_spectra()[:2])
    manifest = path / "_manifest.json"
    content = json.loads(manifest.read_text())

    manifest.unlink()  # as if the write had been interrupted before the manifest
    with pytest.raises(NotADatasetError, match=re.escape(str(path)) + ".*no _manifest.json"):
        Dataset(path)

    manifest.write_text(json.dumps(content | {"complete": False}))
    with pytest.raises(NotADatasetError, match='"complete": true'):
        Dataset(path)

    manifest.write_text(json.dumps(content))
    (path / "shard-00000.parquet").unlink()
    with pytest.raises(NotADatasetError, match="shard-00000.parquet"):
        Dataset(path)

    with pytest.raises(FileNotFoundError, match="nowhere"):
        Dataset(tmp_path / "nowhere")


# ----------------------------------------------------------------------------------------------
# a large synthetic dataset: streaming, splits, filters
# ----------------------------------------------------------------------------------------------
N_SPECTRA, N_PIXELS = 20_000, 300
RAW_BYTES = N_SPECTRA * N_PIXELS * (8 + 4 + 4 + 1)  # wavelength, flux, ivar, mask: 102 MB


@pytest.fixture(scope="module")
def big_dataset(tmp_path_factory) -> Dataset:
    """20,000 spectra of 10,000 stars (two observations each), two products, five shards."""
    rng = np.random.default_rng(7)
    wave = 5000.0 + np.arange(N_PIXELS, dtype=np.float64)
    good = np.ones(N_PIXELS, dtype=bool)

    def spectra():
        for i in range(N_SPECTRA):
            star = i // 2
            flux = rng.normal(1.0, 0.01, N_PIXELS).astype(np.float32)
            yield Spectrum(
                f"star{star:05d}", "SYN", "synth", "synth_even" if star % 2 == 0 else "synth_odd",
                [Segment("full", wave, flux, np.full(N_PIXELS, 1e4, np.float32), good)],
                "rest", "continuum", observation_id=f"visit{i % 2}", labels={"teff": 4000.0 + star},
            )

    path = tmp_path_factory.mktemp("big") / "ds"
    write(path, spectra(), shard_size=4096)
    return Dataset(path)


def rss_high_water_kib() -> int | None:
    """Peak resident memory (VmHWM) in KiB, Linux only."""
    try:
        return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))
    except (OSError, AttributeError):
        return None


def reset_rss_high_water() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def test_big_dataset_layout(big_dataset):
    assert len(big_dataset) == N_SPECTRA
    assert len(big_dataset.manifest["shards"]) == 5
    assert big_dataset.counts() == {"synth_even": 10_000, "synth_odd": 10_000}


def test_iter_spectra_streams_in_flat_memory(big_dataset):
    # Warm up first: the first batch starts Arrow's thread pool and allocator arenas (~35 MB of
    # resident memory once per process, measured), which is not memory that grows with the data.
    warm_up = big_dataset.iter_spectra()
    next(warm_up)
    warm_up.close()
    # Arrow's own allocations (decompressed pages, batches), counted through a proxy pool.
    default_pool = pa.default_memory_pool()
    pool = pa.proxy_memory_pool(default_pool)
    pa.set_memory_pool(pool)
    hwm_reset = reset_rss_high_water()
    rss_before = rss_high_water_kib()
    try:
        n, flux_sum = 0, 0.0
        for spectrum in big_dataset.iter_spectra():
            n += 1
            flux_sum += float(spectrum.flux[0])
        arrow_peak_streaming = pool.max_memory()
        rss_after = rss_high_water_kib()
        # The instrument sees a non-streaming read: all flux of the dataset at once (24 MB).
        big_dataset.table(["flux"])
        arrow_peak_whole_column = pool.max_memory()
    finally:
        pa.set_memory_pool(default_pool)
    assert n == N_SPECTRA and 0.9 * n < flux_sum < 1.1 * n
    assert arrow_peak_whole_column > N_SPECTRA * N_PIXELS * 4
    assert arrow_peak_streaming < RAW_BYTES / 10, arrow_peak_streaming
    if hwm_reset and rss_before is not None:
        growth = (rss_after - rss_before) * 1024
        assert growth < RAW_BYTES / 2, f"resident memory grew by {growth / 1e6:.1f} MB while streaming"

    # Python and numpy allocations (records, arrays) over a pass through every shard.
    tracemalloc.start()
    try:
        kept = sum(1 for _ in big_dataset.iter_spectra(split="validation"))
        _, python_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert kept > 1000
    assert python_peak < RAW_BYTES / 10, python_peak


def test_split_filter_and_grouping_by_star(big_dataset):
    manifest_splits = big_dataset.manifest["splits"]
    assert sum(manifest_splits.values()) == N_SPECTRA
    # Every observation of a star carries the star's split, so every split count is even here.
    assert all(n % 2 == 0 for n in manifest_splits.values())
    test_rows = list(big_dataset.iter_spectra(split="test"))
    assert len(test_rows) == manifest_splits["test"]
    assert all(assign_split(s.object_id) == "test" for s in test_rows)
    stars = {}
    for s in test_rows:
        stars.setdefault(s.object_id, set()).add(s.observation_id)
    assert all(visits == {"visit0", "visit1"} for visits in stars.values())

    table = big_dataset.table(["object_id", "split"])
    split_of = {}
    for object_id, split in zip(table.column("object_id").to_pylist(), table.column("split").to_pylist()):
        assert split_of.setdefault(object_id, split) == split
    assert abs(sum(1 for v in split_of.values() if v == "train") / len(split_of) - 0.8) < 0.02


def test_batches_products_and_columns(big_dataset):
    batches = list(big_dataset.iter_batches(columns=["key", "label_teff"], products="synth_odd",
                                            split=["train", "validation"], batch_size=500))
    assert all(b.schema.names == ["key", "label_teff"] and b.num_rows <= 500 for b in batches)
    keys = [k for b in batches for k in b.column("key").to_pylist()]
    assert all(k.startswith("synth_odd/") for k in keys)
    expected = big_dataset.manifest["counts"]["synth_odd"]
    test_odd = big_dataset.table(["key"], split="test", products="synth_odd").num_rows
    assert len(keys) + test_odd == expected
    first = big_dataset[4097]  # second shard
    assert first.key == "synth_even/star02048/visit1" and first.labels == {"teff": 6048.0}
    with pytest.raises(ValueError, match="unknown columns"):
        next(big_dataset.iter_batches(columns=["fluxx"]))
    with pytest.raises(ValueError, match="unknown split"):
        next(big_dataset.iter_batches(split="training"))


# ----------------------------------------------------------------------------------------------
# real files, where their reader is registered
# ----------------------------------------------------------------------------------------------
REAL_FILES = [
    "apogee/apstar/apStar-r6-2M00452143+1634446.fits",
    "apogee/apvisit/apVisit-2M00452143+1634446-0.fits",
    "apogee/aspcapstar/aspcapStar-r6-l30e.2-2M00452143+1634446.fits",
    "miles/MILES_res2.50_star_m0002V.fits",
    "galah/dr3/1403100038010491.fits",
    "galah/pipeline6/2101150001010011.fits",
    "lamost/spec-55859-F5902_sp03-232.fits.gz",
]


# Pixels of each record, from the file's own header (HDU, rule): the store keeps every native pixel.
HEADER_PIXELS = {
    "apogee/apstar/apStar-r6-2M00452143+1634446.fits": (1, lambda h: h["NAXIS1"]),  # 8575, one grid
    "apogee/apvisit/apVisit-2M00452143+1634446-0.fits": (1, lambda h: h["NAXIS1"] * h["NAXIS2"]),  # 3 x 4096
    "miles/MILES_res2.50_star_m0002V.fits": (0, lambda h: h["NAXIS1"]),  # 4300
}


@pytest.mark.parametrize("relative", REAL_FILES)
def test_real_file_round_trips(shared_data, tmp_path, relative):
    from stellarfield.io import identify_format, read_spectra
    from stellarfield.io.errors import SpectrumReadError

    path = shared_data / relative
    if not path.exists():
        pytest.skip(f"{relative} not in the shared data")
    try:
        identify_format(path)
    except SpectrumReadError as exc:  # UnknownFormatError included: its reader is not written yet
        pytest.skip(f"no reader registered for {relative}: {exc}")
    spectra = read_spectra(path)
    assert spectra
    ds = Dataset(write(tmp_path / "ds", spectra))
    back = list(ds.iter_spectra())
    assert len(back) == len(spectra)
    for a, b in zip(spectra, back):
        assert_same_spectrum(a, b)
        assert_same_spectrum(a, ds.get(a.key))
    assert ds.manifest["pixels"][spectra[0].product]["max"] == max(s.n_pixels for s in spectra)

    if relative in HEADER_PIXELS:
        from astropy.io import fits

        hdu, rule = HEADER_PIXELS[relative]
        header = fits.getheader(path, hdu)
        assert ds.table(["n_pixels"]).column("n_pixels").to_pylist() == [rule(header)] * len(spectra)
        if "apStar" in relative:  # log-linear vacuum grid starting at 10**CRVAL1 = 15100.8 A
            first = ds.table(["wavelength"]).column("wavelength")[0][0].as_py()
            assert first == pytest.approx(10 ** header["CRVAL1"], rel=1e-12)


def test_unserialisable_meta_is_refused_at_write(tmp_path):
    rng = np.random.default_rng(0)
    s = Spectrum("a", "S", "I", "p", [segment("full", 5000.0, 5, rng)], "rest", "flux", meta={"obj": object()})
    with pytest.raises(ValueError, match="p/a: meta and provenance must be JSON-serialisable"):
        with DatasetWriter(tmp_path / "ds") as writer:
            writer.write(s)
    assert not (tmp_path / "ds").exists()


def test_a_dataset_written_before_the_underscore_manifest_still_reads(tmp_path):
    """Datasets of the first layout name their manifest ``manifest.json``: read (and verified) the same."""
    from stellarfield.data.store import LEGACY_MANIFEST_NAME, MANIFEST_NAME, is_dataset

    path = write(tmp_path / "ds", varied_spectra(), shard_size=2)
    expected = [s.key for s in Dataset(path)]
    (path / MANIFEST_NAME).rename(path / LEGACY_MANIFEST_NAME)
    assert is_dataset(path) and [s.key for s in Dataset(path)] == expected
    assert Dataset(path).verify() == []
    (path / LEGACY_MANIFEST_NAME).unlink()
    assert not is_dataset(path)


def test_a_failure_of_the_background_writer_aborts_the_dataset(tmp_path, monkeypatch):
    """The background thread's error reaches the writer (at the latest at close): nothing is left at
    the path and the hidden folder is removed; a dataset already there is untouched."""
    from stellarfield.data import store

    def fail(writer, final):
        writer.close()
        raise OSError(28, "No space left on device")

    write(tmp_path / "ds", varied_spectra())
    before = sorted(p.name for p in (tmp_path / "ds").iterdir())
    monkeypatch.setattr(store, "_finish_shard", fail)
    with pytest.raises(OSError, match="No space left"):
        write(tmp_path / "ds", varied_spectra(), overwrite=True, shard_size=2)
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == before
    assert sibling_leftovers(tmp_path / "ds") == []


def test_rows_are_the_same_whatever_the_background_queue_holds(tmp_path, monkeypatch):
    """With room for no row group in the background queue (the writing thread waits for each), the
    dataset is the one written with the default room."""
    from stellarfield.data import store

    write(tmp_path / "roomy", varied_spectra(), shard_size=2)
    monkeypatch.setattr(store, "BACKGROUND_BYTES", 0)
    write(tmp_path / "tight", varied_spectra(), shard_size=2)
    tables = [Dataset(tmp_path / name).table(["key", "star_id", "split", "flux", "meta"]) for name in ("roomy", "tight")]
    assert json.dumps(tables[0].to_pylist()) == json.dumps(tables[1].to_pylist())  # (NaN fluxes as text)
    assert tables[0].num_rows == len(varied_spectra())
