"""The optax chain built from ``config.optim``.

Order of the chain (each step explained where it is built), by default: clip the raw gradient by
its global norm (and, with ``clip_value``, each value) -> (Adam / SGD) coupled L2 weight decay ->
Adam moments (or SGD momentum), kept per parameter group -> (AdamW only) decoupled weight decay
-> learning rate (schedule) -> per-group learning-rate multipliers.

``decay_before_clip = True`` is the CCP authors' order: the coupled L2 term is added to the loss
gradient (which already holds CCP's proximal term, part of the loss here) *before* the clipping
to global norm ``grad_clip_norm`` and then to ``+-clip_value`` per value, then Adam. (Their
gradient transformers, in this order: proximal term, weight decay, global-norm clip, value clip.)

The moments live in one state per group (:func:`per_group`), each with its own step count, so a
group whose state is reset (CCP's re-initialised proxies, when ``ccp.reset_proxy_opt_state``) is
exactly a freshly started Adam for that group: its bias correction restarts with its moments. The
learning-rate schedule keeps the run's step count.

Parameter groups are the top-level keys of the params dict: ``"model"`` (backbone + head) and
whatever a framework adds (``"proxies"``, ...). Which leaves weight decay acts on is
``weight_decay_scope`` (:data:`DECAY_SCOPES`): ``"kernels"`` (the default) is the ``kernel``
leaves of the model only, never biases, BatchNorm scale/bias or proxies (decay would pull proxies
towards the origin, changing the geometry the proxy losses rely on); ``"all_but_batchnorm"`` is
the CCP authors' (every trainable variable whose name lacks "bn": biases and proxies included,
BatchNorm's scale and bias excluded).
"""
from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from dmljax import numerics

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine", "step")


_path_keys = numerics.path_keys


#: Which leaves weight decay acts on (``optim.weight_decay_scope``).
DECAY_SCOPES = ("kernels", "all_but_batchnorm")


def batchnorm_leaves(params) -> Any:
  """True for the ``scale`` / ``bias`` leaves of normalisation layers.

  A normalisation layer is recognised by its parameters, not by its name: a module holding a
  ``scale`` parameter (every BatchNorm of the models here, whatever the PyTorch name it was
  ported under, and the head's ``head_bn``). Convolutions and dense layers hold ``kernel`` and
  ``bias``, never ``scale``.
  """
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  norm_modules = {_path_keys(p)[:-1] for p, _ in flat if _path_keys(p)[-1:] == ("scale",)}

  def decide(path, _):
    keys = _path_keys(path)
    return keys[:-1] in norm_modules and keys[-1] in ("scale", "bias")
  return jax.tree_util.tree_map_with_path(decide, params)


def weight_decay_mask(params, scope: str = "kernels") -> Any:
  """True for leaves that get weight decay.

  ``scope="kernels"``: model ``kernel`` leaves only. ``"all_but_batchnorm"`` (the CCP authors'):
  every leaf (biases and proxies included) except the normalisation layers' ``scale`` / ``bias``
  (:func:`batchnorm_leaves`).
  """
  if scope not in DECAY_SCOPES:
    raise ValueError(f"Unknown optim.weight_decay_scope {scope!r}; valid: {list(DECAY_SCOPES)}.")
  if scope == "all_but_batchnorm":
    return jax.tree.map(lambda is_bn: not is_bn, batchnorm_leaves(params))

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
      ``weight_decay_scope`` (:data:`DECAY_SCOPES`, default ``"kernels"``),
      ``grad_clip_norm`` (0 disables), ``clip_value`` (per-value clip, 0 disables; default 0),
      ``decay_before_clip`` (coupled decay added before the clipping, the CCP authors' order;
      default False), ``b1``, ``b2``, ``eps``, ``momentum`` (sgd), ``schedule`` (+
      ``decay_every_epochs``, ``decay_factor`` for ``"step"``), ``warmup_steps``,
      ``lr_multipliers`` (dict group -> factor) and ``freeze_trunk_epochs`` (warm-up of the
      embedding layer alone; 0 = off).
    total_steps: training length, for the cosine schedule.
    steps_per_epoch: ``ceil(training samples / batch size)``, for the epoch-based settings.

  Returns:
    An ``optax.GradientTransformation`` over the full params dict.
  """
  if oc.name not in OPTIMIZERS:
    raise ValueError(f"Unknown optim.name {oc.name!r}; valid optimizers: {list(OPTIMIZERS)}.")
  scope = oc.get("weight_decay_scope", "kernels")
  if scope not in DECAY_SCOPES:
    raise ValueError(f"Unknown optim.weight_decay_scope {scope!r}; valid: {list(DECAY_SCOPES)} "
                     "(set --config.optim.weight_decay_scope).")
  decay_first = bool(oc.get("decay_before_clip", False))
  if decay_first and oc.name == "adamw":
    raise ValueError("optim.decay_before_clip needs a coupled weight decay (optim.name adam or "
                     "sgd); adamw's decay is decoupled, applied after the moments.")
  clip_value = float(oc.get("clip_value", 0.0) or 0.0)
  if clip_value < 0:
    raise ValueError(f"optim.clip_value must be >= 0 (0 = off), got {clip_value}.")
  mask = functools.partial(weight_decay_mask, scope=scope)
  wd = float(oc.weight_decay)
  coupled = ([optax.add_decayed_weights(wd, mask=mask)]
             if wd > 0 and oc.name in ("adam", "sgd") else [])
  clips = []
  if oc.grad_clip_norm and oc.grad_clip_norm > 0:
    # The CCP authors clip at global norm 10 (then each value at 10).
    clips.append(optax.clip_by_global_norm(float(oc.grad_clip_norm)))
  if clip_value > 0:
    clips.append(optax.clip(clip_value))
  # Coupled L2 (what "Adam with weight decay" means in TF/Keras regularizers): by default after
  # the clipping (the decay term is never clipped), with decay_before_clip before it.
  parts = coupled + clips if decay_first else clips + coupled
  if oc.name in ("adam", "adamw"):
    parts.append(per_group(optax.scale_by_adam(b1=oc.b1, b2=oc.b2, eps=oc.eps)))
    if oc.name == "adamw" and wd > 0:
      parts.append(optax.add_decayed_weights(wd, mask=mask))
  elif oc.momentum:
    parts.append(per_group(optax.trace(decay=float(oc.momentum), nesterov=False)))
  parts.append(optax.scale_by_learning_rate(make_schedule(oc, total_steps, steps_per_epoch)))
  if oc.lr_multipliers:
    parts.append(scale_by_group(oc.lr_multipliers))
  freeze = epochs_to_steps(oc.get("freeze_trunk_epochs", 0), steps_per_epoch)
  if freeze:
    parts.append(freeze_trunk(freeze))
  return optax.chain(*parts)


reset_group_state = numerics.reset_group_state  # re-exported: frameworks take it from there
