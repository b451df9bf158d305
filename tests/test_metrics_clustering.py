"""k-means and clustering metrics: sklearn's NMI, a brute-force pair loop for F1, determinism."""
import itertools

import numpy as np
import pytest
from sklearn.metrics import normalized_mutual_info_score

from dmljax.kernels.kmeans import kmeans
from dmljax.metrics.clustering import clustering_metrics, nmi, pairwise_f1


def pair_loop_f1(labels, clusters):
  tp = fp = fn = 0
  for i, j in itertools.combinations(range(len(labels)), 2):
    same_class, same_cluster = labels[i] == labels[j], clusters[i] == clusters[j]
    tp += same_class and same_cluster
    fp += same_cluster and not same_class
    fn += same_class and not same_cluster
  p, r = tp / (tp + fp), tp / (tp + fn)
  return 2 * p * r / (p + r)


def test_nmi_and_f1_against_references():
  rng = np.random.default_rng(0)
  for _ in range(5):
    labels = rng.integers(0, 5, 40)
    clusters = rng.integers(3, 9, 40)  # other ids and another number of groups
    assert nmi(labels, clusters) == pytest.approx(
        normalized_mutual_info_score(labels, clusters), abs=1e-12)
    assert pairwise_f1(labels, clusters) == pytest.approx(pair_loop_f1(labels, clusters),
                                                          abs=1e-12)
  # Hand case: classes {0,1,2},{3,4}; clusters {0,1},{2,3,4}. Class pairs 3+1=4, cluster pairs
  # 1+3=4, shared pairs (0,1),(3,4) -> P = R = 1/2.
  assert pairwise_f1([0, 0, 0, 1, 1], [7, 7, 8, 8, 8]) == pytest.approx(0.5)
  assert nmi([0, 0, 1, 1], [5, 5, 3, 3]) == pytest.approx(1.0)


def blobs(seed=0):
  rng = np.random.default_rng(seed)
  centres = 10.0 * rng.standard_normal((4, 3))
  labels = np.repeat(np.arange(4), 12)
  x = (centres[labels] + 0.3 * rng.standard_normal((48, 3))).astype(np.float32)
  return x, labels


def test_kmeans_recovers_blobs_and_is_deterministic():
  x, labels = blobs()
  a = kmeans(x, 4, seed=3)
  b = kmeans(x, 4, seed=3)
  np.testing.assert_array_equal(a.assignments, b.assignments)
  np.testing.assert_array_equal(a.centers, b.centers)
  m = clustering_metrics(x, labels, seed=3)
  assert m["nmi"] == pytest.approx(1.0) and m["f1"] == pytest.approx(1.0)
  # Every centre is the mean of its points, the inertia their summed squared distance.
  for c in range(4):
    np.testing.assert_allclose(a.centers[c], x[a.assignments == c].mean(0), rtol=1e-5, atol=1e-5)
  d = ((x - a.centers[a.assignments]) ** 2).sum()
  assert a.inertia == pytest.approx(d, rel=1e-4)
  # Nearest-centre assignment.
  dist = ((x[:, None] - a.centers[None]) ** 2).sum(-1)
  np.testing.assert_array_equal(a.assignments, dist.argmin(1))


def test_clustering_metrics_on_mixed_clusters_and_bad_input():
  rng = np.random.default_rng(1)
  x = rng.standard_normal((48, 3)).astype(np.float32)
  labels = np.repeat(np.arange(4), 12)
  m = clustering_metrics(x, labels, seed=0)
  clusters = kmeans(x, 4, seed=0).assignments
  assert m["nmi"] == pytest.approx(normalized_mutual_info_score(labels, clusters), abs=1e-12)
  assert m["f1"] == pytest.approx(pair_loop_f1(labels, clusters), abs=1e-12)
  assert 0 < m["nmi"] < 1 and 0 < m["f1"] < 1
  with pytest.raises(ValueError, match="labels must have shape"):
    clustering_metrics(x, labels[:5])
  with pytest.raises(ValueError, match="num_clusters"):
    kmeans(x, 49)

