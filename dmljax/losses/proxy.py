"""Proxy-based losses: ProxyNCA, ProxyNCA++, ProxyAnchor and SoftTriple.

The proxies are passed as references (see :mod:`dmljax.losses.core`)::

    loss(embeddings, labels, *, ref_embeddings=proxies, ref_labels=proxy_class_ids,
         ref_mask=None, <hyperparameters>, reduction=...)

``ref_embeddings`` is the ``[R, D]`` proxy matrix, ``ref_labels`` the ``[R]`` class id of each
proxy, and ``ref_mask`` (optional, ``[R]`` bool) switches proxies off (a masked proxy takes part
in no term). The proxies are learnable: the losses are differentiable with respect to
``ref_embeddings`` as well as ``embeddings``.

Embeddings and proxies are used as given (as PML does when its distance is configured with
``normalize_embeddings=False``); PML's default distances L2-normalise both inside the loss, so on
unit-norm inputs values agree with PML's defaults and gradients agree with PML's
non-normalising configuration (:func:`proxy_nca_pp` is the exception: the ProxyNCA++ paper makes
normalisation part of the loss, so it normalises by default).

Every similarity is a ``[B, R]`` matrix product: no ``[B, R, D]`` tensor is ever formed, which
matters at tens of thousands of proxies (SOP: 11,318 classes x 4 proxies).

Two proxy layouts are used:

* *Any layout* (:func:`proxy_nca`, :func:`proxy_nca_pp`, :func:`proxy_anchor`): ``ref_labels``
  gives each proxy's class, several proxies may share a class and they can appear in any order.
* *Class-major layout* (:func:`soft_triple`, and the MPA family in :mod:`dmljax.losses.mpa`):
  the ``K = centers_per_class`` proxies of one class are consecutive rows, so row ``c * K + k``
  is centre ``k`` of group ``c``, e.g. ``ref_labels = jnp.repeat(jnp.arange(C), K)``. The
  group's class is read from ``ref_labels[c * K]``; when ``ref_labels`` is concrete (not traced)
  it is checked that each group holds one class.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dmljax.losses import core

Array = jax.Array

__all__ = ["proxy_nca", "proxy_nca_pp", "proxy_anchor", "soft_triple"]


# ----------------------------------------------------------------------------- shared helpers


def _check_proxies(name, embeddings, labels, ref_embeddings, ref_labels, ref_mask) -> core.Pairs:
  """check_inputs, plus the requirement that the proxies are given."""
  if ref_embeddings is None or ref_labels is None:
    raise ValueError(
        f"{name} is a proxy loss: pass the proxies as ref_embeddings=[num_proxies, dim] and "
        f"their class ids as ref_labels=[num_proxies].")
  return core.check_inputs(embeddings, labels, ref_embeddings, ref_labels, ref_mask)


def _slot_mask(ref_mask, r: int) -> Array:
  return jnp.ones((r,), bool) if ref_mask is None else jnp.asarray(ref_mask, bool)


def _log1p_sum_exp(x: Array, mask: Array, axis: int) -> Array:
  """``log(1 + sum_{mask} exp(x))`` along ``axis``, stable, without a concatenated zero column.

  Entries outside ``mask`` get zero gradient; an empty mask gives exactly 0.
  """
  x = jnp.where(mask, x, core.NEG_INF)
  # The implicit "1" is exp(0), so the shift is at least 0.
  m = jax.lax.stop_gradient(jnp.maximum(jnp.max(x, axis=axis, keepdims=True), 0.0))
  s = jnp.sum(jnp.exp(x - m), axis=axis, keepdims=True) + jnp.exp(-m)
  return jnp.squeeze(jnp.log(s) + m, axis=axis)


def _nca_terms(logits: Array, pairs: core.Pairs):
  """Per-row ``-log(sum_{pos} softmax(logits))``, and the rows that have a positive proxy."""
  return _softmax_nll(logits, pairs.pos, pairs.neg)


def _softmax_nll(logits: Array, pos: Array, neg: Array):
  """Per-row ``-log(sum_pos exp / (sum_pos exp + sum_neg exp))`` and the rows with a positive.

  Computed as ``softplus(lse_neg - lse_pos)`` rather than ``lse_all - lse_pos``, which would
  cancel to 0 in float32 once the loss drops below ~1e-7 (an easy, well-separated sample).
  Rows without a positive have no defined loss: they give 0 (finite, zero gradient).
  """
  has_pos = jnp.any(pos, axis=1)
  lse_pos = core.masked_logsumexp(logits, pos, axis=1)
  lse_neg = core.masked_logsumexp(logits, neg, axis=1)
  loss = jax.nn.softplus(jnp.where(has_pos, lse_neg - lse_pos, core.NEG_INF))
  return loss, has_pos


class _ClassGroups(NamedTuple):
  """Proxies of the class-major layout, reshaped to ``[C, K, ...]``.

  With ``per_class=False`` the batch axis comes first (``sim`` ``[B, C, K]``, ``pos``/``neg``
  ``[B, C]``: reductions over classes run along the last axis); with ``per_class=True`` it
  comes last (``[C, K, B]`` and ``[C, B]``: reductions over the batch run along the last axis,
  which XLA:CPU does far faster than reductions along the first axis).

  Attributes:
    sim: inner products between embeddings and centres.
    slot_ok: ``[C, K]`` bool, centres that are not masked.
    class_ok: ``[C]`` bool, groups with at least one unmasked centre.
    group_labels: ``[C]`` int32, the class of each group.
    pos: bool, the group is of the sample's class (and valid).
    neg: bool, the group is of another class (and valid).
    per_class: static bool, the orientation above.
  """
  sim: Array
  slot_ok: Array
  class_ok: Array
  group_labels: Array
  pos: Array
  neg: Array
  per_class: bool


def _class_groups(pairs: core.Pairs, ref_mask, centers_per_class: int,
                  per_class: bool = False) -> _ClassGroups:
  """Reshapes the proxies of a class-major layout (row ``c * K + k`` is centre k of group c)."""
  r = pairs.ref.shape[0]
  k = centers_per_class
  if r % k:
    raise ValueError(
        f"The number of proxies ({r}) must be a multiple of centers_per_class ({k}): row "
        f"c * {k} + k holds centre k of class group c.")
  c = r // k
  if not isinstance(pairs.ref_labels, jax.core.Tracer):
    try:
      lab = np.asarray(pairs.ref_labels).reshape(c, k)
    except (TypeError, jax.errors.ConcretizationTypeError):
      lab = None
    if lab is not None and not np.all(lab == lab[:, :1]):
      raise ValueError(
          f"ref_labels must be class-major: rows c*{k} .. c*{k}+{k - 1} (the centres of one "
          f"group) must share one class id; build them as jnp.repeat(class_ids, {k}).")
  slot_ok = _slot_mask(ref_mask, r).reshape(c, k)
  class_ok = jnp.any(slot_ok, axis=1)
  group_labels = pairs.ref_labels.reshape(c, k)[:, 0]
  if per_class:
    sim = core.dot_similarity(pairs.ref, pairs.emb).reshape(c, k, -1)
    same = group_labels[:, None] == pairs.labels[None, :]
    ok = class_ok[:, None]
  else:
    sim = core.dot_similarity(pairs.emb, pairs.ref).reshape(-1, c, k)
    same = pairs.labels[:, None] == group_labels[None, :]
    ok = class_ok[None, :]
  return _ClassGroups(sim, slot_ok, class_ok, group_labels, same & ok, ~same & ok, per_class)


def _soft_class_similarity(groups: _ClassGroups, gamma) -> Array:
  """SoftTriple's relaxed similarity to a class (SoftTriple eq. 7, MPA eq. 1).

  ``S(x, c) = sum_k softmax_k(x.w_ck / gamma) x.w_ck`` over the unmasked centres of group c;
  ``[B, C]`` (or ``[C, B]`` with ``per_class``). Groups with every centre masked give 0 (and
  are excluded by ``class_ok`` downstream).
  """
  if groups.per_class:
    ok, axis = groups.slot_ok[:, :, None], 1
  else:
    ok, axis = groups.slot_ok[None], 2
  z = jnp.where(ok, groups.sim / gamma, core.NEG_INF)
  p = jnp.where(ok, jax.nn.softmax(z, axis=axis), 0.0)
  return jnp.sum(p * groups.sim, axis=axis)


def _center_regularizer(groups: _ClassGroups, ref: Array) -> Array:
  """SoftTriple's centre regulariser (MPA eq. 3), ``sum_{c, t<s} sqrt(2 - 2 w_cs.w_ct) / (C K (K-1))``.

  The sum runs over pairs of unmasked centres of the same group and is divided by twice the
  number of such pairs (``C K (K - 1)`` when nothing is masked; PML's SparseCentersRegularizer
  divides the same way). ``2 - 2 w_s.w_t`` (the squared distance of unit-norm centres) is
  clamped at 0 and its square root has a zero gradient at 0, so coincident or non-normalised
  centres stay finite. With one centre per class there are no pairs and the value is 0.
  """
  c, k = groups.slot_ok.shape
  if k == 1:
    return jnp.zeros((), jnp.float32)
  w = ref.reshape(c, k, -1)
  gram = jnp.einsum("ckd,cld->ckl", w, w, precision=jax.lax.Precision.HIGHEST)
  upper = jnp.triu(jnp.ones((k, k), bool), 1)[None]
  pair_ok = upper & groups.slot_ok[:, :, None] & groups.slot_ok[:, None, :]
  dist = core.safe_sqrt(jnp.maximum(2.0 - 2.0 * gram, 0.0))
  num_pairs = jnp.sum(pair_ok.astype(jnp.float32))
  return jnp.sum(jnp.where(pair_ok, dist, 0.0)) / jnp.maximum(2.0 * num_pairs, 1.0)


def _check_int(name: str, value, low: int = 1) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
    raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.")
  return int(value)


# ----------------------------------------------------------------------------- ProxyNCA


def proxy_nca(embeddings, labels, *, ref_embeddings=None, ref_labels=None, ref_mask=None,
              softmax_scale=1.0, reduction: str = "mean") -> Array:
  """ProxyNCA (Movshovitz-Attias et al., ICCV 2017), as PML's ``ProxyNCALoss``.

  For each sample ``x`` with label ``y``::

      loss(x) = -log( sum_{p: label(p) = y} exp(-s d(x, p)) / sum_{p} exp(-s d(x, p)) )

  with ``d`` the squared Euclidean distance and ``s = softmax_scale``. As in PML the positive
  proxies are in the denominator too (the paper's version leaves them out), and several
  proxies of one class add their probabilities. Matches
  ``losses.ProxyNCALoss(num_classes, dim, softmax_scale=s)`` (PML default distance
  ``LpDistance(power=2)``, MeanReducer) with ``proxies = loss.proxies`` on unit-norm inputs.

  Args:
    embeddings: ``[B, D]`` embeddings.
    labels: ``[B]`` integer labels.
    ref_embeddings: ``[R, D]`` proxies (required).
    ref_labels: ``[R]`` class of each proxy (required); any order, repeats allowed.
    ref_mask: optional ``[R]`` bool, proxies that take part.
    softmax_scale: ``s > 0``; ProxyNCA++'s temperature ``T`` is ``1 / s``.
    reduction: ``"mean"`` (PML's MeanReducer), ``"mean_nonzero"``, ``"sum"`` or ``"none"``.

  Returns:
    Scalar loss (``[B]`` per-sample losses for ``"none"``). Samples whose class has no
    (unmasked) proxy are left out of the mean (PML drops them as well); if there is none, 0.
  """
  core.check_range("softmax_scale", softmax_scale, low=0.0, low_inclusive=False)
  core.check_reduction(reduction)
  pairs = _check_proxies("proxy_nca", embeddings, labels, ref_embeddings, ref_labels, ref_mask)
  logits = -softmax_scale * core.squared_distance(pairs.emb, pairs.ref)
  loss, has_pos = _nca_terms(logits, pairs)
  return core.reduce(loss, has_pos, reduction)


def proxy_nca_pp(embeddings, labels, *, ref_embeddings=None, ref_labels=None, ref_mask=None,
                 temperature=1.0 / 9.0, normalize: bool = True, reduction: str = "mean") -> Array:
  """ProxyNCA++ (Teh, DeVries, Taylor, ECCV 2020), eq. 5 of the paper.

  ::

      loss(x) = -log( sum_{p: label(p) = y} exp(-d(x^, p^) / T) / sum_{p} exp(-d(x^, p^) / T) )

  with ``d`` the squared Euclidean distance, ``x^ = x / ||x||`` and ``p^ = p / ||p||`` and the
  temperature ``T`` (``1/9`` in the paper). PML has no ProxyNCA++; the paper makes the L2
  normalisation of embeddings *and* proxies part of the loss, so this loss normalises both by
  default (``normalize=False`` uses them as given, and then ``proxy_nca_pp(T)`` equals
  ``proxy_nca(softmax_scale=1/T)``). The positive proxy is in the denominator (unlike the
  original ProxyNCA). The paper's other ingredients (global max pooling, fast-moving proxies
  through a larger proxy learning rate, layer norm) live in the model and optimiser, not here.

  Args:
    embeddings: ``[B, D]`` embeddings.
    labels: ``[B]`` integer labels.
    ref_embeddings: ``[R, D]`` proxies (required).
    ref_labels: ``[R]`` class of each proxy (required); any order, repeats allowed.
    ref_mask: optional ``[R]`` bool, proxies that take part.
    temperature: ``T > 0``.
    normalize: L2-normalise embeddings and proxies inside the loss (the paper's definition).
    reduction: ``"mean"`` (paper), ``"mean_nonzero"``, ``"sum"`` or ``"none"``.

  Returns:
    Scalar loss (``[B]`` for ``"none"``); samples whose class has no proxy are left out.
  """
  core.check_range("temperature", temperature, low=0.0, low_inclusive=False)
  core.check_reduction(reduction)
  pairs = _check_proxies("proxy_nca_pp", embeddings, labels, ref_embeddings, ref_labels,
                         ref_mask)
  emb, ref = pairs.emb, pairs.ref
  if normalize:
    emb, ref = core.l2_normalize(emb), core.l2_normalize(ref)
  logits = -core.squared_distance(emb, ref) / temperature
  loss, has_pos = _nca_terms(logits, pairs)
  return core.reduce(loss, has_pos, reduction)


# ----------------------------------------------------------------------------- ProxyAnchor


def proxy_anchor(embeddings, labels, *, ref_embeddings=None, ref_labels=None, ref_mask=None,
                 margin=0.1, alpha=32.0, reduction: str = "mean") -> Array:
  """Proxy Anchor (Kim et al., CVPR 2020, eq. 4), as PML's ``ProxyAnchorLoss``.

  With ``s(x, p) = x . p`` (cosine similarity on unit-norm inputs)::

      loss = 1/|P+| sum_{p in P+} log(1 + sum_{x in X_p+} exp(-alpha (s(x, p) - margin)))
           + 1/|P|  sum_{p in P}  log(1 + sum_{x in X_p-} exp( alpha (s(x, p) + margin)))

  ``P`` are the (unmasked) proxies, ``P+`` those with at least one sample of their class in
  the batch, ``X_p+`` / ``X_p-`` the batch samples of / not of the proxy's class. Several
  proxies per class are allowed: each proxy is its own anchor (its positives are all samples
  of its class), so a class with K proxies contributes K positive and K negative terms.
  Matches ``losses.ProxyAnchorLoss(num_classes, dim, margin=margin, alpha=alpha)`` (PML
  DivisorReducer) with ``ref_labels = arange(num_classes)`` on unit-norm inputs.

  Args:
    embeddings: ``[B, D]`` embeddings.
    labels: ``[B]`` integer labels.
    ref_embeddings: ``[R, D]`` proxies (required).
    ref_labels: ``[R]`` class of each proxy (required); any order, repeats allowed.
    ref_mask: optional ``[R]`` bool, proxies that take part.
    margin: ``delta >= 0``.
    alpha: scale ``> 0``.
    reduction: ``"mean"`` (the formula above, PML's DivisorReducer), ``"sum"`` (the positive
      and negative terms summed over proxies, undivided) or ``"none"`` (``[R]``: positive plus
      negative term of each proxy, 0 for masked ones).

  Returns:
    Scalar loss. Degenerate cases: no proxy with a positive sample gives a zero positive part;
    no unmasked proxy gives 0.
  """
  core.check_range("margin", margin, low=0.0)
  core.check_range("alpha", alpha, low=0.0, low_inclusive=False)
  core.check_reduction(reduction, ("mean", "sum", "none"))
  pairs = _check_proxies("proxy_anchor", embeddings, labels, ref_embeddings, ref_labels,
                         ref_mask)
  # [R, B] orientation: the sums over the batch then run along the minor axis, ~3x faster on
  # XLA:CPU than column sums of a [B, R] matrix at 45k proxies (benchmarks/losses.py).
  sim = core.dot_similarity(pairs.ref, pairs.emb)
  slot_ok = _slot_mask(ref_mask, pairs.ref.shape[0])[:, None]
  same = pairs.ref_labels[:, None] == pairs.labels[None, :]
  pos, neg = same & slot_ok, ~same & slot_ok
  pos_term = _log1p_sum_exp(-alpha * (sim - margin), pos, axis=1)
  neg_term = _log1p_sum_exp(alpha * (sim + margin), neg, axis=1)
  if reduction == "none":
    return pos_term + neg_term
  if reduction == "sum":
    return jnp.sum(pos_term) + jnp.sum(neg_term)
  num_with_pos = jnp.sum(jnp.any(pos, axis=1).astype(jnp.float32))
  num_proxies = jnp.sum(slot_ok.astype(jnp.float32))
  return (jnp.sum(pos_term) / jnp.maximum(num_with_pos, 1.0)
          + jnp.sum(neg_term) / jnp.maximum(num_proxies, 1.0))


# ----------------------------------------------------------------------------- SoftTriple


def soft_triple(embeddings, labels, *, ref_embeddings=None, ref_labels=None, ref_mask=None,
                centers_per_class: int = 10, la=20.0, gamma=0.1, margin=0.01,
                reg_weight=0.2, reduction: str = "mean") -> Array:
  """SoftTriple (Qian et al., ICCV 2019, eqs. 7-10), PML's ``SoftTripleLoss`` plus its regulariser.

  The proxies are ``K = centers_per_class`` centres per class in class-major layout (row
  ``c * K + k`` is centre k of class group c; see the module docstring). With
  ``S(x, c) = sum_k softmax_k(x.w_ck / gamma) x.w_ck``::

      loss(x) = -log( exp(la (S(x, y) - margin)) /
                      (exp(la (S(x, y) - margin)) + sum_{c != y} exp(la S(x, c))) )
      loss = mean_x loss(x) + reg_weight * R,
      R = sum_c sum_{t<s} sqrt(2 - 2 w_cs.w_ct) / (C K (K - 1))   (the centre regulariser).

  PML's ``SoftTripleLoss`` leaves the regulariser out by default; the paper has it with
  ``tau = 0.2``, which is this loss's default. ``reg_weight=0`` matches
  ``losses.SoftTripleLoss(C, dim, centers_per_class=K, la, gamma, margin)`` and the default
  matches it with ``weight_regularizer=regularizers.SparseCentersRegularizer(C, K),
  weight_reg_weight=0.2`` (proxies ``= loss.fc.T``; unit-norm inputs). If several groups
  carry the same class id, all of them count as positive (their probabilities add).

  Args:
    embeddings: ``[B, D]`` embeddings.
    labels: ``[B]`` integer labels.
    ref_embeddings: ``[C * K, D]`` centres (required).
    ref_labels: ``[C * K]`` class of each centre, class-major (required).
    ref_mask: optional ``[C * K]`` bool, centres that take part (a group with no centre left
      drops out of the softmax).
    centers_per_class: ``K >= 1``.
    la: ``lambda > 0``, the scale of the softmax over classes.
    gamma: ``> 0``, the temperature of the softmax over a class's centres.
    margin: ``delta >= 0``.
    reg_weight: ``tau >= 0``, weight of the centre regulariser.
    reduction: ``"mean"``, ``"mean_nonzero"``, ``"sum"`` (the paper's eq. 10 sums over samples)
      or ``"none"`` (``[B]`` per-sample terms, *without* the regulariser, which belongs to the
      centres and not to any sample).

  Returns:
    Scalar loss. Samples whose class has no centre are left out of the reduction.
  """
  k = _check_int("centers_per_class", centers_per_class)
  core.check_range("la", la, low=0.0, low_inclusive=False)
  core.check_range("gamma", gamma, low=0.0, low_inclusive=False)
  core.check_range("margin", margin, low=0.0)
  core.check_range("reg_weight", reg_weight, low=0.0)
  core.check_reduction(reduction)
  pairs = _check_proxies("soft_triple", embeddings, labels, ref_embeddings, ref_labels,
                         ref_mask)
  groups = _class_groups(pairs, ref_mask, k)
  s = _soft_class_similarity(groups, gamma)
  logits = la * (s - margin * groups.pos.astype(jnp.float32))
  per_sample, has_pos = _softmax_nll(logits, groups.pos, groups.neg)
  out = core.reduce(per_sample, has_pos, reduction)
  if reduction == "none":
    return out
  return out + reg_weight * _center_regularizer(groups, pairs.ref)
