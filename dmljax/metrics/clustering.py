"""Clustering metrics: NMI and pairwise F1 of k-means clusters against the class labels.

As in PROFS (Table 1) and Song et al. 2016 ("Deep metric learning via lifted structured feature
embedding"): the embeddings are clustered by k-means (:mod:`dmljax.kernels.kmeans`, k-means++
seeding from ``seed``) into as many clusters as there are classes, then

* ``nmi`` = I(classes; clusters) / ((H(classes) + H(clusters)) / 2), the arithmetic
  normalisation, sklearn's default ``normalized_mutual_info_score`` (1.0 when both are a single
  group);
* ``f1`` = 2 P R / (P + R) over unordered pairs of samples: a pair is a true positive if it shares
  both class and cluster, P = TP / (pairs sharing a cluster), R = TP / (pairs sharing a class).

Both are computed from the class-by-cluster contingency table (no pair loop).
"""
from __future__ import annotations

import numpy as np

from dmljax.kernels import kmeans as kmeans_lib
from dmljax.kernels import knn as knn_lib
from dmljax.metrics.retrieval import check_labels

__all__ = ["clustering_metrics", "nmi", "pairwise_f1", "contingency"]


def contingency(labels, clusters) -> np.ndarray:
  """``[num_classes, num_clusters]`` int64 counts (sparse ids are compacted)."""
  _, li = np.unique(np.asarray(labels), return_inverse=True)
  _, ci = np.unique(np.asarray(clusters), return_inverse=True)
  table = np.zeros((li.max() + 1, ci.max() + 1), np.int64)
  np.add.at(table, (li, ci), 1)
  return table


def _entropy(counts: np.ndarray) -> float:
  p = counts[counts > 0] / counts.sum()
  return float(-(p * np.log(p)).sum())


def nmi(labels, clusters) -> float:
  """Normalised mutual information with arithmetic-mean normalisation."""
  t = contingency(labels, clusters).astype(np.float64)
  n = t.sum()
  a, b = t.sum(1), t.sum(0)
  nz = t > 0
  mi = float((t[nz] / n * np.log(t[nz] * n / np.outer(a, b)[nz])).sum())
  ha, hb = _entropy(a), _entropy(b)
  if ha == 0.0 and hb == 0.0:
    return 1.0
  return max(mi, 0.0) / ((ha + hb) / 2.0)


def pairwise_f1(labels, clusters) -> float:
  """F-measure over sample pairs (Song et al. 2016); 0 when no pair shares a cluster or class."""
  t = contingency(labels, clusters)

  def pairs(c):
    return float((c * (c - 1) // 2).sum())

  tp = pairs(t)
  same_cluster, same_class = pairs(t.sum(0)), pairs(t.sum(1))
  if tp == 0:
    return 0.0
  p, r = tp / same_cluster, tp / same_class
  return 2.0 * p * r / (p + r)


def clustering_metrics(embeddings, labels, *, seed: int = 0, max_iter: int = 100,
                       tol: float = 1e-4) -> dict[str, float]:
  """NMI and pairwise F1 of k-means (as many clusters as classes) on ``embeddings``.

  Args:
    embeddings: ``[N, D]`` float32/bfloat16, numpy or jax.
    labels: ``[N]`` integer class ids.
    seed: k-means++ seed.
    max_iter, tol: Lloyd stopping rule (:func:`dmljax.kernels.kmeans.kmeans`).

  Returns:
    ``{"nmi": float, "f1": float}``.

  Raises:
    ValueError: on empty/NaN embeddings or a label length mismatch.
  """
  x = knn_lib.prepare_embeddings(embeddings, "embeddings")
  y = check_labels(labels, x.shape[0], "labels", "embeddings")
  num_classes = len(np.unique(y))
  res = kmeans_lib.kmeans(x, num_classes, seed=seed, max_iter=max_iter, tol=tol)
  return {"nmi": nmi(y, res.assignments), "f1": pairwise_f1(y, res.assignments)}
