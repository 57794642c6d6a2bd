"""Where the model runs (stellarfield.device): choices, errors, and a checkpoint that moves
between devices. The CUDA tests run only where torch sees a GPU."""

from __future__ import annotations

import glob

import numpy as np
import pytest
import torch

from stellarfield.io import read_spectra
from stellarfield.model.checkpoint import load_model
from stellarfield.device import mlp_autocast, resolve_device
from stellarfield.model.generate import generate
from stellarfield.model.train import TrainConfig, train
from conftest import TINY_TRAIN

TINY = {**TINY_TRAIN, "final_val_refine_steps": 5, "val_refine_steps": 5}
GPU = torch.cuda.is_available()


def test_device_choices_and_errors():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if GPU else "cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ValueError, match="choose one of"):
        resolve_device("tpu")
    if not GPU:
        with pytest.raises(ValueError, match="no CUDA GPU"):
            resolve_device("cuda")


def test_no_autocast_on_the_cpu():
    """Mixed precision is for CUDA only: on the CPU a matrix product stays float32."""
    a = torch.randn(4, 4)
    with mlp_autocast(torch.device("cpu")):
        assert (a @ a).dtype == torch.float32


@pytest.fixture(scope="module")
def miles(shared_data):
    files = sorted(glob.glob(str(shared_data / "miles/MILES_res2.50_star_m00*V.fits")))[:3]
    return [s for f in files for s in read_spectra(f)]


def test_model_loads_on_the_device_asked_for(miles, tmp_path):
    train(miles, tmp_path / "run", TrainConfig(**TINY, device="cpu"), progress=False)
    trained = load_model(tmp_path / "run", device="cpu")
    assert trained.model.device == torch.device("cpu")
    if not GPU:
        with pytest.raises(ValueError, match="no CUDA GPU"):
            load_model(tmp_path / "run", device="cuda")


@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
def test_a_checkpoint_trained_on_the_gpu_generates_the_same_on_the_cpu(miles, tmp_path):
    train(miles, tmp_path / "run", TrainConfig(**TINY, device="cuda"), progress=False)
    on_gpu = generate(load_model(tmp_path / "run", device="cuda"), 4, instrument="miles", seed=1)
    on_cpu = generate(load_model(tmp_path / "run", device="cpu"), 4, instrument="miles", seed=1)
    # bfloat16 MLPs on the GPU, float32 on the CPU: agreement to the bfloat16 rounding of the basis
    np.testing.assert_allclose(on_gpu.flux, on_cpu.flux, rtol=2e-2, atol=2e-2 * np.abs(on_cpu.flux).max())
