"""Robustness: nothing on disk is lost by a failing command, one bad file never aborts a batch,
damaged datasets are found and named, and the command line turns every mistake into one line."""

from __future__ import annotations

import builtins
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_TRAIN

from stellarfield.cli import main
from stellarfield.data.store import Dataset, DatasetCorruptError, DatasetWriter, NotADatasetError
from stellarfield.errors import StellarfieldError
from stellarfield.ingest import NothingToIngestError, ingest
from stellarfield.model.checkpoint import ModelLoadError, load_checkpoint, save_checkpoint
from stellarfield.spectrum import Segment, Spectrum

MILES = "miles/MILES_res2.50_star_m0501V.fits"
MILES_2 = "miles/MILES_res2.50_star_m0067V.fits"
APSTAR = "apogee/apstar/apStar-dr17-2M19485057+5005279.fits"


def toy_spectra(n: int, product: str = "toy") -> list[Spectrum]:
    rng = np.random.default_rng(n)
    wave = np.linspace(5000.0, 5100.0, 200)
    return [
        Spectrum(f"star{i:04d}", "TOY", "TOY", product,
                 [Segment("full", wave, rng.normal(1, 0.1, 200).astype(np.float32),
                          np.full(200, 100, np.float32), np.ones(200, bool))], "rest", "flux")
        for i in range(n)
    ]


def toy_dataset(path: Path, n: int = 600, shard_size: int = 300) -> Path:
    with DatasetWriter(path, shard_size=shard_size) as writer:
        writer.write_many(toy_spectra(n))
    return path


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ----------------------------------------------------------------------------------------------
# the one base error class
# ----------------------------------------------------------------------------------------------
def test_user_errors_share_one_base_class():
    from stellarfield.cli import CommandError
    from stellarfield.data.store import DatasetExistsError

    for cls in (CommandError, ModelLoadError, NotADatasetError, DatasetExistsError, DatasetCorruptError,
                NothingToIngestError):
        assert issubclass(cls, StellarfieldError), cls
    # ... and keep the builtin bases callers may catch
    assert issubclass(DatasetExistsError, FileExistsError) and issubclass(ModelLoadError, RuntimeError)


# ----------------------------------------------------------------------------------------------
# checkpoints: rewriting the same step never deletes the live checkpoint first
# ----------------------------------------------------------------------------------------------
def _state(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((3,), value)}


def test_rewriting_the_checkpoint_of_the_same_step_keeps_the_live_one(tmp_path, monkeypatch):
    run = tmp_path / "run"
    save_checkpoint(run, 10, {"v": 1}, _state(1.0))
    first = save_checkpoint(run, 20, {"v": 2}, _state(2.0))
    assert load_checkpoint(run)["model"]["w"][0] == 2.0

    # a rewrite of step 20 that dies while writing (disk full, kill): the live checkpoint stays whole
    import stellarfield.model.checkpoint as checkpoint

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", boom)
    with pytest.raises(OSError):
        save_checkpoint(run, 20, {"v": 3}, _state(3.0))
    monkeypatch.undo()
    ckpt = load_checkpoint(run)  # checks every file against its manifest
    assert ckpt["model"]["w"][0] == 2.0 and ckpt["folder"] == first
    assert leftovers(run / "checkpoints") == []  # the failed write cleaned up after itself

    # a completed rewrite of step 20 (resume of a finished run): new folder, latest switched, old gone
    second = save_checkpoint(run, 20, {"v": 4}, _state(4.0))
    assert second != first and not first.exists()
    assert load_checkpoint(run)["model"]["w"][0] == 4.0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000010", second.name]
    # and again: back to the plain name, still one folder per step, KEEP = 2 steps
    third = save_checkpoint(run, 20, {"v": 5}, _state(5.0))
    assert third.name == "step-00000020" and not second.exists()
    save_checkpoint(run, 30, {"v": 6}, _state(6.0))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000020", "step-00000030"]
    assert json.loads((run / "latest.json").read_text())["step"] == 30


def test_a_stale_temporary_checkpoint_is_not_loaded_and_is_cleaned(tmp_path):
    run = tmp_path / "run"
    save_checkpoint(run, 1, {}, _state(1.0))
    stale = run / "checkpoints" / ".tmp-step-00000002-999999-deadbeef"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    assert load_checkpoint(run)["model"]["w"][0] == 1.0
    save_checkpoint(run, 2, {}, _state(2.0))
    assert not stale.exists()


