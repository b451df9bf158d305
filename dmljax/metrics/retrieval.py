"""Retrieval metrics from one exact kNN pass: P@1, R-precision, MAP@R, Recall@k, Precision@k,
nDCG@k, MAP@k (two normalisations).

Ranking: references are ordered by squared Euclidean distance to the query, ties by the smaller
reference index (:mod:`dmljax.kernels.knn`). A reference is *relevant* to a query when it has the
query's label. ``R`` is a query's number of relevant references: in same-set mode (no gallery:
CUB, Cars, SOP) the query itself is excluded by index, so ``R`` = class size - 1; in query/gallery
mode (In-shop) ``R`` = number of gallery items of the query's class. A query with ``R = 0`` (a
*lone* query) is left out of every average and counted in ``num_lone_queries``.

With ``rel_i`` = 1 if the i-th ranked reference is relevant (i = 1, 2, ...) and
``P@i = (1/i) sum_{j<=i} rel_j``, per query:

* ``precision_at_1`` = rel_1 (always reported).
* ``r_precision`` = (1/R) sum_{i<=R} rel_i.
* ``map_at_r`` = (1/R) sum_{i<=R} P@i rel_i (Musgrave et al. 2020, "A metric learning reality
  check"; the CCP supplement), what PML's ``mean_average_precision_at_r`` computes.
* ``recall_at_{k}`` = 1 if some relevant reference is among the first k, else 0 (the DML
  "Recall@K", which is a hit rate, not the IR recall).
* ``precision_at_{k}`` = P@k = (1/k) sum_{i<=k} rel_i (``precision_ks``). When k > R it can reach
  at most R / k (MPA paper, Table 3: 40 for R = 4, k = 10).
* ``ndcg_at_{k}`` = DCG@k / IDCG@k with binary relevance, DCG@k = sum_{i<=k} rel_i / log2(i + 1),
  and the ideal ranking holding min(k, R) relevant items first (MPA paper, Table 3).
* ``map_at_{k}`` = (1/k) sum_{i<=k} P@i rel_i (``map_ks``): the MPA paper's MAP@k (its Table 3,
  MAP@10 column), average precision cut at k and divided by k, so it too is capped at R / k when
  k > R (a perfect ranking with R = 4 scores 0.4 at k = 10).
* ``map_at_{k}_min_r`` = (1 / min(k, R)) sum_{i<=k} P@i rel_i (``map_min_r_ks``): the same sum
  divided by the most relevant items the first k can hold, so a perfect ranking scores 1 whatever
  R is. (PML's ``mean_average_precision`` is a third variant: it divides by the number of relevant
  items actually found in the first k, so one hit at rank 1 alone scores 1.)

Every value is the mean over non-lone queries (a fraction in [0, 1]; NaN if every query is lone).

Only the first ``K = max(R_max, precision/ndcg/map ks, k)`` neighbours are searched (PML's
``k="max_bin_count"``): every metric above is decided inside them, except Recall@k for k > K, which
needs only the rank of each query's nearest relevant reference; that rank is counted exactly, by
two more blocked passes over just the queries with no relevant reference among their first K.
"""
from __future__ import annotations

import warnings
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dmljax.kernels import knn as knn_lib

__all__ = ["retrieval_metrics", "metrics_from_relevance", "check_labels"]


def check_labels(labels, n: int, name: str, emb_name: str) -> np.ndarray:
  """Labels as an int64 ``[n]`` array; ValueError on a length or dtype mismatch."""
  labels = np.asarray(labels)
  if labels.ndim != 1 or labels.shape[0] != n:
    raise ValueError(f"{name} must have shape [{n}] to match {emb_name} with {n} rows, "
                     f"got shape {labels.shape}.")
  if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
    raise ValueError(f"{name} must hold integer class ids, got dtype {labels.dtype}; "
                     f"cast with labels.astype(np.int32).")
  return labels.astype(np.int64)


def _check_ks(name: str, ks) -> tuple[int, ...]:
  ks = tuple(int(k) for k in ks)
  for k in ks:
    if k < 1:
      raise ValueError(f"{name} must hold positive integers, got {ks}.")
  return ks


