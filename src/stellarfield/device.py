"""Where the model runs: ``--device auto|cpu|cuda``, and where lower precision is safe.

Data stay on the host (numpy, padded CPU tensors); each batch moves to the model's device when it
is used (:meth:`stellarfield.model.batching.Batch.to`), and results come back as numpy arrays.

Mixed precision (:func:`mlp_autocast`): on CUDA the decoder's two MLPs (trunk and branch) may run
in bfloat16, their matrix products being most of the cost. Kept in float64/float32 on purpose:

* wavelength coordinates ``u = ln(lambda)`` (float64 everywhere: a Doppler shift of 1 km/s is a
  change of 3e-6 in u, below float32's resolution of u ~ 9 at 1e-6 relative);
* the grid-encoding positions (computed from u in float64 before the features are interpolated);
* the continuum's normal equations (float64: weights span many decades, see
  :func:`stellarfield.model.likelihood.likelihood`);
* the LSF blur, the rendering interpolation and the chi2 sums (float32).

A checkpoint is written from CPU copies of the weights and loaded onto any device.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: the command line reads DEVICES without it
    import torch

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` (CUDA when available, else the CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    Raises ValueError with what to do when CUDA is asked for and there is none."""
    import torch

    if isinstance(device, torch.device):
        name = str(device)
    else:
        name = (device or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for, but this torch ({torch.__version__}) sees no CUDA GPU; "
                             "use --device cpu (or auto)")
        return torch.device(name)
    raise ValueError(f"unknown device {name!r}; choose one of {DEVICES} (or cuda:N)")


def mlp_autocast(device: torch.device, enabled: bool = True):
    """bfloat16 autocast for the decoder's MLPs on CUDA; a no-op on the CPU (see the module doc)."""
    if enabled and device.type == "cuda":
        import torch

        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
