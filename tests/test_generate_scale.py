"""Generation at scale: chunks streamed to Parquet give the in-memory values; nothing half-written.

Uses the shipped reference model on the Gaia XP grid (343 pixels): no training, a few seconds.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from stellarfield.cli.app import main
from stellarfield.data.split import assign_split
from stellarfield.data.store import Dataset, NotADatasetError
from stellarfield.model import load_model
from stellarfield.model.generate import generate, iter_generated, write_generated

generate_module = importlib.import_module("stellarfield.model.generate")  # the module, not the function
GRID = dict(instrument="gaia_xp", seed=5, rv_kms="random", snr=40.0)
N = 700


@pytest.fixture(scope="module")
def reference():
    return load_model("reference")


@pytest.fixture(scope="module")
def in_memory(reference):
    return generate(reference, N, **GRID)


def _pixels(ds: Dataset, column: str) -> np.ndarray:
    return np.concatenate([np.stack(b.column(column).to_numpy(zero_copy_only=False))
                           for b in ds.iter_batches(columns=[column])])


def test_chunks_streamed_to_a_dataset_equal_the_in_memory_run(reference, in_memory, tmp_path):
    out = tmp_path / "generated"
    # chunks of 128 (not a multiple of the 256-star noise blocks), shards of 300: 3 shards, a chunk split across two
    write_generated(reference, out, N, chunk=128, shard_size=300, progress=False, **GRID)
    ds = Dataset(out)
    assert ds.verify() == [] and len(ds) == N and ds.counts() == {"gaia_xp": N}
    assert [s["n_spectra"] for s in ds.manifest["shards"]] == [300, 300, 100]
    flux, ivar = _pixels(ds, "flux"), _pixels(ds, "ivar")
    np.testing.assert_allclose(flux, in_memory.flux, rtol=1e-6, atol=0)
    np.testing.assert_array_equal(ivar, in_memory.ivar)
    table = ds.table(["object_id", "split", "meta", "noise_known", "product"])
    meta = [json.loads(m) for m in table.column("meta").to_pylist()]
    np.testing.assert_allclose([m["latent"] for m in meta], in_memory.latents, atol=1e-6)
    np.testing.assert_allclose([m["rv_kms"] for m in meta], in_memory.rv_kms, rtol=1e-12)
    # the split is the one ingest draws from the star id; generated ids are distinct per seed
    assert table.column("split").to_pylist() == [assign_split(o) for o in table.column("object_id").to_pylist()]
    assert table.column("object_id")[0].as_py() == "generated-5-000000000" and all(table.column("noise_known").to_pylist())
    # the record round trip: wavelengths are the model's Gaia XP grid, the mask where the flux is finite
    first = ds[0]
    np.testing.assert_array_equal(first.wavelength, in_memory.wavelength)
    assert first.mask.all() and first.product == "gaia_xp" and first.frame == in_memory.frame
    # the velocities are N(0, 50 km/s) draws (700 of them: the sd within 10%)
    assert abs(np.std(in_memory.rv_kms) / generate_module.RANDOM_RV_SIGMA_KMS - 1) < 0.1


def test_the_noise_is_what_its_ivar_says(reference, in_memory):
    noiseless = generate(reference, N, **{**GRID, "snr": None})
    np.testing.assert_array_equal(noiseless.latents, in_memory.latents)  # same stars, same seed
    pull = (in_memory.flux - noiseless.flux) * np.sqrt(in_memory.ivar)
    assert abs(pull.std() - 1) < 0.01 and abs(pull.mean()) < 0.01  # 240,100 unit normal deviates
    sigma = 1 / np.sqrt(in_memory.ivar[:, 0])
    np.testing.assert_allclose(sigma * 40.0, np.median(np.abs(noiseless.flux), axis=1), rtol=2e-2)


def test_iterator_and_parquet_table_give_the_same_values(reference, in_memory, tmp_path):
    chunks = list(iter_generated(reference, N, chunk=256, **GRID))
    assert [c.start for c in chunks] == [0, 256, 512]
    np.testing.assert_allclose(np.concatenate([c.flux for c in chunks]), in_memory.flux, rtol=1e-6, atol=0)
    out = write_generated(reference, tmp_path / "g.parquet", N, chunk=200, progress=False, **GRID)
    table = pq.read_table(out)
    assert table.column("index").to_pylist() == list(range(N))
    np.testing.assert_allclose(np.stack(table.column("flux").to_numpy(zero_copy_only=False)), in_memory.flux,
                               rtol=1e-6, atol=0)
    assert json.loads(table.schema.metadata[b"stellarfield"])["grid"] == "instrument:gaia_xp"
    before = out.read_bytes()  # an existing output is refused without overwrite, and kept
    with pytest.raises(FileExistsError, match="already exists"):
        write_generated(reference, out, 3, progress=False, **GRID)
    assert out.read_bytes() == before
    write_generated(reference, out, 3, progress=False, overwrite=True, **GRID)
    assert pq.read_table(out).num_rows == 3


def test_a_failure_midway_leaves_nothing(reference, tmp_path):
    seen = []

    def fail_on_the_third_chunk(g):
        seen.append(g.start)
        if len(seen) == 3:
            raise RuntimeError("disk full")

    for out in (tmp_path / "ds", tmp_path / "t.parquet"):
        with pytest.raises(RuntimeError, match="disk full"):
            write_generated(reference, out, N, chunk=100, shard_size=150, progress=False, on_chunk=fail_on_the_third_chunk,
                            **GRID)
        seen.clear()
    assert list(tmp_path.iterdir()) == []  # not even the hidden temporary folder or file


KILL_SCRIPT = """
import os, signal, sys
from stellarfield.model.generate import write_generated
chunks = []
def kill_on_the_third_chunk(g):
    chunks.append(g)
    if len(chunks) == 3:
        os.kill(os.getpid(), signal.SIGKILL)