# ----------------------------------------------------------------------------------------------
# datasets: verification names the damaged shard; readers name it too
# ----------------------------------------------------------------------------------------------
def test_a_healthy_dataset_verifies(tmp_path):
    ds = Dataset(toy_dataset(tmp_path / "DS"))
    assert ds.verify() == [] and ds.verify(full=False) == []


def test_truncated_shard_is_named_by_verify_info_and_the_readers(tmp_path, capsys):
    path = toy_dataset(tmp_path / "DS")
    shard = path / "shard-00001.parquet"
    raw = shard.read_bytes()
    shard.write_bytes(raw[: len(raw) // 2])
    problems = Dataset(path).verify()
    assert len(problems) == 1 and "shard-00001.parquet" in problems[0] and "Parquet" in problems[0]
    # the readers name the shard instead of dying with a bare ArrowInvalid
    with pytest.raises(DatasetCorruptError, match="shard-00001.parquet"):
        list(Dataset(path).iter_spectra())
    with pytest.raises(DatasetCorruptError, match="shard-00001.parquet"):
        Dataset(path)[450]
    with pytest.raises(DatasetCorruptError, match="shard-00001.parquet"):
        Dataset(path).get("toy/star0000")
    assert Dataset(path)[0].object_id == "star0000"  # the healthy shard still reads
    # info reports it: non-zero exit, the shard and the reason on stderr, no traceback
    capsys.readouterr()
    assert main(["info", str(path)]) != 0
    captured = capsys.readouterr()
    assert "shard-00001.parquet" in captured.err and "Traceback" not in captured.err
    assert "ingest" in captured.err  # what to do


def test_damaged_page_is_found_by_its_checksum(tmp_path):
    path = toy_dataset(tmp_path / "DS", n=300)
    shard = path / "shard-00000.parquet"
    raw = bytearray(shard.read_bytes())
    middle = len(raw) // 3
    raw[middle:middle + 64] = bytes(64)  # same length, footer intact
    shard.write_bytes(bytes(raw))
    assert Dataset(path).verify(full=False) == []  # the footer alone looks fine ...
    problems = Dataset(path).verify()  # ... reading every page does not
    assert problems and "shard-00000.parquet" in problems[0]


def test_counts_and_paths_are_checked_against_the_manifest(tmp_path):
    path = toy_dataset(tmp_path / "DS")
    manifest_path = path / "_manifest.json"
    manifest = json.loads(manifest_path.read_text())

    wrong = json.loads(json.dumps(manifest))
    wrong["shards"][0]["n_spectra"] = 299
    manifest_path.write_text(json.dumps(wrong))
    problems = Dataset(path).verify()
    assert problems and "shard-00000.parquet" in problems[0] and "299" in problems[0]

    wrong = json.loads(json.dumps(manifest))
    wrong["counts"] = {"toy": 601}
    wrong["n_spectra"] = 601
    manifest_path.write_text(json.dumps(wrong))
    assert any("601" in p for p in Dataset(path).verify())

    outside = tmp_path / "elsewhere.parquet"
    shutil.copy(path / "shard-00000.parquet", outside)
    for name in ("../elsewhere.parquet", str(outside)):
        wrong = json.loads(json.dumps(manifest))
        wrong["shards"][0]["file"] = name
        manifest_path.write_text(json.dumps(wrong))
        with pytest.raises(NotADatasetError, match="outside the dataset folder"):
            Dataset(path)

    # a shard that is a symlink leading out of the folder
    (path / "shard-00000.parquet").unlink()
    (path / "shard-00000.parquet").symlink_to(outside)
    manifest_path.write_text(json.dumps(manifest))
    problems = Dataset(path).verify()
    assert problems and "outside the dataset folder" in problems[0]


# ----------------------------------------------------------------------------------------------
# ingest: nothing on disk is lost; one bad file never aborts the batch
# ----------------------------------------------------------------------------------------------
def test_a_typo_with_force_leaves_the_dataset_intact(shared_data, tmp_path, capsys):
    out = tmp_path / "DS"
    assert main(["ingest", str(shared_data / MILES), "--out", str(out), "--quiet", "--workers", "1"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code = main(["ingest", str(tmp_path / "goood"), "--out", str(out), "--force", "--quiet", "--workers", "1"])
    err = capsys.readouterr().err
    assert code != 0
    assert "no spectrum could be read" in err and "goood" in err and "left as it was" in err
    assert "Traceback" not in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert leftovers(tmp_path) == []
    # with the API: the same, and nothing written where nothing was
    with pytest.raises(NothingToIngestError) as info:
        ingest([tmp_path / "goood"], tmp_path / "new", workers=1, progress=False)
    assert info.value.report.skipped[0]["reason"] == "no such file or folder"
    assert not (tmp_path / "new").exists() and leftovers(tmp_path) == []


def test_a_failing_ingest_leaves_the_old_dataset(shared_data, tmp_path, monkeypatch):
    out = tmp_path / "DS"
    ingest([shared_data / MILES], out, workers=1, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    import stellarfield.ingest as ingest_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ingest_module, "_write_unit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ingest([shared_data / MILES_2], out, workers=1, progress=False, force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert leftovers(tmp_path) == []


def test_a_new_dataset_that_does_not_read_back_replaces_nothing(tmp_path, monkeypatch):
    path = toy_dataset(tmp_path / "DS", n=10)
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    monkeypatch.setattr(Dataset, "verify", lambda self, full=True: ["shard-00000.parquet: damaged on the way"])
    with pytest.raises(DatasetCorruptError, match="does not read back.*damaged on the way"):
        with DatasetWriter(path, overwrite=True) as writer:
            writer.write_many(toy_spectra(20))
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before and leftovers(tmp_path) == []


def test_the_report_lands_with_the_dataset(shared_data, tmp_path):
    out = tmp_path / "DS"
    report = ingest([shared_data / MILES], out, workers=1, progress=False)
    on_disk = json.loads((out / "_ingest_report.json").read_text())
    assert on_disk["n_spectra"] == report.n_spectra == 1
    assert Dataset(out).verify() == []


def test_two_copies_of_one_observation_are_reported_as_a_duplicate(shared_data, tmp_path):
    folder = tmp_path / "downloads"
    folder.mkdir()
    shutil.copy(shared_data / MILES, folder / "X.fits")
    shutil.copy(shared_data / MILES, folder / "X (1).fits")
    shutil.copy(shared_data / MILES_2, folder / "other.fits")
    apstar = shared_data / APSTAR
    shutil.copy(apstar, folder / apstar.name)
    shutil.copy(apstar, folder / apstar.name.replace(".fits", " (1).fits"))
    report = ingest([folder], tmp_path / "DS", workers=1, progress=False)
    assert report.spectra == {"apogee_apstar": 1, "miles": 2} and report.skipped == []
    assert len(report.duplicates) == 2
    by_name = {Path(d["file"]).name: d for d in report.duplicates}
    # MILES ids come from the file name: the copy has another key but the same pixels
    miles = by_name.get("X.fits") or by_name["X (1).fits"]
    assert Path(miles["kept"]).name in {"X.fits", "X (1).fits"} != Path(miles["file"]).name
    assert "the same pixels as" in miles["reason"]
    # the apStar id comes from the header: the same key twice
    (ap,) = [d for d in report.duplicates if d["key"].startswith("apogee_apstar/")]
    assert "identical copy" in ap["reason"] and {Path(ap["file"]).name, Path(ap["kept"]).name} == {
        apstar.name, apstar.name.replace(".fits", " (1).fits")}
    assert len(Dataset(tmp_path / "DS")) == 3
    assert "duplicates" in report.summary()


def test_an_unreadable_file_is_skipped_with_its_reason(shared_data, tmp_path, monkeypatch):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(shared_data / MILES, folder / "good.fits")
    shutil.copy(shared_data / MILES_2, folder / "locked.fits")
    real_open = builtins.open

    def guarded_open(file, *args, **kwargs):  # tests run as root: chmod 000 would not stop them
        if str(file).endswith("locked.fits"):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)
    report = ingest([folder], tmp_path / "DS", workers=1, progress=False)
    assert report.spectra == {"miles": 1}
    (skip,) = report.skipped
    assert skip["file"].endswith("locked.fits") and "permission denied" in skip["reason"]


def test_a_folder_named_like_a_file_is_walked_not_fatal(shared_data, tmp_path):
    folder = tmp_path / "in"
    (folder / "odd.fits").mkdir(parents=True)
    shutil.copy(shared_data / MILES, folder / "good.fits")
    report = ingest([folder, folder / "odd.fits"], tmp_path / "DS", workers=1, progress=False)
    assert report.spectra == {"miles": 1}


def test_an_unreadable_folder_is_reported(shared_data, tmp_path, monkeypatch):
    folder = tmp_path / "in"
    (folder / "private").mkdir(parents=True)
    shutil.copy(shared_data / MILES, folder / "good.fits")
    shutil.copy(shared_data / MILES_2, folder / "private" / "hidden-from-us.fits")
    real_scandir = os.scandir

    def guarded_scandir(path="."):
        if str(path).endswith("private"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", guarded_scandir)
    report = ingest([folder], tmp_path / "DS", workers=1, progress=False)
    assert report.spectra == {"miles": 1}
    (skip,) = report.skipped
    assert skip["file"].endswith("private") and "cannot list the folder" in skip["reason"]
    assert "permission denied" in skip["reason"]


# ----------------------------------------------------------------------------------------------
# model commands: a tiny real run
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def miles_spectra(shared_data):
    from stellarfield.io import read_spectra

    files = sorted((shared_data / "miles").glob("MILES_res2.50_star_m00*V.fits"))[:3]
    return [s for f in files for s in read_spectra(f)]


@pytest.fixture(scope="module")
def tiny_run(miles_spectra, tmp_path_factory):
    from stellarfield.model.train import TrainConfig, train

    before = torch.get_num_threads()
    out = tmp_path_factory.mktemp("robust") / "run"
    train(miles_spectra, out, TrainConfig(**TINY_TRAIN), progress=False)
    torch.set_num_threads(before)
    return out


def test_train_never_writes_a_run_into_another_folder(miles_spectra, tmp_path):
    """A dataset (or any folder with files, or a file) given as the run folder is refused before any
    work and left as it was; an existing empty folder is used."""
    from stellarfield.model.train import TrainConfig, train

    folder = tmp_path / "DS"
    folder.mkdir()
    (folder / "_manifest.json").write_text("{}")
    with pytest.raises(FileExistsError, match="not a stellarfield run .it holds _manifest.json"):
        train(miles_spectra, folder, TrainConfig(**TINY_TRAIN), progress=False)
    assert [p.name for p in folder.iterdir()] == ["_manifest.json"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="a file"):
        train(miles_spectra, tmp_path / "file", TrainConfig(**TINY_TRAIN), progress=False)
    (tmp_path / "empty").mkdir()
    assert train(miles_spectra, tmp_path / "empty", TrainConfig(**TINY_TRAIN), progress=False).steps == 3
    # a run killed before its first checkpoint (metrics, no latest.json) starts afresh, old metrics dropped
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    (stopped / "metrics.jsonl").write_text('{"step": 999, "loss": 1.0}\n')
    assert train(miles_spectra, stopped, TrainConfig(**TINY_TRAIN), progress=False).steps == 3
    assert '"step": 999' not in (stopped / "metrics.jsonl").read_text()


def test_resuming_a_finished_run_rewrites_its_checkpoint_safely(tiny_run, miles_spectra, tmp_path):
    from stellarfield.model.checkpoint import load_model
    from stellarfield.model.train import TrainConfig, train

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = load_checkpoint(run)["folder"].name
    result = train(miles_spectra, run, TrainConfig(**TINY_TRAIN), resume=True, progress=False)
    assert result.steps == 3  # nothing left to train: only the final checkpoint (same step) is rewritten
    folders = [p.name for p in (run / "checkpoints").iterdir()]
    assert len(folders) == 1 and folders[0].startswith("step-00000003") and folders[0] != before
    assert load_model(run).prior is not None


def test_generate_errors_are_one_line(tiny_run, tmp_path, capsys):
    out = str(tmp_path / "x.fits")
    assert main(["generate", "--model", str(tiny_run), "--instrument", "foo", "--out", out]) == 2
    err = capsys.readouterr().err
    assert "--instrument foo" in err and "'miles'" in err and len(err.strip().splitlines()) == 1
    assert main(["generate", "--model", str(tiny_run), "--wave-range", "5100", "5000", "--resolution", "2000",
                 "--out", out]) == 2
    assert "A must be below B" in capsys.readouterr().err
    assert main(["generate", "--model", str(tiny_run), "--wave-range", "20000", "21000", "--resolution", "2000",
                 "--out", out]) == 2
    assert "outside what the model was trained on" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path / "nowhere"), "--instrument", "miles", "--out", out]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["generate", "--model", str(tiny_run), "--instrument", "miles", "--n", "2", "--out", out]) == 0


@pytest.mark.parametrize("command", ["generate", "fit", "predict"])
def test_commands_never_replace_an_existing_output_without_force(command, tiny_run, miles_spectra, shared_data,
                                                                  tmp_path, capsys):
    """An existing --out is refused in one line naming it, before any work, and its bytes are kept;
    with --force it is replaced by a complete new output."""
    star = miles_spectra[0].provenance["file"]
    out = tmp_path / ("x.parquet" if command == "fit" else "x.fits")
    out.write_bytes(b"precious")
    args = {"generate": ["generate", "--model", str(tiny_run), "--instrument", "miles", "--n", "2"],
            "fit": ["fit", "--model", str(tiny_run), star, "--refine-steps", "2"],
            "predict": ["predict", "--model", str(tiny_run), "--from", star, "--to", "miles", "--refine-steps", "2",
                        "--samples", "0"]}[command] + ["--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"{out} already exists" in err and "--force" in err and len(err.strip().splitlines()) == 1
    assert out.read_bytes() == b"precious"
    assert main(args + ["--force"]) == 0
    assert out.stat().st_size > 1000 and out.read_bytes() != b"precious"


def test_generate_on_a_run_stopped_before_its_prior(tiny_run, tmp_path, capsys):
    ckpt = load_checkpoint(tiny_run)
    stopped = tmp_path / "stopped"
    save_checkpoint(stopped, 2, {**ckpt["config"], "prior": None}, ckpt["model"], None)
    code = main(["generate", "--model", str(stopped), "--instrument", "miles", "--out", str(tmp_path / "x.fits")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert str(stopped) in err and "prior" in err and "--resume" in err
    assert not (tmp_path / "x.fits").exists()


def test_fit_errors_are_one_line(tiny_run, shared_data, tmp_path, capsys):
    out = str(tmp_path / "fit.parquet")
    assert main(["fit", "--model", str(tiny_run), "/no/such/path", "--out", out]) == 2
    err = capsys.readouterr().err
    assert "/no/such/path: no such file or folder" in err and len(err.strip().splitlines()) == 1
    assert main(["fit", "--model", str(tiny_run), str(shared_data / MILES), "--split", "test", "--out", out]) == 2
    assert "no input is a dataset" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["fit", "--model", str(tiny_run), str(tmp_path / "empty"), "--out", out]) == 2
    assert "no spectrum to fit" in capsys.readouterr().err
    assert not Path(out).exists()


def test_velocities_beyond_light_are_refused_and_beyond_any_star_warned(tiny_run, tmp_path, capsys):
    out = str(tmp_path / "x.fits")
    for rv in ("400000", "-299792.458", "nan"):
        with pytest.raises(SystemExit) as refused:  # argparse refuses it, naming the option
            main(["generate", "--model", str(tiny_run), "--instrument", "miles", "--rv", rv, "--out", out])
        err = capsys.readouterr().err
        assert refused.value.code == 2 and "--rv" in err and len(err.strip().splitlines()) == 1
    assert not Path(out).exists()
    assert main(["generate", "--model", str(tiny_run), "--instrument", "miles", "--n", "1", "--rv", "2000",
                 "--out", out]) == 0
    err = capsys.readouterr().err
    assert "warning" in err and "beyond any star known" in err


def test_a_fit_outside_the_model_s_domain_is_warned_on_the_terminal(tiny_run, shared_data, tmp_path, capsys):
    """The tiny run knows only MILES: LAMOST spectra are fitted through an instrument built from the file
    (flagged in the table) and the terminal says so; MILES spectra raise no warning."""
    lamost = sorted((shared_data / "lamost").glob("*.fits*"))[:1]
    out = tmp_path / "fit.parquet"
    assert main(["fit", "--model", str(tiny_run), str(lamost[0]), "--refine-steps", "2", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "warning: 1 of 1 spectra of a product the model was never trained on" in err and "lamost_lrs" in err
    assert main(["fit", "--model", str(tiny_run), str(shared_data / MILES), "--refine-steps", "2",
                 "--out", str(tmp_path / "miles.parquet")]) == 0
    assert "never trained on" not in capsys.readouterr().err
