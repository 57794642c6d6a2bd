"""Ingest: a folder mixing good and bad files, auxiliary files, existing datasets, the report."""

from __future__ import annotations

import json

import numpy as np
import pytest

from stellarfield.data.store import Dataset, DatasetExistsError
from stellarfield.ingest import ingest

GOOD = [
    "miles/MILES_res2.50_star_m0501V.fits",
    "miles/MILES_res2.50_star_m0067V.fits",
    "lamost/spec-55862-B6212_sp06-003.fits",
    "apogee/apstar/apStar-r6-2M00452143+1634446.fits",
]


@pytest.fixture()
def mixed_folder(tmp_path, shared_data):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for rel in GOOD:
        (folder / rel.split("/")[-1]).symlink_to(shared_data / rel)
    (folder / "README.md").write_text("# notes\nnot a spectrum\n")
    (folder / "empty.fits").write_bytes(b"")
    (folder / "random.fits").write_bytes(np.random.default_rng(1).bytes(4000))
    raw = (shared_data / GOOD[0]).read_bytes()
    (folder / "truncated.fits").write_bytes(raw[: len(raw) // 2])
    return folder


def test_mixed_folder_good_files_land_bad_files_explained(mixed_folder, tmp_path):
    out = tmp_path / "DS"
    report = ingest([mixed_folder, tmp_path / "does-not-exist"], out, workers=2, progress=False)
    assert report.spectra == {"apogee_apstar": 1, "lamost_lrs": 1, "miles": 2}
    reasons = {r["file"].split("/")[-1]: r["reason"] for r in report.skipped}
    assert set(reasons) == {"empty.fits", "random.fits", "truncated.fits", "does-not-exist"}
    assert "empty" in reasons["empty.fits"]
    assert "not a FITS file" in reasons["random.fits"]
    assert "truncated" in reasons["truncated.fits"]
    assert "no such file" in reasons["does-not-exist"]
    assert [a["file"].split("/")[-1] for a in report.auxiliary] == ["README.md"]

    on_disk = json.loads((out / "_ingest_report.json").read_text())
    assert on_disk["spectra"] == report.spectra and len(on_disk["skipped"]) == 4
    ds = Dataset(out)
    assert len(ds) == 4 and ds.counts() == report.spectra
    arcturus = ds.get("miles/m0501")
    assert arcturus.labels["teff"] == pytest.approx(4361)


def test_existing_dataset_is_never_overwritten_without_force(mixed_folder, tmp_path):
    out = tmp_path / "DS"
    ingest([mixed_folder / GOOD[0].split("/")[-1]], out, workers=1, progress=False)
    before = sorted(p.name for p in out.iterdir())
    manifest = (out / "_manifest.json").read_text()
    with pytest.raises(DatasetExistsError) as err:
        ingest([mixed_folder], out, workers=1, progress=False)
    assert str(out) in str(err.value)
    assert sorted(p.name for p in out.iterdir()) == before
    assert (out / "_manifest.json").read_text() == manifest
    report = ingest([mixed_folder], out, workers=1, progress=False, force=True)
    assert len(Dataset(out)) == report.n_spectra == 4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folders left behind"


def test_lamost_laspec_folder_mrs_and_lrs_with_bad_nights_explained(shared_data, tmp_path):
    """8 MRS + 2 LRS files: 6 MRS and 2 LRS spectra land; the two nights without starlight are skipped, saying why."""
    out = tmp_path / "DS"
    report = ingest([shared_data / "lamost_laspec"], out, workers=1, progress=False)
    assert report.spectra == {"lamost_lrs": 2, "lamost_mrs": 6}
    assert sorted(r["file"].split("/")[-1][:9] for r in report.skipped) == ["med-58268", "med-58269"]
    assert all("no usable starlight" in r["reason"] for r in report.skipped)
    assert sorted(a["file"].split("/")[-1] for a in report.auxiliary) == ["NOTES.md", "SOURCES.tsv"]
    # KIC 8098300: one star in both products, one split
    rows = Dataset(out).table(["product", "star_id", "split"]).to_pylist()
    kic = [r for r in rows if r["star_id"] == "LAMOST J192814.09+435531.0"]
    assert len(kic) == 5 + 1 and len({r["split"] for r in kic}) == 1
