"""The exported (inference-only) model folder and the packaged reference model (tiny real-data run)."""

from __future__ import annotations

import dataclasses
import glob
import json
import re
import shutil
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from astropy.io import fits
from safetensors import safe_open

from stellarfield.cli import main
from stellarfield.io import read_spectra
from stellarfield.model import generate, load_model
from stellarfield.model import reference
from stellarfield.model.checkpoint import ModelLoadError
from stellarfield.model.reference import FLOAT16_PREFIX, ModelExportError, export_model
from stellarfield.model.train import TrainConfig, train
from conftest import TINY_TRAIN

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def miles_files(shared_data):
    return sorted(glob.glob(str(shared_data / "miles/MILES_res2.50_star_m00*V.fits")))[:3]


@pytest.fixture(scope="module")
def run(miles_files, tmp_path_factory):
    """A tiny auto-decoder run (so it has a latent table to drop) with a fitted prior."""
    spectra = [s for f in miles_files for s in read_spectra(f)]
    out = tmp_path_factory.mktemp("ref") / "run"
    train(spectra, out, TrainConfig(**TINY_TRAIN), progress=False)
    return out


def stars(model, n=5):
    return generate(model, n, instrument="miles", seed=1).flux


def test_export_drops_the_latents_and_gives_the_same_spectra(run, tmp_path):
    original = load_model(run)
    assert original.model.latents is not None  # the run has a per-spectrum latent table
    report = export_model(run, tmp_path / "ref")
    out = report.path
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "latest.json", "manifest.json",
                                                    "model.safetensors", "prior.safetensors"]
    assert report.total_bytes == sum(p.stat().st_size for p in out.iterdir())
    assert report.dropped == ["latents.weight"] and report.float16 == []
    assert re.match(rf"exported {re.escape(str(out))}: \d+(\.\d+)? (MB|kB) \(config.json", report.summary())
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(manifest["files"]) == ["config.json", "model.safetensors", "prior.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["n_latents"] == 0 and config["prior"] == original.config["prior"]
    assert config["export"]["dropped"] == ["latents.weight"]

    exported = load_model(out)
    assert exported.model.latents is None and exported.prior is not None
    a, b = original.model.state_dict(), exported.model.state_dict()
    assert set(a) - set(b) == {"latents.weight"} and set(b) <= set(a)
    assert all(torch.equal(a[k], b[k]) for k in b)
    np.testing.assert_array_equal(stars(run), stars(out))  # float32 export: identical spectra
    assert torch.equal(original.prior.sample(4, seed=2), exported.prior.sample(4, seed=2))


def test_float16_export_is_float16_on_disk_and_float32_loaded(run, tmp_path):
    full = export_model(run, tmp_path / "f32")
    half = export_model(run, tmp_path / "f16", float16=True)
    assert half.float16 and all(k.startswith(FLOAT16_PREFIX) for k in half.float16)
    assert half.files["model.safetensors"] < full.files["model.safetensors"]
    with safe_open(half.path / "model.safetensors", "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert {dtypes[k] for k in half.float16} == {"F16"}
    # float32 everywhere else, but the Fourier frequencies: phases are computed in float64 (encoding.py)
    assert {v for k, v in dtypes.items() if k not in half.float16 and not k.endswith(".freqs")} == {"F32"}
    assert {v for k, v in dtypes.items() if k.endswith(".freqs")} <= {"F64"}

    loaded = load_model(half.path)
    assert all(p.dtype == torch.float32 for k, p in loaded.model.state_dict().items() if not k.endswith(".freqs"))
    # same spectra as the original run with those tables rounded to float16: exactly
    rounded = load_model(run)
    with torch.no_grad():
        for name, p in rounded.model.named_parameters():
            if name in half.float16:
                p.copy_(p.half().float())
    np.testing.assert_array_equal(stars(rounded), stars(half.path))
    # and close to the unrounded original (the stated tolerance of float16 storage)
    original = stars(run)
    assert np.abs(stars(half.path) - original).max() <= 1e-3 * np.abs(original).max()


def test_size_limit_existing_output_and_no_prior(run, tmp_path):
    with pytest.raises(ModelExportError, match="over the limit of 1.0 kB.*float16"):
        export_model(run, tmp_path / "small", max_bytes=1000)
    assert list(tmp_path.iterdir()) == []  # nothing left behind, not even the temporary folder
    out = export_model(run, tmp_path / "x").path
    with pytest.raises(ModelExportError, match="already exists"):
        export_model(run, out)
    first = (out / "manifest.json").read_text()
    export_model(run, out, float16=True, overwrite=True)
    assert (out / "manifest.json").read_text() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]
    with pytest.raises(ModelExportError, match="cannot go into the run folder"):
        export_model(run, run / "export")
    # a run without a fitted prior cannot generate: refused
    no_prior = tmp_path / "no_prior"
    shutil.copytree(run, no_prior)
    ckpt = no_prior / json.loads((no_prior / "latest.json").read_text())["checkpoint"]
    manifest = json.loads((ckpt / "manifest.json").read_text())
    del manifest["files"]["prior.safetensors"]
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelExportError, match="no fitted latent prior"):
        export_model(no_prior, tmp_path / "y")


