"""The Multi Proxy Anchor family of Saeki, Kawahara and Aman (2023): MPA, MPA-DW and MPA-AP.

Paper: *Multi Proxy Anchor Family Loss for Several Types of Gradients* (``shared/papers/003``).
PML has none of these losses; they follow the paper's equations.

Proxies are passed as references in the class-major layout of SoftTriple (see
:mod:`dmljax.losses.proxy`): ``K = centers_per_class`` consecutive rows per class group, row
``c * K + k`` is centre k of group c, the group's class is ``ref_labels[c * K]`` (e.g.
``ref_labels = jnp.repeat(jnp.arange(C), K)``). ``ref_mask`` switches centres off; a group
whose centres are all masked is not a class at all for the loss.

All three use SoftTriple's relaxed class similarity (eq. 1)::

    S(x, c) = sum_k softmax_k(x.w_ck / gamma) x.w_ck

and add the centre regulariser of eq. 3 with weight ``reg_weight`` (tau)::

    R = sum_c sum_{t<s} sqrt(2 - 2 w_cs.w_ct) / (C K (K - 1)).

Defaults are the paper's (section 4.2): ``gamma = 0.1``, ``margin`` (delta) ``= 0.1``,
``reg_weight`` (tau) ``= 0.2``, ``K = 10`` (CUB/Cars). The paper does not state ``alpha``; MPA
extends ProxyAnchor, so ProxyAnchor's ``alpha = 32`` is the default. With ``K = 1``,
``S(x, c) = x.w_c``, the regulariser vanishes and :func:`mpa` is exactly
:func:`dmljax.losses.proxy_anchor` with one proxy per class.

Embeddings and proxies are used as given (the paper L2-normalises both; do it in the model
head and on the proxies). Shapes are static; the similarities are one ``[B, C*K]`` matrix
product.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from dmljax.losses import core
from dmljax.losses import proxy as _proxy

Array = jax.Array

__all__ = ["mpa", "mpa_dw", "mpa_ap"]


def _prepare(name, embeddings, labels, ref_embeddings, ref_labels, ref_mask, centers_per_class,
             alpha, margin, gamma, reg_weight, reduction, allowed, per_class=False):
  """Checks the arguments; returns (class similarities, groups, regulariser).

  The similarities are ``[B, C]``, or ``[C, B]`` with ``per_class`` (for sums over the batch).
  """
  k = _proxy._check_int("centers_per_class", centers_per_class)
  core.check_range("alpha", alpha, low=0.0, low_inclusive=False)
  core.check_range("margin", margin, low=0.0)
  core.check_range("gamma", gamma, low=0.0, low_inclusive=False)
  core.check_range("reg_weight", reg_weight, low=0.0)
  core.check_reduction(reduction, allowed)
  pairs = _proxy._check_proxies(name, embeddings, labels, ref_embeddings, ref_labels, ref_mask)
  groups = _proxy._class_groups(pairs, ref_mask, k, per_class)
  s = _proxy._soft_class_similarity(groups, gamma)
  return s, groups, _proxy._center_regularizer(groups, pairs.ref)


def mpa(embeddings, labels, *, ref_embeddings=None, ref_labels=None, ref_mask=None,
        centers_per_class: int = 10, alpha=32.0, margin=0.1, gamma=0.1, reg_weight=0.2,
        reduction: str = "mean") -> Array:
  """MPA loss (eqs. 6-7): ProxyAnchor's class-wise structure over multi-centre classes.

  ::

      L = 1/|C+| sum_{c in C+} log(1 + sum_{x in X_c+} exp(-alpha (S(x, c) - margin)))
        + 1/|C|  sum_{c in C}  log(1 + sum_{x in X_c-} exp( alpha (S(x, c) + margin)))
        + reg_weight * R

  ``C`` are the class groups with an unmasked centre, ``C+`` those with at least one sample of
  their class in the batch, ``X_c+`` / ``X_c-`` the batch samples of / not of class c. The
  paper writes the negative divisor as ``|C-|`` without defining it; as in ProxyAnchor (which
  MPA reduces to with K = 1) it is taken to be the number of all classes.

  Args:
    embeddings: ``[B, D]`` embeddings.
    labels: ``[B]`` integer labels.
    ref_embeddings: ``[C * K, D]`` centres, class-major (required).
    ref_labels: ``[C * K]`` class of each centre (required).
    ref_mask: optional ``[C * K]`` bool, centres that take part.
    centers_per_class: ``K >= 1``.
    alpha: scale ``> 0``.
    margin: ``delta >= 0``.
    gamma: ``> 0``, temperature of the softmax over a class's centres.
    reg_weight: ``tau >= 0``.
    reduction: ``"mean"`` (the formula) or ``"none"`` (``[C]``: positive plus negative term of
      each class group, without the regulariser).

  Returns:
    Scalar loss; with no class present in the batch the positive part is 0, with no unmasked
    centre the loss is 0.
  """
  s, g, reg = _prepare("mpa", embeddings, labels, ref_embeddings, ref_labels, ref_mask,
                       centers_per_class, alpha, margin, gamma, reg_weight, reduction,
                       ("mean", "none"), per_class=True)
  pos_term = _proxy._log1p_sum_exp(-alpha * (s - margin), g.pos, axis=1)
  neg_term = _proxy._log1p_sum_exp(alpha * (s + margin), g.neg, axis=1)
  if reduction == "none":
    return pos_term + neg_term
  num_with_pos = jnp.sum(jnp.any(g.pos, axis=1).astype(jnp.float32))
  num_classes = jnp.sum(g.class_ok.astype(jnp.float32))
  return (jnp.sum(pos_term) / jnp.maximum(num_with_pos, 1.0)
          + jnp.sum(neg_term) / jnp.maximum(num_classes, 1.0) + reg_weight * reg)


def mpa_dw(embeddings, labels, *, ref_embeddings=None, ref_labels=None, ref_mask=None,
           centers_per_class: int = 10, alpha=32.0, margin=0.1, gamma=0.1, reg_weight=0.2,
           reduction: str = "mean") -> Array:
  """MPA-DW loss (eqs. 12-13): the data-wise MPA, a soft-plus per sample.

  ::

      L = 1/N sum_i [ log(1 + exp(-alpha (S(x_i, y_i) - margin)))
                      + log(1 + sum_{c != y_i} exp(alpha (S(x_i, c) + margin))) ]
        + reg_weight * R

  If several class groups carry the sample's class, the first term sums over all of them
  (``log(1 + sum_{c: label c = y_i} ...)``); if none does, it is 0 and the sample keeps its
  negative term. ``N`` is the batch size.

  Args:
    embeddings: ``[B, D]`` embeddings.
    labels: ``[B]`` integer labels.
    ref_embeddings: ``[C * K, D]`` centres, class-major (required).
    ref_labels: ``[C * K]`` class of each centre (required).
    ref_mask: optional ``[C * K]`` bool, centres that take part.
    centers_per_class: ``K >= 1``.
    alpha: scale ``> 0``.
    margin: ``delta >= 0``.
    gamma: ``> 0``, temperature of the softmax over a class's centres.
    reg_weight: ``tau >= 0``.
    reduction: ``"mean"`` (the formula), ``"sum"`` (sum over samples plus the regulariser) or
      ``"none"`` (``[B]`` per-sample terms without the regulariser).

  Returns:
    Scalar loss.
  """
  s, g, reg = _prepare("mpa_dw", embeddings, labels, ref_embeddings, ref_labels, ref_mask,
                       centers_per_class, alpha, margin, gamma, reg_weight, reduction,
                       ("mean", "sum", "none"))
  per_sample = (_proxy._log1p_sum_exp(-alpha * (s - margin), g.pos, axis=1)
                + _proxy._log1p_sum_exp(alpha * (s + margin), g.neg, axis=1))
  return _reduce_samples(per_sample, reg_weight * reg, reduction)


def mpa_ap(embeddings, labels, *, ref_embeddings=None, ref_labels=None, ref_mask=None,
           centers_per_class: int = 10, alpha=32.0, margin=0.1, gamma=0.1, reg_weight=0.2,
           reduction: str = "mean") -> Array:
  """MPA-AP loss (eqs. 15-17): data-wise and all-paired, one soft-plus over every class.

  ::

      S'(x_i, c) = margin - S(x_i, c)  if c = y_i,   S(x_i, c) + margin  otherwise,
      L = 1/N sum_i log(1 + sum_c exp(alpha S'(x_i, c))) + reg_weight * R

  Positive and negative classes share one log-sum-exp, so their similarities are weighed
  against each other (the P-N relations of the paper's Table 1).

  Args:
    embeddings: ``[B, D]`` embeddings.
    labels: ``[B]`` integer labels.
    ref_embeddings: ``[C * K, D]`` centres, class-major (required).
    ref_labels: ``[C * K]`` class of each centre (required).
    ref_mask: optional ``[C * K]`` bool, centres that take part.
    centers_per_class: ``K >= 1``.
    alpha: scale ``> 0``.
    margin: ``delta >= 0``.
    gamma: ``> 0``, temperature of the softmax over a class's centres.
    reg_weight: ``tau >= 0``.
    reduction: ``"mean"`` (the formula), ``"sum"`` or ``"none"`` (``[B]``, no regulariser).

  Returns:
    Scalar loss.
  """
  s, g, reg = _prepare("mpa_ap", embeddings, labels, ref_embeddings, ref_labels, ref_mask,
                       centers_per_class, alpha, margin, gamma, reg_weight, reduction,
                       ("mean", "sum", "none"))
  s_prime = jnp.where(g.pos, margin - s, s + margin)
  per_sample = _proxy._log1p_sum_exp(alpha * s_prime, g.class_ok[None, :], axis=1)
  return _reduce_samples(per_sample, reg_weight * reg, reduction)


def _reduce_samples(per_sample: Array, reg: Array, reduction: str) -> Array:
  if reduction == "none":
    return per_sample
  if reduction == "sum":
    return jnp.sum(per_sample) + reg
  return jnp.mean(per_sample) + reg
