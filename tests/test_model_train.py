"""Stage 4 of the model: the training loop, checkpoints, resume, reproducibility, torchrun (real spectra)."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from stellarfield.io import read_spectra
from stellarfield.model.batching import TrainingData
from stellarfield.model.checkpoint import ModelLoadError, load_model
from stellarfield.model.train import TrainConfig, train
from conftest import TINY_TRAIN, free_port

TINY = {**TINY_TRAIN, "final_val_refine_steps": 5, "val_refine_steps": 5, "max_steps": None}



def tiny_config(**kw) -> TrainConfig:
    """The tests' training config: it stops on steps and never reads the clock to stop, validate or
    checkpoint, so every run here does the same work on any machine."""
    config = TrainConfig(**{**TINY, **kw})
    assert config.minutes is None and config.validate_every_s is None and config.checkpoint_every_s is None
    assert config.max_steps is not None
    return config


@pytest.fixture(scope="module")
def spectra(shared_data):
    files = sorted(glob.glob(str(shared_data / "apogee/aspcapstar/*.fits")))[:3]
    files += sorted(glob.glob(str(shared_data / "miles/MILES_res2.50_star_m00*V.fits")))[:3]
    return [s for f in files for s in read_spectra(f)]


def weights(run_dir) -> dict[str, torch.Tensor]:
    return load_model(run_dir).model.state_dict()


def assert_same_weights(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a if a[k].numel())
    assert worst <= atol, worst


def test_run_folder_and_same_seed_same_result(spectra, tmp_path):
    r1 = train(spectra, tmp_path / "a", tiny_config(max_steps=4), progress=False)
    r2 = train(spectra, tmp_path / "b", tiny_config(max_steps=4), progress=False)
    assert r1.steps == 4 and r1.stopped_by == "max_steps"
    assert_same_weights(weights(tmp_path / "a"), weights(tmp_path / "b"))
    other = train(spectra, tmp_path / "c", tiny_config(max_steps=4, seed=1), progress=False)
    assert other.steps == 4
    with pytest.raises(AssertionError):
        assert_same_weights(weights(tmp_path / "a"), weights(tmp_path / "c"))
    # the run folder: metrics, summary, a checkpoint with safetensors + JSON config + versions
    run = tmp_path / "a"
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert lines and all("step" in line for line in lines)
    config = json.loads(next((run / "checkpoints").glob("step-*/config.json")).read_text())
    assert config["train_config"]["seed"] == 0 and config["versions"]["torch"] == torch.__version__
    assert set(config["instruments"]) == {"apogee_aspcapstar", "miles"}
    assert json.loads((run / "summary.json").read_text())["steps"] == 4
    # an existing run is never overwritten without resume
    with pytest.raises(FileExistsError):
        train(spectra, run, tiny_config(max_steps=4), progress=False)


def test_resume_matches_an_uninterrupted_run(spectra, tmp_path):
    """Stopping at step 3 and resuming to step 6 gives exactly the weights of 6 steps in one go
    (stated tolerance: max |difference| = 0; the sampler, optimisers and counters are restored)."""
    train(spectra, tmp_path / "full", tiny_config(max_steps=6), progress=False)
    train(spectra, tmp_path / "part", tiny_config(max_steps=3), progress=False)
    resumed = train(spectra, tmp_path / "part", tiny_config(max_steps=6), resume=True, progress=False)
    assert resumed.steps == 6
    assert_same_weights(weights(tmp_path / "full"), weights(tmp_path / "part"))


def test_load_errors_name_the_file(spectra, tmp_path):
    run = tmp_path / "run"
    train(spectra, run, tiny_config(max_steps=1), progress=False)
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "nowhere")
    with pytest.raises(ModelLoadError, match="latest.json is missing"):
        load_model(tmp_path)
    folder = next((run / "checkpoints").glob("step-*"))
    weights_file = folder / "model.safetensors"
    data = bytearray(weights_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights_file.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="model.safetensors is corrupt"):
        load_model(run)
    weights_file.unlink()
    with pytest.raises(ModelLoadError, match="model.safetensors is missing"):
        load_model(run)


def test_ranks_get_disjoint_parts_and_the_same_instruments(spectra):
    parts = [TrainingData(spectra, rank=r, world=2) for r in range(2)]
    keys = [set(k for p in d.products.values() for k in p.keys) for d in parts]
    assert not keys[0] & keys[1] and len(keys[0] | keys[1]) == len(spectra)
    assert parts[0].instruments == parts[1].instruments
    index = torch.cat([p.index for d in parts for p in d.products.values()])
    assert sorted(index.tolist()) == list(range(len(spectra)))  # latent-table rows, no overlap


_SCRIPT = """
import glob, importlib, os, signal, sys
from stellarfield.io import read_spectra
from stellarfield.model.train import TrainConfig, train
training = importlib.import_module("stellarfield.model.train")  # the module (the package exports train())
sys.path.insert(0, {tests!r})
from test_model_train import TINY
files = sorted(glob.glob({aspcap!r}))[:3] + sorted(glob.glob({miles!r}))[:3]
spectra = [s for f in files for s in read_spectra(f)]
config = TrainConfig(**{{**TINY, **{extra!r}}})
assert config.max_steps and config.minutes is None and config.validate_every_s is None and config.checkpoint_every_s is None
mode = sys.argv[2] if len(sys.argv) > 2 else ""
if mode.startswith("kill-after-"):  # SIGKILL itself once the checkpoint of that step is written
    kill_step, save = int(mode.removeprefix("kill-after-")), training.save_checkpoint
    def save_then_die(run_dir, step, *args, **kwargs):
        path = save(run_dir, step, *args, **kwargs)
        if step >= kill_step:
            os.kill(os.getpid(), signal.SIGKILL)
        return path
    training.save_checkpoint = save_then_die
