"""Jitted k-means: k-means++ seeding from an explicit seed, then Lloyd iterations.

Deterministic: the same data, ``num_clusters`` and ``seed`` give the same clusters (the only
randomness is the seeding, drawn from ``jax.random.key(seed)``). Distances are squared Euclidean,
assignments use the score ``x.c - |c|^2 / 2`` (same order as the distance) from matrix products
over blocks of points, so memory is ``O(point_block * num_clusters)`` rather than ``N * C``.

Seeding is plain k-means++ (Arthur & Vassilvitskii 2007): the first centre is a uniformly drawn
point, each next one a point drawn with probability proportional to its squared distance to the
nearest centre so far (one draw per centre; sklearn draws several candidates and keeps the best,
faiss seeds at random, so cluster ids and, slightly, scores differ from both).

Lloyd iterations stop after ``max_iter`` or when the summed squared movement of the centres is at
most ``tol`` times the mean per-feature variance of the data (sklearn's criterion). A cluster that
loses all its points keeps its previous centre. All loops are ``lax`` loops: one compile per shape.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["KMeansResult", "kmeans"]

_HI = jax.lax.Precision.HIGHEST


class KMeansResult(NamedTuple):
  """Attributes: centers ``[C, D]``, assignments ``[N]`` int32, iterations (int), inertia (float:
  sum of squared distances of points to their centre)."""
  centers: np.ndarray
  assignments: np.ndarray
  iterations: int
  inertia: float


def _assign(x, centers, point_block):
  """Nearest centre of every point (ties: smaller centre index) and its squared distance."""
  n, d = x.shape
  half = -0.5 * jnp.sum(centers * centers, axis=1)
  pad = -(-n // point_block) * point_block - n
  xb = jnp.pad(x, ((0, pad), (0, 0))).reshape(-1, point_block, d)

  def block(xs):
    s = jnp.dot(xs, centers.T, precision=_HI) + half
    a = jnp.argmax(s, axis=1).astype(jnp.int32)
    best = jnp.take_along_axis(s, a[:, None], axis=1)[:, 0]
    return a, jnp.maximum(jnp.sum(xs * xs, axis=1) - 2.0 * best, 0.0)

  a, dist = jax.lax.map(block, xb)
  return a.reshape(-1)[:n], dist.reshape(-1)[:n]


@functools.partial(jax.jit, static_argnames=("num_clusters", "max_iter", "point_block"))
def _kmeans(x, key, tol, *, num_clusters, max_iter, point_block):
  n, d = x.shape
  x = x.astype(jnp.float32)

  # k-means++ seeding.
  k0, key = jax.random.split(key)
  first = jax.random.randint(k0, (), 0, n)
  centers = jnp.zeros((num_clusters, d), jnp.float32).at[0].set(x[first])
  diff = x - x[first]
  mind = jnp.sum(diff * diff, axis=1)

  def seed_step(c, carry):
    centers, mind, key = carry
    key, sub = jax.random.split(key)
    cum = jnp.cumsum(mind)
    u = jax.random.uniform(sub, (), jnp.float32) * cum[-1]
    # All points coincide with centres (cum[-1] == 0): fall back to the first point not yet used.
    idx = jnp.where(cum[-1] > 0, jnp.searchsorted(cum, u, side="right"), c % n)
    idx = jnp.minimum(idx, n - 1)
    new = x[idx]
    diff = x - new
    return centers.at[c].set(new), jnp.minimum(mind, jnp.sum(diff * diff, axis=1)), key

  centers, _, _ = jax.lax.fori_loop(1, num_clusters, seed_step, (centers, mind, key))

  threshold = tol * jnp.mean(jnp.var(x, axis=0))

  def lloyd(carry):
    centers, _, it = carry
    assign, _ = _assign(x, centers, point_block)
    sums = jax.ops.segment_sum(x, assign, num_segments=num_clusters)
    counts = jax.ops.segment_sum(jnp.ones((n,), jnp.float32), assign, num_segments=num_clusters)
    new = jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1.0)[:, None], centers)
    shift = jnp.sum((new - centers) ** 2)
    return new, shift, it + 1

  def not_done(carry):
    _, shift, it = carry
    return (it < max_iter) & (shift > threshold)

  centers, _, iters = jax.lax.while_loop(
      not_done, lloyd, (centers, jnp.asarray(jnp.inf, jnp.float32), jnp.asarray(0, jnp.int32)))
  assign, dist = _assign(x, centers, point_block)
  return centers, assign, iters, jnp.sum(dist)


def kmeans(x, num_clusters: int, *, seed: int = 0, max_iter: int = 100, tol: float = 1e-4,
           point_block: int | None = None) -> KMeansResult:
  """Clusters ``x`` into ``num_clusters`` groups.

  Args:
    x: ``[N, D]`` float array (numpy or jax; bfloat16 is computed in float32).
    num_clusters: number of clusters, 1 <= num_clusters <= N.
    seed: seed of the k-means++ draws.
    max_iter: most Lloyd iterations.
    tol: stop when the centres move (sum of squared shifts) by at most ``tol`` times the mean
      per-feature variance.
    point_block: points per assignment block (default: about 4M scores per block).

  Returns:
    A :class:`KMeansResult` (numpy arrays).
  """
  x = np.asarray(x)
  if x.ndim != 2 or x.shape[0] == 0:
    raise ValueError(f"x must have shape [num>0, dim], got {x.shape}.")
  x = x.astype(np.float32)
  n = x.shape[0]
  if not 1 <= num_clusters <= n:
    raise ValueError(f"num_clusters must be in [1, {n}] (number of points), got {num_clusters}.")
  if point_block is None:
    point_block = int(max(8, min(n, (1 << 22) // num_clusters)))
  centers, assign, iters, inertia = _kmeans(
      jnp.asarray(x), jax.random.key(seed), jnp.float32(tol), num_clusters=int(num_clusters),
      max_iter=int(max_iter), point_block=point_block)
  return KMeansResult(np.asarray(centers), np.asarray(assign), int(iters), float(inertia))
