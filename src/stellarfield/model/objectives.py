"""The training objective: one loss for a step's batches, whatever the way latents are obtained.

:func:`training_loss` takes one batch per product, gets their latents (``"gon"``: the GON step,
:func:`~stellarfield.model.latents.gon_latents`; ``"autodecoder"``: one free latent per training
star, ``model.latents``; ``"encoder"``: amortised, :mod:`stellarfield.model.encoder`), fits each
observed-frame spectrum's velocity (:func:`~stellarfield.model.rv.refine_velocity`) and scores every
spectrum with :func:`~stellarfield.model.likelihood.spectrum_loss`, the loss inference uses too.
Products weigh the same, whatever their batch size.
"""

from __future__ import annotations

import torch

from stellarfield.model.batching import Batch
from stellarfield.model.latents import gon_latents
from stellarfield.model.likelihood import evaluate, observe, spectrum_loss, variance
from stellarfield.model.rv import refine_velocity
from stellarfield.model.stellar_model import StellarModel


def training_loss(model: StellarModel, batches: list[Batch], objective: str = "gon",
                  nested: bool = True, gather_latents=None) -> tuple[torch.Tensor, dict]:
    """Mean over products of the mean :func:`spectrum_loss` of their spectra (one batch per product).

    ``objective``: "gon" (latents from the inner gradient; ``nested=False`` detaches them, the
    ablation), "autodecoder" (latents from ``model.latents``) or "encoder" (latents from
    ``model.encoder``, :mod:`stellarfield.model.encoder`: amortised, nothing stored per spectrum). The trunk is evaluated once, on the
    concatenated grid views of all batches. ``gather_latents`` (auto-decoder): how the batch's rows of
    the latent table are read (default ``model.latents``, whose backward pass writes a dense gradient
    of the whole table; training passes :meth:`LatentAdam.gather
    <stellarfield.model.latent_table.LatentAdam.gather>`, a leaf of the batch's rows). Returns the loss and per-product statistics
    (mean chi2 per pixel with the likelihood's variance, mean NLL, mean |v|).
    """
    observations = [observe(model, b, fit_rest_frame_rv=False) for b in batches]
    sizes = [sum(i1 - i0 for _, i0, i1 in o.view) for o in observations]
    dev = batches[0].u.device
    basis_all = model.decoder.basis(torch.cat([o.inst.view_u(o.view) for o in observations]).to(dev),
                                    torch.cat([o.inst.view_sigma_u(o.view) for o in observations]).to(dev))
    bases = list(torch.split(basis_all, sizes))
    variances = [variance(model, o) for o in observations]  # once: the GON step and the loss share them
    if objective == "gon":
        z = gon_latents(model, observations, bases, create_graph=nested, variances=variances)
        if not nested:
            z = z.detach()
    elif objective == "autodecoder":
        index = torch.cat([o.batch.index for o in observations])
        z = model.latents(index) if gather_latents is None else gather_latents(index)
    elif objective == "encoder":
        from stellarfield.model.encoder import encode  # the encoder's pooling uses this module

        z = encode(model, observations, bases)
    else:
        raise ValueError(f"unknown objective {objective!r}; choose 'gon', 'autodecoder' or 'encoder'")
    coeffs = model.decoder.coefficients(z)
    nll, stats, start = [], {}, 0
    for obs, basis, var in zip(observations, bases, variances):
        stop = start + obs.batch.size
        if obs.inst.frame == "observed":
            obs.v = refine_velocity(obs, coeffs[start:stop], basis, var)
        fit = evaluate(obs, coeffs[start:stop], basis, obs.v, var)
        nll.append(spectrum_loss(model, fit, z[start:stop]))
        stats[obs.batch.product] = {
            "chi2_per_pixel": (fit.chi2 / fit.n).mean().item(),
            "nll": fit.nll.mean().item(),
            "grid_points": sizes[len(nll) - 1],
        }
        start = stop
    loss = torch.stack([x.mean() for x in nll]).mean()  # every product weighs the same, whatever its batch
    return loss, stats
