"""Principal component analysis with per-pixel weights (inverse variances) and missing data.

Spectra have per-pixel errors and bad pixels, so an ordinary SVD (every pixel equally trusted, no
gaps allowed) is the wrong tool. This is the weighted EM-PCA of Bailey (2012, PASP 124, 1015):
model each centred spectrum ``y_i`` as ``c_i @ Phi`` with K orthonormal components ``Phi`` (K, P)
and minimise the total weighted chi2

    sum_i sum_p  w_ip (y_ip - sum_k c_ik Phi_kp)^2

by alternating two exact weighted least-squares solves:

1. coefficients of each spectrum given the components (a K x K system per spectrum);
2. components at each pixel given the coefficients (a K x K system per pixel);

then re-orthonormalising the components. Each step cannot increase the chi2. Weights are inverse
variances (``ivar``), or 1/0 for good/bad pixels where the noise is unknown (MILES); a pixel with
weight 0 is missing and costs nothing. The mean spectrum is fitted in the pixel step together with
the components (as a component whose coefficient is always 1): a weighted mean computed once and
held fixed leaves, when weights differ from star to star, an offset outside the components' span
that no coefficients can remove.

The K x K systems of all spectra are built in one matrix product: with ``Q[p, k*K + l] = Phi_kp
Phi_lp`` the normal matrices are ``W @ Q`` reshaped to (N, K, K) (likewise for the pixel step),
so an iteration costs two (N x P) @ (P x K^2) products.
"""

from __future__ import annotations

import numpy as np


def _outer_rows(basis: np.ndarray) -> np.ndarray:
    """``Q[p, k*K + l] = basis[k, p] * basis[l, p]`` for a (K, P) basis: (P, K*K)."""
    k = basis.shape[0]
    return (basis.T[:, :, None] * basis.T[:, None, :]).reshape(basis.shape[1], k * k)


def _solve_normal_equations(a: np.ndarray, b: np.ndarray, ridge: float) -> np.ndarray:
    """Solve ``a[i] x[i] = b[i]`` for (M, K, K) and (M, K) with a small relative ridge.

    The ridge (``ridge`` times the mean diagonal of each system) keeps systems without data
    (a spectrum or pixel with zero total weight: ``a = 0, b = 0``) solvable, giving ``x = 0``.
    """
    k = a.shape[-1]
    diag = np.einsum("mkk->m", a) / k
    jitter = ridge * diag + np.finfo(np.float64).tiny
    a = a + jitter[:, None, None] * np.eye(k)
    return np.linalg.solve(a, b[..., None])[..., 0]


def weighted_coefficients(basis: np.ndarray, residual: np.ndarray, weight: np.ndarray, ridge: float = 1e-10) -> np.ndarray:
    """Weighted least-squares coefficients ``c`` (N, K) of ``residual ~ c @ basis``.

    ``basis`` (K, P), ``residual`` and ``weight`` (N, P); a weight of 0 removes a pixel. The
    normal equations of each row are ``(basis W_i basis^T) c_i = basis W_i r_i``.
    """
    basis = np.asarray(basis, dtype=np.float64)
    residual = np.atleast_2d(np.asarray(residual, dtype=np.float64))
    weight = np.atleast_2d(np.asarray(weight, dtype=np.float64))
    k = basis.shape[0]
    wr = np.where(weight > 0, weight * residual, 0.0)
    a = (weight @ _outer_rows(basis)).reshape(-1, k, k)
    b = wr @ basis.T
    return _solve_normal_equations(a, b, ridge)


def weighted_components(coefficients: np.ndarray, residual: np.ndarray, weight: np.ndarray, ridge: float = 1e-10) -> np.ndarray:
    """Weighted least-squares components ``Phi`` (K, P) of ``residual ~ coefficients @ Phi``, pixel by pixel."""
    c = np.asarray(coefficients, dtype=np.float64)
    k = c.shape[1]
    wr = np.where(weight > 0, weight * residual, 0.0)
    a = (weight.T @ _outer_rows(c.T)).reshape(-1, k, k)  # (P, K, K)
    b = wr.T @ c  # (P, K)
    return _solve_normal_equations(a, b, ridge).T


