"""What a trained model makes of a data set: its encodings, and how they compare with the ground truth.

Evaluation only reads the model: encoding runs under ``torch.inference_mode`` with the module's train/eval flag
restored afterwards, and nothing here builds an optimiser (the published reference implementation's evaluate took
an optimiser step and moved the weights; ours cannot).

Clusters are unordered, so accuracy and the confusion matrix first match clusters to labels one-to-one with the
Hungarian algorithm (the matching that maximises agreement); the continuous latents are unordered and unsigned too,
so each true factor is matched to one z dimension by the Hungarian algorithm on the |Spearman ρ| matrix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from scipy.stats import spearmanr

__all__ = [
    "ClassDiagnosis",
    "Evaluation",
    "class_usage",
    "clustering_accuracy",
    "collapse_warning",
    "confusion_matrix",
    "diagnose_classes",
    "encode_images",
    "evaluate_encodings",
    "factor_columns",
    "factor_correlation",
    "match_clusters",
    "matched_class_names",
    "normalized_mutual_info",
]


def encode_images(
    model: torch.nn.Module, images: np.ndarray, *, batch_size: int = 512, device: str = "cpu"
) -> dict[str, np.ndarray]:
    """Encode ``(N, H, W)`` images in batches: ``class_prob``, ``z``, ``z_scale``, ``angle``, ``shift`` (as it has).

    ``z`` is the posterior mean. The model is moved to ``device`` (its parameters are not changed) and its train/eval
    mode is restored when done.
    """
    if images.ndim != 3:
        raise ValueError(f"images must be (N, H, W), got shape {images.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    was_training = model.training
    model.to(device)
    model.eval()
    parts: dict[str, list[np.ndarray]] = {}
    try:
        with torch.inference_mode():
            for start in range(0, images.shape[0], batch_size):
                batch = torch.as_tensor(images[start : start + batch_size], dtype=torch.float32, device=device)
                out = model.encode(batch[:, None])
                for name, value in out.items():
                    if isinstance(value, torch.Tensor):
                        parts.setdefault(name, []).append(value.detach().to("cpu", torch.float32).numpy())
    finally:
        model.train(was_training)
    return {name: np.concatenate(chunks) for name, chunks in parts.items()}


def class_usage(class_prob: np.ndarray) -> np.ndarray:
    """Share of patches whose most probable class is each class, ``(K,)``, summing to 1."""
    k = class_prob.shape[-1]
    counts = np.bincount(np.asarray(class_prob).argmax(-1).ravel(), minlength=k)
    return counts / max(1, counts.sum())


@dataclass(frozen=True)
class ClassDiagnosis:
    """Whether the class latent carries information, read off the posteriors ``q(y|x)`` rather than argmax counts.

    Argmax counts alone miss the quiet failure: posteriors equal to the prior for every patch (the class ignored)
    can still spread their argmax over all classes by rounding. The mutual information between the patch and its
    class, ``I(x; y) = H(E_x q(y|x)) − E_x H(q(y|x))``, is 0 exactly then, and ``log K`` for confident, balanced
    classes; its share of ``log K`` is the number to watch.
    """

    n_classes: int
    usage: tuple[float, ...]  # argmax share of each class
    mean_max_prob: float  # 1/K when every posterior is flat, 1 when every one is certain
    mutual_information: float  # nats
    information_ratio: float  # mutual_information / log K
    collapsed: bool
    reason: str  # empty when not collapsed

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_classes": self.n_classes,
            "usage": list(self.usage),
            "mean_max_prob": self.mean_max_prob,
            "mutual_information": self.mutual_information,
            "information_ratio": self.information_ratio,
            "collapsed": self.collapsed,
            "reason": self.reason,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClassDiagnosis:
        """Back from ``to_dict`` (or ``diagnosis.json``, which may hold extra keys: they are ignored)."""
        fields = {k: data[k] for k in cls.__dataclass_fields__}
        return cls(**{**fields, "usage": tuple(fields["usage"])})

    def summary(self) -> str:
        state = f"COLLAPSED ({self.reason})" if self.collapsed else "classes in use"
        return (
            f"{state}: I(x;y) {self.mutual_information:.3f} nats = {self.information_ratio:.0%} of log K, "
            f"mean max q(y|x) {self.mean_max_prob:.2f} (1/K = {1 / self.n_classes:.2f}), "
            f"largest class {max(self.usage):.0%}"
        )


def diagnose_classes(
    class_prob: np.ndarray, *, max_share: float = 0.95, min_information_ratio: float = 0.05
) -> ClassDiagnosis:
    """Collapse diagnosis of posteriors ``(N, K)``: one class over ``max_share`` of the patches, or ``I(x; y)``
    below ``min_information_ratio`` of ``log K`` (posteriors nearly the same for every patch, e.g. the prior)."""
    prob = np.asarray(class_prob, dtype=np.float64)
    if prob.ndim != 2 or prob.shape[0] == 0 or prob.shape[1] < 2:
        raise ValueError(f"class_prob must be (N>0, K>=2), got shape {prob.shape}")
    k = prob.shape[1]
    p = np.clip(prob, 1e-12, 1.0)
    marginal = p.mean(axis=0)
    mi = float(-(marginal * np.log(marginal)).sum() + (p * np.log(p)).sum(axis=1).mean())
    mi = max(mi, 0.0)
    usage = class_usage(prob)
    ratio = mi / float(np.log(k))
    reasons = []
    if usage.max() >= max_share:
        reasons.append(f"one class holds {usage.max():.0%} of the patches")
    if ratio < min_information_ratio:
        reasons.append(f"q(y|x) is nearly the same for every patch (I(x;y) = {ratio:.1%} of log K)")
    return ClassDiagnosis(
        n_classes=k,
        usage=tuple(float(u) for u in usage),
        mean_max_prob=float(prob.max(axis=1).mean()),
        mutual_information=mi,
        information_ratio=ratio,
        collapsed=bool(reasons),
        reason="; ".join(reasons),
    )


def collapse_warning(diagnosis: ClassDiagnosis, *, likelihood: str, gaussian_scale: float) -> str | None:
    """A one-line diagnosis and the knob to try first when the class latent collapsed, else ``None``.

    A mixture VAE whose reconstruction term outweighs the β-weighted KL terms lets the continuous ``z`` carry the
    class differences and leaves ``y`` on one class (the decoders of the others never get data). On the demo lattice
    a Gaussian likelihood with σ = 0.05 or 0.1 collapses this way while σ = 0.2 separates film and substrate, so the
    message names the knob that matters first.
    """
    if not diagnosis.collapsed:
        return None
    fix = (
        f"raise model.gaussian_scale (now {gaussian_scale:g}; try 0.2-0.3)"
        if likelihood == "gaussian"
        else "raise annealing.beta2_start so z is expensive early, or check that the classes differ in the patches"
    )
    return f"class collapse: {diagnosis.reason}; {fix}"


def _contingency(pred: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    pred = np.asarray(pred).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    if pred.shape != labels.shape:
        raise ValueError(f"{pred.shape[0]} predictions but {labels.shape[0]} labels")
    clusters, p_idx = np.unique(pred, return_inverse=True)
    classes, l_idx = np.unique(labels, return_inverse=True)
    table = np.zeros((clusters.size, classes.size), dtype=np.int64)
    np.add.at(table, (p_idx, l_idx), 1)
    return table, clusters, classes


def match_clusters(pred: np.ndarray, labels: np.ndarray) -> dict[int, int]:
    """The one-to-one cluster → label map that maximises the number of agreeing items (Hungarian algorithm).

    Clusters left over when there are more clusters than labels are absent from the map.
    """
    table, clusters, classes = _contingency(pred, labels)
    rows, cols = linear_sum_assignment(table, maximize=True)
    return {int(clusters[r]): int(classes[c]) for r, c in zip(rows, cols, strict=True)}


def matched_class_names(
    pred: np.ndarray, labels: np.ndarray, label_names: tuple[str, ...], n_clusters: int
) -> tuple[str, ...]:
    """A name for each of ``n_clusters`` clusters: the label it is matched to (``match_clusters``).

    An unsupervised model's class k is whatever cluster formed k-th, so naming it after the data's label k would put
    "clubs" on a map that shows hearts. Clusters no label was matched to (empty ones) are called ``unmatched<k>``.
    """
    mapping = match_clusters(pred, labels)
    return tuple(
        label_names[mapping[k]] if k in mapping and 0 <= mapping[k] < len(label_names) else f"unmatched{k}"
        for k in range(n_clusters)
    )


def clustering_accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of items whose cluster, after the best one-to-one matching, equals their label."""
    table, _, _ = _contingency(pred, labels)
    if table.sum() == 0:
        return float("nan")
    rows, cols = linear_sum_assignment(table, maximize=True)
    return float(table[rows, cols].sum() / table.sum())