write_generated("reference", sys.argv[1], 700, chunk=100, shard_size=150, progress=False,
                on_chunk=kill_on_the_third_chunk, instrument="gaia_xp", seed=5, snr=40.0)
"""


def test_a_killed_run_leaves_no_complete_looking_output(tmp_path):
    out = tmp_path / "ds"
    done = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(out)], capture_output=True, text=True, timeout=300,
                          env={"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "PATH": ""})
    assert done.returncode == -9, done.stderr
    assert not out.exists()
    with pytest.raises(FileNotFoundError):
        Dataset(out)
    leftovers = list(tmp_path.iterdir())  # the hidden work folder: shards already written, no manifest
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".ds.tmp-")
    assert any(p.name.startswith("shard-") for p in leftovers[0].iterdir())
    with pytest.raises(NotADatasetError, match="_manifest.json"):
        Dataset(leftovers[0])


def test_cli_refuses_a_large_fits_naming_the_parquet_alternative(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(generate_module, "FITS_MAX_BYTES", 343 * 4 * 10)
    out = tmp_path / "big.fits"
    assert main(["generate", "--model", "reference", "--instrument", "gaia_xp", "--n", "11", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Parquet dataset" in err and f"--out {tmp_path / 'big'}" in err
    assert not out.exists()
    assert main(["generate", "--model", "reference", "--instrument", "gaia_xp", "--n", "10", "--out", str(out)]) == 0
    assert main(["generate", "--model", "reference", "--instrument", "gaia_xp", "--n", "40", "--snr", "20", "--quiet",
                 "--out", str(tmp_path / "ds")]) == 0
    assert len(Dataset(tmp_path / "ds")) == 40
    assert main(["generate", "--model", "reference", "--instrument", "gaia_xp", "--n", "40", "--quiet",
                 "--out", str(tmp_path / "ds")]) == 2  # a dataset is replaced only with --force
    assert "--force" in capsys.readouterr().err