def metrics_from_relevance(relevant: np.ndarray, num_relevant: np.ndarray, *,
                           recall_ks: Sequence[int] = (1,), precision_ks: Sequence[int] = (),
                           ndcg_ks: Sequence[int] = (), map_ks: Sequence[int] = (),
                           map_min_r_ks: Sequence[int] = (),
                           first_rank: Optional[np.ndarray] = None) -> dict[str, float]:
  """All metrics of the module docstring from ranked relevance flags.

  Args:
    relevant: ``[Q, K]`` bool, ``relevant[q, i]`` = the (i+1)-th ranked reference of query q is
      relevant. ``K`` must be at least max(R) and every precision, ndcg and map k.
    num_relevant: ``[Q]`` int, R of each query; 0 marks a lone query.
    recall_ks, precision_ks, ndcg_ks, map_ks, map_min_r_ks: cut-offs (keys ``recall_at_{k}``,
      ``precision_at_{k}``, ``ndcg_at_{k}``, ``map_at_{k}`` and ``map_at_{k}_min_r``).
    first_rank: optional ``[Q]`` int, 1-based rank of each query's nearest relevant reference,
      needed only for recall ks larger than K (only read where row ``relevant[q]`` has no hit).

  Returns:
    The metrics dict (``num_queries`` = Q, ``num_lone_queries`` = number of queries with R = 0).
  """
  relevant = np.asarray(relevant, bool)
  num_relevant = np.asarray(num_relevant, np.int64)
  q, k_max = relevant.shape
  recall_ks, precision_ks, ndcg_ks, map_ks, map_min_r_ks = (_check_ks(n, v) for n, v in (
      ("recall_ks", recall_ks), ("precision_ks", precision_ks), ("ndcg_ks", ndcg_ks),
      ("map_ks", map_ks), ("map_min_r_ks", map_min_r_ks)))
  need = max((int(num_relevant.max(initial=0)), 1) + precision_ks + ndcg_ks + map_ks
             + map_min_r_ks)
  if k_max < need:
    raise ValueError(f"relevant has {k_max} columns but the metrics need {need}.")
  ok = num_relevant > 0
  out: dict[str, float] = {}

  def mean(x):
    return float(np.mean(x[ok])) if ok.any() else float("nan")

  rel = relevant.astype(np.float64)
  pos = np.arange(1, k_max + 1, dtype=np.float64)
  r = np.maximum(num_relevant, 1)[:, None]
  in_r = pos[None, :] <= r
  precision_at = np.cumsum(rel, axis=1) / pos
  out["precision_at_1"] = mean(rel[:, 0])
  out["r_precision"] = mean((rel * in_r).sum(1) / r[:, 0])
  out["map_at_r"] = mean((precision_at * rel * in_r).sum(1) / r[:, 0])
  any_hit = relevant.any(axis=1)
  for k in recall_ks:
    if k <= k_max:
      hit = relevant[:, :k].any(axis=1)
    else:
      if first_rank is None:
        raise ValueError(f"recall_at_{k} needs first_rank: relevant has only {k_max} columns.")
      hit = any_hit | ((np.asarray(first_rank) >= 1) & (np.asarray(first_rank) <= k))
    out[f"recall_at_{k}"] = mean(hit.astype(np.float64))
  for k in precision_ks:
    out[f"precision_at_{k}"] = mean(rel[:, :k].sum(1) / k)
  discount = 1.0 / np.log2(pos + 1.0)
  ideal = np.cumsum(discount)
  for k in ndcg_ks:
    dcg = (rel[:, :k] * discount[:k]).sum(1)
    idcg = ideal[np.minimum(k, num_relevant.clip(1)) - 1]
    out[f"ndcg_at_{k}"] = mean(dcg / idcg)

  def ap_sum(k):  # sum_{i<=k} P@i rel_i per query
    return (precision_at[:, :k] * rel[:, :k]).sum(1)

  for k in map_ks:
    out[f"map_at_{k}"] = mean(ap_sum(k) / k)
  for k in map_min_r_ks:
    out[f"map_at_{k}_min_r"] = mean(ap_sum(k) / np.minimum(k, num_relevant.clip(1)))
  out["num_queries"] = int(q)
  out["num_lone_queries"] = int((~ok).sum())
  return out