def normalized_mutual_info(pred: np.ndarray, labels: np.ndarray) -> float:
    """I(pred; labels) / mean(H(pred), H(labels)) in nats (the arithmetic normalisation); 1 when both are constant."""
    table, _, _ = _contingency(pred, labels)
    n = table.sum()
    if n == 0:
        return float("nan")
    pij = table / n
    pi, pj = pij.sum(axis=1), pij.sum(axis=0)
    nz = pij > 0
    mi = float((pij[nz] * np.log(pij[nz] / np.outer(pi, pj)[nz])).sum())
    hi = float(-(pi[pi > 0] * np.log(pi[pi > 0])).sum())
    hj = float(-(pj[pj > 0] * np.log(pj[pj > 0])).sum())
    if hi == 0.0 and hj == 0.0:
        return 1.0
    denom = 0.5 * (hi + hj)
    return float(np.clip(max(mi, 0.0) / denom, 0.0, 1.0))


def confusion_matrix(pred: np.ndarray, labels: np.ndarray, *, n_clusters: int | None = None) -> np.ndarray:
    """Counts ``[true label, matched cluster]``: column j holds the cluster matched to label j, extra clusters after.

    Rows follow the sorted distinct labels. ``n_clusters`` (the model's K) adds columns for clusters that never won
    an item, so the matrix has at least K columns.
    """
    pred = np.asarray(pred).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    mapping = match_clusters(pred, labels)
    classes = np.unique(labels)
    cluster_ids = np.unique(pred).tolist()
    if n_clusters is not None:
        cluster_ids = sorted(set(cluster_ids) | set(range(n_clusters)))
    label_col = {int(c): j for j, c in enumerate(classes)}
    order = sorted(mapping, key=lambda c: label_col[mapping[c]])
    columns = order + [c for c in cluster_ids if c not in mapping]
    col_of = {c: j for j, c in enumerate(columns)}
    out = np.zeros((classes.size, max(len(columns), classes.size)), dtype=np.int64)
    row_of = {int(c): i for i, c in enumerate(classes)}
    for p, t in zip(pred.tolist(), labels.tolist(), strict=True):
        out[row_of[int(t)], col_of[int(p)]] += 1
    return out


