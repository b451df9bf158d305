"""Pair-based metric-learning losses: every (embedding, reference) pair is a term.

All losses share the call shape of :mod:`dmljax.losses.core`::

    loss(embeddings, labels, *, ref_embeddings=None, ref_labels=None, ref_mask=None,
         <hyperparameters>, reduction=...) -> jax.Array

Without references the batch is its own reference set and self-pairs are excluded; with
references every (embedding, reference) pair counts and ``ref_mask`` removes empty memory slots.
Names, hyperparameters and default reductions follow pytorch-metric-learning (PML) 2.x, so that
on unit-norm inputs each loss equals PML's loss with the same hyperparameters (value and
gradient). Where PML departs from the paper that defines a loss, or has no such loss, the paper
is followed and the docstring says how the two differ.

Embeddings are used as given (PML L2-normalises inside its distances by default; here that is
the model head's job, see :func:`dmljax.losses.core.l2_normalize`). So on unit-norm inputs the
values agree with PML and so do the gradients' components tangent to the unit sphere (PML's
gradient includes the Jacobian of its internal normalisation; with ``l2_normalize`` applied
before the loss the tangent part is all that reaches the model). ``tests/test_losses_pair.py``
checks both.

Distances (``distance=`` where a loss takes it):

* ``"euclidean"`` — ``||x - y||`` (PML ``LpDistance()``, default of the distance-based losses);
* ``"squared_euclidean"`` — ``||x - y||^2`` (PML ``LpDistance(power=2)``);
* ``"dot"`` — the similarity ``<x, y>``: PML's ``CosineSimilarity()`` on unit-norm inputs.
  With a similarity, "farther apart" means "less similar": margins flip sides exactly as in PML.

Reductions (``reduction=``) are those of :func:`dmljax.losses.core.reduce`:

* ``"mean_nonzero"`` — PML ``AvgNonZeroReducer``: mean over the terms whose loss is > 0. For
  losses made of a positive-pair part and a negative-pair part (contrastive, binomial deviance),
  each part is reduced on its own and the two are summed, as PML does with sub-losses.
* ``"mean"`` — PML ``MeanReducer``: mean over all terms (again per part, then summed).
* ``"sum"`` — sum over all terms.
* ``"none"`` — the per-term array, zero outside the terms that exist; each docstring gives its
  shape (``[B, R]`` per pair, ``[B, R, R]`` per triplet, ``[B]`` per anchor).

Mined pairs (``pair_mask=``, every loss here): an optional ``[B, R]`` bool mask (``[B, B]``
without references), e.g. from :mod:`dmljax.losses.miners`, ANDed with the loss's own positive
and negative masks (see :func:`dmljax.losses.core.check_inputs`): a pair outside it takes part
in no term, as a positive, as a negative, or in a normaliser (supcon's denominator, the pair
count of ``reduction="mean"``). With an all-True mask every loss is unchanged. The triplet loss
also takes ``triplet_mask=`` (``[B, R, R]`` over anchor, positive, negative), ANDed with its
triplets. Where a loss combines pairs in a less direct way (N-pair, angular) its docstring says
which pair each mask entry gates. PROFS (``dmljax.frameworks.profs``) uses both for its
adaptations of section 5.3.

An empty set of terms (no positive or negative pair, one class only, singleton classes, an
all-False ``ref_mask`` or ``pair_mask``) reduces to exactly 0 with zero (finite) gradients unless
the docstring says otherwise. No loss builds a ``[B, R, D]`` tensor; only ``triplet_margin`` builds a
``[B, R, R]`` one (all triplets, as PML does) and ``angular`` an ``[R, R]`` one (with references).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from dmljax.losses import core

__all__ = [
    "contrastive",
    "contrastive_xbm",
    "triplet_margin",
    "lifted_structure",
    "generalized_lifted_structure",
    "npairs",
    "angular",
    "margin",
    "multi_similarity",
    "binomial_deviance",
    "ntxent",
    "supcon",
    "circle",
]

Array = jax.Array

DISTANCES = ("euclidean", "squared_euclidean", "dot")
_SPLIT_REDUCTIONS = ("mean_nonzero", "mean", "sum", "none")


# ----------------------------------------------------------------------------- helpers


def _check_distance(distance: str):
  if distance not in DISTANCES:
    raise ValueError(f"distance must be one of {list(DISTANCES)}, got {distance!r}.")


def _scores(a: Array, b: Array, distance: str):
  """``[N, M]`` distances (or similarities) and whether larger means closer (``inverted``)."""
  if distance == "euclidean":
    return core.euclidean_distance(a, b), False
  if distance == "squared_euclidean":
    return core.squared_distance(a, b), False
  return core.dot_similarity(a, b), True


def _check_margins(distance: str, pos_margin, neg_margin):
  """Margins on a distance must be >= 0; on a similarity (``"dot"``) any value is meaningful."""
  if distance != "dot":
    core.check_range("pos_margin", pos_margin, low=0.0)
    core.check_range("neg_margin", neg_margin, low=0.0)


def _farther(x, y, inverted: bool):
  """How much farther apart ``x`` is than ``y``: ``x - y`` for distances, ``y - x`` for similarity.

  This is PML's ``distance.margin(x, y)``; every margin below is written with it so that one
  formula serves distances and similarities.
  """
  return y - x if inverted else x - y


def _split_reduce(pos_terms: Array, neg_terms: Array, pos: Array, neg: Array, reduction: str):
  """Reduces a loss made of per-pair positive and negative terms (``[B, R]`` each)."""
  if reduction == "none":
    return jnp.where(pos, pos_terms, jnp.where(neg, neg_terms, 0.0))
  return core.reduce(pos_terms, pos, reduction) + core.reduce(neg_terms, neg, reduction)


#: Reference columns per block in :func:`_blockwise_split_reduce` under the CPU sizing (a
#: ``[B, 1024]`` float32 block of one intermediate is 1 MiB at B = 256: the few of them in flight
#: stay in cache); used above ``2 * _BLOCK_REFS`` references.
_BLOCK_REFS = 1024
#: ``[B, R]`` float32 intermediates the unblocked reduction keeps alive at once (forward and
#: backward: distances, masked terms, counts, gradients): what the accelerator sizing budgets for.
_LIVE_INTERMEDIATES = 12


def pair_ref_block(batch: int, num_refs: int, ref_block=None, sizing: str = "auto",
                   memory_budget=None) -> int:
  """References per block of a long-reference reduction (0: a single pass over all of them).

  ``ref_block``: an int >= 0 is used as given (0 = single pass); None picks by ``sizing``
  (:mod:`dmljax.kernels.sizing`; "auto" = by JAX's default backend): the CPU sizing takes blocks
  of 1,024 above 2,048 references (what keeps XLA:CPU's intermediates in cache), the accelerator
  sizing a single pass when ``_LIVE_INTERMEDIATES`` ``[B, R]`` float32 arrays fit the memory
  budget (SOP's ~35,000 proxies at batch 32: ~54 MB), else the largest equal blocks that do.
  """
  if ref_block is not None:
    if isinstance(ref_block, bool) or not isinstance(ref_block, int) or ref_block < 0:
      raise ValueError(f"ref_block must be an integer >= 0 (0: a single pass over the "
                       f"references), got {ref_block!r}.")
    return 0 if ref_block >= num_refs else ref_block
  from dmljax.kernels import sizing as sizing_lib  # pylint: disable=g-import-not-at-top
  if sizing_lib.resolve(sizing) == "cpu":
    return _BLOCK_REFS if num_refs > 2 * _BLOCK_REFS else 0
  budget = sizing_lib.memory_budget(budget=memory_budget)
  steps = 1
  while 4 * _LIVE_INTERMEDIATES * batch * -(-num_refs // steps) > budget and steps < num_refs:
    steps *= 2
  return 0 if steps == 1 else -(-num_refs // steps)


def _blockwise_split_reduce(term_fn, emb: Array, ref: Array, pos: Array, neg: Array,
                            reduction: str, block: int = _BLOCK_REFS) -> Array:
  """:func:`_split_reduce` over reference blocks, for long reference sets (a memory bank).

  Same value as ``_split_reduce(*term_fn(emb, ref), pos, neg, reduction)`` (up to float
  summation order) for ``reduction`` in mean_nonzero / mean / sum. Why: with the whole ``[B, R]``
  matrix at once (R = 8,192) XLA:CPU streams about ten ``[B, R]`` intermediates (distances,
  masked terms, counts, gradient) through main memory; a scan over blocks of ``block``
  references keeps them in cache (~30% faster forward + backward, one thread). Each block is
  rematerialised in the backward pass (``jax.checkpoint``), so memory stays ``O(B x block)``.
  Padded reference slots are in neither mask, so they add nothing.
  """
  b, r = pos.shape
  n = -(-r // block)
  pad = n * block - r
  ref = jnp.pad(ref, ((0, pad), (0, 0))).reshape(n, block, ref.shape[1])

  def blocks(mask):  # [B, R] -> [n, B, block]: one block per scan step
    return jnp.pad(mask, ((0, 0), (0, pad))).reshape(b, n, block).swapaxes(0, 1)

  @jax.checkpoint
  def block_sums(ref_blk, pos_blk, neg_blk):
    out = []
    for terms, mask in zip(term_fn(emb, ref_blk), (pos_blk, neg_blk)):
      if reduction == "mean_nonzero":  # as core.mean_nonzero: count the kept terms from t > 0
        t = jnp.where(mask & (terms > 0), terms, 0.0)
        count = t > 0
      else:
        t, count = jnp.where(mask, terms, 0.0), mask
      out.append((jnp.sum(jnp.sum(t, axis=1)), jnp.sum(jnp.sum(count.astype(jnp.float32), axis=1))))
    return out

  def step(acc, xs):
    return jax.tree.map(jnp.add, acc, block_sums(*xs)), None

  zero = jnp.zeros((), jnp.float32)
  init = [(zero, zero), (zero, zero)]
  (sp, cp), (sn, cn) = jax.lax.scan(step, init, (ref, blocks(pos), blocks(neg)))[0]
  if reduction == "sum":
    return sp + sn
  return sp / jnp.maximum(cp, 1.0) + sn / jnp.maximum(cn, 1.0)


def _lse_or_zero(x: Array, mask: Array, add_one: bool = False) -> Array:
  """Row-wise masked log-sum-exp that is 0 for rows with nothing in the mask (PML's convention)."""
  out = core.masked_logsumexp(x, mask, axis=1, add_one=add_one)
  return jnp.where(jnp.any(mask, axis=1), out, 0.0)


# ----------------------------------------------------------------------------- pair losses


def contrastive(embeddings, labels, *, ref_embeddings=None, ref_labels=None, ref_mask=None,
                pair_mask=None,
                pos_margin: float = 0.0, neg_margin: float = 1.0, distance: str = "euclidean",
                power: float = 1.0, reduction: str = "mean_nonzero", ref_block=None) -> Array:
  """Contrastive loss (Hadsell et al. 2006), generalised with a positive margin.

  Per pair, with ``d`` the distance::

      positive:  [d - pos_margin]_+ ** power        negative:  [neg_margin - d]_+ ** power

  (with ``distance="dot"`` the similarity ``s`` replaces ``d`` and the sides flip:
  ``[pos_margin - s]_+`` and ``[s - neg_margin]_+``, as PML's ``CosineSimilarity``).

  Matches PML ``ContrastiveLoss(pos_margin, neg_margin)`` (``LpDistance``, ``AvgNonZeroReducer``:
  the mean over the non-zero positive terms plus the mean over the non-zero negative terms).

  The losses of the papers dmljax implements:

  * CCP (Gürbüz et al.) **C2**, "contrastive with positive margin" (Wu et al.'s generalised
    contrastive loss ``(iota_{y,y'} (||x - x'|| - beta) + alpha)_+``): this function as is, with
    ``(pos_margin, neg_margin) = (m+, m-)``, e.g. ``(0, 0.3841)`` on CUB, ``(0.2652, 0.5409)`` on
    Cars196, ``(0.2858, 0.5130)`` on In-shop and SOP (CCP supplement), averaged over non-zero terms.
  * CCP **C1**, Hadsell's contrastive loss as implemented by XBM (the CCP supplement says C1
    adopts XBM's implementation, margin 0.5), is :func:`contrastive_xbm`, not a setting of this
    function: XBM's negative term is ``s`` itself wherever ``s > 0.5`` (not the hinge
    ``[s - 0.5]_+``), and it drops positive pairs with ``s >= 1 - 1e-5``.
    ``contrastive(..., distance="dot", pos_margin=1.0, neg_margin=0.5, reduction="sum") / B``
    has the same gradient except at those near-duplicate positives, but a value lower by
    ``0.5 x (number of negatives above the margin) / B``.
  * PROFS eq. (3.1), ``y d^2 + (1 - y) [eps - d]_+^2`` averaged over all pairs: ``power=2``,
    ``pos_margin=0``, ``neg_margin=eps`` and ``reduction="sum"`` divided by the number of pairs
    (``reduction="mean"`` instead averages each part separately, as PML's ``MeanReducer``).

  Args:
    embeddings: ``[B, D]``; labels: ``[B]`` int. References as in :mod:`dmljax.losses.core`.
    pos_margin: positive pairs are not penalised within this distance (must be >= 0 for a
      distance; any value for ``"dot"``).
    neg_margin: negative pairs are penalised within this distance (>= 0 for a distance).
    distance: one of ``"euclidean"`` (default), ``"squared_euclidean"``, ``"dot"``.
    power: exponent applied to each hinge (1 = PML/CCP, 2 = Hadsell/PROFS); >= 1.
    reduction: ``"mean_nonzero"`` (default), ``"mean"``, ``"sum"`` or ``"none"`` (``[B, R]``
      per-pair losses, zero on pairs that do not exist).
    ref_block: long reference sets (proxies, a memory bank) are reduced in blocks of this many
      references, 0 = in one pass; None (default) sizes by backend (:func:`pair_ref_block`:
      blocks of 1,024 above 2,048 references on CPU, one pass on GPU/TPU where memory allows).
      The value is the same either way, up to float summation order.

  Returns:
    The loss (0 when there is no pair with a non-zero term).
  """
  _check_distance(distance)
  core.check_reduction(reduction, _SPLIT_REDUCTIONS)
  _check_margins(distance, pos_margin, neg_margin)
  core.check_range("power", power, low=1.0)
  p = core.check_inputs(embeddings, labels, ref_embeddings, ref_labels, ref_mask, pair_mask)

  def terms(emb, ref):
    d, inv = _scores(emb, ref, distance)
    pos_terms = jax.nn.relu(_farther(d, pos_margin, inv))
    neg_terms = jax.nn.relu(_farther(neg_margin, d, inv))
    if power != 1:
      pos_terms, neg_terms = pos_terms ** power, neg_terms ** power
    return pos_terms, neg_terms

  block = pair_ref_block(p.emb.shape[0], p.ref.shape[0], ref_block)
  if reduction != "none" and block:
    # Long reference sets (proxies, cross-batch memory): reduce block by block, see the helper.
    return _blockwise_split_reduce(terms, p.emb, p.ref, p.pos, p.neg, reduction, block)
  return _split_reduce(*terms(p.emb, p.ref), p.pos, p.neg, reduction)


def contrastive_xbm(embeddings, labels, *, ref_embeddings=None, ref_labels=None, ref_mask=None,
                    pair_mask=None,
                    margin: float = 0.5, pos_eps: float = 1e-5, reduction: str = "mean") -> Array:
  """Contrastive loss as XBM's authors implement it (Wang et al. 2020): CCP's **C1**.

  On the similarity ``s`` (cosine on unit-norm embeddings), for each anchor ``i`` (a batch row)::

      loss_i = sum_{j in P(i), s_ij < 1 - pos_eps} (1 - s_ij) + sum_{j in N(i), s_ij > margin} s_ij

  and the loss is ``(1/B) sum_i loss_i``: summed over all pairs and divided by the number of
  batch rows ``B``, also when the references are a memory bank or proxies (XBM's ``C1-XBM`` and
  CCP's ``C1-CCP``, margin 0.5 on every dataset). Two details set it apart from
  :func:`contrastive` with ``distance="dot"``: a negative above the margin contributes ``s``, not
  ``s - margin`` (the value jumps by ``margin`` as a pair crosses it; the gradient is the same),
  and positives within ``pos_eps`` of similarity 1 (duplicates, or a sample and its own copy in
  the memory) are left out, value and gradient. As in every pair loss here, self-pairs are
  excluded when there are no references, and ``ref_mask`` removes empty memory slots.

  Registered as ``"contrastive_xbm"`` in ``dmljax.losses.LOSSES`` / ``PAIR_LOSSES``, so the
  frameworks can name it (``C1-CCP``: the ``ccp`` framework with this loss; ``C1-XBM``: the
  loss against a cross-batch memory).

  Args:
    embeddings: ``[B, D]``; labels: ``[B]`` int. References as in :mod:`dmljax.losses.core`.
    margin: negatives count only above this similarity (any real value; XBM and CCP use 0.5).
    pos_eps: positives count only below similarity ``1 - pos_eps`` (>= 0).
    reduction: over the per-anchor sums ``loss_i``: ``"mean"`` (default, XBM's ``/ B``),
      ``"sum"``, ``"mean_nonzero"`` (over anchors with a nonzero sum) or ``"none"`` (``[B]``).

  Returns:
    The loss (0 when no pair contributes).
  """
  core.check_reduction(reduction)
  core.check_range("pos_eps", pos_eps, low=0.0)
  p = core.check_inputs(embeddings, labels, ref_embeddings, ref_labels, ref_mask, pair_mask)
  s = core.dot_similarity(p.emb, p.ref)
  pos_kept = p.pos & (s < 1.0 - pos_eps)
  neg_kept = p.neg & (s > margin)
  terms = jnp.where(pos_kept, 1.0 - s, jnp.where(neg_kept, s, 0.0))
  per_anchor = jnp.sum(terms, axis=1)
  return core.reduce(per_anchor, jnp.ones(per_anchor.shape, bool), reduction)


def triplet_margin(embeddings, labels, *, ref_embeddings=None, ref_labels=None, ref_mask=None,
                   pair_mask=None, triplet_mask=None,
                   margin: float = 0.05, swap: bool = False, smooth_loss: bool = False,
                   distance: str = "euclidean", squared: bool = False,
                   reduction: str = "mean_nonzero") -> Array:
  """Triplet margin loss over all valid triplets (Weinberger & Saul 2009; Schroff et al. 2015).

  For every anchor ``a`` (a batch entry), positive ``p`` and negative ``n`` (references)::

      loss(a, p, n) = [d(a, p) - d(a, n) + margin]_+      (softplus(.) if smooth_loss)

  Matches PML ``TripletMarginLoss(margin, swap, smooth_loss, triplets_per_anchor="all")`` with
  ``AvgNonZeroReducer`` (mean over the triplets with a non-zero loss). ``swap=True`` replaces
  ``d(a, n)`` by ``min(d(a, n), d(p, n))`` (Balntas et al. 2016); with references ``d(p, n)`` is
  the distance between the two references (PML indexes its batch-by-reference matrix there,
  which is only meaningful without references).

  PROFS eq. (3.2), ``[d_ap^2 - d_an^2 + eps]_+`` averaged over all triplets, is
  ``squared=True, margin=eps, reduction="mean"``.

  ``pair_mask`` gates the (anchor, positive) and (anchor, negative) pairs; ``triplet_mask``
  (``[B, R, R]``, e.g. :meth:`dmljax.losses.miners.NegativeChoice.triplet_mask`: one hard
  negative per positive pair) the triplets themselves. Both are ANDed with the valid triplets.

  Args:
    margin: the desired gap between the positive and the negative distance (>= 0).
    swap: use the positive-negative distance when it is the smaller.
    smooth_loss: ``softplus`` instead of the hinge.
    distance: ``"euclidean"`` (default), ``"squared_euclidean"`` or ``"dot"``.
    squared: shorthand for ``distance="squared_euclidean"`` (PROFS eq. 3.2); needs
      ``distance="euclidean"``.
    reduction: ``"mean_nonzero"`` (default), ``"mean"``, ``"sum"`` or ``"none"`` (``[B, R, R]``
      indexed ``[anchor, positive, negative]``, zero for invalid triplets).

  Returns:
    The loss (0 when no anchor has both a positive and a negative).
  """
  _check_distance(distance)
  if squared:
    if distance != "euclidean":
      raise ValueError(f"squared=True needs distance='euclidean', got distance={distance!r}.")
    distance = "squared_euclidean"
  core.check_reduction(reduction)
  core.check_range("margin", margin, low=0.0)
  p = core.check_inputs(embeddings, labels, ref_embeddings, ref_labels, ref_mask, pair_mask)
  d, inv = _scores(p.emb, p.ref, distance)
  d_ap = d[:, :, None]
  d_an = d[:, None, :]
  if swap:
    d_pn = d if p.self_ref else _scores(p.ref, p.ref, distance)[0]
    d_an = (jnp.maximum if inv else jnp.minimum)(d_an, d_pn[None, :, :])
  violation = _farther(d_ap, d_an, inv) + margin
  losses = jax.nn.softplus(violation) if smooth_loss else jax.nn.relu(violation)
  mask = p.pos[:, :, None] & p.neg[:, None, :]
  if triplet_mask is not None:
    mask = mask & core.check_triplet_mask(triplet_mask, p)
  return core.reduce(losses, mask, reduction)


def lifted_structure(embeddings, labels, *, ref_embeddings=None, ref_labels=None, ref_mask=None,
                     pair_mask=None, neg_margin: float = 1.0, pos_margin: float = 0.0,
                     distance: str = "euclidean", reduction: str = "mean") -> Array:
  """Lifted structured loss (Oh Song et al. 2016), smooth form.

  For each positive pair ``(i, j)``::

      J_ij = log( sum_{k in N(i)} exp(neg_margin - d_ik) + sum_{l in N(j)} exp(neg_margin - d_jl) )
             + d_ij - pos_margin
      loss_ij = [J_ij]_+^2 / 2

  where ``N(i)`` are the negatives of ``i``. The mean over the ordered positive pairs equals the
  paper's ``1 / (2|P|) sum [J_ij]_+^2`` over unordered pairs. Matches PML
  ``LiftedStructureLoss(neg_margin, pos_margin)`` (``MeanReducer``) without references.

  With references, ``j`` is a reference whose own negatives are not defined (PML compares a
  reference index with batch indices there), so ``J_ij`` uses the anchor's negatives ``N(i)``
  only. A positive pair without any negative contributes nothing (and is not counted).

  Args:
    neg_margin, pos_margin: margins as in the formula (>= 0 for a distance).
    distance: ``"euclidean"`` (default), ``"squared_euclidean"`` or ``"dot"``.
    reduction: ``"mean"`` (default), ``"mean_nonzero"``, ``"sum"`` or ``"none"`` (``[B, R]`` per
      positive pair).
  """
  _check_distance(distance)
  core.check_reduction(reduction)
  _check_margins(distance, pos_margin, neg_margin)
  p = core.check_inputs(embeddings, labels, ref_embeddings, ref_labels, ref_mask, pair_mask)
  d, inv = _scores(p.emb, p.ref, distance)
  # Per-anchor log-sum-exp over its negatives; a pair's negative set is the union of two rows,
  # so its log-sum-exp is logaddexp of the two row values: [B, R], never [B, R, R].
  lse = core.masked_logsumexp(_farther(neg_margin, d, inv), p.neg, axis=1)
  has_neg = jnp.any(p.neg, axis=1)
  if p.self_ref:
    lse_pair = jnp.logaddexp(lse[:, None], lse[None, :])
    pair_has_neg = has_neg[:, None] | has_neg[None, :]
  else:
    lse_pair = lse[:, None]
    pair_has_neg = has_neg[:, None]
  mask = p.pos & pair_has_neg
  j = jnp.where(mask, lse_pair + _farther(d, pos_margin, inv), 0.0)
  losses = jax.nn.relu(j) ** 2 / 2.0
  return core.reduce(losses, mask, reduction)


def generalized_lifted_structure(embeddings, labels, *, ref_embeddings=None, ref_labels=None,
                                 ref_mask=None, pair_mask=None, neg_margin: float = 1.0,
                                 pos_margin: float = 0.0,
                                 distance: str = "euclidean", reduction: str = "mean") -> Array:
  """Generalised lifted structure loss (Hermans et al. 2017, "In defense of the triplet loss").

  Per anchor ``i``::

      loss_i = [ log sum_{p in P(i)} exp(d_ip - pos_margin)
               + log sum_{n in N(i)} exp(neg_margin - d_in) ]_+

  An empty positive or negative set contributes 0 to the bracket (PML's convention). Matches PML
  ``GeneralizedLiftedStructureLoss(neg_margin, pos_margin)`` (``MeanReducer`` over all anchors).

  Args:
    neg_margin, pos_margin: margins (>= 0 for a distance).
    distance: ``"euclidean"`` (default), ``"squared_euclidean"`` or ``"dot"``.
    reduction: ``"mean"`` (default), ``"mean_nonzero"``, ``"sum"`` or ``"none"`` (``[B]``).
  """
  _check_distance(distance)
  core.check_reduction(reduction)
  _check_margins(distance, pos_margin, neg_margin)
  p = core.check_inputs(embeddings, labels, ref_embeddings, ref_labels, ref_mask, pair_mask)
  d, inv = _scores(p.emb, p.ref, distance)
  pos_lse = _lse_or_zero(_farther(d, pos_margin, inv), p.pos)
  neg_lse = _lse_or_zero(_farther(neg_margin, d, inv), p.neg)
  losses = jax.nn.relu(pos_lse + neg_lse)
  return core.reduce(losses, jnp.ones(losses.shape, bool), reduction)


def npairs(embeddings, labels, *, ref_embeddings=None, ref_labels=None, ref_mask=None,
           pair_mask=None, reduction: str = "mean") -> Array:
  """Multi-class N-pair loss (Sohn 2016), one (anchor, positive) pair per class.

  For each class the first batch entry (in batch order) that has a positive is its anchor
  ``a_c`` and its first positive (in reference order) is ``p_c``. With ``C`` such classes::

      loss_c = -log( exp(<a_c, p_c>) / sum_{c'} exp(<a_c, p_c'>) )

  Matches PML ``NPairsLoss()`` (same pair selection; ``DotProductSimilarity``, which is the plain
  inner product on unit-norm inputs; ``MeanReducer`` over the selected anchors). PML rejects
  references; here references supply the positives (the ``p_c`` are then references). Sohn's
  L2 penalty on the embeddings is not part of the loss (PML's default has none either).

  ``pair_mask[i, j]`` False removes reference ``j`` as a positive of ``i`` (so it cannot be
  ``p_c``) and removes ``p_c' = j`` from the softmax of anchor ``a_c = i``.

  Args:
    reduction: ``"mean"`` (default), ``"mean_nonzero"``, ``"sum"`` or ``"none"`` (``[B]``, zero
      for anchors that were not selected).

  Returns:
    The loss; 0 when no class has a positive pair.
  """
  core.check_reduction(reduction)
  p = core.check_inputs(embeddings, labels, ref_embeddings, ref_labels, ref_mask, pair_mask)
  b = p.emb.shape[0]
  has_pos = jnp.any(p.pos, axis=1)
  same = p.labels[:, None] == p.labels[None, :]
  earlier = jnp.tril(jnp.ones((b, b), bool), k=-1)  # earlier[i, k]: k < i
  # Anchor i is selected if no earlier batch entry of its class has a positive.
  selected = has_pos & ~jnp.any(same & earlier & has_pos[None, :], axis=1)
  first_pos = jnp.argmax(p.pos, axis=1)  # first True; rows without one are unselected anyway
  positives = p.ref[first_pos]  # [B, D]
  logits = core.dot_similarity(p.emb, positives)  # [B, B]: anchor i vs positive of anchor k
  col_ok = jnp.broadcast_to(selected[None, :], (b, b))
  if pair_mask is not None:
    # Column k of anchor i is the pair (i, first_pos[k]); it counts only if that pair is kept
    # (always true of the diagonal: first_pos[i] is a kept positive of i).
    col_ok = col_ok & jnp.take_along_axis(p.valid, jnp.broadcast_to(first_pos[None, :], (b, b)),
                                          axis=1)
  lse = core.masked_logsumexp(logits, col_ok, axis=1)
  losses = jnp.where(selected, lse - jnp.diagonal(logits), 0.0)
  return core.reduce(losses, selected, reduction)


def angular(embeddings, labels, *, ref_embeddings=None, ref_labels=None, ref_mask=None,
            pair_mask=None, alpha: float = 40.0, reduction: str = "mean") -> Array:
  """Angular loss (Wang et al. 2017), the N-pair form of eq. (8).

  For each positive pair ``(a, p)`` and the negatives ``n`` of ``a``, with ``t = tan(alpha)``::

      loss_ap = log( 1 + sum_n exp( 4 t^2 <a + p, n> - 2 (1 + t^2) <a, p> ) )

  Matches PML ``AngularLoss(alpha)`` (``MeanReducer`` over positive pairs) on unit-norm inputs
  (PML normalises anchors and positives itself; the loss is meant for unit-norm embeddings).
  A positive pair whose anchor has no negative gives ``log(1 + 0) = 0`` and still counts in
  the mean (as in PML). The sum over negatives is computed as the matrix product
  ``sum_n exp(c<a, n>) exp(c<p, n>)`` of a ``[B, R]`` and an ``[R, R]`` matrix, so no
  ``[B, R, R]`` tensor is built; this is exact but may underflow for embeddings of norm well
  above 1 (rescale first).

  ``pair_mask`` gates the positive pairs ``(a, p)`` and the negatives ``n`` of each anchor ``a``
  (the pair ``(a, n)``); ``<p, n>`` enters through the anchor's kept negatives.

  Args:
    alpha: the angle in degrees, in (0, 90).
    reduction: ``"mean"`` (default), ``"mean_nonzero"``, ``"sum"`` or ``"none"`` (``[B, R]`` per
      positive pair).
  """
  core.check_reduction(reduction)
  core.check_range("alpha", alpha, low=0.0, high=90.0, low_inclusive=False, high_inclusive=False)
  p = core.check_inputs(embeddings, labels, ref_embeddings, ref_labels, ref_mask, pair_mask)
  sq_tan = jnp.tan(jnp.radians(jnp.asarray(alpha, jnp.float32))) ** 2
  c = 4.0 * sq_tan
  s_ar = core.dot_similarity(p.emb, p.ref)  # <a, n> and <a, p>: [B, R]
  s_rr = s_ar if p.self_ref else core.dot_similarity(p.ref, p.ref)  # <p, n>: [R, R]
  # log sum_n mask[a, n] exp(c s_ar[a, n] + c s_rr[p, n]) via a stabilised matrix product.
  u = jnp.where(p.neg, c * s_ar, core.NEG_INF)
  u_max = jax.lax.stop_gradient(jnp.max(u, axis=1, keepdims=True))
  v = c * s_rr
  v_max = jax.lax.stop_gradient(jnp.max(v, axis=1, keepdims=True))
  prod = jnp.matmul(jnp.exp(u - u_max), jnp.exp(v - v_max).T,
                    precision=jax.lax.Precision.HIGHEST)  # [B, R]
  has_neg = jnp.any(p.neg, axis=1, keepdims=True)
  lse_neg = jnp.where(has_neg, jnp.log(jnp.maximum(prod, 1e-37)) + u_max + v_max.T, core.NEG_INF)
  x = lse_neg - 2.0 * (1.0 + sq_tan) * s_ar
  # A positive pair whose anchor has no negative gives log(1 + 0) = 0 and still counts (PML).
  losses = jax.nn.softplus(jnp.where(p.pos, x, core.NEG_INF))
  return core.reduce(losses, p.pos, reduction)


def margin(embeddings, labels, *, ref_embeddings=None, ref_labels=None, ref_mask=None,
           pair_mask=None,
           margin: float = 0.2, nu: float = 0.0, beta=1.2, distance: str = "euclidean",
           reduction: str = "mean_nonzero") -> Array:
  """Margin loss of Wu et al. 2017 ("Sampling matters"), over all pairs as in the paper.

  Per pair, with ``beta_i`` the boundary of anchor ``i``'s class::

      positive:  [d_ij - beta_i + margin]_+        negative:  [beta_i - d_ij + margin]_+

  plus the boundary regulariser ``nu * mean_i beta_i`` (``nu * beta`` for a scalar ``beta``).

  ``beta`` may be a Python number, a scalar array or a per-class array ``[C]`` indexed by the
  anchor's label, and may be a learnable parameter (its gradient flows; keep it in the
  optimiser state, not here). ``reduction="mean_nonzero"`` (default) divides the sum of all
  pair terms by the number of non-zero terms, positive and negative together (Wu et al.'s
  normalisation and PML's ``DivisorReducer``).

  Difference from PML ``MarginLoss(margin, nu, beta)``: PML forms all *triplets* and adds the
  positive and the negative term of each triplet, so a positive pair of anchor ``a`` is counted
  once per negative of ``a`` and vice versa; here each pair counts once, as in the paper's
  pairwise definition (and PROFS eq. 3.3). The two agree when every anchor has as many
  positives as negatives. PML's per-class regulariser is divided by the number of non-zero
  triplet terms; here it is the mean over anchors. With ``pair_mask`` the pair terms (and the
  pair count of ``reduction="mean"``) cover the kept pairs only; the regulariser stays the mean
  over all anchors.

  Args:
    margin: the separation margin ``alpha`` of the paper (>= 0).
    nu: weight of the regulariser on beta (>= 0).
    beta: the boundary between positive and negative distances (scalar or ``[C]``).
    distance: ``"euclidean"`` (default), ``"squared_euclidean"`` or ``"dot"``.
    reduction: ``"mean_nonzero"`` (default), ``"mean"`` (sum over all pair terms divided by the
      number of pairs), ``"sum"`` or ``"none"`` (``[B, R]`` per-pair losses, no regulariser).
  """
  _check_distance(distance)
  core.check_reduction(reduction)
  core.check_range("margin", margin, low=0.0)
  core.check_range("nu", nu, low=0.0)
  beta_ndim = jnp.ndim(beta)
  if beta_ndim > 1:
    raise ValueError(f"beta must be a scalar or a per-class vector [num_classes], got shape "
                     f"{jnp.shape(beta)}.")
  p = core.check_inputs(embeddings, labels, ref_embeddings, ref_labels, ref_mask, pair_mask)
  beta = jnp.asarray(beta, jnp.float32)
  beta_i = (beta[p.labels] if beta_ndim == 1 else jnp.broadcast_to(beta, p.labels.shape))[:, None]
  d, inv = _scores(p.emb, p.ref, distance)
  pos_terms = jax.nn.relu(_farther(d, beta_i, inv) + margin)
  neg_terms = jax.nn.relu(_farther(beta_i, d, inv) + margin)
  if reduction == "none":
    return _split_reduce(pos_terms, neg_terms, p.pos, p.neg, reduction)
  terms = jnp.where(p.pos, pos_terms, jnp.where(p.neg, neg_terms, 0.0))
  total = jnp.sum(terms)
  if reduction == "mean_nonzero":
    total = total / jnp.maximum(jnp.sum(terms > 0), 1)
  elif reduction == "mean":
    total = total / jnp.maximum(jnp.sum(p.valid), 1)
  return total + nu * jnp.mean(beta_i)


def multi_similarity(embeddings, labels, *, ref_embeddings=None, ref_labels=None, ref_mask=None,
                     pair_mask=None, alpha: float = 2.0, beta: float = 50.0, base: float = 0.5,
                     reduction: str = "mean") -> Array:
  """Multi-similarity loss (Wang et al. 2019, eq. 2 of Qi et al.), on inner-product similarity.

  Per anchor ``i`` with similarities ``s``::

      loss_i = 1/alpha log(1 + sum_{p in P(i)} exp(-alpha (s_ip - base)))
             + 1/beta  log(1 + sum_{n in N(i)} exp( beta (s_in - base)))

  Matches PML ``MultiSimilarityLoss(alpha, beta, base)`` (``CosineSimilarity`` = inner product
  on unit-norm inputs; ``MeanReducer`` over all anchors). Without mining (combine with
  :mod:`dmljax.losses.miners` for the paper's MS mining).

  Args:
    alpha, beta: positive and negative scales (> 0). base: the similarity threshold lambda.
    reduction: ``"mean"`` (default), ``"mean_nonzero"``, ``"sum"`` or ``"none"`` (``[B]``).
  """
  core.check_reduction(reduction)
  core.check_range("alpha", alpha, low=0.0, low_inclusive=False)
  core.check_range("beta", beta, low=0.0, low_inclusive=False)
  p = core.check_inputs(embeddings, labels, ref_embeddings, ref_labels, ref_mask, pair_mask)
  s = core.dot_similarity(p.emb, p.ref)
  pos_loss = core.masked_logsumexp(-alpha * (s - base), p.pos, axis=1, add_one=True) / alpha
  neg_loss = core.masked_logsumexp(beta * (s - base), p.neg, axis=1, add_one=True) / beta
  losses = pos_loss + neg_loss
  return core.reduce(losses, jnp.ones(losses.shape, bool), reduction)


def binomial_deviance(embeddings, labels, *, ref_embeddings=None, ref_labels=None, ref_mask=None,
                      pair_mask=None, alpha: float = 2.0, beta: float = 0.5, cost: float = 25.0,
                      reduction: str = "mean") -> Array:
  """Binomial deviance loss (Yi et al. 2014, "Deep metric learning for person re-identification").

  Per pair with similarity ``s`` and ``m = 1`` for positives, ``m = -cost`` for negatives::

      loss_ij = log(1 + exp(-alpha (s_ij - beta) m_ij))

  i.e. ``softplus(-alpha (s - beta))`` for positive and ``softplus(alpha cost (s - beta))`` for
  negative pairs. Yi et al. weight positive pairs by ``1/#positive pairs`` and negative pairs by
  ``1/#negative pairs``: that is the default ``reduction="mean"`` (mean over positive pairs plus
  mean over negative pairs). PML 2.x has no such loss; this follows the paper (defaults
  ``alpha=2, beta=0.5, cost=25`` as in its common public implementations). It is one of the
  two base losses of the DRO paper (Qi et al.), whose threshold lambda is ``beta`` here, whose
  positive scale is ``alpha`` and whose negative scale is ``alpha * cost``.

  Args:
    alpha: scale (> 0). beta: similarity threshold. cost: extra weight of negatives (> 0).
    reduction: ``"mean"`` (default), ``"mean_nonzero"``, ``"sum"`` or ``"none"`` (``[B, R]``).
  """
  core.check_reduction(reduction, _SPLIT_REDUCTIONS)
  core.check_range("alpha", alpha, low=0.0, low_inclusive=False)
  core.check_range("cost", cost, low=0.0, low_inclusive=False)
  p = core.check_inputs(embeddings, labels, ref_embeddings, ref_labels, ref_mask, pair_mask)
  s = core.dot_similarity(p.emb, p.ref)
  pos_terms = jax.nn.softplus(-alpha * (s - beta))
  neg_terms = jax.nn.softplus(alpha * cost * (s - beta))
  return _split_reduce(pos_terms, neg_terms, p.pos, p.neg, reduction)


def ntxent(embeddings, labels, *, ref_embeddings=None, ref_labels=None, ref_mask=None,
           pair_mask=None, temperature: float = 0.07, reduction: str = "mean") -> Array:
  """NT-Xent / InfoNCE (Chen et al. 2020, SimCLR; van den Oord et al. 2018), label-supervised.

  For each positive pair ``(a, p)`` with similarities ``s`` and the negatives ``n`` of ``a``::

      loss_ap = -log( exp(s_ap / T) / (exp(s_ap / T) + sum_n exp(s_an / T)) )

  Matches PML ``NTXentLoss(temperature)`` (``CosineSimilarity`` = inner product on unit-norm
  inputs; ``MeanReducer`` over positive pairs). An anchor without negatives gives 0 per pair.

  Args:
    temperature: T > 0.
    reduction: ``"mean"`` (default), ``"mean_nonzero"``, ``"sum"`` or ``"none"`` (``[B, R]``).
  """
  core.check_reduction(reduction)
  core.check_range("temperature", temperature, low=0.0, low_inclusive=False)
  p = core.check_inputs(embeddings, labels, ref_embeddings, ref_labels, ref_mask, pair_mask)
  logits = core.dot_similarity(p.emb, p.ref) / temperature
  lse_neg = core.masked_logsumexp(logits, p.neg, axis=1)  # NEG_INF where no negative
  losses = jax.nn.softplus(jnp.where(p.pos, lse_neg[:, None] - logits, core.NEG_INF))
  return core.reduce(losses, p.pos, reduction)


def supcon(embeddings, labels, *, ref_embeddings=None, ref_labels=None, ref_mask=None,
           pair_mask=None, temperature: float = 0.1, reduction: str = "mean_nonzero") -> Array:
  """Supervised contrastive loss (Khosla et al. 2020, L_out).

  Per anchor ``i`` with positives ``P(i)`` and all its valid pairs ``A(i)``::

      loss_i = -1/|P(i)| sum_{p in P(i)} log( exp(s_ip / T) / sum_{a in A(i)} exp(s_ia / T) )

  Matches PML ``SupConLoss(temperature)`` (``CosineSimilarity`` = inner product on unit-norm
  inputs; ``AvgNonZeroReducer`` over anchors). As in PML, the loss is 0 when the batch has no
  positive pair or no negative pair at all; anchors without positives give 0.

  Args:
    temperature: T > 0.
    reduction: ``"mean_nonzero"`` (default), ``"mean"`` (over all anchors), ``"sum"`` or
      ``"none"`` (``[B]``).
  """
  core.check_reduction(reduction)
  core.check_range("temperature", temperature, low=0.0, low_inclusive=False)
  p = core.check_inputs(embeddings, labels, ref_embeddings, ref_labels, ref_mask, pair_mask)
  logits = core.dot_similarity(p.emb, p.ref) / temperature
  denom = core.masked_logsumexp(logits, p.valid, axis=1)
  log_prob = jnp.where(p.pos, logits - denom[:, None], 0.0)
  n_pos = jnp.sum(p.pos, axis=1)
  losses = -jnp.sum(log_prob, axis=1) / jnp.maximum(n_pos, 1)
  losses = jnp.where(jnp.any(p.pos) & jnp.any(p.neg), losses, 0.0)
  return core.reduce(losses, jnp.ones(losses.shape, bool), reduction)


def circle(embeddings, labels, *, ref_embeddings=None, ref_labels=None, ref_mask=None,
           pair_mask=None,
           m: float = 0.4, gamma: float = 80.0, reduction: str = "mean_nonzero") -> Array:
  """Circle loss (Sun et al. 2020), pair-wise labels, on inner-product similarity.

  Per anchor ``i`` with similarities ``s``, ``O_p = 1 + m``, ``O_n = -m``, ``D_p = 1 - m``,
  ``D_n = m`` and the self-paced weights ``a_p = [O_p - s_p]_+``, ``a_n = [s_n - O_n]_+``
  (treated as constants, i.e. no gradient flows through them, as in the paper and PML)::

      loss_i = softplus( log sum_{p} exp(-gamma a_p (s_p - D_p))
                        + log sum_{n} exp(gamma a_n (s_n - D_n)) )

  Matches PML ``CircleLoss(m, gamma)`` (``CosineSimilarity`` = inner product on unit-norm inputs;
  ``AvgNonZeroReducer`` over anchors). Anchors lacking a positive or a negative give 0.

  Args:
    m: relaxation margin, in [0, 1). gamma: scale (> 0).
    reduction: ``"mean_nonzero"`` (default), ``"mean"`` (over all anchors), ``"sum"`` or
      ``"none"`` (``[B]``).
  """
  core.check_reduction(reduction)
  core.check_range("m", m, low=0.0, high=1.0, high_inclusive=False)
  core.check_range("gamma", gamma, low=0.0, low_inclusive=False)
  p = core.check_inputs(embeddings, labels, ref_embeddings, ref_labels, ref_mask, pair_mask)
  s = core.dot_similarity(p.emb, p.ref)
  s_const = jax.lax.stop_gradient(s)
  pos_logits = -gamma * jax.nn.relu(1.0 + m - s_const) * (s - (1.0 - m))
  neg_logits = gamma * jax.nn.relu(s_const + m) * (s - m)
  lse_pos = core.masked_logsumexp(pos_logits, p.pos, axis=1)
  lse_neg = core.masked_logsumexp(neg_logits, p.neg, axis=1)
  ok = jnp.any(p.pos, axis=1) & jnp.any(p.neg, axis=1)
  losses = jnp.where(ok, jax.nn.softplus(jnp.where(ok, lse_pos + lse_neg, 0.0)), 0.0)
  return core.reduce(losses, jnp.ones(losses.shape, bool), reduction)
