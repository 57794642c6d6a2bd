"""Classifier two-sample test: can a simple classifier tell generated spectra from real ones?

(Lopez-Paz & Oquab 2017, "Revisiting classifier two-sample tests", ICLR.) A classifier is trained
to separate the two sets and scored on spectra it did not see; its held-out ROC AUC is 0.5 when the
sets are indistinguishable to it and 1 when it separates them perfectly.

Here the classifier is L2-regularised logistic regression on standardised features (spectra on a
common grid, line depths, or any summary), optionally projected onto the leading principal
components of the training fold. Standardisation and projection are fitted on the training fold
only. K-fold cross-validation, stratified by class, with identical spectra kept in one fold; the
reported AUC is the mean over folds.

The AUC is computed from the Mann-Whitney U statistic (Mann & Whitney 1947; Hanley & McNeil 1982,
Radiology 143, 29): AUC = U / (n_pos n_neg), the probability that a random positive scores higher
than a random negative, ties counting one half.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize
from scipy.stats import rankdata


def auc_mann_whitney(scores_positive: np.ndarray, scores_negative: np.ndarray) -> float:
    """ROC AUC from the Mann-Whitney U statistic (average ranks for ties)."""
    pos = np.asarray(scores_positive, dtype=np.float64).ravel()
    neg = np.asarray(scores_negative, dtype=np.float64).ravel()
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    ranks = rankdata(np.concatenate([pos, neg]))
    u = ranks[: pos.size].sum() - pos.size * (pos.size + 1) / 2.0
    return float(u / (pos.size * neg.size))


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-2, max_iter: int = 500) -> tuple[np.ndarray, float]:
    """L2-regularised logistic regression: weights and intercept minimising the mean log-loss + l2/2 |w|^2.

    ``x`` (N, D), ``y`` (N,) in {0, 1}. Solved with L-BFGS and the analytic gradient.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n, d = x.shape

    def loss_and_grad(params):
        w, b = params[:d], params[d]
        z = x @ w + b
        # log(1 + exp(z)) - y z, written stably with logaddexp
        loss = np.mean(np.logaddexp(0.0, z) - y * z) + 0.5 * l2 * (w @ w)
        p = 0.5 * (1.0 + np.tanh(0.5 * z))  # the logistic function, without overflow
        g = (p - y) / n
        return loss, np.concatenate([x.T @ g + l2 * w, [g.sum()]])

    result = minimize(loss_and_grad, np.zeros(d + 1), jac=True, method="L-BFGS-B", options={"maxiter": max_iter})
    return result.x[:d], float(result.x[d])


def _grouped_stratified_folds(x: np.ndarray, y: np.ndarray, n_folds: int, rng: np.random.Generator) -> np.ndarray:
    """A fold per row: identical rows share a fold; folds are balanced per class (of a group's first row).

    Without the grouping, a spectrum present in both sets (a generator that copies its training
    data, or a set tested against itself) is scored by a classifier that was trained on its twin
    with the opposite label, and the AUC drops far below 0.5.
    """
    keys = np.nan_to_num(x, nan=np.inf)
    _, first, group = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    group = group.ravel()
    group_fold = np.empty(first.size, dtype=np.int64)
    for label in (0, 1):
        members = np.flatnonzero(y[first] == label)
        group_fold[members] = rng.permutation(np.arange(members.size) % n_folds)
    return group_fold[group]


def classifier_two_sample_test(
    real: np.ndarray,
    generated: np.ndarray,
    n_folds: int = 5,
    n_components: int | None = None,
    l2: float = 1e-2,
    seed: int = 0,
) -> dict:
    """Held-out AUC of a logistic classifier telling ``generated`` (N_g, D) from ``real`` (N_r, D).

    Non-finite feature values are replaced by the training fold's mean (0 after standardising).
    ``n_components`` projects the standardised features onto that many principal components of
    the training fold first (useful when D is thousands of pixels). Returns ``{"auc": mean over
    folds, "auc_std", "auc_folds", "n_real", "n_generated", "n_features"}``.
    """
    real = np.asarray(real, dtype=np.float64)
    generated = np.asarray(generated, dtype=np.float64)
    if real.ndim != 2 or generated.ndim != 2 or real.shape[1] != generated.shape[1]:
        raise ValueError(f"real {real.shape} and generated {generated.shape} must be (N, D) with the same D")
    x = np.vstack([real, generated])
    y = np.concatenate([np.zeros(len(real)), np.ones(len(generated))])
    n_folds = int(min(n_folds, len(real), len(generated)))
    if n_folds < 2:
        raise ValueError("need at least 2 spectra in each set")
    rng = np.random.default_rng(seed)
    folds = _grouped_stratified_folds(x, y, n_folds, rng)
    aucs = []
    for k in range(n_folds):
        train, held = folds != k, folds == k
        x_train = x[train]
        mean = np.nanmean(x_train, axis=0)
        mean = np.where(np.isfinite(mean), mean, 0.0)
        filled = np.where(np.isfinite(x), x, mean)
        std = filled[train].std(axis=0)
        z = (filled - mean) / np.where(std > 0, std, 1.0)
        if n_components is not None and n_components < z.shape[1]:
            _, _, vt = np.linalg.svd(z[train] - z[train].mean(axis=0), full_matrices=False)
            z = z @ vt[:n_components].T
        w, b = fit_logistic(z[train], y[train], l2=l2)
        score = z[held] @ w + b
        aucs.append(auc_mann_whitney(score[y[held] == 1], score[y[held] == 0]))
    return {
        "auc": float(np.mean(aucs)),
        "auc_std": float(np.std(aucs)),
        "auc_folds": [float(a) for a in aucs],
        "n_real": int(len(real)),
        "n_generated": int(len(generated)),
        "n_features": int(x.shape[1]),
    }
