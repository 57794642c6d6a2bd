"""The amortised encoder: a spectrum's native pixels -> its latent ``z`` in one pass.

A spectrum is a **set of tokens**, one per native pixel ``p``: its wavelength ``u_p = ln(lambda_p / A)``
(vacuum, the product's frame), flux ``d_p``, inverse variance and good-pixel mask. The encoder reads
them through the model's own observation physics, so the instrument's frame, LSF and continuum are
taken out exactly instead of being learned:

* **wavelength**, through the decoder's basis: the trunk ``phi_h(u)`` (rest frame, vacuum), blurred by
  the instrument's LSF and rendered at the pixel's rest-frame coordinate ``u_p - ln(1 + v/c)``, with
  ``v`` the velocity the observation already has (the cross-correlation peak; 0 for rest-frame
  products): ``B_hp``, ``h = 1 .. n_basis``;
* **value**: the residual ``r_p = d_p - c_p m0_p`` against the mean star (``z = 0``: ``m0``) times its
  closed-form continuum ``c_p`` (the survey's flux calibration or normalisation is removed), with the
  likelihood's weight ``w_p = good_p / var_p`` (survey errors, noise floor; zero at padding and masked
  pixels).

The tokens are pooled by a weighted mean over the set, one number per basis function::

    s_h = sum_p w_p r_p c_p B_hp / sum_p w_p (c_p m0_p)^2                          (B, n_basis)

the whitened residual projected onto what the model can change (dimensionless: the ratio does not
depend on the flux unit or on the errors' overall scale). ``s`` is the gradient of
``-chi2 / 2 sum w (c m0)^2`` with respect to the branch coefficients at ``z = 0``, so it is computed
by one backward pass (the adjoint of rendering) instead of rendering ``n_basis`` functions at every
pixel; the continuum is chi2-optimal, so it adds nothing to the gradient. It is the information of the
GON step (:func:`~stellarfield.model.latents.gon_latents`), taken per basis coefficient instead of
per latent dimension; a learned head replaces GON's fixed step::

    z = MLP([sqrt(n_basis) s / |s|,  ln |s|,  ln(chi2_0 / n),  e_instrument])

``chi2_0 / n``: the mean star's chi2 per good pixel; ``e_instrument``: a learned embedding of the
product (row 0 for products the encoder was not trained on). Sums over pixels make ``z`` invariant to
the order of the pixels and to padding. Training: :func:`stellarfield.model.objectives.training_loss`
with ``objective="encoder"`` (jointly with the decoder), or :mod:`stellarfield.model.amortise` (an
encoder for a trained, frozen decoder). Fitting starts from ``z`` and takes a few refinement steps
(:mod:`stellarfield.model.inference`, method ``"encoder+refine"``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from stellarfield.model.decoder import mlp

#: Width of the learned instrument embedding.
INSTRUMENT_EMBEDDING = 8
#: Default hidden layers of the head.
HEAD_HIDDEN = (256, 256)
#: How a product without a validated setting is fitted after the encoder: as without one (100 Adam
#: steps of step size 0.05, the multi-peak velocity search).
UNVALIDATED_FIT = {"refine_steps": 100, "refiner": "adam", "lr": 0.05, "rv_search": "full"}


class SpectrumEncoder(nn.Module):
    """The learned head of the encoder (see the module docstring): pooled residual projections ->
    latent ``z``. ``instruments``: the product names it has an embedding for (others share row 0).

    ``fit_settings``: per product, how a fit goes on after the encoder, chosen on the validation split
    (saved with the model's config, not trained; :func:`stellarfield.model.amortise.choose_fit_settings`):
    ``refine_steps``, ``refiner`` ("adam" or "gauss-newton"), ``lr`` (Adam's step size) and
    ``rv_search`` ("full": the multi-peak chi2 velocity search; "ccf": the cross-correlation peak,
    refined by the steps alone), the keyword arguments of :func:`stellarfield.model.inference.infer`.
    A product without a setting is fitted as without an encoder (:data:`UNVALIDATED_FIT`).
    """

    def __init__(self, latent_dim: int, n_basis: int, instruments: list[str], hidden: tuple[int, ...] = HEAD_HIDDEN,
                 fit_settings: dict[str, dict] | None = None):
        super().__init__()
        self.latent_dim, self.n_basis = latent_dim, n_basis
        self.instrument_names = list(instruments)
        self.hidden = tuple(hidden)
        self.fit_settings = {name: dict(setting) for name, setting in (fit_settings or {}).items()}
        self.embedding = nn.Embedding(len(self.instrument_names) + 1, INSTRUMENT_EMBEDDING)
        nn.init.normal_(self.embedding.weight, std=0.1)
        self.head = mlp([n_basis + 2 + INSTRUMENT_EMBEDDING, *self.hidden, latent_dim])
        with torch.no_grad():  # start at z = 0, the mean star (where refinement starts without an encoder)
            self.head[-1].weight.mul_(0.1)
            self.head[-1].bias.zero_()

    def config(self) -> dict:
        """JSON-able arguments that rebuild this encoder (the weights are in the state dict)."""
        return {"latent_dim": self.latent_dim, "n_basis": self.n_basis, "instruments": self.instrument_names,
                "hidden": list(self.hidden), "fit_settings": self.fit_settings}

    def fit_setting(self, product: str) -> dict:
        """The validated fit setting of ``product`` (:data:`UNVALIDATED_FIT` where there is none)."""
        return {**UNVALIDATED_FIT, **self.fit_settings.get(product, {})}

    def instrument_index(self, product: str) -> int:
        """Row of the embedding of ``product`` (0: a product the encoder was not trained on)."""
        return self.instrument_names.index(product) + 1 if product in self.instrument_names else 0

    def forward(self, projections: torch.Tensor, log_chi2: torch.Tensor, instrument: torch.Tensor) -> torch.Tensor:
        """``projections`` (B, n_basis): the pooled ``s``; ``log_chi2`` (B,): ``ln(chi2_0 / n)``;
        ``instrument`` (B,) long: embedding rows. Returns ``z`` (B, latent_dim)."""
        norm = projections.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        features = torch.cat([projections / norm * math.sqrt(self.n_basis), torch.log(norm), log_chi2[:, None],
                              self.embedding(instrument)], dim=-1)
        return self.head(features)


def encode(model, observations: list, bases: list[torch.Tensor], blurred_basis: bool = False) -> torch.Tensor:
    """Latents (sum B, latent_dim) of the observations' spectra from ``model.encoder``.

    ``bases``: the trunk on each observation's grid view (blurred already with ``blurred_basis``), as
    :func:`~stellarfield.model.objectives.training_loss` and :mod:`~stellarfield.model.inference` have
    them. The pooled projections are computed without a graph to the decoder's weights (they are the
    encoder's input data); the head is differentiable.
    """
    projections, log_chi2 = pooled_residuals(model, observations, bases, blurred_basis)
    instrument = torch.cat([torch.full((o.batch.size,), model.encoder.instrument_index(o.batch.product),
                                       dtype=torch.long, device=projections.device) for o in observations])
    return model.encoder(projections, log_chi2, instrument)


def pooled_residuals(model, observations: list, bases: list[torch.Tensor],
                     blurred_basis: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The encoder's pooled tokens: ``s`` (sum B, n_basis) and ``ln(chi2_0 / n)`` (sum B,), detached
    (see the module docstring)."""
    from stellarfield.model.likelihood import evaluate, variance  # it imports StellarModel, which imports this module

    n_total = sum(o.batch.size for o in observations)
    dev = bases[0].device
    with torch.enable_grad():
        with torch.no_grad():
            mean_coeffs = model.decoder.coefficients(torch.zeros(1, model.latent_dim, device=dev))
        coeffs = mean_coeffs.expand(n_total, -1).clone().requires_grad_(True)
        total, log_chi2, start = 0.0, [], 0
        for obs, basis in zip(observations, bases):
            stop = start + obs.batch.size
            var = variance(model, obs).detach()
            fit = evaluate(obs, coeffs[start:stop], basis.detach(), obs.v.detach(), var, blurred_basis)
            signal = torch.where(fit.good, fit.prediction**2 / var, 0.0).sum(-1).detach().clamp(min=1e-30)
            total = total + (0.5 * fit.chi2 / signal).sum()
            log_chi2.append(torch.log(fit.chi2.detach() / fit.n + 1e-12))
            start = stop
        (grad,) = torch.autograd.grad(total, coeffs)
    return -grad.detach(), torch.cat(log_chi2)
