"""The decoder: a rest-frame spectrum as a function of a latent ``z`` and wavelength.

::

    flux_rest(u; z) = sum_h b_h(z) phi_h(u) + phi_0(u),        u = ln(lambda / A), vacuum, rest frame

* the **trunk** ``phi(u)`` (:class:`Trunk`): ``n_basis + 1`` basis functions of wavelength, shared by
  every star and instrument; ``phi_0`` is the mean spectrum;
* the **branch** ``b(z)`` (:class:`Branch`): ``n_basis`` coefficients from the latent.

The output is linear in the trunk, so on a fixed wavelength grid the trunk is evaluated once, then
a whole batch is one matrix product ``[b(z), 1] @ Phi^T``; and any linear operation of the
instrument (the LSF blur) can be applied to the basis once instead of to every spectrum.
(This is a DeepONet-style separation, Lu et al. 2021, Nature Machine Intelligence 3, 218.)
"""

from __future__ import annotations

import torch
from torch import nn

from stellarfield.device import mlp_autocast
from stellarfield.model.encoding import make_encoding


def mlp(sizes: list[int], activation=nn.SiLU) -> nn.Sequential:
    """Linear layers of the given sizes with ``activation`` between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


class Trunk(nn.Module):
    """``phi(u)``: encoding of ``u`` -> MLP -> ``n_basis + 1`` values (last column: the mean spectrum)."""

    def __init__(self, n_basis: int, hidden: list[int], encoding: str, encoding_kwargs: dict | None = None):
        super().__init__()
        self.encoding = make_encoding(encoding, **(encoding_kwargs or {}))
        self.net = mlp([self.encoding.out_dim, *hidden, n_basis + 1])
        with torch.no_grad():  # start from a flat mean spectrum of 1 (a continuum-normalised star)
            self.net[-1].bias.zero_()
            self.net[-1].bias[-1] = 1.0

    def forward(self, u: torch.Tensor, sigma_u: torch.Tensor | None = None) -> torch.Tensor:
        """``u``: (G,) float64 ln(lambda/A), rest frame; ``sigma_u`` (G,) the LSF sigma the values
        will be blurred by (band limit, see :mod:`stellarfield.model.encoding`). Returns (G, n_basis + 1)."""
        return self.net(self.encoding(u, sigma_u))


class Branch(nn.Module):
    """``b(z)``: MLP from the latent (``latent_dim``) to ``n_basis`` coefficients."""

    def __init__(self, latent_dim: int, n_basis: int, hidden: list[int]):
        super().__init__()
        self.net = mlp([latent_dim, *hidden, n_basis])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class SpectrumDecoder(nn.Module):
    """Trunk and branch together; see the module docstring for the formula."""

    def __init__(
        self,
        latent_dim: int = 32,
        n_basis: int = 128,
        trunk_hidden: tuple[int, ...] = (128, 128),
        branch_hidden: tuple[int, ...] = (256, 256),
        encoding: str = "grid",
        encoding_kwargs: dict | None = None,
    ):
        super().__init__()
        self.latent_dim, self.n_basis = latent_dim, n_basis
        self.trunk = Trunk(n_basis, list(trunk_hidden), encoding, encoding_kwargs)
        self.branch = Branch(latent_dim, n_basis, list(branch_hidden))
        self.mixed_precision = False  # bfloat16 MLPs on CUDA (a run-time choice, not saved)

    def basis(self, u: torch.Tensor, sigma_u: torch.Tensor | None = None) -> torch.Tensor:
        """Trunk on rest-frame coordinates ``u`` (G,) float64, band-limited to the LSF sigma
        ``sigma_u`` (G,) where given -> (G, n_basis + 1) float32."""
        with mlp_autocast(u.device, self.mixed_precision):
            return self.trunk(u, sigma_u).float()

    def coefficients(self, z: torch.Tensor) -> torch.Tensor:
        """Branch: (B, latent_dim) -> (B, n_basis) float32."""
        with mlp_autocast(z.device, self.mixed_precision):
            return self.branch(z).float()

    def forward(self, z: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
        """Rest-frame flux on the grid of ``basis`` (G, n_basis + 1) for latents ``z`` (B, D) -> (B, G)."""
        return combine(self.coefficients(z), basis)


def combine(coefficients: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``[b, 1] @ basis^T``: coefficients (B, H) and basis (G, H + 1) -> flux (B, G)."""
    return torch.addmm(basis[:, -1], coefficients, basis[:, :-1].T)
