"""What a latent space knows: regressors from latents to stellar labels, fitted on train, scored on test.

Labels are never used to train the model; here they only judge its latents (and, side by side,
the PCA coefficients). Two probes, both fitted on the training split only:

* :class:`RidgeProbe`: linear (ridge) regression in closed form on standardised features, with the
  regularisation strength chosen by k-fold cross-validation **within the training split**;
* :class:`KNNProbe`: the mean label of the k = 10 nearest training stars in standardised feature
  space (Euclidean distance), a non-linear probe with nothing to tune.

Scores per label (:func:`regression_scores`): ``mad`` = median |prediction - truth| (median
absolute error), ``robust_scatter`` = 1.4826 MAD of the residuals about their median, ``rmse``,
``bias`` = median residual, ``n``. Stars missing a label (NaN) are left out for that label only.

Instrument invariance (no star here is seen by two instruments, so it is tested through labels):
:func:`cross_source_probe` fits on source A and scores on source B, next to a probe fitted on B's own
training stars; :func:`latent_neighbour_agreement` asks whether the nearest latent neighbours in A
of a star of B have labels like it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from stellarfield.arrays import nanmedian_rows
from stellarfield.eval.metrics import MAD_TO_SIGMA

#: Regularisation strengths tried by :class:`RidgeProbe` (in units of the number of training rows,
#: i.e. ``lambda * n`` is added to the standardised normal matrix).
DEFAULT_ALPHAS = tuple(10.0 ** np.arange(-6, 3.01, 0.5))


@dataclass
class Standardiser:
    """Per-feature mean and standard deviation of the training features (std 0 -> 1)."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray) -> "Standardiser":
        x = np.asarray(x, dtype=np.float64)
        std = x.std(axis=0)
        return cls(x.mean(axis=0), np.where(std > 0, std, 1.0))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, dtype=np.float64) - self.mean) / self.std


def _ridge_solve(x: np.ndarray, y: np.ndarray, alpha: float) -> tuple[np.ndarray, float]:
    """Weights and intercept minimising ``|y - x w - b|^2 + alpha * n * |w|^2`` (x already standardised)."""
    x_mean, y_mean = x.mean(axis=0), y.mean()
    xc, yc = x - x_mean, y - y_mean
    a = xc.T @ xc + alpha * len(x) * np.eye(x.shape[1])
    w = np.linalg.solve(a, xc.T @ yc)
    return w, float(y_mean - x_mean @ w)


def _fold_indices(n: int, n_folds: int, seed: int) -> np.ndarray:
    """A fold number in ``range(n_folds)`` for each of n rows, balanced, shuffled by ``seed``."""
    folds = np.arange(n) % n_folds
    return np.random.default_rng(seed).permutation(folds)


class RidgeProbe:
    """Ridge regression of one label on standardised features; alpha by k-fold CV on the training rows."""

    def __init__(self, alphas: Sequence[float] = DEFAULT_ALPHAS, n_folds: int = 5, seed: int = 0):
        self.alphas = tuple(alphas)
        self.n_folds = n_folds
        self.seed = seed

    def fit(self, x: np.ndarray, y: np.ndarray) -> "RidgeProbe":
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        self.scaler = Standardiser.fit(x)
        xs = self.scaler(x)
        folds = _fold_indices(len(y), min(self.n_folds, len(y)), self.seed)
        cv_mse = []
        for alpha in self.alphas:
            errors = []
            for k in np.unique(folds):
                train, held = folds != k, folds == k
                w, b = _ridge_solve(xs[train], y[train], alpha)
                errors.append(((xs[held] @ w + b - y[held]) ** 2).sum())
            cv_mse.append(sum(errors) / len(y))
        self.cv_mse_ = np.array(cv_mse)
        self.alpha_ = self.alphas[int(np.argmin(cv_mse))]
        self.coef_, self.intercept_ = _ridge_solve(xs, y, self.alpha_)
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.scaler(x) @ self.coef_ + self.intercept_


