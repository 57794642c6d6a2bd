"""Generation speed of a trained model against the Payne emulator, and the timer behind it.

* :func:`generation_speed` times generation on an instrument's native grid against
  :class:`~stellarfield.eval.payne.PayneEmulator` on as many pixels, interleaved in one process,
  both on the CPU (a model on a GPU is timed through a CPU copy, :func:`on_cpu`);
* :func:`best_seconds`: the shortest wall time of a few calls (also used by ``benchmarks/``).
"""

from __future__ import annotations

import copy
import time
from dataclasses import replace

import torch

from stellarfield.eval.payne import PayneEmulator
from stellarfield.model.checkpoint import TrainedModel
from stellarfield.model.generate import RenderedBasis

#: Labels of the Payne emulator timed against the model (The Payne's 25 APOGEE labels; the cost
#: is dominated by the last layer, 300 x pixels, so this number hardly matters).
PAYNE_LABELS = 25


def on_cpu(trained: TrainedModel) -> TrainedModel:
    """``trained`` itself when its model is on the CPU, else a copy with a CPU copy of the model
    (the original stays where it is)."""
    if trained.model.device.type == "cpu":
        return trained
    return replace(trained, model=copy.deepcopy(trained.model).to("cpu"))


def best_seconds(fn, repeats: int) -> float:
    """The shortest wall time (s) of ``repeats`` calls of ``fn()``: the speed the machine allows,
    least disturbed by other work."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def generation_speed(trained: TrainedModel, product: str, batch: int = 1024, repeats: int = 5, seed: int = 0) -> dict:
    """Spectra per second generating ``batch`` spectra on ``product``'s native grid, model vs Payne.

    Both run on the CPU (the model through :func:`on_cpu` if it lives on a GPU), so the comparison
    is side by side on one device. Model: the branch MLP on random latents and one matrix product with the cached, blurred trunk
    (:class:`RenderedBasis`, built once, its build time reported apart), written into a
    preallocated array as :func:`~stellarfield.model.generate.generate` does. Payne: labels ->
    300 -> 300 -> pixels. Timed alternately (so both see the same machine load), best of
    ``repeats`` each, after one warm-up call.
    """
    model = on_cpu(trained).model
    inst = model.instrument(product)
    start = time.perf_counter()
    basis = RenderedBasis.build(model, inst, [s.native_wavelength() for s in inst.segments])
    build_s = time.perf_counter() - start
    n_pixels = int(basis.u_pixels.shape[0])
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, model.latent_dim, generator=g)
    labels = torch.rand(batch, PAYNE_LABELS, generator=g)
    emulator = PayneEmulator(PAYNE_LABELS, n_pixels).eval()
    buffer = torch.empty(batch, n_pixels)
    with torch.no_grad():
        ours = lambda: basis.spectra(model.decoder.coefficients(z), out=buffer)  # noqa: E731
        theirs = lambda: emulator(labels)  # noqa: E731
        ours(), theirs()
        model_s, payne_s = float("inf"), float("inf")
        for _ in range(repeats):
            model_s = min(model_s, best_seconds(ours, 1))
            payne_s = min(payne_s, best_seconds(theirs, 1))
    return {
        "model_spectra_per_s": batch / model_s,
        "payne_spectra_per_s": batch / payne_s,
        "ratio": payne_s / model_s,
        "pixels": n_pixels,
        "batch": batch,
        "repeats": repeats,
        "basis_build_s": build_s,
        "device": "cpu",
    }
