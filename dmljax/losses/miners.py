"""Pair and triplet miners that are safe under ``jit``: they return masks (or index arrays with a
validity mask) of static shape, never variable-length index lists.

Every miner takes the inputs of a loss (``embeddings, labels, *, ref_embeddings=None,
ref_labels=None, ref_mask=None``; see :mod:`dmljax.losses.core`), so it can mine within the batch
or against references (a cross-batch memory, proxies, class representatives). Masks are ``[B, R]``
over (anchor, reference) pairs, or ``[B, R, R]`` over (anchor, positive, negative) triplets. A
loss uses them by restricting its pair masks, e.g. ``pos & mined_pos``.

``distance`` selects how hardness is measured: ``"euclidean"`` (default for the distance-based
miners), ``"squared"`` (squared Euclidean) or ``"dot"`` (inner product, i.e. cosine similarity on
unit-norm embeddings; larger means closer). Miners compare values only, so the gradient never
flows through them: wrap the embeddings in ``jax.lax.stop_gradient`` or not, the masks are the
same.

Every miner also takes ``pair_mask=`` (``[B, R]`` bool, as the losses do): only the pairs in it
are candidates, e.g. PROFS mines with the class representatives as the only anchors.

A miner's output feeds a loss through the losses' ``pair_mask=`` / ``triplet_mask=`` keywords,
e.g. one hardest negative per positive pair (PROFS section 5.3, CCP)::

    choice = hardest_negative_per_positive(x, y, distinct=True)
    loss = contrastive(x, y, pair_mask=choice.pair_mask())
    loss = triplet_margin(x, y, triplet_mask=choice.triplet_mask())

Ties are broken towards the lowest reference index (``argmax`` / ``argsort`` order).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from dmljax.losses import core

__all__ = [
    "batch_hard",
    "semi_hard",
    "distance_weighted_probs",
    "distance_weighted",
    "multi_similarity_miner",
    "hardest_negative_per_positive",
    "NegativeChoice",
]

Array = jax.Array

DISTANCES = ("euclidean", "squared", "dot")


def _closeness(pairs: core.Pairs, distance: str) -> Array:
  """``[B, R]`` score where larger means closer: similarity, or minus the distance."""
  if distance not in DISTANCES:
    raise ValueError(f"distance must be one of {list(DISTANCES)}, got {distance!r}.")
  emb = jax.lax.stop_gradient(pairs.emb)
  ref = jax.lax.stop_gradient(pairs.ref)
  if distance == "dot":
    return core.dot_similarity(emb, ref)
  if distance == "squared":
    return -core.squared_distance(emb, ref)
  return -core.euclidean_distance(emb, ref)


def _one_hot_arg(score: Array, mask: Array, largest: bool) -> Array:
  """``[B, R]`` bool with one True per row at the masked arg-max (or arg-min); none if empty."""
  fill = -jnp.inf if largest else jnp.inf
  s = jnp.where(mask, score, fill)
  idx = jnp.argmax(s, axis=1) if largest else jnp.argmin(s, axis=1)
  hot = jax.nn.one_hot(idx, score.shape[1], dtype=bool)
  return hot & jnp.any(mask, axis=1, keepdims=True)


def batch_hard(embeddings, labels, *, ref_embeddings=None, ref_labels=None, ref_mask=None,
               pair_mask=None,
               distance: str = "euclidean"):
  """Batch-hard mining (Hermans et al.): the hardest positive and hardest negative per anchor.

  The hardest positive is the farthest same-class reference, the hardest negative the closest
  other-class one. As in PML's ``BatchHardMiner`` an anchor is used only if it has both: rows of
  anchors without a positive or without a negative are all False in both masks.

  Returns:
    ``(pos_mask, neg_mask)``: ``[B, R]`` bool, each row with exactly one True (or none).
  """
  pairs = core.check_inputs(embeddings, labels, ref_embeddings, ref_labels, ref_mask, pair_mask)
  close = _closeness(pairs, distance)
  usable = jnp.any(pairs.pos, axis=1, keepdims=True) & jnp.any(pairs.neg, axis=1, keepdims=True)
  hard_pos = _one_hot_arg(close, pairs.pos, largest=False) & usable
  hard_neg = _one_hot_arg(close, pairs.neg, largest=True) & usable
  return hard_pos, hard_neg


def semi_hard(embeddings, labels, *, ref_embeddings=None, ref_labels=None, ref_mask=None,
              pair_mask=None,
              margin: float = 0.2, distance: str = "euclidean") -> Array:
  """FaceNet semi-hard triplets (Schroff et al.): negatives farther than the positive but
  within the margin.

  ``t[i, j, k]`` is True for anchor ``i``, positive ``j`` and negative ``k`` with
  ``0 < d(i, k) - d(i, j) <= margin`` (for ``distance="dot"``: ``0 < S_ij - S_ik <= margin``).
  This is PML's ``TripletMarginMiner(margin, type_of_triplets="semihard")``; FaceNet's own
  condition is the ``distance="squared"`` case. Pair masks follow as ``t.any(2)`` (mined
  positives) and ``t.any(1)`` (mined negatives). Memory is ``B * R * R`` bools: fine for a
  batch, not for a large memory bank.

  Args:
    margin: the triplet margin, >= 0.

  Returns:
    ``[B, R, R]`` bool triplet mask.
  """
  core.check_range("margin", margin, low=0.0)
  pairs = core.check_inputs(embeddings, labels, ref_embeddings, ref_labels, ref_mask, pair_mask)
  close = _closeness(pairs, distance)
  gap = close[:, :, None] - close[:, None, :]  # closeness(a, p) - closeness(a, n)
  return pairs.pos[:, :, None] & pairs.neg[:, None, :] & (gap > 0) & (gap <= margin)


def distance_weighted_probs(embeddings, labels, *, ref_embeddings=None, ref_labels=None,
                            ref_mask=None, pair_mask=None, cutoff: float = 0.5,
                            nonzero_loss_cutoff: float = 1.4) -> Array:
  """Sampling probabilities of distance-weighted sampling (Wu et al., *Sampling Matters*).

  On the unit sphere in ``n = D`` dimensions pairwise distances have density
  ``q(d) ~ d^(n-2) (1 - d^2/4)^((n-3)/2)``; negatives are drawn with probability
  ``~ 1 / q(max(d, cutoff))``, restricted to negatives with ``d < nonzero_loss_cutoff`` (farther
  ones have zero margin loss). Same weights as PML's ``DistanceWeightedMiner``. An anchor with
  negatives but none inside ``nonzero_loss_cutoff`` falls back to uniform over its negatives (Wu
  et al.'s code falls back to uniform over the whole batch, same-class samples included; we keep
  the draw a negative). An anchor with no negative gets an all-zero row.

  Args:
    cutoff: lower clip of the distance (> 0), so that near-duplicates do not dominate.
    nonzero_loss_cutoff: upper bound on the distance of a sampled negative (> cutoff).

  Returns:
    ``[B, R]`` float32, each row summing to 1 (or 0 without negatives).
  """
  core.check_range("cutoff", cutoff, low=0.0, low_inclusive=False)
  core.check_range("nonzero_loss_cutoff", nonzero_loss_cutoff, low=cutoff, low_inclusive=False)
  pairs = core.check_inputs(embeddings, labels, ref_embeddings, ref_labels, ref_mask, pair_mask)
  n = pairs.emb.shape[1]
  d_raw = -_closeness(pairs, "euclidean")
  d = jnp.maximum(d_raw, cutoff)
  # 1 - d^2/4 reaches 0 at antipodal points (and goes negative off the sphere): clip before the
  # log; such pairs lie beyond nonzero_loss_cutoff and get no weight anyway.
  log_w = (2.0 - n) * jnp.log(d) - 0.5 * (n - 3.0) * jnp.log(jnp.maximum(1.0 - 0.25 * d * d,
                                                                         1e-8))
  eligible = pairs.neg & (d_raw < nonzero_loss_cutoff)
  has_eligible = jnp.any(eligible, axis=1, keepdims=True)
  logits = jnp.where(has_eligible, jnp.where(eligible, log_w, -jnp.inf),
                     jnp.where(pairs.neg, 0.0, -jnp.inf))
  has_neg = jnp.any(pairs.neg, axis=1, keepdims=True)
  probs = jax.nn.softmax(jnp.where(has_neg, logits, 0.0), axis=1)
  return jnp.where(has_neg, probs, 0.0)


def distance_weighted(embeddings, labels, *, rng, ref_embeddings=None, ref_labels=None,
                      ref_mask=None, pair_mask=None, num_samples: int = 1,
                      cutoff: float = 0.5,
                      nonzero_loss_cutoff: float = 1.4) -> Array:
  """Distance-weighted negative sampling (Wu et al.) with an explicit ``rng``.

  Draws ``num_samples`` negatives per anchor, with replacement, from
  :func:`distance_weighted_probs`. Positives are not sampled (Wu et al. keep all positive pairs:
  combine with ``pairs.pos``).

  Args:
    rng: a ``jax.random`` key.
    num_samples: draws per anchor (static, >= 1); repeated draws collapse in the mask.
    cutoff, nonzero_loss_cutoff: see :func:`distance_weighted_probs`.

  Returns:
    ``[B, R]`` bool mask of sampled negatives (at most ``num_samples`` per row; none for anchors
    without negatives).
  """
  if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
    raise ValueError(f"num_samples must be a Python int >= 1, got {num_samples!r}.")
  probs = distance_weighted_probs(embeddings, labels, ref_embeddings=ref_embeddings,
                                  ref_labels=ref_labels, ref_mask=ref_mask, pair_mask=pair_mask,
                                  cutoff=cutoff,
                                  nonzero_loss_cutoff=nonzero_loss_cutoff)
  has_neg = jnp.any(probs > 0, axis=1, keepdims=True)
  logits = jnp.where(probs > 0, jnp.log(jnp.where(probs > 0, probs, 1.0)), -jnp.inf)
  logits = jnp.where(has_neg, logits, 0.0)
  idx = jax.random.categorical(rng, logits, axis=1, shape=(num_samples, probs.shape[0]))
  hit = jnp.any(jax.nn.one_hot(idx, probs.shape[1], dtype=bool), axis=0)
  return hit & has_neg


def multi_similarity_miner(embeddings, labels, *, ref_embeddings=None, ref_labels=None,
                           ref_mask=None, pair_mask=None, epsilon: float = 0.1,
                           distance: str = "dot"):
  """Multi-similarity pair mining (Wang et al.), PML ``MultiSimilarityMiner(epsilon)`` semantics.

  With similarities ``S`` (``distance="dot"``, PML's cosine default), for anchor ``i``:

  * negative ``k`` is kept iff ``S_ik + epsilon > min_{j in P_i} S_ij`` (harder than the hardest
    positive, up to epsilon);
  * positive ``j`` is kept iff ``S_ij - epsilon < max_{k in N_i} S_ik``.

  For a distance the inequalities flip (``d_ik - epsilon < max_P d``, ``d_ij + epsilon > min_N
  d``), as in PML. An anchor without positives keeps no negative and one without negatives keeps
  no positive.

  Args:
    epsilon: the mining slack, >= 0.

  Returns:
    ``(pos_mask, neg_mask)``: ``[B, R]`` bool mined positive and negative pairs.
  """
  core.check_range("epsilon", epsilon, low=0.0)
  pairs = core.check_inputs(embeddings, labels, ref_embeddings, ref_labels, ref_mask, pair_mask)
  close = _closeness(pairs, distance)
  hardest_pos = jnp.min(jnp.where(pairs.pos, close, jnp.inf), axis=1, keepdims=True)
  hardest_neg = jnp.max(jnp.where(pairs.neg, close, -jnp.inf), axis=1, keepdims=True)
  return (pairs.pos & (close - epsilon < hardest_neg),
          pairs.neg & (close + epsilon > hardest_pos))


class NegativeChoice(NamedTuple):
  """One negative per positive pair.

  Attributes:
    index: ``[B, R]`` int32; ``index[i, j]`` is the reference index of the negative chosen for
      the positive pair ``(i, j)`` (0 where ``valid`` is False).
    valid: ``[B, R]`` bool; True for positive pairs that got a negative.
  """
  index: Array
  valid: Array

  def triplet_mask(self) -> Array:
    """``[B, R, R]`` bool: ``t[i, j, k]`` iff ``k`` is the negative chosen for ``(i, j)``."""
    r = self.index.shape[1]
    return jax.nn.one_hot(self.index, r, dtype=bool) & self.valid[:, :, None]

  def pair_mask(self) -> Array:
    """``[B, R]`` bool for a pair loss's ``pair_mask=``: the positive pairs that got a negative
    and the chosen negative pairs. With ``distinct=True`` (each positive of an anchor got its own
    negative) anchor ``i`` has as many negative pairs as positive pairs, the balance PROFS and
    Wu et al. ask for; with ``distinct=False`` all positives of ``i`` share one negative, which
    a mask holds once (use :meth:`negative_counts` to weight it)."""
    b, r = self.index.shape
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, r))
    # Scatter-add of the choices: [B, R] work, no [B, R, R] one-hot.
    hits = jnp.zeros((b, r), jnp.int32).at[rows, self.index].add(self.valid.astype(jnp.int32))
    return self.valid | (hits > 0)

  def negative_counts(self) -> Array:
    """``[B, R]`` int32: how many positive pairs of anchor ``i`` chose negative ``k``, i.e. the
    multiplicity with which each negative pair enters a loss balanced one-to-one."""
    return jnp.sum(self.triplet_mask(), axis=1, dtype=jnp.int32)


def hardest_negative_per_positive(embeddings, labels, *, ref_embeddings=None, ref_labels=None,
                                  ref_mask=None, pair_mask=None, distance: str = "euclidean",
                                  distinct: bool = False) -> NegativeChoice:
  """One hard negative per positive pair, as PROFS and CCP use it ("we sample one negative pair
  for each positive pair", which balances positive and negative pairs).

  ``distinct=False``: every positive pair ``(i, j)`` gets the negative of ``i`` closest to ``i``
  (the same one for all ``j``). ``distinct=True``: the ``r``-th positive of ``i`` (in reference
  order) gets the ``r``-th closest negative of ``i``, so anchor ``i`` uses its ``|P_i|`` hardest
  negatives once each; positives beyond the number of negatives get none.

  Returns:
    :class:`NegativeChoice` ``(index [B, R] int32, valid [B, R] bool)``; ``valid`` is False for
    non-positive pairs and for anchors without a negative.
  """
  pairs = core.check_inputs(embeddings, labels, ref_embeddings, ref_labels, ref_mask, pair_mask)
  close = _closeness(pairs, distance)
  if not distinct:
    idx = jnp.argmax(jnp.where(pairs.neg, close, -jnp.inf), axis=1).astype(jnp.int32)
    valid = pairs.pos & jnp.any(pairs.neg, axis=1, keepdims=True)
    return NegativeChoice(jnp.where(valid, idx[:, None], 0), valid)
  # Negatives of each anchor from closest to farthest (non-negatives sorted last).
  order = jnp.argsort(jnp.where(pairs.neg, -close, jnp.inf), axis=1, stable=True)
  rank = jnp.cumsum(pairs.pos, axis=1) - 1  # rank of positive j among i's positives
  num_neg = jnp.sum(pairs.neg, axis=1, keepdims=True)
  valid = pairs.pos & (rank < num_neg)
  idx = jnp.take_along_axis(order, jnp.clip(rank, 0, order.shape[1] - 1), axis=1)
  return NegativeChoice(jnp.where(valid, idx, 0).astype(jnp.int32), valid)