class KNNProbe:
    """Mean label of the ``k`` nearest training rows in standardised feature space."""

    def __init__(self, k: int = 10, chunk: int = 2048):
        self.k = k
        self.chunk = chunk

    def fit(self, x: np.ndarray, y: np.ndarray) -> "KNNProbe":
        self.scaler = Standardiser.fit(x)
        self.x_ = self.scaler(x)
        self.y_ = np.asarray(y, dtype=np.float64)
        return self

    def neighbours(self, x: np.ndarray) -> np.ndarray:
        """Indices (M, k) of the k nearest training rows of each row of ``x``, nearest first."""
        return nearest_neighbours(self.scaler(x), self.x_, min(self.k, len(self.x_)), self.chunk)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.y_[self.neighbours(x)].mean(axis=1)


def nearest_neighbours(query: np.ndarray, reference: np.ndarray, k: int, chunk: int = 2048) -> np.ndarray:
    """Indices (M, k) of the k rows of ``reference`` nearest (Euclidean) to each row of ``query``."""
    ref_sq = (reference**2).sum(axis=1)
    out = np.empty((len(query), k), dtype=np.int64)
    for start in range(0, len(query), chunk):
        q = query[start : start + chunk]
        d2 = (q**2).sum(axis=1)[:, None] - 2.0 * q @ reference.T + ref_sq[None, :]
        if k < reference.shape[0]:  # the k smallest, unordered, then ordered among themselves
            part = np.argpartition(d2, k - 1, axis=1)[:, :k]
            order = np.take_along_axis(d2, part, axis=1).argsort(axis=1)
            out[start : start + chunk] = np.take_along_axis(part, order, axis=1)
        else:
            out[start : start + chunk] = d2.argsort(axis=1)[:, :k]
    return out


def regression_scores(predicted: np.ndarray, truth: np.ndarray) -> dict:
    """``{"mad", "robust_scatter", "rmse", "bias", "n"}`` of ``predicted - truth`` over finite pairs."""
    residual = np.asarray(predicted, dtype=np.float64) - np.asarray(truth, dtype=np.float64)
    residual = residual[np.isfinite(residual)]
    if residual.size == 0:
        return {"mad": float("nan"), "robust_scatter": float("nan"), "rmse": float("nan"), "bias": float("nan"), "n": 0}
    median = float(np.median(residual))
    return {
        "mad": float(np.median(np.abs(residual))),
        "robust_scatter": float(MAD_TO_SIGMA * np.median(np.abs(residual - median))),
        "rmse": float(np.sqrt(np.mean(residual**2))),
        "bias": median,
        "n": int(residual.size),
    }


def _label_columns(labels, names: Sequence[str] | None) -> dict[str, np.ndarray]:
    """Labels as ``{name: (N,) array}`` from a dict of arrays or an (N, L) array with ``names``."""
    if isinstance(labels, dict):
        return {name: np.asarray(labels[name], dtype=np.float64) for name in (names or labels)}
    labels = np.asarray(labels, dtype=np.float64)
    if names is None or len(names) != labels.shape[1]:
        raise ValueError("give label names for each column of an (N, L) label array")
    return {name: labels[:, i] for i, name in enumerate(names)}


def make_probe(kind: str, k: int = 10, seed: int = 0):
    """A fresh probe: ``"ridge"`` or ``"knn"``."""
    if kind == "ridge":
        return RidgeProbe(seed=seed)
    if kind == "knn":
        return KNNProbe(k=k)
    raise ValueError(f"probe kind must be 'ridge' or 'knn', got {kind!r}")