def test_a_corrupt_export_is_a_clear_error(run, tmp_path):
    out = export_model(run, tmp_path / "ref").path
    data = bytearray((out / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (out / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="model.safetensors is corrupt"):
        load_model(out)


def test_reference_resolves_to_the_packaged_folder_and_works_from_the_cli(run, miles_files, tmp_path, monkeypatch,
                                                                          capsys):
    # the real package location: stellarfield/reference_model inside the installed package
    assert reference.reference_model_dir() == REPO / "src" / "stellarfield" / "reference_model"
    packaged = tmp_path / "site-packages" / "stellarfield" / "reference_model"
    monkeypatch.setattr(reference, "reference_model_dir", lambda: packaged)
    with pytest.raises(ModelLoadError, match="reference model is not installed"):
        load_model("reference")
    assert main(["generate", "--model", "reference", "--instrument", "miles", "--n", "10",
                 "--out", str(tmp_path / "x.fits")]) == 2
    assert "reference model is not installed" in capsys.readouterr().err

    export = export_model(run, tmp_path / "exported", float16=True).path
    packaged.parent.mkdir(parents=True)
    shutil.copytree(export, packaged)
    trained = load_model("reference")
    assert trained.path == packaged and trained.model.latents is None
    assert main(["generate", "--model", "reference", "--instrument", "miles", "--n", "10",
                 "--out", str(tmp_path / "x.fits")]) == 0
    with fits.open(tmp_path / "x.fits") as hdul:
        flux = hdul["FLUX"].data
    assert flux.shape[0] == 10 and np.isfinite(flux).all()
    np.testing.assert_allclose(flux, generate(export, 10, instrument="miles", seed=0).flux, rtol=0, atol=0)
    # fit (and, through load_model, bench) take "reference" the same way
    assert main(["fit", "--model", "reference", miles_files[0], "--refine-steps", "1",
                 "--out", str(tmp_path / "fit.parquet")]) == 0
    # the name means the packaged model; a local folder called "reference" is reached as a path
    monkeypatch.chdir(tmp_path)
    shutil.copytree(export, tmp_path / "reference")
    assert load_model("reference").path == packaged
    assert load_model("./reference").path == load_model(Path("reference")).path == Path("reference")


def test_export_command_and_version(run, tmp_path, capsys):
    assert main(["export", str(run), "--out", str(tmp_path / "ref"), "--float16"]) == 0
    out = capsys.readouterr().out
    assert re.match(r"exported .*: \d+(\.\d+)? (MB|kB) \(", out) and "float16" in out and (tmp_path / "ref" / "latest.json").is_file()
    assert main(["export", str(run), "--out", str(tmp_path / "ref")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["export", str(run), "--out", str(tmp_path / "big"), "--max-mb", "0.001"]) == 2
    assert "over the limit" in capsys.readouterr().err and not (tmp_path / "big").exists()
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    import stellarfield

    assert capsys.readouterr().out.strip() == f"stellarfield {stellarfield.__version__}"


def test_the_wheel_ships_the_reference_model_files():
    """package-data: every *.json and *.safetensors file of stellarfield/reference_model/ (the
    layout export_model writes) goes into the wheel."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["stellarfield"]
    names = ["config.json", "latest.json", "manifest.json", "model.safetensors", "prior.safetensors"]
    assert all(any(Path("reference_model", n).match(p) for p in patterns) for n in names)


def test_the_shipped_reference_model_generates_galah_stars(tmp_path):
    """The packaged reference model (src/stellarfield/reference_model, at most 10 MB) loads by name
    and draws GALAH DR3 stars: continuum-normalised spectra whose median is near 1, with absorption
    lines (minimum well below the median), NaN only in the telluric band the model never learned;
    `stellarfield generate` writes them."""
    import time

    import numpy as np
    from astropy.io import fits

    from stellarfield.cli import main
    from stellarfield.model.reference import reference_model_dir

    folder = reference_model_dir()
    assert sum(f.stat().st_size for f in folder.iterdir()) <= 10_000_000
    t0 = time.perf_counter()
    out = tmp_path / "x.fits"
    assert main(["generate", "--model", "reference", "--instrument", "galah_dr3", "--n", "10", "--out", str(out)]) == 0
    seconds = time.perf_counter() - t0
    with fits.open(out) as hdul:
        flux = np.asarray([h.data for h in hdul if isinstance(h, fits.ImageHDU) and h.data is not None and h.data.ndim == 2][0])
        wavelength = np.asarray(hdul["WAVELENGTH"].data, dtype=float)
    # NaN exactly on the pixels training masks (the O2 A band, widened by the RV range), finite elsewhere
    trained = load_model("reference").model.instrument("galah_dr3").pixel_mask(wavelength)
    assert (~trained).sum() > 1000 and np.all(wavelength[~trained] > 7580) and np.all(wavelength[~trained] < 7710)
    assert flux.shape[0] == 10 and np.isfinite(flux[:, trained]).all() and np.isnan(flux[:, ~trained]).all()
    flux = flux[:, trained]
    median = np.median(flux, axis=1)
    assert np.all(np.abs(median - 1) < 0.25), median  # line-rich cool stars: median ~0.8
    assert np.all(flux.min(axis=1) < 0.8 * median)
    print(f"generate --model reference: {seconds:.1f} s")


def test_export_gives_gaia_xp_the_span_of_its_training_spectra_where_the_run_has_none(tmp_path):
    """A run trained before instruments kept the span of Gaia XP's samples (its config has none) gets
    it at export from a dataset's training split (``span_data``): rows spanning the functions the
    spectra are made of, what was used recorded in the config, and spectra generated on the native
    samples inside the span; without ``span_data`` nothing changes."""
    from stellarfield.data.store import DatasetWriter
    from stellarfield.model.checkpoint import _sha256
    from test_model_instrument import _sampled_records

    records, functions = _sampled_records(60, rank=6)
    run = tmp_path / "run"
    train(records, run, TrainConfig(**TINY_TRAIN), progress=False)
    ckpt = run / json.loads((run / "latest.json").read_text())["checkpoint"]
    config = json.loads((ckpt / "config.json").read_text())
    assert config["instruments"]["gaia_xp"]["sample_basis"] is not None  # training measures it now ...
    config["instruments"]["gaia_xp"].update(sample_basis=None, sample_u=None)  # ... a run from before did not
    (ckpt / "config.json").write_text(json.dumps(config))
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"]["config.json"] = _sha256(ckpt / "config.json")
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    with DatasetWriter(tmp_path / "ds") as writer:
        writer.write_many(records)
    n_train = json.loads((tmp_path / "ds" / "_manifest.json").read_text())["splits"]["train"]

    plain = export_model(run, tmp_path / "plain").path
    spanned = export_model(run, tmp_path / "spanned", span_data=[tmp_path / "ds"]).path
    assert load_model(plain).model.instrument("gaia_xp").sample_basis is None
    inst = load_model(spanned).model.instrument("gaia_xp")
    basis = np.array(inst.sample_basis)
    assert basis.shape == (6, 343) and np.allclose(basis @ basis.T, np.eye(6), atol=1e-8)
    in_span = functions / np.linalg.norm(functions, axis=1, keepdims=True)
    assert np.allclose(in_span @ basis.T @ basis, in_span, atol=1e-6)
    assert json.loads((spanned / "config.json").read_text())["export"]["sample_spans"]["gaia_xp"] == \
        {"spectra": n_train, "rank": 6}
    flux = generate(spanned, 4, instrument="gaia_xp", seed=1).flux.astype(np.float64)
    outside = flux - flux @ basis.T @ basis
    assert np.linalg.norm(outside) < 1e-5 * np.linalg.norm(flux)
    unprojected = generate(plain, 4, instrument="gaia_xp", seed=1).flux.astype(np.float64)
    assert np.linalg.norm(unprojected - unprojected @ basis.T @ basis) > 1e-3 * np.linalg.norm(unprojected)
    # the same datasets twice count each record once; a model that has its span, or data without
    # Gaia XP, is refused with the reason (nothing written)
    twice = export_model(run, tmp_path / "twice", span_data=[tmp_path / "ds", tmp_path / "ds"]).path
    assert json.loads((twice / "config.json").read_text())["export"]["sample_spans"]["gaia_xp"]["spectra"] == n_train
    with pytest.raises(ModelExportError, match="nothing to add"):
        export_model(spanned, tmp_path / "again", span_data=[tmp_path / "ds"])
    with DatasetWriter(tmp_path / "no_xp") as writer:  # the same pixels as another product's records
        writer.write_many(dataclasses.replace(r, product="miles") for r in records)
    with pytest.raises(ModelExportError, match="nothing to add"):
        export_model(run, tmp_path / "again", span_data=[tmp_path / "no_xp"])
    assert not (tmp_path / "again").exists()


def test_the_shipped_reference_model_renders_gaia_xp_inside_its_training_span():
    """The packaged model's Gaia XP instrument carries the span of its training spectra (given at
    export, recorded in the config): orthonormal rows on XP's 343 samples, and generated XP stars
    lie in it, as every Gaia XP spectrum does (a linear map of basis-function coefficients)."""
    trained = load_model("reference")
    inst = trained.model.instrument("gaia_xp")
    basis = np.array(inst.sample_basis)
    assert basis.shape[1] == 343 and 20 <= basis.shape[0] < 343
    assert np.allclose(basis @ basis.T, np.eye(len(basis)), atol=1e-6)
    spans = trained.config["export"].get("sample_spans")  # given at export; a run trained since measured its own
    if spans is not None:
        assert spans["gaia_xp"]["rank"] == len(basis)
    flux = generate("reference", 8, instrument="gaia_xp", seed=3).flux.astype(np.float64)
    assert np.linalg.norm(flux - flux @ basis.T @ basis) < 1e-4 * np.linalg.norm(flux)