def weighted_mean(data: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Weighted mean over spectra per pixel; 0 where no spectrum has weight."""
    total = weight.sum(axis=0)
    summed = np.where(weight > 0, weight * data, 0.0).sum(axis=0)
    return np.where(total > 0, summed / np.where(total > 0, total, 1.0), 0.0)


def leading_axes(x: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` leading right singular vectors (k, P) of ``x`` (N, P), rows of unit length.

    From the eigenvectors of the smaller Gram matrix (``x x^T`` when N < P, else ``x^T x``): one
    matrix product and a min(N, P)-sized eigenproblem, several times faster than the SVD of a
    2000 x 16,384 matrix. Squaring the matrix only loses precision in the smallest singular values,
    never in the leading ones; when an asked-for axis has a singular value below 1e-5 of the largest
    (rank-deficient ``x``) they come from the SVD.
    """
    x = np.asarray(x, dtype=np.float64)
    n, p = x.shape
    k = min(k, n, p)
    if n < p:
        values, vectors = np.linalg.eigh(x @ x.T)
        order = np.argsort(values)[::-1][:k]
        values = values[order]
        if values.size and values[0] > 0 and (values > 1e-10 * values[0]).all():
            axes = (vectors[:, order].T @ x) / np.sqrt(values)[:, None]
            q, r = np.linalg.qr(axes.T)  # exactly orthonormal rows, the same axes (signs kept)
            return (q * np.sign(np.diag(r))).T
        return np.linalg.svd(x, full_matrices=False)[2][:k]
    values, vectors = np.linalg.eigh(x.T @ x)
    return vectors[:, np.argsort(values)[::-1][:k]].T


class WeightedPCA:
    """Mean + K orthonormal components fitted by weighted EM-PCA (Bailey 2012).

    Parameters
    ----------
    n_components:
        K. Capped at ``n_spectra - 1`` when fitted on fewer spectra (``n_components_`` holds the
        number actually used).
    max_iter, tol:
        Stop after ``max_iter`` iterations or when the weighted chi2 changes by less than ``tol``
        (relative) between iterations.
    ridge:
        Relative ridge added to every normal matrix (keeps empty rows/pixels solvable).

    The fit is deterministic: it starts from the SVD of the gap-filled residuals (missing pixels
    set to the weighted mean); ``max_iter=0`` stops there, which is plain (unweighted) PCA.

    Attributes after :meth:`fit`: ``mean_`` (P,), ``components_`` (K, P), orthonormal rows ordered
    by the variance of the training coefficients, ``chi2_history_``, ``start_`` (the mean and basis
    the EM iterations started from).
    """

    def __init__(self, n_components: int, max_iter: int = 30, tol: float = 1e-5, ridge: float = 1e-10):
        if n_components < 1:
            raise ValueError("n_components must be >= 1")
        self.n_components = int(n_components)
        self.max_iter = int(max_iter)
        self.tol = float(tol)
        self.ridge = float(ridge)

    def fit(self, data: np.ndarray, weight: np.ndarray, start: tuple[np.ndarray, np.ndarray] | None = None,
            progress: bool | str = False) -> "WeightedPCA":
        """Fit to ``data`` (N, P) with ``weight`` (N, P) >= 0 (inverse variance, or 1/0 for good/bad).

        ``start``: ``(mean, basis)`` to start the EM iterations from instead of the SVD, e.g. the
        ``start_`` of a plain (``max_iter=0``) fit of the same data, which saves computing the SVD
        twice. ``progress``: a tqdm bar over the EM iterations (a string is its description).
        """
        data = np.asarray(data, dtype=np.float64)
        weight = np.asarray(weight, dtype=np.float64)
        if data.shape != weight.shape or data.ndim != 2:
            raise ValueError(f"data {data.shape} and weight {weight.shape} must be the same (N, P) shape")
        weight = np.where(np.isfinite(data) & np.isfinite(weight) & (weight > 0), weight, 0.0)
        data = np.where(weight > 0, data, 0.0)
        n, p = data.shape
        k = min(self.n_components, max(n - 1, 1), p)
        self.n_components_ = k
        if start is None:
            mean = weighted_mean(data, weight)
            # Start from the unweighted principal axes of the gap-filled (gaps = mean) residuals.
            basis = leading_axes(np.where(weight > 0, data - mean, 0.0), k)
        else:
            mean, basis = np.asarray(start[0], dtype=np.float64), np.asarray(start[1], dtype=np.float64)[:k]
            if mean.shape != (p,) or basis.shape != (k, p):
                raise ValueError(f"start must be a mean ({p},) and a basis ({k}, {p}); got {mean.shape}, {basis.shape}")
        self.start_ = (mean, basis)
        ones = np.ones((n, 1))
        self.chi2_history_ = []
        bar = None
        if progress and self.max_iter > 0:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.max_iter, unit="iter", desc=progress if isinstance(progress, str) else "EM-PCA",
                       leave=False)
        for _ in range(self.max_iter):
            if bar is not None:
                bar.update(1)
            coeffs = weighted_coefficients(basis, np.where(weight > 0, data - mean, 0.0), weight, self.ridge)
            # The pixel step fits the mean with the components (design [1, c_i]): a weighted mean
            # held fixed would leave an offset outside the components' span whenever weights vary.
            rows = weighted_components(np.hstack([ones, coeffs]), data, weight, self.ridge)
            mean, basis = rows[0], rows[1:]
            chi2 = float((weight * (data - mean - coeffs @ basis) ** 2).sum())
            q, _ = np.linalg.qr(basis.T)  # orthonormal rows spanning the same space
            basis = q.T
            self.chi2_history_.append(chi2)
            if len(self.chi2_history_) > 1:
                previous = self.chi2_history_[-2]
                if abs(previous - chi2) <= self.tol * max(previous, np.finfo(float).tiny):
                    break
        if bar is not None:
            bar.close()
        # Centre the coefficients (move their mean into the mean spectrum) and rotate within the
        # fitted subspace so that components come in order of decreasing coefficient variance.
        coeffs = weighted_coefficients(basis, np.where(weight > 0, data - mean, 0.0), weight, self.ridge)
        centre = coeffs.mean(axis=0)
        self.mean_ = mean + centre @ basis
        _, _, rot = np.linalg.svd(coeffs - centre, full_matrices=False)
        self.components_ = rot @ basis
        return self

    def transform(self, data: np.ndarray, weight: np.ndarray) -> np.ndarray:
        """Weighted least-squares coefficients (N, K) of spectra on this grid."""
        data = np.atleast_2d(np.asarray(data, dtype=np.float64))
        weight = np.atleast_2d(np.asarray(weight, dtype=np.float64))
        weight = np.where(np.isfinite(data) & (weight > 0), weight, 0.0)
        residual = np.where(weight > 0, data - self.mean_, 0.0)
        return weighted_coefficients(self.components_, residual, weight, self.ridge)

    def reconstruct(self, coefficients: np.ndarray) -> np.ndarray:
        """``mean + coefficients @ components`` (N, P)."""
        return self.mean_ + np.asarray(coefficients, dtype=np.float64) @ self.components_
