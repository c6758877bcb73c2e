"""Metrics on inputs whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from models.evaluate import (
    class_usage,
    clustering_accuracy,
    collapse_warning,
    confusion_matrix,
    diagnose_classes,
    evaluate_encodings,
    factor_correlation,
    match_clusters,
    matched_class_names,
    normalized_mutual_info,
)


def test_permuted_clustering_is_perfect() -> None:
    labels = np.repeat(np.arange(4), 25)
    pred = np.array([2, 0, 3, 1])[labels]
    assert match_clusters(pred, labels) == {2: 0, 0: 1, 3: 2, 1: 3}
    assert clustering_accuracy(pred, labels) == 1.0
    assert normalized_mutual_info(pred, labels) == pytest.approx(1.0)
    np.testing.assert_array_equal(confusion_matrix(pred, labels), np.diag([25] * 4))


def test_random_clustering_scores_near_chance() -> None:
    rng = np.random.default_rng(0)
    labels, pred = rng.integers(0, 4, 4000), rng.integers(0, 4, 4000)
    assert clustering_accuracy(pred, labels) < 0.3
    assert normalized_mutual_info(pred, labels) < 0.01


def test_nmi_known_value() -> None:
    # pred determines labels: I = ln 2, H(labels) = ln 2, H(pred) = 1.5 ln 2 → NMI = 1 / 1.25
    assert normalized_mutual_info(np.array([0, 0, 1, 2]), np.array([0, 0, 1, 1])) == pytest.approx(0.8)


def test_hungarian_beats_greedy_matching() -> None:
    # greedy (cluster 0 → its majority label 0) would leave label 1 for cluster 1 and score 5/9; optimum is 6/9
    pred = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1])
    labels = np.array([0, 0, 0, 1, 1, 0, 0, 0, 2])
    assert match_clusters(pred, labels) == {0: 1, 1: 0}
    assert clustering_accuracy(pred, labels) == pytest.approx(5 / 9)


def test_confusion_puts_matched_cluster_on_the_diagonal_and_keeps_empty_clusters() -> None:
    labels = np.array([0, 0, 1, 1, 1])
    pred = np.array([3, 3, 0, 0, 3])
    conf = confusion_matrix(pred, labels, n_clusters=4)
    assert conf.shape == (2, 4)
    np.testing.assert_array_equal(conf[:, :2], [[2, 0], [1, 2]])
    assert conf.sum() == 5


def test_spearman_matching_finds_permuted_and_flipped_factors() -> None:
    rng = np.random.default_rng(1)
    shear, scale = rng.normal(size=500), rng.uniform(1, 1.2, 500)
    z = np.stack([np.exp(scale * 3) + 0.01 * rng.normal(size=500), -(shear**3)], axis=1)  # monotone, flipped
    rho, best = factor_correlation(z, {"shear": shear, "scale": scale})
    assert rho.shape == (2, 2)
    assert best["shear"][0] == 1 and best["shear"][1] > 0.99
    assert best["scale"][0] == 0 and best["scale"][1] > 0.95
    _, none = factor_correlation(rng.normal(size=(500, 2)), {"shear": shear})
    assert none["shear"][1] < 0.15


def test_evaluate_encodings_reports_what_the_data_supports() -> None:
    labels = np.repeat(np.arange(3), 10)
    prob = np.eye(3)[labels[::-1]]
    z = np.stack([labels + 0.1 * np.arange(30), np.arange(30.0)], axis=1)
    ev = evaluate_encodings(
        {"class_prob": prob, "z": z},
        labels=labels,
        factors={"t": np.arange(30.0), "shift": np.ones((30, 2))},
        factor_names=("t",),
    )
    assert ev.accuracy == 1.0 and ev.nmi == pytest.approx(1.0) and ev.n == 30
    assert ev.spearman["t"][1] == pytest.approx(1.0)
    d = ev.to_dict()
    assert d["confusion"] == np.diag([10] * 3).tolist()
    assert evaluate_encodings({"z": z}).accuracy is None
    with pytest.raises(ValueError, match="not in the data"):
        evaluate_encodings({"z": z}, factors={"t": np.arange(30.0)}, factor_names=("shear",))


def test_encoding_reads_the_model_and_changes_nothing() -> None:
    import torch

    from models.config import ModelConfig
    from models.evaluate import encode_images
    from models.jtrvae import JTrVAE

    torch.manual_seed(0)
    model = JTrVAE(ModelConfig(patch=(8, 8), n_classes=3, latent_dim=2, encoder_hidden=(8,), decoder_hidden=(8,)))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = np.random.default_rng(0).uniform(size=(10, 8, 8)).astype(np.float32)
    enc = encode_images(model, images, batch_size=3)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert enc["class_prob"].shape == (10, 3) and enc["z"].shape == (10, 2)
    assert enc["angle"].shape == (10,) and enc["shift"].shape == (10, 2)
    np.testing.assert_allclose(enc["z"], encode_images(model, images, batch_size=10)["z"], atol=1e-6)


def test_class_usage_and_the_collapse_diagnosis() -> None:
    prob = np.array([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8]])
    np.testing.assert_allclose(class_usage(prob), [0.5, 0.25, 0.25])
    healthy = diagnose_classes(prob)
    assert not healthy.collapsed and healthy.reason == ""
    assert collapse_warning(healthy, likelihood="gaussian", gaussian_scale=0.05) is None
    one_class = diagnose_classes(np.tile([0.1, 0.8, 0.1], (40, 1)))
    assert one_class.collapsed and "100%" in one_class.reason
    assert one_class.mutual_information == pytest.approx(0.0, abs=1e-9)
    gaussian = collapse_warning(one_class, likelihood="gaussian", gaussian_scale=0.05)
    assert gaussian is not None and "100%" in gaussian and "gaussian_scale (now 0.05" in gaussian
    bernoulli = collapse_warning(one_class, likelihood="bernoulli", gaussian_scale=0.2)
    assert bernoulli is not None and "beta2_start" in bernoulli


def test_posteriors_equal_to_the_prior_are_a_collapse_even_when_argmax_spreads() -> None:
    rng = np.random.default_rng(0)
    flat = np.full((300, 4), 0.25) + rng.normal(0, 1e-3, (300, 4))  # argmax is noise: spread over all four
    flat /= flat.sum(axis=1, keepdims=True)
    d = diagnose_classes(flat)
    assert max(d.usage) < 0.5  # argmax counts alone would call this healthy
    assert d.collapsed and "nearly the same" in d.reason
    assert d.mean_max_prob == pytest.approx(0.25, abs=0.01)
    confident = diagnose_classes(np.eye(4)[rng.integers(0, 4, 300)])
    assert not confident.collapsed and confident.information_ratio > 0.95


def test_classes_are_named_after_the_label_they_match_not_their_index() -> None:
    labels = np.array([0, 0, 0, 1, 1, 1, 2, 2])
    pred = np.array([2, 2, 1, 0, 0, 0, 3, 3])  # cluster 2 holds the clubs, 0 the spades, 3 the hearts, 1 one stray
    names = matched_class_names(pred, labels, ("clubs", "spades", "hearts"), 5)
    assert names == ("spades", "unmatched1", "clubs", "hearts", "unmatched4")
