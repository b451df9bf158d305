"""Shared pieces of every loss: input checks, pair masks, distances, reductions.

Every loss in :mod:`dmljax.losses` has the call shape (pytorch-metric-learning's, made functional)::

    loss(embeddings, labels, *, ref_embeddings=None, ref_labels=None, ref_mask=None,
         <hyperparameters>, reduction=...) -> scalar jax.Array

* Without references the batch is its own reference set and self-pairs (i, i) are excluded.
* With references every (embedding, reference) pair counts; nothing is excluded by position.
  ``ref_mask`` (bool, shape ``[R]``) marks reference slots that hold no data yet (a cross-batch
  memory that is not full): masked slots take part in no pair.
* ``pair_mask`` (bool, shape ``[B, R]``; ``[B, B]`` without references), optional on every pair
  loss and miner: the pairs a miner (or a framework) selected. It is ANDed with the loss's own
  masks, so a pair outside it is neither a positive nor a negative pair of any term; everything
  else about the loss is unchanged. Being a mask (not an index list) it keeps shapes static.

All arithmetic is done in float32 whatever the input dtype (bfloat16 works). Shapes are static
and nothing branches on values, so every loss compiles once per input shape and is safe under
``jit``, ``grad`` and ``vmap``. Distances are formed from matrix products, never from a
``[B, R, D]`` difference tensor.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from dmljax import numerics

Array = jax.Array

#: Added inside square roots and norms so that gradients stay finite at zero.
EPS = numerics.EPS
#: Stand-in for -inf in masked log-sum-exp; finite so that gradients never become NaN.
NEG_INF = -1e30

REDUCTIONS = ("mean_nonzero", "mean", "sum", "none")


class Pairs(NamedTuple):
  """The checked inputs of a loss and the masks of its pairs.

  Attributes:
    emb: ``[B, D]`` float32 embeddings.
    labels: ``[B]`` int32 labels.
    ref: ``[R, D]`` float32 references (``emb`` itself when none were given).
    ref_labels: ``[R]`` int32 reference labels.
    valid: ``[B, R]`` bool, pairs that exist (self-pairs and empty memory slots removed).
    pos: ``[B, R]`` bool, valid pairs of the same class.
    neg: ``[B, R]`` bool, valid pairs of different classes.
    self_ref: static bool, True when the batch is its own reference set.
  """
  emb: Array
  labels: Array
  ref: Array
  ref_labels: Array
  valid: Array
  pos: Array
  neg: Array
  self_ref: bool


def _check_labels(labels, name: str):
  dtype = getattr(labels, "dtype", None)
  if dtype is None:
    labels = np.asarray(labels)
    dtype = labels.dtype
  if not (jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.bool_)):
    raise ValueError(
        f"{name} must hold integer class ids, got dtype {dtype}; cast them with "
        f"labels.astype(jnp.int32).")
  return labels


def check_inputs(embeddings, labels, ref_embeddings=None, ref_labels=None, ref_mask=None,
                 pair_mask=None) -> Pairs:
  """Validates the standard loss inputs and builds the pair masks.

  ``pair_mask`` (optional ``[B, R]`` bool, ``R = B`` without references) is ANDed with ``valid``,
  ``pos`` and ``neg``: the pairs it leaves out exist for no loss term.

  Raises:
    ValueError: on rank or shape mismatch between embeddings, labels and references, or on
      labels that are not integers. All checks are on static shapes/dtypes, so they run at
      trace time and never inside the compiled computation.
  """
  if getattr(embeddings, "ndim", None) is None:
    embeddings = jnp.asarray(embeddings)
  if embeddings.ndim != 2:
    raise ValueError(f"embeddings must have shape [batch, dim], got shape {embeddings.shape}.")
  labels = _check_labels(labels, "labels")
  if getattr(labels, "ndim", None) != 1 or labels.shape[0] != embeddings.shape[0]:
    raise ValueError(
        f"labels must have shape [batch] = [{embeddings.shape[0]}] to match embeddings "
        f"{tuple(embeddings.shape)}, got {tuple(np.shape(labels))}.")
  emb = jnp.asarray(embeddings, jnp.float32)
  labels = jnp.asarray(labels, jnp.int32)
  if (ref_embeddings is None) != (ref_labels is None):
    raise ValueError("ref_embeddings and ref_labels must be given together (or both left None).")
  if ref_embeddings is None:
    if ref_mask is not None:
      raise ValueError("ref_mask needs ref_embeddings and ref_labels.")
    b = emb.shape[0]
    valid = ~jnp.eye(b, dtype=bool)
    same = labels[:, None] == labels[None, :]
    valid = _and_pair_mask(valid, pair_mask)
    return Pairs(emb, labels, emb, labels, valid, same & valid, ~same & valid, True)
  if getattr(ref_embeddings, "ndim", None) is None:
    ref_embeddings = jnp.asarray(ref_embeddings)
  if ref_embeddings.ndim != 2 or ref_embeddings.shape[1] != emb.shape[1]:
    raise ValueError(
        f"ref_embeddings must have shape [refs, {emb.shape[1]}] to match embeddings "
        f"{tuple(emb.shape)}, got {tuple(ref_embeddings.shape)}.")
  ref_labels = _check_labels(ref_labels, "ref_labels")
  if getattr(ref_labels, "ndim", None) != 1 or ref_labels.shape[0] != ref_embeddings.shape[0]:
    raise ValueError(
        f"ref_labels must have shape [{ref_embeddings.shape[0]}] to match ref_embeddings, "
        f"got {tuple(np.shape(ref_labels))}.")
  ref = jnp.asarray(ref_embeddings, jnp.float32)
  ref_labels = jnp.asarray(ref_labels, jnp.int32)
  r = ref.shape[0]
  if ref_mask is None:
    slot_ok = jnp.ones((r,), bool)
  else:
    if np.shape(ref_mask) != (r,):
      raise ValueError(f"ref_mask must have shape [{r}] (one flag per reference), "
                       f"got {tuple(np.shape(ref_mask))}.")
    slot_ok = jnp.asarray(ref_mask, bool)
  valid = jnp.broadcast_to(slot_ok[None, :], (emb.shape[0], r))
  valid = _and_pair_mask(valid, pair_mask)
  same = labels[:, None] == ref_labels[None, :]
  return Pairs(emb, labels, ref, ref_labels, valid, same & valid, ~same & valid, False)


def _and_pair_mask(valid, pair_mask):
  """``valid & pair_mask`` after a static shape check (``pair_mask`` None: ``valid``)."""
  if pair_mask is None:
    return valid
  if np.shape(pair_mask) != tuple(valid.shape):
    raise ValueError(f"pair_mask must have shape [batch, refs] = {list(valid.shape)} (one flag "
                     f"per (embedding, reference) pair), got {list(np.shape(pair_mask))}.")
  return valid & jnp.asarray(pair_mask, bool)


def check_triplet_mask(triplet_mask, pairs: Pairs):
  """``triplet_mask`` as a ``[B, R, R]`` bool array (None stays None); ValueError on its shape."""
  if triplet_mask is None:
    return None
  b, r = pairs.valid.shape
  if np.shape(triplet_mask) != (b, r, r):
    raise ValueError(f"triplet_mask must have shape [batch, refs, refs] = {[b, r, r]} (anchor, "
                     f"positive, negative), got {list(np.shape(triplet_mask))}.")
  return jnp.asarray(triplet_mask, bool)


def check_range(name: str, value, *, low=None, high=None, low_inclusive=True, high_inclusive=True):
  """Raises ValueError if a (static, Python-number) hyperparameter is out of range.

  Traced values (e.g. a learnable ``beta`` passed as an array) are not checked.
  """
  if isinstance(value, jax.core.Tracer):
    return
  try:
    v = float(np.asarray(value).min()) if np.ndim(value) else float(value)
    vmax = float(np.asarray(value).max()) if np.ndim(value) else v
  except (TypeError, jax.errors.ConcretizationTypeError):
    return
  if low is not None and (v < low or (v == low and not low_inclusive)):
    bound = ">=" if low_inclusive else ">"
    raise ValueError(f"{name} must be {bound} {low}, got {value}.")
  if high is not None and (vmax > high or (vmax == high and not high_inclusive)):
    bound = "<=" if high_inclusive else "<"
    raise ValueError(f"{name} must be {bound} {high}, got {value}.")


def check_reduction(reduction: str, allowed=REDUCTIONS):
  if reduction not in allowed:
    raise ValueError(f"reduction must be one of {list(allowed)}, got {reduction!r}.")


# ----------------------------------------------------------------------------- normalisation


# The normalisations live in the leaf module :mod:`dmljax.numerics` (models use them too and
# should not import a loss module); re-exported here, where the losses document them.
l2_normalize = numerics.l2_normalize
bounded_normalize = numerics.bounded_normalize


# ----------------------------------------------------------------------------- distances


def dot_similarity(a: Array, b: Array) -> Array:
  """``[N, M]`` inner products; equals cosine similarity on unit-norm inputs (PML's default)."""
  return jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST)


