"""``StellarModel``: the decoder, the instruments it observes through, and their learned noise floors.

Everything with weights lives here (so one ``state_dict`` is the whole model):

* ``decoder``: :class:`~stellarfield.model.decoder.SpectrumDecoder`, the rest-frame spectrum f(z, u);
* ``likelihood``: how a spectrum is scored (:data:`DEFAULT_LIKELIHOOD`; saved with the model, the same
  in training and at inference, see :func:`stellarfield.model.likelihood.spectrum_loss`);
* ``scatter`` (only with the ``"nll"`` likelihood): per instrument, a learned intrinsic scatter curve ``s(u)`` (softplus of a table of
  :data:`SCATTER_KNOTS` knots, linearly interpolated in observed-frame ``u``) in units of the
  spectrum's median flux. It adds ``(s * median flux)^2`` to each pixel's variance, so regions the
  model cannot fit (telluric residuals, the spectral types it has not learned yet) and products with
  miscalibrated or unknown errors (GALAH's relative sigma, Gaia XP's correlated samples, MILES' none)
  are down-weighted by the likelihood itself instead of dominating it;
* ``latents`` (auto-decoder objective only): one learned latent per training spectrum;
* ``encoder`` (optional): :class:`~stellarfield.model.encoder.SpectrumEncoder`, spectrum -> latent in
  one pass (amortised inference; ``encoder_config``: its keyword arguments, see :meth:`add_encoder`).

The instruments themselves (:class:`~stellarfield.model.instrument.Instrument`) are plain data,
saved as JSON next to the weights.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from stellarfield.model.decoder import SpectrumDecoder
from stellarfield.model.encoder import SpectrumEncoder
from stellarfield.model.instrument import Instrument
from stellarfield.model.latent_table import LatentAdam

#: Knots of each instrument's intrinsic-scatter curve, uniform in u over its pixel range.
SCATTER_KNOTS = 64

#: How a spectrum is scored against the model (see :func:`stellarfield.model.likelihood.spectrum_loss`):
#: ``loss`` "logchi2" (the survey's errors with their overall scale profiled out, a unit-normal prior
#: on z) or "nll" (Gaussian NLL with a learned scatter per instrument and wavelength, plus
#: ``latent_l2`` |z|^2); ``noise_floor``: sigma of every pixel is at least this fraction of the
#: spectrum's median |flux| (no pixel is trusted beyond S/N 1000).
DEFAULT_LIKELIHOOD = {"loss": "logchi2", "latent_l2": 1e-3, "noise_floor": 1e-3}
LOSSES = ("logchi2", "nll")


class StellarModel(nn.Module):
    """See the module docstring. ``decoder_config``: keyword arguments of :class:`SpectrumDecoder`."""

    def __init__(self, instruments: dict[str, Instrument], decoder_config: dict, n_latents: int = 0,
                 likelihood: dict | None = None, encoder_config: dict | None = None):
        super().__init__()
        self.instruments = dict(instruments)
        self.decoder_config = dict(decoder_config)
        self.likelihood = {**DEFAULT_LIKELIHOOD, **(likelihood or {})}
        if self.likelihood["loss"] not in LOSSES:
            raise ValueError(f"unknown loss {self.likelihood['loss']!r}; choose one of {LOSSES}")
        self.decoder = SpectrumDecoder(**decoder_config)
        self.scatter_raw = nn.ParameterDict(
            {
                name: nn.Parameter(torch.full((SCATTER_KNOTS,), math.log(math.expm1(inst.scatter_init))))
                for name, inst in self.instruments.items()
            }
        ) if self.learns_scatter else nn.ParameterDict()
        # dense latents: every step's Adam moment estimates keep moving the whole table (see
        # latent_optimizer); sparse lazy updates gave each Gaia XP latent ~18 updates in a 15-min run
        self.latents = nn.Embedding(n_latents, self.latent_dim) if n_latents else None
        if self.latents is not None:
            nn.init.normal_(self.latents.weight, std=0.01)
        self.encoder = None
        if encoder_config is not None:  # a config saved before "inputs" existed is a gradient-only encoder
            self.add_encoder(**{"inputs": "gradient", **encoder_config})

    def add_encoder(self, **kwargs) -> SpectrumEncoder:
        """Give the model a fresh encoder (keyword arguments of :class:`SpectrumEncoder`; the latent
        size, number of basis functions and instrument names default to this model's)."""
        kwargs = {"latent_dim": self.latent_dim, "n_basis": self.decoder.n_basis,
                  "instruments": sorted(self.instruments), **kwargs}
        self.encoder = SpectrumEncoder(**kwargs).to(self.device)
        return self.encoder

    @property
    def device(self) -> torch.device:
        """Where the weights are (see :mod:`stellarfield.device`)."""
        return self.decoder.branch.net[0].weight.device

    @property
    def learns_scatter(self) -> bool:
        return self.likelihood["loss"] == "nll"

    def optimizer_groups(self, lr: float, lr_tables: float) -> tuple[list[dict], list[dict]]:
        """Parameter groups ``(dense, sparse)``: Adam gets the dense weights (``clip``: True where the
        gradient norm is clipped); SparseAdam the grid-encoding tables, whose gradients touch only the
        knots a batch used. The latent table is in neither: see :meth:`latent_optimizer`."""
        named = dict(self.named_parameters())
        tables = [p for n, p in named.items() if "encoding.tables" in n]
        weights = [p for n, p in named.items() if "encoding.tables" not in n and not n.startswith("latents")]
        dense = [{"params": weights, "lr": lr, "clip": True}]
        sparse = [{"params": tables, "lr": lr_tables}] if tables else []
        return dense, sparse

    def latent_optimizer(self, lr_latents: float) -> LatentAdam | None:
        """Dense Adam (step size ``lr_latents``, Adam's defaults otherwise) on the latent table, from
        the gradient of each batch's rows only (:class:`~stellarfield.model.latent_table.LatentAdam`:
        no dense gradient of the table); None without a table."""
        if self.latents is None:
            return None
        return LatentAdam(self.latents.weight, {"lr": lr_latents, "clip": False})

    @property
    def latent_dim(self) -> int:
        return self.decoder.latent_dim

    def with_instruments(self, instruments: dict[str, Instrument]) -> "StellarModel":
        """This model observing through ``instruments`` (products it never saw, built for inference by
        :func:`~stellarfield.model.instrument.instruments_for`): a shallow view whose weights, latents
        and noise floors are this model's own (shared, not copied); this model is left as it is."""
        view = copy.copy(self)
        view.instruments = {**self.instruments, **instruments}
        return view

    def instrument(self, name: str) -> Instrument:
        """The instrument of product ``name``, or a clear error naming the ones the model knows."""
        try:
            return self.instruments[name]
        except KeyError:
            raise KeyError(
                f"the model was not trained on product {name!r}; it knows {sorted(self.instruments)}"
            ) from None

    def scatter(self, name: str, u_obs: torch.Tensor) -> torch.Tensor:
        """Intrinsic scatter (fraction of median flux) of instrument ``name`` at observed ``u`` (B, P)."""
        inst = self.instrument(name)
        if not self.learns_scatter:
            raise RuntimeError("this model has no learned scatter (its likelihood is 'logchi2')")
        if name not in self.scatter_raw:  # an instrument added for inference only: its initial scatter
            return torch.full_like(u_obs, inst.scatter_init, dtype=torch.float32)
        raw = self.scatter_raw[name]
        lo, hi = inst.u_range
        t = ((u_obs - lo) / max(hi - lo, 1e-12) * (raw.shape[0] - 1)).clamp(0, raw.shape[0] - 1 - 1e-9)
        t = torch.nan_to_num(t, nan=0.0, posinf=raw.shape[0] - 1 - 1e-9)
        left = t.floor().long()
        frac = (t - left).to(raw.dtype)
        values = raw[left] * (1 - frac) + raw[(left + 1).clamp(max=raw.shape[0] - 1)] * frac
        return nn.functional.softplus(values)
