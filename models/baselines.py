"""Trivial methods on the same patches, so every learned figure is read beside what no learning already gives.

A model's accuracy or AUC means little alone: on the real scans a PCA of the raw patches followed by a Gaussian
mixture (or k-means) separates film from substrate and finds dopants about as well as anything. These are the
baselines ``benchmarks/real_data.py`` and ``atomstream evaluate --baseline`` print next to the model's numbers:

* ``pca_fit`` / ``pca_project`` — principal components of flattened patches (SVD, fitted on training patches);
* ``Gmm`` — a full-covariance Gaussian mixture by EM (a few components in a few PCA dimensions): its negative
  log-likelihood is the "how unusual is this patch" baseline, its argmax the clustering baseline;
* ``kmeans_labels`` — k-means (``scipy.cluster.vq.kmeans2``, k-means++ start);
* ``centre_intensity`` — the mean of the patch's central pixels: the column-intensity threshold for dopants;
* metrics: ``roc_auc`` (rank form, ties averaged), ``balanced_accuracy`` of clusters matched to labels (Hungarian),
  ``cv_correlation`` (the cross-validated Pearson R of a least-squares fit), ``match_detections``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.cluster.vq import kmeans2
from scipy.optimize import linear_sum_assignment
from scipy.special import logsumexp
from scipy.stats import rankdata

__all__ = [
    "Gmm",
    "balanced_accuracy",
    "baseline_encodings",
    "centre_intensity",
    "cv_correlation",
    "cv_predict",
    "kmeans_labels",
    "match_detections",
    "pca_fit",
    "pca_project",
    "roc_auc",
]


def pca_fit(images: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(mean (P,), components (P, k))`` of flattened ``(N, ...)`` images."""
    x = np.asarray(images, np.float64).reshape(len(images), -1)
    mean = x.mean(axis=0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    return mean, vt[:k].T


def pca_project(images: np.ndarray, mean: np.ndarray, components: np.ndarray) -> np.ndarray:
    return (np.asarray(images, np.float64).reshape(len(images), -1) - mean) @ components


@dataclass
class Gmm:
    """A full-covariance Gaussian mixture fitted by EM; deterministic for a seed."""

    weights: np.ndarray
    means: np.ndarray
    covs: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray, k: int, *, seed: int = 0, iters: int = 100, ridge: float = 1e-6) -> Gmm:
        x = np.asarray(x, np.float64)
        n, d = x.shape
        start, _ = kmeans2(x, k, seed=seed, minit="++")
        base = np.cov(x, rowvar=False).reshape(d, d) + ridge * np.eye(d)
        gmm = cls(np.full(k, 1.0 / k), start.astype(np.float64), np.repeat(base[None], k, axis=0))
        for _ in range(iters):
            log_r = gmm._joint(x)
            r = np.exp(log_r - logsumexp(log_r, axis=1, keepdims=True))
            nk = r.sum(axis=0) + 1e-9
            gmm.weights = nk / n
            gmm.means = (r.T @ x) / nk[:, None]
            for j in range(k):
                diff = x - gmm.means[j]
                gmm.covs[j] = (r[:, j, None] * diff).T @ diff / nk[j] + ridge * np.eye(d)
        return gmm

    def _joint(self, x: np.ndarray) -> np.ndarray:
        d = x.shape[1]
        out = []
        for w, mu, cov in zip(self.weights, self.means, self.covs, strict=True):
            _, logdet = np.linalg.slogdet(cov)
            diff = x - mu
            maha = np.einsum("ij,ij->i", diff @ np.linalg.inv(cov), diff)
            out.append(np.log(max(w, 1e-300)) - 0.5 * (maha + logdet + d * np.log(2 * np.pi)))
        return np.stack(out, axis=1)

    def log_likelihood(self, x: np.ndarray) -> np.ndarray:
        return logsumexp(self._joint(np.asarray(x, np.float64)), axis=1)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self._joint(np.asarray(x, np.float64)).argmax(axis=1)


def kmeans_labels(x: np.ndarray, k: int, *, seed: int = 0) -> np.ndarray:
    _, labels = kmeans2(np.asarray(x, np.float64), k, seed=seed, minit="++")
    return labels


def centre_intensity(images: np.ndarray, half: int = 2) -> np.ndarray:
    """Mean of the central ``2·half × 2·half`` pixels of each ``(N, H, W)`` patch."""
    h, w = images.shape[1] // 2, images.shape[2] // 2
    return np.asarray(images[:, h - half : h + half, w - half : w + half], np.float64).mean(axis=(1, 2))