def squared_distance(a: Array, b: Array) -> Array:
  """``[N, M]`` squared Euclidean distances from matrix products (no ``[N, M, D]`` tensor)."""
  # The factor -2 scales the small [N, D] operand rather than the [N, M] product: one pass
  # over the big matrix fewer, forward and backward (the result is bit-identical: x2 is exact).
  sq = (jnp.sum(a * a, axis=1)[:, None] + jnp.sum(b * b, axis=1)[None, :]
        + dot_similarity(-2.0 * a, b))
  return jnp.maximum(sq, 0.0)


def safe_sqrt(x: Array) -> Array:
  """``sqrt(x)`` whose gradient at 0 is 0 instead of inf (as for a pair with itself)."""
  pos = x > EPS
  # max(x, EPS) keeps the untaken branch's gradient finite, like a second where, in one op less.
  return jnp.where(pos, jnp.sqrt(jnp.maximum(x, EPS)), 0.0)


def euclidean_distance(a: Array, b: Array) -> Array:
  """``[N, M]`` Euclidean distances with finite gradients at zero distance."""
  return safe_sqrt(squared_distance(a, b))


# ----------------------------------------------------------------------------- reductions


def masked_logsumexp(x: Array, mask: Array, axis: int = -1, *, add_one: bool = False,
                     keepdims: bool = False) -> Array:
  """``log(sum_{mask} exp(x))`` (plus ``exp(0)`` when ``add_one``), stable and NaN-free.

  A row with nothing in the mask gives ``NEG_INF``-like large negative values (or exactly 0
  with ``add_one``: ``log(1 + 0)``), and zero gradient for every masked entry.
  """
  x = jnp.where(mask, x, NEG_INF)
  if add_one:
    zeros = jnp.zeros(x.shape[:axis % x.ndim] + (1,) + x.shape[axis % x.ndim + 1:], x.dtype)
    x = jnp.concatenate([x, zeros], axis=axis)
  m = jax.lax.stop_gradient(jnp.max(x, axis=axis, keepdims=True))
  m = jnp.where(m <= NEG_INF / 2, 0.0, m)
  s = jnp.sum(jnp.exp(x - m), axis=axis, keepdims=True)
  out = jnp.log(jnp.maximum(s, 1e-38)) + m
  if not add_one:
    # Rows with an empty mask: keep a large negative finite value.
    any_ = jnp.any(mask, axis=axis, keepdims=True)
    out = jnp.where(any_, out, NEG_INF)
  return out if keepdims else jnp.squeeze(out, axis=axis)


