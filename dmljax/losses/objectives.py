"""Training objectives of CCP and PROFS built from the losses: the proximal term, CCP's
sample-to-proxy plus in-batch objective, and PROFS's regularised margin objective.

* :func:`proximal` -- ``lam / 2 * ||theta - theta_a||^2`` over (a masked part of) a pytree, the
  term both CCP (Gürbüz et al., *Deep Metric Learning with Chance Constraints*) and PROFS (Can
  et al., *Deep Metric Learning with Alternating Projections onto Feasible Sets*) add to pull the
  weights towards the previous solution.
* :func:`ccp_objective` -- CCP's loss: ``proxy_weight * L(samples, proxies) + batch_weight *
  L(samples, samples)`` with any registered pair loss.
* :func:`profs_objective` -- eq. 4.6 of PROFS: margin terms between every sample and every class
  representative, plus the proximal term.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp

from dmljax.losses import core

__all__ = ["proximal", "ccp_objective", "profs_objective"]

Array = jax.Array
PyTree = Any


def _key_name(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def path_str(path) -> str:
  """``"backbone/conv1/kernel"`` for a ``jax.tree_util`` key path."""
  return "/".join(_key_name(k) for k in path)


def _leaf_flags(params: PyTree, mask) -> list:
  """One flag per leaf of ``params`` (Python bool or bool array), in ``tree_leaves`` order."""
  leaves_with_path, _ = jax.tree_util.tree_flatten_with_path(params)
  if mask is None:
    return [True] * len(leaves_with_path)
  if callable(mask):
    return [mask(path_str(p)) for p, _ in leaves_with_path]
  try:
    full = jax.tree_util.tree_map(
        lambda m, sub: jax.tree_util.tree_map(lambda _: m, sub), mask, params)
  except (ValueError, TypeError) as e:
    raise ValueError(
        "mask must be a pytree prefix of params with one bool per subtree (e.g. "
        "{'backbone': True, 'head': True, 'proxies': False} for params with exactly those "
        f"top-level keys), or a callable path -> bool; got {mask!r} ({e}).") from None
  return jax.tree_util.tree_leaves(full)


def proximal(params: PyTree, anchor: PyTree, lam, mask: Union[None, PyTree, Callable] = None
             ) -> Array:
  """Proximal term ``lam / 2 * sum_leaves ||theta - theta_a||^2`` over the selected leaves.

  The anchor is a constant (``stop_gradient``): the gradient w.r.t. ``params`` is
  ``lam * (theta - theta_a)`` on selected leaves and 0 elsewhere.

  Args:
    params: pytree of arrays, the current weights ``theta``.
    anchor: pytree of the same structure and shapes, the previous solution ``theta_a``.
    lam: the weight ``lambda >= 0`` (Python number or scalar array; PROFS uses 1e-3).
    mask: which leaves the term applies to. ``None``: all. A pytree *prefix* of ``params`` whose
      leaves are bools (Python or scalar arrays), each covering the whole subtree below it,
      e.g. ``{"backbone": True, "head": True, "proxies": False}`` — CCP's choice: backbone and
      embedding head, not the proxies. Or a callable taking the leaf's ``/``-joined key path
      (``"backbone/conv1/kernel"``) and returning a bool.

  Returns:
    Scalar float32.

  Raises:
    ValueError: ``lam < 0``, ``anchor`` not matching ``params``, or a mask that is not a prefix.
  """
  core.check_range("lam", lam, low=0.0)
  p_leaves, p_def = jax.tree_util.tree_flatten(params)
  a_leaves, a_def = jax.tree_util.tree_flatten(anchor)
  if p_def != a_def:
    raise ValueError(f"anchor must have the structure of params; got {a_def} vs {p_def}.")
  for p, a in zip(p_leaves, a_leaves):
    if jnp.shape(p) != jnp.shape(a):
      raise ValueError(f"anchor leaf shape {jnp.shape(a)} does not match params leaf shape "
                       f"{jnp.shape(p)}.")
  flags = _leaf_flags(params, mask)
  total = jnp.zeros((), jnp.float32)
  for p, a, flag in zip(p_leaves, a_leaves, flags):
    if isinstance(flag, (bool, type(None))) and not flag:
      continue  # statically excluded: no work at all
    diff = jnp.asarray(p, jnp.float32) - jax.lax.stop_gradient(jnp.asarray(a, jnp.float32))
    sq = jnp.sum(diff * diff)
    total = total + (sq if isinstance(flag, bool) else jnp.where(flag, sq, 0.0))
  return 0.5 * lam * total


def _resolve_loss(loss):
  if callable(loss):
    return loss
  from dmljax.losses import get_loss  # lazy: dmljax.losses imports this module
  return get_loss(loss)


def ccp_objective(embeddings, labels, proxies, proxy_labels, *,
                  proxy_loss: Union[str, Callable] = "contrastive",
                  batch_loss: Union[str, Callable, None] = "contrastive",
                  proxy_weight: float = 1.0, batch_weight: float = 0.1,
                  proxy_loss_kwargs: Optional[dict] = None,
                  batch_loss_kwargs: Optional[dict] = None, proxy_mask=None):
  """CCP's objective: a sample-to-proxy pair loss plus a weighted in-batch pair loss.

  ``total = proxy_weight * proxy_loss(embeddings, labels, ref_embeddings=proxies,
  ref_labels=proxy_labels, ref_mask=proxy_mask) + batch_weight * batch_loss(embeddings, labels)``

  The CCP authors' code uses 1.0 x the sample-to-proxy loss + 0.1 x *the same loss with the
  same settings* over in-batch pairs (their CCP loss subclasses the configured pair loss: C2-CCP's
  in-batch term is C2, MS-CCP's multi-similarity); the ``ccp`` framework passes the same loss and
  keyword arguments for both by default. The proximal term is separate (:func:`proximal`), since
  it acts on the weights, not the embeddings.

  Args:
    embeddings: ``[B, D]`` sample embeddings; labels: ``[B]`` int.
    proxies: ``[P, D]`` proxies (several per class allowed); proxy_labels: ``[P]`` int.
    proxy_loss: a loss name of :data:`dmljax.losses.LOSSES` or a callable with the loss call
      shape; it gets the proxies as references.
    batch_loss: the same for the in-batch term, or ``None`` to drop it.
    proxy_weight, batch_weight: the weights (>= 0).
    proxy_loss_kwargs, batch_loss_kwargs: hyperparameters passed to each loss.
    proxy_mask: optional ``[P]`` bool, proxies that exist (``ref_mask`` of the proxy loss).

  Returns:
    ``(total, {"proxy": proxy_term, "batch": batch_term})``: scalar total and the unweighted
    parts (``batch`` is 0 when ``batch_loss`` is None).
  """
  core.check_range("proxy_weight", proxy_weight, low=0.0)
  core.check_range("batch_weight", batch_weight, low=0.0)
  proxy_fn = _resolve_loss(proxy_loss)
  proxy_term = proxy_fn(embeddings, labels, ref_embeddings=proxies, ref_labels=proxy_labels,
                        ref_mask=proxy_mask, **(proxy_loss_kwargs or {}))
  if batch_loss is None:
    batch_term = jnp.zeros((), jnp.float32)
  else:
    batch_term = _resolve_loss(batch_loss)(embeddings, labels, **(batch_loss_kwargs or {}))
  total = proxy_weight * proxy_term + batch_weight * batch_term
  return total, {"proxy": proxy_term, "batch": batch_term}


def profs_objective(embeddings, labels, rep_embeddings, rep_labels, *, rep_mask=None,
                    pair_mask=None, pos_margin: float = 1.0, neg_margin: float = 1.4,
                    reduction: str = "sum",
                    params: Optional[PyTree] = None, anchor: Optional[PyTree] = None,
                    lam: float = 1e-3, param_mask=None):
  """PROFS's regularised margin objective (eq. 4.6 of Can et al.)::

      lam/2 ||theta^(k-1) - theta||^2
        + sum_{l, j} y_{k_l,j} [d(k_l, j) - eps+]_+ + (1 - y_{k_l,j}) [eps- - d(k_l, j)]_+

  over every class representative ``k_l`` (the references) and every sample ``j`` of the batch,
  ``d`` the Euclidean distance. Pairs of a representative with itself (when it is also in the
  batch) have ``d = 0`` and add nothing. The defaults ``eps+ = 1.0, eps- = 1.4`` are Wu et al.'s
  margin loss (``beta = 1.2``, margin ``delta = 0.2``, ``eps+- = beta -+ delta``), the baseline
  PROFS adapts; ``lam = 1e-3`` is PROFS's.

  Args:
    embeddings: ``[B, D]`` batch embeddings; labels: ``[B]`` int.
    rep_embeddings: ``[L, D]`` class representatives; rep_labels: ``[L]`` int.
    rep_mask: optional ``[L]`` bool, representatives that exist. The ``profs`` framework
      passes the batch itself as the references with ``rep_mask`` its representative flags.
    pair_mask: optional ``[B, L]`` bool, (sample, representative) pairs to keep (as the pair
      losses' ``pair_mask``).
    pos_margin: ``eps+ >= 0``; neg_margin: ``eps- >= eps+``.
    reduction: ``"sum"`` (eq. 4.6 as written), ``"mean"`` (over all sample-representative pairs)
      or ``"mean_nonzero"`` (over pairs with a nonzero term).
    params, anchor, lam, param_mask: when ``params`` is given, adds
      ``proximal(params, anchor, lam, param_mask)``; ``anchor`` is then required.

  Returns:
    ``(total, {"pairs": pair_term, "proximal": proximal_term})``.
  """
  core.check_range("pos_margin", pos_margin, low=0.0)
  core.check_range("neg_margin", neg_margin, low=0.0)
  if not isinstance(pos_margin, jax.core.Tracer) and not isinstance(neg_margin, jax.core.Tracer):
    if float(pos_margin) > float(neg_margin):
      raise ValueError(f"pos_margin (eps+ = {pos_margin}) must be <= neg_margin (eps- = "
                       f"{neg_margin}): PROFS's feasible set needs eps+ < eps-.")
  core.check_reduction(reduction, ("sum", "mean", "mean_nonzero"))
  pairs = core.check_inputs(embeddings, labels, rep_embeddings, rep_labels, rep_mask, pair_mask)
  d = core.euclidean_distance(pairs.emb, pairs.ref)
  terms = jnp.where(pairs.pos, jax.nn.relu(d - pos_margin), jax.nn.relu(neg_margin - d))
  pair_term = core.reduce(terms, pairs.valid, reduction)
  if params is None:
    prox = jnp.zeros((), jnp.float32)
  else:
    if anchor is None:
      raise ValueError("profs_objective got params but no anchor; pass the previous solution "
                       "theta^(k-1) as anchor (or leave params=None).")
    prox = proximal(params, anchor, lam, param_mask)
  return pair_term + prox, {"pairs": pair_term, "proximal": prox}