def evaluate_probes(
    train_features: np.ndarray,
    train_labels,
    test_features: np.ndarray,
    test_labels,
    label_names: Sequence[str] | None = None,
    kinds: Sequence[str] = ("ridge", "knn"),
    k: int = 10,
) -> dict:
    """Fit each probe on the training rows, score on the test rows: ``{kind: {label: scores}}``.

    Labels are a dict ``{name: (N,)}`` or an (N, L) array with ``label_names``. For each label,
    rows where it is NaN are dropped (from fitting and from scoring); scores carry their ``n``.
    """
    train_features = np.asarray(train_features, dtype=np.float64)
    test_features = np.asarray(test_features, dtype=np.float64)
    train_cols = _label_columns(train_labels, label_names)
    test_cols = _label_columns(test_labels, list(train_cols))
    results: dict = {}
    for kind in kinds:
        results[kind] = {}
        for name, y_train in train_cols.items():
            y_test = test_cols[name]
            fit_rows = np.isfinite(y_train) & np.isfinite(train_features).all(axis=1)
            test_rows = np.isfinite(y_test) & np.isfinite(test_features).all(axis=1)
            if fit_rows.sum() < 2 or test_rows.sum() == 0:
                results[kind][name] = regression_scores([], [])
                continue
            probe = make_probe(kind, k=k).fit(train_features[fit_rows], y_train[fit_rows])
            scores = regression_scores(probe.predict(test_features[test_rows]), y_test[test_rows])
            scores["n_train"] = int(fit_rows.sum())
            results[kind][name] = scores
    return results


def cross_source_probe(
    source_train_features: np.ndarray,
    source_train_labels,
    target_train_features: np.ndarray,
    target_train_labels,
    target_test_features: np.ndarray,
    target_test_labels,
    label_names: Sequence[str] | None = None,
    kinds: Sequence[str] = ("ridge", "knn"),
    k: int = 10,
) -> dict:
    """Probe fitted on source A, scored on target B's test stars, next to a probe fitted on B itself.

    Returns ``{"cross": {kind: {label: scores}}, "self": {kind: {label: scores}}}``. A latent that
    describes the star and not the instrument gives ``cross`` scores close to ``self``; one that
    encodes the instrument puts B's stars where A has no stars and ``cross`` fails.
    """
    return {
        "cross": evaluate_probes(
            source_train_features, source_train_labels, target_test_features, target_test_labels, label_names, kinds, k
        ),
        "self": evaluate_probes(
            target_train_features, target_train_labels, target_test_features, target_test_labels, label_names, kinds, k
        ),
    }


def latent_neighbour_agreement(
    features_a: np.ndarray,
    labels_a,
    features_b: np.ndarray,
    labels_b,
    label_names: Sequence[str] | None = None,
    k: int = 10,
    seed: int = 0,
) -> dict:
    """Are the nearest latent neighbours in A of a star of B similar to it in labels?

    For each star of B: its ``k`` nearest stars of A in latent space (features standardised with
    A's statistics), and the median over them of ``|label_B - label_A|``; then the median over B's
    stars (``neighbour_mad``). The same with ``k`` random stars of A (``random_mad``) is the
    no-information reference. ``agreement = 1 - neighbour_mad / random_mad``: 1 when latent
    neighbours share the labels exactly, about 0 when the latent position across instruments says
    nothing about the labels, and below 0 when B's stars all land near the same few stars of A (a
    latent that separates instruments puts B in one corner of A's space).
    """
    scaler = Standardiser.fit(features_a)
    xa, xb = scaler(features_a), scaler(features_b)
    cols_a = _label_columns(labels_a, label_names)
    cols_b = _label_columns(labels_b, list(cols_a))
    rng = np.random.default_rng(seed)
    neighbours = nearest_neighbours(xb, xa, min(k, len(xa)))
    random_rows = rng.integers(0, len(xa), size=neighbours.shape)
    out = {}
    for name, ya in cols_a.items():
        yb = cols_b[name]
        ok = np.isfinite(yb)
        near = np.abs(ya[neighbours] - yb[:, None])  # NaN where A lacks the label: ignored below
        rand = np.abs(ya[random_rows] - yb[:, None])
        near_star = nanmedian_rows(near[ok])  # stars whose neighbours all lack the label: NaN
        rand_star = nanmedian_rows(rand[ok])
        neighbour_mad = float(np.nanmedian(near_star)) if near_star.size else float("nan")
        random_mad = float(np.nanmedian(rand_star)) if rand_star.size else float("nan")
        out[name] = {
            "neighbour_mad": neighbour_mad,
            "random_mad": random_mad,
            "agreement": 1.0 - neighbour_mad / random_mad if random_mad > 0 else float("nan"),
            "n": int(np.isfinite(near_star).sum()),
        }
    return out

