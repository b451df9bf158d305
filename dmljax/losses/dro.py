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
The paper names ``alpha``, ``beta`` and ``lambda`` as the hyperparameters of its binomial loss
``L_B`` without writing it out; the form above (``binomial_form="plain"``, the default, what
dmljax has always computed) is Yi et al.'s binomial deviance written with one scale per side
(:func:`dmljax.losses.pair.binomial_deviance` with ``alpha = alpha``, ``cost = beta / alpha``,
``beta = lambda``). ``binomial_form="scaled"`` is the scaling of the authors' runs (binomial
deviance with separate positive and negative scales and ``2 / scale`` factors)::

    "scaled":   l_ij = (2 / alpha) log(1 + exp(-alpha (S_ij - lambda)))  positive pair
                l_ij = (2 / beta)  log(1 + exp( beta  (S_ij - lambda)))  negative pair

so that the scales set only the sharpness of each side, not the size of its gradient
(``|dl/dS| < 2`` on both sides, where the plain form reaches ``alpha`` and ``beta``).

Pairs with zero loss drop out of every weighting, as in the paper ("zero losses do not contribute
... we simply eliminate those"): they take no weight, are never selected by the top-K weightings
and do not count in the uniform prior of the KL term (the top-K weightings still divide by their
budget K by default, the paper's ``1/K``; see :func:`dro_topk`). Self-pairs are excluded when
the batch is its own reference set (the paper keeps them "for simplicity"; with a hinge they only
add a constant). A batch whose pairs all have zero loss (or that has no pairs) gives 0 with zero
gradients.

Numerics: every weighting gives finite values and gradients for any ``gamma > 0`` (tested down to
``1e-4``) and any spread of the base losses. The KL weightings never exponentiate an entry that
does not take part in its group: such entries are replaced by the group's shift *before* the
exponential and dropped after it, so no masked-out loss can overflow (which would turn the
``0 * inf`` of the masked gradient into NaN). Their normaliser is a max-shifted log-sum-exp, so the
optimal weights sum to one to float32 precision also over hundreds of thousands of pairs.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from dmljax.losses import core

__all__ = ["dro_topk", "dro_topk_pn", "dro_kl", "dro_kl_sampled", "dro_grouped_kl"]

Array = jax.Array

BASE_LOSSES = ("margin", "binomial")
BINOMIAL_FORMS = ("plain", "scaled")
#: Normalisations of the top-K weightings (``normalize=``).
NORMALIZATIONS = ("k", "nonzero")


def _check_base(base: str, margin, threshold, alpha, beta, binomial_form: str = "plain"):
  if base not in BASE_LOSSES:
    raise ValueError(f"base must be one of {list(BASE_LOSSES)}, got {base!r}.")
  if binomial_form not in BINOMIAL_FORMS:
    raise ValueError(f"binomial_form must be one of {list(BINOMIAL_FORMS)}, got {binomial_form!r}.")
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


def _check_normalize(normalize: str):
  if normalize not in NORMALIZATIONS:
    raise ValueError(f"normalize must be one of {list(NORMALIZATIONS)}, got {normalize!r}.")


def base_pair_losses(pairs: core.Pairs, base: str = "margin", *, margin: float = 0.2,
                     threshold: float = 0.5, alpha: float = 2.0, beta: float = 50.0,
                     binomial_form: str = "plain"):
  """Per-pair base losses of the DRO framework.

  Args:
    pairs: the output of :func:`dmljax.losses.core.check_inputs`.
    base: ``"margin"`` or ``"binomial"`` (formulas in the module docstring).
    margin: ``m`` of the margin loss.
    threshold: ``lambda``, the similarity threshold of both base losses.
    alpha: positive-pair scale of the binomial loss.
    beta: negative-pair scale of the binomial loss.
    binomial_form: ``"plain"`` (default: ``log(1 + exp(.))`` per side) or ``"scaled"`` (the
      authors' runs: the positive side times ``2 / alpha``, the negative side times ``2 / beta``).
      Ignored by the margin loss.

  Returns:
    ``(losses, active)``: ``[B, R]`` float32 per-pair losses (0 outside valid pairs) and the
    ``[B, R]`` bool mask of valid pairs whose loss is > 0 (the pairs DRO weighs).
  """
  _check_base(base, margin, threshold, alpha, beta, binomial_form)
  sim = core.dot_similarity(pairs.emb, pairs.ref)
  if base == "margin":
    y = jnp.where(pairs.pos, 1.0, -1.0)
    loss = jax.nn.relu(margin + y * (threshold - sim))
  else:
    pos_loss = jax.nn.softplus(-alpha * (sim - threshold))
    neg_loss = jax.nn.softplus(beta * (sim - threshold))
    if binomial_form == "scaled":
      pos_loss, neg_loss = (2.0 / alpha) * pos_loss, (2.0 / beta) * neg_loss
    loss = jnp.where(pairs.pos, pos_loss, neg_loss)
  loss = jnp.where(pairs.valid, loss, 0.0)
  return loss, pairs.valid & (loss > 0)


def _topk_sum(losses: Array, active: Array, k: int):
  """Sum and number of the (at most) ``k`` largest losses among ``active`` entries."""
  flat = losses.reshape(-1)
  act = active.reshape(-1)
  # Inactive entries sort below every active (strictly positive) loss.
  _, idx = jax.lax.top_k(jnp.where(act, jax.lax.stop_gradient(flat), -1.0),
                         min(k, flat.shape[0]))
  chosen = act[idx]
  return jnp.sum(jnp.where(chosen, flat[idx], 0.0)), jnp.sum(chosen).astype(jnp.float32)


def dro_topk(embeddings, labels, *, ref_embeddings=None, ref_labels=None, ref_mask=None,
             k: Optional[int] = None, normalize: str = "k", base: str = "margin",
             margin: float = 0.2, threshold: float = 0.5, alpha: float = 2.0,
             beta: float = 50.0, binomial_form: str = "plain") -> Array:
  """DRO-TopK: the average top-K pair loss of the batch.

  ``U = {sum p = 1, 0 <= p_ij <= 1/K}`` makes ``F`` the average top-K loss (sec. 3.2)::

      F = (1/K) sum_{r=1..K} l_[r]          l_[r]: the r-th largest pair loss

  Only pairs with a nonzero loss compete, so when fewer than K pairs have one the missing terms
  are zeros: ``normalize="k"`` (default, the paper's formula) still divides by K, i.e. each
  selected pair has weight ``1/K``. ``normalize="nonzero"`` divides by the number of selected
  pairs with a nonzero loss instead (the mean of the selected losses; this was dmljax's only
  behaviour before; it equals ``"k"`` whenever at least K pairs have a loss). No PML counterpart.

  Args:
    embeddings: ``[B, D]``; labels: ``[B]`` int; ref_embeddings / ref_labels / ref_mask: optional
      references (see :mod:`dmljax.losses.core`).
    k: number of pairs K (static, >= 1). ``None`` uses ``2 * B``, the paper's setting (sec. 4.2.2).
      A K above the number of pairs selects them all (and ``"k"`` still divides by K).
    normalize: ``"k"`` (default) or ``"nonzero"``, as above.
    base, margin, threshold, alpha, beta, binomial_form: the per-pair base loss (module
      docstring).

  Returns:
    Scalar loss: ``sum of the selected losses / K`` (or ``/ number selected``); 0 if no pair has
    a loss.
  """
  _check_normalize(normalize)
  pairs = core.check_inputs(embeddings, labels, ref_embeddings, ref_labels, ref_mask)
  k = 2 * pairs.emb.shape[0] if k is None else k
  _check_k("k", k)
  losses, active = base_pair_losses(pairs, base, margin=margin, threshold=threshold, alpha=alpha,
                                    beta=beta, binomial_form=binomial_form)
  total, count = _topk_sum(losses, active, k)
  return total / (float(k) if normalize == "k" else jnp.maximum(count, 1.0))


def dro_topk_pn(embeddings, labels, *, ref_embeddings=None, ref_labels=None, ref_mask=None,
                k: Optional[int] = None, normalize: str = "k", base: str = "margin",
                margin: float = 0.2, threshold: float = 0.5, alpha: float = 2.0,
                beta: float = 50.0, binomial_form: str = "plain") -> Array:
  """DRO-TopK-PN: the largest positive-pair and the largest negative-pair losses, side by side.

  Balances positives and negatives explicitly (sec. 3.2): the budget K is split into
  ``K_+ = K // 2`` positive and ``K_- = K - K // 2`` negative pairs, and on each side the pairs
  with the largest nonzero losses are selected (fewer on a side that has fewer nonzero pairs).
  ``normalize="k"`` (default) averages them over the budget, as the paper's implementation note
  says ("select K/2 positive pairs with largest losses and K/2 negative pairs with largest loss
  respectively, and compute averaged gradient of the pairwise losses of the selected pairs")::

      F = (1/K) (sum_{r <= K_+} l+_[r] + sum_{r <= K_-} l-_[r])

  ``normalize="nonzero"`` divides by the number of selected nonzero losses instead,
  ``(sum+ + sum-) / (n+ + n-)`` (dmljax's only behaviour before); the two agree when both sides
  have their full budget of nonzero losses.

  Args:
    k: the paper's K, the total budget (static, >= 2 so that each side gets at least one pair).
      ``None`` uses ``2 * B``. normalize: ``"k"`` (default) or ``"nonzero"``, as above. Other
      arguments as in :func:`dro_topk`.

  Returns:
    Scalar loss (0 when no pair has a loss).
  """
  _check_normalize(normalize)
  pairs = core.check_inputs(embeddings, labels, ref_embeddings, ref_labels, ref_mask)
  k = 2 * pairs.emb.shape[0] if k is None else k
  _check_k("k", k, low=2)
  losses, active = base_pair_losses(pairs, base, margin=margin, threshold=threshold, alpha=alpha,
                                    beta=beta, binomial_form=binomial_form)
  sides = [(*_topk_sum(losses, active & side, k_side), k_side)
           for side, k_side in ((pairs.pos, k // 2), (pairs.neg, k - k // 2))]
  total = sum(t for t, _, _ in sides)
  if normalize == "k":
    return total / float(k)
  count = sum(c for _, c, _ in sides)
  return total / jnp.maximum(count, 1.0)


def _group_sum(x: Array, axis) -> Array:
  """Sum over ``axis``; over everything (rows first: fewer rounding steps) for ``axis=None``."""
  if axis is None:
    return jnp.sum(jnp.sum(x, axis=-1)) if x.ndim >= 2 else jnp.sum(x)
  return jnp.sum(x, axis=axis)


def _kl_robust(losses: Array, active: Array, gamma, axis=None, add_one: bool = False) -> Array:
  """``max_p sum p l - gamma KL(p || uniform)`` over the active entries, in closed form.

  Equals ``gamma * log(mean_active exp(l / gamma))`` (with an extra zero-loss entry when
  ``add_one``); its gradient w.r.t. ``l`` is the optimal ``p* = softmax(l / gamma)``. Empty
  groups give 0 (with zero gradients).

  Computed as ``s + gamma * log(mean_active exp((l - s) / gamma))`` with ``s`` the (constant)
  largest active loss of the group, so every exponent is <= 0 and the largest term is exactly 1:

  * entries outside ``active`` are set to ``s`` *before* the exponential and zeroed after it: a
    masked-out loss larger than the group's own maximum (e.g. a negative pair's loss in the
    positive group) can therefore never overflow and turn its zero cotangent into NaN;
  * the log-mean is taken as ``log(sum / n)`` when the mean is small (small ``gamma``: one or a
    few terms dominate; the sum is accurate and the weights ``exp(.) / sum`` add up to one to
    float32 precision however many pairs there are), and as
    ``log1p(mean(expm1(.)))`` when it is near 1 (large ``gamma``, where ``F`` tends to the plain
    mean and ``log(mean)`` would lose the small difference to 1). Both branches are evaluated on
    safe inputs, so the branch not taken has a finite gradient too.
  """
  n = _group_sum(active.astype(jnp.float32), axis)
  shift = jnp.max(jnp.where(active, losses, 0.0), axis=axis)  # losses >= 0, so 0 is a floor
  shift = jax.lax.stop_gradient(shift)
  shift_b = shift if axis is None else jnp.expand_dims(shift, axis)
  z = (jnp.where(active, losses, shift_b) - shift_b) / gamma  # <= 0; 0 outside ``active``
  s = _group_sum(jnp.where(active, jnp.exp(z), 0.0), axis)  # >= 1 for a nonempty group
  s_m1 = _group_sum(jnp.where(active, jnp.expm1(z), 0.0), axis)  # = s - n, without cancelling
  if add_one:  # one more pair with loss 0
    s = s + jnp.exp(-shift / gamma)
    s_m1 = s_m1 + jnp.expm1(-shift / gamma)
    n = n + 1.0
  nonempty = n > 0
  n_safe = jnp.maximum(n, 1.0)
  mean = s / n_safe  # in [1/n, 1] for a nonempty group
  near_one = mean > 0.5
  log_mean = jnp.where(
      near_one,
      jnp.log1p(jnp.where(near_one, s_m1 / n_safe, 0.0)),
      jnp.log(jnp.where(near_one | ~nonempty, 1.0, mean)))
  return jnp.where(nonempty, shift + gamma * log_mean, 0.0)


def dro_kl(embeddings, labels, *, ref_embeddings=None, ref_labels=None, ref_mask=None,
           gamma: float = 0.1, base: str = "margin", margin: float = 0.2, threshold: float = 0.5,
           alpha: float = 2.0, beta: float = 50.0, binomial_form: str = "plain") -> Array:
  """DRO-KL with the closed-form optimal weights (sec. 3.2).

  ``F = max_{p in simplex} sum_ij p_ij l_ij - gamma KL(p || 1/n)`` over the ``n`` pairs with a
  nonzero loss, whose value is ``gamma * log((1/n) sum_ij exp(l_ij / gamma))`` and whose optimum
  is ``p*_ij = exp(l_ij / gamma) / sum_kl exp(l_kl / gamma)``. The returned value is ``F`` itself,
  so ``grad F = sum_ij p*_ij grad l_ij`` exactly (Lemma 1 of the paper; ``p*`` is unique).
  ``gamma -> 0`` approaches the maximal pair loss, ``gamma -> inf`` the plain mean. The weights
  sum to one to float32 precision at any ``gamma > 0`` and batch size (module docstring).

  Args:
    gamma: KL weight, > 0 (the paper tunes it in 0.1..0.9 and uses 0.1 for timing).
    others: as in :func:`dro_topk`.

  Returns:
    Scalar robust loss ``F`` (>= the mean nonzero pair loss; 0 when no pair has a loss).
  """
  _check_gamma("gamma", gamma)
  pairs = core.check_inputs(embeddings, labels, ref_embeddings, ref_labels, ref_mask)
  losses, active = base_pair_losses(pairs, base, margin=margin, threshold=threshold, alpha=alpha,
                                    beta=beta, binomial_form=binomial_form)
  return _kl_robust(losses, active, gamma)


def dro_kl_sampled(embeddings, labels, *, rng, ref_embeddings=None, ref_labels=None,
                   ref_mask=None, num_samples: Optional[int] = None, gamma: float = 0.1,
                   base: str = "margin", margin: float = 0.2, threshold: float = 0.5,
                   alpha: float = 2.0, beta: float = 50.0, binomial_form: str = "plain") -> Array:
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
                                    beta=beta, binomial_form=binomial_form)
  flat = losses.reshape(-1)
  act = active.reshape(-1)
  any_active = jnp.any(act)
  # Logits l / gamma, shifted by the largest active one (<= 0 on active pairs, whatever gamma);
  # inactive pairs get a finite large negative logit. All-inactive batches get uniform logits
  # (anything finite), and the draws are then zeroed.
  const = jax.lax.stop_gradient(flat)
  top = jnp.max(jnp.where(act, const, 0.0))
  logits = jnp.where(act, (jnp.where(act, const, top) - top) / gamma, core.NEG_INF)
  logits = jnp.where(any_active, logits, 0.0)
  idx = jax.random.categorical(rng, logits, shape=(num_samples,))
  counts = jnp.zeros(flat.shape, jnp.float32).at[idx].add(1.0)
  weights = jnp.where(act & any_active, counts / num_samples, 0.0)
  return jnp.sum(weights * flat)


def dro_grouped_kl(embeddings, labels, *, ref_embeddings=None, ref_labels=None, ref_mask=None,
                   gamma: float = 1.0, gamma_pos: Optional[float] = None,
                   gamma_neg: Optional[float] = None, add_one: bool = False,
                   base: str = "margin", margin: float = 0.2, threshold: float = 0.5,
                   alpha: float = 2.0, beta: float = 50.0, binomial_form: str = "plain",
                   reduction: str = "mean") -> Array:
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
    others: as in :func:`dro_topk`.

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
                                    beta=beta, binomial_form=binomial_form)
  per_anchor = (_kl_robust(losses, active & pairs.pos, gamma_pos, axis=1, add_one=add_one)
                + _kl_robust(losses, active & pairs.neg, gamma_neg, axis=1, add_one=add_one))
  if reduction == "none":
    return per_anchor
  total = jnp.sum(per_anchor)
  return total if reduction == "sum" else total / per_anchor.shape[0]
