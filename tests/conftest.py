"""Shared fixtures: the real survey files in ``../shared/data`` (read in place, never copied)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("STELLARFIELD_SHARED_DATA", REPO.parent / "shared" / "data"))

#: A tiny TrainConfig (a few steps on a few spectra) shared by the model tests; a test that needs
#: other values overrides them: ``TrainConfig(**{**TINY_TRAIN, "max_steps": 2})``. Nothing in it
#: acts on the wall clock (no time limit, no periodic validation or checkpoint by the clock: those
#: are by steps where a test wants them), so a run's result never depends on the machine's speed.
TINY_TRAIN = dict(
    latent_dim=4, n_basis=8, trunk_hidden=(16,), branch_hidden=(16,),
    encoding_kwargs=dict(levels=6, features=2, coarsest_step=0.02, finest_step=2e-5),
    batch_per_product=3, window_pixels=256, minutes=None, split_spectra=False, threads=1,
    prior_steps=20, final_val_refine_steps=2, val_refine_steps=2, warmup_steps=2, max_steps=3,
    validate_every_s=None, checkpoint_every_s=None,
)



#: The tiny model the eval tests (bench, explain) train end to end: more steps than TINY_TRAIN, with
#: validation, so the reports have something to show.
TINY_EVAL_TRAIN = dict(
    latent_dim=4, n_basis=8, trunk_hidden=(16,), branch_hidden=(16,),
    encoding_kwargs=dict(levels=6, features=2, coarsest_step=0.02, finest_step=2e-5),
    batch_per_product=3, window_pixels=256, minutes=None, threads=1, max_steps=10, warmup_steps=2,
    val_max_per_product=2, val_refine_steps=3, final_val_max_per_product=4, final_val_refine_steps=5, prior_steps=50,
    validate_every_s=None, checkpoint_every_s=None,
)

def free_port() -> str:
    """A TCP port free on this machine now, for a torchrun rendezvous (a fixed port may still be
    held, in TIME_WAIT, by an earlier run)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def ingest_miles_lamost(shared_data: Path, n: int, out: Path) -> Path:
    """A dataset of the first ``n`` MILES stars and ``n`` LAMOST spectra (with catalogue labels) at ``out``."""
    import glob

    from stellarfield.ingest import ingest

    files = sorted(glob.glob(str(shared_data / "miles" / "MILES_res2.50_star_m00*V.fits")))[:n]
    files += sorted(glob.glob(str(shared_data / "lamost" / "spec-55862-B6212_sp06-*.fits")))[:n]
    ingest(files, out, workers=1, progress=False)
    return out


def train_tiny(dataset: Path, out: Path, **config) -> Path:
    """A tiny model trained on ``dataset`` into ``out``, leaving torch's thread count as it was."""
    import torch

    from stellarfield.model.train import TrainConfig, train

    before = torch.get_num_threads()
    train(dataset, out, TrainConfig(**config), progress=False)
    torch.set_num_threads(before)
    return out

@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Folder of real survey files; tests that need it are skipped where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real survey files not found at {SHARED_DATA} (set STELLARFIELD_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def eval_dataset(shared_data, tmp_path_factory) -> Path:
    """60 MILES stars and 60 LAMOST spectra (with catalogue labels): both have test-split stars.
    Shared, read-only, by the eval tests (bench, explain)."""
    return ingest_miles_lamost(shared_data, 60, tmp_path_factory.mktemp("eval") / "DS")


@pytest.fixture(scope="session")
def eval_run(eval_dataset, tmp_path_factory) -> Path:
    """The tiny model (:data:`TINY_EVAL_TRAIN`) trained once on :func:`eval_dataset`, read-only."""
    return train_tiny(eval_dataset, tmp_path_factory.mktemp("eval") / "run", **TINY_EVAL_TRAIN)


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", default=False, help="also run tests marked slow (CI does)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--slow"):
        return
    skip_slow = pytest.mark.skip(reason="slow test: run with --slow (CI runs it)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


@pytest.fixture(autouse=True, scope="module")
def single_torch_thread(request):
    """Model tests run torch on one thread: their small tensors gain nothing from more, and on
    shared cores two spinning threads were measured 5-8x slower."""
    if not request.module.__name__.startswith("test_model"):
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