train(spectra, sys.argv[1], config, resume=mode == "resume", progress=False)
"""


def _script(tmp_path, shared_data, **extra) -> Path:
    path = tmp_path / "run_train.py"
    path.write_text(_SCRIPT.format(tests=str(Path(__file__).parent), aspcap=str(shared_data / "apogee/aspcapstar/*.fits"),
                                   miles=str(shared_data / "miles/MILES_res2.50_star_m00*V.fits"), extra=extra))
    return path


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_result(spectra, shared_data, tmp_path):
    """A training process SIGKILLed right after its step-4 checkpoint (by itself: the kill depends on
    the step, not on the machine's speed), resumed: the weights after 10 steps equal those of an
    uninterrupted run (max |difference| = 0)."""
    script = _script(tmp_path, shared_data, max_steps=10, checkpoint_every_steps=2)
    run = tmp_path / "killed"
    killed = subprocess.run([sys.executable, str(script), str(run), "kill-after-4"])
    assert killed.returncode == -signal.SIGKILL
    assert json.loads((run / "latest.json").read_text())["step"] == 4
    subprocess.run([sys.executable, str(script), str(run), "resume"], check=True)
    train(spectra, tmp_path / "straight", tiny_config(max_steps=10, checkpoint_every_steps=2), progress=False)
    assert_same_weights(weights(run), weights(tmp_path / "straight"))


@pytest.mark.slow
def test_torchrun_two_ranks_on_cpu(shared_data, tmp_path):
    """torchrun --nproc_per_node 2 (gloo): both ranks train on disjoint halves, rank 0 writes."""
    torchrun = Path(sys.executable).with_name("torchrun")
    script = _script(tmp_path, shared_data, max_steps=4)
    run = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_port", free_port(), str(script), str(run)],
                            env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4
    folder = next((run / "checkpoints").glob("step-*"))
    state = torch.load(folder / "train_state.pt", weights_only=True)
    assert isinstance(state["sampler"], list) and len(state["sampler"]) == 2
    assert load_model(run).model.latents.num_embeddings == 6  # one latent per spectrum of both ranks


def test_observations_of_one_star_share_one_latent(spectra):
    """latent_per_star: two records of one star (same star_id) get the same row of the latent
    table, other stars their own; the table has one row per star."""
    import dataclasses

    a, b, c = spectra[0], spectra[1], spectra[3]  # two aspcapStar stars and a MILES star
    twin = dataclasses.replace(c, star_id=a.object_id, object_id="another-name")  # "a", seen by MILES
    data = TrainingData([a, b, c, twin], latent_per_star=True)
    index = {key: int(i) for p in data.products.values() for key, i in zip(p.keys, p.index)}
    assert index[a.key] == index[twin.key]
    assert len({index[a.key], index[b.key], index[c.key]}) == 3
    assert data.n_total == 3
    per_spectrum = TrainingData([a, b, c, twin])
    assert per_spectrum.n_total == 4


def test_random_per_product_samples_the_whole_stream_not_its_head():
    """A dataset's order follows its source files: the prior's sample must not be the first files'."""
    from types import SimpleNamespace

    from stellarfield.model.train import random_per_product

    stream = [SimpleNamespace(product="xp", source=i // 1000) for i in range(4000)]  # 4 source files in order
    stream += [SimpleNamespace(product="miles", source=0) for _ in range(30)]
    stream.insert(100, SimpleNamespace(product="unknown", source=0))
    sample = random_per_product(stream, ["miles", "xp"], 400, seed=1)
    xp = [s for s in sample if s.product == "xp"]
    assert len(xp) == 400 and sum(s.product == "miles" for s in sample) == 30  # all of a small product
    counts = np.bincount([s.source for s in xp], minlength=4)
    assert counts.min() > 60, counts  # ~100 from each of the 4 files, not 400 from the first
    assert [id(s) for s in random_per_product(stream, ["miles", "xp"], 400, seed=1)] == [id(s) for s in sample]
    assert len({id(s) for s in xp}) == 400  # no spectrum twice


def test_cosine_schedule_warms_up_then_decays_to_its_floor():
    """The step-size factor: a linear warm-up, then 1 (constant) or half a cosine from 1 to the floor
    at the run's limit, falling monotonically."""
    from stellarfield.model.train import learning_rate_factor, run_fraction

    cosine = TrainConfig(warmup_steps=10, lr_schedule="cosine", lr_final_ratio=0.1, minutes=None, max_steps=100)
    assert learning_rate_factor(cosine, 0, 0.0) == pytest.approx(0.1)  # step 1 of 10 of the warm-up
    assert learning_rate_factor(cosine, 9, 0.0) == pytest.approx(1.0)
    assert learning_rate_factor(cosine, 50, 0.5) == pytest.approx(0.55)  # halfway: (1 + floor) / 2
    assert learning_rate_factor(cosine, 100, 1.0) == pytest.approx(0.1)
    after = [learning_rate_factor(cosine, s, run_fraction(s, 100)) for s in range(10, 101)]
    assert all(a > b for a, b in zip(after, after[1:]))
    constant = TrainConfig(warmup_steps=10, minutes=None, max_steps=100)
    assert learning_rate_factor(constant, 99, 0.99) == 1.0


def test_run_fraction_counts_the_nearer_limit():
    """A run with both a step and a time limit is as far along as the nearer of the two. Arithmetic
    on the numbers it is given: nothing trains here and no clock is read."""
    from stellarfield.model.train import run_fraction

    assert run_fraction(100, 1000, elapsed_s=300.0, minutes=10.0) == pytest.approx(0.5)  # the clock is nearer
    assert run_fraction(900, 1000, elapsed_s=60.0, minutes=10.0) == pytest.approx(0.9)
    assert run_fraction(900, 1000) == pytest.approx(0.9) and run_fraction(2000, 1000) == 1.0  # steps alone


def test_periodic_work_is_due_by_steps_or_by_the_clock_never_both():
    """Validation and checkpoints: every N steps when that is set (the clock then never counts), else
    every so many seconds, and never by the clock when the seconds are None (the tests' setting)."""
    from stellarfield.model.train import _due

    assert _due(6, 3, since_s=0.0, every_s=None) and not _due(7, 3, since_s=1e6, every_s=1.0)
    assert _due(7, None, since_s=120.0, every_s=120.0) and not _due(7, None, since_s=119.0, every_s=120.0)
    assert not _due(7, None, since_s=1e12, every_s=None)


def test_an_unknown_schedule_is_refused_before_training():
    with pytest.raises(ValueError, match="lr_schedule"):
        train([], "unused", TrainConfig(lr_schedule="linear", minutes=None, max_steps=1), progress=False)


def test_cosine_run_logs_its_falling_step_sizes(spectra, tmp_path):
    run = tmp_path / "cos"
    train(spectra, run, tiny_config(max_steps=8, log_every=1, lr_schedule="cosine", lr_final_ratio=0.0),
          progress=False)
    factors = [json.loads(line)["lr_factor"] for line in (run / "metrics.jsonl").read_text().splitlines()
               if "lr_factor" in json.loads(line)]
    assert len(factors) == 8 and factors[0] == pytest.approx(0.5)  # warm-up of 2 steps
    assert all(a > b for a, b in zip(factors[1:], factors[2:])) and factors[-1] < 0.1


def test_warm_start_keeps_the_source_decoder_and_starts_the_latents_at_its_fits(spectra, tmp_path):
    """init_from: the decoder (weights and architecture, whatever the new config says) is the
    source's, the latent table holds the source's fits of the training spectra (their loss below that
    of latents at zero: ~0.09, a fifth in chi2, for this tiny source), and the run's config records where it started."""
    from stellarfield.model.objectives import training_loss
    from stellarfield.model.train import warm_start

    train(spectra, tmp_path / "src", tiny_config(max_steps=30), progress=False)
    source = load_model(tmp_path / "src").model
    config = tiny_config(max_steps=2, init_from=str(tmp_path / "src"), latent_dim=7, init_refine_steps=30)
    data = TrainingData(spectra, latent_per_star=True)
    model, record = warm_start(config, data)
    assert config.latent_dim == 4 and model.latent_dim == 4  # the source's architecture, and the config says so
    for name, value in source.decoder.state_dict().items():
        assert torch.equal(model.decoder.state_dict()[name], value), name
    assert record["model"] == str(tmp_path / "src") and record["latent_fits"] == data.n_total
    batches = [p.batch(torch.arange(len(p))) for p in data.products.values()]
    with torch.no_grad():
        fitted, _ = training_loss(model, batches, "autodecoder")
        model.latents.weight.zero_()
        at_zero, _ = training_loss(model, batches, "autodecoder")
    assert float(fitted) < float(at_zero) - 0.02, (float(fitted), float(at_zero))
    # a whole run: it trains from there and says so
    result = train(spectra, tmp_path / "fine", config, progress=False)
    saved = json.loads(next((tmp_path / "fine" / "checkpoints").glob("step-*/config.json")).read_text())
    assert saved["init_from"]["model"] == str(tmp_path / "src") and saved["train_config"]["latent_dim"] == 4
    assert result.steps == 2
