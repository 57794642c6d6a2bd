"""Smooth multiplicative continua, fitted in closed form (weighted linear least squares).

Survey spectra come with different normalisations: flux-calibrated (MILES, Gaia XP), instrumental
counts (GALAH), flux-like with a chip-dependent shape (APOGEE apStar) or continuum-normalised by a
pipeline. Instead of guessing the normalisation, the model multiplies its spectrum by a smooth
polynomial per segment and solves for that polynomial exactly inside the loss::

    data ~= model * continuum,     continuum = design @ coeffs

For a fixed model this is linear in ``coeffs``, so the best coefficients (weighted by inverse
variance) come from the normal equations -- no inner optimisation, and torch differentiates
through the solve, so the decoder is trained against the best continuum for each spectrum.

The design matrix is a Legendre basis of the wavelength (or any coordinate) scaled to [-1, 1]
over the segment: well conditioned for the low degrees used here (0 to 3).

:func:`fit_multiplicative_continuum` takes any design. The model's likelihood uses a block design
(one Legendre block per segment, zero elsewhere) on the same pixels for many fits, and calls
:func:`fit_segment_continuum` instead: the same fit up to float64 rounding from per-segment sums over
pixels, with what depends on the pixels alone prepared once (:class:`SegmentedBasis`). On 64 APOGEE
apStar spectra (8,575 px, 3 chips, degree 2) forward + backward of the likelihood went from ~200-300
ms to ~14 ms on one CPU thread (``benchmarks/likelihood_speed.py``).
"""

from __future__ import annotations

import torch

RIDGE_RELATIVE: float = 1e-6
"""Ridge strength, relative to the mean diagonal of the normal matrix (:func:`solve_ridged`). It pulls
the coefficients towards (s, 0, ..., 0) -- a constant continuum at the data's best scale s (1 where
nothing constrains it) for a Legendre design. It biases a
well-constrained fit by ~1e-6 of the continuum level (8e-7 measured on an APOGEE chip, degree 2),
far below the noise, but keeps a fully masked segment finite (continuum 1)."""


def legendre_design(x, degree: int) -> torch.Tensor:
    """Legendre polynomials P_0..P_degree of ``x`` mapped linearly onto [-1, 1] over its own range.

    Args:
        x: ``(..., N)`` coordinates (e.g. wavelength in Angstrom, or u = ln(lambda)); array-like or
            tensor. Each row (leading index) is scaled by its own minimum and maximum, so
            ``x.min() -> -1`` and ``x.max() -> +1``; a row of identical values maps to 0.
        degree: highest polynomial degree (>= 0); degree 0 is a constant (a scale factor).

    Returns:
        ``(..., N, degree + 1)`` tensor (float dtype of ``x``, float64 for integer input), column k
        is P_k (Bonnet's recursion (k+1) P_{k+1} = (2k+1) t P_k - k P_{k-1}; P_0 = 1, P_1 = t).
    """
    if degree < 0:
        raise ValueError(f"degree must be >= 0, got {degree}")
    x = torch.as_tensor(x)
    if not torch.is_floating_point(x):
        x = x.to(torch.float64)
    lo = x.amin(dim=-1, keepdim=True)
    hi = x.amax(dim=-1, keepdim=True)
    span = hi - lo
    t = torch.where(span > 0, (2.0 * (x - lo) / torch.where(span > 0, span, 1.0)) - 1.0, 0.0)
    columns = [torch.ones_like(t)]
    if degree >= 1:
        columns.append(t)
    for k in range(1, degree):
        columns.append(((2 * k + 1) * t * columns[k] - k * columns[k - 1]) / (k + 1))
    return torch.stack(columns, dim=-1)