def retrieval_metrics(embeddings, labels, *, gallery_embeddings=None, gallery_labels=None,
                      recall_ks: Sequence[int] = (1,), precision_ks: Sequence[int] = (),
                      ndcg_ks: Sequence[int] = (), map_ks: Sequence[int] = (),
                      map_min_r_ks: Sequence[int] = (), k: Optional[int] = None,
                      query_block: Optional[int] = knn_lib.QUERY_BLOCK,
                      ref_block: Optional[int] = None, group: Optional[int] = knn_lib.GROUP,
                      mesh=None, sizing: str = "auto", memory_budget: Optional[int] = None,
                      approx_recall: Optional[float] = None,
                      on_device: Optional[bool] = None) -> dict[str, float]:
  """Retrieval metrics of ``embeddings`` (the queries) by exact kNN; see the module docstring.

  Args:
    embeddings: ``[Q, D]`` queries, numpy or jax, float32 or bfloat16.
    labels: ``[Q]`` integer class ids.
    gallery_embeddings: ``[N, D]`` references (query/gallery mode); None = same-set mode, where
      the queries are the references and each query's own row is excluded.
    gallery_labels: ``[N]`` labels of the gallery (given together with it).
    recall_ks, precision_ks, ndcg_ks: cut-offs of Recall@k, Precision@k and nDCG@k.
    map_ks: cut-offs of MAP@k as the MPA paper defines it (divided by k).
    map_min_r_ks: cut-offs of MAP@k divided by min(k, R) (keys ``map_at_{k}_min_r``).
    k: search at least this many neighbours (default: what the metrics need, as PML's
      ``"max_bin_count"``). It changes no value, only how deep the single pass goes.
    query_block, ref_block, group: kNN block sizes (:func:`dmljax.kernels.knn.knn`; None:
      chosen from the sizes and ``sizing``).
    mesh: devices to shard query blocks over; None = all devices.
    sizing, memory_budget: how the kNN cuts its work (:func:`dmljax.kernels.knn.knn`: ``"auto"``
      = the CPU's blocks on CPU, a single pass or blocks sized from device memory on GPU/TPU);
      the metrics do not depend on it.
    approx_recall: TPU only, opt-in: the kNN's group filter by ``lax.approx_max_k`` at this
      recall target; the metrics are then approximate (None / 0: exact, the default).
    on_device: compute from the device arrays (see :func:`dmljax.kernels.knn.knn`; None: jax
      arrays on a GPU/TPU stay there and only the ``[Q, K]`` neighbour indices are read back;
      numpy input, and CPU devices, take the host path).

  Returns:
    dict with ``precision_at_1``, ``r_precision``, ``map_at_r``, ``recall_at_{k}``,
    ``precision_at_{k}``, ``ndcg_at_{k}``, ``map_at_{k}``, ``map_at_{k}_min_r`` (fractions in
    [0, 1], means over non-lone queries),
    ``num_queries`` (all queries) and ``num_lone_queries``.

  Raises:
    ValueError: length mismatch between embeddings and labels, NaN/inf embeddings, empty sets,
      gallery given without labels, or a requested k larger than the references.
  """
  flat = knn_lib.flat_mesh(mesh)
  dev = knn_lib.search_on_device(embeddings, on_device, flat)
  if dev:
    def prep(x, name):
      return knn_lib.prepare_device(x if isinstance(x, jax.Array) else jnp.asarray(x), name)
  else:
    prep = knn_lib.prepare_embeddings
  queries = prep(embeddings, "embeddings")
  q_labels = check_labels(labels, queries.shape[0], "labels", "embeddings")
  if (gallery_embeddings is None) != (gallery_labels is None):
    raise ValueError("gallery_embeddings and gallery_labels must be given together.")
  same = gallery_embeddings is None
  if same:
    refs, r_labels = queries, q_labels
  else:
    refs = prep(gallery_embeddings, "gallery_embeddings")
    r_labels = check_labels(gallery_labels, refs.shape[0], "gallery_labels",
                            "gallery_embeddings")
    if refs.shape[1] != queries.shape[1]:
      raise ValueError(f"gallery_embeddings have dimension {refs.shape[1]}, embeddings "
                       f"{queries.shape[1]}; they must match.")
  cut_offs = {"recall_ks": recall_ks, "precision_ks": precision_ks, "ndcg_ks": ndcg_ks,
              "map_ks": map_ks, "map_min_r_ks": map_min_r_ks}
  cut_offs = {n: _check_ks(n, v) for n, v in cut_offs.items()}
  recall_ks, precision_ks, ndcg_ks, map_ks, map_min_r_ks = cut_offs.values()
  available = refs.shape[0] - int(same)
  asked = {f"{n} {v}": max(v, default=0) for n, v in cut_offs.items()}
  asked[f"k={k}"] = k or 0
  for what, v in asked.items():
    if v > available:
      raise ValueError(f"{what} asks for {v} neighbours but each query has only {available} "
                       f"references; lower it to at most {available}.")
  if available < 1:
    raise ValueError("A same-set evaluation needs at least 2 embeddings.")

  # Labels to 0..C-1 over queries and references together (ints the kernels compare).
  uniq, inv = np.unique(np.concatenate([q_labels, r_labels]), return_inverse=True)
  q_lab, r_lab = inv[:queries.shape[0]], inv[queries.shape[0]:]
  ref_counts = np.bincount(r_lab, minlength=len(uniq))
  num_relevant = ref_counts[q_lab] - int(same)
  if not (num_relevant > 0).any():
    warnings.warn("No query has a relevant reference: every metric is NaN.")

  depth = max((int(num_relevant.max()), 1, k or 0) + precision_ks + ndcg_ks + map_ks
              + map_min_r_ks)
  depth = min(depth, available)
  search = dict(query_block=query_block, ref_block=ref_block, mesh=flat, sizing=sizing,
                memory_budget=memory_budget)
  res = knn_lib.knn(queries, None if same else refs, k=depth, group=group,
                    approx_recall=approx_recall, on_device=dev, **search)
  relevant = r_lab[res.indices] == q_lab[:, None]
  first_rank = None
  if any(kk > depth for kk in recall_ks):
    first_rank = np.zeros(queries.shape[0], np.int64)
    todo = np.flatnonzero((num_relevant > 0) & ~relevant.any(axis=1))
    if todo.size:
      picked = jnp.take(queries, jnp.asarray(todo), axis=0) if dev else queries[todo]
      first_rank[todo] = knn_lib.first_relevant_rank(
          picked, q_lab[todo], todo, refs, r_lab, same_set=same, **search)
  return metrics_from_relevance(relevant, num_relevant, recall_ks=recall_ks,
                                precision_ks=precision_ks, ndcg_ks=ndcg_ks, map_ks=map_ks,
                                map_min_r_ks=map_min_r_ks, first_rank=first_rank)
