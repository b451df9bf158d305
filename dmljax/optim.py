"""The optax chain built from ``config.optim``.

Order of the chain (each step explained where it is built): clip the raw gradient by its global
norm -> (Adam only) coupled L2 weight decay -> Adam moments -> (AdamW only) decoupled weight decay
-> learning rate (schedule) -> per-group learning-rate multipliers.

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
    parts.append(optax.scale_by_adam(b1=oc.b1, b2=oc.b2, eps=oc.eps))
  elif oc.name == "adamw":
    parts.append(optax.scale_by_adam(b1=oc.b1, b2=oc.b2, eps=oc.eps))
    if wd > 0:
      parts.append(optax.add_decayed_weights(wd, mask=weight_decay_mask))
  else:
    if wd > 0:
      parts.append(optax.add_decayed_weights(wd, mask=weight_decay_mask))
    if oc.momentum:
      parts.append(optax.trace(decay=float(oc.momentum), nesterov=False))
  parts.append(optax.scale_by_learning_rate(make_schedule(oc, total_steps)))
  if oc.lr_multipliers:
    parts.append(scale_by_group(oc.lr_multipliers))
  return optax.chain(*parts)


def reset_group_state(opt_state, fresh_state, group: str):
  """Optimizer state with every params-shaped sub-tree's ``group`` entry taken from ``fresh_state``.

  Used by CCP when proxies are re-initialised: their Adam moments belong to the old proxies.
  Scalars such as Adam's step count are kept from ``opt_state``.
  """
  def pick(path, old, new):
    return new if group in _path_keys(path) else old
  return jax.tree_util.tree_map_with_path(pick, opt_state, fresh_state)