def solve_ridged(normal: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Continuum coefficients ``(..., K)`` from the weighted normal equations ``normal`` ``(..., K, K)``
    and ``rhs`` ``(..., K)``, with a ridge of :data:`RIDGE_RELATIVE` x the mean diagonal (1 where the
    matrix is all zero). The ridge pulls towards ``(s, 0, ..., 0)``, ``s`` the best constant scale of
    the data (1 where nothing constrains it): a pull towards 1 itself would dominate fluxes in
    physical units (STELIB's erg/s/cm2/A ~ 1e-13 need a continuum of ~1e-13). Column 0 of the
    design must be the constant."""
    n_coeffs = normal.shape[-1]
    mean_diagonal = torch.diagonal(normal, dim1=-2, dim2=-1).mean(dim=-1)
    ridge = torch.where(mean_diagonal > 0, RIDGE_RELATIVE * mean_diagonal, 1.0)[..., None]
    n00 = normal[..., 0, 0]
    scale = torch.where(n00 > 0, rhs[..., 0] / torch.where(n00 > 0, n00, 1.0), 1.0)
    prior = torch.zeros(normal.shape[:-1], dtype=normal.dtype, device=normal.device)
    prior[..., 0] = scale
    eye = torch.eye(n_coeffs, dtype=normal.dtype, device=normal.device)
    return torch.linalg.solve(normal + ridge[..., None] * eye, rhs + ridge * prior)


def fit_multiplicative_continuum(
    data: torch.Tensor, model: torch.Tensor, weight: torch.Tensor, design: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best smooth continuum c = design @ coeffs for ``data ~= model * c`` by weighted least squares.

    Minimises ``sum_n weight_n (data_n - model_n * c_n)^2 + ridge * |coeffs - (s, 0, ..., 0)|^2``
    (``s``: the best constant scale, data / model, of the first coefficient's pixels; 1 if none)
    in closed form (normal equations, ``torch.linalg.solve``), batched over leading axes and
    differentiable with respect to every input. The ridge (1e-6 of the mean diagonal of the normal
    matrix) only matters where the data cannot constrain a coefficient: a fully masked segment gets
    coeffs (1, 0, ..., 0), i.e. continuum 1 for a Legendre design, never NaN; fluxes of any unit
    (1e-13 erg/s/cm2/A or 1e3 counts) get the same relative precision.

    Args:
        data: ``(..., N)`` observed flux (any unit; the continuum carries the unit ratio).
        model: ``(..., N)`` model flux on the same pixels.
        weight: ``(..., N)`` least-squares weights, normally the inverse variance; 0 on masked
            pixels, where ``data`` and ``model`` are ignored (even if NaN).
        design: ``(..., N, K)`` basis functions, e.g. :func:`legendre_design`; broadcast against the
            leading axes (one ``(N, K)`` design may serve a whole batch).

    Returns:
        ``(coeffs, continuum)``: ``(..., K)`` and ``(..., N)`` tensors.
    """
    data, model, weight = torch.broadcast_tensors(data, model, weight)
    used = weight > 0
    weight = torch.where(used, weight, 0.0)
    data = torch.where(used, data, 0.0)
    model = torch.where(used, model, 0.0)

    basis = model.unsqueeze(-1) * design  # (..., N, K): d(model * continuum) / d coeffs
    normal = torch.einsum("...nk,...n,...nl->...kl", basis, weight, basis)
    rhs = torch.einsum("...nk,...n->...k", basis, weight * data)

    coeffs = solve_ridged(normal, rhs)
    continuum = (design @ coeffs.unsqueeze(-1)).squeeze(-1)
    return coeffs, continuum


# --- the same fit for a block design (one Legendre block per segment), prepared once per batch ------------
class SegmentedBasis:
    """A block design -- each pixel's own segment's Legendre values, zero in the other blocks --
    kept as what the fit needs, so that many fits on the same pixels (the refinement steps of a
    batch) skip everything that depends on the pixels alone.

    The block design ``design[b, n, s * D + k] = P_k(n) [segment[b, n] == s]`` (``D`` = degree + 1)
    makes the normal matrix block diagonal: block ``s`` is ``sum_{n in s} w m^2 P_k P_l``, the
    right-hand side ``sum_{n in s} w m d P_k``. So :func:`fit_segment_continuum` needs, per pixel,
    only the products ``P_k P_l`` (k <= l, ``pairs``) and ``P_k`` (``legendre``), float64, built
    here once (one row for the whole batch when its spectra share their pixels, as apStar spectra
    do); each fit is then per-segment sums over pixels (a matrix product over each segment's
    columns) instead of ``(B, N, S D)`` products and einsums.

    ``mask`` (B, N) marks the pixels that may carry weight (the batch's good pixels); it only
    decides the column range of each segment (the fast path: when the ranges of different segments
    do not overlap, each segment's sums are one matrix product over its columns; pixels outside
    their segment's range, e.g. padding, are handled one by one). Results are the same, up to
    float64 rounding, for any weights and any segment layout (a general path takes over when the
    ranges overlap).
    """

    def __init__(self, legendre: torch.Tensor, segment: torch.Tensor, n_segments: int,
                 mask: torch.Tensor | None = None):
        """``legendre`` (B, N, D): P_0..P_{D-1} at each pixel (its own segment's scaling);
        ``segment`` (B, N) long in [0, n_segments); ``mask`` (B, N) bool, default all pixels."""
        p = legendre.to(torch.float64)
        b, n, d = p.shape
        self.shape, self.n_segments, self.n_coeffs = (b, n), int(n_segments), d
        self.segment = segment.long()
        self.pairs = [(k, l) for k in range(d) for l in range(k, d)]
        # exact for float32 values (the likelihood's design): their product fits a float64
        pp = torch.stack([p[..., k] * p[..., l] for k, l in self.pairs], -1)
        self.shared = b > 1 and bool((p == p[:1]).all()) and bool((self.segment == self.segment[:1]).all())
        if self.shared:  # one row serves the batch: (N, F) matrices
            p, pp = p[0], pp[0]
        self.features = {"pairs": pp.contiguous(), "legendre": p.contiguous()}
        block = torch.zeros(d, d, dtype=torch.long)
        for i, (k, l) in enumerate(self.pairs):
            block[k, l] = block[l, k] = i
        self.block_index = block.flatten().to(p.device)  # normal block (k, l) -> pair column
        self._set_ranges(mask if mask is not None else torch.ones_like(self.segment, dtype=torch.bool))

    @classmethod
    def from_design(cls, design: torch.Tensor, segment: torch.Tensor, n_segments: int,
                    mask: torch.Tensor | None = None) -> "SegmentedBasis":
        """From a block design (B, N, n_segments * D): each pixel's own block."""
        b, n, k = design.shape
        d = k // n_segments
        own = design.reshape(b, n, n_segments, d).gather(2, segment.long()[..., None, None].expand(b, n, 1, d))
        return cls(own[:, :, 0], segment, n_segments, mask)

    def _set_ranges(self, mask: torch.Tensor) -> None:
        b, n = self.shape
        seg, dev = self.segment, self.segment.device
        self.ranges = None
        lo_hi = []
        cols = torch.arange(n, device=dev)
        for s in range(self.n_segments):
            present = ((seg == s) & mask).any(0)
            if bool(present.any()):
                where = cols[present]
                lo_hi.append((int(where[0]), int(where[-1]) + 1))
            else:
                lo_hi.append((0, 0))
        spans = sorted(r for r in lo_hi if r[1] > r[0])
        if any(a[1] > c[0] for a, c in zip(spans, spans[1:])):
            return  # overlapping column ranges: the general path
        lo = torch.tensor([r[0] for r in lo_hi], device=dev)[seg]
        hi = torch.tensor([r[1] for r in lo_hi], device=dev)[seg]
        irregular = (cols < lo) | (cols >= hi)  # outside its own segment's range
        if int(irregular.sum()) > 0.25 * b * n:
            return  # mostly irregular: the general path
        self.ranges = lo_hi
        in_range = torch.zeros(n, dtype=torch.bool, device=dev)
        for a, c in lo_hi:
            in_range[a:c] = True
        intruders = irregular & in_range  # inside another segment's range: kept out of its sums
        self.intruders = intruders if bool(intruders.any()) else None
        ib, ic = irregular.nonzero(as_tuple=True)
        self.irregular = None
        if ib.numel():
            at = (lambda q: q[ic]) if self.shared else (lambda q: q[ib, ic])
            self.irregular = (ib, ic, seg[ib, ic], {k: at(q) for k, q in self.features.items()})

    # the two linear maps (adjoint to each other) the fit is made of; w, x float64
    def segment_sums(self, w: torch.Tensor, kind: str) -> torch.Tensor:
        """``out[b, m, s, f] = sum_{n in segment s} w[b, m, n] q[b, n, f]``: (B, M, S, F), ``q`` the
        features of ``kind`` ("pairs" or "legendre")."""
        q = self.features[kind]
        b, m, n = w.shape
        s_count, f = self.n_segments, q.shape[-1]
        if self.ranges is None:
            spread = (w[:, :, None, :] * self._indicator(w.dtype)[:, None]).reshape(b, m * s_count, n)
            return torch.matmul(spread, q).view(b, m, s_count, f)
        out = w.new_zeros(b, m, s_count, f)
        regular = w if self.intruders is None else w.masked_fill(self.intruders[:, None, :], 0.0)
        for s, (a, c) in enumerate(self.ranges):
            if c > a:
                if self.shared:
                    out[:, :, s] = (regular.reshape(b * m, n)[:, a:c] @ q[a:c]).view(b, m, f)
                else:
                    out[:, :, s] = torch.bmm(regular[:, :, a:c], q[:, a:c])
        if self.irregular is not None:
            ib, ic, iseg, iq = self.irregular
            contrib = w[ib, :, ic][:, :, None] * iq[kind][:, None, :]  # (I, M, F)
            out.transpose(1, 2).index_put_((ib, iseg), contrib, accumulate=True)
        return out

    def _indicator(self, dtype: torch.dtype) -> torch.Tensor:
        """``[segment[b, n] == s]`` as (B, S, N) of ``dtype``, built on first use and kept (a batch's
        fits sum over the same segments at every step)."""
        cache = self.__dict__.setdefault("_indicators", {})
        if dtype not in cache:
            onehot = torch.nn.functional.one_hot(self.segment, self.n_segments)
            cache[dtype] = onehot.to(dtype).transpose(-1, -2).contiguous()
        return cache[dtype]

    def segment_expand(self, x: torch.Tensor, kind: str) -> torch.Tensor:
        """``out[b, m, n] = sum_f x[b, m, segment[b, n], f] q[b, n, f]``: (B, M, N)."""
        q = self.features[kind]
        b, m, s_count, f = x.shape
        n = self.shape[1]
        if self.ranges is None:
            every = torch.matmul(x.reshape(b, m * s_count, f), q.transpose(-1, -2)).view(b, m, s_count, n)
            return every.gather(2, self.segment.expand(b, n)[:, None, None, :].expand(b, m, 1, n))[:, :, 0]
        out = x.new_zeros(b, m, n)
        for s, (a, c) in enumerate(self.ranges):
            if c > a:
                if self.shared:
                    out[:, :, a:c] = (x[:, :, s].reshape(b * m, f) @ q[a:c].T).view(b, m, c - a)
                else:
                    out[:, :, a:c] = torch.bmm(x[:, :, s], q[:, a:c].transpose(1, 2))
        if self.irregular is not None:
            ib, ic, iseg, iq = self.irregular
            out[ib, :, ic] = (x[ib, :, iseg] * iq[kind][:, None, :]).sum(-1)
        return out


class _SegmentSums(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, basis, kind):
        ctx.basis, ctx.kind = basis, kind
        return basis.segment_sums(w, kind)

    @staticmethod
    def backward(ctx, grad):
        return _SegmentExpand.apply(grad, ctx.basis, ctx.kind), None, None


class _SegmentExpand(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, basis, kind):
        ctx.basis, ctx.kind = basis, kind
        return basis.segment_expand(x, kind)

    @staticmethod
    def backward(ctx, grad):
        return _SegmentSums.apply(grad, ctx.basis, ctx.kind), None, None


def fit_segment_continuum(data: torch.Tensor, model: torch.Tensor, weight: torch.Tensor,
                          basis: SegmentedBasis) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`fit_multiplicative_continuum` for the block design of ``basis`` (one Legendre block per
    segment, :class:`SegmentedBasis`): the same minimisation, ridge and pull towards (s, 0, ..., 0),
    the same results up to float64 rounding, without forming ``(B, N, K)`` arrays.

    Args:
        data, model, weight: ``(B, N)`` as in :func:`fit_multiplicative_continuum` (any float dtype;
            the per-pixel products and all sums are float64).
        basis: the pixels' :class:`SegmentedBasis`.

    Returns:
        ``(coeffs, continuum)``: ``(B, n_segments * D)`` and ``(B, N)``, float64, differentiable with
        respect to ``data``, ``model`` and ``weight`` (to any order).
    """
    used = weight > 0
    weight = torch.where(used, weight, 0.0)
    data = torch.where(used, data, 0.0)
    model = torch.where(used, model, 0.0)
    # float64 products; data is promoted exactly inside its product (no float64 copy); model gets one,
    # so that its two gradient terms add up in float64 before the one rounding to its dtype
    model = model.to(torch.float64)
    wm = weight.to(torch.float64) * model
    pairs = _SegmentSums.apply((wm * model)[:, None], basis, "pairs")[:, 0]  # (B, S, D (D + 1) / 2)
    rhs = _SegmentSums.apply((wm * data)[:, None], basis, "legendre")[:, 0]  # (B, S, D)
    b, s_count, d = pairs.shape[0], basis.n_segments, basis.n_coeffs
    blocks = pairs[..., basis.block_index].view(b, s_count, d, d)
    eye_s = torch.eye(s_count, dtype=blocks.dtype, device=blocks.device)
    normal = (blocks[:, :, :, None, :] * eye_s[None, :, None, :, None]).reshape(b, s_count * d, s_count * d)
    rhs = rhs.reshape(b, s_count * d)

    coeffs = solve_ridged(normal, rhs)
    continuum = _SegmentExpand.apply(coeffs.reshape(b, 1, s_count, d), basis, "legendre")[:, 0]
    return coeffs, continuum
