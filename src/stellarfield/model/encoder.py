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
the order of the pixels and to padding.

``s`` mixes the basis functions by how much they overlap on the instrument's pixels (its Gram matrix),
which differs from one instrument, mask and velocity to the next. With ``inputs="gradient+least-squares"``
(the default for a new encoder) the head also gets the **least-squares coefficients** ``a``: the
Gauss-Newton step from the mean star in the space of the branch coefficients, with a Gaussian prior
on them. The prior is the spread of the decoder's own coefficients for ``z ~ N(0, I)``
(:func:`coefficient_prior`: covariance ``T T^T``), so that a typical star's coefficients are ``h =
h_0 + T a`` (``h_0``: the mean star's, at ``z = 0``) with ``a`` of order one; with the continuum ``c``
held at its value for the mean star::

    J_ap = c_p (B T)_ap                                rendered like the model (LSF, velocity)
    (J W J^T + s^2 I) a = J W r,        s^2 = chi2(a) / n

the step that minimises the training loss (``0.5 ln(chi2 / n)`` + the prior, ``s^2`` held, as in
:mod:`~stellarfield.model.newton`), with the noise scale ``s^2`` the misfit the step itself leaves
(:data:`NOISE_ITERATIONS` solves from ``s^2 = chi2_0 / n``: the mean star's misfit would count the
star's own signal as noise and shrink every step toward the prior). Directions the pixels do not
constrain (a basis function with no support in the instrument's range) fall back to the prior
(``a = 0``) instead of taking a mixture of the others, so ``a`` is comparable across instruments. Like ``s``, it does not depend on the flux unit or
the errors' overall scale. It is appended to the head's input. Cost: the ``n_basis`` whitened basis
functions rendered at every pixel of the spectrum, once per fit.

Training: :func:`stellarfield.model.objectives.training_loss` with ``objective="encoder"`` (jointly
with the decoder; gradient only, :data:`stellarfield.model.train.JOINT_ENCODER`), or :mod:`stellarfield.model.amortise` (an
encoder for a trained, frozen decoder). Fitting starts from ``z`` and takes a few refinement steps
(:mod:`stellarfield.model.inference`, method ``"encoder+refine"``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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
#: What the head reads (module docstring): the pooled gradient alone (encoders saved before the
#: least-squares coefficients, whose configs do not say) or with the least-squares coefficients.
INPUTS = ("gradient", "gradient+least-squares")
#: Draws of z ~ N(0, I) that estimate the prior of the branch coefficients (fixed seed: the same prior
#: at every call for the same decoder).
PRIOR_SAMPLES = 4096
#: Pixels x directions rendered at a time for the least-squares coefficients (bounds the memory).
RENDER_ELEMENTS = 2**24
#: Solves of the least-squares coefficients, each with the noise scale ``s^2`` the last one left.
NOISE_ITERATIONS = 3


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
                 fit_settings: dict[str, dict] | None = None, inputs: str = "gradient+least-squares"):
        super().__init__()
        if inputs not in INPUTS:
            raise ValueError(f"encoder inputs {inputs!r}: choose one of {INPUTS}")
        self.latent_dim, self.n_basis = latent_dim, n_basis
        self.instrument_names = list(instruments)
        self.hidden = tuple(hidden)
        self.inputs = inputs
        self.fit_settings = {name: dict(setting) for name, setting in (fit_settings or {}).items()}
        self.embedding = nn.Embedding(len(self.instrument_names) + 1, INSTRUMENT_EMBEDDING)
        nn.init.normal_(self.embedding.weight, std=0.1)
        n_inputs = n_basis + 2 + INSTRUMENT_EMBEDDING + (n_basis if self.least_squares else 0)
        self.head = mlp([n_inputs, *self.hidden, latent_dim])
        with torch.no_grad():  # start at z = 0, the mean star (where refinement starts without an encoder)
            self.head[-1].weight.mul_(0.1)
            self.head[-1].bias.zero_()

    def config(self) -> dict:
        """JSON-able arguments that rebuild this encoder (the weights are in the state dict)."""
        return {"latent_dim": self.latent_dim, "n_basis": self.n_basis, "instruments": self.instrument_names,
                "hidden": list(self.hidden), "fit_settings": self.fit_settings, "inputs": self.inputs}

    @property
    def least_squares(self) -> bool:
        """Whether the head reads the least-squares coefficients too (module docstring)."""
        return self.inputs == "gradient+least-squares"

    def fit_setting(self, product: str) -> dict:
        """The validated fit setting of ``product`` (:data:`UNVALIDATED_FIT` where there is none)."""
        return {**UNVALIDATED_FIT, **self.fit_settings.get(product, {})}

    def instrument_index(self, product: str) -> int:
        """Row of the embedding of ``product`` (0: a product the encoder was not trained on)."""
        return self.instrument_names.index(product) + 1 if product in self.instrument_names else 0

    def forward(self, inputs: "EncoderInputs", instrument: torch.Tensor) -> torch.Tensor:
        """``inputs``: the pooled tokens of B spectra (:func:`pooled_residuals`); ``instrument`` (B,)
        long: embedding rows. Returns ``z`` (B, latent_dim)."""
        s = inputs.projections
        norm = s.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        features = [s / norm * math.sqrt(self.n_basis), torch.log(norm), inputs.log_chi2[:, None],
                    self.embedding(instrument)]
        if self.least_squares:
            features.append(inputs.coefficients)
        return self.head(torch.cat(features, dim=-1))


@dataclass
class EncoderInputs:
    """The encoder's pooled tokens of B spectra (module docstring), fixed data for its head."""

    projections: torch.Tensor  # (B, n_basis) s
    log_chi2: torch.Tensor  # (B,) ln(chi2_0 / n)
    coefficients: torch.Tensor | None = None  # (B, n_basis) a, with inputs "gradient+least-squares"

    def __getitem__(self, rows) -> "EncoderInputs":
        return EncoderInputs(self.projections[rows], self.log_chi2[rows],
                             None if self.coefficients is None else self.coefficients[rows])

    @staticmethod
    def cat(parts: list["EncoderInputs"]) -> "EncoderInputs":
        return EncoderInputs(torch.cat([p.projections for p in parts]), torch.cat([p.log_chi2 for p in parts]),
                             None if parts[0].coefficients is None else torch.cat([p.coefficients for p in parts]))


def encode(model, observations: list, bases: list[torch.Tensor], blurred_basis: bool = False) -> torch.Tensor:
    """Latents (sum B, latent_dim) of the observations' spectra from ``model.encoder``.

    ``bases``: the trunk on each observation's grid view (blurred already with ``blurred_basis``), as
    :func:`~stellarfield.model.objectives.training_loss` and :mod:`~stellarfield.model.inference` have
    them. The pooled tokens are computed without a graph to the decoder's weights (they are the
    encoder's input data); the head is differentiable.
    """
    inputs = pooled_residuals(model, observations, bases, blurred_basis)
    instrument = torch.cat([torch.full((o.batch.size,), model.encoder.instrument_index(o.batch.product),
                                       dtype=torch.long, device=inputs.log_chi2.device) for o in observations])
    return model.encoder(inputs, instrument)


@torch.no_grad()
def coefficient_prior(model) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, transform)``: the mean (H,) of the branch coefficients ``h(z)`` for ``z ~ N(0, I)``
    (:data:`PRIOR_SAMPLES` draws, seed 0) and ``T`` (H, H) with ``T T^T`` their covariance (its
    eigenvectors scaled by the square roots of its eigenvalues): ``h = mean + T a``, ``a ~ N(0, I)``."""
    dev = model.device
    z = torch.randn(PRIOR_SAMPLES, model.latent_dim, generator=torch.Generator().manual_seed(0)).to(dev)
    h = model.decoder.coefficients(z).double()
    mean = h.mean(0)
    centred = h - mean
    eigenvalues, vectors = torch.linalg.eigh(centred.T @ centred / (len(h) - 1))
    return mean.float(), (vectors * eigenvalues.clamp(min=0).sqrt()).float()


def least_squares_coefficients(obs, fit, var: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """The prior-whitened least-squares coefficients ``a`` (B, H) of the module docstring, from the
    mean star's ``fit`` (:class:`~stellarfield.model.likelihood.FitResult`, its continuum held) and
    ``directions`` (G, H): the whitened basis functions ``B T`` on the grid of ``obs.view``, blurred."""
    from stellarfield.model.likelihood import basis_at_pixels  # it imports StellarModel, which imports this module

    batch = obs.batch
    shared = basis_at_pixels(obs, directions, obs.v.detach())  # Gaia XP, MILES: one rendering for the batch
    # J W J^T = X X^T and J W r = X (sqrt(w) r) with X = J sqrt(w): one pass over the (b, H, P) array
    root_weight = torch.where(fit.good, var.rsqrt(), 0.0)
    pixel_scale = fit.continuum * root_weight
    whitened_resid = torch.where(fit.good, batch.flux - fit.prediction, 0.0) * root_weight
    s2 = (fit.chi2 / fit.n).double().clamp(min=1e-30)
    n_dir = directions.shape[1]
    rows = max(1, RENDER_ELEMENTS // (n_dir * batch.u.shape[1]))
    out = []
    for i in range(0, batch.size, rows):
        j = slice(i, i + rows)
        if shared is not None:
            rendered = shared.values.T[None].expand(batch.u[j].shape[0], -1, -1)
        else:
            grid = directions.T[None].expand(batch.u[j].shape[0], -1, -1)
            rendered, _ = obs.inst.render(grid, obs.view, batch.u[j], batch.segment[j], obs.v[j].detach())
        scaled = rendered * pixel_scale[j, None, :]  # (b, H, P): J sqrt(w)
        normal = torch.bmm(scaled, scaled.transpose(1, 2)).double()
        rhs = torch.bmm(scaled, whitened_resid[j, :, None])[..., 0].double()
        eye = torch.eye(n_dir, dtype=torch.float64, device=normal.device)
        noise, chi2_0 = s2[j], fit.chi2[j].double()
        for _ in range(NOISE_ITERATIONS):  # s^2: the misfit left by the step (the loss's own noise scale)
            a = torch.linalg.solve(normal + noise[:, None, None] * eye, rhs)
            chi2 = chi2_0 - 2 * (a * rhs).sum(-1) + torch.einsum("bi,bij,bj->b", a, normal, a)
            noise = (chi2 / fit.n[j]).clamp(min=1e-6 * noise)
        out.append(a.float())
    return torch.cat(out)


def pooled_residuals(model, observations: list, bases: list[torch.Tensor],
                     blurred_basis: bool = False) -> EncoderInputs:
    """The encoder's pooled tokens (:class:`EncoderInputs`), detached (see the module docstring): ``s``,
    ``ln(chi2_0 / n)``, and the least-squares coefficients where ``model.encoder`` reads them."""
    from stellarfield.model.likelihood import evaluate, variance  # it imports StellarModel, which imports this module

    n_total = sum(o.batch.size for o in observations)
    dev = bases[0].device
    least_squares = model.encoder is not None and model.encoder.least_squares
    transform = coefficient_prior(model)[1] if least_squares else None
    with torch.enable_grad():
        with torch.no_grad():
            mean_coeffs = model.decoder.coefficients(torch.zeros(1, model.latent_dim, device=dev))
        coeffs = mean_coeffs.expand(n_total, -1).clone().requires_grad_(True)
        total, log_chi2, coefficients, start = 0.0, [], [], 0
        for obs, basis in zip(observations, bases):
            stop = start + obs.batch.size
            var = variance(model, obs).detach()
            fit = evaluate(obs, coeffs[start:stop], basis.detach(), obs.v.detach(), var, blurred_basis)
            signal = torch.where(fit.good, fit.prediction**2 / var, 0.0).sum(-1).detach().clamp(min=1e-30)
            total = total + (0.5 * fit.chi2 / signal).sum()
            log_chi2.append(torch.log(fit.chi2.detach() / fit.n + 1e-12))
            if least_squares:
                with torch.no_grad():  # data for the head: nothing here joins the graph
                    directions = basis[:, :-1] @ transform
                    if not blurred_basis:
                        directions = obs.inst.blur(directions, obs.view, dim=0)
                    coefficients.append(least_squares_coefficients(obs, fit, var, directions))
            start = stop
        (grad,) = torch.autograd.grad(total, coeffs)
    return EncoderInputs(-grad.detach(), torch.cat(log_chi2), torch.cat(coefficients) if least_squares else None)
