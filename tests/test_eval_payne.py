"""The Payne-style emulator: its architecture, a quick fit, and the speed helper."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from stellarfield.eval.baselines import PayneEmulator as ReExported
from stellarfield.eval.payne import PayneEmulator, fit_payne, payne_spectra_per_second, spectra_per_second


def test_architecture_is_labels_300_300_pixels_with_leaky_relu():
    model = PayneEmulator(n_labels=4, n_pixels=8575)
    layers = list(model.network)
    linear = [m for m in layers if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linear] == [(4, 300), (300, 300), (300, 8575)]
    assert [type(m) for m in layers] == [nn.Linear, nn.LeakyReLU, nn.Linear, nn.LeakyReLU, nn.Linear]
    assert model(torch.zeros(7, 4)).shape == (7, 8575)
    assert ReExported is PayneEmulator


def test_labels_are_scaled_to_minus_half_plus_half():
    model = PayneEmulator(2, 3)
    model.label_min.copy_(torch.tensor([3000.0, 0.0]))
    model.label_max.copy_(torch.tensor([7000.0, 5.0]))
    scaled = model.scale_labels(torch.tensor([[3000.0, 5.0], [5000.0, 2.5]]))
    assert torch.allclose(scaled, torch.tensor([[-0.5, 0.5], [0.0, 0.0]]))


@pytest.fixture
def one_torch_thread():
    """Train on one thread: on a 2-core machine torch's threads otherwise fight numpy's idle BLAS threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_fit_learns_spectra_that_depend_smoothly_on_labels(one_torch_thread):
    rng = np.random.default_rng(0)
    labels = np.column_stack([rng.uniform(4000, 6500, 600), rng.uniform(1, 5, 600)])
    x = np.linspace(-1, 1, 50)
    depth = 0.2 + 0.5 * (labels[:, :1] - 4000) / 2500  # a line that deepens with Teff
    width = 0.1 + 0.05 * labels[:, 1:]  # and widens with logg
    flux = 1 - depth * np.exp(-0.5 * (x / width) ** 2)
    model = fit_payne(labels[:500], flux[:500], epochs=60, batch_size=100, learning_rate=1e-2)
    with torch.no_grad():
        predicted = model(torch.tensor(labels[500:], dtype=torch.float32)).numpy()
    rms = np.sqrt(np.mean((predicted - flux[500:]) ** 2))
    assert rms < 0.01  # the spread of the spectra themselves is ~0.15 (measured: 0.002)
    assert np.std(flux[500:] - flux[500:].mean(0)) > 5 * rms
    assert float(model.label_min[0]) == pytest.approx(labels[:500, 0].min(), rel=1e-6)


def test_speed_helpers_return_spectra_per_second():
    calls = []
    rate = spectra_per_second(lambda b: calls.append(b), batch_size=64, repeats=2, warmup=1)
    assert calls == [64, 64, 64] and rate > 0
    assert payne_spectra_per_second(1000, batch_size=32, repeats=1) > 100
