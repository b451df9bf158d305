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

import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from dmljax import numerics

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine", "step")


_path_keys = numerics.path_keys


def weight_decay_mask(params) -> Any:
  """True for leaves that get weight decay: model ``kernel`` leaves only."""
  def decide(path, _):
    keys = _path_keys(path)
    return bool(keys) and keys[0] == "model" and keys[-1] == "kernel"
  return jax.tree_util.tree_map_with_path(decide, params)


#: Sub-groups of the ``model`` group that ``lr_multipliers`` may name: the embedding layer
#: (Flax modules ``head`` / ``head_bn``) and everything else of the model (the trunk).
MODEL_SUBGROUPS = ("head", "trunk")


def _group_of(keys: tuple[str, ...], multipliers: dict[str, float]) -> str:
  """The multiplier key that applies to a leaf: ``head`` / ``trunk`` inside the model when the
  multipliers name them, else the top-level group."""
  if keys and keys[0] == "model":
    sub = "head" if any(k in ("head", "head_bn") for k in keys[1:]) else "trunk"
    if sub in multipliers:
      return sub
  return keys[0] if keys else ""


def scale_by_group(multipliers: dict[str, float]) -> optax.GradientTransformation:
  """Multiplies the updates of group ``g`` by ``multipliers[g]`` (default 1).

  Groups are the top-level keys of the params (``model``, ``proxies``, ...) and, inside
  ``model``, ``head`` (the embedding layer) and ``trunk`` (the rest), which take precedence over
  ``model`` (PROFS trains the embedding layer at 10x: ``{"head": 10}``). Works from the update
  tree's paths, so no params are needed and the state is empty.
  """
  multipliers = {str(k): float(v) for k, v in dict(multipliers).items()}

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    del params
    def scale(path, u):
      m = multipliers.get(_group_of(_path_keys(path), multipliers), 1.0) if path else 1.0
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


def epochs_to_steps(epochs: float, steps_per_epoch: Optional[int]) -> int:
  if not epochs:
    return 0
  if not steps_per_epoch:
    raise ValueError("an epoch-based optim setting needs the training set size (steps per epoch).")
  return max(1, int(math.ceil(float(epochs) * steps_per_epoch)))


def make_schedule(oc, total_steps: int, steps_per_epoch: Optional[int] = None) -> optax.Schedule:
  """Linear warm-up over ``oc.warmup_steps``, then constant, cosine decay to 0 at ``total_steps``,
  or step decay (``x oc.decay_factor`` every ``oc.decay_every_epochs`` epochs: the MPA paper's
  x0.5 every 20 epochs)."""
  if oc.schedule not in SCHEDULES:
    raise ValueError(f"Unknown optim.schedule {oc.schedule!r}; valid: {list(SCHEDULES)}.")
  lr, warm = float(oc.learning_rate), int(oc.warmup_steps)
  if oc.schedule == "constant":
    main = optax.constant_schedule(lr)
  elif oc.schedule == "step":
    every = epochs_to_steps(oc.decay_every_epochs, steps_per_epoch)
    if every < 1:
      raise ValueError("optim.schedule='step' needs optim.decay_every_epochs > 0.")
    main = optax.exponential_decay(lr, transition_steps=every, decay_rate=float(oc.decay_factor),
                                   staircase=True)
  else:
    main = optax.cosine_decay_schedule(lr, max(1, total_steps - warm))
  if warm <= 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), main], [warm])


class FreezeState(NamedTuple):
  count: jax.Array


def freeze_trunk(steps: int, trainable=("head", "head_bn")) -> optax.GradientTransformation:
  """Zeroes the updates of model parameters outside ``trainable`` during the first ``steps``.

  The proxy baselines' "warm-up training of the embedding layer": for ``steps`` steps only the
  embedding layer (Flax module ``head``) and the framework's own parameters (proxies) move. It is
  placed after the moments, so the frozen trunk's Adam moments keep accumulating its gradients and
  Adam's bias correction stays matched when the trunk starts moving (zeroing the gradients instead
  would leave zero moments under a running step count, and a first trunk step larger than Adam's).
  """
  trainable = tuple(trainable)

  def init_fn(params):
    del params
    return FreezeState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    del params
    frozen = state.count < steps

    def gate(path, u):
      keys = _path_keys(path)
      if not keys or keys[0] != "model" or any(k in trainable for k in keys):
        return u
      return jnp.where(frozen, jnp.zeros_like(u), u)

    return (jax.tree_util.tree_map_with_path(gate, updates),
            FreezeState(count=optax.safe_increment(state.count)))

  return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(oc, total_steps: int, steps_per_epoch: Optional[int] = None
                   ) -> optax.GradientTransformation:
  """Builds the optimizer from ``config.optim``.

  Args:
    oc: ConfigDict with ``name`` (adam | adamw | sgd), ``learning_rate``, ``weight_decay``,
      ``grad_clip_norm`` (0 disables), ``b1``, ``b2``, ``eps``, ``momentum`` (sgd),
      ``schedule`` (+ ``decay_every_epochs``, ``decay_factor`` for ``"step"``),
      ``warmup_steps``, ``lr_multipliers`` (dict group -> factor) and
      ``freeze_trunk_epochs`` (warm-up of the embedding layer alone; 0 = off).
    total_steps: training length, for the cosine schedule.
    steps_per_epoch: ``ceil(training samples / batch size)``, for the epoch-based settings.

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
  parts.append(optax.scale_by_learning_rate(make_schedule(oc, total_steps, steps_per_epoch)))
  if oc.lr_multipliers:
    parts.append(scale_by_group(oc.lr_multipliers))
  freeze = epochs_to_steps(oc.get("freeze_trunk_epochs", 0), steps_per_epoch)
  if freeze:
    parts.append(freeze_trunk(freeze))
  return optax.chain(*parts)


reset_group_state = numerics.reset_group_state  # re-exported: frameworks take it from there
