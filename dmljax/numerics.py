"""Shared numerics and host services: the small leaf module every layer may import.

Models, losses, frameworks and the trainer all need a few of the same things: the embedding
normalisations (a model's head applies them, a loss documents them), copying a pytree into fresh
buffers, reading replicated arrays back to the host, resetting one parameter group's optimizer
state, and how an image batch enters a model. They live here, importing nothing of dmljax, so
that a model knows no loss, a framework no trainer module, and the arrows between packages only
point down. The older homes (``losses.core``, ``state``, ``parallel``, ``optim``) re-export them.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
PyTree = Any

#: Added inside square roots and norms so that gradients stay finite at zero.
EPS = 1e-12


# ----------------------------------------------------------------------------- normalisation


def l2_normalize(x: Array, axis: int = -1, eps: float = EPS) -> Array:
  """``x / ||x||`` with a finite gradient everywhere (the zero vector maps to zero)."""
  x = jnp.asarray(x)
  sq = jnp.sum(jnp.square(x.astype(jnp.float32)), axis=axis, keepdims=True)
  return (x * jax.lax.rsqrt(jnp.maximum(sq, eps))).astype(x.dtype)


def bounded_normalize(x: Array, axis: int = -1) -> Array:
  """CCP's Lipschitz normalisation ``x / max(1, ||x||)``: vectors inside the unit ball are kept.

  The gradient is finite everywhere, including at zero (where it is the identity).
  """
  x = jnp.asarray(x)
  sq = jnp.sum(jnp.square(x.astype(jnp.float32)), axis=axis, keepdims=True)
  # max(1, ||x||) == sqrt(max(1, ||x||^2)); the max keeps the sqrt away from zero.
  return (x / jnp.sqrt(jnp.maximum(sq, 1.0))).astype(x.dtype)


# ----------------------------------------------------------------------------- pytrees


def copy_tree(tree: PyTree) -> PyTree:
  """A copy with fresh buffers (so donating one copy never invalidates the other)."""
  return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def to_host(tree: PyTree) -> PyTree:
  """Numpy copy of a pytree of replicated (or fully addressable) arrays."""
  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(x.addressable_data(0))  # replicated: every shard holds the whole value
    return np.asarray(x)
  return jax.tree.map(get, tree)


def path_keys(path) -> tuple[str, ...]:
  """The dict keys / attribute names along a ``tree_util`` key path, as strings."""
  return tuple(str(getattr(p, "key", getattr(p, "name", p))) for p in path)


def reset_group_state(opt_state: PyTree, fresh_state: PyTree, group: str) -> PyTree:
  """Optimizer state with every entry under key ``group`` taken from ``fresh_state``.

  With the per-group moments of :func:`dmljax.optim.make_optimizer` this resets the group's
  moments and its own step count (a fresh Adam for that group); chain-level counts (the
  learning-rate schedule) are kept from ``opt_state``. Used by CCP when
  ``ccp.reset_proxy_opt_state`` is set.
  """
  def pick(path, old, new):
    return new if group in path_keys(path) else old
  return jax.tree_util.tree_map_with_path(pick, opt_state, fresh_state)


# ----------------------------------------------------------------------------- model input


def prepare_images(images: Array) -> Array:
  """How a batch enters a model: uint8 images as they are (the model normalises them as its
  backbone expects, on device); other images as float32 (taken as already normalised)."""
  if images.dtype == jnp.uint8:
    return images
  return images.astype(jnp.float32)