def _total(x: Array) -> Array:
  """Sum of all entries, taken along the last (contiguous) axis first, then over the rest.

  XLA:CPU is sensitive to reduction layout: on a ``[B, R]`` matrix, row sums run up to ~100x
  faster than column sums (docs/benchmarks_losses.md). Spelling the total as row sums then a
  small final sum keeps every reduction on the contiguous axis whatever XLA does with it.
  """
  if x.ndim >= 2:
    x = jnp.sum(x, axis=-1)
  return jnp.sum(x)


def masked_mean(x: Array, mask: Array, axis=None) -> Array:
  """Mean over ``mask`` entries; 0 (with zero gradient) when the mask is empty.

  With a boolean mask and ``axis=None`` (the losses' case) ``where`` is used rather than
  ``x * mask``: entries outside the mask cannot leak an inf or NaN into the result.
  """
  mask = jnp.asarray(mask)
  if axis is not None or mask.dtype != jnp.bool_:
    # Partial reductions and weighted (non-boolean) masks: the plain weighted mean.
    mask = mask.astype(jnp.float32)
    return jnp.sum(x * mask, axis=axis) / jnp.maximum(jnp.sum(mask, axis=axis), 1.0)
  shape = jnp.broadcast_shapes(jnp.shape(x), mask.shape)
  total = _total(jnp.where(mask, x, 0.0))
  count = _total(jnp.broadcast_to(mask, shape).astype(jnp.float32))
  return total / jnp.maximum(count, 1.0)


def mean_nonzero(x: Array, mask: Array) -> Array:
  """PML's AvgNonZeroReducer: mean over the entries in ``mask`` whose loss is > 0; 0 if none.

  Performance note (a hot path: contrastive against an 8,192-slot memory, see
  docs/benchmarks_losses.md). ``t`` keeps exactly the selected entries (``mask & (x > 0)``) and
  zeroes the rest, so the selected entries are exactly those with ``t > 0``: the count is taken
  from ``t`` rather than from the boolean selection. Re-using the selection for both the sum
  and the count made XLA:CPU recompute the masks in four separate ``[B, R]`` loop fusions and
  ran 2-3x slower (forward of contrastive, B=256, R=8,192, one thread: 60-90 ms vs ~25 ms). The
  gradient is unchanged: ``selected / count`` (the count is piecewise constant).
  """
  t = jnp.where(mask & (x > 0), x, 0.0)
  count = _total((t > 0).astype(jnp.float32))
  return _total(t) / jnp.maximum(count, 1.0)


def reduce(x: Array, mask: Array, reduction: str) -> Array:
  """Reduces per-term losses ``x`` over the entries in ``mask``.

  ``mean_nonzero``: mean over positive terms (PML AvgNonZeroReducer); ``mean``: mean over
  ``mask``; ``sum``: sum over ``mask``; ``none``: ``x`` with entries outside ``mask`` zeroed.
  Empty selections reduce to 0.
  """
  check_reduction(reduction)
  if reduction == "mean_nonzero":
    return mean_nonzero(x, mask)
  if reduction == "mean":
    return masked_mean(x, mask)
  if reduction == "sum":
    return _total(jnp.where(mask, x, 0.0))
  return jnp.where(mask, x, 0.0)