def roc_auc(score: np.ndarray, truth: np.ndarray) -> float:
    """Area under the ROC curve (probability a positive outscores a negative); NaN without both classes."""
    t = np.asarray(truth, bool).reshape(-1)
    r = rankdata(np.asarray(score, np.float64).reshape(-1))
    n1, n0 = int(t.sum()), int((~t).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    return float((r[t].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def balanced_accuracy(clusters: np.ndarray, labels: np.ndarray) -> float:
    """Mean per-label recall after matching clusters to labels one-to-one (Hungarian; extra clusters vote for the
    label they overlap most)."""
    c, y = np.asarray(clusters).reshape(-1), np.asarray(labels).reshape(-1)
    ck, yk = np.unique(c), np.unique(y)
    table = np.array([[np.sum((c == a) & (y == b)) for b in yk] for a in ck], np.float64)
    rows, cols = linear_sum_assignment(-table)
    mapping = {ck[r]: yk[k] for r, k in zip(rows, cols, strict=True)}
    for i, a in enumerate(ck):
        mapping.setdefault(a, yk[int(table[i].argmax())])
    pred = np.array([mapping[a] for a in c])
    return float(np.mean([np.mean(pred[y == b] == b) for b in yk]))


def cv_predict(x: np.ndarray, target: np.ndarray, *, folds: int = 5, seed: int = 0) -> np.ndarray:
    """The out-of-fold least-squares prediction of ``target`` from ``x`` (with an intercept): each value predicted by
    a fit that did not see it, so a readout of a latent cannot flatter itself."""
    x = np.asarray(x, np.float64).reshape(len(target), -1)
    y = np.asarray(target, np.float64).reshape(-1)
    order = np.random.default_rng(seed).permutation(len(y))
    pred = np.empty_like(y)
    design = np.concatenate([x, np.ones((len(y), 1))], axis=1)
    for fold in np.array_split(order, folds):
        train = np.setdiff1d(order, fold)
        coef, *_ = np.linalg.lstsq(design[train], y[train], rcond=None)
        pred[fold] = design[fold] @ coef
    return pred


def cv_correlation(x: np.ndarray, target: np.ndarray, *, folds: int = 5, seed: int = 0) -> float:
    """Pearson R between ``target`` and its out-of-fold least-squares prediction from ``x`` (with an intercept)."""
    y = np.asarray(target, np.float64).reshape(-1)
    pred = cv_predict(x, y, folds=folds, seed=seed)
    if pred.std() == 0 or y.std() == 0:
        return 0.0
    return float(np.corrcoef(pred, y)[0, 1])


def match_detections(found: np.ndarray, truth: np.ndarray, radius: float) -> tuple[int, int]:
    """(true sites with a detection within ``radius``, detections within ``radius`` of a true site)."""
    f, t = np.asarray(found, np.float64).reshape(-1, 2), np.asarray(truth, np.float64).reshape(-1, 2)
    if len(f) == 0 or len(t) == 0:
        return 0, 0
    d = np.hypot(f[:, None, 0] - t[None, :, 0], f[:, None, 1] - t[None, :, 1])
    return int((d.min(axis=0) <= radius).sum()), int((d.min(axis=1) <= radius).sum())


def baseline_encodings(images: np.ndarray, *, n_classes: int, latent_dim: int, seed: int = 0) -> dict[str, np.ndarray]:
    """The trivial method's stand-in for a model's encodings, so the same metrics score both: PCA of the flattened
    patches, ``z`` = the first ``latent_dim`` components and ``class_prob`` = one-hot clusters of a GMM with
    ``n_classes`` components fitted in ``max(latent_dim, 5)`` components (k-means when the GMM cannot be fitted)."""
    k_pca = max(latent_dim, 5)
    mean, comps = pca_fit(images, k_pca)
    pcs = pca_project(images, mean, comps)
    out: dict[str, np.ndarray] = {"z": pcs[:, :latent_dim].astype(np.float32)}
    if n_classes > 0:
        try:
            labels = Gmm.fit(pcs, n_classes, seed=seed).predict(pcs)
        except np.linalg.LinAlgError:
            labels = kmeans_labels(pcs, n_classes, seed=seed)
        out["class_prob"] = np.eye(n_classes, dtype=np.float32)[labels]
    return out
