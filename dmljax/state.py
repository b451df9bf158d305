"""The train state: one pytree holding everything a run needs to continue exactly.

Nothing lives in Python objects: a checkpoint of :class:`TrainState` (plus the small JSON host
state written in the same checkpoint step, see :mod:`dmljax.checkpoint`) is the whole run.
"""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp

from dmljax import numerics

PyTree = Any


@flax.struct.dataclass
class TrainState:
  """Attributes:
    step: int32 scalar, optimizer steps taken.
    params: ``{"model": flax params, **framework params}`` e.g. ``"proxies": [C*P, D]``.
    batch_stats: BatchNorm running statistics of the model.
    opt_state: optax state over ``params``.
    anchor: proximal anchor, a copy of ``params["model"]`` (CCP's theta^(k-1)).
    best: ``{"params", "batch_stats"}`` of the best validation evaluation so far (changed only
      at evaluations: kept out of the jitted step, see :func:`split_for_step`).
    tracker: early-stopping scalars: ``best_metric`` (float32, -inf before the first eval),
      ``best_step``, ``evals_since_best``, ``num_evals`` (int32); and the health counters of the
      train step: ``nonfinite_steps`` (steps whose update was skipped for a non-finite loss or
      gradient) and ``nonfinite_streak`` (how many of the latest steps in a row were).
    framework: framework state (dict of arrays: projection index, proxy labels, memory, ...).
    rng: legacy uint32[2] PRNG key; per-step keys are ``fold_in(rng, step)``.
  """
  step: jax.Array
  params: PyTree
  batch_stats: PyTree
  opt_state: PyTree
  anchor: PyTree
  best: PyTree
  tracker: dict
  framework: dict
  rng: jax.Array


def new_tracker() -> dict:
  return {
      "best_metric": jnp.asarray(-jnp.inf, jnp.float32),
      "best_step": jnp.asarray(-1, jnp.int32),
      "evals_since_best": jnp.asarray(0, jnp.int32),
      "num_evals": jnp.asarray(0, jnp.int32),
      "nonfinite_steps": jnp.asarray(0, jnp.int32),
      "nonfinite_streak": jnp.asarray(0, jnp.int32),
  }


copy_tree = numerics.copy_tree  # re-exported: it lives in the leaf module


def create_train_state(*, rng, model_params, batch_stats, extra_params, framework_state, tx) -> TrainState:
  """Assembles the initial state; anchor and best start as copies of the initial model."""
  params = {"model": model_params, **extra_params}
  return TrainState(
      step=jnp.asarray(0, jnp.int32),
      params=params,
      batch_stats=batch_stats,
      opt_state=tx.init(params),
      anchor=copy_tree(model_params),
      best={"params": copy_tree(params), "batch_stats": copy_tree(batch_stats)},
      tracker=new_tracker(),
      framework=framework_state,
      rng=rng,
  )


# ----------------------------------------------------------------------------- the lean step


def split_for_step(state: TrainState, held_keys=(), anchor_in_step: bool = False):
  """``(carry, anchor, held)``: what the jitted step changes, what it only reads, the rest.

  * ``carry``: ``state`` without ``best`` (None), without the framework-state entries
    ``held_keys`` and, unless ``anchor_in_step``, without the anchor (None): the step's donated
    input and its output;
  * ``anchor``: the proximal anchor as a read-only (not donated) step input, or None when it is
    part of ``carry``;
  * ``held``: what only evaluations change (``best``, the framework's ``held_keys`` entries);
    never passed to the step.

  Only dictionary look-ups: no array is copied or touched. :func:`merge_after_step` is the
  inverse.
  """
  fs = state.framework
  held = {"best": state.best, "framework": {k: fs[k] for k in held_keys if k in fs}}
  carry = state.replace(best=None, framework={k: v for k, v in fs.items()
                                              if k not in held["framework"]})
  anchor = None
  if not anchor_in_step:
    anchor, carry = state.anchor, carry.replace(anchor=None)
  return carry, anchor, held


def merge_after_step(carry: TrainState, anchor, held: dict) -> TrainState:
  """The whole :class:`TrainState` again from :func:`split_for_step`'s parts."""
  state = carry.replace(best=held["best"], framework={**carry.framework, **held["framework"]})
  return state if anchor is None else state.replace(anchor=anchor)
