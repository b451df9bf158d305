"""DRO pair weighting (Qi, Yan, Wang, Yang: *A Simple and Effective Framework for Pairwise Deep
Metric Learning*).

Deep metric learning is cast as binary classification of pairs. Every valid pair ``(i, j)`` of the
batch (or of batch x references) gets a simple per-pair loss ``l_ij``; the loss of the batch is the
distributionally robust one (eq. 1)::

    F(theta) = max_{p in U} sum_ij p_ij l_ij(theta)

and the uncertainty set ``U`` decides which pairs carry weight. The functions here differ only in
``U``:

* :func:`dro_topk`      -- ``0 <= p_ij <= 1/K``, ``sum p = 1``: the mean of the K largest losses.
* :func:`dro_topk_pn`   -- K/2 positive and K/2 negative pairs with the largest losses.
* :func:`dro_kl`        -- KL-regularised ``p`` over all pairs, in closed form.
* :func:`dro_kl_sampled`-- the same ``p``, used to *sample* pairs (the paper's p-sampling).
* :func:`dro_grouped_kl`-- KL-regularised ``p`` grouped per anchor into positives and negatives
  (eq. 7), which recovers the lifted-structure and multi-similarity gradients.

Base losses (``base=``), on the similarity ``S_ij = <f_i, f_j>`` (cosine on unit-norm embeddings;
the paper's hyperparameters are the defaults)::

    "margin":   l_ij = [m + y_ij (lambda - S_ij)]_+         y_ij = +1 positive, -1 negative
    "binomial": l_ij = log(1 + exp(-alpha (S_ij - lambda)))  positive pair
                l_ij = log(1 + exp( beta  (S_ij - lambda)))  negative pair

with ``m = margin = 0.2``, ``lambda = threshold = 0.5``, ``alpha = 2``, ``beta = 50`` (sec. 4.2.1).

Pairs with zero loss drop out of every weighting, as in the paper ("zero losses do not contribute
... we simply eliminate those"): they take no weight and do not count in ``K`` or in the uniform
prior of the KL term. Self-pairs are excluded when the batch is its own reference set (the paper
keeps them "for simplicity"; with a hinge they only add a constant). A batch whose pairs all have
zero loss (or that has no pairs) gives 0 with zero gradients.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from dmljax.losses import core

__all__ = ["dro_topk", "dro_topk_pn", "dro_kl", "dro_kl_sampled", "dro_grouped_kl"]

Array = jax.Array

BASE_LOSSES = ("margin", "binomial")


def _check_base(base: str, margin, threshold, alpha, beta):
  if base not in BASE_LOSSES:
    raise ValueError(f"base must be one of {list(BASE_LOSSES)}, got {base!r}.")
  core.check_range("margin", margin, low=0.0)
  core.check_range("alpha", alpha, low=0.0, low_inclusive=False)
  core.check_range("beta", beta, low=0.0, low_inclusive=False)
  del threshold  # any real threshold is allowed


def _check_k(name: str, k, low: int = 1):
  if isinstance(k, bool) or not isinstance(k, int):
    raise ValueError(f"{name} must be a Python int (it fixes a static shape), got {k!r}.")
  if k < low:
    raise ValueError(f"{name} must be >= {low}, got {k}.")


def _check_gamma(name: str, gamma):
  core.check_range(name, gamma, low=0.0, low_inclusive=False)


def base_pair_losses(pairs: core.Pairs, base: str = "margin", *, margin: float = 0.2,
                     threshold: float = 0.5, alpha: float = 2.0, beta: float = 50.0):
  """Per-pair base losses of the DRO framework.

  Args:
    pairs: the output of :func:`dmljax.losses.core.check_inputs`.
    base: ``"margin"`` or ``"binomial"`` (formulas in the module docstring).
    margin: ``m`` of the margin loss.
    threshold: ``lambda``, the similarity threshold of both base losses.
    alpha: positive-pair scale of the binomial loss.
    beta: negative-pair scale of the binomial loss.

  Returns:
    ``(losses, active)``: ``[B, R]`` float32 per-pair losses (0 outside valid pairs) and the
    ``[B, R]`` bool mask of valid pairs whose loss is > 0 (the pairs DRO weighs).
  """
  _check_base(base, margin, threshold, alpha, beta)
  sim = core.dot_similarity(pairs.emb, pairs.ref)
  if base == "margin":
    y = jnp.where(pairs.pos, 1.0, -1.0)
    loss = jax.nn.relu(margin + y * (threshold - sim))
  else:
    loss = jnp.where(pairs.pos, jax.nn.softplus(-alpha * (sim - threshold)),
                     jax.nn.softplus(beta * (sim - threshold)))
  loss = jnp.where(pairs.valid, loss, 0.0)
  return loss, pairs.valid & (loss > 0)


def _mean_topk(losses: Array, active: Array, k: int) -> Array:
  """Mean of the (at most) ``k`` largest losses among ``active`` entries; 0 if none."""
  flat = losses.reshape(-1)
  act = active.reshape(-1)
  k = min(k, flat.shape[0])
  # Inactive entries sort below every active (strictly positive) loss.
  _, idx = jax.lax.top_k(jnp.where(act, jax.lax.stop_gradient(flat), -1.0), k)
  chosen = act[idx]
  return jnp.sum(jnp.where(chosen, flat[idx], 0.0)) / jnp.maximum(jnp.sum(chosen), 1)


def dro_topk(embeddings, labels, *, ref_embeddings=None, ref_labels=None, ref_mask=None,
             k: Optional[int] = None, base: str = "margin", margin: float = 0.2,
             threshold: float = 0.5, alpha: float = 2.0, beta: float = 50.0) -> Array:
  """DRO-TopK: the mean of the K largest pair losses of the batch.

  ``U = {sum p = 1, 0 <= p_ij <= 1/K}`` makes ``F`` the average top-K loss (sec. 3.2). Only pairs
  with a nonzero loss compete; if fewer than K have one, the mean runs over those.
  No PML counterpart.

  Args:
    embeddings: ``[B, D]``; labels: ``[B]`` int; ref_embeddings / ref_labels / ref_mask: optional
      references (see :mod:`dmljax.losses.core`).
    k: number of pairs K (static, >= 1). ``None`` uses ``2 * B``, the paper's setting (sec. 4.2.2).
    base, margin, threshold, alpha, beta: the per-pair base loss (module docstring).

  Returns:
    Scalar loss: ``sum of the selected losses / number selected``.
  """
  pairs = core.check_inputs(embeddings, labels, ref_embeddings, ref_labels, ref_mask)
  k = 2 * pairs.emb.shape[0] if k is None else k
  _check_k("k", k)
  losses, active = base_pair_losses(pairs, base, margin=margin, threshold=threshold, alpha=alpha,
                                    beta=beta)
  return _mean_topk(losses, active, k)


def dro_topk_pn(embeddings, labels, *, ref_embeddings=None, ref_labels=None, ref_mask=None,
                k: Optional[int] = None, base: str = "margin", margin: float = 0.2,
                threshold: float = 0.5, alpha: float = 2.0, beta: float = 50.0) -> Array:
  """DRO-TopK-PN: the K/2 largest positive-pair losses and the K/2 largest negative-pair losses.

  Balances positives and negatives explicitly (sec. 3.2): ``K // 2`` positive pairs and
  ``K - K // 2`` negative pairs with the largest nonzero losses are selected (fewer on a side
  that has fewer nonzero pairs) and their losses averaged together, as in the paper's
  implementation note ("compute averaged gradient of the pairwise losses of the selected pairs").

  Args:
    k: the paper's K, the total budget (static, >= 2 so that each side gets at least one pair).
      ``None`` uses ``2 * B``. Other arguments as in :func:`dro_topk`.

  Returns:
    Scalar loss: ``(sum of selected positive + selected negative losses) / number selected``.
  """
  pairs = core.check_inputs(embeddings, labels, ref_embeddings, ref_labels, ref_mask)
  k = 2 * pairs.emb.shape[0] if k is None else k
  _check_k("k", k, low=2)
  losses, active = base_pair_losses(pairs, base, margin=margin, threshold=threshold, alpha=alpha,
                                    beta=beta)
  total = jnp.zeros((), jnp.float32)
  count = jnp.zeros((), jnp.int32)
  for side, k_side in ((pairs.pos, k // 2), (pairs.neg, k - k // 2)):
    flat = losses.reshape(-1)
    act = (active & side).reshape(-1)
    _, idx = jax.lax.top_k(jnp.where(act, jax.lax.stop_gradient(flat), -1.0),
                           min(k_side, flat.shape[0]))
    chosen = act[idx]
    total = total + jnp.sum(jnp.where(chosen, flat[idx], 0.0))
    count = count + jnp.sum(chosen)
  return total / jnp.maximum(count, 1)


def _kl_robust(losses: Array, active: Array, gamma, axis=None, add_one: bool = False) -> Array:
  """``max_p sum p l - gamma KL(p || uniform)`` over the active entries, in closed form.

  Equals ``gamma * log(mean_active exp(l / gamma))`` (with an extra zero-loss entry when
  ``add_one``); its gradient w.r.t. ``l`` is the optimal ``p* = softmax(l / gamma)``. Empty
  groups give 0. Computed as ``s + gamma * log1p(mean(expm1((l - s) / gamma)))`` with ``s`` the
  (constant) largest loss: nothing overflows for small ``gamma`` and nothing cancels
  catastrophically for large ``gamma`` (where ``F`` tends to the plain mean).
  """
  n = jnp.sum(active, axis=axis).astype(jnp.float32)
  shift = jnp.max(jnp.where(active, losses, 0.0), axis=axis)  # losses >= 0, so 0 is a floor
  shift = jax.lax.stop_gradient(shift)
  shift_b = shift if axis is None else jnp.expand_dims(shift, axis)
  terms = jnp.where(active, jnp.expm1((losses - shift_b) / gamma), 0.0)
  s = jnp.sum(terms, axis=axis)
  if add_one:  # one more pair with loss 0
    s = s + jnp.expm1(-shift / gamma)
    n = n + 1.0
  return shift + gamma * jnp.log1p(s / jnp.maximum(n, 1.0))


def dro_kl(embeddings, labels, *, ref_embeddings=None, ref_labels=None, ref_mask=None,
           gamma: float = 0.1, base: str = "margin", margin: float = 0.2, threshold: float = 0.5,
           alpha: float = 2.0, beta: float = 50.0) -> Array:
  """DRO-KL with the closed-form optimal weights (sec. 3.2).

  ``F = max_{p in simplex} sum_ij p_ij l_ij - gamma KL(p || 1/n)`` over the ``n`` pairs with a
  nonzero loss, whose value is ``gamma * log((1/n) sum_ij exp(l_ij / gamma))`` and whose optimum
  is ``p*_ij = exp(l_ij / gamma) / sum_kl exp(l_kl / gamma)``. The returned value is ``F`` itself,
  so ``grad F = sum_ij p*_ij grad l_ij`` exactly (Lemma 1 of the paper; ``p*`` is unique).
  ``gamma -> 0`` approaches the maximal pair loss, ``gamma -> inf`` the plain mean.

  Args:
    gamma: KL weight, > 0 (the paper tunes it in 0.1..0.9 and uses 0.1 for timing).
    Other arguments as in :func:`dro_topk`.

  Returns:
    Scalar robust loss ``F`` (>= the mean nonzero pair loss; 0 when no pair has a loss).
  """
  _check_gamma("gamma", gamma)
  pairs = core.check_inputs(embeddings, labels, ref_embeddings, ref_labels, ref_mask)
  losses, active = base_pair_losses(pairs, base, margin=margin, threshold=threshold, alpha=alpha,
                                    beta=beta)
  return _kl_robust(losses, active, gamma)


def dro_kl_sampled(embeddings, labels, *, rng, ref_embeddings=None, ref_labels=None,
                   ref_mask=None, num_samples: Optional[int] = None, gamma: float = 0.1,
                   base: str = "margin", margin: float = 0.2, threshold: float = 0.5,
                   alpha: float = 2.0, beta: float = 50.0) -> Array:
  """DRO-KL with p-sampling: pairs drawn from ``p*`` and their losses averaged (sec. 3.2).

  ``num_samples`` pair indices are drawn i.i.d. (with replacement) from the closed-form ``p*`` of
  :func:`dro_kl` (computed without gradient) and the loss is the mean of the drawn pairs' losses,
  ``sum_ij (c_ij / num_samples) l_ij`` with ``c_ij`` the draw counts. Its gradient is an unbiased
  estimate of ``sum p*_ij grad l_ij = grad dro_kl``, and its value an unbiased estimate of the
  weighted loss ``sum p*_ij l_ij`` (which is <= ``dro_kl``'s value ``F``).

  Args:
    rng: a ``jax.random`` key (explicit: the loss is a pure function of it).
    num_samples: number of draws (static, >= 1); ``None`` uses ``2 * B`` (the K of top-K).
    gamma: as in :func:`dro_kl`. Other arguments as in :func:`dro_topk`.

  Returns:
    Scalar loss; 0 when no pair has a nonzero loss.
  """
  _check_gamma("gamma", gamma)
  pairs = core.check_inputs(embeddings, labels, ref_embeddings, ref_labels, ref_mask)
  num_samples = 2 * pairs.emb.shape[0] if num_samples is None else num_samples
  _check_k("num_samples", num_samples)
  losses, active = base_pair_losses(pairs, base, margin=margin, threshold=threshold, alpha=alpha,
                                    beta=beta)
  flat = losses.reshape(-1)
  act = active.reshape(-1)
  any_active = jnp.any(act)
  # All-inactive batches get uniform logits (anything finite), and the draws are then zeroed.
  logits = jnp.where(act, jax.lax.stop_gradient(flat) / gamma, core.NEG_INF)
  logits = jnp.where(any_active, logits, 0.0)
  idx = jax.random.categorical(rng, logits, shape=(num_samples,))
  counts = jnp.zeros(flat.shape, jnp.float32).at[idx].add(1.0)
  weights = jnp.where(act & any_active, counts / num_samples, 0.0)
  return jnp.sum(weights * flat)


def dro_grouped_kl(embeddings, labels, *, ref_embeddings=None, ref_labels=None, ref_mask=None,
                   gamma: float = 1.0, gamma_pos: Optional[float] = None,
                   gamma_neg: Optional[float] = None, add_one: bool = False,
                   base: str = "margin", margin: float = 0.2, threshold: float = 0.5,
                   alpha: float = 2.0, beta: float = 50.0, reduction: str = "mean") -> Array:
  """DRO-KL-G: KL-regularised weights grouped per anchor into positives and negatives (eq. 7).

  For each anchor ``i``, with ``P_i`` / ``N_i`` its positive / negative pairs of nonzero loss::

      F_i = max_{p+ in simplex(P_i)} sum p+ l - gamma+ KL(p+ || 1/|P_i|)
          + max_{p- in simplex(N_i)} sum p- l - gamma- KL(p- || 1/|N_i|)
          = gamma+ log(mean_{j in P_i} exp(l_ij / gamma+)) + gamma- log(mean_{j in N_i} exp(l_ij / gamma-))

  and the optimal weights are the per-group softmaxes ``p*_ij ~ exp(l_ij / gamma)``. The value
  returned is ``F`` (so its gradient is ``sum_ij p*_ij grad l_ij``, Lemma 1). An anchor side with
  no nonzero-loss pair contributes 0. ``add_one=True`` adds to each group one extra pair of loss 0
  (the paper's eq. 23): the means become ``(1 + sum exp(l / gamma)) / (|P_i| + 1)``.

  Recovery of LS and MS, as exact gradient identities (tested in ``tests/test_losses_dro.py``).
  Take ``base="margin"`` and suppose every valid pair has a positive loss ``m + y_ij (lambda -
  S_ij) > 0`` (a large enough ``margin``; otherwise hinged pairs drop out and the identities hold
  only over the remaining pairs):

  * LS (eq. 3): with ``gamma = 1``, ``add_one=False``, ``reduction="sum"`` and every anchor having
    a positive and a negative pair, ``F = L_LS + sum_i (2 m - log|P_i| - log|N_i|)`` wherever the
    outer hinge of ``L_LS`` is active, so ``grad F = grad L_LS`` exactly (not only up to scale).
    The paper's ``lambda`` of LS cancels: any ``threshold`` gives the same gradient.
  * MS (eq. 2): with ``add_one=True``, ``gamma_pos = 1/alpha_MS``, ``gamma_neg = 1/beta_MS``,
    ``reduction="mean"`` (mean over the B anchors, MS's ``1/n``),
    ``F = L_MS' - (1/B) sum_i (log(|P_i|+1)/alpha_MS + log(|N_i|+1)/beta_MS)``, where ``L_MS'``
    is MS with threshold ``c+ = lambda + m`` in its positive term and ``c- = lambda - m`` in its
    negative term, so ``grad F = grad L_MS'`` exactly. Standard MS (one threshold) is the case
    ``m = 0``, which needs every positive similarity below and every negative one above
    ``lambda`` for all losses to stay positive (the paper's claim holds in this sense).

  Args:
    gamma: KL weight of both groups, > 0 (paper: 1, 0.1, 0.01, 0.001).
    gamma_pos, gamma_neg: per-group overrides of ``gamma`` (> 0).
    add_one: add the zero-loss pair to each group (MS recovery).
    reduction: ``"mean"`` (sum over anchors / B), ``"sum"`` (eq. 7) or ``"none"`` (``[B]``).
    Other arguments as in :func:`dro_topk`.

  Returns:
    The robust loss (scalar, or ``[B]`` per anchor for ``reduction="none"``).
  """
  gamma_pos = gamma if gamma_pos is None else gamma_pos
  gamma_neg = gamma if gamma_neg is None else gamma_neg
  _check_gamma("gamma_pos", gamma_pos)
  _check_gamma("gamma_neg", gamma_neg)
  core.check_reduction(reduction, ("mean", "sum", "none"))
  pairs = core.check_inputs(embeddings, labels, ref_embeddings, ref_labels, ref_mask)
  losses, active = base_pair_losses(pairs, base, margin=margin, threshold=threshold, alpha=alpha,
                                    beta=beta)
  per_anchor = (_kl_robust(losses, active & pairs.pos, gamma_pos, axis=1, add_one=add_one)
                + _kl_robust(losses, active & pairs.neg, gamma_neg, axis=1, add_one=add_one))
  if reduction == "none":
    return per_anchor
  total = jnp.sum(per_anchor)
  return total if reduction == "sum" else total / per_anchor.shape[0]
