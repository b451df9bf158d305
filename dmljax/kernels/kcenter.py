"""Greedy k-center selection of proxies, vectorised over classes (CCP, Algorithm 2).

CCP (Gürbüz, Can, Alatan, *Deep Metric Learning with Chance Constraints*, Algorithm 2)
re-initialises the ``k`` proxies of every class from a pool of ``b`` embedded samples of that class:
starting from the previous proxies ``rho_c`` as the already-covered set, it repeatedly adds the pool
point farthest (in squared Euclidean distance) from everything chosen so far, i.e. the point that
shrinks the covering radius most. Here every class is processed at once: ``points`` is ``[C, b, D]``
and the ``k`` picks run in a ``lax.fori_loop`` whose body works on all classes together, so there is
one compile per shape and no Python loop over classes.

Conventions (the paper leaves them open):
  * distances are squared L2, computed from explicit differences (not the ``|a|^2 + |b|^2 - 2ab``
    expansion) so that near-ties are resolved exactly like a brute-force loop would;
  * ties are broken towards the lowest pool index (``argmax`` returns the first maximum);
  * with no valid seed in a class, every valid point is at distance ``+inf`` from the empty set, so
    the first pick is the class's first valid pool point (its ``min_dist`` is ``+inf``);
  * when a class has fewer than ``k`` valid pool points, the remaining picks repeat its first pick;
    they are flagged ``valid = False`` and have ``min_dist = 0``. A class without any valid point
    picks index 0 with ``valid = False`` (its center is then whatever sits at index 0: mask it
    downstream).
"""
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["KCenterResult", "greedy_kcenter", "covering_radius"]


class KCenterResult(NamedTuple):
  """Output of :func:`greedy_kcenter`.

  Attributes:
    indices: [C, k] int32, indices into the pool axis ``b`` in the order they were picked.
    centers: [C, k, D] float32, the picked points (``points[c, indices[c, j]]``).
    min_dist: [C, k] float32, squared distance of each pick to the union of the valid seeds and the
      earlier picks at the moment it was picked (``+inf`` for a first pick without seeds, 0 for a
      repeated pick).
    valid: [C, k] bool, True where the pick is a fresh valid pool point (False for repeats).
  """
  indices: jax.Array
  centers: jax.Array
  min_dist: jax.Array
  valid: jax.Array


def _sq_dist_to(points, center):
  """Squared distances [C, b] from each pool point to one center per class ([C, D])."""
  diff = points - center[:, None, :]
  return jnp.sum(diff * diff, axis=-1)


