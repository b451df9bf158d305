"""The optax chain built from ``config.optim``.

Order of the chain (each step explained where it is built): clip the raw gradient by its global
norm -> (Adam only) coupled L2 weight decay -> Adam moments (or SGD momentum), kept per parameter
group -> (AdamW only) decoupled weight decay -> learning rate (schedule) -> per-group
learning-rate multipliers.

The moments live in one state per group (:func:`per_group`), each with its own step count, so a
group whose state is reset (CCP's re-initialised proxies, when ``ccp.reset_proxy_opt_state``) is
exactly a freshly started Adam for that group: its bias correction restarts with its moments. The
learning-rate schedule keeps the run's step count.

Parameter groups are the top-level keys of the params dict: ``"model"`` (backbone + head) and
whatever a framework adds (``"proxies"``, ...). Weight decay applies to ``kernel`` leaves of the
model only: never to biases, BatchNorm scale/bias, or proxies (the authors' CCP code exempts
BatchNorm; proxies are exempt because decay would pull them towards the origin, changing the
geometry the proxy losses rely on).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine")


def _path_keys(path) -> tuple[str, ...]:
  return tuple(str(getattr(p, "key", getattr(p, "name", p))) for p in path)


def weight_decay_mask(params) -> Any:
  """True for leaves that get weight decay: model ``kernel`` leaves only."""
  def decide(path, _):
    keys = _path_keys(path)
    return bool(keys) and keys[0] == "model" and keys[-1] == "kernel"
  return jax.tree_util.tree_map_with_path(decide, params)


def scale_by_group(multipliers: dict[str, float]) -> optax.GradientTransformation:
  """Multiplies the updates of top-level group ``g`` by ``multipliers[g]`` (default 1).

  Works from the update tree's paths, so no params are needed and the state is empty.
  """
  multipliers = {str(k): float(v) for k, v in dict(multipliers).items()}

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    del params
    def scale(path, u):
      m = multipliers.get(_path_keys(path)[0], 1.0) if path else 1.0
      return u if m == 1.0 else u * jnp.asarray(m, u.dtype)
    return jax.tree_util.tree_map_with_path(scale, updates), state

  return optax.GradientTransformation(init_fn, update_fn)


def per_group(inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """Applies ``inner`` to each top-level group of the params dict with its own state.

  The state is ``{group: inner_state}``; :func:`reset_group_state` can then replace one group's
  state (moments *and* step count) without touching the others.
  """

  def init_fn(params):
    return {g: inner.init(p) for g, p in params.items()}

  def update_fn(updates, state, params=None):
    new_updates, new_state = {}, {}
    for g, u in updates.items():
      new_updates[g], new_state[g] = inner.update(u, state[g], None if params is None else params[g])
    return new_updates, new_state

  return optax.GradientTransformation(init_fn, update_fn)


def make_schedule(oc, total_steps: int) -> optax.Schedule:
  """Linear warm-up over ``oc.warmup_steps`` then constant or cosine decay to 0 at ``total_steps``."""
  if oc.schedule not in SCHEDULES:
    raise ValueError(f"Unknown optim.schedule {oc.schedule!r}; valid: {list(SCHEDULES)}.")
  lr, warm = float(oc.learning_rate), int(oc.warmup_steps)
  if oc.schedule == "constant":
    main = optax.constant_schedule(lr)
  else:
    main = optax.cosine_decay_schedule(lr, max(1, total_steps - warm))
  if warm <= 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), main], [warm])


def make_optimizer(oc, total_steps: int) -> optax.GradientTransformation:
  """Builds the optimizer from ``config.optim``.

  Args:
    oc: ConfigDict with ``name`` (adam | adamw | sgd), ``learning_rate``, ``weight_decay``,
      ``grad_clip_norm`` (0 disables), ``b1``, ``b2``, ``eps``, ``momentum`` (sgd),
      ``schedule``, ``warmup_steps`` and ``lr_multipliers`` (dict group -> factor).
    total_steps: training length, for the cosine schedule.

  Returns:
    An ``optax.GradientTransformation`` over the full params dict.
  """
  if oc.name not in OPTIMIZERS:
    raise ValueError(f"Unknown optim.name {oc.name!r}; valid optimizers: {list(OPTIMIZERS)}.")
  parts = []
  if oc.grad_clip_norm and oc.grad_clip_norm > 0:
    # Clip the loss gradient before anything else (the CCP authors clip at norm 10).
    parts.append(optax.clip_by_global_norm(float(oc.grad_clip_norm)))
  wd = float(oc.weight_decay)
  if oc.name == "adam":
    if wd > 0:
      # Coupled L2 (what "Adam with weight decay" means in TF/Keras regularizers).
      parts.append(optax.add_decayed_weights(wd, mask=weight_decay_mask))
    parts.append(per_group(optax.scale_by_adam(b1=oc.b1, b2=oc.b2, eps=oc.eps)))
  elif oc.name == "adamw":
    parts.append(per_group(optax.scale_by_adam(b1=oc.b1, b2=oc.b2, eps=oc.eps)))
    if wd > 0:
      parts.append(optax.add_decayed_weights(wd, mask=weight_decay_mask))
  else:
    if wd > 0:
      parts.append(optax.add_decayed_weights(wd, mask=weight_decay_mask))
    if oc.momentum:
      parts.append(per_group(optax.trace(decay=float(oc.momentum), nesterov=False)))
  parts.append(optax.scale_by_learning_rate(make_schedule(oc, total_steps)))
  if oc.lr_multipliers:
    parts.append(scale_by_group(oc.lr_multipliers))
  return optax.chain(*parts)


def reset_group_state(opt_state, fresh_state, group: str):
  """Optimizer state with every entry under key ``group`` taken from ``fresh_state``.

  With the per-group moments of :func:`make_optimizer` this resets the group's moments and its
  own step count (a fresh Adam for that group); chain-level counts (the learning-rate schedule)
  are kept from ``opt_state``. Used by CCP when ``ccp.reset_proxy_opt_state`` is set.
  """
  def pick(path, old, new):
    return new if group in _path_keys(path) else old
  return jax.tree_util.tree_map_with_path(pick, opt_state, fresh_state)
