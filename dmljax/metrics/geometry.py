"""Embedding geometry: class covering radius (CCP's figures) and proxy-to-sample covering radius.

All distances are Euclidean (not squared). Classes are processed together, padded to the largest
class with masks (``[C, n_max, D]``), using the greedy k-center kernel of
:mod:`dmljax.kernels.kcenter`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dmljax.kernels import kcenter
from dmljax.kernels import knn as knn_lib
from dmljax.metrics.retrieval import check_labels

__all__ = ["class_covering_radius", "class_covering_radii", "proxy_covering_radius",
           "group_by_class"]


def group_by_class(x: np.ndarray, labels: np.ndarray):
  """Pads each class's rows into ``[C, n_max, D]`` with a ``[C, n_max]`` mask.

  Returns:
    (classes ``[C]`` sorted unique labels, points, mask, counts ``[C]``).
  """
  classes, inv, counts = np.unique(labels, return_inverse=True, return_counts=True)
  order = np.argsort(inv, kind="stable")
  slot = np.arange(len(labels)) - np.repeat(np.cumsum(counts) - counts, counts)
  points = np.zeros((len(classes), counts.max(), x.shape[1]), np.float32)
  mask = np.zeros((len(classes), counts.max()), bool)
  points[inv[order], slot] = x[order]
  mask[inv[order], slot] = True
  return classes, points, mask, counts


@jax.jit
def _one_center(points, mask):
  """Per class, the sample minimising the largest distance to the other samples (exact 1-center)."""
  sq = jnp.sum(points * points, axis=-1)
  d = sq[:, :, None] + sq[:, None, :] - 2.0 * jnp.einsum("cid,cjd->cij", points, points,
                                                          precision=jax.lax.Precision.HIGHEST)
  d = jnp.where(mask[:, None, :], jnp.maximum(d, 0.0), 0.0)  # only real points to cover
  worst = jnp.where(mask, d.max(axis=2), jnp.inf)  # only real points as centres
  best = jnp.argmin(worst, axis=1)
  return jnp.take_along_axis(points, best[:, None, None], axis=1)


def class_covering_radii(embeddings, labels) -> np.ndarray:
  """Per class: the mean over k = 1..n of the radius of a k-center cover of the class's n samples.

  The radius of a set of centres S (chosen among the class's samples) is the largest distance
  from a sample of the class to its nearest centre; CCP (Fig. 3 / Fig. 10) averages, over
  k in [n], the radius of the best cover with k centres. The best k-cover is NP-hard in
  general, so: k = 1 is exact (the sample whose farthest class-mate is nearest), and k >= 2 extend
  that centre greedily (farthest point first: Gonzalez's 2-approximation, CCP's Algorithm 2),
  which gives every k at once: the radius of the first k centres is the distance of the (k+1)-th
  greedy pick to them. k = n has radius 0. A class of one sample has radius 0.

  Args:
    embeddings: ``[N, D]`` float32/bfloat16.
    labels: ``[N]`` integer class ids.

  Returns:
    ``[C]`` float64 radii, classes in increasing label order.
  """
  x = knn_lib.prepare_embeddings(embeddings, "embeddings")
  y = check_labels(labels, x.shape[0], "labels", "embeddings")
  _, points, mask, counts = group_by_class(x, y)
  if counts.max() == 1:
    return np.zeros(len(counts))
  c1 = _one_center(jnp.asarray(points), jnp.asarray(mask))
  res = kcenter.greedy_kcenter(points, mask, c1, np.ones((len(counts), 1), bool),
                               k=int(counts.max()) - 1)
  # Pick j (0-based) is at distance radius(first j+1 centres) from them; picks past a class's
  # n - 1 other samples are repeats (valid False) and must not count.
  r = np.sqrt(np.asarray(res.min_dist, np.float64)) * np.asarray(res.valid)
  take = np.arange(r.shape[1])[None, :] < (counts[:, None] - 1)
  return (r * take).sum(axis=1) / counts


def class_covering_radius(embeddings, labels) -> float:
  """Mean over classes of :func:`class_covering_radii` (CCP's average covering radius)."""
  return float(np.mean(class_covering_radii(embeddings, labels)))


def proxy_covering_radius(embeddings, labels, proxies, proxy_labels, *,
                          reduction: str = "mean") -> float:
  """How far samples are from the proxies of their own class.

  For each sample, d = Euclidean distance to the nearest proxy with the sample's label.

  Args:
    embeddings: ``[N, D]`` samples; labels: ``[N]``.
    proxies: ``[P, D]`` proxies; proxy_labels: ``[P]`` (several proxies per class allowed).
    reduction: ``"mean"``: the mean of d over samples; ``"class_max"``: per class the largest d
      (the covering radius of the class by its proxies, as in CCP's proof of Corollary 2.1),
      averaged over classes.

  Returns:
    float.

  Raises:
    ValueError: if a sample's class has no proxy, or on bad shapes/values.
  """
  if reduction not in ("mean", "class_max"):
    raise ValueError(f"reduction must be 'mean' or 'class_max', got {reduction!r}.")
  x = knn_lib.prepare_embeddings(embeddings, "embeddings")
  y = check_labels(labels, x.shape[0], "labels", "embeddings")
  p = knn_lib.prepare_embeddings(proxies, "proxies")
  py = check_labels(proxy_labels, p.shape[0], "proxy_labels", "proxies")
  if p.shape[1] != x.shape[1]:
    raise ValueError(f"proxies have dimension {p.shape[1]}, embeddings {x.shape[1]}.")
  missing = np.setdiff1d(y, py)
  if missing.size:
    raise ValueError(f"{missing.size} class(es) of the samples have no proxy (e.g. label "
                     f"{missing[0]}); give every class at least one proxy.")
  classes, points, mask, _ = group_by_class(x, y)
  keep = np.isin(py, classes)
  pclasses, pp, pmask, _ = group_by_class(p[keep], py[keep])
  assert np.array_equal(pclasses, classes)
  if reduction == "class_max":
    return float(np.mean(np.asarray(kcenter.covering_radius(points, mask, pp, pmask))))
  sq = (np.sum(points ** 2, -1)[:, :, None] + np.sum(pp ** 2, -1)[:, None, :]
        - 2.0 * np.einsum("cid,cjd->cij", points.astype(np.float64), pp))
  sq = np.where(pmask[:, None, :], sq, np.inf).min(axis=2)
  d = np.sqrt(np.maximum(sq, 0.0))
  return float(d[mask].mean())