@functools.partial(jax.jit, static_argnames=("k",))
def greedy_kcenter(points, point_mask, seeds, seed_mask, k: int) -> KCenterResult:
  """Greedy k-center picks per class, seeded with previous centers (CCP Algorithm 2).

  For every class ``c`` independently: start from ``S = {seeds[c, s] : seed_mask[c, s]}`` and repeat
  ``k`` times: pick the valid, not yet picked pool point ``u`` maximising ``min_{v in S} |u - v|^2``
  and add it to ``S``.

  Args:
    points: [C, b, D] pool embeddings per class.
    point_mask: [C, b] bool, False marks padding / duplicate pool entries that must not be picked.
    seeds: [C, S, D] previously chosen centers (e.g. the converged proxies); S may be 0.
    seed_mask: [C, S] bool, False marks seeds to ignore.
    k: number of picks per class (static).

  Returns:
    A :class:`KCenterResult` (see its docstring for the conventions on ties, missing seeds and short
    pools).
  """
  points = jnp.asarray(points, jnp.float32)
  seeds = jnp.asarray(seeds, jnp.float32)
  point_mask = jnp.asarray(point_mask, bool)
  seed_mask = jnp.asarray(seed_mask, bool)
  if points.ndim != 3 or seeds.ndim != 3:
    raise ValueError(f"points and seeds must be [C, b, D] and [C, S, D]; got {points.shape} and "
                     f"{seeds.shape}.")
  num_classes, pool, dim = points.shape
  if seeds.shape[0] != num_classes or seeds.shape[2] != dim:
    raise ValueError(f"seeds {seeds.shape} must match points {points.shape} in classes and dim.")
  if point_mask.shape != (num_classes, pool) or seed_mask.shape != seeds.shape[:2]:
    raise ValueError(f"point_mask {point_mask.shape} / seed_mask {seed_mask.shape} must be "
                     f"{(num_classes, pool)} / {seeds.shape[:2]}.")
  if k < 1:
    raise ValueError(f"k must be >= 1, got {k}.")

  # Distance of each pool point to the seed set; one seed at a time keeps memory at [C, b, D].
  def seed_body(s, dist):
    d = _sq_dist_to(points, seeds[:, s])
    return jnp.where(seed_mask[:, s, None], jnp.minimum(dist, d), dist)

  dist = jnp.full((num_classes, pool), jnp.inf, jnp.float32)
  if seeds.shape[1]:  # static; a zero-size seed axis cannot even be indexed while tracing
    dist = jax.lax.fori_loop(0, seeds.shape[1], seed_body, dist)

  any_valid = jnp.any(point_mask, axis=1)
  first_valid = jnp.argmax(point_mask, axis=1).astype(jnp.int32)  # 0 if none valid
  rows = jnp.arange(num_classes)

  def pick_body(j, carry):
    dist, available, indices, min_dist, valid = carry
    # -1 (not -inf) for unavailable points so that +inf (no seeds) still beats them and a class with
    # nothing left is detected by "no available point".
    score = jnp.where(available, dist, -1.0)
    best = jnp.argmax(score, axis=1).astype(jnp.int32)
    fresh = jnp.any(available, axis=1)
    # Fallback for exhausted pools: repeat the first pick (or the first valid point for pick 0).
    fallback = jnp.where(j == 0, first_valid, indices[:, 0])
    idx = jnp.where(fresh, best, fallback)
    best_dist = jnp.where(fresh, dist[rows, idx], 0.0)
    center = points[rows, idx]
    dist = jnp.minimum(dist, _sq_dist_to(points, center))
    available = available & (jnp.arange(pool)[None, :] != idx[:, None])
    indices = indices.at[:, j].set(idx)
    min_dist = min_dist.at[:, j].set(best_dist)
    valid = valid.at[:, j].set(fresh)
    return dist, available, indices, min_dist, valid

  init = (dist, point_mask,
          jnp.zeros((num_classes, k), jnp.int32),
          jnp.zeros((num_classes, k), jnp.float32),
          jnp.zeros((num_classes, k), bool))
  _, _, indices, min_dist, valid = jax.lax.fori_loop(0, k, pick_body, init)
  valid = valid & any_valid[:, None]
  centers = jnp.take_along_axis(points, indices[:, :, None], axis=1)
  return KCenterResult(indices=indices, centers=centers, min_dist=min_dist, valid=valid)


@jax.jit
def covering_radius(points, point_mask, centers, center_mask):
  """Per-class covering radius: max over valid points of the distance to the nearest center.

  Distances are Euclidean (not squared).

  Args:
    points: [C, b, D] samples per class.
    point_mask: [C, b] bool, valid samples.
    centers: [C, K, D] centers (proxies) per class.
    center_mask: [C, K] bool, valid centers.

  Returns:
    [C] float32 radii. A class without valid points has radius 0; a class with valid points but no
    valid center has radius ``+inf``.
  """
  points = jnp.asarray(points, jnp.float32)
  centers = jnp.asarray(centers, jnp.float32)
  point_mask = jnp.asarray(point_mask, bool)
  center_mask = jnp.asarray(center_mask, bool)
  if points.ndim != 3 or centers.ndim != 3 or points.shape[0] != centers.shape[0]:
    raise ValueError(f"points [C, b, D] and centers [C, K, D] must share C and D; got "
                     f"{points.shape} and {centers.shape}.")

  def body(j, dist):
    d = _sq_dist_to(points, centers[:, j])
    return jnp.where(center_mask[:, j, None], jnp.minimum(dist, d), dist)

  dist = jnp.full(points.shape[:2], jnp.inf, jnp.float32)
  if centers.shape[1]:
    dist = jax.lax.fori_loop(0, centers.shape[1], body, dist)
  dist = jnp.where(point_mask, dist, 0.0)
  return jnp.sqrt(jnp.max(dist, axis=1, initial=0.0))
