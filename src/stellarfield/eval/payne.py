"""The Payne's spectral emulator, as a speed and accuracy reference.

The Payne (Ting, Conroy, Rix & Cargile 2019, ApJ 879, 69) emulates spectra with a small fully
connected network from stellar labels to all pixels at once:

    labels (scaled to [-0.5, 0.5]) -> 300 -> LeakyReLU -> 300 -> LeakyReLU -> N pixels

(two hidden layers of 300 neurons with leaky ReLU activations, as in the authors' public training
code ``The_Payne``; this is an independent implementation of that architecture, not their code).
Its generation cost, two small matrix products and one (B x 300) @ (300 x N) product, is the
yardstick the generative model's speed is compared with.

:func:`fit_payne` trains it on labelled spectra of one fixed grid (chi2 loss with ``ivar`` weights),
which is cheap for a few thousand spectra; :func:`spectra_per_second` times any generator.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

#: Hidden layer width of The Payne.
PAYNE_HIDDEN = 300


class PayneEmulator(nn.Module):
    """labels -> 300 -> 300 -> pixels, LeakyReLU (The Payne's architecture).

    ``label_min`` / ``label_max`` (buffers) scale labels to ``[-0.5, 0.5]`` as The Payne does; they
    default to 0 and 1 (labels passed through shifted by -0.5) until :func:`fit_payne` sets them.
    """

    def __init__(self, n_labels: int, n_pixels: int, n_hidden: int = PAYNE_HIDDEN, negative_slope: float = 0.01):
        super().__init__()
        self.network = nn.Sequential(
            nn.Linear(n_labels, n_hidden),
            nn.LeakyReLU(negative_slope),
            nn.Linear(n_hidden, n_hidden),
            nn.LeakyReLU(negative_slope),
            nn.Linear(n_hidden, n_pixels),
        )
        self.register_buffer("label_min", torch.zeros(n_labels))
        self.register_buffer("label_max", torch.ones(n_labels))

    @property
    def n_pixels(self) -> int:
        return self.network[-1].out_features

    def scale_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Labels (B, n_labels) in physical units -> the network's input range [-0.5, 0.5]."""
        return (labels - self.label_min) / (self.label_max - self.label_min) - 0.5

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        """Spectra (B, n_pixels) of labels (B, n_labels) in physical units."""
        return self.network(self.scale_labels(labels))


def fit_payne(
    labels: np.ndarray,
    flux: np.ndarray,
    ivar: np.ndarray | None = None,
    *,
    epochs: int = 200,
    batch_size: int = 256,
    learning_rate: float = 1e-3,
    seed: int = 0,
) -> PayneEmulator:
    """Train a :class:`PayneEmulator` on spectra of one grid: ``flux`` (N, P), ``labels`` (N, L).

    Loss: mean over pixels of ``(flux - model)**2 * w`` with ``w = ivar`` normalised to mean 1 over
    the good pixels (``ivar=None``: unit weights). Adam, fixed epochs, deterministic for a seed.
    Rows with a non-finite label are dropped.
    """
    labels = np.asarray(labels, dtype=np.float32)
    flux = np.asarray(flux, dtype=np.float32)
    weight = np.ones_like(flux) if ivar is None else np.asarray(ivar, dtype=np.float32)
    keep = np.isfinite(labels).all(axis=1)
    labels, flux, weight = labels[keep], flux[keep], weight[keep]
    weight = np.where(np.isfinite(flux) & np.isfinite(weight) & (weight > 0), weight, 0.0)
    flux = np.where(weight > 0, flux, 0.0)
    if (weight > 0).any():
        weight = weight / weight[weight > 0].mean()

    torch.manual_seed(seed)
    model = PayneEmulator(labels.shape[1], flux.shape[1])
    model.label_min.copy_(torch.from_numpy(labels.min(axis=0)))
    model.label_max.copy_(torch.from_numpy(np.maximum(labels.max(axis=0), labels.min(axis=0) + 1e-6)))
    x, y, w = (torch.from_numpy(a) for a in (labels, flux, weight.astype(np.float32)))
    optimiser = torch.optim.Adam(model.parameters(), lr=learning_rate)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for rows in torch.randperm(len(x), generator=generator).split(batch_size):
            loss = ((model(x[rows]) - y[rows]) ** 2 * w[rows]).mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    return model.eval()


def spectra_per_second(generate: Callable[[int], object], batch_size: int = 1024, repeats: int = 5, warmup: int = 1) -> float:
    """Spectra per second of ``generate(batch_size)`` (best of ``repeats`` timed calls, after warm-up).

    Best-of rather than mean: on a shared machine the fastest run is the one least disturbed.
    """
    with torch.no_grad():
        for _ in range(warmup):
            generate(batch_size)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            generate(batch_size)
            best = min(best, time.perf_counter() - start)
    return batch_size / best


def payne_spectra_per_second(n_pixels: int, n_labels: int = 4, batch_size: int = 1024, repeats: int = 5) -> float:
    """Generation speed of an (untrained: same cost) Payne emulator on an ``n_pixels`` grid."""
    torch.manual_seed(0)
    model = PayneEmulator(n_labels, n_pixels).eval()
    labels = torch.rand(batch_size, n_labels)
    return spectra_per_second(lambda b: model(labels[:b]), batch_size=batch_size, repeats=repeats)
