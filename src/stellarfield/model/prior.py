"""A prior over latents you can sample: a normalizing flow fitted to the training latents.

After training, every training spectrum's latent is computed (the model's own inference method) and
a neural spline flow (Durkan et al. 2019, "Neural spline flows", NeurIPS; implemented by ``zuko``,
https://github.com/probabilists/zuko) is fitted to them by maximum likelihood, after standardising
each dimension. ``sample(n)`` draws new stars; ``-log_prob(z)`` is an anomaly score (a spectrum whose
latent is improbable under the training distribution).

**Conditional on the product** (``products=[...]``): each survey observes its own population of stars
(Gaia XP: mostly FGK dwarfs and giants of the solar neighbourhood; MILES: a library chosen to span
O to M stars; APOGEE: red giants and M dwarfs), so ``p(z | product)`` is one flow with the product
as its context (a one-hot vector). Generating "a star as GALAH sees it" draws from GALAH's
population, not from the whole training set, where 96% of the latents are Gaia XP stars: latents
only Gaia XP has seen have high-resolution spectra the model never had to fit. Without a product
the prior is the mixture of the products' flows weighted by their share of the latents it was
fitted to (at the end of training: the latent table, i.e. the training distribution itself; a
refit, :func:`~stellarfield.model.train.refit_prior`: its sample, at most the same number per product). Products are drawn for the fit's batches with probability
proportional to the square root of their number of latents: the small products (a hundred APOGEE
stars) are seen more often than their share, without being fitted as often as 30,000 Gaia XP stars.
A population fitted to fewer than :data:`MIN_POPULATION` latents (GALAH DR4's 2 spectra here) is not
used by default (:meth:`LatentPrior.has_population`): a flow conditioned on a handful of stars draws
near-copies of them and calls every other star anomalous; such a product's anomaly score and its
default generation use the mixture (its own flow is drawn only when asked for by name).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
import zuko
from torch import nn

#: Latents a product's population needs before generation and the anomaly score use it by default.
MIN_POPULATION = 20


class LatentPrior(nn.Module):
    """``p(z)`` or ``p(z | product)``: standardisation then a zuko NSF with ``transforms`` spline
    layers (the product, one-hot, as its context when ``products`` is given).

    ``passes``: how many sequential passes inverting one layer takes, i.e. drawing a sample.
    ``None``: fully autoregressive (one pass per latent dimension, zuko's default: what priors saved
    without the key are); 2: coupling layers (half the dimensions condition the other half), which
    draw samples ~10x faster at the same density cost, ``python benchmarks/prior_flow.py``."""

    def __init__(self, latent_dim: int, transforms: int = 3, hidden: tuple[int, ...] = (64, 64),
                 products: Sequence[str] | None = None, counts: Sequence[int] | None = None,
                 passes: int | None = None):
        super().__init__()
        self.latent_dim, self.transforms, self.hidden, self.passes = latent_dim, transforms, tuple(hidden), passes
        self.products = list(products) if products else []
        self.counts = [int(c) for c in counts] if counts is not None else None  # latents per product in the fit
        self.flow = zuko.flows.NSF(features=latent_dim, context=len(self.products), transforms=transforms,
                                   hidden_features=list(hidden), passes=passes)
        self.register_buffer("mean", torch.zeros(latent_dim))
        self.register_buffer("std", torch.ones(latent_dim))
        if self.products:  # each product's share of the training latents: the mixture's weights
            self.register_buffer("product_weights", torch.full((len(self.products),), 1.0 / len(self.products)))

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """As :meth:`torch.nn.Module.load_state_dict`, after checking that the saved flow has this
        prior's structure: its variable orders and autoregressive masks are buffers that loading would
        otherwise overwrite silently (an autoregressive flow loaded as a coupling one draws wrong samples)."""
        own = self.state_dict()
        for key, saved in state_dict.items():
            if not key.endswith((".order", ".mask")) or key not in own:
                continue
            if own[key].shape != saved.shape:
                raise ValueError(f"the saved prior's {key} has shape {tuple(saved.shape)}, this prior's "
                                 f"{tuple(own[key].shape)}: its config's latent_dim or hidden do not describe it")
            if not torch.equal(own[key], saved.to(own[key].dtype)):
                kind = "coupling (passes=2)" if self.passes == 2 else f"passes={self.passes}"
                raise ValueError(f"the saved prior's {key} differs from a {kind} flow's: its config's "
                                 "'passes' does not describe it")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @property
    def conditional(self) -> bool:
        return bool(self.products)

    def config(self) -> dict:
        out = {"latent_dim": self.latent_dim, "transforms": self.transforms, "hidden": list(self.hidden),
               "passes": self.passes}
        if not self.products:
            return out
        return {**out, "products": self.products, **({"counts": self.counts} if self.counts is not None else {})}

    def has_population(self, product: str | None) -> bool:
        """True where the prior has ``product``'s own population, fitted to at least
        :data:`MIN_POPULATION` latents (a prior saved without its counts: every product it knows)."""
        if product not in self.products:
            return False
        return self.counts is None or self.counts[self.products.index(product)] >= MIN_POPULATION

    def product_index(self, product: str) -> int:
        """The context index of ``product``; KeyError naming the products the prior knows."""
        if product not in self.products:
            raise KeyError(f"the prior has no population for product {product!r}; it knows {self.products}")
        return self.products.index(product)

    def _context(self, index: torch.Tensor | None):
        return F.one_hot(index, len(self.products)).float() if self.conditional else None

    def fit(self, z: torch.Tensor, steps: int = 1000, lr: float = 3e-3, batch: int = 512, seed: int = 0,
            rows: torch.Tensor | None = None, product_index: torch.Tensor | None = None) -> float:
        """Maximum-likelihood fit to latents ``z`` (N, D); returns the final mean NLL per dimension.

        A conditional prior is fitted to pairs ``(z[rows[i]], product_index[i])`` (``rows`` default:
        every row of ``z`` once); batches draw products with probability proportional to the square
        root of their counts, then rows uniformly within the product. ``z`` is only read (each batch
        is standardised as it is drawn: no standardised copy of the whole of ``z``, which is an
        auto-decoder's whole latent table)."""
        z = z.detach().float()
        self.mean.copy_(z.mean(0))
        self.std.copy_(z.std(0).clamp(min=1e-6) if len(z) > 1 else torch.ones(self.latent_dim))
        rows = torch.arange(len(z)) if rows is None else rows.long()
        if self.conditional:
            if product_index is None or len(product_index) != len(rows):
                raise ValueError("a conditional prior needs one product index per latent")
            order = torch.argsort(product_index, stable=True)
            rows, product_index = rows[order], product_index.long()[order]
            counts = torch.bincount(product_index, minlength=len(self.products))
            starts = torch.cumsum(counts, 0) - counts
            self.product_weights.copy_(counts.float() / counts.sum())
            self.counts = counts.tolist()
            draw = counts.float().sqrt()
        g = torch.Generator().manual_seed(seed)
        opt = torch.optim.Adam(self.flow.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        loss = torch.tensor(float("nan"))
        size = min(batch, len(rows))
        for _ in range(steps):
            if self.conditional:
                which = torch.multinomial(draw, size, replacement=True, generator=g)
                pick = starts[which] + (torch.rand(size, generator=g) * counts[which]).long().clamp(max=counts[which] - 1)
                context = self._context(which)
            else:
                pick, context = torch.randint(len(rows), (size,), generator=g), None
            loss = -self.flow(context).log_prob((z[rows[pick]] - self.mean) / self.std).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        return loss.detach().item() / self.latent_dim

    def _indices(self, product: str | Sequence[str | None] | None, n: int) -> torch.Tensor | None:
        """Context indices (n,) for ``product`` (a name, or one per row; -1, the mixture, for None and
        for a product without a population of its own, :meth:`has_population`)."""
        if not self.conditional or product is None:
            return None
        names = [product] * n if isinstance(product, str) else list(product)
        if len(names) != n:
            raise ValueError(f"{len(names)} products for {n} latents")
        return torch.tensor([self.product_index(p) if self.has_population(p) else -1 for p in names])

    def log_prob(self, z: torch.Tensor, product: str | Sequence[str | None] | None = None) -> torch.Tensor:
        """log p(z) (N,), natural log, for latents in the model's units; ``p(z | product)`` for a
        conditional prior given ``product`` (one name, or one per row: None, a name the prior does not
        know or one without a population of its own get the mixture over products)."""
        with torch.no_grad():
            x = (z.float() - self.mean) / self.std
            jacobian = torch.log(self.std).sum()
            if not self.conditional:
                return self.flow().log_prob(x) - jacobian
            index = self._indices(product, len(x))
            out = torch.empty(len(x))
            own = index >= 0 if index is not None else torch.zeros(len(x), dtype=torch.bool)
            if own.any():  # each row under its own product's flow: one pass, no mixture needed
                out[own] = self.flow(self._context(index[own])).log_prob(x[own])
            if not own.all():  # the mixture over products: every product's flow on the rest
                rest = x[~own]
                per_product = torch.stack([self.flow(self._context(torch.full((len(rest),), k))).log_prob(rest)
                                           for k in range(len(self.products))], 1)  # (n, P)
                out[~own] = torch.logsumexp(per_product + torch.log(self.product_weights.clamp(min=1e-30)), 1)
            return out - jacobian

    def sample(self, n: int, seed: int | None = None, product: str | None = None) -> torch.Tensor:
        """``n`` latents (n, D) drawn from the prior (reproducible with ``seed``): of ``product``'s
        population for a conditional prior given one, else of the whole training set."""
        if n == 0:
            return torch.empty(0, self.latent_dim)
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            if not self.conditional:
                return self.flow().sample((n,)) * self.std + self.mean
            if product is None:
                index = torch.multinomial(self.product_weights, n, replacement=True)
            else:
                index = torch.full((n,), self.product_index(product), dtype=torch.long)
            return self.flow(self._context(index)).sample() * self.std + self.mean

    def anomaly_score(self, z: torch.Tensor, product: str | Sequence[str | None] | None = None) -> torch.Tensor:
        """``-log p(z) / D`` (of ``product``'s population where given and known): larger is more
        unusual; ~0.5 ln(2 pi e) = 1.42 for a typical latent."""
        return -self.log_prob(z, product) / self.latent_dim

    @staticmethod
    def typical_score() -> float:
        return 0.5 * math.log(2 * math.pi * math.e)
