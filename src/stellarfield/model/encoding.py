"""Encodings of the wavelength coordinate ``u = ln(lambda / Angstrom)`` (vacuum, rest frame).

The decoder's trunk is a function of wavelength only. It works in ``u = ln(lambda)`` because both a
Doppler shift and a constant resolving power are uniform there (a shift is a translation, an LSF of
resolving power R is a Gaussian of fixed width ``1 / (2.3548 R)``). The encoding turns ``u`` into a
feature vector that a small MLP can map to the basis functions; it must resolve structure from the
broad spectral energy distribution (Gaia XP, R ~ 50) down to single lines at R ~ 28,000 (GALAH),
i.e. from ``du ~ 1`` to ``du ~ 1e-5``, over the whole range :data:`U_MIN` .. :data:`U_MAX`.

**Band limit.** Every observation blurs the trunk by an LSF of sigma ``sigma_u``; structure much
finer than that is invisible to it, and sampling such structure on a model grid of step ~sigma/3
would alias it (a low-resolution product would see arbitrary point values of the high-resolution
lines, and a grid shifted by half a step would give a different spectrum). So the encoding takes
the LSF sigma of each point and switches off the scales finer than it (grid levels with step below
0.4 sigma, Fourier frequencies with ``w sigma > 2``): a band-limited encoding, a cheap stand-in for
blurring the encoding; the exact Gaussian blur is still applied to the output. Measured effect on
the generated spectra in the README.

Two encodings are offered (``TrainConfig.encoding``); the measured comparison is in the README:

* :class:`GridEncoding` (default): a multi-resolution table of learned features, linearly
  interpolated in ``u`` (the 1-D case of the multi-resolution grids of Mueller et al. 2022,
  "Instant neural graphics primitives", without hashing since 1-D tables are small). Its capacity
  grows with the number of resolution elements, which is what a line list needs.
* :class:`FourierFeatures`: ``sin`` and ``cos`` of ``u`` at log-spaced frequencies (Tancik et al.
  2020, "Fourier features let networks learn high frequency functions").
* :class:`HybridEncoding`: both side by side, the Fourier part limited to low frequencies (smooth
  features for the spectral energy distribution that low-resolution products such as Gaia XP see,
  where the grid's piecewise-linear features put kinks at its knots), the grid for lines.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

#: Global coordinate range of the model: ln(3000 A) .. ln(17500 A), vacuum, rest frame: the UV
#: edge of MILES/LAMOST/XP to beyond the red edge of APOGEE's H band, with room for Doppler shifts.
LAMBDA_MIN_A: float = 3000.0
LAMBDA_MAX_A: float = 17500.0
U_MIN: float = math.log(LAMBDA_MIN_A)
U_MAX: float = math.log(LAMBDA_MAX_A)
#: Grid-encoding levels with a step below BAND_LIMIT x the LSF sigma are switched off (see above).
BAND_LIMIT: float = 0.4


def normalised_coordinate(u: torch.Tensor) -> torch.Tensor:
    """Map ``u = ln(lambda)`` (float64) linearly onto [-1, 1] over ``U_MIN .. U_MAX``."""
    return 2.0 * (u - U_MIN) / (U_MAX - U_MIN) - 1.0


class GridEncoding(nn.Module):
    """Learned features on ``levels`` uniform tables in ``u``, from ``coarsest_step`` to ``finest_step``.

    Level ``l`` stores ``features`` numbers at knots spaced ``h_l`` in ``u`` (geometric between the
    coarsest and finest step) over ``U_MIN .. U_MAX``; the encoding of ``u`` is the concatenation over
    levels of the linear interpolation between the two knots around it, shape ``(N, levels * features)``.
    The finest step, 7e-6, is the finest any LSF here can see: levels finer than 0.4 sigma_u are
    switched off (band limit), and GALAH's sigma_u = 1.5e-5 (R 28,000) keeps steps >= 6.1e-6.
    Knots never touched by data keep their small initial values, so the trunk is smooth and near its
    mean in gaps between survey windows. The tables get sparse gradients (train them with
    ``torch.optim.SparseAdam``): a step costs what the batch touches, not the 2.7M table entries.
    """

    def __init__(self, levels: int = 12, features: int = 4, coarsest_step: float = 2e-2, finest_step: float = 7e-6):
        super().__init__()
        self.levels, self.features = levels, features
        ratio = (finest_step / coarsest_step) ** (1.0 / max(levels - 1, 1))
        self.steps = [coarsest_step * ratio**l for l in range(levels)]
        self.tables = nn.ParameterList(
            nn.Parameter(torch.empty(int(math.ceil((U_MAX - U_MIN) / h)) + 2, features).uniform_(-1e-4, 1e-4))
            for h in self.steps
        )
        self.out_dim = levels * features

    def forward(self, u: torch.Tensor, sigma_u: torch.Tensor | None = None) -> torch.Tensor:
        """``u``: (N,) float64 ln(lambda/A), rest frame. Returns (N, levels * features) float32.
        ``sigma_u`` (N,): LSF sigma at each point; levels finer than 0.4 sigma give 0 there."""
        out = []
        for h, table in zip(self.steps, self.tables):
            if sigma_u is not None and bool((h < BAND_LIMIT * sigma_u).all()):
                out.append(torch.zeros(len(u), table.shape[1], device=table.device))
                continue
            position = ((u - U_MIN) / h).clamp(0, table.shape[0] - 1.000001)
            left = position.floor()
            frac = (position - left).to(table.dtype)[:, None]
            # sparse gradients: an optimiser step touches only the knots this batch used
            pair = F.embedding(torch.stack([left, left + 1], 1).long(), table, sparse=True)  # (N, 2, F)
            features = pair[:, 0] * (1 - frac) + pair[:, 1] * frac
            if sigma_u is not None:
                features = features * (h >= BAND_LIMIT * sigma_u).to(features.dtype)[:, None]
            out.append(features)
        return torch.cat(out, dim=1)


class FourierFeatures(nn.Module):
    """``[sin(w_k x), cos(w_k x)]`` of the normalised coordinate ``x`` in [-1, 1] (see module doc).

    ``n_freq`` angular frequencies log-spaced from ``w_min`` (the whole range is ~1/3 period: SED
    scale) to ``w_max``; with ``x`` spanning ``U_MAX - U_MIN = 1.764`` in ``u``, ``w_max = 1e5``
    corresponds to a period of 1.1e-4 in ``u``, about 3 sigma of the GALAH LSF.
    """

    def __init__(self, n_freq: int = 64, w_min: float = 1.0, w_max: float = 1e5):
        super().__init__()
        freqs = torch.logspace(math.log10(w_min), math.log10(w_max), n_freq, dtype=torch.float64)
        self.register_buffer("freqs", freqs)
        self.out_dim = 2 * n_freq

    def forward(self, u: torch.Tensor, sigma_u: torch.Tensor | None = None) -> torch.Tensor:
        """``u``: (N,) float64 ln(lambda/A). Returns (N, 2 n_freq) float32 (phases in float64).
        ``sigma_u`` (N,): LSF sigma; frequencies the Gaussian damps below e^-2 (w sigma > 2) give 0."""
        phase = normalised_coordinate(u)[:, None] * self.freqs
        out = torch.cat([torch.sin(phase), torch.cos(phase)], dim=1)
        if sigma_u is not None:
            w_u = self.freqs * 2.0 / (U_MAX - U_MIN)  # angular frequency per unit of u
            keep = (w_u[None, :] * sigma_u[:, None] <= 2.0).to(out.dtype)
            out = out * torch.cat([keep, keep], dim=1)
        return out.float()


class HybridEncoding(GridEncoding):
    """A :class:`GridEncoding` with low-frequency :class:`FourierFeatures` beside it (module doc).

    A subclass so that the tables keep their names (``encoding.tables.*``: SparseAdam, float16
    export). Each part applies its own band limit; the output is ``(N, levels * features + 2 n_freq)``.
    """

    def __init__(self, levels: int, features: int, coarsest_step: float, finest_step: float,
                 n_freq: int, w_min: float, w_max: float):
        super().__init__(levels, features, coarsest_step, finest_step)
        self.fourier = FourierFeatures(n_freq, w_min, w_max)
        self.out_dim += self.fourier.out_dim

    def forward(self, u: torch.Tensor, sigma_u: torch.Tensor | None = None) -> torch.Tensor:
        """``u``: (N,) float64 ln(lambda/A); ``sigma_u`` (N,) LSF sigma or None. Returns float32."""
        return torch.cat([super().forward(u, sigma_u), self.fourier(u, sigma_u)], dim=1)


#: Every argument of each encoding, with its default. Saved configs spell them all out, so a model
#: stays loadable when a default changes.
ENCODING_DEFAULTS = {
    "grid": dict(levels=12, features=4, coarsest_step=2e-2, finest_step=7e-6),
    "fourier": dict(n_freq=64, w_min=1.0, w_max=1e5),
    # w_max 1e3: a period of 5.5e-3 in u (0.55% in wavelength), about what Gaia XP resolves (sigma_u 4.2e-3)
    "hybrid": dict(levels=12, features=4, coarsest_step=2e-2, finest_step=7e-6, n_freq=32, w_min=1.0, w_max=1e3),
}


def encoding_arguments(kind: str, overrides: dict | None = None) -> dict:
    """All keyword arguments of encoding ``kind``: the defaults updated by ``overrides``."""
    if kind not in ENCODING_DEFAULTS:
        raise ValueError(f"unknown encoding {kind!r}; choose one of {sorted(ENCODING_DEFAULTS)}")
    unknown = set(overrides or {}) - set(ENCODING_DEFAULTS[kind])
    if unknown:
        raise ValueError(f"unknown arguments {sorted(unknown)} for the {kind!r} encoding")
    return {**ENCODING_DEFAULTS[kind], **(overrides or {})}


def make_encoding(kind: str, **kwargs) -> nn.Module:
    """Build the encoding named ``kind`` ("grid", "fourier" or "hybrid") with its keyword arguments."""
    kwargs = encoding_arguments(kind, kwargs)
    return {"grid": GridEncoding, "fourier": FourierFeatures, "hybrid": HybridEncoding}[kind](**kwargs)