def factor_columns(factors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Factors as 1-D columns: an ``N×k`` array ``shift`` becomes ``shift_0 … shift_{k-1}``."""
    out: dict[str, np.ndarray] = {}
    for name, arr in factors.items():
        a = np.asarray(arr, dtype=np.float64)
        if a.ndim == 1:
            out[name] = a
        else:
            flat = a.reshape(a.shape[0], -1)
            for j in range(flat.shape[1]):
                out[f"{name}_{j}"] = flat[:, j]
    return out


def _abs_spearman(a: np.ndarray, b: np.ndarray) -> float:
    if np.ptp(a) == 0 or np.ptp(b) == 0:  # rank correlation with a constant is undefined: call it no correlation
        return 0.0
    rho = spearmanr(a, b).statistic
    return float(abs(rho)) if np.isfinite(rho) else 0.0


def factor_correlation(
    z: np.ndarray, factors: dict[str, np.ndarray]
) -> tuple[np.ndarray, dict[str, tuple[int, float]]]:
    """``(|ρ| matrix (D, F), {factor: (matched z dim, |ρ|)})``: Spearman of every z dimension with every factor,
    then the one-to-one matching of factors to dimensions that maximises the summed |ρ| (Hungarian).

    With more factors than dimensions, only the best-served factors get a dimension; the others are left out.
    """
    z = np.asarray(z, dtype=np.float64)
    if z.ndim != 2:
        raise ValueError(f"z must be (N, D), got shape {z.shape}")
    names = list(factors)
    rho = np.zeros((z.shape[1], len(names)))
    for j, name in enumerate(names):
        col = np.asarray(factors[name], dtype=np.float64).reshape(-1)
        if col.shape[0] != z.shape[0]:
            raise ValueError(f"factor {name!r} has {col.shape[0]} values for {z.shape[0]} encodings")
        for d in range(z.shape[1]):
            rho[d, j] = _abs_spearman(z[:, d], col)
    if not names:
        return rho, {}
    rows, cols = linear_sum_assignment(rho, maximize=True)
    return rho, {names[c]: (int(r), float(rho[r, c])) for r, c in zip(rows, cols, strict=True)}


@dataclass(frozen=True)
class Evaluation:
    """Metrics of one model on one data set; fields are ``None`` when the data has no ground truth for them."""

    n: int
    accuracy: float | None = None
    nmi: float | None = None
    confusion: np.ndarray | None = None
    spearman: dict[str, tuple[int, float]] = field(default_factory=dict)
    class_counts: np.ndarray | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "accuracy": self.accuracy,
            "nmi": self.nmi,
            "confusion": None if self.confusion is None else self.confusion.tolist(),
            "spearman": {k: {"z_dim": d, "abs_rho": r} for k, (d, r) in self.spearman.items()},
            "class_counts": None if self.class_counts is None else self.class_counts.tolist(),
        }


def evaluate_encodings(
    encodings: dict[str, np.ndarray],
    *,
    labels: np.ndarray | None = None,
    factors: dict[str, np.ndarray] | None = None,
    factor_names: tuple[str, ...] | None = None,
) -> Evaluation:
    """Metrics from ``encode_images`` output and whatever ground truth exists.

    ``factor_names`` restricts the Spearman matching to those factors (the cards: shear and scale — the angle and
    shift are absorbed by γ and s, not by z); by default every factor column takes part.
    """
    n = int(next(iter(encodings.values())).shape[0]) if encodings else 0
    accuracy = nmi = None
    confusion = counts = None
    if "class_prob" in encodings:
        prob = encodings["class_prob"]
        pred = prob.argmax(axis=1)
        counts = np.bincount(pred, minlength=prob.shape[1])
        if labels is not None:
            accuracy = clustering_accuracy(pred, labels)
            nmi = normalized_mutual_info(pred, labels)
            confusion = confusion_matrix(pred, labels, n_clusters=prob.shape[1])
    spearman: dict[str, tuple[int, float]] = {}
    if factors and "z" in encodings:
        cols = factor_columns(factors)
        if factor_names is not None:
            missing = [name for name in factor_names if name not in cols]
            if missing:
                raise ValueError(f"factors {missing} are not in the data (it has {sorted(cols)})")
            cols = {name: cols[name] for name in factor_names}
        _, spearman = factor_correlation(encodings["z"], cols)
    return Evaluation(n=n, accuracy=accuracy, nmi=nmi, confusion=confusion, spearman=spearman, class_counts=counts)
