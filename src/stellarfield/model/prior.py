"""A prior over latents you can sample: a normalizing flow fitted to the training latents.

After training, every training spectrum's latent is computed (the model's own inference method) and
a neural spline flow (Durkan et al. 2019, "Neural spline flows", NeurIPS; implemented by ``zuko``,
https://github.com/probabilists/zuko) is fitted to them by maximum likelihood, after standardising
each dimension. ``sample(n)`` draws new stars; ``-log_prob(z)`` is an anomaly score (a spectrum whose
latent is improbable under the training distribution).
"""

from __future__ import annotations

import math

import torch
import zuko
from torch import nn


class LatentPrior(nn.Module):
    """``p(z)``: standardisation then a zuko NSF with ``transforms`` autoregressive spline layers."""

    def __init__(self, latent_dim: int, transforms: int = 3, hidden: tuple[int, ...] = (64, 64)):
        super().__init__()
        self.latent_dim, self.transforms, self.hidden = latent_dim, transforms, tuple(hidden)
        self.flow = zuko.flows.NSF(features=latent_dim, transforms=transforms, hidden_features=list(hidden))
        self.register_buffer("mean", torch.zeros(latent_dim))
        self.register_buffer("std", torch.ones(latent_dim))

    def config(self) -> dict:
        return {"latent_dim": self.latent_dim, "transforms": self.transforms, "hidden": list(self.hidden)}

    def fit(self, z: torch.Tensor, steps: int = 1000, lr: float = 3e-3, batch: int = 512, seed: int = 0) -> float:
        """Maximum-likelihood fit to latents ``z`` (N, D); returns the final mean NLL per dimension.

        ``z`` is only read (each batch is standardised as it is drawn: no standardised copy of the
        whole of ``z``, which is an auto-decoder's whole latent table)."""
        z = z.detach().float()
        self.mean.copy_(z.mean(0))
        self.std.copy_(z.std(0).clamp(min=1e-6) if len(z) > 1 else torch.ones(self.latent_dim))
        g = torch.Generator().manual_seed(seed)
        opt = torch.optim.Adam(self.flow.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        loss = torch.tensor(float("nan"))
        for _ in range(steps):
            rows = torch.randint(len(z), (min(batch, len(z)),), generator=g)
            loss = -self.flow().log_prob((z[rows] - self.mean) / self.std).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        return loss.detach().item() / self.latent_dim

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log p(z) (N,), natural log, for latents in the model's units."""
        with torch.no_grad():
            x = (z.float() - self.mean) / self.std
            return self.flow().log_prob(x) - torch.log(self.std).sum()

    def sample(self, n: int, seed: int | None = None) -> torch.Tensor:
        """``n`` latents (n, D) drawn from the prior (reproducible with ``seed``)."""
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            return self.flow().sample((n,)) * self.std + self.mean

    def anomaly_score(self, z: torch.Tensor) -> torch.Tensor:
        """``-log p(z) / D``: larger is more unusual; ~0.5 ln(2 pi e) = 1.42 for a typical latent."""
        return -self.log_prob(z) / self.latent_dim

    @staticmethod
    def typical_score() -> float:
        return 0.5 * math.log(2 * math.pi * math.e)
